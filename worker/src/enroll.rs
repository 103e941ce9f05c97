//! Bulk enrolment, `keywave-worker enroll --file FILE`: today's secrets of
//! many credentials, one JSON Lines record per credential, each checked at
//! its endpoint as a single `enroll` checks it and stored as CURRENT in the
//! region's secret store.
//!
//! - **Input.** `{"credential": ID, "endpoint": NAME, "principal": LOGIN,
//!   "secret": VALUE}` per line; `endpoint` may be left out when a default
//!   is given (`--endpoint`). Blank lines are skipped; line numbers count
//!   every line. A file that group or others may read or write is refused
//!   ([`open_records`]).
//! - **Secrets.** Each line is read into one buffer allocated once (no
//!   growth, so no stray copies) and wiped as soon as it is parsed, as is
//!   the read buffer in front of it; the secret goes straight from the line
//!   into a [`Secret`]. A secret written with JSON escapes (`\"`, `\\`,
//!   `\u....`) is unescaped by serde_json in a scratch buffer of its own,
//!   which is freed unwiped. Reports and errors name the line number and
//!   the credential id, never a secret, a principal or a parser message
//!   (which may quote the value it could not read).
//! - **Checks.** Per record: the credential id and the principal follow the
//!   inventory's rules; a credential that already has a record in the
//!   store is skipped before its endpoint is touched; the endpoint must
//!   refuse a random wrong secret for the principal
//!   (`target_accepts_any_secret` otherwise); with `verify`, the given
//!   secret must authenticate; then a create-if-absent write
//!   ([`RecordStore::enroll_new`]) stores it, so a record written meanwhile
//!   is skipped, never overwritten, and the same file can be run again
//!   after a failure.
//! - **Concurrency.** At most `concurrency` records are checked and stored
//!   at once, and each endpoint's operations stay under its
//!   `max_concurrency`. Reports come in completion order, each with its
//!   line.

use crate::config::Config;
use crate::notice::Notifier;
use crate::store::{Enrolment, RecordStore, StoreError};
use crate::targets::{AuthCheck, Endpoint, TargetError, Targets};
use async_trait::async_trait;
use futures::StreamExt;
use keywave_common::crypto::Secret;
use keywave_common::ids::{self, IdError};
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use tokio::sync::{mpsc, OnceCell};
use zeroize::{Zeroize, Zeroizing};

/// Records checked and stored at once, unless `--concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Longest record line, in bytes; a longer one fails without being parsed.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Size of the read buffer in front of the line buffer.
const READ_CHUNK: usize = 64 * 1024;

/// Error classes of failed records besides the target's own
/// (`target_unreachable`, `target_auth`, ...).
pub mod class {
    /// The line is not a valid record (JSON, fields, id or principal rules).
    pub const INVALID_RECORD: &str = "invalid_record";
    /// The credential id appeared on an earlier line of the same input.
    pub const DUPLICATE_CREDENTIAL: &str = "duplicate_credential";
    /// The record names an endpoint the configuration does not have.
    pub const UNKNOWN_ENDPOINT: &str = "unknown_endpoint";
    /// The endpoint lets a random wrong secret in for the principal.
    pub const TARGET_ACCEPTS_ANY_SECRET: &str = "target_accepts_any_secret";
    /// The given secret does not authenticate the principal.
    pub const SECRET_REJECTED: &str = "secret_rejected";
    /// The secret store failed.
    pub const STORE: &str = "store";
    /// The input could not be read past this line.
    pub const INPUT: &str = "input";
}

/// Why the records file is refused.
#[derive(Debug, Error)]
pub enum InputError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable or writable by group or others (mode {mode:04o}): it holds secrets; \
         chmod 600 it, or pipe the records in with --file -"
    )]
    Exposed { path: String, mode: u32 },
}

/// Opens the records file at `path`, refusing it when group or others may
/// read or write it (checked on the opened file, not on the name).
pub fn open_records(path: &Path) -> Result<std::fs::File, InputError> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| InputError::Open {
        path: shown.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(|source| InputError::Open {
                path: shown.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(InputError::Exposed {
                path: shown,
                mode: mode & 0o7777,
            });
        }
    }
    Ok(file)
}

