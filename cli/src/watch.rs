//! `keywave campaign watch`: a campaign's live progress in the terminal.
//! Every `--interval` the status is polled (`campaign.status`) and drawn as
//! one progress bar per wave and per region (done, failed, queued, in
//! flight, rate, estimated time left, each region's live workers), followed by the latest events, which a background
//! task follows on `KEYWAVE_EVENTS` with an ordered consumer (nothing is
//! left on the server). A terminal gets the screen redrawn in place with
//! ANSI colours; `--no-color` or a pipe gets one plain block per refresh;
//! `--json` one [`Frame`] per line (NDJSON).
//!
//! Event text (reasons, approvers) comes from the bus: control characters
//! are replaced before anything reaches the terminal.

use crate::args::{self, WatchArgs};
use crate::context::{self, CommandError, EXIT_NOT_COMPLETED};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::{
    api::CampaignStatus,
    codec, now_ms, subjects, topology,
    wire::{CampaignEvent, CampaignState, EventKind},
};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Width of a progress bar, in cells.
pub const BAR_WIDTH: usize = 30;
/// Refreshes a rate is averaged over.
const RATE_WINDOW: usize = 10;

/// One wave in a frame.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaveLine {
    pub wave: u32,
    pub size: u64,
    /// `pending`, `awaiting_approval`, `running`, `finished`.
    pub phase: &'static str,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Published and pulled by a worker, not answered yet.
    pub in_flight: u64,
    /// Published and not pulled by any worker yet (from the regions'
    /// queues; 0 when they are not known).
    #[serde(default)]
    pub queued: u64,
    /// Results per second (recent, else since the wave started).
    pub rate_per_s: Option<f64>,
    pub eta_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

/// One region in a frame (results received; tasks without a result by
/// their deadline are counted per wave only).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegionLine {
    pub region: String,
    pub total: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Pulled by a worker and not answered yet (the region's share of the
    /// waves in progress, less what waits in its queue).
    pub in_flight: u64,
    /// Published and not pulled by any worker yet: the region's queue
    /// (`workers-<region>`), at most the campaign's share in progress.
    #[serde(default)]
    pub queued: u64,
    /// Live workers of the region (`None`: not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// How long the region has had no live worker, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent_s: Option<u64>,
    pub rate_per_s: Option<f64>,
    pub eta_s: Option<u64>,
}

/// One event in a frame.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventLine {
    pub at_ms: u64,
    pub kind: &'static str,
    pub text: String,
}

/// One refresh: what `--json` prints per line and what the screen shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Frame {
    pub campaign_id: String,
    pub name: String,
    pub state: CampaignState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at_ms: u64,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub current_wave: u32,
    pub waves: Vec<WaveLine>,
    pub regions: Vec<RegionLine>,
    pub events: Vec<EventLine>,
    /// What the operator can do next, when the campaign waits for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// The watch ends after this frame.
    pub last: bool,
}

/// Replaces control characters (ESC included) so that text from the bus
/// cannot move the cursor or recolour the terminal.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// One event as a line for people.
pub fn describe(kind: &EventKind) -> String {
    let text = match kind {
        EventKind::Created {
            total, wave_sizes, ..
        } => format!("created: {total} credentials in {} waves", wave_sizes.len()),
        EventKind::WaveStarted { wave, size } => format!("wave {wave} started ({size} tasks)"),
        EventKind::WaveFinished {
            wave,
            succeeded,
            failed,
            no_result,
            ..
        } => format!(
            "wave {wave} finished: {succeeded} succeeded, {failed} failed, {no_result} no result"
        ),
        EventKind::Decision {
            wave,
            decision,
            reason,
        } => format!("wave {wave} decision {}: {reason}", decision.as_str()),
        EventKind::RollbackStarted { wave, tasks } => {
            format!("wave {wave} rollback started ({tasks} tasks)")
        }
        EventKind::RollbackRefused {
            wave,
            credentials,
            reason,
        } => format!("wave {wave} rollback refused for {credentials} credentials: {reason}"),
        EventKind::RollbackFinished {
            wave,
            restored,
            refused,
            failed,
        } => format!(
            "wave {wave} rollback finished: {restored} restored, {refused} refused, {failed} failed"
        ),
        EventKind::StateChanged { state, reason } => format!("state {state}: {reason}"),
        EventKind::ApprovalRequired { wave, size } => {
            format!("wave {wave} ({size} credentials) waits for an approval")
        }
        EventKind::Approved { wave, by } => format!("wave {wave} approved by {by}"),
        EventKind::DeadLetter { region, reason, .. } => {
            format!("task dead-lettered in {region}: {reason}")
        }
        EventKind::Preflight {
            wave,
            reason,
            unhealthy_agents,
            not_watching,
            ..
        } => {
            let mut t = format!("wave {wave} {reason}");
            if !unhealthy_agents.is_empty() {
                let names: Vec<String> = unhealthy_agents.iter().map(ToString::to_string).collect();
                t.push_str(&format!("; unhealthy: {}", names.join(", ")));
            }
            if !not_watching.is_empty() {
                let names: Vec<String> = not_watching
                    .iter()
                    .map(|a| format!("{a} ({})", a.credential.as_deref().unwrap_or("?")))
                    .collect();
                t.push_str(&format!("; not watching: {}", names.join(", ")));
            }
            t
        }
    };
    clean(&text)
}

