//! `keywave campaign report`: one campaign's evidence, as JSON, Markdown or
//! self-contained HTML. It reads the status (`campaign.status`), the
//! campaign's events (`KEYWAVE_EVENTS`), the head of its audit hash chain
//! (`KEYWAVE_AUDIT`), the detection intake's claims for containment started
//! by a detection (time to contain, [`crate::containment`]) and every
//! result on `keywave.result.*.<campaign>` (`KEYWAVE_RESULTS`), read once
//! with an ordered consumer.
//!
//! Memory stays bounded however large the campaign: JSON rows are written
//! as they are read; Markdown and HTML keep the first `max_rows` rows and at
//! most [`MAX_FAILURE_ROWS`] further failures, and say what they left out.
//! Duplicates (redelivered tasks) are recognised with one bit per planned
//! task, as the coordinator's books do.
//!
//! Everything from the bus (credential ids, reasons, errors, names) is
//! escaped for the output format ([`html_escape`], [`md_cell`]). Results
//! carry fingerprints, never secrets, and so does the report.

use crate::context::{self, CommandError, ReportError};
use async_nats::jetstream::{
    consumer::{pull, DeliverPolicy},
    Context,
};
use futures::StreamExt;
use keywave_common::client::ApiClient;
use keywave_common::{
    api::CampaignStatus,
    codec, now_ms, subjects, topology,
    wire::{CampaignEvent, EventKind, Outcome, RotationResult, Step, TaskAction},
};
use keywave_coordinator::engine::book::BitSet;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;
use topology::StreamReadError;

/// Longest wait for the next message of a stream before the read gives up.
const READ_IDLE: Duration = Duration::from_secs(10);

/// Failures listed in Markdown and HTML beyond the first `max_rows` rows.
pub const MAX_FAILURE_ROWS: usize = 10_000;
/// Results that match no planned task, listed in Markdown and HTML.
pub const MAX_IGNORED_ROWS: usize = 100;
/// Longest error text kept per row.
const MAX_ERROR_CHARS: usize = 240;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Markdown,
    Html,
}

impl std::str::FromStr for Format {
    type Err = keywave_common::wire::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::Json),
            "markdown" | "md" => Ok(Format::Markdown),
            "html" => Ok(Format::Html),
            other => Err(keywave_common::wire::UnknownName::new(
                "format",
                other,
                "json, markdown or html",
            )),
        }
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Makes text safe for one Markdown table cell: no line breaks, no column
/// separator, no inline HTML, no code spans or emphasis from the input.
pub fn md_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            // Enough to stop code spans, emphasis and links; `_` inside
            // words (wave names, classes) is left readable.
            '`' | '*' | '[' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn utc(ms: u64) -> String {
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn secs(ms: u64) -> String {
    format!("{:.3}s", ms as f64 / 1000.0)
}

/// One decision or state change of the campaign, from its events.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    pub at_ms: u64,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    pub text: String,
}

/// The head of the campaign's audit hash chain.
#[derive(Debug, Clone, Serialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    pub verify_with: String,
}

/// A mapping of this report's evidence to a control.
#[derive(Debug, Clone, Serialize)]
pub struct ControlEvidence {
    pub framework: &'static str,
    pub control: &'static str,
    pub evidence: String,
}

/// Everything but the per-credential rows.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub report: &'static str,
    pub keywave_version: &'static str,
    pub generated_at_ms: u64,
    pub status: CampaignStatus,
    /// Planned wave sizes.
    pub wave_sizes: Vec<u64>,
    /// Failures by class over every wave.
    pub failures_by_class: BTreeMap<String, u64>,
    pub decisions: Vec<Decided>,
    /// `None`: no audit chain for this campaign (no coordinator wrote one).
    pub audit: Option<AuditHead>,
    /// Time to contain, for a containment campaign started by detections.
    pub containment: Option<crate::containment::ContainmentReport>,
    pub disclaimer: &'static str,
}

/// One result of the campaign.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub credential_id: String,
    pub region: String,
    pub wave: u32,
    pub index: u32,
    /// `rotate` or `rollback`.
    pub action: &'static str,
    pub outcome: &'static str,
    pub step: &'static str,
    /// The new secret authenticated at the target (rotations).
    pub new_secret_verified: bool,
    /// `true` rejected, `false` still accepted, `None` not checked.
    pub old_secret_rejected: Option<bool>,
    /// Per-consumer verification: `"not tracked"` when the result has none.
    pub consumers: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_contain_ms: Option<u64>,
    pub finished_at_ms: u64,
    pub worker_id: String,
    /// `false` for a result that matches no planned task (wrong wave or
    /// index): listed, never counted.
    pub counted: bool,
}

impl Row {
    fn failed(&self) -> bool {
        matches!(self.outcome, "failed")
    }
}

/// Totals over the rows.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub results_read: u64,
    pub rotations: u64,
    pub rotations_succeeded: u64,
    pub rotations_failed: u64,
    pub new_secret_verified: u64,
    pub old_secret_rejected: u64,
    pub old_secret_not_checked: u64,
    pub old_secret_still_accepted: u64,
    pub rollbacks: u64,
    pub rolled_back: u64,
    /// Second results for a task already counted (redeliveries).
    pub duplicates: u64,
    /// Results that match no planned task.
    pub unplanned: u64,
    /// Consumers proven on the new secret / not proven, over all rows.
    pub consumers_verified: u64,
    pub consumers_not_verified: u64,
    /// Markdown / HTML only: rows left out of the table.
    pub rows_left_out: u64,
}

/// Wording of every report: what the control mapping is and is not.
pub const DISCLAIMER: &str = "This report is evidence that supports the controls listed; it is \
not a certification, an attestation of compliance or an audit opinion.";

