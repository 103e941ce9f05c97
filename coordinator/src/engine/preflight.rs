//! Pre-flight checks: before a wave's tasks are published, the
//! agent of every `attest` consumer of the wave's credentials is asked
//! whether it is alive: one core NATS request per (region, consumer) on
//! `keywave.agent.v1.<region>.<consumer>.ping`, at most [`CONCURRENCY`] at
//! a time, each with the coordinator's timeout. [`judge`] applies the
//! campaign's `preflight_max_unreachable`; the driver records the outcome as
//! a `preflight` event and pauses the campaign before the wave when it
//! fails. `http` consumers are not pre-flighted (only the workers of their
//! region can reach them), nor `none` consumers (nothing to ask).

use async_nats::{client::RequestErrorKind, Request};
use futures::StreamExt;
use keywave_common::{
    codec, planner, subjects,
    wire::{AgentStatus, PreflightAgent, PREFLIGHT_MAX_NAMED},
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

/// How long an agent has to answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pings in flight at once, per campaign.
pub const CONCURRENCY: usize = 64;

/// An agent to ask: (region, consumer id), ordered for stable reports.
pub type AgentKey = (String, String);

/// What became of one ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It answered: the credentials it watches and whether any of their
    /// health checks fails.
    Alive {
        credentials: HashSet<String>,
        healthy: bool,
    },
    /// No agent answered (why, for the operator).
    Unreachable(String),
}

/// Asks one agent; never fails, an error is an [`Answer::Unreachable`].
pub async fn ping(client: &async_nats::Client, key: &AgentKey, timeout: Duration) -> Answer {
    let (region, consumer) = key;
    let subject = match subjects::agent_ping(region, consumer) {
        Ok(s) => s,
        // Such an agent cannot exist: the agent refuses ids that are not tokens.
        Err(e) => return Answer::Unreachable(format!("no agent can answer: {e}")),
    };
    let request = Request::new().timeout(Some(timeout));
    let msg = match client.send_request(subject, request).await {
        Ok(m) => m,
        Err(e) => {
            return Answer::Unreachable(match e.kind() {
                RequestErrorKind::NoResponders => "no agent listening".into(),
                RequestErrorKind::TimedOut => format!("no answer within {timeout:?}"),
                _ => format!("ping failed: {e}"),
            })
        }
    };
    match codec::decode::<AgentStatus>(msg.headers.as_ref(), &msg.payload) {
        Ok(s) if s.consumer_id == *consumer && s.region == *region => Answer::Alive {
            healthy: s.healthy && s.credentials.iter().all(|c| c.healthy != Some(false)),
            credentials: s.credentials.into_iter().map(|c| c.id).collect(),
        },
        Ok(s) => Answer::Unreachable(format!(
            "answered as {} in {} instead",
            s.consumer_id, s.region
        )),
        Err(e) => Answer::Unreachable(format!("unreadable answer: {e}")),
    }
}

