//! `keywave dev`: the whole system on one machine, in one process. Starts
//! `nats-server` (unless a URL is given), generates simulated credentials,
//! seeds each region's [`SimTarget`] and secret store with today's secrets,
//! runs the regional workers and a coordinator in-process, rotates everything
//! in one campaign, reports per wave, and finally proves a sample: the
//! stored CURRENT secret authenticates at the target and PREVIOUS does not.

use crate::fleet::InProcess;
use anyhow::{bail, Context as _};
use futures::{StreamExt, TryStreamExt};
use keywave_common::client::ApiClient;
use keywave_common::{
    api::CampaignStatus,
    crypto::{self, RegionKey, SecretPolicy},
    ids, now_ms, topology,
    wire::{
        CampaignSpec, CampaignState, Credential, Decision, OnFailure, RotationTask, Selector,
        Strategy, TargetKind, TaskAction, WaveSize, SCHEMA_VERSION,
    },
};
use keywave_coordinator::{engine::CoordinatorOptions, inventory};
use keywave_harness::{HarnessError, NatsOptions, NatsServer};
use keywave_worker::{
    store::{SecretStore, StoreError},
    targets::{
        sim::{SimOptions, SimTarget},
        Targets,
    },
    WorkerOptions,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seeding and enrolment operations in flight.
const SEED_CONCURRENCY: usize = 64;
/// Credentials verified at the end (all of them when fewer).
const VERIFY_SAMPLE: usize = 200;
/// Concurrent operations per simulated endpoint.
const SIM_ENDPOINT_CONCURRENCY: usize = 1024;
/// Longest a demo campaign may run.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Settings of `keywave dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// A running NATS server; `None` starts `nats-server` from PATH.
    pub nats_url: Option<String>,
    pub regions: Vec<String>,
    pub credentials: u64,
    /// Probability that the simulated target fails a set.
    pub fail_rate: f64,
    pub workers_per_region: usize,
    pub waves: Vec<WaveSize>,
    pub failure_budget: f64,
    pub strategy: Strategy,
    /// Machine output: no progress on stderr.
    pub json: bool,
    pub bake_ms: u64,
    /// Tasks in flight per worker.
    pub concurrency: usize,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            nats_url: None,
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            credentials: 10_000,
            fail_rate: 0.0,
            workers_per_region: 1,
            waves: vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(50.0),
            ],
            failure_budget: 0.05,
            strategy: Strategy::Continuity,
            json: false,
            bake_ms: 0,
            concurrency: 64,
        }
    }
}

/// One wave in the report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DevWave {
    pub wave: u32,
    pub size: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub no_result: u64,
    pub rolled_back: u64,
    pub decision: Option<Decision>,
    pub reason: Option<String>,
}

/// What `keywave dev` prints with `--json` (one line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DevReport {
    pub campaign_id: String,
    pub state: CampaignState,
    pub credentials: u64,
    pub succeeded: u64,
    /// Failed tasks, `no_result` included.
    pub failed: u64,
    pub rolled_back: u64,
    pub waves: Vec<DevWave>,
    /// From the campaign's creation to its final decision.
    pub elapsed_s: f64,
    /// Rotations finished (succeeded or failed) per second of `elapsed_s`.
    pub credentials_per_s: f64,
    /// The wave that exceeded its failure budget, if any.
    pub tripped_wave: Option<u32>,
    pub reason: Option<String>,
    /// Rotated credentials checked at the end: CURRENT authenticates at the
    /// target and PREVIOUS is rejected.
    pub verified_sample: u64,
    /// Checked credentials that failed that proof (0 when all is well).
    pub verify_failures: u64,
}

impl DevReport {
    /// Whether the final proof held for every sampled credential.
    pub fn verified_ok(&self) -> bool {
        self.verify_failures == 0
    }