/// Recent `(at_ms, done)` samples per bar, for rates.
#[derive(Debug, Default)]
pub struct Rates {
    samples: HashMap<String, VecDeque<(u64, u64)>>,
}

impl Rates {
    /// Records `done` for `key` at `at_ms` and returns the rate over the
    /// recent samples, or `fallback` (done since a known start) when there
    /// is no usable history yet.
    pub fn rate(&mut self, key: &str, at_ms: u64, done: u64, since_ms: Option<u64>) -> Option<f64> {
        let q = self.samples.entry(key.to_string()).or_default();
        q.push_back((at_ms, done));
        while q.len() > RATE_WINDOW {
            q.pop_front();
        }
        let &(t0, d0) = q.front().expect("just pushed");
        if at_ms > t0 + 500 && done >= d0 && q.len() > 1 {
            return Some((done - d0) as f64 * 1000.0 / (at_ms - t0) as f64);
        }
        let start = since_ms?;
        (at_ms > start + 100 && done > 0).then(|| done as f64 * 1000.0 / (at_ms - start) as f64)
    }
}

fn eta(left: u64, rate: Option<f64>) -> Option<u64> {
    match rate {
        _ if left == 0 => Some(0),
        Some(r) if r > 0.0 => Some((left as f64 / r).ceil() as u64),
        _ => None,
    }
}

/// What to do next for a campaign in `s`'s state, if it waits for someone.
pub fn next_step(s: &CampaignStatus) -> Option<String> {
    let id = &s.campaign_id;
    Some(match s.state {
        CampaignState::AwaitingApproval => format!(
            "wave {} waits for an approval: keywave campaign approve {id} --wave {} --by <you>",
            s.current_wave, s.current_wave
        ),
        CampaignState::Paused
            if s.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("pre-flight:")) =>
        {
            format!("paused before the wave: start the consumer agents named above, then keywave campaign resume {id} (the pre-flight runs again); the watch goes on")
        }
        CampaignState::Paused if !s.paused_regions.is_empty() => {
            format!(
                "paused: region(s) {} have no live workers; their tasks wait in the queue and do not count as failed. Start a worker there (keywave-worker with region = \"{}\"), then keywave campaign resume {id}; the watch goes on",
                s.paused_regions.join(", "),
                s.paused_regions[0]
            )
        }
        CampaignState::Paused => {
            format!("paused: keywave campaign resume {id} (or rollback / abort); the watch goes on")
        }
        CampaignState::Completed => format!("done: keywave campaign report {id} --format markdown"),
        CampaignState::RolledBack | CampaignState::Aborted => format!(
            "{}: see why with keywave campaign report {id} --format markdown",
            s.state
        ),
        _ => return None,
    })
}

