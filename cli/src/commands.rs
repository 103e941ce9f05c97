//! What each `keywave` command does and prints. Human output is for people;
//! with `--json` every command prints exactly one JSON document on stdout
//! (its last line). Errors are [`CommandError`]s; the binary prints them as
//! one line and exits non-zero ([`CommandError::exit_code`]).

use crate::{
    args::{self, CampaignCommand, Cli, Command, InventoryCommand, UsageError},
    context::{connect, print_json, CommandError, EXIT_AUDIT_BROKEN, EXIT_NOT_COMPLETED},
};
use keywave_common::{
    api::{CampaignStatus, CampaignSummary},
    planner,
    topology::{self},
    wire::{CampaignState, Credential},
};
use keywave_coordinator::{engine::plan::PlanEntry, inventory};
use keywave_devkit::{bench, dev};
use serde::Serialize;

/// Runs a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8, CommandError> {
    let json = cli.json;
    let url = cli.nats_url();
    match cli.command {
        Command::Inventory(InventoryCommand::Import(args)) => {
            let format = args.format()?;
            let client = connect(&url).await?;
            let js = topology::context(client);
            let kv = topology::inventory(&js, &topology::Config::default()).await?;
            let report = inventory::import_file(&kv, &args.file, format).await?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "imported {} credentials from {} ({})",
                    report.imported,
                    report.path.display(),
                    report.format
                );
            }
            Ok(0)
        }
        Command::Inventory(InventoryCommand::ImportConsumers(args)) => {
            let format = args.format()?;
            let client = connect(&url).await?;
            let js = topology::context(client);
            let kv = topology::consumers(&js, &topology::Config::default()).await?;
            let report =
                keywave_coordinator::inventory::deps::import_consumers(&kv, &args.file, format)
                    .await?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "imported {} consumers from {} ({})",
                    report.imported,
                    report.path.display(),
                    report.format
                );
            }
            Ok(0)
        }
        Command::Inventory(InventoryCommand::Deps(args)) => deps(args, &url, json).await,
        Command::Inventory(InventoryCommand::List(args)) => {
            let selector = keywave_common::flags::selector(&args.selector)?;
            let kv = existing_inventory(&url).await?;
            let creds = match &kv {
                Some(kv) => inventory::list(kv, &selector).await?,
                None => Vec::new(),
            };
            if json {
                print_json(&creds);
            } else {
                print_credentials(&creds);
            }
            Ok(0)
        }
        Command::Campaign(cmd) => campaign(cmd, &url, json).await,
        Command::Dev(args) => {
            let opts = args.to_options(cli.nats.clone(), json)?;
            let report = dev::run(opts).await.map_err(CommandError::Dev)?;
            if json {
                print_json(&report);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.verified_ok() { 0 } else { 1 })
        }
        Command::Detect(args) => crate::detect::run(args, &url, json).await,
        Command::Audit(args::AuditCommand::Verify {
            campaign,
            public_keys,
        }) => audit_verify(&url, campaign.as_deref(), &public_keys, json).await,
        Command::Reconcile(args) => crate::reconcile::run_cli(args, &url, json).await,
        Command::Inventory(InventoryCommand::Discover(args)) => {
            crate::discover::run_cli(args, &url, json).await
        }
        Command::Bench(args) => {
            let opts = args.to_options(cli.nats.clone(), json)?;
            let report = bench::run(opts).await.map_err(CommandError::Bench)?;
            if json {
                println!("{}", report.json_line());
            } else {
                print!("{}", report.render());
            }
            Ok(if report.state == CampaignState::Completed {
                0
            } else {
                EXIT_NOT_COMPLETED
            })
        }
    }
}