/// Standard input, read without the process-wide buffer of
/// [`std::io::stdin`] (which is never wiped): a duplicate of descriptor 0.
#[cfg(unix)]
pub fn stdin_records() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsFd;
    Ok(std::fs::File::from(
        std::io::stdin().as_fd().try_clone_to_owned()?,
    ))
}

/// Standard input.
#[cfg(not(unix))]
pub fn stdin_records() -> std::io::Result<std::io::Stdin> {
    Ok(std::io::stdin())
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Checked and stored as CURRENT.
    Enrolled {
        endpoint: String,
        /// The keyed fingerprint of the secret under the region key.
        fingerprint: String,
    },
    /// The credential already has a record in the store; left as it was.
    Skipped { reason: String },
    /// Nothing was stored.
    Failed {
        error_class: &'static str,
        reason: String,
    },
}

/// The outcome of the record on `line`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub line: usize,
    /// `None` when the line has no valid credential id.
    pub credential: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    fn failed(
        line: usize,
        credential: Option<&str>,
        error_class: &'static str,
        reason: impl Into<String>,
    ) -> Report {
        Report {
            line,
            credential: credential.map(str::to_string),
            outcome: Outcome::Failed {
                error_class,
                reason: reason.into(),
            },
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.credential.as_deref();
        match &self.outcome {
            Outcome::Enrolled {
                endpoint,
                fingerprint,
            } => write!(
                f,
                "line {}: enrolled {} at {endpoint}: fingerprint {fingerprint}",
                self.line,
                id.unwrap_or("-")
            ),
            Outcome::Skipped { reason } => write!(
                f,
                "line {}: skipped {}: {reason}",
                self.line,
                id.unwrap_or("-")
            ),
            Outcome::Failed {
                error_class,
                reason,
            } => match id {
                Some(id) => write!(
                    f,
                    "line {}: failed {id}: {reason} ({error_class})",
                    self.line
                ),
                None => write!(f, "line {}: failed: {reason} ({error_class})", self.line),
            },
        }
    }
}

/// Counts over a whole input.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records read (blank lines are not records).
    pub records: usize,
    pub enrolled: usize,
    pub skipped: usize,
    pub failed: usize,
    pub elapsed_ms: u64,
}

impl Summary {
    fn count(&mut self, r: &Report) {
        self.records += 1;
        match r.outcome {
            Outcome::Enrolled { .. } => self.enrolled += 1,
            Outcome::Skipped { .. } => self.skipped += 1,
            Outcome::Failed { .. } => self.failed += 1,
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records: {} enrolled, {} skipped, {} failed in {:.2} s",
            self.records,
            self.enrolled,
            self.skipped,
            self.failed,
            self.elapsed_ms as f64 / 1000.0
        )
    }
}

