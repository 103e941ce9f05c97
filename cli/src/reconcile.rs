//! `keywave reconcile`: for each selected credential, the region's workers
//! compare what the regional secret store says with what the target
//! accepts (CURRENT logs in, PREVIOUS does not, nothing staged is left
//! behind) and, with `--repair`, finish what a crashed rotation left half
//! done. The CLI reads the inventory, sends the credentials to their
//! region's admin service in chunks of at most
//! [`MAX_BATCH`](keywave_common::admin::MAX_BATCH) (`keywave.admin.v1.<region>.reconcile`,
//! one worker of the region answers) and prints one report. Reports carry
//! fingerprints only.

use crate::context::{connect, AdminError, CommandError};
use bytes::Bytes;
use clap::Args;
use keywave_common::admin::{
    verbs, CredentialReport, ReconcileItem, ReconcileReply, ReconcileRequest, ReconcileStatus,
    DEFAULT_STALE_AFTER_MS, MAX_BATCH,
};
use keywave_common::flags::{selector as parse_selector, usage, UsageError};
use keywave_common::wire::{Credential, Selector};
use keywave_common::{ids, subjects, topology};
use keywave_coordinator::inventory;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Exit code when a credential needs attention or could not be checked.
pub const EXIT_NEEDS_ATTENTION: u8 = 4;
/// Exit code of a dry run that found something `--repair` would repair
/// (and nothing that needs attention).
pub const EXIT_WOULD_REPAIR: u8 = 5;

/// Default time one chunk may take at the worker.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Raw flags of `keywave reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Selector: space-separated clauses `id=`, `tag=`, `region=`, `endpoint=`, `kind=` (values comma-separated), as for `campaign plan`.
    #[arg(long, default_value = "")]
    pub selector: String,
    /// Only this region (added to the selector).
    #[arg(long, value_name = "R")]
    pub region: Option<String>,
    /// Repair what can be repaired safely (finish half-done rotations); without it nothing is changed.
    #[arg(long)]
    pub repair: bool,
    /// A staged secret (or an unfinished revoke) older than this is treated as abandoned, even if its campaign's task timeout is longer.
    #[arg(long, default_value = "15m", value_name = "DURATION")]
    pub stale_after: String,
    /// Credentials per request to a region's workers (at most 200).
    #[arg(long, default_value_t = MAX_BATCH)]
    pub batch: usize,
    /// Longest wait for one request's reply.
    #[arg(long, default_value = "120s", value_name = "DURATION")]
    pub timeout: String,
    /// Also list the consistent credentials in human output.
    #[arg(long)]
    pub all: bool,
}

/// Validated options of a reconcile run.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub selector: Selector,
    pub repair: bool,
    pub stale_after: Duration,
    pub batch: usize,
    pub timeout: Duration,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            selector: Selector::default(),
            repair: false,
            stale_after: Duration::from_millis(DEFAULT_STALE_AFTER_MS),
            batch: MAX_BATCH,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl ReconcileArgs {
    pub fn to_options(&self) -> Result<ReconcileOptions, UsageError> {
        let mut selector = parse_selector(&self.selector)?;
        if let Some(r) = &self.region {
            ids::validate("region", r).map_err(|e| usage("--region", e.to_string()))?;
            if !selector.regions.is_empty() && !selector.regions.contains(r) {
                return Err(usage(
                    "--region",
                    format!("{r:?} is not among the selector's regions"),
                ));
            }
            selector.regions = vec![r.clone()];
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(usage(
                "--batch",
                format!("must be between 1 and {MAX_BATCH}"),
            ));
        }
        let timeout =
            keywave_common::duration::parse(&self.timeout).map_err(|e| usage("--timeout", e))?;
        if timeout.is_zero() {
            return Err(usage("--timeout", "must be positive"));
        }
        Ok(ReconcileOptions {
            selector,
            repair: self.repair,
            stale_after: keywave_common::duration::parse(&self.stale_after)
                .map_err(|e| usage("--stale-after", e))?,
            batch: self.batch,
            timeout,
        })
    }
}

/// The whole run's report (what `--json` prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub repair: bool,
    pub total: usize,
    /// Credentials per status (every status listed, zeros included).
    pub summary: BTreeMap<String, usize>,
    /// One report per credential, sorted by id.
    pub credentials: Vec<CredentialReport>,
}

impl ReconcileReport {
    pub fn count(&self, s: ReconcileStatus) -> usize {
        self.summary.get(s.as_str()).copied().unwrap_or(0)
    }

