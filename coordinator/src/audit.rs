//! The audit writer and `keywave audit verify`.
//!
//! The active coordinator (the lease holder, so there is one writer) follows
//! `KEYWAVE_EVENTS` and `KEYWAVE_RESULTS` and appends every event, and a
//! digest of every result, to its campaign's hash chain on
//! `keywave.audit.<campaign>` (stream `KEYWAVE_AUDIT`; record format in
//! [`keywave_common::audit`]). Following the streams rather than hooking the
//! publishers means events published by workers (dead letters) and by the
//! detection intake are audited too, and nothing on the hot path waits for
//! the audit.
//!
//! Continuing a chain after a restart or a fail-over: the writer reads the
//! last record of a chain the first time it needs it (its `seq`, `hash` and
//! the high-water marks `hwm` of the source streams it covers), replays the
//! source streams and skips what the chain already covers. Every append is a
//! conditional publish (`Nats-Expected-Last-Subject-Sequence` = the stream
//! sequence of the chain's head, `Nats-Msg-Id` = `audit:<campaign>:<seq>`),
//! so a stale writer that missed the loss of its lease can never fork a
//! chain: its append fails, it re-reads the head and skips what is covered.
//!
//! With a signing key (the coordinator's task-signing key), every record is
//! also signed: headers `Keywave-Audit-Key-Id` and `Keywave-Audit-Signature`
//! (see [`keywave_common::audit`]); `keywave audit verify --public-key` then
//! requires the signatures.
//!
//! Results are appended in batches (one record per up to [`RESULT_BATCH`]
//! results of a campaign, or whatever arrived when the stream is caught up),
//! so auditing a million-credential campaign costs thousands of appends, not
//! a million.

use async_nats::header::{HeaderMap, HeaderName};
use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
    stream::LastRawMessageErrorKind,
    Context,
};
use futures::StreamExt;
use keywave_common::sign::{PublicKey, SigningKey};
use keywave_common::{
    audit::{self, AuditRecord, ChainReport, Entry, Hwm, ResultDigest, GENESIS, RECORD_VERSION},
    codec, ids, now_ms, subjects,
    topology::{self, StreamReadError},
    wire::RotationResult,
};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Most result digests in one audit record.
pub const RESULT_BATCH: usize = 256;
/// Longest time a result waits in memory before it is appended.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const RETRY: Duration = Duration::from_millis(500);
/// Consumers quiet for this long are replaced (an ordered consumer can stall
/// without an error when a stream's leader moves).
const IDLE: Duration = Duration::from_secs(10);

const EXPECTED_LAST_SUBJECT_SEQ: HeaderName =
    HeaderName::from_static("Nats-Expected-Last-Subject-Sequence");

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit stream: {0}")]
    Stream(String),
    #[error("appending to the audit chain of {campaign}: {source}")]
    Append {
        campaign: String,
        #[source]
        source: AppendError,
    },
    #[error("the audit chain of {campaign} ends in an unreadable record: {detail}")]
    Head { campaign: String, detail: String },
}

/// Why a record was not appended to its chain.
#[derive(Debug, Error)]
pub enum AppendError {
    #[error(transparent)]
    Seal(serde_json::Error),
    #[error(transparent)]
    Publish(async_nats::jetstream::context::PublishError),
    #[error("record {0} was already written by another coordinator")]
    AlreadyWritten(u64),
}

/// The head of a chain as this writer knows it.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    hash: String,
    hwm: Hwm,
    /// Stream sequence of the head record in `KEYWAVE_AUDIT` (0: empty chain).
    stream_seq: u64,
}

/// Appends records to campaign chains; one per active coordinator term.
pub struct Writer {
    js: Context,
    stream: jetstream::stream::Stream,
    writer: String,
    heads: HashMap<String, Head>,
    /// Result digests not appended yet, per campaign, with their highest sequence.
    pending: HashMap<String, (Vec<ResultDigest>, u64)>,
    /// Signs every record when set.
    key: Option<Arc<SigningKey>>,
}

impl Writer {
    pub async fn new(
        js: Context,
        writer: &str,
        key: Option<Arc<SigningKey>>,
    ) -> Result<Writer, AuditError> {
        let stream = js
            .get_stream(topology::STREAM_AUDIT)
            .await
            .map_err(|e| AuditError::Stream(e.to_string()))?;
        Ok(Writer {
            js,
            stream,
            writer: writer.to_string(),
            heads: HashMap::new(),
            pending: HashMap::new(),
            key,
        })
    }

    /// The head of `cid`'s chain, read from the stream the first time.
    async fn head(&mut self, cid: &str) -> Result<Head, AuditError> {
        if let Some(h) = self.heads.get(cid) {
            return Ok(h.clone());
        }
        let head = load_head(&self.stream, cid).await?;
        self.heads.insert(cid.to_string(), head.clone());
        Ok(head)
    }