/// Builds a frame from a status, the rate history and the latest events.
pub fn frame(
    s: &CampaignStatus,
    rates: &mut Rates,
    events: Vec<EventLine>,
    at_ms: u64,
    last: bool,
) -> Frame {
    let mut waves = Vec::with_capacity(s.waves.len());
    let mut region_in_flight = 0u64;
    // What waits in the regions' queues, taken from the waves in progress
    // first (the queues are shared by every campaign of a region).
    let mut queue_left: u64 = s.regions.values().filter_map(|r| r.queued).sum();
    for w in &s.waves {
        let done = w.succeeded + w.failed + w.no_result;
        let started = w.started_at_ms.is_some() || w.published;
        let finished = w.finished_at_ms.is_some() || w.decision.is_some();
        let phase = if finished {
            "finished"
        } else if started {
            "running"
        } else if s.state == CampaignState::AwaitingApproval && w.wave == s.current_wave {
            "awaiting_approval"
        } else {
            "pending"
        };
        let in_flight = if phase == "running" {
            w.size.saturating_sub(done)
        } else {
            0
        };
        region_in_flight += in_flight;
        let queued = in_flight.min(queue_left);
        queue_left -= queued;
        let in_flight = in_flight - queued;
        let rate = if phase == "running" {
            rates.rate(&format!("w{}", w.wave), at_ms, done, w.started_at_ms)
        } else {
            None
        };
        let eta_s = match phase {
            "running" => eta(w.size.saturating_sub(done), rate),
            "finished" => Some(0),
            _ => None,
        };
        waves.push(WaveLine {
            wave: w.wave,
            size: w.size,
            phase,
            done,
            succeeded: w.succeeded,
            failed: w.failed + w.no_result,
            in_flight,
            queued,
            rate_per_s: rate,
            eta_s,
            decision: w.decision.map(|d| d.as_str()),
            reason: w.reason.as_deref().map(clean),
            approved_by: w.approved_by.as_deref().map(clean),
        });
    }
    let first_start = s.waves.iter().filter_map(|w| w.started_at_ms).min();
    let active = !s.state.is_terminal();
    let total_in_regions: u64 = s.regions.values().map(|r| r.total).sum();
    let regions = s
        .regions
        .iter()
        .map(|(name, r)| {
            let done = r.succeeded + r.failed;
            let rate = if active {
                rates.rate(&format!("r{name}"), at_ms, done, first_start)
            } else {
                None
            };
            // The region's share of the tasks in flight, by its share of the plan.
            let in_flight = if total_in_regions == 0 {
                0
            } else {
                (region_in_flight as u128 * r.total as u128 / total_in_regions as u128) as u64
            }
            .min(r.total.saturating_sub(done));
            let queued = r.queued.map_or(0, |q| q.min(in_flight));
            RegionLine {
                region: clean(name),
                total: r.total,
                done,
                succeeded: r.succeeded,
                failed: r.failed,
                in_flight: in_flight - queued,
                queued,
                workers: r.live_workers,
                silent_s: r.silent_for_ms.map(|ms| ms / 1_000),
                rate_per_s: rate,
                eta_s: if active {
                    eta(r.total.saturating_sub(done), rate)
                } else {
                    None
                },
            }
        })
        .collect();
    Frame {
        campaign_id: s.campaign_id.clone(),
        name: clean(&s.spec.name),
        state: s.state,
        reason: s.reason.as_deref().map(clean),
        at_ms,
        total: s.total,
        succeeded: s.succeeded(),
        failed: s.failed(),
        current_wave: s.current_wave,
        waves,
        regions,
        events,
        next: next_step(s),
        last,
    }
}

/// A bar of `width` cells: succeeded, failed, in flight, then what is left.
/// Plain: `#` succeeded, `x` failed, `>` in flight, `.` left; with colour,
/// green, red and yellow blocks on a dim track.
pub fn bar(
    succeeded: u64,
    failed: u64,
    in_flight: u64,
    total: u64,
    width: usize,
    color: bool,
) -> String {
    let cells = |n: u64| -> usize {
        if total == 0 {
            0
        } else {
            ((n as u128 * width as u128) / total as u128) as usize
        }
    };
    let ok = cells(succeeded).min(width);
    // A failure is never hidden by rounding down to zero cells.
    let bad = if failed > 0 { cells(failed).max(1) } else { 0 }.min(width - ok);
    let fly = cells(in_flight).min(width - ok - bad);
    let rest = width - ok - bad - fly;
    if color {
        format!(
            "\x1b[32m{}\x1b[31m{}\x1b[33m{}\x1b[2m{}\x1b[0m",
            "█".repeat(ok),
            "█".repeat(bad),
            "▒".repeat(fly),
            "░".repeat(rest)
        )
    } else {
        format!(
            "{}{}{}{}",
            "#".repeat(ok),
            "x".repeat(bad),
            ">".repeat(fly),
            ".".repeat(rest)
        )
    }
}