    /// 0 when nothing needs doing; [`EXIT_NEEDS_ATTENTION`] when a
    /// credential needs attention or was unreachable; else
    /// [`EXIT_WOULD_REPAIR`] when a dry run found repairs.
    pub fn exit_code(&self) -> u8 {
        if self.count(ReconcileStatus::NeedsAttention) + self.count(ReconcileStatus::Unreachable)
            > 0
        {
            EXIT_NEEDS_ATTENTION
        } else if self.count(ReconcileStatus::WouldRepair) > 0 {
            EXIT_WOULD_REPAIR
        } else {
            0
        }
    }

    fn new(repair: bool, mut credentials: Vec<CredentialReport>) -> Self {
        credentials.sort_by(|a, b| a.id.cmp(&b.id));
        let mut summary: BTreeMap<String, usize> = ReconcileStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        for c in &credentials {
            *summary.entry(c.status.as_str().to_string()).or_default() += 1;
        }
        ReconcileReport {
            repair,
            total: credentials.len(),
            summary,
            credentials,
        }
    }

    /// The report for people: every credential that is not consistent (all
    /// with `all`), what was checked, found and done, then the counts.
    pub fn render(&self, all: bool) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for c in &self.credentials {
            if c.status == ReconcileStatus::Consistent && !all {
                continue;
            }
            let _ = writeln!(
                out,
                "{:<16} {} ({} {} at {})",
                c.status.as_str(),
                c.id,
                c.region,
                c.principal,
                c.endpoint
            );
            for k in &c.checks {
                let _ = writeln!(
                    out,
                    "    checked  {:<8} {}  {}",
                    k.stage.as_str(),
                    k.fingerprint,
                    k.observed.as_str()
                );
            }
            for f in &c.findings {
                let _ = writeln!(out, "    found    {f}");
            }
            let verb = if c.status == ReconcileStatus::Repaired {
                "done    "
            } else {
                "would   "
            };
            for a in &c.actions {
                let _ = writeln!(out, "    {verb} {a}");
            }
        }
        let counts: Vec<String> = ReconcileStatus::ALL
            .iter()
            .map(|s| format!("{} {}", self.count(*s), s.as_str()))
            .collect();
        let _ = writeln!(
            out,
            "{} credential{}{}: {}",
            self.total,
            if self.total == 1 { "" } else { "s" },
            if self.repair { " (repair)" } else { "" },
            counts.join(" · ")
        );
        if !self.repair && self.count(ReconcileStatus::WouldRepair) > 0 {
            let _ = writeln!(
                out,
                "nothing was changed; run again with --repair to repair the would_repair ones"
            );
        }
        out
    }
}

/// Reconciles `creds` through their regions' admin services.
pub async fn reconcile(
    client: &async_nats::Client,
    creds: &[Credential],
    opts: &ReconcileOptions,
) -> ReconcileReport {
    let mut by_region: BTreeMap<&str, Vec<&Credential>> = BTreeMap::new();
    for c in creds {
        by_region.entry(c.region.as_str()).or_default().push(c);
    }
    let runs = by_region
        .into_iter()
        .map(|(region, creds)| reconcile_region(client, region, creds, opts));
    let reports = futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    ReconcileReport::new(opts.repair, reports)
}

/// One region's credentials, chunk after chunk.
async fn reconcile_region(
    client: &async_nats::Client,
    region: &str,
    creds: Vec<&Credential>,
    opts: &ReconcileOptions,
) -> Vec<CredentialReport> {
    let subject = subjects::admin(region, verbs::RECONCILE);
    let mut out = Vec::with_capacity(creds.len());
    for chunk in creds.chunks(opts.batch.clamp(1, MAX_BATCH)) {
        let req = ReconcileRequest {
            repair: opts.repair,
            stale_after_ms: opts.stale_after.as_millis() as u64,
            credentials: chunk
                .iter()
                .map(|c| ReconcileItem {
                    id: c.id.clone(),
                    endpoint: c.endpoint.clone(),
                    kind: c.kind,
                    principal: c.principal.clone(),
                })
                .collect(),
        };
        match request::<_, ReconcileReply>(client, &subject, &req, opts.timeout).await {
            Ok(reply) => out.extend(reply.reports),
            Err(why) => out.extend(chunk.iter().map(|c| CredentialReport {
                id: c.id.clone(),
                region: c.region.clone(),
                endpoint: c.endpoint.clone(),
                principal: c.principal.clone(),
                status: ReconcileStatus::Unreachable,
                checks: Vec::new(),
                findings: vec![why.to_string()],
                actions: Vec::new(),
            })),
        }
    }
    out
}