/// Asks every agent of `keys`, [`CONCURRENCY`] at a time.
pub async fn ping_all(
    client: &async_nats::Client,
    keys: &BTreeSet<AgentKey>,
    timeout: Duration,
) -> BTreeMap<AgentKey, Answer> {
    // Owned items: a stream of borrowed ones makes the driver's future not
    // `Send` for every lifetime (a known limitation of the compiler).
    let keys: Vec<AgentKey> = keys.iter().cloned().collect();
    futures::stream::iter(keys)
        .map(|k| {
            let client = client.clone();
            async move {
                let a = ping(&client, &k, timeout).await;
                (k, a)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// The pre-flight's findings, as the `preflight` event lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub asked: u64,
    /// Agents that did not answer (all of them counted, the first
    /// [`PREFLIGHT_MAX_NAMED`] named).
    pub unreachable: u64,
    pub unreachable_agents: Vec<PreflightAgent>,
    pub unhealthy_agents: Vec<PreflightAgent>,
    pub not_watching: Vec<PreflightAgent>,
}

impl Findings {
    /// Sorts the answers into the lists (not-watching pairs are added by
    /// the caller, who reads the plan).
    pub fn from_answers(answers: &BTreeMap<AgentKey, Answer>) -> Findings {
        let mut f = Findings {
            asked: answers.len() as u64,
            ..Default::default()
        };
        for ((region, consumer), a) in answers {
            let agent = |detail: Option<String>| PreflightAgent {
                consumer: consumer.clone(),
                region: region.clone(),
                credential: None,
                detail,
            };
            match a {
                Answer::Unreachable(why) => {
                    f.unreachable += 1;
                    if f.unreachable_agents.len() < PREFLIGHT_MAX_NAMED {
                        f.unreachable_agents.push(agent(Some(why.clone())));
                    }
                }
                Answer::Alive { healthy: false, .. } => {
                    if f.unhealthy_agents.len() < PREFLIGHT_MAX_NAMED {
                        f.unhealthy_agents.push(agent(None));
                    }
                }
                Answer::Alive { .. } => {}
            }
        }
        f
    }

    /// Records that the agent of `key` answered without watching
    /// `credential` (first [`PREFLIGHT_MAX_NAMED`] only).
    pub fn add_not_watching(&mut self, key: &AgentKey, credential: &str) {
        if self.not_watching.len() < PREFLIGHT_MAX_NAMED {
            self.not_watching.push(PreflightAgent {
                consumer: key.1.clone(),
                region: key.0.clone(),
                credential: Some(credential.to_string()),
                detail: None,
            });
        }
    }
}

/// The outcome of [`judge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Unreachable agents within the threshold: the wave may start.
    pub passed: bool,
    /// For the event and, when it failed, the campaign's reason.
    pub reason: String,
}

/// Applies the threshold: the pre-flight fails when unreachable / asked is
/// strictly greater than `max_unreachable` (the failure-budget rule, see
/// [`planner::wave_failed`]), so with 0 every agent must answer.
pub fn judge(wave: u32, f: &Findings, max_unreachable: f64) -> Verdict {
    let allowed = format!("{:.1}%", max_unreachable * 100.0);
    if f.unreachable == 0 {
        return Verdict {
            passed: true,
            reason: format!(
                "pre-flight: {} of {} consumer agents answered",
                f.asked, f.asked
            ),
        };
    }
    let mut names: Vec<String> = f
        .unreachable_agents
        .iter()
        .map(ToString::to_string)
        .collect();
    let unnamed = f.unreachable - names.len() as u64;
    if unnamed > 0 {
        names.push(format!("and {unnamed} more"));
    }
    let head = format!(
        "pre-flight: {} of {} consumer agents unreachable ({})",
        f.unreachable,
        f.asked,
        names.join(", ")
    );
    if planner::wave_failed(f.unreachable, f.asked, max_unreachable) {
        Verdict {
            passed: false,
            reason: format!("{head} > allowed {allowed}; wave {wave} not started"),
        }
    } else {
        Verdict {
            passed: true,
            reason: format!("{head} <= allowed {allowed}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(region: &str, consumer: &str) -> AgentKey {
        (region.to_string(), consumer.to_string())
    }

    fn alive(creds: &[&str], healthy: bool) -> Answer {
        Answer::Alive {
            credentials: creds.iter().map(|c| c.to_string()).collect(),
            healthy,
        }
    }

    fn findings(up: usize, down: &[&str]) -> Findings {
        let mut answers = BTreeMap::new();
        for i in 0..up {
            answers.insert(key("eu", &format!("up-{i}")), alive(&["db"], true));
        }
        for d in down {
            answers.insert(
                key("eu", d),
                Answer::Unreachable("no agent listening".into()),
            );
        }
        Findings::from_answers(&answers)
    }

    #[test]
    fn every_agent_must_answer_by_default() {
        let f = findings(2, &["orders-api"]);
        assert_eq!((f.asked, f.unreachable), (3, 1));
        let v = judge(0, &f, 0.0);
        assert!(!v.passed);
        assert_eq!(
            v.reason,
            "pre-flight: 1 of 3 consumer agents unreachable (orders-api in eu) > allowed 0.0%; wave 0 not started"
        );
        let v = judge(4, &findings(3, &[]), 0.0);
        assert!(v.passed);
        assert_eq!(v.reason, "pre-flight: 3 of 3 consumer agents answered");
    }

    #[test]
    fn threshold_is_a_strict_fraction_of_the_agents_asked() {
        // 1 of 3 is within 50%; 2 of 3 is not.
        let v = judge(1, &findings(2, &["a"]), 0.5);
        assert!(v.passed, "{}", v.reason);
        assert!(v.reason.ends_with("<= allowed 50.0%"), "{}", v.reason);
        assert!(!judge(1, &findings(1, &["a", "b"]), 0.5).passed);
        // Exactly at the threshold passes (as the failure budget does).
        assert!(judge(1, &findings(1, &["a"]), 0.5).passed);
        assert!(judge(1, &findings(0, &["a"]), 1.0).passed);
    }

    #[test]
    fn reasons_name_a_bounded_number_of_agents() {
        let down: Vec<String> = (0..PREFLIGHT_MAX_NAMED + 5)
            .map(|i| format!("d{i:02}"))
            .collect();
        let refs: Vec<&str> = down.iter().map(String::as_str).collect();
        let f = findings(0, &refs);
        assert_eq!(f.unreachable_agents.len(), PREFLIGHT_MAX_NAMED);
        assert_eq!(f.unreachable, down.len() as u64);
        let v = judge(0, &f, 0.0);
        assert!(v.reason.contains("d00 in eu, d01 in eu"), "{}", v.reason);
        assert!(v.reason.contains(", and 5 more)"), "{}", v.reason);
    }

    #[test]
    fn unhealthy_agents_are_listed_but_reachable() {
        let mut answers = BTreeMap::new();
        answers.insert(key("us", "web"), alive(&["db"], false));
        answers.insert(key("eu", "api"), alive(&["db"], true));
        let mut f = Findings::from_answers(&answers);
        assert_eq!(f.unreachable, 0);
        assert_eq!(f.unhealthy_agents.len(), 1);
        assert_eq!(f.unhealthy_agents[0].to_string(), "web in us");
        f.add_not_watching(&key("eu", "api"), "cache");
        assert_eq!(f.not_watching[0].credential.as_deref(), Some("cache"));
        assert!(judge(0, &f, 0.0).passed);
    }
}
