//! The credential inventory: the KV bucket `keywave-inventory`, one JSON
//! [`Credential`] per key (the key is the credential id). Files are imported
//! all-or-nothing: the whole file is parsed and validated first, and only a
//! file without a single bad record is written. Both passes stream the file:
//! what is held per record is a 128-bit keyed hash of its id (to find
//! duplicates), so a million-record file imports in tens of MB.
//!
//! # File formats
//!
//! The format comes from the extension (`.json`, `.jsonl` / `.ndjson`, `.csv`)
//! or is given explicitly ([`Format`], `--format json|jsonl|csv`).
//!
//! - **JSON**: an array of objects.
//! - **JSON Lines**: one object per line; blank lines are skipped.
//! - **CSV**: a header row, then one credential per row. Columns
//!   `id,region,endpoint,kind,principal,tags,owner,consumers`, in any order;
//!   the last three are optional. `tags` and `consumers` are `;`-separated.
//!
//! | field | required | rule |
//! |---|---|---|
//! | `id` | yes | `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 128 bytes, unique in the file |
//! | `region` | yes | same rule as `id` |
//! | `endpoint` | yes | same rule as `id`: the endpoint's name in the region's worker configuration |
//! | `kind` | yes | `redis`, `postgres`, `mysql` or `sim` |
//! | `principal` | yes | the login (role, user, ACL user); 1..=256 bytes, no control or invisible characters (bidi overrides, zero-width); one record per principal and endpoint |
//! | `tags` | no | `key=value` or `label`; no whitespace, `,` or `;` |
//! | `owner` | no | team or person; at most 256 bytes, no control or invisible characters |
//! | `consumers` | no | ids of the systems using the secret, `;`-separated; each with the same rule as `id` |
//! | `v` | no | schema version, `1` when given (JSON only) |
//!
//! An invalid record is reported as an [`ImportError`] naming its position
//! (1-based line for JSON Lines and CSV, 1-based element number for a JSON
//! array) and the field. Unknown fields and columns are errors, so a typo
//! never silently drops data. The inventory never holds a secret.

pub mod deps;

use crate::kvscan;
use async_nats::jetstream::kv;
use futures::{StreamExt, TryStreamExt};
use keywave_common::{
    ids,
    wire::{ConsumerRef, Credential, Selector, TargetKind, UnknownName, SCHEMA_VERSION},
};
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Longest accepted principal, owner, tag or consumer, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;
/// Concurrent KV writes of [`put_all`].
pub const PUT_CONCURRENCY: usize = 64;

/// An inventory file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON array of credential objects.
    Json,
    /// One JSON credential object per line.
    JsonLines,
    /// CSV with a header row.
    Csv,
}

impl Format {
    /// The format implied by a file's extension, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(Format::Json),
            "jsonl" | "ndjson" => Some(Format::JsonLines),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::JsonLines => "jsonl",
            Format::Csv => "csv",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "jsonl" | "jsonlines" | "ndjson" => Ok(Format::JsonLines),
            "csv" => Ok(Format::Csv),
            o => Err(UnknownName::new(
                "inventory format",
                o,
                "json, jsonl or csv",
            )),
        }
    }
}

/// Where a record sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// 1-based line (JSON Lines, CSV, JSON syntax errors).
    Line(usize),
    /// 1-based element of a JSON array.
    Element(usize),
}

impl Position {
    /// The 1-based number, whatever the unit.
    pub fn number(self) -> usize {
        match self {
            Position::Line(n) | Position::Element(n) => n,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Element(n) => write!(f, "element {n}"),
        }
    }
}

/// Why a file could not be imported. Nothing was written when this is returned
/// (except for [`ImportError::Write`], where the KV store failed mid-way).
#[derive(Debug, Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tell the format of {path} from its extension (use .json, .jsonl or .csv, or pass --format json|jsonl|csv)")]
    UnknownFormat { path: PathBuf },
    #[error("{at}: {message}")]
    Syntax { at: Position, message: String },
    #[error("{at}, field {field}: {message}")]
    Invalid {
        at: Position,
        field: String,
        message: String,
    },
    #[error("{at}: duplicate credential id {id:?} (first at {first})")]
    Duplicate {
        at: Position,
        id: String,
        first: Position,
    },
    /// Two records name the same login (principal at one endpoint of one
    /// region): rotating both would leave the login with two valid secrets
    /// and two records each "proving" theirs.
    #[error("{0}")]
    DuplicateLogin(Box<SharedLogin>),
    #[error(transparent)]
    Write(#[from] InventoryError),
}

/// The two records of an [`ImportError::DuplicateLogin`].
#[derive(Debug)]
pub struct SharedLogin {
    pub at: Position,
    pub id: String,
    pub first: Position,
    /// The first record's id (looked up once the duplicate is found).
    pub first_id: Option<String>,
    /// 0-based record number of the first record, to look its id up.
    pub first_index: u64,
    pub region: String,
    pub endpoint: String,
    pub principal: String,
}

