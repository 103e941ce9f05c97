//! Campaign events: every decision and state change of a campaign is a JSON
//! [`CampaignEvent`] on `keywave.event.<campaign>.<kind>` (stream
//! `KEYWAVE_EVENTS`, the audit trail). Message ids are derived from the
//! campaign, the kind and the wave, so the events a restarted coordinator
//! publishes again are de-duplicated by the server.

use async_nats::jetstream::Context;
use keywave_common::{
    codec::Format,
    now_ms,
    publish::{self, PublishError},
    subjects,
    wire::{CampaignEvent, EventKind, SCHEMA_VERSION},
};

/// The `Nats-Msg-Id` of an event.
pub fn msg_id(cid: &str, kind: &EventKind, at_ms: u64) -> String {
    let name = kind.name();
    match kind {
        EventKind::Created { .. } => format!("{cid}:{name}"),
        EventKind::WaveStarted { wave, .. }
        | EventKind::WaveFinished { wave, .. }
        | EventKind::Decision { wave, .. }
        | EventKind::RollbackStarted { wave, .. }
        | EventKind::RollbackRefused { wave, .. }
        | EventKind::RollbackFinished { wave, .. }
        | EventKind::ApprovalRequired { wave, .. }
        // The first approval of a wave is the one that counts.
        | EventKind::Approved { wave, .. } => format!("{cid}:{name}:{wave}"),
        // A campaign can enter the same state more than once (pause, resume,
        // pause): each change is its own event.
        EventKind::StateChanged { state, .. } => format!("{cid}:{name}:{state}:{at_ms}"),
        // A wave is pre-flighted again each time the campaign reaches it
        // (after a failed pre-flight and a resume): each check is recorded.
        EventKind::Preflight { wave, .. } => format!("{cid}:{name}:{wave}:{at_ms}"),
        EventKind::DeadLetter { task_id, .. } => {
            format!("{cid}:{name}:{}", task_id.as_deref().unwrap_or("-"))
        }
    }
}

/// Publishes one event and waits for JetStream to store it.
pub async fn publish(js: &Context, cid: &str, kind: EventKind) -> Result<(), PublishError> {
    let at_ms = now_ms();
    let id = msg_id(cid, &kind, at_ms);
    let subject = subjects::event(cid, kind.name());
    let event = CampaignEvent {
        v: SCHEMA_VERSION,
        campaign_id: cid.to_string(),
        at_ms,
        kind,
    };
    publish::send_and_confirm(js, subject, Format::Json, &id, &event).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::wire::CampaignState;

    #[test]
    fn wave_events_dedupe_state_changes_do_not() {
        let k = EventKind::WaveStarted { wave: 3, size: 10 };
        assert_eq!(msg_id("c-1", &k, 1), msg_id("c-1", &k, 2));
        assert_eq!(msg_id("c-1", &k, 1), "c-1:wave_started:3");
        let s = EventKind::StateChanged {
            state: CampaignState::Paused,
            reason: String::new(),
        };
        assert_ne!(msg_id("c-1", &s, 1), msg_id("c-1", &s, 2));
    }
}