fn controls(h: &Header, s: &Summary) -> Vec<ControlEvidence> {
    let st = &h.status;
    let strategy = st.spec.strategy;
    let audit = match &h.audit {
        Some(a) => format!(
            "the decisions are records of a tamper-evident hash chain (head #{} {})",
            a.seq, a.hash
        ),
        None => "no audit hash chain was found for this campaign".to_string(),
    };
    let ttc = h
        .containment
        .as_ref()
        .filter(|c| c.time_to_contain.count > 0)
        .map(|c| {
            format!(
                "; time from detection to old secret rejected: p50 {}, max {}",
                secs(c.time_to_contain.p50_ms),
                secs(c.time_to_contain.max_ms)
            )
        })
        .unwrap_or_default();
    vec![
        ControlEvidence {
            framework: "OWASP Non-Human Identities Top 10 (2025)",
            control: "NHI2 Secret Leakage; NHI7 Long-Lived Secrets (rotation)",
            evidence: format!(
                "{} of {} selected credentials rotated ({strategy}); {} old secrets proven rejected by the target after rotation{ttc}",
                s.rotations_succeeded, st.total, s.old_secret_rejected
            ),
        },
        ControlEvidence {
            framework: "NIST Cybersecurity Framework 2.0",
            control: "PR.AA (Identity Management, Authentication, and Access Control), PR.AA-01",
            evidence: format!(
                "service credentials are managed from an inventory and replaced in waves with a failure budget of {:.1}%; {} new secrets verified to authenticate; {audit}",
                st.spec.failure_budget * 100.0,
                s.new_secret_verified
            ),
        },
        ControlEvidence {
            framework: "NIST SP 800-207 (Zero Trust Architecture)",
            control: "Tenet: authentication and authorization are dynamic and strictly enforced (continuous re-evaluation of trust)",
            evidence: format!(
                "trust in the previous secrets was withdrawn and re-established with new ones, checked at each target: {} rejected, {} not checked, {} still accepted",
                s.old_secret_rejected, s.old_secret_not_checked, s.old_secret_still_accepted
            ),
        },
    ]
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::RollbackRefused => "rollback_refused",
    }
}

fn new_secret_verified(r: &RotationResult) -> bool {
    r.action == TaskAction::Rotate
        && (r.outcome == Outcome::Succeeded
            || matches!(
                r.step,
                Step::Tested | Step::Promoted | Step::Revoked | Step::Verified
            ))
}

/// Turns one result into a row (the consumers come from the result when it
/// carries them).
pub fn row(r: &RotationResult, ttc: Option<u64>, counted: bool) -> Row {
    let consumers = serde_json::to_value(r)
        .ok()
        .and_then(|mut v| v.get_mut("consumers").map(serde_json::Value::take))
        .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()))
        .unwrap_or_else(|| serde_json::Value::String("not tracked".into()));
    Row {
        credential_id: r.credential_id.clone(),
        region: r.region.clone(),
        wave: r.wave,
        index: r.index,
        action: match r.action {
            TaskAction::Rotate => "rotate",
            TaskAction::Rollback => "rollback",
        },
        outcome: outcome_str(r.outcome),
        step: r.step.as_str(),
        new_secret_verified: new_secret_verified(r),
        old_secret_rejected: if r.action == TaskAction::Rotate {
            r.old_rejected
        } else {
            None
        },
        consumers,
        error_class: r.error_class.map(|c| c.as_str()),
        error: r
            .error
            .as_deref()
            .map(|e| e.chars().take(MAX_ERROR_CHARS).collect()),
        new_fingerprint: r.new_fingerprint.clone(),
        old_fingerprint: r.old_fingerprint.clone(),
        time_to_contain_ms: ttc,
        finished_at_ms: r.finished_at_ms,
        worker_id: r.worker_id.clone(),
        counted,
    }
}

/// Counts rows into a summary and recognises duplicates.
pub struct Tally {
    seen: Vec<BitSet>,
    rolled: Vec<BitSet>,
    pub summary: Summary,
}

impl Tally {
    pub fn new(wave_sizes: &[u64]) -> Self {
        Tally {
            seen: wave_sizes.iter().map(|&n| BitSet::new(n)).collect(),
            rolled: wave_sizes.iter().map(|&n| BitSet::new(n)).collect(),
            summary: Summary::default(),
        }
    }

    /// `Some(counted)` for a row to emit; `None` for a duplicate.
    pub fn add(&mut self, r: &RotationResult) -> Option<bool> {
        let s = &mut self.summary;
        s.results_read += 1;
        let bits = match r.action {
            TaskAction::Rotate => &mut self.seen,
            TaskAction::Rollback => &mut self.rolled,
        };
        let Some(set) = bits.get_mut(r.wave as usize) else {
            s.unplanned += 1;
            return Some(false);
        };
        if u64::from(r.index) >= set.len() {
            s.unplanned += 1;
            return Some(false);
        }
        if !set.insert(u64::from(r.index)) {
            s.duplicates += 1;
            return None;
        }
        match r.action {
            TaskAction::Rotate => {
                s.rotations += 1;
                if r.outcome == Outcome::Succeeded {
                    s.rotations_succeeded += 1;
                } else {
                    s.rotations_failed += 1;
                }
                if new_secret_verified(r) {
                    s.new_secret_verified += 1;
                }
                match r.old_rejected {
                    Some(true) => s.old_secret_rejected += 1,
                    Some(false) => s.old_secret_still_accepted += 1,
                    None if r.outcome == Outcome::Succeeded => s.old_secret_not_checked += 1,
                    None => {}
                }
            }
            TaskAction::Rollback => {
                s.rollbacks += 1;
                if r.outcome == Outcome::RolledBack {
                    s.rolled_back += 1;
                }
            }
        }
        Some(true)
    }

    fn consumers(&mut self, row: &Row) {
        if let Some(list) = row.consumers.as_array() {
            for c in list {
                if c.get("status").and_then(|v| v.as_str()) == Some("verified") {
                    self.summary.consumers_verified += 1;
                } else {
                    self.summary.consumers_not_verified += 1;
                }
            }
        }
    }
}