impl fmt::Display for SharedLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = match &self.first_id {
            Some(id) => format!("{id:?}"),
            None => "?".into(),
        };
        write!(
            f,
            "{}: credential {:?} has the same login as credential {first} (at {}): principal {:?} at endpoint {} in region {}; keep one record per login",
            self.at, self.id, self.first, self.principal, self.endpoint, self.region
        )
    }
}

impl ImportError {
    /// The 1-based line (or JSON array element) of the offending record.
    pub fn line(&self) -> Option<usize> {
        match self {
            ImportError::Syntax { at, .. }
            | ImportError::Invalid { at, .. }
            | ImportError::Duplicate { at, .. } => Some(at.number()),
            ImportError::DuplicateLogin(d) => Some(d.at.number()),
            _ => None,
        }
    }

    /// The offending field, when one is to blame.
    pub fn field(&self) -> Option<&str> {
        match self {
            ImportError::Invalid { field, .. } => Some(field),
            ImportError::Duplicate { .. } => Some("id"),
            ImportError::DuplicateLogin(_) => Some("principal"),
            _ => None,
        }
    }
}

/// Failures of the inventory bucket itself.
#[derive(Debug, Error)]
pub enum InventoryError {
    #[error("credential id {id:?} is not valid: {source}")]
    InvalidId {
        id: String,
        #[source]
        source: ids::IdError,
    },
    #[error("writing credential {id} to the inventory: {detail}")]
    Put { id: String, detail: String },
    #[error("reading the inventory: {0}")]
    Read(String),
}

/// What [`import_file`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    pub path: PathBuf,
    pub format: String,
    pub imported: u64,
}

/// A record's fields before validation (shared by the three formats).
#[derive(Default)]
struct RawRecord {
    v: Option<u64>,
    id: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
    kind: Option<String>,
    principal: Option<String>,
    tags: Vec<String>,
    owner: Option<String>,
    consumers: Vec<ConsumerRef>,
}

/// (field, message) of the first problem in a record.
type FieldError = (String, String);

fn ferr(field: &str, message: impl Into<String>) -> FieldError {
    (field.to_string(), message.into())
}

fn check_text(field: &str, value: &str, allow_empty: bool) -> Result<(), FieldError> {
    if value.is_empty() && !allow_empty {
        return Err(ferr(field, "must not be empty"));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(ferr(
            field,
            format!(
                "is {} bytes, at most {MAX_FIELD_BYTES} allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ferr(field, "must not contain control characters"));
    }
    if let Some(c) = value.chars().find(|&c| ids::is_invisible(c)) {
        return Err(ferr(
            field,
            format!(
                "must not contain invisible or direction-changing characters (U+{:04X})",
                c as u32
            ),
        ));
    }
    Ok(())
}

fn check_label(field: &str, value: &str) -> Result<(), FieldError> {
    check_text(field, value, false)?;
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == ',' || c == ';')
    {
        return Err(ferr(
            field,
            format!("{value:?} must not contain whitespace, ',' or ';'"),
        ));
    }
    Ok(())
}

fn required_id(field: &'static str, value: Option<String>) -> Result<String, FieldError> {
    let value = value.ok_or_else(|| ferr(field, "is required"))?;
    ids::validate(field, &value).map_err(|e| ferr(field, e.to_string()))?;
    Ok(value)
}

/// Validates a record into a [`Credential`].
fn validate(raw: RawRecord) -> Result<Credential, FieldError> {
    if let Some(v) = raw.v {
        if v != u64::from(SCHEMA_VERSION) {
            return Err(ferr(
                "v",
                format!("unsupported schema version {v} (expected {SCHEMA_VERSION})"),
            ));
        }
    }
    let id = required_id("id", raw.id)?;
    let region = required_id("region", raw.region)?;
    let endpoint = required_id("endpoint", raw.endpoint)?;
    let kind: TargetKind = raw
        .kind
        .ok_or_else(|| ferr("kind", "is required"))?
        .parse()
        .map_err(|e: UnknownName| ferr("kind", e.to_string()))?;
    let principal = raw
        .principal
        .ok_or_else(|| ferr("principal", "is required"))?;
    check_text("principal", &principal, false)?;
    for t in &raw.tags {
        check_label("tags", t)?;
    }
    for (i, c) in raw.consumers.iter().enumerate() {
        deps::check_consumer_ref(c)?;
        if raw.consumers[..i].iter().any(|o| o.id == c.id) {
            return Err(ferr(
                "consumers",
                format!("consumer {:?} is listed twice", c.id),
            ));
        }
    }
    let owner = match raw.owner {
        Some(o) if o.is_empty() => None,
        Some(o) => {
            check_text("owner", &o, true)?;
            Some(o)
        }
        None => None,
    };
    Ok(Credential {
        v: SCHEMA_VERSION,
        id,
        region,
        endpoint,
        kind,
        principal,
        tags: raw.tags,
        owner,
        consumers: raw.consumers,
    })
}

fn json_string(field: &str, v: Value) -> Result<Option<String>, FieldError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(ferr(field, "must be a string")),
    }
}