/// One parsed record. The secret is wiped when it drops.
pub struct Entry {
    pub line: usize,
    pub credential: String,
    pub endpoint: String,
    pub principal: String,
    secret: Secret,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("line", &self.line)
            .field("credential", &self.credential)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A secret deserialized straight into a [`Secret`].
struct SecretField(Secret);

impl<'de> Deserialize<'de> for SecretField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SecretField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretField, E> {
                // One allocation of the exact size: nothing left behind by growth.
                Ok(SecretField(Secret::new(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    #[serde(default)]
    credential: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    secret: Option<SecretField>,
}

/// An id error without the value it refused (a misplaced field could hold
/// a secret).
fn id_reason(e: &IdError) -> String {
    match e {
        IdError::BadChar { what, .. } => format!(
            "{what} may contain only ASCII letters, digits, '-' and '_', and must start with a letter or digit"
        ),
        other => other.to_string(),
    }
}

/// Parses the record on line `line` (its bytes, without the line break).
/// `default_endpoint` stands for a missing `"endpoint"`.
pub fn parse_record(
    line: usize,
    text: &[u8],
    default_endpoint: Option<&str>,
) -> Result<Entry, Report> {
    let invalid = |credential: Option<&str>, reason: String| {
        Report::failed(line, credential, class::INVALID_RECORD, reason)
    };
    let text = std::str::from_utf8(text).map_err(|_| invalid(None, "not UTF-8".into()))?;
    // serde_json's messages may quote what they could not read: only the
    // category and the column are reported.
    let raw: RawRecord = serde_json::from_str(text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                "not valid JSON"
            }
            serde_json::error::Category::Eof => "incomplete JSON",
            serde_json::error::Category::Data => {
                "not a record of the string fields credential, endpoint, principal and secret"
            }
        };
        invalid(None, format!("{what} (column {})", e.column()))
    })?;
    let Some(credential) = raw.credential else {
        return Err(invalid(None, "no \"credential\"".into()));
    };
    ids::validate("credential id", &credential).map_err(|e| invalid(None, id_reason(&e)))?;
    let id = Some(credential.as_str());
    let Some(principal) = raw.principal else {
        return Err(invalid(id, "no \"principal\"".into()));
    };
    // The rules of an inventory import: what is enrolled must be importable.
    ids::validate_principal(&principal).map_err(|e| invalid(id, id_reason(&e)))?;
    let Some(endpoint) = raw
        .endpoint
        .or_else(|| default_endpoint.map(str::to_string))
    else {
        return Err(invalid(
            id,
            "no \"endpoint\" (and no --endpoint to default to)".into(),
        ));
    };
    let Some(SecretField(secret)) = raw.secret else {
        return Err(invalid(id, "no \"secret\"".into()));
    };
    if secret.expose().is_empty() {
        return Err(invalid(id, "the secret is empty".into()));
    }
    Ok(Entry {
        line,
        credential,
        endpoint,
        principal,
        secret,
    })
}

/// Wipes the used part of `v` and empties it, keeping its allocation.
fn wipe(v: &mut Vec<u8>) {
    v.as_mut_slice().zeroize();
    v.clear();
}

/// Lines of an input, through a read buffer that is wiped on drop.
struct LineReader<R> {
    src: R,
    chunk: Zeroizing<Vec<u8>>,
    pos: usize,
    filled: usize,
    eof: bool,
}

impl<R: Read> LineReader<R> {
    fn new(src: R) -> Self {
        LineReader {
            src,
            chunk: Zeroizing::new(vec![0; READ_CHUNK]),
            pos: 0,
            filled: 0,
            eof: false,
        }
    }

    /// Reads the next line into `line` (wiped first), without its `\n` or
    /// `\r\n`: `Some(true)`, or `Some(false)` when it is longer than
    /// [`MAX_LINE_BYTES`] (then `line` is left empty and the rest of the
    /// line skipped); `None` at the end of the input. `line` must have a
    /// capacity of at least [`MAX_LINE_BYTES`], so that it never grows.
    fn next_line(&mut self, line: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
        wipe(line);
        let mut fits = true;
        let mut read_any = false;
        loop {
            if self.pos == self.filled {
                if self.eof {
                    break;
                }
                self.filled = loop {
                    match self.src.read(&mut self.chunk) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                };
                self.pos = 0;
                if self.filled == 0 {
                    self.eof = true;
                    break;
                }
            }
            read_any = true;
            let avail = &self.chunk[self.pos..self.filled];
            let (take, ends) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            if fits {
                if line.len() + take > MAX_LINE_BYTES {
                    fits = false;
                    wipe(line);
                } else {
                    line.extend_from_slice(&avail[..take]);
                }
            }
            self.pos += take + usize::from(ends);
            if ends {
                break;
            }
        }
        if !read_any {
            return Ok(None);
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(fits))
    }
}

type Parsed = Result<Entry, Report>;

/// Reads and parses `input` line by line into `tx`, on a blocking thread.
/// A credential id seen on an earlier line fails the later record.
fn read_records<R: Read>(input: R, default_endpoint: Option<&str>, tx: &mpsc::Sender<Parsed>) {
    let mut lines = LineReader::new(input);
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_LINE_BYTES));
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut n = 0;
    loop {
        n += 1;
        let item = match lines.next_line(&mut line) {
            Ok(None) => break,
            Ok(Some(false)) => Err(Report::failed(
                n,
                None,
                class::INVALID_RECORD,
                format!("longer than {MAX_LINE_BYTES} bytes"),
            )),
            Ok(Some(true)) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(true)) => parse_record(n, &line, default_endpoint).and_then(|e| {
                match seen.get(&e.credential) {
                    Some(first) => Err(Report::failed(
                        n,
                        Some(&e.credential),
                        class::DUPLICATE_CREDENTIAL,
                        format!("already on line {first}; a credential is enrolled once"),
                    )),
                    None => {
                        seen.insert(e.credential.clone(), n);
                        Ok(e)
                    }
                }
            }),
            Err(e) => {
                let _ = tx.blocking_send(Err(Report::failed(
                    n,
                    None,
                    class::INPUT,
                    format!("reading the records failed here: {e}"),
                )));
                break;
            }
        };
        wipe(&mut line);
        if tx.blocking_send(item).is_err() {
            break;
        }
    }
    wipe(&mut line);
}