/// The inventory bucket if it exists (read-only commands create nothing).
/// `keywave inventory deps`: both directions of the dependencies.
async fn deps(args: args::DepsArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    let js = topology::context(connect(url).await?);
    let idx = keywave_coordinator::inventory::deps::ConsumerIndex::load(&js).await?;
    let inv = js.get_key_value(topology::KV_INVENTORY).await.ok();
    if let Some(consumer) = &args.consumer {
        let creds = match &inv {
            Some(kv) => inventory::list(kv, &keywave_common::wire::Selector::default()).await?,
            None => Vec::new(),
        };
        let d = keywave_coordinator::inventory::deps::consumer_deps(consumer, &creds, &idx);
        if json {
            print_json(&d);
        } else {
            match &d.record {
                Some(r) => println!(
                    "consumer {} (kind {}, verify {}{})",
                    d.consumer,
                    r.kind.as_deref().unwrap_or("-"),
                    r.verify.unwrap_or_default(),
                    r.url
                        .as_deref()
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default()
                ),
                None => println!("consumer {} (no consumer record)", d.consumer),
            }
            for c in &d.credentials {
                println!(
                    "  uses {:<24} {:<8} verify {:<7} declared by {}",
                    c.id,
                    c.region,
                    c.verify,
                    c.declared_by.join("+")
                );
            }
            for u in &d.unknown_credentials {
                println!("  needs {u} (not in the inventory)");
            }
            println!("{} credentials", d.credentials.len());
        }
        return Ok(0);
    }
    let id = args.credential.unwrap_or_default();
    let cred = match &inv {
        Some(kv) => {
            let sel = keywave_common::wire::Selector {
                ids: vec![id.clone()],
                ..Default::default()
            };
            inventory::list(kv, &sel).await?.into_iter().next()
        }
        None => None,
    };
    let Some(cred) = cred else {
        return Err(CommandError::Usage(UsageError {
            flag: "CREDENTIAL".into(),
            message: format!("credential {id:?} is not in the inventory"),
        }));
    };
    let d = keywave_coordinator::inventory::deps::CredentialDeps {
        consumers: keywave_coordinator::inventory::deps::resolve(&cred, &idx),
        credential: cred.id,
        region: cred.region,
    };
    if json {
        print_json(&d);
    } else {
        println!("credential {} (region {})", d.credential, d.region);
        for c in &d.consumers {
            println!(
                "  consumer {:<24} kind {:<8} verify {:<7}{} declared by {}",
                c.id,
                c.kind.as_deref().unwrap_or("-"),
                c.verify,
                c.url
                    .as_deref()
                    .map(|u| format!(" {u}"))
                    .unwrap_or_default(),
                c.declared_by.join("+")
            );
        }
        println!("{} consumers", d.consumers.len());
    }
    Ok(0)
}

async fn existing_inventory(
    url: &str,
) -> Result<Option<async_nats::jetstream::kv::Store>, CommandError> {
    let js = topology::context(connect(url).await?);
    Ok(js.get_key_value(topology::KV_INVENTORY).await.ok())
}

fn print_credentials(creds: &[Credential]) {
    println!(
        "{:<24} {:<8} {:<16} {:<9} {:<20} TAGS",
        "ID", "REGION", "ENDPOINT", "KIND", "PRINCIPAL"
    );
    for c in creds {
        println!(
            "{:<24} {:<8} {:<16} {:<9} {:<20} {}",
            c.id,
            c.region,
            c.endpoint,
            c.kind.as_str(),
            c.principal,
            c.tags.join(",")
        );
    }
    println!("{} credentials", creds.len());
}

#[derive(Serialize)]
struct PlannedWave {
    wave: u32,
    size: u64,
    /// Distinct consumers the wave's credentials have.
    consumer_count: u64,
    /// Those consumers, sorted, with their verification.
    consumers: Vec<PlannedConsumer>,
    credentials: Vec<PlanEntry>,
}

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct PlannedConsumer {
    id: String,
    verify: keywave_common::wire::VerifyKind,
}