fn json_list(field: &str, v: Value) -> Result<Vec<String>, FieldError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(ferr(field, "must be an array of strings")),
            })
            .collect(),
        _ => Err(ferr(field, "must be an array of strings")),
    }
}

/// A credential's `consumers`: an array of ids or of objects
/// `{id, kind, verify, url, timeout_ms}` (mixed freely).
fn json_consumers(v: Value) -> Result<Vec<ConsumerRef>, FieldError> {
    let Value::Array(items) = v else {
        return match v {
            Value::Null => Ok(Vec::new()),
            _ => Err(ferr("consumers", "must be an array of ids or objects")),
        };
    };
    items
        .into_iter()
        .map(|i| match i {
            Value::String(s) => Ok(ConsumerRef::id(s)),
            Value::Object(m) => {
                if let Some(k) = m
                    .keys()
                    .find(|k| !["id", "kind", "verify", "url", "timeout_ms"].contains(&k.as_str()))
                {
                    return Err(ferr(
                        &format!("consumers.{}", k.chars().take(64).collect::<String>()),
                        "unknown field",
                    ));
                }
                if !m.contains_key("id") {
                    return Err(ferr("consumers.id", "is required"));
                }
                serde_json::from_value::<ConsumerRef>(Value::Object(m))
                    .map_err(|e| ferr("consumers", e.to_string()))
            }
            _ => Err(ferr("consumers", "must be an array of ids or objects")),
        })
        .collect()
}

/// One JSON object into a credential.
fn from_json(value: Value) -> Result<Credential, FieldError> {
    let Value::Object(map) = value else {
        return Err(ferr("record", "must be a JSON object"));
    };
    validate(raw_from_map(map)?)
}

fn raw_from_map(map: Map<String, Value>) -> Result<RawRecord, FieldError> {
    let mut raw = RawRecord::default();
    for (k, v) in map {
        match k.as_str() {
            "v" => {
                raw.v = Some(
                    v.as_u64()
                        .ok_or_else(|| ferr("v", "must be a non-negative integer"))?,
                )
            }
            "id" => raw.id = json_string("id", v)?,
            "region" => raw.region = json_string("region", v)?,
            "endpoint" => raw.endpoint = json_string("endpoint", v)?,
            "kind" => raw.kind = json_string("kind", v)?,
            "principal" => raw.principal = json_string("principal", v)?,
            "owner" => raw.owner = json_string("owner", v)?,
            "tags" => raw.tags = json_list("tags", v)?,
            "consumers" => raw.consumers = json_consumers(v)?,
            other => {
                let name: String = other.chars().take(64).collect();
                return Err((name, "unknown field".into()));
            }
        }
    }
    Ok(raw)
}

/// Where the records of a file go, each validated, in file order.
type Sink<'a> = dyn FnMut(Credential) -> Result<(), ImportError> + 'a;

/// Turns parsed records into errors or credentials for a [`Sink`], and
/// rejects duplicate ids. Ids are remembered as 128-bit keyed hashes (two
/// independently keyed SipHashes): a few dozen bytes per record whatever
/// the record's size, with a chance of a false duplicate near 2^-100 for a
/// million ids.
struct Collector<'a> {
    hashers: [RandomState; 2],
    seen: HashMap<u128, Position>,
    /// Logins (region, endpoint, principal) the same way, with the record
    /// number of the first record naming each.
    logins: HashMap<u128, (Position, u64)>,
    records: u64,
    sink: &'a mut Sink<'a>,
}

impl<'a> Collector<'a> {
    fn new(sink: &'a mut Sink<'a>) -> Self {
        Collector {
            hashers: [RandomState::new(), RandomState::new()],
            seen: HashMap::new(),
            logins: HashMap::new(),
            records: 0,
            sink,
        }
    }

    /// Two independently keyed 64-bit hashes of `v`.
    fn key128(&self, v: impl Hash) -> u128 {
        (u128::from(self.hashers[0].hash_one(&v)) << 64) | u128::from(self.hashers[1].hash_one(&v))
    }

    fn push(
        &mut self,
        at: Position,
        record: Result<Credential, FieldError>,
    ) -> Result<(), ImportError> {
        let cred =
            record.map_err(|(field, message)| ImportError::Invalid { at, field, message })?;
        let key = self.key128(&cred.id);
        if let Some(first) = self.seen.get(&key) {
            return Err(ImportError::Duplicate {
                at,
                id: cred.id,
                first: *first,
            });
        }
        let login = self.key128((&cred.region, &cred.endpoint, &cred.principal));
        if let Some(&(first, first_index)) = self.logins.get(&login) {
            return Err(ImportError::DuplicateLogin(Box::new(SharedLogin {
                at,
                id: cred.id,
                first,
                first_id: None,
                first_index,
                region: cred.region,
                endpoint: cred.endpoint,
                principal: cred.principal,
            })));
        }
        self.seen.insert(key, at);
        self.logins.insert(login, (at, self.records));
        self.records += 1;
        (self.sink)(cred)
    }
}

