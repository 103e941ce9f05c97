//! keywave on the multi-region supercluster of `deploy/multi-region/` (a
//! home cluster of 3 servers, one server per region eu, us, ap, joined by
//! gateways): with placement, each region's task stream and secret store
//! live only on its region's servers and the home state on the home cluster
//! at R3; a placement no server satisfies is refused with an error naming
//! the region and the tags. A campaign over real Redis users in the three
//! regions, each region's worker process connected to its own region's
//! server only, completes, and afterwards each region's tasks and secret
//! ciphertext are found in its own server's store and in no other's.

use crate::faults::auth;
use crate::support::{self, credentials, in_regions, secret, spec};
use async_nats::jetstream::stream::Info;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::subjects;
use keywave_common::topology::{self, Placement};
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::process::Daemon;
use keywave_tests::{NatsSupercluster, RedisServer};
use keywave_worker::store::SecretStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// Redis ACL users per region in the real-process campaign.
const PER_REGION: usize = 200;

fn placed_topology() -> topology::Config {
    topology::Config {
        replicas: 3,
        region_replicas: Some(1),
        home_placement: Some(Placement::parse("cluster=home").unwrap()),
        region_placement: topology::parse_region_placements(
            "eu=region:eu,us=region:us,ap=region:ap",
        )
        .unwrap(),
        ..support::topology()
    }
}

async fn info(js: &async_nats::jetstream::Context, stream: &str) -> Info {
    js.get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("info of {stream}: {e}"))
        .clone()
}