    /// Appends one record after the head; on any failure the cached head is
    /// dropped (re-read next time) and the error returned.
    async fn append(&mut self, cid: &str, entry: Entry, hwm: Hwm) -> Result<(), AuditError> {
        let head = self.head(cid).await?;
        let record = AuditRecord {
            v: RECORD_VERSION,
            campaign_id: cid.to_string(),
            seq: head.seq + 1,
            prev: head.hash.clone(),
            at_ms: now_ms(),
            writer: self.writer.clone(),
            hwm,
            entry,
        };
        let err = |source: AppendError| AuditError::Append {
            campaign: cid.to_string(),
            source,
        };
        let (payload, hash) = audit::seal(&record).map_err(|e| err(AppendError::Seal(e)))?;
        let mut headers: HeaderMap =
            codec::headers(codec::Format::Json, &format!("audit:{cid}:{}", record.seq));
        headers.insert(
            EXPECTED_LAST_SUBJECT_SEQ,
            head.stream_seq.to_string().as_str(),
        );
        if let Some(key) = &self.key {
            headers.insert(audit::SIG_KEY_ID_HEADER, key.id().as_str());
            headers.insert(
                audit::SIG_HEADER,
                key.sign_audit(cid, record.seq, &hash).as_str(),
            );
        }
        let sent = async {
            self.js
                .publish_with_headers(subjects::audit(cid), headers, payload.into())
                .await?
                .await
        }
        .await
        .map_err(AppendError::Publish);
        match sent {
            Ok(ack) if !ack.duplicate => {
                self.heads.insert(
                    cid.to_string(),
                    Head {
                        seq: record.seq,
                        hash,
                        hwm,
                        stream_seq: ack.sequence,
                    },
                );
                Ok(())
            }
            Ok(_) => {
                self.heads.remove(cid);
                Err(err(AppendError::AlreadyWritten(record.seq)))
            }
            Err(e) => {
                self.heads.remove(cid);
                Err(err(e))
            }
        }
    }

    /// Appends event `seq` of `cid` unless the chain covers it already.
    async fn event(
        &mut self,
        cid: &str,
        stream_seq: u64,
        subject: &str,
        payload: &[u8],
    ) -> Result<(), AuditError> {
        // Results that arrived before the event go first.
        self.flush(cid).await?;
        let head = self.head(cid).await?;
        if stream_seq <= head.hwm.events {
            return Ok(());
        }
        let entry = Entry::Event {
            stream_seq,
            subject: subject.to_string(),
            body_sha256: audit::sha256_hex(payload),
            event: serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
        };
        let hwm = Hwm {
            events: stream_seq,
            ..head.hwm
        };
        self.append(cid, entry, hwm).await
    }