/// Streams the elements of a top-level JSON array through the collector, so a
/// large file never exists as one big `Value` tree.
struct ArraySeed<'a, 'b> {
    collector: &'a mut Collector<'b>,
    failure: &'a mut Option<ImportError>,
}

impl<'de> DeserializeSeed<'de> for ArraySeed<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ArraySeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of credential objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut n = 0;
        while let Some(value) = seq.next_element::<Value>()? {
            n += 1;
            if let Err(e) = self.collector.push(Position::Element(n), from_json(value)) {
                *self.failure = Some(e);
                return Err(A::Error::custom("invalid record"));
            }
        }
        Ok(())
    }
}

fn parse_json(reader: impl Read, collector: &mut Collector<'_>) -> Result<(), ImportError> {
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_reader(reader);
    let result = ArraySeed {
        collector,
        failure: &mut failure,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if let Some(e) = failure {
        return Err(e);
    }
    result.map_err(|e| ImportError::Syntax {
        at: Position::Line(e.line().max(1)),
        message: format!("invalid JSON: {e}"),
    })
}

fn parse_json_lines(reader: impl Read, collector: &mut Collector<'_>) -> Result<(), ImportError> {
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let at = Position::Line(i + 1);
        let line = line.map_err(|e| ImportError::Syntax {
            at,
            message: format!("cannot read: {e}"),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| ImportError::Syntax {
            at,
            message: format!("invalid JSON: {e}"),
        })?;
        collector.push(at, from_json(value))?;
    }
    Ok(())
}

const CSV_COLUMNS: [&str; 8] = [
    "id",
    "region",
    "endpoint",
    "kind",
    "principal",
    "tags",
    "owner",
    "consumers",
];
const CSV_REQUIRED: [&str; 5] = ["id", "region", "endpoint", "kind", "principal"];

fn split_list(s: &str) -> Vec<String> {
    s.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

fn parse_csv(reader: impl Read, collector: &mut Collector<'_>) -> Result<(), ImportError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = rdr
        .headers()
        .map_err(|e| ImportError::Syntax {
            at: Position::Line(1),
            message: format!("cannot read the CSV header: {e}"),
        })?
        .clone();
    let mut columns = Vec::with_capacity(headers.len());
    for h in headers.iter() {
        let name = h.trim().to_ascii_lowercase();
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return Err(ImportError::Invalid {
                at: Position::Line(1),
                field: name.chars().take(64).collect(),
                message: format!("unknown CSV column (expected {})", CSV_COLUMNS.join(",")),
            });
        }
        if columns.contains(&name) {
            return Err(ImportError::Invalid {
                at: Position::Line(1),
                field: name,
                message: "column appears twice".into(),
            });
        }
        columns.push(name);
    }
    for required in CSV_REQUIRED {
        if !columns.iter().any(|c| c == required) {
            return Err(ImportError::Invalid {
                at: Position::Line(1),
                field: required.into(),
                message: "required CSV column is missing".into(),
            });
        }
    }
    let mut record = csv::StringRecord::new();
    loop {
        let more = rdr.read_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or_default();
            ImportError::Syntax {
                at: Position::Line(line.max(1)),
                message: format!("invalid CSV: {e}"),
            }
        })?;
        if !more {
            break;
        }
        let line = record
            .position()
            .map(|p| p.line() as usize)
            .unwrap_or_default();
        let mut raw = RawRecord::default();
        for (name, value) in columns.iter().zip(record.iter()) {
            let text = || (!value.is_empty()).then(|| value.to_string());
            match name.as_str() {
                "id" => raw.id = text(),
                "region" => raw.region = text(),
                "endpoint" => raw.endpoint = text(),
                "kind" => raw.kind = text(),
                "principal" => raw.principal = text(),
                "owner" => raw.owner = text(),
                "tags" => raw.tags = split_list(value),
                "consumers" => {
                    raw.consumers = split_list(value).into_iter().map(ConsumerRef::id).collect()
                }
                _ => unreachable!("columns are checked against CSV_COLUMNS"),
            }
        }
        collector.push(Position::Line(line), validate(raw))?;
    }
    Ok(())
}

/// Parses and validates a whole inventory file into memory. Any bad record
/// fails the whole file; duplicate ids are an error.
pub fn parse_reader(format: Format, reader: impl Read) -> Result<Vec<Credential>, ImportError> {
    let mut creds = Vec::new();
    let scanned = scan(format, reader, &mut |c| {
        creds.push(c);
        Ok(())
    });
    match scanned {
        Err(ImportError::DuplicateLogin(mut d)) => {
            d.first_id = creds.get(d.first_index as usize).map(|c| c.id.clone());
            Err(ImportError::DuplicateLogin(d))
        }
        Err(e) => Err(e),
        Ok(_) => Ok(creds),
    }
}