    /// The report for people.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nkeywave dev: campaign {} {} after {:.2}s ({:.0} credentials/s)",
            self.campaign_id, self.state, self.elapsed_s, self.credentials_per_s
        );
        for w in &self.waves {
            let _ = write!(
                out,
                "  wave {}: size {}, succeeded {}, failed {}",
                w.wave, w.size, w.succeeded, w.failed
            );
            if w.no_result > 0 {
                let _ = write!(out, " (no result {})", w.no_result);
            }
            if w.rolled_back > 0 {
                let _ = write!(out, ", rolled back {}", w.rolled_back);
            }
            match (&w.decision, &w.reason) {
                (Some(d), Some(r)) => {
                    let _ = writeln!(out, " → {}: {r}", d.as_str());
                }
                _ => {
                    let _ = writeln!(out, " → not run");
                }
            }
        }
        let _ = writeln!(
            out,
            "  total: {} credentials, {} succeeded, {} failed, {} rolled back",
            self.credentials, self.succeeded, self.failed, self.rolled_back
        );
        if let Some(w) = self.tripped_wave {
            let _ = writeln!(out, "  wave {w} exceeded the failure budget");
        }
        if let Some(r) = &self.reason {
            let _ = writeln!(out, "  reason: {r}");
        }
        if self.verify_failures == 0 {
            let _ = writeln!(
                out,
                "  verified {} rotated credentials: CURRENT authenticates, PREVIOUS is rejected",
                self.verified_sample
            );
        } else {
            let _ = writeln!(
                out,
                "  VERIFICATION FAILED for {} of {} sampled credentials",
                self.verify_failures,
                self.verified_sample + self.verify_failures
            );
        }
        out
    }
}

/// Starts `nats-server` with its own defaults on a random loopback port, in
/// a temporary directory, and waits until JetStream answers; killed (and
/// the directory removed) when dropped. Shared with `keywave bench`.
pub(crate) async fn start_nats_server() -> anyhow::Result<NatsServer> {
    let started = tokio::task::spawn_blocking(|| NatsServer::try_start(&NatsOptions::default()))
        .await
        .context("starting nats-server")?;
    match started {
        Ok(server) => Ok(server),
        Err(HarnessError::Missing { .. }) => bail!("nats-server was not found in PATH; install it (e.g. `apt-get install nats-server`) or pass --nats URL of a running server"),
        Err(e) => Err(e.into()),
    }
}

/// The simulated credentials: `sim-000001`... spread round-robin over the regions.
fn generate(opts: &DevOptions, run_tag: &str) -> Vec<Credential> {
    (0..opts.credentials)
        .map(|i| {
            let n = i + 1;
            Credential {
                v: SCHEMA_VERSION,
                id: format!("sim-{n:06}"),
                region: opts.regions[i as usize % opts.regions.len()].clone(),
                endpoint: "sim".into(),
                kind: TargetKind::Sim,
                principal: format!("svc-{n:06}"),
                tags: vec![
                    "env=dev".into(),
                    format!("tier={}", n % 3),
                    run_tag.to_string(),
                ],
                owner: Some("keywave-dev".into()),
                consumers: vec![],
            }
        })
        .collect()
}

/// One region's simulated world.
struct Region {
    name: String,
    sim: Arc<SimTarget>,
    store: SecretStore,
    key: RegionKey,
}