/// The servers holding `info`'s stream: its leader and its replicas.
fn servers_of(info: &Info) -> Vec<String> {
    let c = info.cluster.as_ref().expect("cluster info");
    let mut servers: Vec<String> = c.leader.iter().cloned().collect();
    servers.extend(c.replicas.iter().map(|r| r.name.clone()));
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_keeps_secrets_in_their_region_and_state_at_home() {
    support::init_tracing();
    let sc = NatsSupercluster::start();
    let home = sc.client("home").await;
    let js = topology::context(home.clone());
    let cfg = placed_topology();

    // What `keywave-coordinator --regions eu,us,ap` creates at start-up;
    // twice, as a second coordinator would: creation is idempotent.
    for _ in 0..2 {
        topology::ensure_core(&js, &cfg)
            .await
            .expect("core topology");
        topology::leases(&js, &cfg).await.expect("lease bucket");
        for r in REGIONS {
            topology::ensure_region(&js, r, &cfg)
                .await
                .unwrap_or_else(|e| panic!("region {r}: {e}\n{}", sc.log_tails()));
        }
    }

    for r in REGIONS {
        for stream in [
            format!("KV_{}", topology::kv_secrets(r)),
            topology::tasks_stream(r),
        ] {
            let i = info(&js, &stream).await;
            let c = i.cluster.as_ref().expect("cluster info");
            println!(
                "{stream} of {r}: cluster {:?}, servers {:?}",
                c.name,
                servers_of(&i)
            );
            assert_eq!(c.name.as_deref(), Some(r), "{i:#?}");
            assert_eq!(servers_of(&i), sc.server_names(r), "{i:#?}");
            assert_eq!(i.config.num_replicas, 1);
        }
    }
    let home_servers = sc.server_names("home");
    for stream in [
        topology::STREAM_RESULTS.to_string(),
        topology::STREAM_EVENTS.into(),
        topology::STREAM_AUDIT.into(),
        topology::STREAM_DEADLETTER.into(),
        topology::STREAM_ADVISORIES.into(),
        topology::STREAM_ATTEST.into(),
        format!("KV_{}", topology::KV_INVENTORY),
        format!("KV_{}", topology::KV_CAMPAIGNS),
        format!("KV_{}", topology::KV_LEASES),
    ] {
        let i = info(&js, &stream).await;
        let c = i.cluster.as_ref().expect("cluster info");
        let mut servers = servers_of(&i);
        servers.sort();
        println!("{stream}: cluster {:?}, servers {servers:?}", c.name);
        assert_eq!(c.name.as_deref(), Some("home"), "{stream}: {i:#?}");
        assert_eq!(i.config.num_replicas, 3, "{stream}");
        assert_eq!(servers, home_servers, "{stream} at R3 on the home cluster");
    }

    // A region whose placement no server satisfies: a clear error naming
    // the region and the tag, and nothing created.
    let mut bad = cfg.clone();
    bad.region_placement
        .insert("mars".into(), Placement::parse("region:mars").unwrap());
    let e = topology::ensure_region(&js, "mars", &bad)
        .await
        .expect_err("no server is tagged region:mars");
    println!("unsatisfiable placement: {e}");
    assert!(e.detail.contains("region mars"), "{e}");
    assert!(e.detail.contains("region:mars"), "{e}");
    assert!(js.get_stream("KV_keywave-secrets-mars").await.is_err());
    assert!(js.get_stream(topology::tasks_stream("mars")).await.is_err());
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The streams a server stores: the directory names under its store's
/// `jetstream/<account>/streams/`.
fn stored_streams(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for account in std::fs::read_dir(store.join("jetstream"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for s in std::fs::read_dir(account.path().join("streams"))
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(s.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// The files under `store` that contain `needle`.
fn files_containing(store: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(store)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_redis_in_three_regions_keeps_each_regions_data_on_its_own_servers() {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let sc = NatsSupercluster::start();
    let home = sc.client("home").await;
    let js = topology::context(home.clone());
    let cfg = placed_topology();
    // What `keywave-coordinator --regions eu,us,ap` creates at start-up.
    topology::ensure_core(&js, &cfg)
        .await
        .expect("core topology");
    for r in REGIONS {
        topology::ensure_region(&js, r, &cfg)
            .await
            .unwrap_or_else(|e| panic!("region {r}: {e}\n{}", sc.log_tails()));
    }
    let scratch = tempfile::Builder::new()
        .prefix("keywave-supercluster-")
        .tempdir()
        .unwrap();

    // Each region: its own Redis with today's users, its key, and its
    // secret store written through the region's own server (a write
    // through any other server would carry the ciphertext over a gateway).
    let creds: Vec<Credential> = credentials(
        "scr",
        PER_REGION * REGIONS.len(),
        &REGIONS,
        "redis-main",
        TargetKind::Redis,
    )
    .into_iter()
    .map(|mut c| {
        c.principal = format!("kws-{}", c.id);
        c
    })
    .collect();
    let mut redis = HashMap::new();
    let mut keys = HashMap::new();
    let mut stores = HashMap::new();
    let mut today: HashMap<String, Secret> = HashMap::new();
    for r in REGIONS {
        let server = RedisServer::start();
        let mut admin = crate::chaos::redis_admin(&server.url()).await;
        let mut pipe = redis::pipe();
        for c in creds.iter().filter(|c| c.region == r) {
            let s = secret();
            pipe.cmd("ACL")
                .arg("SETUSER")
                .arg(&c.principal)
                .arg("on")
                .arg(format!(">{}", s.expose()))
                .arg("+ping")
                .ignore();
            today.insert(c.id.clone(), s);
        }
        let _: () = pipe.query_async(&mut admin).await.unwrap();
        let key = RegionKey::generate();
        let local = topology::context(sc.client(r).await);
        let kv = local
            .get_key_value(topology::kv_secrets(r))
            .await
            .unwrap_or_else(|e| panic!("{r}'s secret store from {r}'s server: {e}"));
        let store = SecretStore::from_kv(kv, r, key.clone());
        for c in creds.iter().filter(|c| c.region == r) {
            store.enroll(&c.id, today[&c.id].clone()).await.unwrap();
        }
        redis.insert(r, server);
        keys.insert(r, key);
        stores.insert(r, store);
    }
    support::put_inventory_on(&home, cfg.clone(), &creds).await;

    // One worker process per region, connected to its region's server only.
    let mut workers = Vec::new();
    for r in REGIONS {
        let config = scratch.path().join(format!("{r}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
region = "{r}"
concurrency = 32
[[endpoint]]
name = "redis-main"
kind = "redis"
url = "{}"
max_concurrency = 32
"#,
                redis[r].url()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .env("KEYWAVE_REGION_KEY", keys[r].to_hex())
            .env("KEYWAVE_NATS_URL", &sc.urls(r)[0])
            .env("NO_COLOR", "1")
            // The in-process coordinator publishes unsigned tasks
            // (tests/it/signing.rs covers signatures).
            .env(keywave_worker::config::ENV_INSECURE_UNSIGNED_TASKS, "1");
        workers.push(Daemon::spawn(
            format!("keywave-worker {r}"),
            cmd,
            &scratch.path().join(format!("worker-{r}.log")),
        ));
    }
    // Every region's worker waits on its consumer before the campaign.
    let ready_by = Instant::now() + Duration::from_secs(30);
    for r in REGIONS {
        loop {
            let mut c: async_nats::jetstream::consumer::Consumer<
                async_nats::jetstream::consumer::pull::Config,
            > = js
                .get_consumer_from_stream(topology::worker_consumer(r), topology::tasks_stream(r))
                .await
                .unwrap();
            if c.info().await.unwrap().num_waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < ready_by,
                "the {r} worker never pulled: {}",
                workers
                    .iter()
                    .map(Daemon::log_tail)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let coordinator = support::start_coordinator_on(&home, cfg.clone()).await;
    let api = ApiClient::new(home.clone()).with_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(180))
        .await
        .unwrap();
    println!(
        "campaign of {} Redis users over {REGIONS:?} on the supercluster: {:?} in {:?}",
        creds.len(),
        status.state,
        started.elapsed()
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), creds.len() as u64, "{status:#?}");
    coordinator.stop().await;
    for w in &mut workers {
        w.kill();
    }

    // Proven against each region's Redis: the new secret logs in, the old
    // one is refused.
    for c in &creds {
        let r = c.region.as_str();
        let rec = stores[r].get(&c.id).await.unwrap().expect("record");
        let now = rec.current.expect("current secret").secret;
        assert!(auth(&redis[r].url(), &c.principal, &now).await, "{}", c.id);
        assert!(
            !auth(&redis[r].url(), &c.principal, &today[&c.id]).await,
            "{}: the old secret still works",
            c.id
        );
    }
    // On disk: each region's task stream and secret store are stored by its
    // own server and by no other server of the supercluster.
    let all: Vec<String> = sc
        .clusters()
        .into_iter()
        .flat_map(|c| sc.server_names(c))
        .collect();
    let store_of = |name: &str| sc.store_dir(name).expect("server").to_path_buf();
    for name in &all {
        println!("{name} stores {:?}", stored_streams(&store_of(name)));
    }
    for r in REGIONS {
        let own = sc.server_names(r);
        for stream in [
            topology::tasks_stream(r),
            format!("KV_{}", topology::kv_secrets(r)),
        ] {
            for name in &all {
                let holds = stored_streams(&store_of(name)).contains(&stream);
                assert_eq!(
                    holds,
                    own.contains(name),
                    "{stream} on {name}: stored {holds}, but it belongs on {own:?} only"
                );
            }
        }
        // Every task of the region went through its stream there.
        let tasks = info(&js, &topology::tasks_stream(r)).await;
        assert!(
            tasks.state.last_sequence >= PER_REGION as u64,
            "{r}: {:?}",
            tasks.state
        );

        // The bytes: a piece of the region's newest secret record (the
        // ciphertext as the worker wrote it) is in its own server's files
        // and in no other server's; nor is the subject of its tasks.
        let local = topology::context(sc.client(r).await);
        let mut bucket = local
            .get_stream(format!("KV_{}", topology::kv_secrets(r)))
            .await
            .unwrap();
        let last = bucket.info().await.unwrap().state.last_sequence;
        let record = bucket.get_raw_message(last).await.unwrap().payload;
        assert!(
            record.len() >= 64,
            "a secret record of {} bytes",
            record.len()
        );
        let piece = &record[record.len() / 2 - 16..record.len() / 2 + 16];
        let task_subject = subjects::task(r, &id);
        for name in &all {
            let store = store_of(name);
            let found = files_containing(&store, piece);
            if own.contains(name) {
                assert!(
                    !found.is_empty(),
                    "{r}'s secret ciphertext not found in {name}'s store: the check would prove nothing"
                );
            } else {
                assert!(
                    found.is_empty(),
                    "{r}'s secret ciphertext is stored on {name}: {found:?}"
                );
                let found = files_containing(&store, task_subject.as_bytes());
                assert!(
                    found.is_empty(),
                    "{r}'s tasks are stored on {name}: {found:?}"
                );
            }
        }
    }
}

/// A server that ran a release with one task stream for every region: the
/// region's own stream replaces it once it is empty; while it holds tasks,
/// creating the region's stream is refused with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_task_stream_of_an_earlier_release_is_retired_once_empty() {
    use async_nats::jetstream::stream::{Config, RetentionPolicy};
    support::init_tracing();
    let server = keywave_tests::NatsServer::start();
    let js = topology::context(server.client().await);
    let cfg = support::topology();
    let legacy = Config {
        name: topology::LEGACY_STREAM_TASKS.into(),
        subjects: vec!["keywave.task.>".into()],
        retention: RetentionPolicy::WorkQueue,
        ..Default::default()
    };
    js.create_stream(legacy.clone()).await.unwrap();
    js.publish(
        subjects::task("eu", "c-old"),
        "a task of the earlier release".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let e = topology::ensure_region(&js, "eu", &cfg)
        .await
        .expect_err("the earlier release's stream still holds a task");
    println!("{e}");
    assert!(e.to_string().contains("still holds 1 task"), "{e}");
    assert!(js.get_stream(topology::LEGACY_STREAM_TASKS).await.is_ok());

    // Its workers finished the task: the stream goes, the region's comes.
    js.get_stream(topology::LEGACY_STREAM_TASKS)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    topology::ensure_region(&js, "eu", &cfg).await.unwrap();
    assert!(js.get_stream(topology::LEGACY_STREAM_TASKS).await.is_err());
    js.publish(subjects::task("eu", "c-new"), "a task".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut eu = js.get_stream(topology::tasks_stream("eu")).await.unwrap();
    assert_eq!(eu.info().await.unwrap().state.messages, 1);
    // A second process finds everything in place.
    topology::ensure_region(&js, "eu", &cfg).await.unwrap();
}

/// `deploy/multi-region/start.sh --background --secure` on free ports in a
/// temporary directory; `stop.sh` on drop.
struct SecureSupercluster {
    dir: tempfile::TempDir,
    base: u16,
}

impl SecureSupercluster {
    fn script(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/multi-region")
            .join(name)
    }

    /// A base port whose 36 ports (clients, routes, gateways, monitoring)
    /// are free on loopback now.
    fn free_base() -> u16 {
        for _ in 0..200 {
            let base: u16 = 20_000 + rand::random::<u16>() % 40_000;
            let free =
                (0..36u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
            if free {
                return base;
            }
        }
        panic!("no 36 free ports in a row");
    }

    fn start() -> SecureSupercluster {
        let dir = tempfile::Builder::new()
            .prefix("keywave-mr-secure-")
            .tempdir()
            .unwrap();
        for attempt in 1..=3 {
            let base = Self::free_base();
            let mut cmd = Command::new(Self::script("start.sh"));
            cmd.args(["--background", "--secure"])
                .env("KEYWAVE_MR_BASE_PORT", base.to_string())
                .env("KEYWAVE_MR_DIR", dir.path());
            // Every password generated by the script.
            for (k, _) in std::env::vars() {
                if k.starts_with("KEYWAVE_NATS_PASSWORD_") {
                    cmd.env_remove(k);
                }
            }
            let out = cmd.output().expect("run start.sh");
            if out.status.success() {
                return SecureSupercluster { dir, base };
            }
            let _ = Command::new(Self::script("stop.sh"))
                .env("KEYWAVE_MR_DIR", dir.path())
                .output();
            assert!(
                attempt < 3,
                "start.sh --secure failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        unreachable!("the last attempt panics")
    }

    /// Client URLs of `cluster`, in start.sh's server order (home1..3, eu1, us1, ap1).
    fn urls(&self, cluster: &str) -> String {
        let range = match cluster {
            "home" => 0..3u16,
            "eu" => 3..4,
            "us" => 4..5,
            "ap" => 5..6,
            other => panic!("no cluster {other}"),
        };
        range
            .map(|i| format!("nats://127.0.0.1:{}", self.base + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client of `cluster` as `user` of deploy/nats-accounts.conf, with
    /// its inbox prefix.
    async fn client(&self, cluster: &str, user: &str) -> async_nats::Client {
        let auth = keywave_common::nats::ConnectConfig {
            user: Some(user.to_string()),
            password_file: Some(self.dir.path().join("passwords").join(user)),
            inbox_prefix: Some(keywave_tests::secure::inbox_prefix(user)),
            ..Default::default()
        };
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(3)));
        keywave_common::nats::connect_as(&self.urls(cluster), options, &auth)
            .await
            .unwrap_or_else(|e| panic!("connect to {cluster} as {user}: {e}"))
    }
}

impl Drop for SecureSupercluster {
    fn drop(&mut self) {
        let _ = Command::new(Self::script("stop.sh"))
            .env("KEYWAVE_MR_DIR", self.dir.path())
            .output();
    }
}

/// The supercluster of `start.sh --secure`: every server has the
/// least-privilege users of deploy/nats-accounts.conf. The coordinator user
/// creates the placed topology from the home cluster; each region's worker
/// user works through its region's server and is refused another region's
/// tasks; a campaign over the three regions, every component as its own
/// user, completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_users_work_across_the_secure_supercluster() {
    use keywave_worker::fault::Faults;
    use keywave_worker::targets::sim::{SimOptions, SimTarget};
    use keywave_worker::targets::Targets;
    use std::sync::Arc;
    support::init_tracing();
    let sc = SecureSupercluster::start();
    let cfg = placed_topology();
    let coord = sc.client("home", "coordinator").await;
    let operator = sc.client("home", "operator").await;
    crate::permissions::create_topology_with(&coord, &REGIONS, &cfg).await;

    // Each region's worker user, on its region's server: its own region
    // binds, another region's consumer and store are refused.
    let mut clients = HashMap::new();
    for r in REGIONS {
        clients.insert(r, sc.client(r, &format!("worker-{r}")).await);
    }
    let eu = topology::context(clients["eu"].clone());
    topology::bind_region(&eu, "eu")
        .await
        .expect("worker-eu binds its region through eu1");
    let other =
        tokio::time::timeout(Duration::from_secs(15), topology::bind_region(&eu, "us")).await;
    assert!(
        !matches!(other, Ok(Ok(_))),
        "worker-eu bound region us's consumer and store"
    );

    // A campaign: the operator imports and starts, every worker runs as
    // its region's user on its region's server.
    const N: usize = 60;
    let creds = credentials("lps", N, &REGIONS, "sim-main", TargetKind::Sim);
    let kv = topology::context(operator.clone())
        .get_key_value(topology::KV_INVENTORY)
        .await
        .expect("operator opens the inventory");
    keywave_coordinator::inventory::put_all(&kv, &creds)
        .await
        .expect("operator imports the inventory");
    let sim = SimTarget::new(SimOptions::default());
    let mut workers = HashMap::new();
    for r in REGIONS {
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 16);
        let w = support::start_worker_on(
            &clients[r],
            cfg.clone(),
            r,
            &RegionKey::generate(),
            Arc::new(targets),
            Faults::none(),
        )
        .await;
        workers.insert(r, w);
    }
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        workers[c.region.as_str()]
            .store
            .enroll(&c.id, s)
            .await
            .expect("a worker enrolls into its own region's store");
    }
    let coordinator = support::start_coordinator_answering(
        &coord,
        keywave_coordinator::CoordinatorOptions {
            topology: cfg.clone(),
            coordinator_id: keywave_tests::unique("coordinator"),
            ..Default::default()
        },
        &operator,
        Duration::from_secs(30),
    )
    .await;
    let api = ApiClient::new(operator.clone()).with_timeout(Duration::from_secs(5));
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .expect("the operator starts a campaign");
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), N as u64, "{status:#?}");
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }
    coordinator.stop().await;
    for (_, w) in workers {
        w.stop().await;
    }
}