/// The id of record number `index` (0-based) of a file, to name the first
/// record of a duplicate login.
fn id_at(format: Format, reader: impl Read, index: u64) -> Option<String> {
    let mut n = 0u64;
    let mut found = None;
    let _ = scan(format, reader, &mut |c| {
        if n == index {
            found = Some(c.id);
            // Stop reading: the sink's error ends the scan.
            return Err(ImportError::Syntax {
                at: Position::Line(0),
                message: String::new(),
            });
        }
        n += 1;
        Ok(())
    });
    found
}

/// Parses and validates an inventory file record by record, handing each
/// valid credential to `sink` as soon as it is read; stops at the first bad
/// record or duplicate id (or error of `sink`). Returns the records read.
pub fn scan(format: Format, reader: impl Read, sink: &mut Sink<'_>) -> Result<u64, ImportError> {
    let mut count = 0u64;
    let mut counting = |c: Credential| {
        count += 1;
        sink(c)
    };
    let mut collector = Collector::new(&mut counting);
    match format {
        Format::Json => parse_json(reader, &mut collector)?,
        Format::JsonLines => parse_json_lines(reader, &mut collector)?,
        Format::Csv => parse_csv(reader, &mut collector)?,
    }
    drop(collector);
    Ok(count)
}

/// Imports a file in two streaming passes: the first parses and validates
/// every record (nothing is written unless the whole file is good), the
/// second reads the file again and writes each record as it is read, at most
/// [`PUT_CONCURRENCY`] writes in flight. Memory does not grow with the
/// file beyond the ids' hashes. `format` overrides the extension. The file
/// must not change in between: should the second pass find a bad record, it
/// stops there with that error and the records before it stay written.
pub async fn import_file(
    kv: &kv::Store,
    path: &Path,
    format: Option<Format>,
) -> Result<ImportReport, ImportError> {
    let format =
        format
            .or_else(|| Format::from_path(path))
            .ok_or_else(|| ImportError::UnknownFormat {
                path: path.to_path_buf(),
            })?;
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(BufReader::new)
            .map_err(|source| ImportError::Io {
                path: path.to_path_buf(),
                source,
            })
    };
    let joined = |path: &Path| {
        let path = path.to_path_buf();
        move |e: tokio::task::JoinError| ImportError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        }
    };

    // Pass 1. Parsing is CPU-bound and reads a file: off the async workers.
    let file = open(path)?;
    let validated = tokio::task::spawn_blocking(move || scan(format, file, &mut |_| Ok(())))
        .await
        .map_err(joined(path))?;
    let validated = match validated {
        Err(ImportError::DuplicateLogin(mut d)) => {
            let file = open(path)?;
            let index = d.first_index;
            d.first_id = tokio::task::spawn_blocking(move || id_at(format, file, index))
                .await
                .map_err(joined(path))?;
            return Err(ImportError::DuplicateLogin(d));
        }
        other => other?,
    };

    // Pass 2: the parser feeds a bounded channel, the writer drains it.
    let file = open(path)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Credential>(PUT_CONCURRENCY * 4);
    let owned = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        scan(format, file, &mut |c| {
            tx.blocking_send(c).map_err(|_| ImportError::Io {
                path: owned.clone(),
                source: std::io::Error::other("the inventory writer stopped"),
            })
        })
    });
    let written = put_stream(kv, futures::stream::poll_fn(move |cx| rx.poll_recv(cx))).await;
    let read = reader.await.map_err(joined(path))?;
    // A failed write stops the reader too: report the write.
    let imported = written?;
    let read = read?;
    if read != validated || imported != validated {
        return Err(ImportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!(
                "the file changed during the import: {validated} records validated, {read} read and {imported} written afterwards"
            )),
        });
    }
    Ok(ImportReport {
        path: path.to_path_buf(),
        format: format.as_str().to_string(),
        imported,
    })
}

/// Writes one credential (key = id).
async fn put_one(kv: &kv::Store, c: &Credential) -> Result<(), InventoryError> {
    let put = |detail: String| InventoryError::Put {
        id: c.id.clone(),
        detail,
    };
    let body = serde_json::to_vec(c).map_err(|e| put(e.to_string()))?;
    kv.put(&c.id, body.into())
        .await
        .map_err(|e| put(e.to_string()))?;
    Ok(())
}

/// Writes a stream of credentials, at most [`PUT_CONCURRENCY`] writes in
/// flight; stops at the first invalid id or failed write. Returns how many
/// were written.
pub async fn put_stream(
    kv: &kv::Store,
    creds: impl futures::Stream<Item = Credential>,
) -> Result<u64, InventoryError> {
    creds
        .map(|c| async move {
            ids::validate("credential id", &c.id).map_err(|source| InventoryError::InvalidId {
                id: c.id.clone(),
                source,
            })?;
            put_one(kv, &c).await
        })
        .buffer_unordered(PUT_CONCURRENCY)
        .try_fold(0u64, |n, ()| async move { Ok(n + 1) })
        .await
}

