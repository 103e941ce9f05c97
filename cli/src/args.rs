//! Command-line definitions of the `keywave` operator CLI. The clap structs
//! hold raw flags; the `to_*` methods validate them into typed configuration
//! ([`CampaignSpec`], [`DevOptions`], [`BenchOptions`]) and name the bad flag
//! on error. Durations are written like `500ms`, `30s`, `2m`, `1h` or `1m30s`.

use clap::{Args, Parser, Subcommand};
pub use keywave_common::flags::{usage, UsageError};
use keywave_common::{
    ids,
    wire::{self, CampaignSpec, OnFailure, Strategy, SCHEMA_VERSION},
};
use keywave_coordinator::config::{NatsAuthArgs, DEFAULT_NATS_URL, NATS_URL_ENV};
use keywave_coordinator::inventory;
use keywave_devkit::{bench::BenchOptions, dev::DevOptions};
use std::path::PathBuf;
use std::time::Duration;

/// `keywave`: the operator CLI.
#[derive(Debug, Parser)]
#[command(
    name = "keywave",
    version,
    about = "Rotate many credentials at once over NATS JetStream, and prove it worked.",
    long_about = "keywave rotates many credentials at once (a mass password reset for non-human \
identities) in waves, over NATS JetStream, and proves the result: every new secret works, \
every old secret is rejected. This CLI imports the inventory, plans and drives campaigns \
through the coordinators' API, and runs a complete local demo (`keywave dev`).",
    after_help = "Examples:\n  keywave dev                                   # local demo: nats-server, sim workers, coordinator\n  keywave inventory import creds.csv\n  keywave campaign plan --selector 'region=eu tag=env=prod'\n  keywave campaign start --selector 'tag=env=prod' --waves 1,10%,50% --wait\n  keywave --json campaign status c-0123456789ab"
)]
pub struct Cli {
    /// NATS server URL, or several comma-separated (cluster seeds) (ignored by `dev` unless given: `dev` then starts its own nats-server).
    #[arg(long, global = true, env = NATS_URL_ENV, value_name = "URL", help_heading = "Global options")]
    pub nats: Option<String>,
    /// Machine-readable output: one JSON document on stdout; errors as `{"ok":false,"error":...}`.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Log line format on stderr: text or json (RUST_LOG filters the lines).
    #[arg(long, global = true, env = keywave_common::telemetry::ENV_LOG_FORMAT, default_value = "text", value_name = "text|json", help_heading = "Global options")]
    pub log_format: keywave_common::telemetry::LogFormat,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The NATS URL for commands that talk to a running system.
    pub fn nats_url(&self) -> String {
        self.nats.clone().unwrap_or_else(|| DEFAULT_NATS_URL.into())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import and list the credential inventory.
    #[command(
        subcommand,
        after_help = "Examples:\n  keywave inventory import creds.csv\n  keywave inventory list --selector 'region=eu tag=env=prod'"
    )]
    Inventory(InventoryCommand),
    /// Plan, start, watch and steer rotation campaigns.
    #[command(
        subcommand,
        long_about = "A campaign rotates the credentials chosen by a selector in waves. After each \
wave the coordinator decides from the workers' results: next wave, done, pause, or roll back.",
        after_help = "Examples:\n  keywave campaign plan --selector 'tag=env=prod'\n  keywave campaign start --selector 'tag=env=prod' --waves 1,10%,50% --wait\n  keywave campaign status c-0123456789ab"
    )]
    Campaign(CampaignCommand),
    /// Run a complete local demo: nats-server, simulated targets, workers, a coordinator, one campaign.
    #[command(
        long_about = "Runs keywave end to end on this machine: starts nats-server (unless --nats is \
given), generates simulated credentials, seeds the simulated targets and the regional secret stores, \
runs the workers and a coordinator in-process, rotates everything in waves, prints a report and \
verifies a sample: the stored CURRENT secret authenticates, the PREVIOUS one is rejected.",
        after_help = "Examples:\n  keywave dev\n  keywave dev --credentials 100000 --regions eu,us --workers-per-region 2\n  keywave dev --fail-rate 0.2            # trips the failure budget: the wave is rolled back\n  keywave dev --json | tail -n1 | jq .credentials_per_s"
    )]
    Dev(DevArgs),
    /// Measure one whole sim campaign end to end, and the bare broker path on the same server.
    #[command(
        long_about = "Runs one campaign of simulated credentials end to end (a private nats-server \
unless --nats is given; workers and a coordinator in-process, or as keywave-worker and \
keywave-coordinator processes with --workers-as-processes) and measures the bare broker path on \
the same server: N task-sized messages through a work queue and N result-sized messages back, \
all acked. Prints credentials/s from the start request to the last decision, the ratio to the \
baseline, per-step latency percentiles, and peak memory. See BENCHMARKS.md.",
        after_help = "Examples:\n  keywave bench --credentials 10000\n  keywave bench --credentials 100000 --workers-per-region 2 --target-latency 5ms\n  keywave bench --credentials 1000000 --workers-as-processes --json | tail -n1 | jq .ratio_to_baseline\n  deploy/multi-region/measure.sh   # the same campaign on the local supercluster and on one server"
    )]
    Bench(BenchArgs),
    /// Report a leak (publish a detection), or see what detections did: time to contain, unmatched.
    #[command(
        long_about = "Publishes a leak detection on keywave.detect.<source>: the coordinators match it \
against the inventory and contain the credential (a containment campaign, coalesced with other \
detections of the same window). `report` gives a containment campaign's time to contain and the \
credentials still exposed; `unmatched` lists detections that started nothing. Schema: docs/detection.schema.json.",
        after_help = "Examples:\n  keywave detect --credential billing-db-app --severity critical\n  keywave detect --principal sessions --endpoint redis-eu --source siem --source-id INC-1234\n  printf %s \"$LEAKED\" | keywave detect fingerprint   # sha256:... for --fingerprint\n  keywave detect report contain-0123456789ab\n  keywave detect unmatched"
    )]
    Detect(crate::detect::DetectArgs),
    /// Check the tamper-evident audit trail (hash chains on KEYWAVE_AUDIT).
    #[command(
        subcommand,
        long_about = "Every campaign event and a digest of every result is appended by the active \
coordinator to the campaign's hash chain on keywave.audit.<campaign> (stream KEYWAVE_AUDIT). \
`verify` reads the chains and reports the first broken link: a record whose content does not \
match its hash (edited), one that does not chain to the record before it (replaced), or a gap \
(deleted). Exits 4 when a chain is broken.",
        after_help = "Examples:\n  keywave audit verify\n  keywave audit verify --campaign c-0123456789ab\n  keywave --json audit verify | jq .chains[0]"
    )]
    Audit(AuditCommand),
    /// Compare the regional secret stores with what the targets accept; repair half-done rotations.
    #[command(
        long_about = "For each selected credential, one worker of its region checks that the CURRENT \
secret logs in at the target, that PREVIOUS is refused and that no staged (PENDING) secret was left \
behind by a task that is no longer running. With --repair it finishes what a crashed rotation left \
half done (a PENDING that already logs in is promoted and the old secret revoked and proven refused; \
a PENDING that never reached the target is discarded); anything else, such as a CURRENT secret \
changed outside keywave, is reported, never guessed at. A credential whose task may still be running \
(its campaign's task timeout plus 35 s, at most --stale-after) is reported in_flight and left alone. \
Statuses: consistent, repaired, would_repair, in_flight, needs_attention, unreachable. Exit code 4 \
when something needs attention or was unreachable, 5 when a dry run found repairs, else 0. Reports \
carry fingerprints, never secrets.",
        after_help = "Examples:\n  keywave reconcile --selector 'tag=env=prod'\n  keywave reconcile --region eu --repair\n  keywave --json reconcile --selector 'kind=redis' | jq .summary"
    )]
    Reconcile(crate::reconcile::ReconcileArgs),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit chains; report the first broken link of each and exit 4 if any is broken.
    #[command(
        after_help = "Examples:\n  keywave audit verify\n  keywave audit verify --campaign c-0123456789ab --json\n  keywave audit verify --public-key \"$(cat coordinator.pub)\""
    )]
    Verify {
        /// Verify only this campaign's chain (default: every chain).
        #[arg(long, value_name = "ID")]
        campaign: Option<String>,
        /// A coordinator public key (64 hex digits, as `keywave-coordinator keygen` prints it), repeatable: every record must then be signed by one of them, so a chain rewritten by someone with write access to NATS but not the key is found.
        #[arg(long = "public-key", value_name = "HEX")]
        public_keys: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// Propose inventory records for the logins of an endpoint (asks the region's workers); --import adds them.
    #[command(
        long_about = "One worker of the region lists the logins of an endpoint it administers \
(PostgreSQL: pg_roles with rolcanlogin; MariaDB/MySQL: mysql.user; Redis: ACL USERS) and the CLI \
prints them as inventory records (JSON Lines on stdout, importable with `keywave inventory import`; \
id = <endpoint>-<principal>, tag `discovered`). Superusers and privileged logins (PostgreSQL \
rolsuper/rolreplication/rolbypassrls; MariaDB SUPER, GRANT OPTION, ALL ON *.*; Redis +@all and \
`default`) and the endpoint's admin login are left out unless --include-privileged; the clone login \
of an alternating pair is always left out (its primary is the principal). --import adds the records \
whose id is not in the inventory yet.",
        after_help = "Examples:\n  keywave inventory discover --endpoint pg-main --region eu\n  keywave inventory discover --endpoint pg-main --region eu --match 'app_*' > found.jsonl\n  keywave inventory discover --endpoint pg-main --region eu --match 'app_*' --import --tag env=prod"
    )]
    Discover(crate::discover::DiscoverArgs),
    /// Import credentials from a JSON, JSON Lines or CSV file (all or nothing).
    #[command(
        long_about = "Imports credentials into the keywave-inventory bucket. The whole file is \
validated first; a single bad record (reported with its line and field) means nothing is written. \
Columns / fields: id, region, endpoint, kind (redis|postgres|mysql|sim), principal, and optional \
tags, owner, consumers (`;`-separated in CSV). See docs/inventory.md.",
        after_help = "Examples:\n  keywave inventory import creds.csv\n  keywave inventory import export.txt --format jsonl\n\nCSV example:\n  id,region,endpoint,kind,principal,tags,owner,consumers\n  db-orders,eu,pg-main,postgres,orders_rw,env=prod;tier=1,team-orders,orders-api"
    )]
    Import(ImportArgs),
    /// List credentials, optionally filtered by a selector.
    #[command(
        after_help = "Examples:\n  keywave inventory list\n  keywave inventory list --selector 'region=eu tag=env=prod'\n  keywave --json inventory list --selector kind=redis"
    )]
    List(ListArgs),
    /// Import consumer records (who uses which credentials, how each is verified) into keywave-consumers.
    #[command(
        name = "import-consumers",
        long_about = "Imports consumer records into the keywave-consumers bucket (all or nothing, \
like `inventory import`). Fields: id, and optional kind, owner, verify (attest|http|none; default \
attest), url (http:// URL that must answer 2xx, with verify=http), timeout_ms, needs (credential \
ids; `;`-separated in CSV). See docs/inventory.md.",
        after_help = "Examples:\n  keywave inventory import-consumers consumers.jsonl\n\nJSON Lines example:\n  {\"id\":\"orders-api\",\"kind\":\"app\",\"verify\":\"attest\",\"needs\":[\"db-orders\"]}\n  {\"id\":\"billing-web\",\"verify\":\"http\",\"url\":\"http://10.0.0.7:8080/healthz\",\"needs\":[\"db-orders\"]}"
    )]
    ImportConsumers(ImportArgs),
    /// Show dependencies: a credential's consumers, or (--consumer) the credentials a consumer uses.
    #[command(
        after_help = "Examples:\n  keywave inventory deps db-orders\n  keywave inventory deps --consumer orders-api\n  keywave --json inventory deps db-orders"
    )]
    Deps(DepsArgs),
}