/// Where the enroller finds endpoints by name.
#[async_trait]
pub trait Connect: Send + Sync {
    /// The endpoint configured under `name`, connected; `None` when no
    /// endpoint has that name.
    async fn connect(&self, name: &str) -> Option<Result<Endpoint, TargetError>>;
    /// The configured endpoint names, for messages.
    fn names(&self) -> Vec<String>;
}

#[async_trait]
impl Connect for Config {
    async fn connect(&self, name: &str) -> Option<Result<Endpoint, TargetError>> {
        let e = self.endpoint(name)?;
        Some(e.connect().await.map(|target| {
            Endpoint::new(
                &e.name,
                target,
                e.max_concurrency,
                e.max_rotations_per_second,
            )
        }))
    }

    fn names(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.name.clone()).collect()
    }
}

#[async_trait]
impl Connect for Targets {
    async fn connect(&self, name: &str) -> Option<Result<Endpoint, TargetError>> {
        self.get(name).map(Ok)
    }

    fn names(&self) -> Vec<String> {
        Targets::names(self)
    }
}

/// How a bulk enrolment runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Records checked and stored at once (at least 1).
    pub concurrency: usize,
    /// Log in with each given secret before storing it.
    pub verify: bool,
    /// The endpoint of records without `"endpoint"`.
    pub default_endpoint: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: DEFAULT_CONCURRENCY,
            verify: true,
            default_endpoint: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Failure {
    class: &'static str,
    reason: String,
}

impl Failure {
    fn new(class: &'static str, reason: impl Into<String>) -> Failure {
        Failure {
            class,
            reason: reason.into(),
        }
    }

    fn target(doing: &str, e: &TargetError) -> Failure {
        // Drivers redact what a server echoes: the text holds no secret.
        Failure::new(e.class().as_str(), format!("{doing}: {e}"))
    }

    fn store(e: &StoreError) -> Failure {
        Failure::new(class::STORE, e.to_string())
    }
}

const ALREADY_RECORDED: &str = "already has a record in the store; left as it is";

/// Enrols records into one region's store.
pub struct Enroller<'a> {
    store: &'a dyn RecordStore,
    endpoints: &'a dyn Connect,
    notifier: Option<&'a Notifier>,
    connected: Mutex<HashMap<String, Connected>>,
}

/// An endpoint connected once, on first use, or why it could not be.
type Connected = Arc<OnceCell<Result<Endpoint, Failure>>>;

impl<'a> Enroller<'a> {
    /// Enrols into `store`, at the endpoints of `endpoints` (each connected
    /// once, on first use), announcing each enrolled secret with `notifier`
    /// when there is one.
    pub fn new(
        store: &'a dyn RecordStore,
        endpoints: &'a dyn Connect,
        notifier: Option<&'a Notifier>,
    ) -> Self {
        Enroller {
            store,
            endpoints,
            notifier,
            connected: Mutex::new(HashMap::new()),
        }
    }