#[derive(Serialize)]
struct Plan {
    total: u64,
    spec: keywave_common::wire::CampaignSpec,
    wave_sizes: Vec<u64>,
    waves: Vec<PlannedWave>,
}

async fn campaign(cmd: CampaignCommand, url: &str, json: bool) -> Result<u8, CommandError> {
    match cmd {
        CampaignCommand::Plan(args) => {
            let spec = args.spec.to_spec()?;
            let creds = match existing_inventory(url).await? {
                Some(kv) => inventory::list(&kv, &spec.selector).await?,
                None => Vec::new(),
            };
            if creds.is_empty() {
                return Err(CommandError::EmptySelection);
            }
            let sizes = planner::wave_sizes(creds.len() as u64, &spec.waves);
            let idx = keywave_coordinator::inventory::deps::ConsumerIndex::load(
                &topology::context(connect(url).await?),
            )
            .await?;
            let mut rest = creds.iter();
            let waves = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| {
                    let credentials: Vec<PlanEntry> = rest
                        .by_ref()
                        .take(size as usize)
                        .map(|c| PlanEntry::with_consumers(c, &idx))
                        .collect();
                    let consumers: std::collections::BTreeSet<PlannedConsumer> = credentials
                        .iter()
                        .flat_map(|e| e.consumers.iter())
                        .map(|c| PlannedConsumer {
                            id: c.id.clone(),
                            verify: c.verify,
                        })
                        .collect();
                    PlannedWave {
                        wave: i as u32,
                        size,
                        consumer_count: consumers.len() as u64,
                        consumers: consumers.into_iter().collect(),
                        credentials,
                    }
                })
                .collect::<Vec<_>>();
            let plan = Plan {
                total: creds.len() as u64,
                spec,
                wave_sizes: sizes,
                waves,
            };
            if json {
                print_json(&plan);
            } else {
                println!(
                    "dry run: {} credentials in {} waves · {} · budget {:.1}% per wave · on failure {} · nothing was changed",
                    plan.total,
                    plan.waves.len(),
                    plan.spec.strategy,
                    plan.spec.failure_budget * 100.0,
                    plan.spec.on_failure.as_str()
                );
                for w in &plan.waves {
                    let unverified = w
                        .consumers
                        .iter()
                        .filter(|c| c.verify == keywave_common::wire::VerifyKind::None)
                        .count();
                    println!(
                        "wave {} ({} credentials, {} consumers{}):",
                        w.wave,
                        w.size,
                        w.consumer_count,
                        if unverified > 0 {
                            format!(", {unverified} unverified")
                        } else {
                            String::new()
                        }
                    );
                    for e in w.credentials.iter().take(args.limit) {
                        println!(
                            "  {:<24} {:<8} {:<16} {:<9} {}",
                            e.id, e.region, e.endpoint, e.kind, e.principal
                        );
                    }
                    if w.credentials.len() > args.limit {
                        println!("  ... and {} more", w.credentials.len() - args.limit);
                    }
                }
            }
            Ok(0)
        }
        CampaignCommand::Start(args) => {
            let spec = args.spec.to_spec()?;
            let wait_timeout = keywave_common::duration::parse(&args.wait_timeout)
                .map_err(|e| args::usage("--wait-timeout", e))?;
            let api = crate::context::api(connect(url).await?);
            let id = api
                .start_request(keywave_common::api::StartRequest {
                    spec,
                    campaign_id: None,
                    skip_locked: args.skip_locked,
                })
                .await?;
            // The start reason warns about regions without a live worker
            // (the campaign pauses before publishing a wave there).
            if let Ok(st) = api.status(&id).await {
                for note in st
                    .reason
                    .as_deref()
                    .unwrap_or_default()
                    .split("; ")
                    .filter(|n| n.starts_with("WARNING region "))
                {
                    eprintln!("warning: {}", note.trim_start_matches("WARNING "));
                }
            }
            if !args.wait {
                if json {
                    print_json(&serde_json::json!({ "campaign_id": id }));
                } else {
                    println!("{id}");
                }
                return Ok(0);
            }
            if !json {
                eprintln!("campaign {id} started; waiting for it to finish");
            }
            let status = api.wait_terminal(&id, wait_timeout).await?;
            if json {
                print_json(&status);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(if status.state == CampaignState::Completed {
                0
            } else {
                EXIT_NOT_COMPLETED
            })
        }
        CampaignCommand::Status(id) => {
            let api = crate::context::api(connect(url).await?);
            let status = api.status(&id.id).await?;
            if json {
                print_json(&status);
            } else {
                print!("{}", render_status(&status));
            }
            Ok(0)
        }
        CampaignCommand::List => {
            let api = crate::context::api(connect(url).await?);
            let list = api.list().await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", render_list(&list));
            }
            Ok(0)
        }
        CampaignCommand::Watch(args) => crate::watch::run(args, url, json).await,
        CampaignCommand::Report(args) => crate::report::run(args, url, json).await,
        CampaignCommand::Rollback(args) => {
            let api = crate::context::api(connect(url).await?);
            let status = api.rollback(&args.id, args.wave).await?;
            print_control(&status, json);
            Ok(0)
        }
        CampaignCommand::Pause(id) => control("pause", &id.id, url, json).await,
        CampaignCommand::Resume(id) => control("resume", &id.id, url, json).await,
        CampaignCommand::Abort(id) => control("abort", &id.id, url, json).await,
        CampaignCommand::Approve(args) => {
            let by = args
                .by
                .clone()
                .filter(|b| !b.trim().is_empty())
                .ok_or_else(|| UsageError {
                    flag: "--by".into(),
                    message: "say who approves (--by NAME; $USER is not set)".into(),
                })?;
            let api = crate::context::api(connect(url).await?);
            let status = api.approve(&args.id, args.wave, &by).await?;
            print_control(&status, json);
            Ok(0)
        }
    }
}