#[derive(Debug, Args)]
pub struct DepsArgs {
    /// The credential whose consumers are shown.
    #[arg(required_unless_present = "consumer", conflicts_with = "consumer")]
    pub credential: Option<String>,
    /// Show the credentials this consumer uses instead.
    #[arg(long, value_name = "ID")]
    pub consumer: Option<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: PathBuf,
    /// File format; by default taken from the extension (.json, .jsonl/.ndjson, .csv).
    #[arg(long, value_name = "json|jsonl|csv")]
    pub format: Option<String>,
}

impl ImportArgs {
    pub fn format(&self) -> Result<Option<inventory::Format>, UsageError> {
        self.format
            .as_deref()
            .map(|f| f.parse().map_err(|e| usage("--format", e)))
            .transpose()
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Selector: space-separated clauses `id=`, `tag=`, `region=`, `endpoint=`, `kind=` (values comma-separated).
    #[arg(long, default_value = "")]
    pub selector: String,
}

#[derive(Debug, Subcommand)]
pub enum CampaignCommand {
    /// Dry run: compute the waves from the inventory locally and print them; changes nothing.
    #[command(
        after_help = "Examples:\n  keywave campaign plan --selector 'region=eu' --waves 1,10%,50%\n  keywave --json campaign plan --selector tag=env=prod > plan.json"
    )]
    Plan(PlanArgs),
    /// Start a campaign (from flags or a JSON spec file).
    #[command(
        long_about = "Starts a rotation campaign on the running coordinators: the selected \
credentials are sorted by id and split into waves; each wave must stay within the failure budget \
(failed / size, where a task without result by its deadline counts as failed) or the campaign \
rolls the wave back (continuity) or pauses. Containment campaigns never roll back. Before each \
wave the coordinator asks the agents of the wave's attest consumers whether they are alive \
(pre-flight); when more than --preflight-max-unreachable of them do not answer, the wave does not \
start and the campaign pauses, naming them (start the agents, then `keywave campaign resume`).",
        after_help = "Examples:\n  keywave campaign start --selector 'tag=env=prod' --waves 1,10%,50% --bake 30s --wait\n  keywave campaign start --selector 'id=db-1,db-2' --strategy containment --reason INC-1234\n  keywave campaign start --selector 'region=eu' --preflight-max-unreachable 0.1   # 10% of the agents may be down\n  keywave campaign start --spec campaign.json\n\nSpec file example:\n  {\"name\":\"q3 reset\",\"selector\":{\"tags\":[\"env=prod\"]},\"strategy\":\"continuity\",\n   \"waves\":[1,\"10%\",\"50%\"],\"failure_budget\":0.05,\"bake_ms\":30000,\n   \"on_failure\":\"rollback\",\"task_timeout_ms\":60000}"
    )]
    Start(StartArgs),
    /// Show a campaign's state, waves and counters.
    #[command(
        after_help = "Examples:\n  keywave campaign status c-0123456789ab\n  keywave --json campaign status c-0123456789ab | jq .state"
    )]
    Status(IdArg),
    /// List every campaign.
    #[command(after_help = "Examples:\n  keywave campaign list\n  keywave --json campaign list")]
    List,
    /// Pause a campaign: no new tasks; tasks in flight finish and are counted.
    #[command(after_help = "Example:\n  keywave campaign pause c-0123456789ab")]
    Pause(IdArg),
    /// Resume a paused campaign (after a failed wave: with the next wave).
    #[command(after_help = "Example:\n  keywave campaign resume c-0123456789ab")]
    Resume(IdArg),
    /// Abort a campaign: no more tasks are issued; tasks in flight finish.
    #[command(after_help = "Example:\n  keywave campaign abort c-0123456789ab")]
    Abort(IdArg),
    /// Approve a wave that waits for approval (see `campaign start --approve-before-wave`); it starts at once.
    #[command(
        long_about = "Records an approval (who and when, an `approved` event in the campaign's audit \
trail) for a wave started with --approve-before-wave. Without --wave it approves the wave the \
campaign is waiting at, or else its next gated wave. Approving a wave that needs no approval, one \
that already started, or a finished campaign is a conflict (exit 1).",
        after_help = "Examples:\n  keywave campaign approve c-0123456789ab\n  keywave campaign approve c-0123456789ab --wave 2 --by alice"
    )]
    Approve(ApproveArgs),
    /// Follow a campaign live: per-wave and per-region progress bars and its latest events.
    #[command(
        long_about = "Polls the campaign's status every --interval and follows its events \
(KEYWAVE_EVENTS): per wave and per region a progress bar with done, failed, in flight, rate and \
estimated time left, then the latest decisions. On a terminal the screen is redrawn in place; \
with --no-color or when stdout is not a terminal, one plain block is printed per refresh; with \
--json one JSON object per refresh (NDJSON). Ends when the campaign finishes (exit 0 when \
completed, 3 when failed, rolled back or aborted), pauses or waits for an approval (exit 0, \
with what to do next). --once prints one refresh, with the same exit codes.",
        after_help = "Examples:\n  keywave campaign watch c-0123456789ab\n  keywave campaign watch c-0123456789ab --interval 5s --no-color\n  keywave --json campaign watch c-0123456789ab --once | jq .waves"
    )]
    Watch(WatchArgs),
    /// Roll back the current wave of a paused continuity campaign (containment never is).
    #[command(
        long_about = "Asks the coordinator to roll back the current wave of a paused continuity \
campaign: every credential of that wave whose rotation succeeded gets its previous secret back, \
and the campaign ends rolled_back. The wave must have finished (pause between waves, or a wave \
paused by its failure budget with --on-failure pause). Only the current wave can be rolled back; \
earlier waves and finished campaigns cannot. A containment campaign is refused with a conflict \
(exit 1): an exposed secret is never restored.",
        after_help = "Examples:\n  keywave campaign pause c-0123456789ab\n  keywave campaign rollback c-0123456789ab\n  keywave --json campaign rollback c-0123456789ab --wave 2"
    )]
    Rollback(RollbackArgs),
    /// Write a campaign's evidence report: request, plan, waves, per-credential outcomes, audit head.
    #[command(
        long_about = "Builds a report of one campaign from its status, its events and its results \
(read with an ordered consumer and streamed into the output): who asked for what and when, the \
plan, each wave's outcome and decision with reasons, per-credential outcomes (new secret verified, \
old secret rejected, consumers, time to contain for detection-started campaigns), failures by class, \
the audit chain head, and how the evidence supports OWASP NHI Top 10, NIST CSF 2.0 PR.AA and \
NIST SP 800-207 controls (evidence, not certification). json lists every credential; markdown and \
html list the first --max-rows plus every failure. Fingerprints only, never a secret.",
        after_help = "Examples:\n  keywave campaign report c-0123456789ab --format markdown\n  keywave campaign report c-0123456789ab --format html --output report.html\n  keywave campaign report c-0123456789ab --format json | jq .summary"
    )]
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The campaign id (as printed by `campaign start` or `campaign list`).
    pub id: String,
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub interval: String,
    /// Print one refresh and exit (3 if the campaign ended without completing, else 0).
    #[arg(long)]
    pub once: bool,
    /// Plain lines without colours or cursor movement (the default when stdout is not a terminal).
    #[arg(long)]
    pub no_color: bool,
    /// Latest events shown.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub events: usize,
}

