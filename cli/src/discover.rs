//! `keywave inventory discover`: one worker of the region lists the logins
//! of an endpoint it administers (`keywave.admin.v1.<region>.discover`), and
//! the CLI turns them into inventory records in the inventory's own format
//! (JSON Lines on stdout, importable with `keywave inventory import`), or
//! adds them itself with `--import`, never replacing a record that exists.
//! Privileged logins and the endpoint's admin login are left out unless
//! `--include-privileged`; clone logins of alternating pairs always are.

use crate::context::{connect, CommandError, DiscoverImportError};
use crate::reconcile::request;
use clap::Args;
use keywave_common::admin::{verbs, DiscoverReply, DiscoverRequest};
use keywave_common::flags;
use keywave_common::wire::{Credential, SCHEMA_VERSION};
use keywave_common::{ids, subjects, topology};
use keywave_coordinator::inventory::{self, Format};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Tag put on every discovered record.
pub const DISCOVERED_TAG: &str = "discovered";

/// Raw flags of `keywave inventory discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// The endpoint's name in the region's worker configuration.
    #[arg(long, value_name = "NAME")]
    pub endpoint: String,
    /// The region whose workers administer the endpoint.
    #[arg(long, value_name = "R")]
    pub region: String,
    /// Only logins whose name matches this glob (`*` any run, `?` one character), e.g. `app_*`.
    #[arg(long = "match", value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Also propose privileged logins (superusers, replication, ALL/SUPER/GRANT OPTION, +@all, the admin login).
    #[arg(long)]
    pub include_privileged: bool,
    /// Add the proposed records to the inventory (ids that exist are skipped, never replaced).
    #[arg(long)]
    pub import: bool,
    /// Extra tags of the proposed records (repeatable), besides `discovered`.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Owner of the proposed records.
    #[arg(long)]
    pub owner: Option<String>,
    /// Longest wait for the worker's reply.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub timeout: String,
}

/// What `discover` found and proposed (what `--json` prints).
#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    pub region: String,
    pub endpoint: String,
    pub kind: String,
    pub worker_id: String,
    /// Records proposed (in the inventory's format), new ones and existing ones alike.
    pub proposed: Vec<Credential>,
    /// Ids of proposed records already in the inventory.
    pub existing: Vec<String>,
    /// Logins left out, with why.
    pub excluded: Vec<Excluded>,
    /// Records written by `--import`.
    pub imported: usize,
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Excluded {
    pub principal: String,
    pub reasons: Vec<String>,
}

/// The inventory id of `principal` at `endpoint`: `<endpoint>-<principal>`
/// when that is a valid id; otherwise unsupported characters become `-` and
/// a short hash of the principal keeps ids of different logins apart.
pub fn credential_id(endpoint: &str, principal: &str) -> String {
    let plain = format!("{endpoint}-{principal}");
    if ids::validate("credential id", &plain).is_ok() {
        return plain;
    }
    let mut s: String = plain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let hash = hex::encode(&Sha256::digest(principal.as_bytes())[..4]);
    s.truncate(ids::MAX_ID_LEN - hash.len() - 1);
    format!("{s}-{hash}")
}