/// `campaign pause|resume|abort`.
async fn control(verb: &str, id: &str, url: &str, json: bool) -> Result<u8, CommandError> {
    let api = crate::context::api(connect(url).await?);
    let status = match verb {
        "pause" => api.pause(id).await?,
        "resume" => api.resume(id).await?,
        _ => api.abort(id).await?,
    };
    print_control(&status, json);
    Ok(0)
}

/// The answer to an operator control (pause, resume, abort, rollback,
/// approve): one line, or the
/// status as JSON.
fn print_control(status: &CampaignStatus, json: bool) {
    if json {
        print_json(status);
    } else {
        println!(
            "campaign {}: {}{}",
            status.campaign_id,
            status.state,
            status
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
}

/// A campaign status for people.
pub fn render_status(s: &CampaignStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let name = if s.spec.name.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", s.spec.name)
    };
    let _ = writeln!(out, "campaign {}{}: {}", s.campaign_id, name, s.state);
    let _ = writeln!(
        out,
        "  {} · {} credentials · {} waves · budget {:.1}% · on failure {} · task timeout {}",
        s.spec.strategy,
        s.total,
        s.waves.len(),
        s.spec.failure_budget * 100.0,
        s.spec.on_failure.as_str(),
        keywave_common::duration::format_ms(s.spec.task_timeout_ms)
    );
    let _ = writeln!(
        out,
        "  succeeded {} · failed {} · rolled back {}",
        s.succeeded(),
        s.failed(),
        s.rolled_back()
    );
    for w in &s.waves {
        let done = w.succeeded + w.failed + w.no_result;
        let marker = if w.wave == s.current_wave && !s.state.is_terminal() {
            ">"
        } else {
            " "
        };
        let _ = write!(
            out,
            " {marker}wave {}: {}/{} done, {} succeeded, {} failed",
            w.wave, done, w.size, w.succeeded, w.failed
        );
        if w.no_result > 0 {
            let _ = write!(out, ", {} no result", w.no_result);
        }
        if w.rollback_tasks > 0 {
            let _ = write!(
                out,
                ", rollback {} restored / {} refused / {} failed of {}",
                w.rolled_back, w.rollback_refused, w.rollback_failed, w.rollback_tasks
            );
        }
        if let Some(by) = &w.approved_by {
            let _ = write!(out, ", approved by {by}");
        } else if w.approval_required {
            let _ = write!(out, ", needs approval");
        }
        if let Some(d) = w.decision {
            let _ = write!(out, " → {}", d.as_str());
        }
        let _ = writeln!(out);
        if let Some(r) = &w.reason {
            let _ = writeln!(out, "      {r}");
        }
    }
    for (name, r) in &s.regions {
        let _ = write!(
            out,
            "  region {name}: {}/{} done, {} succeeded, {} failed",
            r.succeeded + r.failed,
            r.total,
            r.succeeded,
            r.failed
        );
        // Live figures (shown while a coordinator drives the campaign):
        // queued = not pulled by a worker yet, in flight = pulled, not answered.
        match (r.live_workers, r.silent_for_ms) {
            (_, Some(ms)) => {
                let _ = write!(out, " · no live workers for {} s", ms / 1_000);
            }
            (Some(n), None) => {
                let _ = write!(out, " · {n} live worker{}", if n == 1 { "" } else { "s" });
            }
            (None, None) => {}
        }
        if let (Some(q), Some(f)) = (r.queued, r.in_flight) {
            let _ = write!(out, " · queue: {q} queued, {f} in flight");
        }
        let _ = writeln!(out);
    }
    if let Some(r) = &s.reason {
        let _ = writeln!(out, "  reason: {r}");
    }
    out
}

/// `campaign list` for people.
pub fn render_list(list: &[CampaignSummary]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<13} {:<12} {:>9} {:>9} {:>7}  NAME",
        "ID", "STATE", "STRATEGY", "TOTAL", "SUCCEEDED", "FAILED"
    );
    for c in list {
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:<12} {:>9} {:>9} {:>7}  {}",
            c.campaign_id,
            c.state.as_str(),
            c.strategy.to_string(),
            c.total,
            c.succeeded,
            c.failed,
            c.name
        );
    }
    out
}

