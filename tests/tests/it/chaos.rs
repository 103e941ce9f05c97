//! Chaos: a 5,000-credential campaign on real Redis ACL users across three
//! regions, two `keywave-worker` processes per region, while a random worker
//! process is killed with SIGKILL every one to two seconds and started again.
//! The campaign completes; every credential is consistent (its CURRENT secret
//! authenticates, the old one is refused, nothing is left staged); no task
//! set more than one new secret (every `ACL SETUSER` is watched with
//! `MONITOR`). The figures are printed at the end.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::topology;
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::process::Daemon;
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::store::SecretStore;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOTAL: usize = 5_000;
const REGIONS: [&str; 3] = ["eu", "us", "ap"];
const WORKERS_PER_REGION: usize = 2;
/// The campaign must be done by then (kills included).
const BOUND: Duration = Duration::from_secs(150);

/// One worker process slot: its command line, and the running process
/// (shared with `chaos_default`).
pub(crate) struct Slot {
    pub(crate) region: &'static str,
    pub(crate) n: usize,
    pub(crate) config: PathBuf,
    pub(crate) key: String,
    pub(crate) logs: PathBuf,
    pub(crate) restarts: usize,
    pub(crate) daemon: Option<Daemon>,
}

impl Slot {
    pub(crate) fn spawn(&mut self, bin: &Path, nats: &str) {
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&self.config)
            .env("KEYWAVE_REGION_KEY", &self.key)
            .env("KEYWAVE_NATS_URL", nats)
            // Successful tasks log "Task finished" at debug: the figures
            // below count the ones that finished on a redelivery.
            .env("RUST_LOG", "info,keywave_worker::protocol=debug")
            .env("NO_COLOR", "1")
            // The in-process coordinator of this test publishes unsigned
            // tasks (tests/it/signing.rs covers signatures).
            .env(keywave_worker::config::ENV_INSECURE_UNSIGNED_TASKS, "1")
            // A target that takes a little longer per rotation, so that the
            // campaign runs long enough for a few dozen kills.
            .env("KEYWAVE_FAULT_DELAY", "set:60")
            .env_remove("KEYWAVE_FAULT_CRASH_AFTER");
        let log = self
            .logs
            .join(format!("{}-{}-{}.log", self.region, self.n, self.restarts));
        self.restarts += 1;
        self.daemon = Some(Daemon::spawn(
            format!("keywave-worker {}#{}", self.region, self.n),
            cmd,
            &log,
        ));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Tasks that finished on a delivery after the first (their earlier
/// delivery's process was killed), from the workers' logs.
pub(crate) fn redelivered_finishes(logs: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(logs).unwrap().flatten() {
        let text = strip_ansi(&std::fs::read_to_string(e.path()).unwrap_or_default());
        n += text
            .lines()
            .filter(|l| l.contains("Task finished"))
            .filter(|l| {
                l.split("delivered=")
                    .nth(1)
                    .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|d| d.parse::<u64>().ok())
                    .is_some_and(|d| d > 1)
            })
            .count();
    }
    n
}

/// Distinct new passwords set per user.
pub(crate) type Sets = Arc<Mutex<HashMap<String, HashSet<String>>>>;

/// Parses complete RESP commands off the front of `buf`, recording the new
/// passwords of every `ACL SETUSER`; leaves an incomplete command in place.
fn scan_commands(buf: &mut Vec<u8>, sets: &Sets) {
    fn line(b: &[u8], at: usize) -> Option<(usize, usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let n = std::str::from_utf8(&b[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    loop {
        if buf.is_empty() || buf[0] != b'*' {
            buf.clear();
            return;
        }
        let Some((count, mut at)) = line(buf, 0) else {
            return;
        };
        let mut args: Vec<String> = Vec::with_capacity(count);
        for _ in 0..count {
            let Some((len, start)) = line(buf, at) else {
                return;
            };
            if buf.len() < start + len + 2 {
                return;
            }
            args.push(String::from_utf8_lossy(&buf[start..start + len]).into_owned());
            at = start + len + 2;
        }
        buf.drain(..at);
        if args.len() > 2
            && args[0].eq_ignore_ascii_case("ACL")
            && args[1].eq_ignore_ascii_case("SETUSER")
        {
            for a in &args[3..] {
                if let Some(pw) = a.strip_prefix('>') {
                    sets.lock()
                        .unwrap()
                        .entry(args[2].clone())
                        .or_default()
                        .insert(pw.to_string());
                }
            }
        }
    }
}

/// A TCP proxy in front of Redis that records every new password an
/// `ACL SETUSER` sets (Redis hides those commands from `MONITOR`). Returns
/// the proxy's URL.
pub(crate) async fn setuser_proxy(upstream_port: u16, sets: Sets) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    serve_setuser_proxy(
        listener,
        move || tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)),
        sets,
    );
    format!("redis://127.0.0.1:{port}")
}

/// Serves [`setuser_proxy`] on `listener`, reaching Redis through
/// `connect` (once per client connection).
pub(crate) fn serve_setuser_proxy<C, F>(listener: tokio::net::TcpListener, connect: C, sets: Sets)
where
    C: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let sets = sets.clone();
            let upstream = connect();
            tokio::spawn(async move {
                let Ok(server) = upstream.await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                let mut pending = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    let n = match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    pending.extend_from_slice(&chunk[..n]);
                    scan_commands(&mut pending, &sets);
                }
                let _ = sw.shutdown().await;
            });
        }
    });
}