/// `12.3/s`, `-` when unknown.
pub fn fmt_rate(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{r:.0}/s"),
        Some(r) => format!("{r:.1}/s"),
        None => "-".into(),
    }
}

/// `1h02m`, `3m05s`, `42s`, `-` when unknown.
pub fn fmt_eta(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        Some(s) if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        Some(s) => format!("{s}s"),
    }
}

fn hms(ms: u64) -> String {
    let s = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// The frame for people. `color` adds ANSI colours (never cursor movement:
/// the caller clears the screen).
/// A region's workers for people: `3`, `none for 12s`, `-` when unknown.
pub fn workers_cell(workers: Option<u32>, silent_s: Option<u64>) -> String {
    match (workers, silent_s) {
        (_, Some(s)) => format!("none for {s}s"),
        (Some(n), None) => n.to_string(),
        (None, None) => "-".into(),
    }
}

pub fn render(f: &Frame, color: bool) -> String {
    use std::fmt::Write;
    let (b, r, dim) = if color {
        ("\x1b[1m", "\x1b[0m", "\x1b[2m")
    } else {
        ("", "", "")
    };
    let mut out = String::new();
    let name = if f.name.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", f.name)
    };
    let _ = writeln!(
        out,
        "{b}campaign {}{name}: {}{r}  ·  {}/{} succeeded · {} failed  ·  {} UTC",
        f.campaign_id,
        f.state,
        f.succeeded,
        f.total,
        f.failed,
        hms(f.at_ms)
    );
    if let Some(reason) = &f.reason {
        let _ = writeln!(out, "{dim}  {reason}{r}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  {:<10} {:<w$}  {:>15}  {:>7} {:>7} {:>9} {:>8} {:>7}",
        "WAVE",
        "",
        "DONE",
        "FAILED",
        "QUEUED",
        "IN FLIGHT",
        "RATE",
        "ETA",
        w = BAR_WIDTH
    );
    for w in &f.waves {
        let marker = if w.wave == f.current_wave && !f.state.is_terminal() {
            ">"
        } else {
            " "
        };
        let mut tail = String::new();
        match (w.phase, w.decision) {
            (_, Some(d)) => tail = format!(" → {d}"),
            ("awaiting_approval", _) => tail = " needs approval".into(),
            ("pending", _) => tail = " pending".into(),
            _ => {}
        }
        if let Some(by) = &w.approved_by {
            tail.push_str(&format!(" (approved by {by})"));
        }
        let _ = writeln!(
            out,
            "{marker} {:<10} {}  {:>15}  {:>7} {:>7} {:>9} {:>8} {:>7}{tail}",
            format!("wave {}", w.wave),
            bar(
                w.succeeded,
                w.failed,
                w.in_flight + w.queued,
                w.size,
                BAR_WIDTH,
                color
            ),
            format!("{}/{}", w.done, w.size),
            w.failed,
            w.queued,
            w.in_flight,
            fmt_rate(w.rate_per_s),
            fmt_eta(w.eta_s),
        );
    }
    if !f.regions.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<10} {:<w$}  {:>15}  {:>7} {:>7} {:>9} {:>8} {:>7}  WORKERS",
            "REGION",
            "",
            "DONE",
            "FAILED",
            "QUEUED",
            "IN FLIGHT",
            "RATE",
            "ETA",
            w = BAR_WIDTH
        );
        for g in &f.regions {
            let _ = writeln!(
                out,
                "  {:<10} {}  {:>15}  {:>7} {:>7} {:>9} {:>8} {:>7}  {}",
                g.region,
                bar(
                    g.succeeded,
                    g.failed,
                    g.in_flight + g.queued,
                    g.total,
                    BAR_WIDTH,
                    color
                ),
                format!("{}/{}", g.done, g.total),
                g.failed,
                g.queued,
                g.in_flight,
                fmt_rate(g.rate_per_s),
                fmt_eta(g.eta_s),
                workers_cell(g.workers, g.silent_s),
            );
        }
    }
    if !f.events.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "  latest events:");
        for e in &f.events {
            let _ = writeln!(out, "  {dim}{}{r}  {}", hms(e.at_ms), e.text);
        }
    }
    if let Some(n) = &f.next {
        let _ = writeln!(out);
        let _ = writeln!(out, "{b}→ {n}{r}");
    }
    out
}