impl WatchArgs {
    /// The validated refresh interval.
    pub fn interval(&self) -> Result<Duration, UsageError> {
        let d = keywave_common::flags::duration("--interval", &self.interval)?;
        if d < Duration::from_millis(100) {
            return Err(usage("--interval", "must be at least 100ms"));
        }
        Ok(d)
    }
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The campaign id (as printed by `campaign start` or `campaign list`).
    pub id: String,
    /// The wave to roll back; must be the campaign's current wave (the default).
    #[arg(long, value_name = "N")]
    pub wave: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The campaign id (as printed by `campaign start` or `campaign list`).
    pub id: String,
    /// Output format: markdown by default, json with --json.
    #[arg(long, value_name = "json|markdown|html")]
    pub format: Option<String>,
    /// Write the report to FILE instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Per-credential rows in markdown and html (failures are always listed; json has every row).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub max_rows: usize,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The campaign id (as printed by `campaign start` or `campaign list`).
    pub id: String,
    /// The wave to approve (0 is the canary); by default the one the campaign waits at.
    #[arg(long, value_name = "N")]
    pub wave: Option<u32>,
    /// Who approves (recorded in the audit trail); $USER by default.
    #[arg(long, env = "USER", value_name = "NAME")]
    pub by: Option<String>,
}