    /// Queues a digest of result `seq` of `cid` unless the chain covers it.
    async fn result(
        &mut self,
        cid: &str,
        stream_seq: u64,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<(), AuditError> {
        let head = self.head(cid).await?;
        let queued = self.pending.get(cid).map(|p| p.1).unwrap_or(0);
        if stream_seq <= head.hwm.results || stream_seq <= queued {
            return Ok(());
        }
        let mut d = ResultDigest {
            stream_seq,
            body_sha256: audit::sha256_hex(payload),
            task_id: None,
            credential_id: None,
            region: None,
            wave: None,
            action: None,
            outcome: None,
            step: None,
            error_class: None,
            old_fingerprint: None,
            new_fingerprint: None,
            worker_id: None,
        };
        if let Ok(r) = codec::decode::<RotationResult>(headers, payload) {
            d.task_id = Some(r.task_id);
            d.credential_id = Some(r.credential_id);
            d.region = Some(r.region);
            d.wave = Some(r.wave);
            d.action = Some(wire_name(&r.action));
            d.outcome = Some(wire_name(&r.outcome));
            d.step = Some(r.step.as_str().to_string());
            d.error_class = r.error_class.map(|c| c.as_str().to_string());
            d.old_fingerprint = r.old_fingerprint;
            d.new_fingerprint = r.new_fingerprint;
            d.worker_id = Some(r.worker_id);
        }
        let p = self.pending.entry(cid.to_string()).or_default();
        p.0.push(d);
        p.1 = stream_seq;
        if p.0.len() >= RESULT_BATCH {
            self.flush(cid).await?;
        }
        Ok(())
    }

    /// Appends the queued digests of `cid` as one record.
    async fn flush(&mut self, cid: &str) -> Result<(), AuditError> {
        let Some((digests, top)) = self.pending.remove(cid) else {
            return Ok(());
        };
        let head = match self.head(cid).await {
            Ok(h) => h,
            Err(e) => {
                self.pending.insert(cid.to_string(), (digests, top));
                return Err(e);
            }
        };
        // After a re-read head (another writer appended), drop what it covers.
        let digests: Vec<ResultDigest> = digests
            .into_iter()
            .filter(|d| d.stream_seq > head.hwm.results)
            .collect();
        if digests.is_empty() {
            return Ok(());
        }
        let hwm = Hwm {
            results: top.max(head.hwm.results),
            ..head.hwm
        };
        let entry = Entry::Results {
            results: digests.clone(),
        };
        if let Err(e) = self.append(cid, entry, hwm).await {
            self.pending.insert(cid.to_string(), (digests, top));
            return Err(e);
        }
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<(), AuditError> {
        let cids: Vec<String> = self.pending.keys().cloned().collect();
        for cid in cids {
            self.flush(&cid).await?;
        }
        Ok(())
    }
}

/// The serde name of a small wire enum (`succeeded`, `rotate`, ...).
fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// Reads the last record of `cid`'s chain.
async fn load_head(stream: &jetstream::stream::Stream, cid: &str) -> Result<Head, AuditError> {
    match stream
        .get_last_raw_message_by_subject(&subjects::audit(cid))
        .await
    {
        Ok(m) => {
            let (link, _) = audit::open(&m.payload).map_err(|e| AuditError::Head {
                campaign: cid.to_string(),
                detail: e.to_string(),
            })?;
            debug!(campaign = %cid, seq = link.seq, "Continuing the audit chain");
            Ok(Head {
                seq: link.seq,
                hash: link.hash,
                hwm: link.hwm,
                stream_seq: m.sequence,
            })
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Head {
            seq: 0,
            hash: GENESIS.to_string(),
            hwm: Hwm::default(),
            stream_seq: 0,
        }),
        Err(e) => Err(AuditError::Stream(e.to_string())),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Events,
    Results,
}

/// The campaign a source subject belongs to.
fn campaign_of(src: Source, subject: &str) -> Option<&str> {
    let mut t = subject.split('.');
    let cid = match src {
        // keywave.event.<campaign>.<kind>
        Source::Events => t.nth(2),
        // keywave.result.<region>.<campaign>
        Source::Results => t.nth(3),
    }?;
    ids::validate("campaign id", cid).ok().map(|_| cid)
}

/// Follows the events and results streams and appends them to the audit
/// chains until `stop` (appending what is queued first) or `halted` (this
/// coordinator may not act any more: nothing more is written).
pub async fn follow(
    js: Context,
    writer_id: String,
    key: Option<Arc<SigningKey>>,
    stop: CancellationToken,
    halted: CancellationToken,
) {
    let mut writer = loop {
        match Writer::new(js.clone(), &writer_id, key.clone()).await {
            Ok(w) => break w,
            Err(e) => {
                warn!(error = %e, "Cannot open the audit stream; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    info!("Audit writer started");
    // Where each source is read from next (all of it at the start of a term:
    // the chains' high-water marks skip what is already appended).
    let mut next = [1u64, 1u64];
    loop {
        let consumers = async {
            let mut out = Vec::new();
            for (i, name) in [topology::STREAM_EVENTS, topology::STREAM_RESULTS]
                .into_iter()
                .enumerate()
            {
                let s = js
                    .get_stream(name)
                    .await
                    .map_err(|source| StreamReadError::Open {
                        stream: name,
                        source,
                    })?;
                let c = s
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: next[i],
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| StreamReadError::Consumer {
                        stream: name,
                        source,
                    })?;
                out.push(
                    c.messages()
                        .await
                        .map_err(|source| StreamReadError::Messages {
                            stream: name,
                            source,
                        })?,
                );
            }
            Ok::<_, StreamReadError>(out)
        };
        let mut streams = match consumers.await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "Cannot follow the events and results streams; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => break,
                    _ = halted.cancelled() => return,
                }
            }
        };
        let results = streams
            .pop()
            .expect("two streams")
            .map(|m| (Source::Results, m));
        let events = streams
            .pop()
            .expect("two streams")
            .map(|m| (Source::Events, m));
        let mut merged = futures::stream::select(events, results);
        let mut last_message = tokio::time::Instant::now();
        loop {
            let item = tokio::select! {
                biased;
                _ = halted.cancelled() => return,
                _ = stop.cancelled() => break,
                m = tokio::time::timeout(FLUSH_EVERY, merged.next()) => m,
            };
            let (src, msg) = match item {
                Err(_) => {
                    if let Err(e) = writer.flush_all().await {
                        warn!(error = %e, "Audit append failed; retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                    if last_message.elapsed() > IDLE {
                        // Pull afresh from where we are, in case a stream stalled.
                        break;
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some((_, Err(e)))) => {
                    warn!(error = %e, "Audit follower lost its stream; resuming");
                    break;
                }
                Ok(Some((src, Ok(m)))) => (src, m),
            };
            last_message = tokio::time::Instant::now();
            let Ok(info) = msg.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let Some(cid) = campaign_of(src, msg.subject.as_str()) else {
                next[src as usize] = seq + 1;
                continue;
            };
            // A failed append is retried (re-reading the chain's head) until
            // it succeeds or the term ends: the audit never skips a message.
            loop {
                let r = match src {
                    Source::Events => {
                        writer
                            .event(cid, seq, msg.subject.as_str(), &msg.payload)
                            .await
                    }
                    Source::Results => {
                        writer
                            .result(cid, seq, msg.headers.as_ref(), &msg.payload)
                            .await
                    }
                };
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(error = %e, "Audit append failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = halted.cancelled() => return,
                            _ = stop.cancelled() => break,
                        }
                    }
                }
            }
            next[src as usize] = seq + 1;
            if pending == 0 {
                if let Err(e) = writer.flush_all().await {
                    warn!(error = %e, "Audit append failed; retrying");
                }
            }
        }
        if stop.is_cancelled() || halted.is_cancelled() {
            break;
        }
    }
    if !halted.is_cancelled() {
        if let Err(e) = writer.flush_all().await {
            warn!(error = %e, "Could not append the last results to the audit trail; the next coordinator will");
        }
    }
}

/// Every record of `cid`'s chain, in stream order: `(stream_seq, payload)`.
/// One stored record: stream sequence, payload, and its signature headers
/// (key id, signature) when it has them.
pub type StoredRecord = (u64, Vec<u8>, Option<(String, String)>);

pub async fn read_chain(js: &Context, cid: &str) -> Result<Vec<StoredRecord>, AuditError> {
    let stream = js
        .get_stream(topology::STREAM_AUDIT)
        .await
        .map_err(|e| AuditError::Stream(e.to_string()))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::audit(cid),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| AuditError::Stream(e.to_string()))?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| AuditError::Stream(e.to_string()))?;
    loop {
        let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(AuditError::Stream(e.to_string())),
            Ok(None) => break,
            Err(_) => return Err(AuditError::Stream("reading the chain timed out".into())),
        };
        let info = m.info().map_err(|e| AuditError::Stream(e.to_string()))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let sig = header(audit::SIG_KEY_ID_HEADER).zip(header(audit::SIG_HEADER));
        out.push((seq, m.payload.to_vec(), sig));
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The campaigns that have an audit chain.
pub async fn chains(js: &Context) -> Result<Vec<String>, AuditError> {
    let stream = js
        .get_stream(topology::STREAM_AUDIT)
        .await
        .map_err(|e| AuditError::Stream(e.to_string()))?;
    let mut subjects = stream
        .info_with_subjects(subjects::AUDIT_ALL)
        .await
        .map_err(|e| AuditError::Stream(e.to_string()))?;
    let mut out = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(|e| AuditError::Stream(e.to_string()))?;
        if let Some(cid) = subject.strip_prefix("keywave.audit.") {
            out.push(cid.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// What `keywave audit verify` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub chains: Vec<ChainReport>,
}

/// Verifies one campaign's chain, or every chain: the function behind
/// `keywave audit verify`. With `keys`, every record must also be signed by
/// one of them.
pub async fn verify(
    js: &Context,
    campaign: Option<&str>,
    keys: &[PublicKey],
) -> Result<VerifyReport, AuditError> {
    let cids = match campaign {
        Some(c) => vec![c.to_string()],
        None => chains(js).await?,
    };
    let mut reports = Vec::new();
    for cid in cids {
        let records = read_chain(js, &cid).await?;
        reports.push(audit::verify_signed(
            &cid,
            records.iter().map(|(s, p, sig)| {
                (
                    *s,
                    p.as_slice(),
                    sig.as_ref().map(|(k, v)| audit::RecordSig {
                        key_id: k,
                        signature: v,
                    }),
                )
            }),
            keys,
        ));
    }
    Ok(VerifyReport {
        ok: reports.iter().all(|r| r.ok),
        chains: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaigns_come_from_the_source_subjects() {
        assert_eq!(
            campaign_of(Source::Events, "keywave.event.c-1.wave_started"),
            Some("c-1")
        );
        assert_eq!(
            campaign_of(Source::Results, "keywave.result.eu.c-1"),
            Some("c-1")
        );
        assert_eq!(campaign_of(Source::Results, "keywave.result.eu"), None);
    }

    #[test]
    fn enum_names_are_the_wire_names() {
        assert_eq!(
            wire_name(&keywave_common::wire::Outcome::RolledBack),
            "rolled_back"
        );
    }
}