/// One admin request.
pub(crate) async fn request<Req: Serialize, Resp: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: &Req,
    timeout: Duration,
) -> Result<Resp, AdminError> {
    #[derive(Deserialize)]
    struct Wire<T> {
        ok: bool,
        data: Option<T>,
        error: Option<keywave_common::api::ApiError>,
    }
    let payload: Bytes = serde_json::to_vec(body).map_err(AdminError::Encode)?.into();
    let subject = subject.to_string();
    let msg = client
        .send_request(
            subject.clone(),
            async_nats::Request::new()
                .payload(payload)
                .timeout(Some(timeout)),
        )
        .await;
    let msg = match msg {
        Ok(m) => m,
        Err(source) => {
            return Err(match source.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    AdminError::NoResponders { subject, source }
                }
                async_nats::RequestErrorKind::TimedOut => AdminError::TimedOut {
                    subject,
                    timeout,
                    source,
                },
                _ => AdminError::Request { subject, source },
            })
        }
    };
    let reply: Wire<Resp> = match serde_json::from_slice(&msg.payload) {
        Ok(r) => r,
        Err(source) => return Err(AdminError::Malformed { subject, source }),
    };
    match (reply.ok, reply.data, reply.error) {
        (true, Some(d), _) => Ok(d),
        (_, _, Some(e)) => Err(AdminError::Refused(e)),
        _ => Err(AdminError::NoData { subject }),
    }
}

/// `keywave reconcile`.
pub async fn run_cli(args: ReconcileArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    let opts = args.to_options()?;
    let client = connect(url).await?;
    let js = topology::context(client.clone());
    let creds = match js.get_key_value(topology::KV_INVENTORY).await {
        Ok(kv) => inventory::list(&kv, &opts.selector).await?,
        Err(_) => Vec::new(),
    };
    if creds.is_empty() {
        return Err(CommandError::EmptySelection);
    }
    if !json {
        eprintln!(
            "reconciling {} credentials{}",
            creds.len(),
            if opts.repair {
                " (repairing what is safe)"
            } else {
                " (dry run: nothing is changed)"
            }
        );
    }
    let report = reconcile(&client, &creds, &opts).await;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report)
                .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
        );
    } else {
        print!("{}", report.render(args.all));
    }
    Ok(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(a: &[&str]) -> ReconcileArgs {
        let mut argv = vec!["keywave", "reconcile"];
        argv.extend_from_slice(a);
        match crate::args::Cli::try_parse_from(argv).unwrap().command {
            crate::args::Command::Reconcile(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn flags_validate() {
        let o = args(&["--selector", "tag=env=prod", "--region", "eu", "--repair"])
            .to_options()
            .unwrap();
        assert_eq!(o.selector.regions, vec!["eu"]);
        assert!(o.repair);
        assert_eq!(o.stale_after, Duration::from_secs(900));
        assert_eq!(o.batch, 200);
        assert_eq!(
            args(&["--batch", "500"]).to_options().unwrap_err().flag,
            "--batch"
        );
        assert_eq!(
            args(&["--selector", "region=us", "--region", "eu"])
                .to_options()
                .unwrap_err()
                .flag,
            "--region"
        );
        assert_eq!(
            args(&["--stale-after", "soon"])
                .to_options()
                .unwrap_err()
                .flag,
            "--stale-after"
        );
    }

    #[test]
    fn exit_codes_follow_the_worst_status() {
        let rep = |s: ReconcileStatus| CredentialReport {
            id: format!("c-{s}"),
            region: "eu".into(),
            endpoint: "e".into(),
            principal: "p".into(),
            status: s,
            checks: vec![],
            findings: vec![],
            actions: vec![],
        };
        let r = ReconcileReport::new(false, vec![rep(ReconcileStatus::Consistent)]);
        assert_eq!(r.exit_code(), 0);
        let r = ReconcileReport::new(
            false,
            vec![
                rep(ReconcileStatus::Consistent),
                rep(ReconcileStatus::WouldRepair),
            ],
        );
        assert_eq!(r.exit_code(), EXIT_WOULD_REPAIR);
        let r = ReconcileReport::new(
            true,
            vec![
                rep(ReconcileStatus::Repaired),
                rep(ReconcileStatus::InFlight),
            ],
        );
        assert_eq!(r.exit_code(), 0);
        let r = ReconcileReport::new(
            false,
            vec![
                rep(ReconcileStatus::WouldRepair),
                rep(ReconcileStatus::Unreachable),
            ],
        );
        assert_eq!(r.exit_code(), EXIT_NEEDS_ATTENTION);
        assert_eq!(r.summary.len(), ReconcileStatus::ALL.len());
        assert!(r.render(false).contains("2 credentials: 0 consistent"));
    }
}
