//! Every NATS subject keywave uses, built in one place. Callers pass names
//! already validated by [`crate::ids`], so a token never contains `.`.

/// Root of every keywave subject.
pub const ROOT: &str = "keywave";

/// Tasks for one region and campaign: `keywave.task.<region>.<campaign>`.
pub fn task(region: &str, campaign: &str) -> String {
    format!("keywave.task.{region}.{campaign}")
}

/// Filter matching all tasks of one region: `keywave.task.<region>.>`.
pub fn task_region_filter(region: &str) -> String {
    format!("keywave.task.{region}.>")
}

/// Results from one region for one campaign: `keywave.result.<region>.<campaign>`.
pub fn result(region: &str, campaign: &str) -> String {
    format!("keywave.result.{region}.{campaign}")
}

/// Filter matching the results of one campaign from all regions.
pub fn result_campaign_filter(campaign: &str) -> String {
    format!("keywave.result.*.{campaign}")
}

/// A campaign event: `keywave.event.<campaign>.<kind>`.
pub fn event(campaign: &str, kind: &str) -> String {
    format!("keywave.event.{campaign}.{kind}")
}

/// Filter matching every event of one campaign.
pub fn event_campaign_filter(campaign: &str) -> String {
    format!("keywave.event.{campaign}.>")
}

/// A campaign's audit chain: `keywave.audit.<campaign>` (see [`crate::audit`]).
pub fn audit(campaign: &str) -> String {
    format!("keywave.audit.{campaign}")
}

/// Filter matching every audit chain.
pub const AUDIT_ALL: &str = "keywave.audit.>";

/// A leak detection from a named source: `keywave.detect.<source>`.
pub fn detect(source: &str) -> String {
    format!("keywave.detect.{source}")
}

/// Notice that a credential was rotated in a region (no secret, only fingerprints).
pub fn rotated(region: &str, credential: &str) -> String {
    format!("keywave.rotated.{region}.{credential}")
}

/// A consumer's attestation that it uses a credential's new secret.
pub fn attest(region: &str, credential: &str) -> String {
    format!("keywave.attest.{region}.{credential}")
}

/// A dead-lettered message from a region: `keywave.deadletter.<region>`.
pub fn dead_letter(region: &str) -> String {
    format!("keywave.deadletter.{region}")
}

/// A worker's presence heartbeat (core NATS, see [`crate::presence`]):
/// `keywave.worker.<region>`. The worker's id travels in the body, so any
/// id works and a region's workers need one publish permission.
pub fn worker_presence(region: &str) -> String {
    format!("keywave.worker.{region}")
}

/// Filter matching the presence heartbeats of every region.
pub const WORKER_PRESENCE_ALL: &str = "keywave.worker.*";

/// The operator API: `keywave.api.v1.<verb>`, e.g. `keywave.api.v1.campaign.start`.
pub fn api(verb: &str) -> String {
    format!("keywave.api.v1.{verb}")
}

/// The operator API as the active coordinator (the lease holder) alone
/// serves it: `keywave.coordinator.v1.active.<verb>`. Coordinators only: a
/// standby that receives a control verb on [`api`] forwards it here.
pub fn api_active(verb: &str) -> String {
    format!("keywave.coordinator.v1.active.{verb}")
}

/// The workers' admin service of one region: `keywave.admin.v1.<region>.<verb>`
/// (verbs in [`crate::admin::verbs`]), answered by one worker of the region.
pub fn admin(region: &str, verb: &str) -> String {
    format!("keywave.admin.v1.{region}.{verb}")
}

/// Filter matching every admin request of one region.
pub fn admin_region_filter(region: &str) -> String {
    format!("keywave.admin.v1.{region}.>")
}

/// A consumer agent's liveness ping (pre-flight):
/// `keywave.agent.v1.<region>.<consumer>.ping`, core NATS request/reply
/// answered by every agent running for that consumer in that region. Both
/// names are checked here: consumer ids in the inventory need not be subject
/// tokens, and an id such as `a.b` or `*` must not address other agents.
pub fn agent_ping(region: &str, consumer: &str) -> Result<String, crate::ids::IdError> {
    crate::ids::validate("region", region)?;
    crate::ids::validate("consumer", consumer)?;
    Ok(format!("keywave.agent.v1.{region}.{consumer}.ping"))
}

/// Parses `keywave.task.<region>.<campaign>` into its region and campaign.
pub fn parse_task(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("keywave.task.")?;
    let (region, campaign) = rest.split_once('.')?;
    if region.is_empty() || campaign.is_empty() || campaign.contains('.') {
        return None;
    }
    Some((region, campaign))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_subject_round_trips() {
        let s = task("eu", "c-1");
        assert_eq!(s, "keywave.task.eu.c-1");
        assert_eq!(parse_task(&s), Some(("eu", "c-1")));
        assert_eq!(parse_task("keywave.task.eu"), None);
        assert_eq!(parse_task("keywave.result.eu.c"), None);
        assert_eq!(parse_task("keywave.task.eu.c.extra"), None);
    }

    #[test]
    fn agent_ping_subject_is_token_safe() {
        assert_eq!(
            agent_ping("eu", "orders-api").unwrap(),
            "keywave.agent.v1.eu.orders-api.ping"
        );
        for bad in ["a.b", "*", ">", "orders api", ""] {
            assert!(
                agent_ping("eu", bad).is_err(),
                "consumer {bad:?} must be refused"
            );
        }
        assert!(agent_ping("e.u", "orders-api").is_err());
    }
}