    /// Enrols every record of `input`, handing each report to `on_report`
    /// as it completes, and returns the counts.
    pub async fn run<R: Read + Send + 'static>(
        &self,
        input: R,
        opts: &Options,
        mut on_report: impl FnMut(&Report),
    ) -> Summary {
        let start = Instant::now();
        let concurrency = opts.concurrency.max(1);
        let (tx, rx) = mpsc::channel::<Parsed>(concurrency * 2);
        let default_endpoint = opts.default_endpoint.clone();
        let reader = tokio::task::spawn_blocking(move || {
            read_records(input, default_endpoint.as_deref(), &tx);
        });
        let parsed = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut reports = std::pin::pin!(parsed
            .map(|item| async move {
                match item {
                    Ok(entry) => self.enrol(entry, opts.verify).await,
                    Err(report) => report,
                }
            })
            .buffer_unordered(concurrency));
        let mut summary = Summary::default();
        while let Some(r) = reports.next().await {
            summary.count(&r);
            on_report(&r);
        }
        if reader.await.is_err() {
            let r = Report::failed(
                summary.records + 1,
                None,
                class::INPUT,
                "the reader of the records stopped unexpectedly",
            );
            summary.count(&r);
            on_report(&r);
        }
        summary.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        summary
    }

    async fn enrol(&self, entry: Entry, verify: bool) -> Report {
        let outcome = match self.try_enrol(&entry, verify).await {
            Ok(o) => o,
            Err(f) => Outcome::Failed {
                error_class: f.class,
                reason: f.reason,
            },
        };
        Report {
            line: entry.line,
            credential: Some(entry.credential.clone()),
            outcome,
        }
    }

    async fn try_enrol(&self, e: &Entry, verify: bool) -> Result<Outcome, Failure> {
        let skipped = || Outcome::Skipped {
            reason: ALREADY_RECORDED.into(),
        };
        // Resumable: what has a record is skipped before its endpoint is touched.
        if self
            .store
            .load(&e.credential)
            .await
            .map_err(|err| Failure::store(&err))?
            .exists
        {
            return Ok(skipped());
        }
        let ep = self.endpoint(&e.endpoint).await?;
        // A login that lets a wrong secret in proves nothing: refuse to enrol it.
        let wrong = keywave_common::crypto::generate(&ep.policy());
        match ep.check(&e.principal, &wrong).await {
            Ok(AuthCheck::Rejected) => {}
            Ok(AuthCheck::Accepted) => {
                return Err(Failure::new(
                    class::TARGET_ACCEPTS_ANY_SECRET,
                    format!(
                    "endpoint {} lets the principal in with a random wrong secret (a Redis user \
                         with nopass, a trust rule in pg_hba.conf, an account without a password): \
                         nothing it answers proves anything, so nothing was stored",
                    ep.name()
                ),
                ))
            }
            Err(err) => {
                return Err(Failure::target(
                    &format!(
                        "checking that endpoint {} refuses a wrong secret",
                        ep.name()
                    ),
                    &err,
                ))
            }
        }
        if verify {
            match ep.check(&e.principal, &e.secret).await {
                Ok(AuthCheck::Accepted) => {}
                Ok(AuthCheck::Rejected) => {
                    return Err(Failure::new(
                        class::SECRET_REJECTED,
                        format!(
                            "the secret does not authenticate the principal at endpoint {}; nothing was stored",
                            ep.name()
                        ),
                    ))
                }
                Err(err) => {
                    return Err(Failure::target(
                        &format!("checking the secret at endpoint {}", ep.name()),
                        &err,
                    ))
                }
            }
        }
        match self
            .store
            .enroll_new(&e.credential, e.secret.clone())
            .await
            .map_err(|err| Failure::store(&err))?
        {
            Enrolment::Stored => {}
            Enrolment::Exists => return Ok(skipped()),
        }
        if let Some(n) = self.notifier {
            // Advisory, as after a rotation: a lost notice is logged, the
            // enrolment stands.
            n.announce(&e.credential, &e.secret, None).await;
        }
        Ok(Outcome::Enrolled {
            endpoint: ep.name().to_string(),
            fingerprint: self.store.fingerprint(&e.secret),
        })
    }

    /// The endpoint `name`, connected on first use; a failure to connect
    /// fails every record of the endpoint (run the input again later).
    async fn endpoint(&self, name: &str) -> Result<Endpoint, Failure> {
        let cell = self
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            match self.endpoints.connect(name).await {
                Some(Ok(ep)) => Ok(ep),
                Some(Err(e)) => Err(Failure::target(
                    &format!("connecting to endpoint {name}"),
                    &e,
                )),
                // Not echoed: a misplaced field could hold a secret.
                None => Err(Failure::new(
                    class::UNKNOWN_ENDPOINT,
                    format!(
                        "its endpoint is not in the configuration (configured: {})",
                        self.endpoints.names().join(", ")
                    ),
                )),
            }
        })
        .await
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::targets::sim::{SimOptions, SimTarget};
    use keywave_common::crypto::RegionKey;

    fn s(v: &str) -> Secret {
        Secret::new(v.into())
    }

    fn line(v: serde_json::Value) -> String {
        v.to_string()
    }

    #[test]
    fn parses_records_and_refuses_bad_ones_without_echoing() {
        let e = parse_record(
            7,
            br#"{"credential":"db-1","endpoint":"sim-a","principal":"app_1","secret":"s3cr\"et"}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            (e.line, e.credential.as_str(), e.endpoint.as_str()),
            (7, "db-1", "sim-a")
        );
        assert_eq!(e.secret.expose(), "s3cr\"et");
        assert!(!format!("{e:?}").contains("s3cr"));

        // The endpoint defaults only when the record has none.
        let e = parse_record(
            1,
            br#"{"credential":"db-1","principal":"p","secret":"x"}"#,
            Some("dflt"),
        )
        .unwrap();
        assert_eq!(e.endpoint, "dflt");
        let e = parse_record(
            1,
            br#"{"credential":"db-1","endpoint":"own","principal":"p","secret":"x"}"#,
            Some("dflt"),
        )
        .unwrap();
        assert_eq!(e.endpoint, "own");

        let secret = "hunter2-SECRET";
        for (text, id, want) in [
            (
                line(serde_json::json!({"credential": "db-1", "principal": "p", "secret": secret})),
                Some("db-1"),
                "no \"endpoint\"",
            ),
            (
                line(serde_json::json!({"credential": "db-1", "endpoint": "e", "secret": secret})),
                Some("db-1"),
                "no \"principal\"",
            ),
            (
                line(serde_json::json!({"credential": "db-1", "endpoint": "e", "principal": "p"})),
                Some("db-1"),
                "no \"secret\"",
            ),
            (
                line(
                    serde_json::json!({"credential": "db-1", "endpoint": "e", "principal": "p", "secret": ""}),
                ),
                Some("db-1"),
                "empty",
            ),
            (
                line(
                    serde_json::json!({"credential": "db-1", "endpoint": "e", "principal": "bad\tp", "secret": secret}),
                ),
                Some("db-1"),
                "control",
            ),
            (
                line(
                    serde_json::json!({"credential": "db-1", "endpoint": "e", "principal": "p\u{202E}x", "secret": secret}),
                ),
                Some("db-1"),
                "invisible",
            ),
            // A secret in the id's place is not quoted back.
            (
                line(
                    serde_json::json!({"credential": secret.to_string() + "!", "endpoint": "e", "principal": "p", "secret": "x"}),
                ),
                None,
                "credential id may contain only",
            ),
            (
                line(serde_json::json!({"endpoint": "e", "principal": "p", "secret": secret})),
                None,
                "no \"credential\"",
            ),
            (
                line(serde_json::json!({"credential": "db-1", "secret": secret, "extra": secret})),
                None,
                "not a record",
            ),
            (
                line(
                    serde_json::json!({"credential": "db-1", "endpoint": "e", "principal": "p", "secret": 1234567}),
                ),
                None,
                "not a record",
            ),
            (line(serde_json::json!(secret)), None, "not a record"),
            (
                format!("{{\"credential\":\"db-1\",\"secret\":\"{secret}"),
                None,
                "JSON",
            ),
            (format!("{{\"secret\":{secret}}}"), None, "not valid JSON"),
        ] {
            let r = parse_record(3, text.as_bytes(), None).unwrap_err();
            assert_eq!(r.line, 3);
            assert_eq!(r.credential.as_deref(), id, "{text}");
            let Outcome::Failed {
                error_class,
                reason,
            } = &r.outcome
            else {
                panic!("{r:?}")
            };
            assert_eq!(*error_class, class::INVALID_RECORD);
            assert!(reason.contains(want), "{text}: {reason}");
            let shown = format!("{r} {}", serde_json::to_string(&r).unwrap());
            assert!(
                !shown.contains("hunter2") && !shown.contains("1234567"),
                "{shown}"
            );
        }
        let r = parse_record(1, b"\xff\xfe", None).unwrap_err();
        assert!(r.to_string().contains("not UTF-8"), "{r}");
    }

    #[test]
    fn lines_are_split_bounded_and_wiped() {
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let input = format!("a\r\n\nb\n{long}\nc");
        let mut r = LineReader::new(input.as_bytes());
        let mut line = Vec::with_capacity(MAX_LINE_BYTES);
        let mut got = Vec::new();
        while let Some(fits) = r.next_line(&mut line).unwrap() {
            got.push((fits, String::from_utf8(line.clone()).unwrap()));
        }
        assert_eq!(
            got,
            [
                (true, "a".to_string()),
                (true, String::new()),
                (true, "b".into()),
                (false, String::new()),
                (true, "c".into())
            ]
        );
        assert_eq!(
            line.capacity(),
            MAX_LINE_BYTES,
            "the line buffer never grew"
        );
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(b"secret");
        wipe(&mut v);
        assert!(v.is_empty() && v.capacity() == 16);
    }

    fn records(n: usize, principal: impl Fn(usize) -> String) -> String {
        (0..n)
            .map(|i| {
                line(serde_json::json!({
                    "credential": format!("c-{i}"),
                    "principal": principal(i),
                    "secret": format!("secret-{i}"),
                })) + "\n"
            })
            .collect()
    }

    #[tokio::test]
    async fn enrols_skips_on_rerun_and_fails_only_bad_records() {
        let store = MemoryStore::new("mem", RegionKey::generate());
        let sim = SimTarget::new(SimOptions::default());
        for i in 0..50 {
            sim.seed(&format!("app_{i}"), &s(&format!("secret-{i}")));
        }
        let mut targets = Targets::new();
        targets.insert("sim-a", sim.clone(), 4);
        let opts = Options {
            concurrency: 8,
            verify: true,
            default_endpoint: Some("sim-a".into()),
        };
        let enroller = Enroller::new(&store, &targets, None);
        let mut input = records(50, |i| format!("app_{i}"));
        input.push_str("\n   \n");
        // Line 53: a login the target does not know that secret for.
        input.push_str(&line(
            serde_json::json!({"credential": "c-x", "principal": "app_x", "secret": "nope-secret"}),
        ));
        input.push('\n');
        // Line 54: the same credential again.
        input.push_str(&line(
            serde_json::json!({"credential": "c-1", "principal": "app_1", "secret": "secret-1"}),
        ));
        input.push('\n');
        // Line 55: an endpoint that is not configured.
        input.push_str(&line(serde_json::json!({"credential": "c-y", "endpoint": "nowhere", "principal": "p", "secret": "x"})));
        let mut reports = Vec::new();
        let sum = enroller
            .run(std::io::Cursor::new(input.clone()), &opts, |r| {
                reports.push(r.clone())
            })
            .await;
        assert_eq!(
            (sum.records, sum.enrolled, sum.skipped, sum.failed),
            (53, 50, 0, 3),
            "{reports:#?}"
        );
        let failed: HashMap<usize, (&str, Option<&str>)> = reports
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Failed { error_class, .. } => {
                    Some((r.line, (*error_class, r.credential.as_deref())))
                }
                _ => None,
            })
            .collect();
        assert_eq!(failed[&53], (class::SECRET_REJECTED, Some("c-x")));
        assert_eq!(failed[&54], (class::DUPLICATE_CREDENTIAL, Some("c-1")));
        assert_eq!(failed[&55], (class::UNKNOWN_ENDPOINT, Some("c-y")));
        let c7 = store.get("c-7").await.unwrap().unwrap().current.unwrap();
        assert_eq!(c7.secret, s("secret-7"));
        assert_eq!(sim.set_count("app_7"), 0, "enrolment sets nothing");

        // Again: every stored credential is skipped, nothing is written.
        let rev = store.revision();
        let sum = enroller
            .run(std::io::Cursor::new(input), &opts, |_| {})
            .await;
        assert_eq!((sum.enrolled, sum.skipped, sum.failed), (0, 50, 3));
        assert_eq!(store.revision(), rev);
    }

    #[tokio::test]
    async fn open_logins_are_refused_and_verify_is_optional() {
        /// A target that lets `open` in with anything.
        struct Open(Arc<SimTarget>);
        #[async_trait]
        impl crate::targets::Target for Open {
            fn kind(&self) -> keywave_common::wire::TargetKind {
                self.0.kind()
            }
            fn policy(&self) -> keywave_common::crypto::SecretPolicy {
                self.0.policy()
            }
            async fn add(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
                self.0.add(p, s).await
            }
            async fn replace(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
                self.0.replace(p, s).await
            }
            async fn remove(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
                self.0.remove(p, s).await
            }
            async fn check(&self, p: &str, s: &Secret) -> Result<AuthCheck, TargetError> {
                if p == "open" {
                    return Ok(AuthCheck::Accepted);
                }
                self.0.check(p, s).await
            }
        }
        let store = MemoryStore::new("mem", RegionKey::generate());
        let mut targets = Targets::new();
        targets.insert(
            "t",
            Arc::new(Open(SimTarget::new(SimOptions::default()))),
            2,
        );
        let input = [
            line(serde_json::json!({"credential": "a", "endpoint": "t", "principal": "open", "secret": "x"})),
            line(serde_json::json!({"credential": "b", "endpoint": "t", "principal": "closed", "secret": "unknown-to-the-target"})),
        ]
        .join("\n");
        let enroller = Enroller::new(&store, &targets, None);
        for verify in [true, false] {
            let mut got = HashMap::new();
            let opts = Options {
                verify,
                ..Options::default()
            };
            enroller
                .run(std::io::Cursor::new(input.clone()), &opts, |r| {
                    got.insert(r.credential.clone().unwrap(), r.outcome.clone());
                })
                .await;
            assert!(
                matches!(got["a"], Outcome::Failed { error_class, .. } if error_class == class::TARGET_ACCEPTS_ANY_SECRET),
                "verify={verify}: {got:?}"
            );
            let b = &got["b"];
            if verify {
                assert!(
                    matches!(b, Outcome::Failed { error_class, .. } if *error_class == class::SECRET_REJECTED),
                    "{b:?}"
                );
            } else {
                assert!(matches!(b, Outcome::Enrolled { .. }), "{b:?}");
            }
        }
        assert!(store.get("a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_store_that_is_down_fails_records_without_storing() {
        let store = MemoryStore::new("mem", RegionKey::generate());
        store.set_unavailable(true);
        let mut targets = Targets::new();
        targets.insert("t", SimTarget::new(SimOptions::default()), 2);
        let opts = Options {
            verify: false,
            default_endpoint: Some("t".into()),
            ..Options::default()
        };
        let mut reports = Vec::new();
        let sum = Enroller::new(&store, &targets, None)
            .run(
                std::io::Cursor::new(records(3, |i| format!("p{i}"))),
                &opts,
                |r| reports.push(r.to_string()),
            )
            .await;
        assert_eq!((sum.records, sum.failed), (3, 3));
        assert!(reports.iter().all(|r| r.contains("(store)")), "{reports:?}");
    }

    #[cfg(unix)]
    #[test]
    fn exposed_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("records.jsonl");
        std::fs::write(&p, "").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = open_records(&p);
            assert_eq!(r.is_ok(), ok, "{mode:o}");
            if !ok {
                let msg = r.unwrap_err().to_string();
                assert!(
                    msg.contains(&format!("{mode:04o}")) && msg.contains("chmod 600"),
                    "{msg}"
                );
            }
        }
        assert!(matches!(
            open_records(&dir.path().join("missing")),
            Err(InputError::Open { .. })
        ));
    }
}
