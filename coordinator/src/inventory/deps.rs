//! Dependencies between credentials and their consumers.
//!
//! Two sources, merged:
//! - a credential's own `consumers` list in the inventory: bare ids, or
//!   objects `{id, kind, verify, url, timeout_ms}` ([`ConsumerRef`]);
//! - consumer records in KV bucket `keywave-consumers` (key = consumer id),
//!   imported with `keywave inventory import-consumers FILE`: a consumer's
//!   kind, owner, how it is verified, and the credentials it `needs`.
//!
//! A consumer of credential C is any id in C's `consumers`, plus every
//! consumer record that lists C in `needs`. Its verification is, in order:
//! the credential's own entry when it sets `verify`, else the consumer
//! record's, else `attest` (fail closed: the old secret is never revoked
//! until the consumer proved it moved). See docs/inventory.md.

use super::{ImportError, InventoryError, Position, MAX_FIELD_BYTES};
use crate::kvscan;
use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use keywave_common::ids;
use keywave_common::wire::{ConsumerCheck, ConsumerRef, Credential, VerifyKind, SCHEMA_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Longest consumer wait accepted in a record (24 h).
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A consumer record (`keywave-consumers`, key = id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerRecord {
    #[serde(default = "schema_version")]
    pub v: u16,
    pub id: String,
    /// What it is (`app`, `ci`, `cron`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How it is verified after a rotation (default `attest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyKind>,
    /// `http`: the URL probed after a rotation; must answer 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Longest wait for its verification, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Credential ids it uses.
    #[serde(default)]
    pub needs: Vec<String>,
}

fn schema_version() -> u16 {
    SCHEMA_VERSION
}

type FieldError = (String, String);

fn ferr(field: &str, m: impl Into<String>) -> FieldError {
    (field.to_string(), m.into())
}

/// A consumer id names NATS subjects (its agent's ping and attestations), so
/// it follows the rule of every id: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 128
/// bytes.
fn check_consumer_id(field: &str, v: &str) -> Result<(), FieldError> {
    ids::validate("consumer id", v).map_err(|e| ferr(field, e.to_string()))
}

fn check_label(field: &str, v: &str) -> Result<(), FieldError> {
    if v.is_empty() || v.len() > MAX_FIELD_BYTES {
        return Err(ferr(field, format!("must be 1 to {MAX_FIELD_BYTES} bytes")));
    }
    if v.chars().any(|c| {
        c.is_control() || c.is_whitespace() || c == ',' || c == ';' || ids::is_invisible(c)
    }) {
        return Err(ferr(
            field,
            format!("{v:?} must not contain whitespace, ',', ';', control or invisible characters"),
        ));
    }
    Ok(())
}

/// Checks a consumer's verification settings (shared by credential entries
/// and consumer records).
pub fn check_verification(
    verify: Option<VerifyKind>,
    url: Option<&str>,
    timeout_ms: Option<u64>,
    prefix: &str,
) -> Result<(), FieldError> {
    let f = |name: &str| format!("{prefix}{name}");
    match (verify, url) {
        (Some(VerifyKind::Http), None) => {
            return Err(ferr(&f("url"), "is required with verify = http"))
        }
        (Some(VerifyKind::Http), Some(u)) => {
            if !u.starts_with("http://") || u.len() > 2048 || u.chars().any(char::is_whitespace) {
                return Err(ferr(
                    &f("url"),
                    "must be a plain http:// URL without whitespace",
                ));
            }
            if u["http://".len()..]
                .split('/')
                .next()
                .unwrap_or("")
                .contains('@')
            {
                return Err(ferr(&f("url"), "must not carry credentials"));
            }
        }
        (Some(VerifyKind::Attest) | Some(VerifyKind::None), Some(_)) => {
            return Err(ferr(&f("url"), "is only used with verify = http"))
        }
        // An entry without verify may still carry a URL for a record's http.
        _ => {}
    }
    if let Some(t) = timeout_ms {
        if t == 0 || t > MAX_TIMEOUT_MS {
            return Err(ferr(
                &f("timeout_ms"),
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            ));
        }
    }
    Ok(())
}

/// Checks one consumer entry of a credential (`consumers[i]`).
pub fn check_consumer_ref(c: &ConsumerRef) -> Result<(), FieldError> {
    check_consumer_id("consumers", &c.id)?;
    if let Some(k) = &c.kind {
        check_label("consumers.kind", k)?;
    }
    check_verification(c.verify, c.url.as_deref(), c.timeout_ms, "consumers.")
}

fn validate_record(r: ConsumerRecord) -> Result<ConsumerRecord, FieldError> {
    if r.v != SCHEMA_VERSION {
        return Err(ferr("v", format!("unsupported schema version {}", r.v)));
    }
    ids::validate("id", &r.id).map_err(|e| ferr("id", e.to_string()))?;
    if let Some(k) = &r.kind {
        check_label("kind", k)?;
    }
    if let Some(o) = &r.owner {
        if ids::validate_text("owner", o, MAX_FIELD_BYTES).is_err() {
            return Err(ferr(
                "owner",
                "at most 256 bytes, no control or invisible characters",
            ));
        }
    }
    check_verification(r.verify, r.url.as_deref(), r.timeout_ms, "")?;
    if r.url.is_some() && r.verify != Some(VerifyKind::Http) {
        return Err(ferr("url", "is only used with verify = http"));
    }
    let mut seen = HashSet::new();
    for n in &r.needs {
        ids::validate("needs", n).map_err(|e| ferr("needs", e.to_string()))?;
        if !seen.insert(n) {
            return Err(ferr("needs", format!("{n:?} is listed twice")));
        }
    }
    Ok(r)
}

fn record_from_value(v: Value) -> Result<ConsumerRecord, FieldError> {
    if !v.is_object() {
        return Err(ferr("record", "must be a JSON object"));
    }
    // Name the offending field for unknown ones, as the inventory does.
    if let Value::Object(m) = &v {
        const FIELDS: [&str; 8] = [
            "v",
            "id",
            "kind",
            "owner",
            "verify",
            "url",
            "timeout_ms",
            "needs",
        ];
        if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err((k.chars().take(64).collect(), "unknown field".into()));
        }
        if !m.contains_key("id") {
            return Err(ferr("id", "is required"));
        }
    }
    let r: ConsumerRecord = serde_json::from_value(v).map_err(|e| ferr("record", e.to_string()))?;
    validate_record(r)
}

/// Parses and validates a consumer file (JSON array, JSON Lines or CSV with
/// columns `id,kind,owner,verify,url,timeout_ms,needs`, `needs`
/// `;`-separated). Any bad record fails the whole file.
pub fn parse_consumers(
    format: super::Format,
    reader: impl Read,
) -> Result<Vec<ConsumerRecord>, ImportError> {
    use super::Format;
    let mut out: Vec<ConsumerRecord> = Vec::new();
    let mut first: HashMap<String, Position> = HashMap::new();
    let mut push = |at: Position, r: Result<ConsumerRecord, FieldError>| {
        let r = r.map_err(|(field, message)| ImportError::Invalid { at, field, message })?;
        if let Some(f) = first.get(&r.id) {
            return Err(ImportError::Duplicate {
                at,
                id: r.id,
                first: *f,
            });
        }
        first.insert(r.id.clone(), at);
        out.push(r);
        Ok(())
    };
    match format {
        Format::Json => {
            let items: Vec<Value> =
                serde_json::from_reader(reader).map_err(|e| ImportError::Syntax {
                    at: Position::Line(e.line().max(1)),
                    message: format!("invalid JSON (expected an array of consumer objects): {e}"),
                })?;
            for (i, v) in items.into_iter().enumerate() {
                push(Position::Element(i + 1), record_from_value(v))?;
            }
        }
        Format::JsonLines => {
            for (i, line) in BufReader::new(reader).lines().enumerate() {
                let at = Position::Line(i + 1);
                let line = line.map_err(|e| ImportError::Syntax {
                    at,
                    message: format!("cannot read: {e}"),
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line).map_err(|e| ImportError::Syntax {
                    at,
                    message: format!("invalid JSON: {e}"),
                })?;
                push(at, record_from_value(v))?;
            }
        }
        Format::Csv => {
            let mut rdr = csv::ReaderBuilder::new()
                .trim(csv::Trim::All)
                .from_reader(reader);
            let headers: Vec<String> = rdr
                .headers()
                .map_err(|e| ImportError::Syntax {
                    at: Position::Line(1),
                    message: format!("cannot read the CSV header: {e}"),
                })?
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect();
            for rec in rdr.records() {
                let rec = rec.map_err(|e| ImportError::Syntax {
                    at: Position::Line(e.position().map_or(1, |p| p.line() as usize)),
                    message: format!("invalid CSV: {e}"),
                })?;
                let at = Position::Line(rec.position().map_or(0, |p| p.line() as usize));
                let mut m = Map::new();
                for (h, v) in headers.iter().zip(rec.iter()) {
                    if v.is_empty() {
                        continue;
                    }
                    let value = match h.as_str() {
                        "needs" => Value::Array(
                            v.split(';')
                                .map(str::trim)
                                .filter(|s| !s.is_empty())
                                .map(|s| Value::String(s.into()))
                                .collect(),
                        ),
                        "timeout_ms" => match v.parse::<u64>() {
                            Ok(n) => Value::from(n),
                            Err(_) => {
                                return Err(ImportError::Invalid {
                                    at,
                                    field: "timeout_ms".into(),
                                    message: "must be a number of milliseconds".into(),
                                })
                            }
                        },
                        _ => Value::String(v.into()),
                    };
                    m.insert(h.clone(), value);
                }
                push(at, record_from_value(Value::Object(m)))?;
            }
        }
    }
    Ok(out)
}

/// What `import-consumers` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerImportReport {
    pub path: std::path::PathBuf,
    pub format: String,
    pub imported: u64,
}

/// Imports a consumer file into `kv` (all or nothing: the file is validated
/// whole first). Consumer files are small next to the inventory, so they
/// are read into memory.
pub async fn import_consumers(
    kv: &kv::Store,
    path: &Path,
    format: Option<super::Format>,
) -> Result<ConsumerImportReport, ImportError> {
    let format = format
        .or_else(|| super::Format::from_path(path))
        .ok_or_else(|| ImportError::UnknownFormat {
            path: path.to_path_buf(),
        })?;
    let file = std::fs::File::open(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let records = parse_consumers(format, BufReader::new(file))?;
    let imported = put_consumers(kv, &records).await?;
    Ok(ConsumerImportReport {
        path: path.to_path_buf(),
        format: format.as_str().into(),
        imported,
    })
}

/// Writes consumer records (key = id).
pub async fn put_consumers(
    kv: &kv::Store,
    records: &[ConsumerRecord],
) -> Result<u64, InventoryError> {
    futures::stream::iter(0..records.len())
        .map(|i| async move {
            let r = &records[i];
            let body = serde_json::to_vec(r).map_err(|e| InventoryError::Put {
                id: r.id.clone(),
                detail: e.to_string(),
            })?;
            kv.put(&r.id, body.into())
                .await
                .map_err(|e| InventoryError::Put {
                    id: r.id.clone(),
                    detail: e.to_string(),
                })?;
            Ok::<_, InventoryError>(())
        })
        .buffer_unordered(super::PUT_CONCURRENCY)
        .try_fold(0u64, |n, ()| async move { Ok(n + 1) })
        .await
}

/// Every consumer record, sorted by id (entries that do not decode are skipped).
pub async fn list_consumers(kv: &kv::Store) -> Result<Vec<ConsumerRecord>, InventoryError> {
    let mut out = Vec::new();
    kvscan::for_each_latest(kv, ">", |e| {
        match serde_json::from_slice::<ConsumerRecord>(&e.value) {
            Ok(r) => out.push(r),
            Err(err) => {
                tracing::warn!(key = %e.key, error = %err, "Skipping a consumer entry that does not decode")
            }
        }
    })
    .await
    .map_err(|e| InventoryError::Read(e.to_string()))?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Consumer records indexed by id and by the credentials they need.
#[derive(Debug, Clone, Default)]
pub struct ConsumerIndex {
    pub records: HashMap<String, ConsumerRecord>,
    pub by_credential: HashMap<String, Vec<String>>,
}

impl ConsumerIndex {
    pub fn new(records: Vec<ConsumerRecord>) -> Self {
        let mut idx = ConsumerIndex::default();
        for r in records {
            for n in &r.needs {
                idx.by_credential
                    .entry(n.clone())
                    .or_default()
                    .push(r.id.clone());
            }
            idx.records.insert(r.id.clone(), r);
        }
        idx
    }

    /// The index of the `keywave-consumers` bucket reachable with `js`
    /// (empty when the bucket does not exist).
    pub async fn load(
        js: &async_nats::jetstream::Context,
    ) -> Result<ConsumerIndex, InventoryError> {
        match js
            .get_key_value(keywave_common::topology::KV_CONSUMERS)
            .await
        {
            Ok(kv) => Ok(ConsumerIndex::new(list_consumers(&kv).await?)),
            Err(_) => Ok(ConsumerIndex::default()),
        }
    }
}

/// A consumer of a credential, resolved from both sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedConsumer {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub verify: VerifyKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Where the dependency is declared: `credential`, `consumer` or both.
    pub declared_by: Vec<&'static str>,
}

impl ResolvedConsumer {
    pub fn check(&self) -> ConsumerCheck {
        ConsumerCheck {
            id: self.id.clone(),
            verify: self.verify,
            url: self.url.clone(),
            timeout_ms: self.timeout_ms,
        }
    }
}

/// The consumers of `c`, sorted by id.
pub fn resolve(c: &Credential, idx: &ConsumerIndex) -> Vec<ResolvedConsumer> {
    let mut out: BTreeMap<String, ResolvedConsumer> = BTreeMap::new();
    let from_record = |id: &str| idx.records.get(id);
    for e in &c.consumers {
        let rec = from_record(&e.id);
        let verify = e.verify.or(rec.and_then(|r| r.verify)).unwrap_or_default();
        let url = if verify == VerifyKind::Http {
            e.url.clone().or(rec.and_then(|r| r.url.clone()))
        } else {
            None
        };
        let mut declared_by = vec!["credential"];
        if rec.is_some_and(|r| r.needs.contains(&c.id)) {
            declared_by.push("consumer");
        }
        out.insert(
            e.id.clone(),
            ResolvedConsumer {
                id: e.id.clone(),
                kind: e.kind.clone().or(rec.and_then(|r| r.kind.clone())),
                verify,
                url,
                timeout_ms: e.timeout_ms.or(rec.and_then(|r| r.timeout_ms)),
                declared_by,
            },
        );
    }
    for id in idx.by_credential.get(&c.id).into_iter().flatten() {
        if out.contains_key(id) {
            continue;
        }
        let r = &idx.records[id];
        let verify = r.verify.unwrap_or_default();
        out.insert(
            id.clone(),
            ResolvedConsumer {
                id: id.clone(),
                kind: r.kind.clone(),
                verify,
                url: r.url.clone().filter(|_| verify == VerifyKind::Http),
                timeout_ms: r.timeout_ms,
                declared_by: vec!["consumer"],
            },
        );
    }
    out.into_values().collect()
}

/// The checks a task carries for `c`.
pub fn checks(c: &Credential, idx: &ConsumerIndex) -> Vec<ConsumerCheck> {
    resolve(c, idx)
        .iter()
        .map(ResolvedConsumer::check)
        .collect()
}

/// `keywave inventory deps CREDENTIAL`.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialDeps {
    pub credential: String,
    pub region: String,
    pub consumers: Vec<ResolvedConsumer>,
}

/// One credential a consumer uses.
#[derive(Debug, Clone, Serialize)]
pub struct UsedCredential {
    pub id: String,
    pub region: String,
    /// How this consumer is verified for it.
    pub verify: VerifyKind,
    pub declared_by: Vec<&'static str>,
}

/// `keywave inventory deps --consumer ID`.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerDeps {
    pub consumer: String,
    /// Its record in `keywave-consumers`, if any.
    pub record: Option<ConsumerRecord>,
    pub credentials: Vec<UsedCredential>,
    /// Credentials its record `needs` that are not in the inventory.
    pub unknown_credentials: Vec<String>,
}