/// `keywave audit verify`: checks the hash chains, prints each chain's
/// verdict (the first broken link when there is one).
async fn audit_verify(
    url: &str,
    campaign: Option<&str>,
    public_keys: &[String],
    json: bool,
) -> Result<u8, CommandError> {
    let keys = public_keys
        .iter()
        .map(|k| keywave_common::sign::PublicKey::from_hex(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| args::UsageError {
            flag: "--public-key".into(),
            message: e.to_string(),
        })?;
    if let Some(c) = campaign {
        keywave_common::ids::validate("campaign id", c).map_err(|e| args::UsageError {
            flag: "--campaign".into(),
            message: e.to_string(),
        })?;
    }
    let js = topology::context(connect(url).await?);
    let report = keywave_coordinator::audit::verify(&js, campaign, &keys).await?;
    if json {
        print_json(&report);
    } else {
        if report.chains.is_empty() {
            println!("no audit chain found");
        }
        for c in &report.chains {
            match &c.broken {
                None if keys.is_empty() => println!(
                    "{}: ok, {} records, head {} {}",
                    c.campaign_id, c.records, c.last_seq, c.last_hash
                ),
                None => println!(
                    "{}: ok, {} records, all signed by a trusted key, head {} {}",
                    c.campaign_id, c.records, c.last_seq, c.last_hash
                ),
                Some(b) => println!(
                    "{}: BROKEN after record {} ({} read): {b}",
                    c.campaign_id, c.last_seq, c.records
                ),
            }
        }
    }
    Ok(if report.ok { 0 } else { EXIT_AUDIT_BROKEN })
}