/// Writes credentials to the inventory (key = id), at most
/// [`PUT_CONCURRENCY`] writes in flight. Returns how many were written.
pub async fn put_all(kv: &kv::Store, creds: &[Credential]) -> Result<u64, InventoryError> {
    for c in creds {
        ids::validate("credential id", &c.id).map_err(|source| InventoryError::InvalidId {
            id: c.id.clone(),
            source,
        })?;
    }
    // Indexes rather than borrowed items: the future stays `Send`.
    futures::stream::iter(0..creds.len())
        .map(|i| put_one(kv, &creds[i]))
        .buffer_unordered(PUT_CONCURRENCY)
        .try_fold(0u64, |n, ()| async move { Ok(n + 1) })
        .await
}

/// Every credential matching `selector`, sorted by id. Reads the whole bucket
/// in one streamed pass; entries that do not decode are skipped with a warning.
pub async fn list(kv: &kv::Store, selector: &Selector) -> Result<Vec<Credential>, InventoryError> {
    select(kv, selector, |c| c, |c| &c.id).await
}

/// Like [`list`], but each matching credential is turned by `f` into what the
/// caller keeps (a campaign plan keeps a `PlanEntry`: id, region, endpoint,
/// kind, principal) as it is read, so a million-credential selection never
/// holds a million whole [`Credential`]s. Sorted by `id_of`.
pub async fn select<T>(
    kv: &kv::Store,
    selector: &Selector,
    mut f: impl FnMut(Credential) -> T,
    id_of: impl Fn(&T) -> &str,
) -> Result<Vec<T>, InventoryError> {
    let mut out = Vec::new();
    let mut corrupt = 0u64;
    kvscan::for_each_latest(kv, ">", |entry| {
        match serde_json::from_slice::<Credential>(&entry.value) {
            Ok(c) if selector.matches(&c) => out.push(f(c)),
            Ok(_) => {}
            Err(e) => {
                corrupt += 1;
                if corrupt <= 5 {
                    tracing::warn!(key = %entry.key, error = %e, "Skipping inventory entry that is not a credential");
                }
            }
        }
    })
    .await
    .map_err(|e| InventoryError::Read(e.to_string()))?;
    if corrupt > 5 {
        tracing::warn!(
            count = corrupt,
            "Skipped inventory entries that are not credentials"
        );
    }
    out.sort_by(|a, b| id_of(a).cmp(id_of(b)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_JSON: &str = r#"[
  {"id": "db-1", "region": "eu", "endpoint": "pg-main", "kind": "postgres", "principal": "app_rw",
   "tags": ["env=prod", "tier=1"], "owner": "team-a", "consumers": ["svc-a"]},
  {"id": "cache-1", "region": "us", "endpoint": "redis-main", "kind": "redis", "principal": "cache"}
]"#;

    #[test]
    fn parses_good_json_array() {
        let creds = parse_reader(Format::Json, GOOD_JSON.as_bytes()).unwrap();
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].id, "db-1");
        assert_eq!(creds[0].kind, TargetKind::Postgres);
        assert_eq!(creds[0].tags, vec!["env=prod", "tier=1"]);
        assert_eq!(creds[0].owner.as_deref(), Some("team-a"));
        assert_eq!(creds[1].tags, Vec::<String>::new());
    }

    #[test]
    fn parses_good_json_lines() {
        let text = "{\"id\":\"a\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"sim\",\"principal\":\"p\"}\n\n{\"v\":1,\"id\":\"b\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"redis\",\"principal\":\"q\",\"tags\":[\"x\"]}\n";
        let creds = parse_reader(Format::JsonLines, text.as_bytes()).unwrap();
        assert_eq!(
            creds.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn parses_good_csv() {
        let text = "id,region,endpoint,kind,principal,tags,owner,consumers\n\
                    db-1,eu,pg-main,postgres,app_rw,env=prod;tier=1,team-a,svc-a;svc-b\n\
                    cache-1,us,redis-main,redis,cache,,,\n";
        let creds = parse_reader(Format::Csv, text.as_bytes()).unwrap();
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].tags, vec!["env=prod", "tier=1"]);
        assert_eq!(creds[0].consumers, vec!["svc-a", "svc-b"]);
        assert_eq!(creds[1].owner, None);
        // Optional columns may be left out, and columns come in any order.
        let text = "principal,kind,endpoint,region,id\np,sim,e,eu,x1\n";
        let creds = parse_reader(Format::Csv, text.as_bytes()).unwrap();
        assert_eq!(creds[0].id, "x1");
    }

    #[test]
    fn bad_jsonl_record_names_line_and_field() {
        let text = "{\"id\":\"a\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"sim\",\"principal\":\"p\"}\n\
                    {\"id\":\"b\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"oracle\",\"principal\":\"p\"}\n";
        let err = parse_reader(Format::JsonLines, text.as_bytes()).unwrap_err();
        match &err {
            ImportError::Invalid { at, field, .. } => {
                assert_eq!(*at, Position::Line(2));
                assert_eq!(field, "kind");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(err.line(), Some(2));
    }

    #[test]
    fn bad_json_element_names_element_and_field() {
        let text = r#"[{"id":"a","region":"eu","endpoint":"e","kind":"sim","principal":"p"},
                      {"id":"b.c","region":"eu","endpoint":"e","kind":"sim","principal":"p"}]"#;
        match parse_reader(Format::Json, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { at, field, .. } => {
                assert_eq!(at, Position::Element(2));
                assert_eq!(field, "id");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = r#"[{"id":"a","region":"eu","endpoint":"e","kind":"sim","principal":"p","colour":"red"}]"#;
        match parse_reader(Format::Json, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { at, field, .. } => {
                assert_eq!(at, Position::Element(1));
                assert_eq!(field, "colour");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = "[\n{\"id\":\"a\",\n\"region\": ]";
        assert!(matches!(
            parse_reader(Format::Json, text.as_bytes()).unwrap_err(),
            ImportError::Syntax {
                at: Position::Line(3),
                ..
            }
        ));
    }

    #[test]
    fn bad_csv_record_names_line_and_field() {
        let text = "id,region,endpoint,kind,principal\n\
                    a,eu,e,sim,p\n\
                    b,eu,e,sim,\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { at, field, .. } => {
                assert_eq!(at, Position::Line(3));
                assert_eq!(field, "principal");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = "id,region,endpoint,kind,principal\na,e u,e,sim,p\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { field, .. } => assert_eq!(field, "region"),
            other => panic!("unexpected {other:?}"),
        }
        let text = "id,region,endpoint,kind\na,eu,e,sim\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { at, field, .. } => {
                assert_eq!(at, Position::Line(1));
                assert_eq!(field, "principal");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn principal_rules() {
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        for bad in [long.as_str(), "a\u{7}b", ""] {
            let text = format!(
                "{}\n",
                serde_json::json!({"id":"a","region":"eu","endpoint":"e","kind":"sim","principal":bad})
            );
            match parse_reader(Format::JsonLines, text.as_bytes()).unwrap_err() {
                ImportError::Invalid { field, .. } => assert_eq!(field, "principal"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn duplicate_ids_are_an_error() {
        let text = "id,region,endpoint,kind,principal\na,eu,e,sim,p\nb,eu,e,sim,pb\na,us,e,sim,q\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Duplicate { at, id, first } => {
                assert_eq!(at, Position::Line(4));
                assert_eq!(first, Position::Line(2));
                assert_eq!(id, "a");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn two_records_for_one_login_are_an_error_naming_both() {
        // The same principal in another region or at another endpoint is
        // another login.
        let ok = "id,region,endpoint,kind,principal\na,eu,e,sim,p\nb,us,e,sim,p\nc,eu,f,sim,p\n";
        assert_eq!(parse_reader(Format::Csv, ok.as_bytes()).unwrap().len(), 3);
        let text = format!("{ok}d,eu,x,sim,q\ne,us,e,sim,p\n");
        let err = parse_reader(Format::Csv, text.as_bytes()).unwrap_err();
        match &err {
            ImportError::DuplicateLogin(d) => {
                assert_eq!(d.at, Position::Line(6));
                assert_eq!(d.first, Position::Line(3));
                assert_eq!(d.id, "e");
                assert_eq!(d.first_id.as_deref(), Some("b"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("\"e\"") && msg.contains("\"b\""), "{msg}");
        assert_eq!(err.field(), Some("principal"));
    }

    #[test]
    fn principals_with_invisible_characters_are_refused() {
        let text = "id,region,endpoint,kind,principal\na,eu,e,sim,admin\u{202E}nimda\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { field, message, .. } => {
                assert_eq!(field, "principal");
                assert!(message.contains("U+202E"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = "id,region,endpoint,kind,principal,consumers\na,eu,e,sim,p,svc.a\n";
        match parse_reader(Format::Csv, text.as_bytes()).unwrap_err() {
            ImportError::Invalid { field, .. } => assert_eq!(field, "consumers"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn scan_streams_records_to_the_sink_and_stops_on_its_error() {
        let text: String = (0..5)
            .map(|i| format!("{{\"id\":\"c{i}\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"sim\",\"principal\":\"p{i}\"}}\n"))
            .collect();
        let mut ids = Vec::new();
        let n = scan(Format::JsonLines, text.as_bytes(), &mut |c| {
            ids.push(c.id);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(ids, ["c0", "c1", "c2", "c3", "c4"]);
        let mut seen = 0;
        let err = scan(Format::JsonLines, text.as_bytes(), &mut |_| {
            seen += 1;
            if seen == 2 {
                return Err(ImportError::UnknownFormat {
                    path: PathBuf::from("stop"),
                });
            }
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, ImportError::UnknownFormat { .. }));
        assert_eq!(seen, 2, "nothing is read past the sink's error");
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(Format::from_path(Path::new("x.JSON")), Some(Format::Json));
        assert_eq!(
            Format::from_path(Path::new("x.ndjson")),
            Some(Format::JsonLines)
        );
        assert_eq!(Format::from_path(Path::new("x.csv")), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("x.txt")), None);
        assert_eq!("jsonl".parse::<Format>(), Ok(Format::JsonLines));
    }

    /// Against the real server: a file with one bad record writes nothing, a
    /// good file is written and listed back, and an empty selection is empty.
    #[tokio::test]
    async fn import_is_all_or_nothing_against_real_kv() {
        let server = keywave_harness::NatsServer::start();
        let client = server.client().await;
        let js = async_nats::jetstream::new(client);
        let bucket = ids::random_id("kwtest-inv");
        let cfg = kv::Config {
            bucket: bucket.clone(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        // Not `create_key_value`: it fails on nats-server 2.9 (see topology).
        js.get_or_create_stream(keywave_common::topology::kv_stream_config(&cfg))
            .await
            .unwrap();
        let kv = js.get_key_value(&bucket).await.unwrap();
        // Empty bucket: listing returns at once.
        assert!(list(&kv, &Selector::default()).await.unwrap().is_empty());

        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"id\":\"a\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"sim\",\"principal\":\"p\"}\n\
             {\"id\":\"b\",\"region\":\"eu\",\"endpoint\":\"e\",\"kind\":\"sim\"}\n",
        )
        .unwrap();
        let err = import_file(&kv, &bad, None).await.unwrap_err();
        assert_eq!(err.line(), Some(2));
        assert_eq!(err.field(), Some("principal"));
        assert!(list(&kv, &Selector::default()).await.unwrap().is_empty());
        assert_eq!(kv.status().await.unwrap().values(), 0, "nothing written");

        let good = dir.path().join("good.csv");
        let mut text = String::from("id,region,endpoint,kind,principal,tags\n");
        for i in 0..500 {
            let region = if i % 2 == 0 { "eu" } else { "us" };
            text.push_str(&format!("c-{i:04},{region},e,sim,p{i},env=dev\n"));
        }
        std::fs::write(&good, text).unwrap();
        let report = import_file(&kv, &good, None).await.unwrap();
        assert_eq!(report.imported, 500);
        let all = list(&kv, &Selector::default()).await.unwrap();
        assert_eq!(all.len(), 500);
        assert_eq!(all[0].id, "c-0000");
        let eu = list(&kv, &Selector::parse("region=eu").unwrap())
            .await
            .unwrap();
        assert_eq!(eu.len(), 250);
        kv.delete("c-0000").await.unwrap();
        assert_eq!(list(&kv, &Selector::default()).await.unwrap().len(), 499);
        assert!(list(&kv, &Selector::parse("region=ap").unwrap())
            .await
            .unwrap()
            .is_empty());
        js.delete_key_value(&bucket).await.unwrap();
    }

    /// `cargo test -p keywave-coordinator --release -- --ignored list_100k`:
    /// writing and listing 100k credentials takes seconds.
    #[tokio::test]
    #[ignore = "benchmark against the real server"]
    async fn list_100k() {
        let server = keywave_harness::NatsServer::start();
        let client = server.client().await;
        let js = async_nats::jetstream::new(client);
        let bucket = ids::random_id("kwtest-inv");
        let cfg = kv::Config {
            bucket: bucket.clone(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        js.get_or_create_stream(keywave_common::topology::kv_stream_config(&cfg))
            .await
            .unwrap();
        let kv = js.get_key_value(&bucket).await.unwrap();
        let creds: Vec<Credential> = (0..100_000)
            .map(|i| Credential {
                v: SCHEMA_VERSION,
                id: format!("bench-{i:06}"),
                region: ["eu", "us", "ap"][i % 3].into(),
                endpoint: "pg-main".into(),
                kind: TargetKind::Postgres,
                principal: format!("app_{i}"),
                tags: vec!["env=prod".into(), format!("tier={}", i % 3)],
                owner: Some("team".into()),
                consumers: vec!["svc".into()],
            })
            .collect();
        let t = std::time::Instant::now();
        assert_eq!(put_all(&kv, &creds).await.unwrap(), 100_000);
        eprintln!("put_all 100k: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let all = list(&kv, &Selector::default()).await.unwrap();
        eprintln!("list 100k: {:?}", t.elapsed());
        assert_eq!(all.len(), 100_000);
        let t = std::time::Instant::now();
        let eu = list(&kv, &Selector::parse("region=eu").unwrap())
            .await
            .unwrap();
        eprintln!("list 100k filtered: {:?}", t.elapsed());
        assert_eq!(eu.len(), 33_334);
        js.delete_stream(format!("KV_{bucket}")).await.unwrap();
    }
}