#[derive(Debug, Args)]
pub struct IdArg {
    /// The campaign id (as printed by `campaign start` or `campaign list`).
    pub id: String,
}

/// Raw campaign flags (validated by [`SpecArgs::to_spec`]).
#[derive(Debug, Args, Clone)]
pub struct SpecArgs {
    /// A JSON campaign spec file instead of the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["selector", "strategy", "waves", "failure_budget", "bake", "on_failure", "task_timeout", "name", "reason"])]
    pub spec: Option<PathBuf>,
    /// Which credentials: space-separated clauses `id=`, `tag=`, `region=`, `endpoint=`, `kind=`; empty selects all.
    #[arg(long, default_value = "")]
    pub selector: String,
    /// continuity (old secret valid until consumers moved; can roll back) or containment (leak: old secret invalidated first; never rolled back).
    #[arg(
        long,
        default_value = "continuity",
        value_name = "continuity|containment"
    )]
    pub strategy: String,
    /// Wave sizes: counts or percentages of the total; the last one repeats.
    #[arg(long, default_value = "1,10%,50%")]
    pub waves: String,
    /// Fraction of a wave allowed to fail (0..1); the wave fails when failed/size is greater.
    #[arg(long, default_value = "0.05")]
    pub failure_budget: String,
    /// Pause between a successful wave and the next one.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub bake: String,
    /// What a failed wave triggers.
    #[arg(long, default_value = "rollback", value_name = "rollback|pause")]
    pub on_failure: String,
    /// How long one task may take before it counts as failed. A task whose
    /// worker died is redelivered (after 5 s by default) and gets the full
    /// timeout again; the wave waits that long too (the redelivery
    /// allowance, 20 s at the default consumer settings, on top).
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub task_timeout: String,
    /// A short name for the campaign.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Why the campaign runs (ticket, incident).
    #[arg(long)]
    pub reason: Option<String>,
    /// Wave N (0 is the canary) waits for `keywave campaign approve` before it starts (repeatable).
    #[arg(long = "approve-before-wave", value_name = "N")]
    pub approve_before_wave: Vec<u32>,
    /// Skip the pre-flight: do not ask the consumers' agents whether they are alive before each wave (on by default when the plan has attest consumers).
    #[arg(long)]
    pub no_preflight: bool,
    /// Fraction of the consumer agents asked before a wave that may be unreachable (0..1); more and the campaign pauses before the wave [default: 0, every agent must answer].
    #[arg(long, value_name = "FRACTION", conflicts_with = "no_preflight")]
    pub preflight_max_unreachable: Option<String>,
    /// Who is starting the campaign, recorded in its `created` event (so in the audit chain) and its report [default: $USER]. Stated by you, not authenticated: NATS permissions decide who may start campaigns.
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
}