/// Asks the region's workers and builds the proposal (writes nothing).
pub async fn discover(
    client: &async_nats::Client,
    args: &DiscoverArgs,
) -> Result<Discovery, CommandError> {
    let usage = |flag: &str, m: String| CommandError::Usage(flags::usage(flag, m));
    ids::validate("region", &args.region).map_err(|e| usage("--region", e.to_string()))?;
    ids::validate("endpoint", &args.endpoint).map_err(|e| usage("--endpoint", e.to_string()))?;
    let timeout: Duration = keywave_common::duration::parse(&args.timeout)
        .map_err(|e| usage("--timeout", e.to_string()))?;
    let mut tags = vec![DISCOVERED_TAG.to_string()];
    tags.extend(args.tags.iter().cloned());
    // Tags and owner checked by the inventory's own rules before asking anyone.
    let probe = Credential {
        v: SCHEMA_VERSION,
        id: "probe".into(),
        region: args.region.clone(),
        endpoint: args.endpoint.clone(),
        kind: keywave_common::wire::TargetKind::Sim,
        principal: "probe".into(),
        tags: tags.clone(),
        owner: args.owner.clone(),
        consumers: Vec::new(),
    };
    let line = serde_json::to_vec(&probe).unwrap_or_default();
    if let Err(e) = inventory::parse_reader(Format::JsonLines, line.as_slice()) {
        let flag = if e.field() == Some("owner") {
            "--owner"
        } else {
            "--tag"
        };
        return Err(usage(flag, e.to_string()));
    }
    let subject = subjects::admin(&args.region, verbs::DISCOVER);
    let reply: DiscoverReply = request(
        client,
        &subject,
        &DiscoverRequest {
            endpoint: args.endpoint.clone(),
            pattern: args.pattern.clone(),
            include_privileged: args.include_privileged,
        },
        timeout.max(Duration::from_millis(1)),
    )
    .await
    .map_err(CommandError::Admin)?;

    let mut excluded: Vec<Excluded> = reply
        .excluded
        .iter()
        .map(|l| Excluded {
            principal: l.principal.clone(),
            reasons: l.never.iter().chain(l.privileged.iter()).cloned().collect(),
        })
        .collect();
    let mut proposed = Vec::new();
    for l in &reply.proposed {
        let c = Credential {
            v: SCHEMA_VERSION,
            id: credential_id(&args.endpoint, &l.principal),
            region: args.region.clone(),
            endpoint: args.endpoint.clone(),
            kind: reply.kind,
            principal: l.principal.clone(),
            tags: tags.clone(),
            owner: args.owner.clone(),
            consumers: Vec::new(),
        };
        // The inventory's own validation, record by record.
        let line = serde_json::to_vec(&c).unwrap_or_default();
        match inventory::parse_reader(Format::JsonLines, line.as_slice()) {
            Ok(_) => proposed.push(c),
            Err(e) => excluded.push(Excluded {
                principal: l.principal.clone(),
                reasons: vec![format!("not a valid inventory record: {e}")],
            }),
        }
    }
    let js = topology::context(client.clone());
    let mut existing = Vec::new();
    if let Ok(kv) = js.get_key_value(topology::KV_INVENTORY).await {
        for c in &proposed {
            if matches!(kv.entry(&c.id).await, Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put)
            {
                existing.push(c.id.clone());
            }
        }
    }
    Ok(Discovery {
        region: reply.region,
        endpoint: reply.endpoint,
        kind: reply.kind.as_str().to_string(),
        worker_id: reply.worker_id,
        proposed,
        existing,
        excluded,
        imported: 0,
        truncated: reply.truncated,
    })
}

/// Adds the proposed records that do not exist yet (a create per record:
/// one written concurrently by someone else is skipped too).
pub async fn import(client: &async_nats::Client, d: &mut Discovery) -> Result<usize, CommandError> {
    let js = topology::context(client.clone());
    let kv = topology::inventory(&js, &topology::Config::default()).await?;
    let mut n = 0;
    for c in &d.proposed {
        if d.existing.contains(&c.id) {
            continue;
        }
        let body = serde_json::to_vec(c).map_err(|source| DiscoverImportError::Encode {
            id: c.id.clone(),
            source,
        })?;
        match kv.create(&c.id, body.into()).await {
            Ok(_) => n += 1,
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                d.existing.push(c.id.clone());
            }
            Err(source) => {
                return Err(DiscoverImportError::Write {
                    id: c.id.clone(),
                    source,
                }
                .into())
            }
        }
    }
    d.imported = n;
    Ok(n)
}

/// `keywave inventory discover`.
pub async fn run_cli(args: DiscoverArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    let client = connect(url).await?;
    let mut d = discover(&client, &args).await?;
    if args.import {
        import(&client, &mut d).await?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&d)
                .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
        );
        return Ok(0);
    }
    // Records on stdout (JSON Lines, importable as they are); the rest on stderr.
    if !args.import {
        for c in &d.proposed {
            println!("{}", serde_json::to_string(c).unwrap_or_default());
        }
    }
    eprintln!(
        "{} {} logins at {} (region {}, answered by {}): {} proposed, {} excluded{}",
        d.proposed.len() + d.excluded.len(),
        d.kind,
        d.endpoint,
        d.region,
        d.worker_id,
        d.proposed.len(),
        d.excluded.len(),
        if d.truncated { " (truncated)" } else { "" }
    );
    for e in &d.excluded {
        eprintln!("  excluded {:<24} {}", e.principal, e.reasons.join(", "));
    }
    for id in &d.existing {
        eprintln!("  exists   {id} (already in the inventory; left as it is)");
    }
    if args.import {
        eprintln!(
            "imported {} records into the inventory ({} existed)",
            d.imported,
            d.existing.len()
        );
    } else if !d.proposed.is_empty() {
        eprintln!("nothing was written; add --import, or save stdout and `keywave inventory import file.jsonl`");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_distinct() {
        assert_eq!(credential_id("pg-main", "app_orders"), "pg-main-app_orders");
        let a = credential_id("maria", "app@10.0.0.%");
        let b = credential_id("maria", "app@10-0-0-%");
        assert!(ids::validate("id", &a).is_ok(), "{a}");
        assert!(ids::validate("id", &b).is_ok(), "{b}");
        assert_ne!(a, b);
        let long = credential_id("e", &"x.".repeat(200));
        assert!(ids::validate("id", &long).is_ok());
        assert!(long.len() <= ids::MAX_ID_LEN);
    }
}