/// The campaign's events, oldest first (a campaign has few).
async fn read_events(js: &Context, cid: &str) -> Result<Vec<CampaignEvent>, ReportError> {
    let mut out = Vec::new();
    read_ordered(
        js,
        topology::STREAM_EVENTS,
        subjects::event_campaign_filter(cid),
        |source| ReportError::Events {
            campaign: cid.to_string(),
            source,
        },
        |m| {
            if let Ok(e) = codec::decode::<CampaignEvent>(m.headers.as_ref(), &m.payload) {
                out.push(e);
            }
            Ok(())
        },
    )
    .await?;
    Ok(out)
}

/// Reads every message of `stream` on `filter` present now, in order, with
/// an ordered consumer; `each` sees them one at a time and stops the read
/// with its error. A failed read becomes an error through `read_failed`.
async fn read_ordered<E>(
    js: &Context,
    stream: &'static str,
    filter: String,
    read_failed: impl Fn(StreamReadError) -> E,
    mut each: impl FnMut(&async_nats::jetstream::Message) -> Result<(), E>,
) -> Result<(), E> {
    let name = stream;
    let stream = js.get_stream(name).await.map_err(|source| {
        read_failed(StreamReadError::Open {
            stream: name,
            source,
        })
    })?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|source| {
            read_failed(StreamReadError::Consumer {
                stream: name,
                source,
            })
        })?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer.messages().await.map_err(|source| {
        read_failed(StreamReadError::Messages {
            stream: name,
            source,
        })
    })?;
    loop {
        let next = tokio::time::timeout(READ_IDLE, messages.next())
            .await
            .map_err(|_| {
                read_failed(StreamReadError::Stalled {
                    stream: name,
                    idle: READ_IDLE,
                })
            })?;
        let Some(m) = next else { break };
        let m = m.map_err(|source| {
            read_failed(StreamReadError::Next {
                stream: name,
                source,
            })
        })?;
        let pending = m
            .info()
            .map_err(|source| {
                read_failed(StreamReadError::Info {
                    stream: name,
                    source,
                })
            })?
            .pending;
        each(&m)?;
        if pending == 0 {
            break;
        }
    }
    Ok(())
}

/// The last record of the campaign's audit chain, if it has one.
async fn audit_head(js: &Context, cid: &str) -> Option<AuditHead> {
    let stream = js.get_stream(topology::STREAM_AUDIT).await.ok()?;
    let m = stream
        .get_last_raw_message_by_subject(&subjects::audit(cid))
        .await
        .ok()?;
    let (link, _) = keywave_common::audit::open(&m.payload).ok()?;
    Some(AuditHead {
        seq: link.seq,
        hash: link.hash,
        verify_with: format!("keywave audit verify --campaign {cid}"),
    })
}

fn decisions(events: &[CampaignEvent]) -> Vec<Decided> {
    events
        .iter()
        .filter(|e| {
            !matches!(
                e.kind,
                EventKind::WaveStarted { .. } | EventKind::DeadLetter { .. }
            )
        })
        .map(|e| Decided {
            at_ms: e.at_ms,
            kind: e.kind.name(),
            wave: match &e.kind {
                EventKind::WaveFinished { wave, .. }
                | EventKind::Decision { wave, .. }
                | EventKind::RollbackStarted { wave, .. }
                | EventKind::RollbackRefused { wave, .. }
                | EventKind::RollbackFinished { wave, .. }
                | EventKind::ApprovalRequired { wave, .. }
                | EventKind::Approved { wave, .. }
                | EventKind::Preflight { wave, .. } => Some(*wave),
                _ => None,
            },
            text: crate::watch::describe(&e.kind),
        })
        .collect()
}

/// Reads the header's sources.
async fn header(js: &Context, api: &ApiClient, cid: &str) -> Result<Header, CommandError> {
    let status = api.status(cid).await?;
    let events = read_events(js, cid).await?;
    let mut failures_by_class = BTreeMap::new();
    for w in &status.waves {
        for (class, n) in &w.failures {
            *failures_by_class.entry(class.clone()).or_default() += *n;
        }
    }
    let containment = match js
        .get_key_value(keywave_coordinator::detect::store::KV_DETECTIONS)
        .await
    {
        Ok(kv) => match kv
            .get(keywave_coordinator::detect::store::intent_key(cid))
            .await
        {
            Ok(Some(_)) => crate::containment::build(js, api, &kv, cid).await.ok(),
            _ => None,
        },
        Err(_) => None,
    };
    Ok(Header {
        report: "keywave campaign report",
        keywave_version: env!("CARGO_PKG_VERSION"),
        generated_at_ms: now_ms(),
        wave_sizes: status.waves.iter().map(|w| w.size).collect(),
        failures_by_class,
        decisions: decisions(&events),
        audit: audit_head(js, cid).await,
        containment,
        status,
        disclaimer: DISCLAIMER,
    })
}

/// What the report command did (the `--json` line when writing to a file).
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub ok: bool,
    pub campaign_id: String,
    pub format: &'static str,
    pub output: Option<String>,
    pub summary: Summary,
}