impl SpecArgs {
    /// The validated campaign spec.
    pub fn to_spec(&self) -> Result<CampaignSpec, UsageError> {
        let mut spec = if let Some(path) = &self.spec {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage("--spec", format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str::<CampaignSpec>(&text)
                .map_err(|e| usage("--spec", format!("{}: {e}", path.display())))?
        } else {
            let failure_budget: f64 = self.failure_budget.trim().parse().map_err(|_| {
                usage(
                    "--failure-budget",
                    format!("{:?} is not a number (e.g. 0.05)", self.failure_budget),
                )
            })?;
            CampaignSpec {
                v: SCHEMA_VERSION,
                name: self.name.clone(),
                reason: self.reason.clone(),
                selector: keywave_common::flags::selector(&self.selector)?,
                strategy: self
                    .strategy
                    .parse::<Strategy>()
                    .map_err(|e| usage("--strategy", e))?,
                waves: wire::parse_wave_plan(&self.waves).map_err(|e| usage("--waves", e))?,
                failure_budget,
                bake_ms: keywave_common::flags::duration("--bake", &self.bake)?.as_millis() as u64,
                on_failure: self
                    .on_failure
                    .parse::<OnFailure>()
                    .map_err(|e| usage("--on-failure", e))?,
                task_timeout_ms: keywave_common::flags::duration(
                    "--task-timeout",
                    &self.task_timeout,
                )?
                .as_millis() as u64,
                approve_before_waves: Vec::new(),
                preflight: None,
                preflight_max_unreachable: 0.0,
                requested_by: None,
            }
        };
        spec.approve_before_waves
            .extend(self.approve_before_wave.iter().copied());
        spec.approve_before_waves.sort_unstable();
        spec.approve_before_waves.dedup();
        // Both also apply on top of --spec.
        if self.no_preflight {
            spec.preflight = Some(false);
        }
        // The flag, else the spec file's, else the local user name.
        if let Some(by) = &self.by {
            spec.requested_by = Some(by.clone());
        } else if spec.requested_by.is_none() {
            spec.requested_by = ["USER", "LOGNAME"]
                .iter()
                .filter_map(|v| std::env::var(v).ok())
                .find(|u| !u.trim().is_empty());
        }
        if let Some(f) = &self.preflight_max_unreachable {
            spec.preflight_max_unreachable = f.trim().parse().map_err(|_| {
                usage(
                    "--preflight-max-unreachable",
                    format!("{f:?} is not a number (e.g. 0.25)"),
                )
            })?;
        }
        spec.validate().map_err(|e| {
            let flag = match e.field {
                "failure_budget" => "--failure-budget",
                "task_timeout_ms" => "--task-timeout",
                "waves" => "--waves",
                "selector.regions" => "--selector",
                "preflight_max_unreachable" => "--preflight-max-unreachable",
                "requested_by" => "--by",
                _ => "--spec",
            };
            usage(flag, e.problem)
        })?;
        Ok(spec)
    }
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Credentials printed per wave in human output (all of them with --json).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Block until the campaign is finished or paused, print the outcome; exit 3 unless it completed.
    #[arg(long)]
    pub wait: bool,
    /// Longest --wait.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub wait_timeout: String,
    /// Leave out the selected credentials that other unfinished campaigns
    /// hold (one campaign per credential at a time) instead of refusing to
    /// start; the campaign's start reason says how many were skipped.
    #[arg(long)]
    pub skip_locked: bool,
}

/// Raw flags of `keywave dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Regions to simulate.
    #[arg(long, default_value = "eu,us,ap")]
    pub regions: String,
    /// Simulated credentials, spread round-robin over the regions.
    #[arg(long, default_value_t = 10_000)]
    pub credentials: u64,
    /// Probability that the simulated target fails a rotation (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Workers per region (in-process).
    #[arg(long, default_value_t = 1)]
    pub workers_per_region: usize,
    /// Wave plan.
    #[arg(long, default_value = "1,10%,50%")]
    pub waves: String,
    /// Failure budget per wave.
    #[arg(long, default_value_t = 0.05)]
    pub failure_budget: f64,
    /// continuity or containment.
    #[arg(long, default_value = "continuity")]
    pub strategy: String,
    /// Bake time between waves.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub bake: String,
    /// Tasks in flight per worker.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

/// The `--regions` of a local fleet (`dev`, `bench`): at least one, each a valid name.
fn fleet_regions(list: &str) -> Result<Vec<String>, UsageError> {
    let regions: Vec<String> = list
        .split(',')
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    if regions.is_empty() {
        return Err(usage("--regions", "at least one region is required"));
    }
    for r in &regions {
        ids::validate("region", r).map_err(|e| usage("--regions", e))?;
    }
    Ok(regions)
}

impl DevArgs {
    pub fn to_options(
        &self,
        nats_url: Option<String>,
        json: bool,
    ) -> Result<DevOptions, UsageError> {
        let regions = fleet_regions(&self.regions)?;
        if self.credentials == 0 {
            return Err(usage("--credentials", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(usage("--fail-rate", "must be between 0 and 1"));
        }
        if !(0.0..=1.0).contains(&self.failure_budget) {
            return Err(usage("--failure-budget", "must be between 0 and 1"));
        }
        if self.workers_per_region == 0 {
            return Err(usage("--workers-per-region", "must be at least 1"));
        }
        if self.concurrency == 0 {
            return Err(usage("--concurrency", "must be at least 1"));
        }
        Ok(DevOptions {
            nats_url,
            regions,
            credentials: self.credentials,
            fail_rate: self.fail_rate,
            workers_per_region: self.workers_per_region,
            waves: wire::parse_wave_plan(&self.waves).map_err(|e| usage("--waves", e))?,
            failure_budget: self.failure_budget,
            strategy: self
                .strategy
                .parse::<Strategy>()
                .map_err(|e| usage("--strategy", e))?,
            json,
            bake_ms: keywave_common::flags::duration("--bake", &self.bake)?.as_millis() as u64,
            concurrency: self.concurrency,
        })
    }
}

/// Raw flags of `keywave bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Simulated credentials, spread round-robin over the regions.
    #[arg(long, default_value_t = 10_000)]
    pub credentials: u64,
    /// Regions to simulate.
    #[arg(long, default_value = "eu,us,ap")]
    pub regions: String,
    /// Workers per region.
    #[arg(long, default_value_t = 1)]
    pub workers_per_region: usize,
    /// Tasks in flight per worker.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Time each simulated target operation takes (whole ms with --workers-as-processes).
    #[arg(long, default_value = "0", value_name = "DURATION")]
    pub target_latency: String,
    /// Run each worker as a keywave-worker process and the coordinator as a keywave-coordinator process.
    #[arg(long)]
    pub workers_as_processes: bool,
    /// Wave plan.
    #[arg(long, default_value = "1,10%,50%")]
    pub waves: String,
    /// Task timeout: a task's deadline runs from its publication, so it must cover the largest wave.
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub task_timeout: String,
    /// Do not measure the bare broker path.
    #[arg(long)]
    pub skip_baseline: bool,
    /// Keep worker configurations and the logs of every process (nats-server included) in DIR.
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Supercluster: the NATS URL(s) of one region's workers, REGION=URL[,URL...]; repeat per region (a region not given uses --nats). See docs/multi-region.md.
    #[arg(long, value_name = "REGION=URLS")]
    pub region_nats: Vec<String>,
    /// Replicas of the streams and buckets the bench creates (3 on a cluster or a supercluster's home).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Supercluster: where each region's secret store goes, as keywave-coordinator --placement (eu=region:eu,us=region:us).
    #[arg(long, value_name = "REGION=PLACEMENT,...", default_value = "")]
    pub placement: String,
    /// Supercluster: where every other stream and bucket goes, as keywave-coordinator --home-placement (cluster=home).
    #[arg(long, value_name = "PLACEMENT")]
    pub home_placement: Option<String>,
    /// Replicas of each region's secret store [default: --replicas].
    #[arg(long, value_name = "N")]
    pub region_replicas: Option<usize>,
}

impl BenchArgs {
    pub fn to_options(
        &self,
        nats_url: Option<String>,
        json: bool,
    ) -> Result<BenchOptions, UsageError> {
        let regions = fleet_regions(&self.regions)?;
        if self.credentials == 0 {
            return Err(usage("--credentials", "must be at least 1"));
        }
        if self.workers_per_region == 0 {
            return Err(usage("--workers-per-region", "must be at least 1"));
        }
        if self.concurrency == 0 {
            return Err(usage("--concurrency", "must be at least 1"));
        }
        let target_latency =
            keywave_common::flags::duration("--target-latency", &self.target_latency)?;
        if self.workers_as_processes && target_latency.subsec_nanos() % 1_000_000 != 0 {
            return Err(usage(
                "--target-latency",
                "must be whole milliseconds with --workers-as-processes",
            ));
        }
        let task_timeout = keywave_common::flags::duration("--task-timeout", &self.task_timeout)?;
        if task_timeout.is_zero() {
            return Err(usage("--task-timeout", "must be positive"));
        }
        let mut region_nats = std::collections::BTreeMap::new();
        for entry in &self.region_nats {
            let (region, urls) = entry
                .split_once('=')
                .filter(|(r, u)| !r.trim().is_empty() && !u.trim().is_empty())
                .ok_or_else(|| usage("--region-nats", format!("{entry:?} is not REGION=URL")))?;
            let region = region.trim().to_string();
            if !regions.contains(&region) {
                return Err(usage(
                    "--region-nats",
                    format!("region {region} is not in --regions"),
                ));
            }
            keywave_common::nats::server_addrs(urls)
                .map_err(|e| usage("--region-nats", format!("{region}: {e}")))?;
            region_nats.insert(region, urls.trim().to_string());
        }
        let mut topology = keywave_common::topology::Config::default();
        for (flag, n) in [
            ("--replicas", Some(self.replicas)),
            ("--region-replicas", self.region_replicas),
        ] {
            if n.is_some_and(|n| n == 0 || n > 5) {
                return Err(usage(flag, "must be between 1 and 5"));
            }
        }
        topology.replicas = self.replicas;
        topology.region_replicas = self.region_replicas;
        topology.region_placement =
            keywave_common::topology::parse_region_placements(&self.placement)
                .map_err(|e| usage("--placement", e.to_string()))?;
        if let Some(r) = topology
            .region_placement
            .keys()
            .find(|r| !regions.contains(r))
        {
            return Err(usage(
                "--placement",
                format!("places region {r}, which is not in --regions"),
            ));
        }
        if let Some(spec) = &self.home_placement {
            topology.home_placement = Some(
                keywave_common::topology::Placement::parse(spec)
                    .map_err(|e| usage("--home-placement", e.to_string()))?,
            );
        }
        Ok(BenchOptions {
            nats_url,
            credentials: self.credentials,
            regions,
            workers_per_region: self.workers_per_region,
            concurrency: self.concurrency,
            target_latency,
            workers_as_processes: self.workers_as_processes,
            waves: wire::parse_wave_plan(&self.waves).map_err(|e| usage("--waves", e))?,
            task_timeout,
            skip_baseline: self.skip_baseline,
            json,
            logs: self.logs.clone(),
            topology,
            region_nats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use keywave_coordinator::config::DaemonArgs;

    #[test]
    fn a_subcommands_help_keeps_the_global_flags_under_their_own_headings() {
        let mut cli = Cli::command();
        // Global flags reach the subcommands when the command is built.
        cli.build();
        let plan = cli
            .find_subcommand_mut("campaign")
            .and_then(|c| c.find_subcommand_mut("plan"))
            .expect("campaign plan");
        let help = plan.render_long_help().to_string();
        let section = |heading: &str| {
            let start = help
                .find(&format!("\n{heading}:\n"))
                .unwrap_or_else(|| panic!("no {heading} section in:\n{help}"));
            let rest = &help[start + heading.len() + 3..];
            // The section ends where an unindented line follows a blank one.
            let end = rest
                .match_indices("\n\n")
                .map(|(i, _)| i)
                .find(|&i| rest[i + 2..].starts_with(|c: char| !c.is_whitespace()))
                .unwrap_or(rest.len());
            rest[..end].to_string()
        };
        let own = section("Options");
        assert!(own.contains("--selector"), "{own}");
        for global in [
            "--nats ",
            "--nats-user",
            "--nats-ca",
            "      --json ",
            "--log-format",
        ] {
            assert!(
                !own.contains(global),
                "{global} among the command's own options:\n{own}"
            );
        }
        assert!(section("Global options").contains("--nats "), "{help}");
        assert!(
            section("NATS identity and TLS").contains("--nats-user"),
            "{help}"
        );
    }

    #[test]
    fn every_command_has_an_example_in_its_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let path = format!("{path} {}", sub.get_name());
                let help = sub
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if !help.contains("Example") {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "keywave", &mut missing);
        walk(&DaemonArgs::command(), "keywave-coordinator", &mut missing);
        assert!(missing.is_empty(), "no Example in --help of: {missing:?}");
    }

    #[test]
    fn cli_definitions_are_consistent() {
        Cli::command().debug_assert();
        DaemonArgs::command().debug_assert();
    }

    fn start(args: &[&str]) -> StartArgs {
        let mut argv = vec!["keywave", "campaign", "start"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Campaign(CampaignCommand::Start(s)) => s,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn campaign_flags_validate_into_a_spec() {
        let s = start(&[
            "--selector",
            "region=eu tag=env=prod",
            "--waves",
            "1,10%",
            "--bake",
            "30s",
            "--on-failure",
            "pause",
            "--strategy",
            "containment",
        ])
        .spec
        .to_spec()
        .unwrap();
        assert_eq!(s.selector.regions, vec!["eu"]);
        assert_eq!(s.bake_ms, 30_000);
        assert_eq!(s.task_timeout_ms, 60_000);
        assert_eq!(s.on_failure, OnFailure::Pause);
        assert_eq!(s.strategy, Strategy::Containment);
        assert_eq!(s.failure_budget, 0.05);

        let err = start(&["--failure-budget", "2"])
            .spec
            .to_spec()
            .unwrap_err();
        assert_eq!(err.flag, "--failure-budget");
        let err = start(&["--bake", "soon"]).spec.to_spec().unwrap_err();
        assert_eq!(err.flag, "--bake");
        let err = start(&["--waves", "0"]).spec.to_spec().unwrap_err();
        assert_eq!(err.flag, "--waves");
        let err = start(&["--selector", "colour=red"])
            .spec
            .to_spec()
            .unwrap_err();
        assert_eq!(err.flag, "--selector");
        assert!(Cli::try_parse_from([
            "keywave", "campaign", "start", "--spec", "x.json", "--waves", "1"
        ])
        .is_err());

        // Who asked: the flag, checked like every other field.
        let s = start(&["--by", "alice@sre"]).spec.to_spec().unwrap();
        assert_eq!(s.requested_by.as_deref(), Some("alice@sre"));
        let err = start(&["--by", "a\u{1b}[2Jb"]).spec.to_spec().unwrap_err();
        assert_eq!(err.flag, "--by");
    }

    #[test]
    fn spec_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::fs::write(
            &path,
            r#"{"name":"q3","selector":{"tags":["env=prod"]},"strategy":"continuity","waves":[1,"10%"],"failure_budget":0.1,"on_failure":"rollback","task_timeout_ms":5000}"#,
        )
        .unwrap();
        let spec = start(&["--spec", path.to_str().unwrap()])
            .spec
            .to_spec()
            .unwrap();
        assert_eq!(spec.name, "q3");
        assert_eq!(spec.task_timeout_ms, 5000);
        std::fs::write(&path, r#"{"strategy":"continuity","waves":[1],"failure_budget":0.1,"on_failure":"rollback","task_timeout_ms":5000,"extra":1}"#).unwrap();
        assert_eq!(
            start(&["--spec", path.to_str().unwrap()])
                .spec
                .to_spec()
                .unwrap_err()
                .flag,
            "--spec"
        );
    }

    #[test]
    fn nats_identity_flags() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw").unwrap();
        let pw = pw.to_str().unwrap();
        let cli = Cli::try_parse_from([
            "keywave",
            "campaign",
            "list",
            "--nats-user",
            "operator",
            "--nats-password-file",
            pw,
            "--nats-inbox-prefix",
            "_INBOX_operator",
        ])
        .unwrap();
        let c = cli.nats_auth.to_config().unwrap();
        assert_eq!(c.user.as_deref(), Some("operator"));
        assert_eq!(c.inbox_prefix.as_deref(), Some("_INBOX_operator"));
        // No password on the command line, ever.
        assert!(
            Cli::try_parse_from(["keywave", "--nats-password", "x", "campaign", "list"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "keywave",
            "--nats-user",
            "operator",
            "--nats-creds",
            pw,
            "campaign",
            "list",
        ])
        .unwrap();
        assert!(cli.nats_auth.to_config().is_err());
        let cli = Cli::try_parse_from([
            "keywave",
            "--nats-ca",
            "/nonexistent/ca.pem",
            "campaign",
            "list",
        ])
        .unwrap();
        assert_eq!(cli.nats_auth.to_config().unwrap_err().flag, "--nats-ca");
        let d = DaemonArgs::try_parse_from([
            "keywave-coordinator",
            "--regions",
            "eu, us",
            "--nats-user",
            "coordinator",
        ])
        .unwrap();
        assert_eq!(d.region_list().unwrap(), ["eu", "us"]);
        assert_eq!(d.nats_auth.nats_user.as_deref(), Some("coordinator"));
        let d = DaemonArgs::try_parse_from(["keywave-coordinator", "--regions", "e.u"]).unwrap();
        assert_eq!(d.region_list().unwrap_err().flag, "--regions");
    }

    #[test]
    fn daemon_flags_validate() {
        let a = DaemonArgs::try_parse_from([
            "keywave-coordinator",
            "--id",
            "c1",
            "--progress-interval",
            "500ms",
            "--insecure-unsigned-tasks",
        ])
        .unwrap();
        let o = a.to_options().unwrap();
        assert_eq!(o.coordinator_id, "c1");
        assert_eq!(o.progress_interval, Duration::from_millis(500));
        assert!(o.signer.is_none());
        let a = DaemonArgs::try_parse_from(["keywave-coordinator", "--id", "a.b"]).unwrap();
        assert_eq!(a.to_options().unwrap_err().flag, "--id");
    }

    #[test]
    fn tasks_are_signed_unless_the_insecure_opt_out_is_named() {
        // No key and no opt-out: refused, and the error says what to do.
        let a = DaemonArgs::try_parse_from(["keywave-coordinator"]).unwrap();
        let e = a.to_options().unwrap_err();
        assert_eq!(e.flag, "--signing-key-file");
        let msg = e.to_string();
        assert!(msg.contains("keywave-coordinator keygen"), "{msg}");
        assert!(msg.contains("--insecure-unsigned-tasks"), "{msg}");
        // A key: tasks are signed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.key");
        keywave_common::sign::SigningKey::generate()
            .to_file(&path)
            .unwrap();
        let a = DaemonArgs::try_parse_from([
            "keywave-coordinator",
            "--signing-key-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        assert!(a.to_options().unwrap().signer.is_some());
        // Both at once is a contradiction clap refuses.
        assert!(DaemonArgs::try_parse_from([
            "keywave-coordinator",
            "--signing-key-file",
            path.to_str().unwrap(),
            "--insecure-unsigned-tasks",
        ])
        .is_err());
    }
}