/// Seeds every credential of `region` with a random secret at the target and
/// enrols the same secret as CURRENT in the region's store.
async fn seed(region: &Region, creds: &[&Credential]) -> anyhow::Result<()> {
    futures::stream::iter(0..creds.len())
        .map(|i| {
            let c = creds[i];
            let (id, principal) = (c.id.clone(), c.principal.clone());
            async move {
                let secret = crypto::generate(&SecretPolicy::default());
                region.sim.seed(&principal, &secret);
                match region.store.enroll(&id, secret.clone()).await {
                    // Left over from an earlier run on the same server: the
                    // simulated target is new, so the old record means nothing.
                    Err(StoreError::AlreadyManaged { .. }) => {
                        region.store.forget(&id).await?;
                        region.store.enroll(&id, secret).await
                    }
                    other => other,
                }
                .with_context(|| format!("enrolling {id} in region {}", region.name))
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// Prints progress on stderr (the current wave about twice a second, and
/// each wave's decision once) until the campaign is terminal or paused;
/// returns the final status.
async fn follow(api: &ApiClient, cid: &str, quiet: bool) -> anyhow::Result<CampaignStatus> {
    let until = Instant::now() + CAMPAIGN_TIMEOUT;
    let mut last_print = Instant::now();
    let mut announced = 0usize;
    // (wave, done, when): the start of the current rate window.
    let mut window: Option<(u32, u64, Instant)> = None;
    let mut rate = 0.0;
    loop {
        let s = api.status(cid).await?;
        if !quiet {
            let n = s.waves.len();
            for w in s.waves.iter().skip(announced) {
                let Some(d) = w.decision else { break };
                eprintln!(
                    "wave {} ({} of {n}): {} credentials, {} succeeded, {} failed → {}",
                    w.wave,
                    w.wave + 1,
                    w.size,
                    w.succeeded,
                    w.failed + w.no_result,
                    d.as_str()
                );
                announced += 1;
            }
            if let Some(w) = s
                .waves
                .get(s.current_wave as usize)
                .filter(|w| w.decision.is_none())
            {
                let done = w.succeeded + w.failed + w.no_result;
                let now = Instant::now();
                match window {
                    Some((pw, pd, pt)) if pw == w.wave => {
                        if now - pt >= Duration::from_secs(1) {
                            rate = done.saturating_sub(pd) as f64 / (now - pt).as_secs_f64();
                            window = Some((w.wave, done, now));
                        }
                    }
                    _ => {
                        window = Some((w.wave, done, now));
                        rate = 0.0;
                    }
                }
                if done > 0 && last_print.elapsed() >= Duration::from_millis(500) {
                    eprintln!(
                        "wave {} ({} of {n}): {done}/{} done, {} failed, {rate:.0}/s",
                        w.wave,
                        w.wave + 1,
                        w.size,
                        w.failed + w.no_result
                    );
                    last_print = now;
                }
            }
        }
        if s.state.is_terminal() || s.state == CampaignState::Paused {
            return Ok(s);
        }
        if Instant::now() > until {
            bail!(
                "campaign {cid} still {} after {CAMPAIGN_TIMEOUT:?}",
                s.state
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks up to [`VERIFY_SAMPLE`] rotated credentials of waves that were not
/// rolled back: CURRENT authenticates at the sim target, PREVIOUS does not.
/// Returns (verified, failed).
async fn verify(
    status: &CampaignStatus,
    creds: &[Credential],
    regions: &[Region],
) -> anyhow::Result<(u64, u64)> {
    // Plan order is id order, and the campaign selected exactly `creds`.
    let mut candidates = Vec::new();
    let mut offset = 0usize;
    for w in &status.waves {
        let restored = w.rollback_tasks > 0;
        if w.published && !restored {
            candidates.extend((offset..offset + w.size as usize).map(|i| (w.wave, i)));
        }
        offset += w.size as usize;
    }
    let stride = (candidates.len() / VERIFY_SAMPLE).max(1);
    let (mut ok, mut bad) = (0u64, 0u64);
    for &(wave, i) in candidates.iter().step_by(stride).take(VERIFY_SAMPLE) {
        let c = &creds[i];
        let Some(region) = regions.iter().find(|r| r.name == c.region) else {
            continue;
        };
        let Some(record) = region.store.get(&c.id).await? else {
            bad += 1;
            continue;
        };
        let task_id = RotationTask::make_id(&status.campaign_id, wave, TaskAction::Rotate, &c.id);
        if record.applied(&task_id).is_none() {
            // This credential's rotation failed (within the budget): nothing to prove.
            continue;
        }
        let current_ok = record
            .current
            .as_ref()
            .is_some_and(|v| region.sim.accepts(&c.principal, &v.secret));
        let previous_rejected = record
            .previous
            .as_ref()
            .is_some_and(|v| !region.sim.accepts(&c.principal, &v.secret));
        if current_ok && previous_rejected {
            ok += 1;
        } else {
            bad += 1;
            tracing::warn!(credential = %c.id, current_ok, previous_rejected, "Verification failed");
        }
    }
    Ok((ok, bad))
}

fn report(status: &CampaignStatus, verified: (u64, u64)) -> DevReport {
    let end_ms = status.finished_at_ms.unwrap_or_else(|| {
        status
            .waves
            .iter()
            .filter_map(|w| w.finished_at_ms)
            .max()
            .unwrap_or_else(now_ms)
    });
    let elapsed_s = (end_ms.saturating_sub(status.created_at_ms) as f64 / 1000.0).max(0.001);
    let done: u64 = status.succeeded() + status.failed();
    let tripped_wave = status
        .waves
        .iter()
        .find(|w| matches!(w.decision, Some(Decision::Rollback | Decision::Pause)))
        .map(|w| w.wave);
    DevReport {
        campaign_id: status.campaign_id.clone(),
        state: status.state,
        credentials: status.total,
        succeeded: status.succeeded(),
        failed: status.failed(),
        rolled_back: status.rolled_back(),
        waves: status
            .waves
            .iter()
            .map(|w| DevWave {
                wave: w.wave,
                size: w.size,
                succeeded: w.succeeded,
                failed: w.failed + w.no_result,
                no_result: w.no_result,
                rolled_back: w.rolled_back,
                decision: w.decision,
                reason: w.reason.clone(),
            })
            .collect(),
        elapsed_s,
        credentials_per_s: done as f64 / elapsed_s,
        tripped_wave,
        reason: status.reason.clone(),
        verified_sample: verified.0,
        verify_failures: verified.1,
    }
}

/// Runs the demo; see the module documentation.
pub async fn run(opts: DevOptions) -> anyhow::Result<DevReport> {
    if opts.regions.is_empty() || opts.credentials == 0 {
        bail!("keywave dev needs at least one region and one credential");
    }
    for r in &opts.regions {
        ids::validate("region", r)?;
    }
    let say = |msg: &str| {
        if !opts.json {
            eprintln!("{msg}");
        }
    };
    let server = match &opts.nats_url {
        Some(_) => None,
        None => {
            let s = start_nats_server().await?;
            say(&format!("started nats-server on {}", s.url()));
            Some(s)
        }
    };
    let url = opts
        .nats_url
        .clone()
        .or_else(|| server.as_ref().map(NatsServer::url))
        .expect("a URL or a server");
    // Ctrl-C must not leave the nats-server child behind.
    let result = tokio::select! {
        r = run_on(&opts, &url) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Kills the server and removes its directory.
    drop(server);
    result
}

async fn run_on(opts: &DevOptions, url: &str) -> anyhow::Result<DevReport> {
    let say = |msg: &str| {
        if !opts.json {
            eprintln!("{msg}");
        }
    };
    let connect = |name: String| async move {
        keywave_common::nats::connect(url, &name)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))
    };
    let client = connect("keywave-dev".into()).await?;
    let cfg = topology::Config::default();
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &cfg).await?;

    // Inventory.
    let run_id = ids::random_id("dev");
    let run_tag = format!("run={run_id}");
    let creds = generate(opts, &run_tag);
    let t = Instant::now();
    let inv = topology::inventory(&js, &cfg).await?;
    inventory::put_all(&inv, &creds).await?;
    say(&format!(
        "imported {} sim credentials over {} regions ({:.1}s)",
        creds.len(),
        opts.regions.len(),
        t.elapsed().as_secs_f64()
    ));

    // Regions: target, store, seed + enrol today's secrets.
    let t = Instant::now();
    let mut regions = Vec::new();
    for name in &opts.regions {
        let key = RegionKey::generate();
        let (_consumer, kv) = topology::ensure_region(&js, name, &cfg).await?;
        let region = Region {
            name: name.clone(),
            sim: SimTarget::new(SimOptions {
                latency: Duration::ZERO,
                fail_rate: opts.fail_rate,
            }),
            store: SecretStore::from_kv(kv, name, key.clone()),
            key,
        };
        let mine: Vec<&Credential> = creds.iter().filter(|c| &c.region == name).collect();
        seed(&region, &mine).await?;
        regions.push(region);
    }
    say(&format!(
        "seeded the sim targets and enrolled the current secrets ({:.1}s)",
        t.elapsed().as_secs_f64()
    ));

    // Workers and a coordinator, in-process.
    let mut fleet = InProcess::new();
    for region in &regions {
        let mut targets = Targets::new();
        targets.insert("sim", region.sim.clone(), SIM_ENDPOINT_CONCURRENCY);
        let wclient = connect(format!("keywave-dev worker {}", region.name)).await?;
        let template = WorkerOptions {
            region: region.name.clone(),
            worker_id: format!("dev-{}", region.name),
            concurrency: opts.concurrency,
            topology: cfg.clone(),
            ..Default::default()
        };
        fleet
            .start_workers(
                &wclient,
                template,
                &region.key,
                Arc::new(targets),
                opts.workers_per_region,
            )
            .await?;
    }
    fleet
        .start_coordinator(
            &client,
            CoordinatorOptions {
                topology: cfg.clone(),
                coordinator_id: format!("coordinator-{run_id}"),
                ..Default::default()
            },
        )
        .await?;

    // The campaign.
    let spec = CampaignSpec {
        v: SCHEMA_VERSION,
        name: "dev mass reset".into(),
        reason: Some(format!("keywave dev {run_id}")),
        selector: Selector {
            tags: vec![run_tag],
            ..Default::default()
        },
        strategy: opts.strategy,
        waves: opts.waves.clone(),
        failure_budget: opts.failure_budget,
        bake_ms: opts.bake_ms,
        on_failure: OnFailure::Rollback,
        task_timeout_ms: 60_000,
        approve_before_waves: Vec::new(),
        preflight: None,
        preflight_max_unreachable: 0.0,
        requested_by: None,
    };
    let api = ApiClient::new(client.clone());
    let outcome = async {
        let cid = api.start(spec).await?;
        say(&format!("campaign {cid} started"));
        let status = follow(&api, &cid, opts.json).await?;
        let verified = verify(&status, &creds, &regions).await?;
        anyhow::Ok(report(&status, verified))
    }
    .await;

    fleet.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_are_valid_and_round_robin() {
        let opts = DevOptions {
            credentials: 7,
            regions: vec!["eu".into(), "us".into()],
            ..Default::default()
        };
        let creds = generate(&opts, "run=x");
        assert_eq!(creds[0].id, "sim-000001");
        assert_eq!(creds[1].region, "us");
        assert_eq!(creds[2].region, "eu");
        assert!(creds[0].tags.contains(&"tier=1".to_string()));
        // What dev generates passes the inventory's own validation.
        let jsonl: String = creds
            .iter()
            .map(|c| serde_json::to_string(c).unwrap() + "\n")
            .collect();
        assert_eq!(
            inventory::parse_reader(inventory::Format::JsonLines, jsonl.as_bytes())
                .unwrap()
                .len(),
            7
        );
    }

    #[test]
    fn report_json_has_the_documented_keys() {
        let r = DevReport {
            campaign_id: "c-1".into(),
            state: CampaignState::Completed,
            credentials: 10,
            succeeded: 10,
            failed: 0,
            rolled_back: 0,
            waves: vec![],
            elapsed_s: 1.0,
            credentials_per_s: 10.0,
            tripped_wave: None,
            reason: None,
            verified_sample: 10,
            verify_failures: 0,
        };
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "campaign_id",
            "state",
            "credentials",
            "succeeded",
            "failed",
            "rolled_back",
            "waves",
            "elapsed_s",
            "credentials_per_s",
            "tripped_wave",
            "reason",
            "verified_sample",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["state"], "completed");
        assert!(v["tripped_wave"].is_null());
    }

    /// The whole demo against the shared server, small.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dev_runs_end_to_end() {
        let server = NatsServer::start();
        let region = ids::random_id("dev");
        let report = run(DevOptions {
            nats_url: Some(server.url()),
            regions: vec![region],
            credentials: 60,
            json: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(report.state, CampaignState::Completed, "{report:#?}");
        assert_eq!(report.succeeded, 60);
        assert_eq!(report.verified_sample, 60);
        assert!(report.verified_ok());
    }
}