/// Both directions for one consumer, from the whole inventory.
pub fn consumer_deps(id: &str, creds: &[Credential], idx: &ConsumerIndex) -> ConsumerDeps {
    let mut credentials = Vec::new();
    let mut known = HashSet::new();
    for c in creds {
        known.insert(c.id.as_str());
        if let Some(r) = resolve(c, idx).into_iter().find(|r| r.id == id) {
            credentials.push(UsedCredential {
                id: c.id.clone(),
                region: c.region.clone(),
                verify: r.verify,
                declared_by: r.declared_by,
            });
        }
    }
    let record = idx.records.get(id).cloned();
    let unknown_credentials = record
        .iter()
        .flat_map(|r| r.needs.iter())
        .filter(|n| !known.contains(n.as_str()))
        .cloned()
        .collect();
    ConsumerDeps {
        consumer: id.to_string(),
        record,
        credentials,
        unknown_credentials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Format;
    use keywave_common::wire::TargetKind;

    fn cred(id: &str, consumers: Vec<ConsumerRef>) -> Credential {
        Credential {
            v: 1,
            id: id.into(),
            region: "eu".into(),
            endpoint: "e".into(),
            kind: TargetKind::Sim,
            principal: "p".into(),
            tags: vec![],
            owner: None,
            consumers,
        }
    }

    #[test]
    fn resolves_both_directions_and_defaults_to_attest() {
        let recs = parse_consumers(
            Format::JsonLines,
            r#"{"id":"web","kind":"app","verify":"http","url":"http://127.0.0.1:1/h","needs":["db"]}
{"id":"cron","verify":"none","needs":["db","cache"]}
"#
            .as_bytes(),
        )
        .unwrap();
        let idx = ConsumerIndex::new(recs);
        let db = cred("db", vec!["api".into(), "cron".into()]);
        let r = resolve(&db, &idx);
        let ids: Vec<_> = r.iter().map(|c| (c.id.as_str(), c.verify)).collect();
        assert_eq!(
            ids,
            [
                ("api", VerifyKind::Attest),
                ("cron", VerifyKind::None),
                ("web", VerifyKind::Http)
            ]
        );
        assert_eq!(r[1].declared_by, ["credential", "consumer"]);
        assert_eq!(r[2].url.as_deref(), Some("http://127.0.0.1:1/h"));
        let d = consumer_deps("cron", &[db.clone(), cred("x", vec![])], &idx);
        assert_eq!(d.credentials.len(), 1);
        assert_eq!(d.unknown_credentials, ["cache"]);
    }

    #[test]
    fn bad_records_name_the_field() {
        for (text, field) in [
            (r#"{"id":"a","verify":"http"}"#, "url"),
            (r#"{"id":"a","verify":"attest","url":"http://x/"}"#, "url"),
            (r#"{"id":"a","colour":"red"}"#, "colour"),
            (r#"{"id":"a b"}"#, "id"),
            (r#"{"id":"a","needs":["x","x"]}"#, "needs"),
            (r#"{"id":"a","verify":"http","url":"https://x/"}"#, "url"),
        ] {
            match parse_consumers(Format::JsonLines, text.as_bytes()).unwrap_err() {
                ImportError::Invalid { field: f, .. } => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let csv = "id,verify,url,needs\nweb,http,http://h/x,db;cache\n";
        let r = parse_consumers(Format::Csv, csv.as_bytes()).unwrap();
        assert_eq!(r[0].needs, ["db", "cache"]);
    }
}