/// The latest events of a campaign, followed in the background.
struct EventTail {
    latest: Arc<Mutex<VecDeque<EventLine>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventTail {
    async fn start(client: async_nats::Client, cid: &str, keep: usize) -> EventTail {
        let latest = Arc::new(Mutex::new(VecDeque::new()));
        let sink = latest.clone();
        let filter = subjects::event_campaign_filter(cid);
        let task = tokio::spawn(async move {
            if keep == 0 {
                return;
            }
            let js = topology::context(client);
            let Ok(stream) = js.get_stream(topology::STREAM_EVENTS).await else {
                return;
            };
            let Ok(consumer) = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: filter,
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await
            else {
                return;
            };
            let Ok(mut messages) = consumer.messages().await else {
                return;
            };
            while let Some(Ok(m)) = messages.next().await {
                if let Ok(ev) = codec::decode::<CampaignEvent>(m.headers.as_ref(), &m.payload) {
                    let mut q = sink.lock().expect("events lock");
                    q.push_back(EventLine {
                        at_ms: ev.at_ms,
                        kind: ev.kind.name(),
                        text: describe(&ev.kind),
                    });
                    while q.len() > keep {
                        q.pop_front();
                    }
                }
            }
        });
        EventTail { latest, task }
    }

    fn snapshot(&self) -> Vec<EventLine> {
        self.latest
            .lock()
            .expect("events lock")
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for EventTail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The exit code for a campaign state: 0 unless it ended without completing.
pub fn exit_code(state: CampaignState) -> u8 {
    match state {
        CampaignState::RolledBack | CampaignState::Aborted => EXIT_NOT_COMPLETED,
        _ => 0,
    }
}

/// `keywave campaign watch`.
pub async fn run(args: WatchArgs, url: &str, json: bool) -> Result<u8, CommandError> {
    let interval = args.interval()?;
    keywave_common::ids::validate("campaign id", &args.id).map_err(|e| args::UsageError {
        flag: "ID".into(),
        message: e.to_string(),
    })?;
    let client = context::connect(url).await?;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(10));
    // The first status also tells a wrong id apart before anything is drawn.
    let mut status = api.status(&args.id).await?;
    let tail = EventTail::start(client, &args.id, args.events).await;
    let tty = std::io::stdout().is_terminal();
    let color = !json && !args.no_color && tty && std::env::var_os("NO_COLOR").is_none();
    let mut rates = Rates::default();
    let mut failures = 0u32;
    // Give the event tail a moment to replay the history before the first frame.
    tokio::time::sleep(Duration::from_millis(200)).await;
    loop {
        let state = status.state;
        let last = args.once || state.is_terminal() || state == CampaignState::AwaitingApproval;
        let f = frame(&status, &mut rates, tail.snapshot(), now_ms(), last);
        let mut stdout = std::io::stdout().lock();
        if json {
            let _ = writeln!(
                stdout,
                "{}",
                serde_json::to_string(&f).unwrap_or_else(|_| "{}".into())
            );
        } else if color {
            // Home, clear the screen, draw.
            let _ = write!(stdout, "\x1b[H\x1b[2J{}", render(&f, true));
        } else {
            let _ = writeln!(stdout, "{}", render(&f, false));
        }
        let _ = stdout.flush();
        drop(stdout);
        if last {
            return Ok(exit_code(state));
        }
        tokio::time::sleep(interval).await;
        match api.status(&args.id).await {
            Ok(s) => {
                status = s;
                failures = 0;
            }
            Err(
                e @ (ClientError::NoCoordinator { .. }
                | ClientError::Timeout { .. }
                | ClientError::Request { .. }),
            ) => {
                failures += 1;
                if failures >= 30 {
                    return Err(e.into());
                }
                if !json {
                    eprintln!("status unavailable ({e}); retrying");
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::{
        api::{RegionStatus, WaveStatus},
        wire::{CampaignSpec, Decision, OnFailure, Strategy, WaveSize, SCHEMA_VERSION},
    };

    fn status() -> CampaignStatus {
        CampaignStatus {
            campaign_id: "c-1".into(),
            spec: CampaignSpec {
                v: SCHEMA_VERSION,
                name: "q3\x1b[2J".into(),
                reason: None,
                selector: Default::default(),
                strategy: Strategy::Continuity,
                waves: vec![WaveSize::Count(1)],
                failure_budget: 0.1,
                bake_ms: 0,
                on_failure: OnFailure::Rollback,
                task_timeout_ms: 1000,
                approve_before_waves: vec![1],
                preflight: None,
                preflight_max_unreachable: 0.0,
                requested_by: None,
            },
            state: CampaignState::AwaitingApproval,
            total: 11,
            current_wave: 1,
            waves: vec![
                WaveStatus {
                    wave: 0,
                    size: 1,
                    published: true,
                    succeeded: 1,
                    decision: Some(Decision::NextWave),
                    started_at_ms: Some(1_000),
                    finished_at_ms: Some(2_000),
                    ..Default::default()
                },
                WaveStatus {
                    wave: 1,
                    size: 10,
                    approval_required: true,
                    ..Default::default()
                },
            ],
            created_at_ms: 0,
            finished_at_ms: None,
            reason: Some("waiting".into()),
            regions: [(
                "eu".to_string(),
                RegionStatus {
                    total: 11,
                    succeeded: 1,
                    failed: 0,
                    ..Default::default()
                },
            )]
            .into(),
            paused_regions: Vec::new(),
        }
    }

    #[test]
    fn bars_fill_in_proportion_and_show_every_failure() {
        assert_eq!(bar(5, 0, 0, 10, 10, false), "#####.....");
        assert_eq!(bar(5, 1, 2, 100, 10, false), "x.........");
        assert_eq!(bar(50, 10, 20, 100, 10, false), "#####x>>..");
        assert_eq!(bar(0, 0, 0, 0, 4, false), "....");
        assert_eq!(bar(10, 0, 0, 10, 4, false), "####");
        assert_eq!(bar(7, 7, 7, 7, 4, false).chars().count(), 4, "never wider");
        let c = bar(1, 0, 0, 2, 2, true);
        assert!(
            c.starts_with("\x1b[32m█") && c.ends_with("\x1b[0m"),
            "{c:?}"
        );
    }

    #[test]
    fn rates_and_etas() {
        let mut r = Rates::default();
        // No history: done since the start.
        assert_eq!(r.rate("w0", 11_000, 100, Some(1_000)), Some(10.0));
        // History: the recent window.
        assert_eq!(r.rate("w0", 12_000, 150, Some(1_000)), Some(50.0));
        assert_eq!(r.rate("w1", 5_000, 0, None), None);
        assert_eq!(eta(100, Some(10.0)), Some(10));
        assert_eq!(eta(0, None), Some(0));
        assert_eq!(eta(5, Some(0.0)), None);
        assert_eq!(fmt_eta(Some(3_725)), "1h02m");
        assert_eq!(fmt_eta(Some(185)), "3m05s");
        assert_eq!(fmt_eta(None), "-");
        assert_eq!(fmt_rate(Some(1234.4)), "1234/s");
        assert_eq!(fmt_rate(Some(2.25)), "2.2/s");
    }

    #[test]
    fn frame_shows_the_gate_and_what_to_do() {
        let s = status();
        let f = frame(&s, &mut Rates::default(), vec![], 3_000, true);
        assert_eq!(f.waves[0].phase, "finished");
        assert_eq!(f.waves[1].phase, "awaiting_approval");
        assert_eq!(f.name, "q3?[2J", "control characters are replaced");
        assert!(f
            .next
            .as_deref()
            .unwrap()
            .contains("campaign approve c-1 --wave 1"));
        let text = render(&f, false);
        assert!(text.contains("wave 1"), "{text}");
        assert!(text.contains("needs approval"), "{text}");
        assert!(text.contains("1/11"), "{text}");
        assert!(
            !text.contains('\x1b'),
            "plain output has no escapes: {text:?}"
        );
        let v: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(v["state"], "awaiting_approval");
        assert_eq!(v["regions"][0]["region"], "eu");
    }

    #[test]
    fn event_text_is_cleaned() {
        let t = describe(&EventKind::Approved {
            wave: 2,
            by: "mallory\x1b]0;pwned\x07".into(),
        });
        assert_eq!(t, "wave 2 approved by mallory?]0;pwned?");
    }

    #[test]
    fn a_preflight_pause_names_the_agents_and_what_to_do() {
        let mut s = status();
        s.state = CampaignState::Paused;
        s.reason = Some("pre-flight: 1 of 3 consumer agents unreachable (orders-api in eu) > allowed 0.0%; wave 1 not started".into());
        let f = frame(&s, &mut Rates::default(), vec![], 3_000, false);
        assert!(f.reason.as_deref().unwrap().contains("orders-api in eu"));
        let next = f.next.as_deref().unwrap();
        assert!(next.contains("keywave campaign resume c-1"), "{next}");
        assert!(next.contains("pre-flight runs again"), "{next}");
        let t = describe(&EventKind::Preflight {
            wave: 1,
            asked: 3,
            unreachable: 0,
            passed: true,
            reason: "pre-flight: 3 of 3 consumer agents answered".into(),
            unreachable_agents: vec![],
            unhealthy_agents: vec![keywave_common::wire::PreflightAgent {
                consumer: "web".into(),
                region: "us".into(),
                credential: None,
                detail: None,
            }],
            not_watching: vec![],
        });
        assert_eq!(
            t,
            "wave 1 pre-flight: 3 of 3 consumer agents answered; unhealthy: web in us"
        );
    }

    #[test]
    fn a_region_pause_splits_queued_from_in_flight_and_names_the_region() {
        let mut s = status();
        s.state = CampaignState::Paused;
        s.reason = Some("region ap: no live workers for 12 s; 1 task queued".into());
        s.paused_regions = vec!["ap".into()];
        s.regions.insert(
            "ap".into(),
            RegionStatus {
                total: 1,
                live_workers: Some(0),
                silent_for_ms: Some(12_400),
                queued: Some(1),
                in_flight: Some(0),
                ..Default::default()
            },
        );
        if let Some(r) = s.regions.get_mut("eu") {
            r.live_workers = Some(2);
            r.queued = Some(0);
            r.in_flight = Some(3);
        }
        let f = frame(&s, &mut Rates::default(), vec![], 3_000, false);
        let ap = f.regions.iter().find(|r| r.region == "ap").unwrap();
        assert_eq!((ap.workers, ap.silent_s), (Some(0), Some(12)));
        let eu = f.regions.iter().find(|r| r.region == "eu").unwrap();
        assert_eq!(eu.workers, Some(2));
        assert_eq!(eu.silent_s, None);
        let queued: u64 = f.waves.iter().map(|w| w.queued).sum();
        let outstanding: u64 = f.waves.iter().map(|w| w.queued + w.in_flight).sum();
        assert!(queued <= 1 && queued <= outstanding, "{f:?}");
        let next = f.next.as_deref().unwrap();
        assert!(next.contains("region(s) ap have no live workers"), "{next}");
        let text = render(&f, false);
        assert!(
            text.contains("QUEUED") && text.contains("none for 12s"),
            "{text}"
        );
        assert_eq!(workers_cell(None, None), "-");
        assert_eq!(workers_cell(Some(3), None), "3");
    }

    #[test]
    fn exit_codes_follow_the_state() {
        assert_eq!(exit_code(CampaignState::Completed), 0);
        assert_eq!(exit_code(CampaignState::AwaitingApproval), 0);
        assert_eq!(exit_code(CampaignState::RolledBack), EXIT_NOT_COMPLETED);
        assert_eq!(exit_code(CampaignState::Aborted), EXIT_NOT_COMPLETED);
    }
}