/// Builds the report of `cid` and writes it to `out`.
pub async fn write(
    js: &Context,
    api: &ApiClient,
    cid: &str,
    format: Format,
    max_rows: usize,
    out: &mut dyn Write,
) -> Result<Summary, CommandError> {
    let h = header(js, api, cid).await?;
    let ttc: HashMap<String, u64> = h
        .containment
        .as_ref()
        .map(|c| {
            c.timelines
                .iter()
                .filter_map(|t| t.time_to_contain_ms.map(|v| (t.credential_id.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let io = |e: std::io::Error| CommandError::from(ReportError::Write(e));
    let results_failed = |source| ReportError::Results {
        campaign: cid.to_string(),
        source,
    };
    let mut tally = Tally::new(&h.wave_sizes);
    let filter = subjects::result_campaign_filter(cid);
    match format {
        Format::Json => {
            let head = serde_json::to_string(&h).map_err(ReportError::Encode)?;
            // `{...header...` then the rows, then the summary: one line.
            out.write_all(&head.as_bytes()[..head.len() - 1])
                .map_err(io)?;
            out.write_all(b",\"credentials\":[").map_err(io)?;
            let mut first = true;
            read_ordered(js, topology::STREAM_RESULTS, filter, results_failed, |m| {
                let Ok(r) = codec::decode::<RotationResult>(m.headers.as_ref(), &m.payload) else {
                    return Ok(());
                };
                let Some(counted) = tally.add(&r) else {
                    return Ok(());
                };
                let row = row(&r, ttc.get(&r.credential_id).copied(), counted);
                tally.consumers(&row);
                let line = serde_json::to_string(&row).map_err(ReportError::Encode)?;
                let sep: &[u8] = if first { b"" } else { b"," };
                first = false;
                out.write_all(sep)
                    .and_then(|_| out.write_all(line.as_bytes()))
                    .map_err(ReportError::Write)
            })
            .await?;
            let summary = tally.summary.clone();
            let controls = controls(&h, &summary);
            let tail = serde_json::to_string(&serde_json::json!({
                "summary": summary,
                "controls": controls,
            }))
            .map_err(ReportError::Encode)?;
            out.write_all(b"],").map_err(io)?;
            out.write_all(&tail.as_bytes()[1..]).map_err(io)?;
            out.write_all(b"\n").map_err(io)?;
            out.flush().map_err(io)?;
            Ok(summary)
        }
        Format::Markdown | Format::Html => {
            let mut shown = Vec::new();
            let mut failures = Vec::new();
            let mut unplanned = Vec::new();
            let mut left_out = 0u64;
            read_ordered(js, topology::STREAM_RESULTS, filter, results_failed, |m| {
                let Ok(r) = codec::decode::<RotationResult>(m.headers.as_ref(), &m.payload) else {
                    return Ok(());
                };
                let Some(counted) = tally.add(&r) else {
                    return Ok(());
                };
                let row = row(&r, ttc.get(&r.credential_id).copied(), counted);
                tally.consumers(&row);
                if !counted {
                    if unplanned.len() < MAX_IGNORED_ROWS {
                        unplanned.push(row);
                    }
                } else if shown.len() < max_rows {
                    shown.push(row);
                } else if row.failed() && failures.len() < MAX_FAILURE_ROWS {
                    failures.push(row);
                } else {
                    left_out += 1;
                }
                Ok(())
            })
            .await?;
            tally.summary.rows_left_out = left_out;
            let summary = tally.summary.clone();
            let doc = Doc {
                h: &h,
                s: &summary,
                shown: &shown,
                failures: &failures,
                unplanned: &unplanned,
                max_rows,
            };
            let text = if format == Format::Markdown {
                doc.markdown()
            } else {
                doc.html()
            };
            out.write_all(text.as_bytes()).map_err(io)?;
            out.flush().map_err(io)?;
            Ok(summary)
        }
    }
}

/// A report to render for people.
pub struct Doc<'a> {
    pub h: &'a Header,
    pub s: &'a Summary,
    pub shown: &'a [Row],
    pub failures: &'a [Row],
    pub unplanned: &'a [Row],
    pub max_rows: usize,
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "not checked",
    }
}

fn consumers_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(list) => list
            .iter()
            .map(|c| {
                // When it moved over: seconds after the wait began (the
                // promote, for continuity).
                let after = c
                    .get("after_ms")
                    .and_then(|v| v.as_u64())
                    .map(|ms| format!(" after {:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_default();
                format!(
                    "{}: {}{after}",
                    c.get("id").and_then(|v| v.as_str()).unwrap_or("?"),
                    c.get("status").and_then(|v| v.as_str()).unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn short_fp(fp: &Option<String>) -> String {
    fp.as_deref()
        .map(|f| f.chars().take(20).collect())
        .unwrap_or_else(|| "-".into())
}

fn detail(r: &Row) -> String {
    match (&r.error_class, &r.error) {
        (Some(c), Some(e)) => format!("{c}: {e}"),
        (Some(c), None) => c.to_string(),
        (None, Some(e)) => e.clone(),
        (None, None) => String::new(),
    }
}

/// The cells of a credential row (unescaped).
fn cells(r: &Row) -> [String; 9] {
    [
        r.credential_id.clone(),
        r.region.clone(),
        r.wave.to_string(),
        format!("{} {}", r.action, r.outcome),
        if r.action == "rotate" {
            if r.new_secret_verified { "yes" } else { "no" }.into()
        } else {
            "-".into()
        },
        if r.action == "rotate" {
            yes_no(r.old_secret_rejected).into()
        } else {
            "-".into()
        },
        consumers_text(&r.consumers),
        r.time_to_contain_ms.map(secs).unwrap_or_else(|| "-".into()),
        format!("{} {}", short_fp(&r.new_fingerprint), detail(r)),
    ]
}

const COLUMNS: [&str; 9] = [
    "credential",
    "region",
    "wave",
    "outcome",
    "new secret verified",
    "old secret rejected",
    "consumers",
    "time to contain",
    "new fingerprint / detail",
];

impl Doc<'_> {
    fn wave_rows(&self) -> Vec<[String; 8]> {
        self.h
            .status
            .waves
            .iter()
            .map(|w| {
                let mut approval = String::new();
                if let Some(by) = &w.approved_by {
                    approval = format!("approved by {by}");
                } else if w.approval_required {
                    approval = "needs approval".into();
                }
                [
                    w.wave.to_string(),
                    w.size.to_string(),
                    w.succeeded.to_string(),
                    (w.failed + w.no_result).to_string(),
                    if w.rollback_tasks > 0 {
                        format!(
                            "{} restored / {} refused / {} failed",
                            w.rolled_back, w.rollback_refused, w.rollback_failed
                        )
                    } else {
                        "-".into()
                    },
                    approval,
                    w.decision.map(|d| d.as_str()).unwrap_or("-").to_string(),
                    w.reason.clone().unwrap_or_default(),
                ]
            })
            .collect()
    }

    fn facts(&self) -> Vec<(&'static str, String)> {
        let st = &self.h.status;
        let spec = &st.spec;
        let mut v = vec![
            ("Campaign", st.campaign_id.clone()),
            (
                "Name",
                if spec.name.is_empty() {
                    "-".into()
                } else {
                    spec.name.clone()
                },
            ),
            ("State", st.state.to_string()),
            ("Reason for the state", st.reason.clone().unwrap_or_default()),
            (
                "Requested",
                match &spec.requested_by {
                    Some(by) => format!(
                        "{} by {by} (as stated by the client; NATS permissions decide who may start campaigns)",
                        utc(st.created_at_ms)
                    ),
                    None => format!(
                        "{} through the operator API (who started it is not recorded; approvals name their approver)",
                        utc(st.created_at_ms)
                    ),
                },
            ),
            ("Why", spec.reason.clone().unwrap_or_else(|| "-".into())),
            (
                "Selector",
                serde_json::to_string(&spec.selector).unwrap_or_default(),
            ),
            ("Strategy", spec.strategy.to_string()),
            (
                "Plan",
                format!(
                    "{} credentials in {} waves: {}",
                    st.total,
                    self.h.wave_sizes.len(),
                    self.h
                        .wave_sizes
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            (
                "Failure budget",
                format!(
                    "{:.1}% per wave; on failure {}; bake {}; task timeout {}",
                    spec.failure_budget * 100.0,
                    spec.on_failure.as_str(),
                    keywave_common::duration::format_ms(spec.bake_ms),
                    keywave_common::duration::format_ms(spec.task_timeout_ms)
                ),
            ),
        ];
        if !spec.approve_before_waves.is_empty() {
            v.push((
                "Approval gates",
                spec.approve_before_waves
                    .iter()
                    .map(|w| format!("wave {w}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        if spec.preflight == Some(true) {
            v.push((
                "Pre-flight",
                format!(
                    "consumer agents pinged before each wave; at most {:.1}% may be unreachable",
                    spec.preflight_max_unreachable * 100.0
                ),
            ));
        }
        if let Some(f) = st.finished_at_ms {
            v.push(("Finished", utc(f)));
        }
        v.push((
            "Audit chain head",
            match &self.h.audit {
                Some(a) => format!("#{} {} (check: {})", a.seq, a.hash, a.verify_with),
                None => "no audit chain found".into(),
            },
        ));
        v.push(("Generated", utc(self.h.generated_at_ms)));
        v
    }

    fn outcome_lines(&self) -> Vec<String> {
        let s = self.s;
        let mut v = vec![
            format!(
                "Rotations: {} succeeded, {} failed (of {} credentials planned)",
                s.rotations_succeeded, s.rotations_failed, self.h.status.total
            ),
            format!(
                "New secret verified at the target: {}",
                s.new_secret_verified
            ),
            format!(
                "Old secret rejected by the target: {} (not checked: {}, still accepted: {})",
                s.old_secret_rejected, s.old_secret_not_checked, s.old_secret_still_accepted
            ),
            if s.consumers_verified + s.consumers_not_verified == 0 {
                "Consumers verified: not tracked".to_string()
            } else {
                format!(
                    "Consumers verified: {} (not verified: {})",
                    s.consumers_verified, s.consumers_not_verified
                )
            },
        ];
        if s.rollbacks > 0 {
            v.push(format!(
                "Rollbacks: {} results, {} restored",
                s.rollbacks, s.rolled_back
            ));
        }
        if s.duplicates > 0 || s.unplanned > 0 {
            v.push(format!(
                "Duplicates ignored: {}; results matching no planned task: {}",
                s.duplicates, s.unplanned
            ));
        }
        if let Some(c) = &self.h.containment {
            if c.time_to_contain.count > 0 {
                let d = &c.time_to_contain;
                v.push(format!(
                    "Time to contain (detection received → old secret rejected): p50 {} · p95 {} · p99 {} · max {} over {} credentials",
                    secs(d.p50_ms),
                    secs(d.p95_ms),
                    secs(d.p99_ms),
                    secs(d.max_ms),
                    d.count
                ));
            }
            if !c.exposed.is_empty() {
                v.push(format!(
                    "Still exposed (old secret not proven rejected): {}",
                    c.exposed.len()
                ));
            }
        }
        v
    }

    fn table_note(&self) -> Option<String> {
        let extra = self.failures.len() as u64 + self.s.rows_left_out;
        (extra > 0).then(|| {
            format!(
                "The table lists the first {} results, then {} further failures; {} other successful results are left out (the JSON report lists every credential: --format json).",
                self.max_rows,
                self.failures.len(),
                self.s.rows_left_out
            )
        })
    }

    /// The report in Markdown.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let st = &self.h.status;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# keywave campaign report: {}\n",
            md_cell(&st.campaign_id)
        );
        let _ = writeln!(o, "## Request\n\n| | |\n|---|---|");
        for (k, v) in self.facts() {
            let _ = writeln!(o, "| {k} | {} |", md_cell(&v));
        }
        let _ = writeln!(o, "\n## Waves\n");
        let _ = writeln!(
            o,
            "| wave | size | succeeded | failed | rollback | approval | decision | reason |\n|---:|---:|---:|---:|---|---|---|---|"
        );
        for r in self.wave_rows() {
            let c: Vec<String> = r.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(o, "| {} |", c.join(" | "));
        }
        let _ = writeln!(o, "\n## Decisions and events\n");
        for d in &self.h.decisions {
            let _ = writeln!(o, "- {} — {}", utc(d.at_ms), md_cell(&d.text));
        }
        if self.h.decisions.is_empty() {
            let _ = writeln!(o, "- no events recorded");
        }
        let _ = writeln!(o, "\n## Outcome\n");
        for l in self.outcome_lines() {
            let _ = writeln!(o, "- {}", md_cell(&l));
        }
        let _ = writeln!(o, "\n## Failures by class\n");
        if self.h.failures_by_class.is_empty() {
            let _ = writeln!(o, "No failures.");
        } else {
            let _ = writeln!(o, "| class | count |\n|---|---:|");
            for (c, n) in &self.h.failures_by_class {
                let _ = writeln!(o, "| {} | {n} |", md_cell(c));
            }
        }
        if !st.regions.is_empty() {
            let _ = writeln!(o, "\n## Regions\n");
            let _ = writeln!(
                o,
                "| region | planned | succeeded | failed |\n|---|---:|---:|---:|"
            );
            for (name, r) in &st.regions {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} |",
                    md_cell(name),
                    r.total,
                    r.succeeded,
                    r.failed
                );
            }
        }
        let _ = writeln!(o, "\n## Credentials\n");
        if let Some(n) = self.table_note() {
            let _ = writeln!(o, "{}\n", md_cell(&n));
        }
        let _ = writeln!(o, "| {} |", COLUMNS.join(" | "));
        let _ = writeln!(o, "|{}", "---|".repeat(COLUMNS.len()));
        for r in self.shown.iter().chain(self.failures) {
            let c: Vec<String> = cells(r).iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(o, "| {} |", c.join(" | "));
        }
        if !self.unplanned.is_empty() {
            let _ = writeln!(
                o,
                "\n### Results that match no planned task ({}; not counted)\n",
                self.s.unplanned
            );
            let _ = writeln!(o, "| {} |", COLUMNS.join(" | "));
            let _ = writeln!(o, "|{}", "---|".repeat(COLUMNS.len()));
            for r in self.unplanned {
                let c: Vec<String> = cells(r).iter().map(|c| md_cell(c)).collect();
                let _ = writeln!(o, "| {} |", c.join(" | "));
            }
        }
        let _ = writeln!(o, "\n## Controls: evidence supporting\n");
        let _ = writeln!(
            o,
            "| framework | control | evidence in this report |\n|---|---|---|"
        );
        for c in controls(self.h, self.s) {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                md_cell(c.framework),
                md_cell(c.control),
                md_cell(&c.evidence)
            );
        }
        let _ = writeln!(o, "\n{DISCLAIMER}");
        o
    }

    /// The report as one self-contained HTML page (inline CSS, no script).
    pub fn html(&self) -> String {
        use std::fmt::Write;
        let e = html_escape;
        let st = &self.h.status;
        let mut o = String::new();
        let _ = write!(
            o,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
<title>keywave campaign report: {}</title><style>\
body{{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:78rem;padding:0 1rem;color:#1b1f24}}\
h1{{font-size:1.5rem}}h2{{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de}}\
table{{border-collapse:collapse;margin:.5rem 0;width:100%}}th,td{{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}}\
th{{background:#f6f8fa}}td.n{{text-align:right}}tr.bad td{{background:#ffebe9}}\
code{{font-family:ui-monospace,monospace;font-size:.9em;word-break:break-all}}.note{{color:#57606a}}\
</style></head><body>\n",
            e(&st.campaign_id)
        );
        let _ = writeln!(
            o,
            "<h1>keywave campaign report: {}</h1>",
            e(&st.campaign_id)
        );
        let _ = writeln!(o, "<h2>Request</h2><table>");
        for (k, v) in self.facts() {
            let _ = writeln!(o, "<tr><th>{}</th><td>{}</td></tr>", e(k), e(&v));
        }
        let _ = writeln!(o, "</table>\n<h2>Waves</h2><table><tr><th>wave</th><th>size</th><th>succeeded</th><th>failed</th><th>rollback</th><th>approval</th><th>decision</th><th>reason</th></tr>");
        for r in self.wave_rows() {
            let bad = r[3] != "0";
            let _ = write!(o, "<tr{}>", if bad { " class=\"bad\"" } else { "" });
            for (i, c) in r.iter().enumerate() {
                let class = if i < 4 { " class=\"n\"" } else { "" };
                let _ = write!(o, "<td{class}>{}</td>", e(c));
            }
            let _ = writeln!(o, "</tr>");
        }
        let _ = writeln!(o, "</table>\n<h2>Decisions and events</h2><ul>");
        for d in &self.h.decisions {
            let _ = writeln!(o, "<li>{} — {}</li>", e(&utc(d.at_ms)), e(&d.text));
        }
        let _ = writeln!(o, "</ul>\n<h2>Outcome</h2><ul>");
        for l in self.outcome_lines() {
            let _ = writeln!(o, "<li>{}</li>", e(&l));
        }
        let _ = writeln!(o, "</ul>\n<h2>Failures by class</h2>");
        if self.h.failures_by_class.is_empty() {
            let _ = writeln!(o, "<p>No failures.</p>");
        } else {
            let _ = writeln!(o, "<table><tr><th>class</th><th>count</th></tr>");
            for (c, n) in &self.h.failures_by_class {
                let _ = writeln!(o, "<tr><td>{}</td><td class=\"n\">{n}</td></tr>", e(c));
            }
            let _ = writeln!(o, "</table>");
        }
        if !st.regions.is_empty() {
            let _ = writeln!(o, "<h2>Regions</h2><table><tr><th>region</th><th>planned</th><th>succeeded</th><th>failed</th></tr>");
            for (name, r) in &st.regions {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    e(name),
                    r.total,
                    r.succeeded,
                    r.failed
                );
            }
            let _ = writeln!(o, "</table>");
        }
        let table = |o: &mut String, rows: &mut dyn Iterator<Item = &Row>| {
            let _ = write!(o, "<table><tr>");
            for c in COLUMNS {
                let _ = write!(o, "<th>{}</th>", e(c));
            }
            let _ = writeln!(o, "</tr>");
            for r in rows {
                let _ = write!(
                    o,
                    "<tr{}>",
                    if r.failed() || !r.counted {
                        " class=\"bad\""
                    } else {
                        ""
                    }
                );
                for (i, c) in cells(r).iter().enumerate() {
                    if i == 0 || i == 8 {
                        let _ = write!(o, "<td><code>{}</code></td>", e(c));
                    } else {
                        let _ = write!(o, "<td>{}</td>", e(c));
                    }
                }
                let _ = writeln!(o, "</tr>");
            }
            let _ = writeln!(o, "</table>");
        };
        let _ = writeln!(o, "<h2>Credentials</h2>");
        if let Some(n) = self.table_note() {
            let _ = writeln!(o, "<p class=\"note\">{}</p>", e(&n));
        }
        table(&mut o, &mut self.shown.iter().chain(self.failures));
        if !self.unplanned.is_empty() {
            let _ = writeln!(
                o,
                "<h3>Results that match no planned task ({}; not counted)</h3>",
                self.s.unplanned
            );
            table(&mut o, &mut self.unplanned.iter());
        }
        let _ = writeln!(o, "<h2>Controls: evidence supporting</h2><table><tr><th>framework</th><th>control</th><th>evidence in this report</th></tr>");
        for c in controls(self.h, self.s) {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                e(c.framework),
                e(c.control),
                e(&c.evidence)
            );
        }
        let _ = writeln!(
            o,
            "</table>\n<p class=\"note\">{}</p>\n</body></html>",
            e(DISCLAIMER)
        );
        o
    }
}

/// `keywave campaign report`.
pub async fn run(args: crate::args::ReportArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    let usage = |flag: &str, message: String| {
        CommandError::Usage(crate::args::UsageError {
            flag: flag.into(),
            message,
        })
    };
    let format = args
        .format
        .as_deref()
        .unwrap_or(if json { "json" } else { "markdown" })
        .parse::<Format>()
        .map_err(|e| usage("--format", e.to_string()))?;
    keywave_common::ids::validate("campaign id", &args.id)
        .map_err(|e| usage("ID", e.to_string()))?;
    if json && args.output.is_none() && format != Format::Json {
        return Err(usage(
            "--format",
            "with --json, write markdown or html to a file with --output FILE (stdout carries the JSON result)".into(),
        ));
    }
    if args.max_rows == 0 {
        return Err(usage("--max-rows", "must be at least 1".into()));
    }
    let client = context::connect(url).await?;
    let js = topology::context(client.clone());
    let api = ApiClient::new(client);
    let summary = match &args.output {
        Some(path) => {
            // Written next to the destination, then renamed: a failed
            // report never leaves half a file under the name asked for.
            let tmp = path.with_extension("keywave-partial");
            let file = std::fs::File::create(&tmp).map_err(|source| ReportError::Create {
                path: tmp.clone(),
                source,
            })?;
            let mut w = std::io::BufWriter::new(file);
            let r = write(&js, &api, &args.id, format, args.max_rows, &mut w).await;
            drop(w);
            match r {
                Ok(s) => {
                    std::fs::rename(&tmp, path).map_err(|source| ReportError::Rename {
                        path: path.clone(),
                        source,
                    })?;
                    s
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            write(&js, &api, &args.id, format, args.max_rows, &mut w).await?
        }
    };
    if let Some(path) = &args.output {
        let written = Written {
            ok: true,
            campaign_id: args.id.clone(),
            format: match format {
                Format::Json => "json",
                Format::Markdown => "markdown",
                Format::Html => "html",
            },
            output: Some(path.display().to_string()),
            summary,
        };
        if json {
            println!(
                "{}",
                serde_json::to_string(&written).unwrap_or_else(|_| "{}".into())
            );
        } else {
            eprintln!(
                "report of {} written to {} ({} results)",
                args.id,
                path.display(),
                written.summary.results_read
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::{
        api::{RegionStatus, WaveStatus},
        wire::{
            CampaignSpec, CampaignState, Decision, ErrorClass, OnFailure, Strategy, WaveSize,
            SCHEMA_VERSION,
        },
    };

    #[test]
    fn html_escape_neutralises_markup() {
        assert_eq!(
            html_escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(html_escape("plain-id_01"), "plain-id_01");
        assert_eq!(html_escape("a\x1bb"), "a?b");
    }

    #[test]
    fn md_cell_keeps_one_cell() {
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
        assert_eq!(md_cell("<img src=x>"), "&lt;img src=x&gt;");
        assert_eq!(md_cell("`x` *y*"), "\\`x\\` \\*y\\*");
    }

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
    }

    fn result(wave: u32, index: u32, id: &str, outcome: Outcome) -> RotationResult {
        RotationResult {
            v: SCHEMA_VERSION,
            task_id: format!("c-1:w{wave}:{index}"),
            campaign_id: "c-1".into(),
            wave,
            index,
            action: TaskAction::Rotate,
            credential_id: id.into(),
            region: "eu".into(),
            outcome,
            step: if outcome == Outcome::Succeeded {
                Step::Verified
            } else {
                Step::Set
            },
            error_class: (outcome == Outcome::Failed).then_some(ErrorClass::Injected),
            error: (outcome == Outcome::Failed).then(|| "boom <b>".to_string()),
            timings: vec![],
            new_fingerprint: Some("fp1:0123456789abcdef0123456789abcdef".into()),
            old_fingerprint: None,
            old_rejected: (outcome == Outcome::Succeeded).then_some(true),
            worker_id: "w".into(),
            finished_at_ms: 5,
            ..serde_json::from_value::<RotationResult>(serde_json::json!({
                "v":1,"task_id":"","campaign_id":"","wave":0,"index":0,"action":"rotate",
                "credential_id":"","region":"","outcome":"succeeded","step":"verified",
                "worker_id":"","finished_at_ms":0
            }))
            .unwrap()
        }
    }

    fn header() -> Header {
        Header {
            report: "keywave campaign report",
            keywave_version: "0",
            generated_at_ms: 10,
            status: CampaignStatus {
                campaign_id: "c-1".into(),
                spec: CampaignSpec {
                    v: SCHEMA_VERSION,
                    name: "<b>q3</b>".into(),
                    reason: Some("INC-1 | urgent".into()),
                    selector: Default::default(),
                    strategy: Strategy::Continuity,
                    waves: vec![WaveSize::Count(1)],
                    failure_budget: 0.5,
                    bake_ms: 0,
                    on_failure: OnFailure::Rollback,
                    task_timeout_ms: 1000,
                    approve_before_waves: vec![1],
                    preflight: None,
                    preflight_max_unreachable: 0.0,
                    requested_by: Some("alice".into()),
                },
                state: CampaignState::Completed,
                total: 3,
                current_wave: 1,
                waves: vec![
                    WaveStatus {
                        wave: 0,
                        size: 1,
                        succeeded: 1,
                        decision: Some(Decision::NextWave),
                        reason: Some("next wave".into()),
                        ..Default::default()
                    },
                    WaveStatus {
                        wave: 1,
                        size: 2,
                        succeeded: 1,
                        failed: 1,
                        approval_required: true,
                        approved_by: Some("alice".into()),
                        decision: Some(Decision::Complete),
                        ..Default::default()
                    },
                ],
                created_at_ms: 0,
                finished_at_ms: Some(9),
                reason: None,
                regions: [(
                    "eu".to_string(),
                    RegionStatus {
                        total: 3,
                        succeeded: 2,
                        failed: 1,
                        ..Default::default()
                    },
                )]
                .into(),
                paused_regions: Vec::new(),
            },
            wave_sizes: vec![1, 2],
            failures_by_class: [("injected".to_string(), 1)].into(),
            decisions: vec![],
            audit: Some(AuditHead {
                seq: 7,
                hash: "ab".repeat(32),
                verify_with: "keywave audit verify --campaign c-1".into(),
            }),
            containment: None,
            disclaimer: DISCLAIMER,
        }
    }

    #[test]
    fn tally_counts_once_and_flags_unplanned() {
        let mut t = Tally::new(&[1, 2]);
        assert_eq!(t.add(&result(0, 0, "a", Outcome::Succeeded)), Some(true));
        assert_eq!(t.add(&result(0, 0, "a", Outcome::Succeeded)), None);
        assert_eq!(t.add(&result(1, 1, "b", Outcome::Failed)), Some(true));
        assert_eq!(t.add(&result(9, 0, "x", Outcome::Succeeded)), Some(false));
        let s = &t.summary;
        assert_eq!(
            (s.rotations, s.rotations_succeeded, s.rotations_failed),
            (2, 1, 1)
        );
        assert_eq!(
            (s.duplicates, s.unplanned, s.old_secret_rejected),
            (1, 1, 1)
        );
    }

    #[test]
    fn rows_carry_fingerprints_and_consumers_not_tracked() {
        let r = row(&result(0, 0, "a", Outcome::Succeeded), Some(1500), true);
        assert!(r.new_secret_verified);
        assert_eq!(r.old_secret_rejected, Some(true));
        assert_eq!(r.consumers, serde_json::json!("not tracked"));
        assert_eq!(cells(&r)[7], "1.500s");
    }

    #[test]
    fn consumers_say_who_moved_and_when() {
        let v = serde_json::json!([
            {"id": "orders-api", "verify": "attest", "status": "verified", "verified_at_ms": 5, "after_ms": 1250},
            {"id": "batch", "verify": "attest", "status": "failed", "detail": "no attestation"},
            {"id": "cron", "verify": "none", "status": "unverified"}
        ]);
        assert_eq!(
            consumers_text(&v),
            "orders-api: verified after 1.2s, batch: failed, cron: unverified"
        );
    }

    #[test]
    fn markdown_and_html_render_escaped_with_controls_and_cap_note() {
        let h = header();
        let hostile = row(
            &result(1, 1, "<script>alert(1)</script>", Outcome::Failed),
            None,
            true,
        );
        let shown = vec![row(&result(0, 0, "db-1", Outcome::Succeeded), None, true)];
        let failures = vec![hostile];
        let s = Summary {
            rotations_succeeded: 1,
            rotations_failed: 1,
            old_secret_rejected: 1,
            rows_left_out: 3,
            ..Default::default()
        };
        let doc = Doc {
            h: &h,
            s: &s,
            shown: &shown,
            failures: &failures,
            unplanned: &[],
            max_rows: 1,
        };
        let md = doc.markdown();
        assert!(md.starts_with("# keywave campaign report: c-1\n"), "{md}");
        assert!(md.contains("| wave | size | succeeded | failed |"), "{md}");
        assert!(md.contains(" by alice (as stated by the client;"), "{md}");
        assert!(md.contains("## Controls: evidence supporting"), "{md}");
        assert!(md.contains("NHI2 Secret Leakage"), "{md}");
        assert!(md.contains("PR.AA"), "{md}");
        assert!(md.contains("SP 800-207"), "{md}");
        assert!(md.contains("not a certification"), "{md}");
        assert!(
            md.contains("first 1 results, then 1 further failures; 3 other"),
            "{md}"
        );
        assert!(md.contains("&lt;script&gt;"), "{md}");
        assert!(!md.contains("<script>"), "{md}");
        assert!(md.contains("INC-1 \\| urgent"), "{md}");
        let html = doc.html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script"), "no live script tag");
        assert!(!html.contains("<b>q3"), "names are escaped");
        assert!(html.contains(&"ab".repeat(32)), "audit head");
        assert!(html.contains("approved by alice"));
    }
}