pub(crate) async fn redis_admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_5000_redis_users_3_regions_workers_killed_every_second_or_two() {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let scratch = tempfile::Builder::new()
        .prefix("keywave-chaos-")
        .tempdir()
        .unwrap();

    // The fleet: ACL users with today's password, in the inventory.
    let creds: Vec<Credential> =
        credentials("chaos", TOTAL, &REGIONS, "redis-main", TargetKind::Redis)
            .into_iter()
            .map(|mut c| {
                c.principal = format!("kwc-{}", c.id);
                c
            })
            .collect();
    let mut today: HashMap<String, Secret> = HashMap::new();
    let mut admin = redis_admin(&redis.url()).await;
    for chunk in creds.chunks(500) {
        let mut pipe = redis::pipe();
        for c in chunk {
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
    }
    support::put_inventory(&client, &creds).await;

    // Each region: its key, its consumer (redelivery after 1 s, enough
    // deliveries that kills never make a task poison), its store, enrolled.
    let js = topology::context(client.clone());
    let cfg = topology::Config {
        task_backoff: vec![Duration::from_secs(1)],
        task_max_deliver: 50,
        ..Default::default()
    };
    let mut keys = HashMap::new();
    let mut stores = HashMap::new();
    for region in REGIONS {
        let key = RegionKey::generate();
        let (_, kv) = topology::ensure_region(&js, region, &cfg).await.unwrap();
        stores.insert(region, SecretStore::from_kv(kv, region, key.clone()));
        keys.insert(region, key);
    }
    futures::future::join_all(creds.chunks(250).map(|chunk| {
        let stores = &stores;
        let today = &today;
        async move {
            for c in chunk {
                stores[c.region.as_str()]
                    .enroll(&c.id, today[&c.id].clone())
                    .await
                    .unwrap();
            }
        }
    }))
    .await;

    // Workers reach Redis through a proxy that records every ACL SETUSER.
    let sets: Sets = Arc::default();
    let proxied = setuser_proxy(redis.port(), sets.clone()).await;

    // Six worker processes.
    let logs = scratch.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut slots = Vec::new();
    for region in REGIONS {
        let config = scratch.path().join(format!("{region}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
region = "{region}"
concurrency = 2
shutdown_grace_secs = 5
[jetstream]
task_backoff_secs = [1]
task_max_deliver = 50
[[endpoint]]
name = "redis-main"
kind = "redis"
url = "{}"
max_concurrency = 32
"#,
                proxied
            ),
        )
        .unwrap();
        for n in 0..WORKERS_PER_REGION {
            let mut slot = Slot {
                region,
                n,
                config: config.clone(),
                key: keys[region].to_hex(),
                logs: logs.clone(),
                restarts: 0,
                daemon: None,
            };
            slot.spawn(&bin, &server.url());
            slots.push(slot);
        }
    }

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(2));
    let mut sp = spec(
        in_regions(&REGIONS),
        Strategy::Continuity,
        "1,25%",
        0.0,
        OnFailure::Pause,
    );
    sp.task_timeout_ms = 120_000;
    let started = Instant::now();
    let id = api.start(sp).await.unwrap();

    // Chaos until the campaign is over.
    let mut kills = 0usize;
    let status = loop {
        let pause = Duration::from_millis(rand::thread_rng().gen_range(1_000..=2_000));
        tokio::time::sleep(pause).await;
        if let Ok(s) = api.status(&id).await {
            if s.state.is_terminal() || s.state == CampaignState::Paused {
                break s;
            }
        }
        assert!(
            started.elapsed() < BOUND,
            "campaign not done after {BOUND:?}"
        );
        let victim = rand::thread_rng().gen_range(0..slots.len());
        let slot = &mut slots[victim];
        if let Some(mut d) = slot.daemon.take() {
            d.kill();
        }
        kills += 1;
        slot.spawn(&bin, &server.url());
    };
    let elapsed = started.elapsed();
    for slot in &mut slots {
        if let Some(mut d) = slot.daemon.take() {
            d.kill();
        }
    }
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), TOTAL as u64, "{status:#?}");

    // Every credential consistent, each checked with a real AUTH.
    let sets = sets.lock().unwrap().clone();
    let checks = futures::future::join_all(creds.chunks(TOTAL / 16).map(|chunk| {
        let (stores, today, sets, url) = (&stores, &today, &sets, redis.url());
        async move {
            let mut out = Vec::new();
            for c in chunk {
                let rec = stores[c.region.as_str()]
                    .get(&c.id)
                    .await
                    .unwrap()
                    .expect("record");
                let current = rec.current.clone().expect("current");
                let new_ok = crate::faults::auth(&url, &c.principal, &current.secret).await;
                let old_refused = !crate::faults::auth(&url, &c.principal, &today[&c.id]).await;
                let set = sets.get(&c.principal).map_or(0, HashSet::len);
                out.push((
                    c.id.clone(),
                    new_ok,
                    old_refused,
                    set,
                    rec.pending.is_some(),
                ));
            }
            out
        }
    }))
    .await;
    let checked: usize = checks.iter().map(Vec::len).sum();
    let inconsistent: Vec<_> = checks
        .into_iter()
        .flatten()
        .filter(|(_, new_ok, old_refused, set, pending)| {
            !(*new_ok && *old_refused && *set == 1 && !*pending)
        })
        .collect();
    let redelivered = redelivered_finishes(&logs);
    println!(
        "chaos figures: credentials {TOTAL}, regions {}, worker processes {}, kills injected {kills}, \
         tasks finished after a redelivery {redelivered}, credentials checked {checked}, \
         inconsistencies {}, campaign time {elapsed:?}",
        REGIONS.len(),
        REGIONS.len() * WORKERS_PER_REGION,
        inconsistent.len()
    );
    assert!(
        inconsistent.is_empty(),
        "(id, new works, old refused, passwords set, pending left): {inconsistent:#?}"
    );
    assert!(kills >= 5, "the chaos actually happened ({kills} kills)");
    coordinator.stop().await;
}
