//! The rotation and rollback protocols as one pure function, [`next`]: from
//! the task, the credential's record and what this delivery has done so far
//! ([`Progress`]), the one thing to do next. No I/O and no clock: the executor
//! in `protocol.rs` performs each [`Next`] and notes what it saw.
//! Rotation: stage → set → test → promote → revoke → verify; rollback
//! (continuity only): set the previous secret back → test → swap.

use crate::store::{Applied, Record, Version};
use crate::targets::AuthCheck;
use keywave_common::wire::{Outcome, Step, Strategy, TaskAction};

/// What the machine needs to know about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task<'a> {
    pub task_id: &'a str,
    pub action: TaskAction,
    pub strategy: Strategy,
}

/// A secret slot of the record, as the executor finds it when it acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Pending,
    Current,
    Previous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOp {
    /// Make a secret valid next to the others (continuity).
    Add,
    /// Make a secret the only valid one.
    Replace,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// An earlier delivery of this task staged a secret: use it again.
    Reuse,
    /// Generate a secret and record it as PENDING (a durable write).
    Generate,
}

/// Why a task fails on what it found (not on an I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NewSecretRejected,
    OldSecretStillAccepted,
    NoPrevious,
    /// A random wrong secret opened the login: the target cannot refuse.
    AcceptsAnySecret,
    /// The record says this task was promoted, but CURRENT is not its secret.
    PromotedNotCurrent,
    /// A step the protocol never reaches from there (a bug, not a record).
    OutOfOrder,
}

/// The next thing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read the record (at the start, and again after losing a CAS race).
    Load,
    /// Deadline check and fault point, then the step's work starts.
    Enter(Step),
    /// The step's work is done: timing and fault point.
    Complete(Step),
    Stage(Staging),
    /// Which login a slot's secret opens (`None`: it opens none).
    Probe(Slot),
    /// Whether a slot's secret authenticates, to learn what an earlier
    /// delivery did.
    ReadBack(Slot),
    /// Whether the secret being retired is rejected, reported in the result.
    ProveRejected(Slot),
    /// Whether a random wrong secret is refused for the login: unless it is,
    /// no answer of the target proves anything (see [`Progress::canary`]).
    Canary,
    Target(TargetOp, Slot),
    /// PREVIOUS = CURRENT, CURRENT = PENDING (a durable write).
    Promote,
    /// Swap CURRENT and PREVIOUS (the rollback's one durable write).
    Restore,
    /// Announce CURRENT (advisory, when a detection key is configured).
    Announce,
    VerifyConsumers {
        required: bool,
    },
    /// The record shows this task promoted by an earlier delivery: carry on
    /// from there.
    Resume,
    /// The record shows this task applied earlier: report it again, with
    /// this outcome, touching nothing.
    Report(Outcome),
    Finish(Outcome),
    Fail(Refusal),
}

/// What this delivery has done and seen. Reset whole when a CAS conflict
/// sends the task back to a fresh read; the `step_*` fields are reset by
/// [`Progress::enter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub read: bool,
    /// The last step completed in this delivery (or resumed from).
    pub done: Step,
    /// The step entered and not completed yet.
    pub open: Option<Step>,
    /// Which login the secret being made CURRENT was last seen to open.
    pub login: Option<String>,
    pub announced: bool,
    pub consumers_verified: bool,
    /// What the target answered to a random wrong secret in this delivery.
    /// Nothing is read back as "set before", promoted or restored until it
    /// answered `Rejected`.
    pub canary: Option<AuthCheck>,
    pub step_staged: bool,
    pub step_probed: bool,
    /// A target operation was done in the open step.
    pub step_changed: bool,
    pub step_previous: Option<AuthCheck>,
    pub step_current: Option<AuthCheck>,
    pub step_proof: Option<AuthCheck>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            read: false,
            done: Step::Received,
            open: None,
            login: None,
            announced: false,
            consumers_verified: false,
            canary: None,
            step_staged: false,
            step_probed: false,
            step_changed: false,
            step_previous: None,
            step_current: None,
            step_proof: None,
        }
    }
}

impl Progress {
    pub fn enter(&mut self, step: Step) {
        *self = Progress {
            read: self.read,
            done: self.done,
            open: Some(step),
            login: self.login.take(),
            announced: self.announced,
            consumers_verified: self.consumers_verified,
            canary: self.canary,
            ..Progress::default()
        };
    }

    pub fn complete(&mut self, step: Step) {
        self.done = step;
        self.open = None;
    }
}

/// The one next thing to do for `task`, given `rec` as last read or written.
pub fn next(task: &Task, rec: &Record, p: &Progress) -> Next {
    if !p.read {
        return Next::Load;
    }
    match task.action {
        TaskAction::Rotate => rotate(task, rec, p),
        TaskAction::Rollback => rollback(task, rec, p),
    }
}

/// Until the target refused a wrong secret in this delivery: ask it, or
/// fail when it let the wrong secret in.
fn canary(p: &Progress) -> Next {
    match p.canary {
        Some(AuthCheck::Accepted) => Next::Fail(Refusal::AcceptsAnySecret),
        _ => Next::Canary,
    }
}

fn refused_wrong(p: &Progress) -> bool {
    p.canary == Some(AuthCheck::Rejected)
}

fn owned_by(task: &Task, v: &Option<Version>) -> bool {
    v.as_ref()
        .is_some_and(|v| v.task_id.as_deref() == Some(task.task_id))
}

fn rotate(t: &Task, rec: &Record, p: &Progress) -> Next {
    use Step::*;
    let continuity = t.strategy == Strategy::Continuity;
    let Some(open) = p.open else {
        return match p.done {
            Received => match rec.applied(t.task_id) {
                // Promoted by an earlier delivery whose result may be lost:
                // revoke and verify again (both idempotent).
                Some(a)
                    if rec.last_task.as_deref() == Some(t.task_id)
                        && a.action == TaskAction::Rotate =>
                {
                    Next::Resume
                }
                // Superseded by a later task: report, touch nothing.
                Some(a) => Next::Report(match a.action {
                    TaskAction::Rotate => Outcome::Succeeded,
                    TaskAction::Rollback => Outcome::RolledBack,
                }),
                None => Next::Enter(Staged),
            },
            Staged => Next::Enter(Set),
            Set => Next::Enter(Tested),
            Tested => Next::Enter(Promoted),
            // A resumed delivery announces again: the first may have stopped
            // before its notice.
            Promoted if !p.announced && !owned_by(t, &rec.current) => {
                Next::Fail(Refusal::PromotedNotCurrent)
            }
            Promoted if !p.announced => Next::Announce,
            // Continuity: no consumer may lose its secret; nothing is revoked
            // until every one is proven on the new one.
            Promoted if continuity && !p.consumers_verified => {
                Next::VerifyConsumers { required: true }
            }
            Promoted => Next::Enter(Revoked),
            Revoked => Next::Enter(Verified),
            // Containment: the old secret is gone already; consumers are
            // checked after the fact and never block.
            Verified if !continuity && !p.consumers_verified => {
                Next::VerifyConsumers { required: false }
            }
            Verified => Next::Finish(Outcome::Succeeded),
            Restored => Next::Fail(Refusal::OutOfOrder),
        };
    };
    match open {
        // Only a target that refuses a wrong secret can tell anything: ask
        // before staging, reading back or promoting.
        Staged | Set | Promoted if !refused_wrong(p) => canary(p),
        Staged if p.step_staged => Next::Complete(Staged),
        Staged if owned_by(t, &rec.pending) => Next::Stage(Staging::Reuse),
        // Staged by a task that never promoted it; it may have been added at
        // the target, and continuity would leave it valid (a containment set
        // replaces it anyway).
        Staged if rec.pending.is_some() && continuity && !p.step_changed => {
            Next::Target(TargetOp::Remove, Slot::Pending)
        }
        Staged => Next::Stage(Staging::Generate),
        // A staged secret that authenticates was set before a crash.
        Set if !p.step_probed => Next::Probe(Slot::Pending),
        Set if p.login.is_some() || p.step_changed => Next::Complete(Set),
        Set if continuity => Next::Target(TargetOp::Add, Slot::Pending),
        Set => Next::Target(TargetOp::Replace, Slot::Pending),
        Tested if p.login.is_some() => Next::Complete(Tested),
        Tested if !p.step_probed => Next::Probe(Slot::Pending),
        Tested => Next::Fail(Refusal::NewSecretRejected),
        Promoted if rec.applied(t.task_id).is_none() => Next::Promote,
        Promoted if !p.announced => Next::Announce,
        Promoted => Next::Complete(Promoted),
        Revoked if p.step_changed || !continuity => Next::Complete(Revoked),
        Revoked if rec.previous.is_some() => Next::Target(TargetOp::Remove, Slot::Previous),
        // Never enrolled: nobody knows what else is valid, so the new secret
        // becomes the only one.
        Revoked => Next::Target(TargetOp::Replace, Slot::Current),
        Verified if rec.previous.is_none() => Next::Complete(Verified),
        Verified => match p.step_proof {
            None => Next::ProveRejected(Slot::Previous),
            Some(AuthCheck::Accepted) => Next::Fail(Refusal::OldSecretStillAccepted),
            Some(AuthCheck::Rejected) => Next::Complete(Verified),
        },
        Received | Restored => Next::Fail(Refusal::OutOfOrder),
    }
}

fn rollback(t: &Task, rec: &Record, p: &Progress) -> Next {
    use Step::*;
    let Some(open) = p.open else {
        let applied = rec.applied(t.task_id).is_some();
        let last = rec.last_task.as_deref() == Some(t.task_id);
        let exposed = t.strategy == Strategy::Containment
            || rec
                .current
                .as_ref()
                .is_some_and(|v| v.strategy == Some(Strategy::Containment));
        return match p.done {
            // Restored by an earlier delivery, which may have stopped before
            // its notice; once a later task changed CURRENT, nothing to announce.
            Received if applied && last && rec.current.is_some() && !p.announced => Next::Announce,
            Received if applied => Next::Report(Outcome::RolledBack),
            // Never restore an exposed secret.
            Received if exposed => Next::Finish(Outcome::RollbackRefused),
            Received if rec.previous.is_none() || rec.current.is_none() => {
                Next::Fail(Refusal::NoPrevious)
            }
            Received => Next::Enter(Set),
            Set => Next::Enter(Tested),
            Tested => Next::Enter(Restored),
            Restored => Next::Finish(Outcome::RolledBack),
            Staged | Promoted | Revoked | Verified => Next::Fail(Refusal::OutOfOrder),
        };
    };
    use AuthCheck::{Accepted, Rejected};
    match open {
        // Only a target that refuses a wrong secret can tell anything.
        Set | Restored if !refused_wrong(p) => canary(p),
        // Set was done by an earlier delivery when the previous secret logs
        // in again and the rolled-back one does not (after a complete
        // rotation, only the reverse can be true).
        Set if p.step_changed => Next::Complete(Set),
        Set => match (p.step_previous, p.step_current) {
            (None, _) => Next::ReadBack(Slot::Previous),
            (Some(Accepted), None) => Next::ReadBack(Slot::Current),
            (Some(Accepted), Some(Rejected)) => Next::Complete(Set),
            _ => Next::Target(TargetOp::Replace, Slot::Previous),
        },
        Tested if !p.step_probed => Next::Probe(Slot::Previous),
        Tested if p.login.is_none() => Next::Fail(Refusal::NewSecretRejected),
        Tested => match p.step_proof {
            None => Next::ProveRejected(Slot::Current),
            Some(Accepted) => Next::Fail(Refusal::OldSecretStillAccepted),
            Some(Rejected) => Next::Complete(Tested),
        },
        Restored if rec.applied(t.task_id).is_none() => Next::Restore,
        Restored if !p.announced => Next::Announce,
        Restored => Next::Complete(Restored),
        Received | Staged | Promoted | Revoked | Verified => Next::Fail(Refusal::OutOfOrder),
    }
}

/// The promote write: PREVIOUS = CURRENT, CURRENT = PENDING (proven to open
/// `login`), remembered as applied by `task`. `None` when nothing is staged.
pub fn promote(
    rec: &mut Record,
    task: &Task,
    login: Option<String>,
    fingerprints: (Option<String>, Option<String>),
    now_ms: u64,
) -> Option<()> {
    let pending = rec.pending.take()?;
    rec.previous = rec.current.take();
    rec.current = Some(Version {
        since_ms: now_ms,
        login,
        ..pending
    });
    rec.push_applied(applied(task, Step::Promoted, fingerprints, now_ms));
    Some(())
}

/// The rollback's swap: CURRENT = PREVIOUS (proven to open `login`),
/// PREVIOUS = CURRENT, nothing staged (the replace at the target invalidated
/// it), remembered as applied by `task`. `None` without both versions.
pub fn restore(
    rec: &mut Record,
    task: &Task,
    login: Option<String>,
    fingerprints: (Option<String>, Option<String>),
    now_ms: u64,
) -> Option<()> {
    let (Some(prev), Some(cur)) = (rec.previous.take(), rec.current.take()) else {
        return None;
    };
    rec.current = Some(Version {
        since_ms: now_ms,
        login,
        ..prev
    });
    rec.previous = Some(Version {
        since_ms: now_ms,
        ..cur
    });
    rec.pending = None;
    rec.push_applied(applied(task, Step::Restored, fingerprints, now_ms));
    Some(())
}

fn applied(
    task: &Task,
    step: Step,
    (new, old): (Option<String>, Option<String>),
    now_ms: u64,
) -> Applied {
    Applied {
        task_id: task.task_id.to_string(),
        action: task.action,
        step,
        at_ms: now_ms,
        new_fingerprint: new,
        old_fingerprint: old,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::crypto::Secret;
    use std::collections::HashSet;
    use Next::*;
    use Slot::*;
    use Step::*;

    const T: &str = "t1";

    fn task(action: TaskAction, strategy: Strategy) -> Task<'static> {
        Task {
            task_id: T,
            action,
            strategy,
        }
    }

    fn rotate(strategy: Strategy) -> Task<'static> {
        task(TaskAction::Rotate, strategy)
    }

    fn rollback() -> Task<'static> {
        task(TaskAction::Rollback, Strategy::Continuity)
    }

    fn ver(secret: &str, task_id: Option<&str>, strategy: Option<Strategy>) -> Version {
        Version {
            secret: Secret::new(secret.into()),
            fingerprint: format!("fp-{secret}"),
            task_id: task_id.map(String::from),
            since_ms: 0,
            strategy,
            login: None,
        }
    }

    fn enrolled() -> Record {
        Record {
            current: Some(ver("old", None, None)),
            ..Record::default()
        }
    }

    fn applied(rec: &mut Record, task_id: &str, action: TaskAction) {
        rec.push_applied(Applied {
            task_id: task_id.into(),
            action,
            step: match action {
                TaskAction::Rotate => Promoted,
                TaskAction::Rollback => Restored,
            },
            at_ms: 0,
            new_fingerprint: None,
            old_fingerprint: None,
        });
    }

    /// A record right after this task's promote of "new" over "old".
    fn promoted(strategy: Strategy) -> Record {
        let mut rec = Record {
            current: Some(ver("new", Some(T), Some(strategy))),
            previous: Some(ver("old", None, None)),
            ..Record::default()
        };
        applied(&mut rec, T, TaskAction::Rotate);
        rec
    }

    fn read() -> Progress {
        Progress {
            read: true,
            ..Progress::default()
        }
    }

    /// Progress inside `step`, after the steps before it.
    fn inside(done: Step, step: Step) -> Progress {
        let mut p = read();
        p.done = done;
        p.announced = done >= Promoted;
        p.canary = Some(AuthCheck::Rejected);
        p.enter(step);
        p
    }

    /// Plays the machine against a model of the target (the set of secrets it
    /// accepts) with the executor's effects on the record, until the task
    /// ends; returns every step decided.
    fn play(t: &Task, mut rec: Record, valid: &[&str]) -> (Vec<Next>, Record, HashSet<String>) {
        let mut valid: HashSet<String> = valid.iter().map(|s| s.to_string()).collect();
        let mut p = Progress::default();
        let mut seen = Vec::new();
        let name = |rec: &Record, s: Slot| {
            let v = match s {
                Pending => &rec.pending,
                Current => &rec.current,
                Previous => &rec.previous,
            };
            v.as_ref()
                .expect("a filled slot")
                .secret
                .expose()
                .to_string()
        };
        // "*": the target lets any secret in.
        let check =
            |valid: &HashSet<String>, n: &str| match valid.contains(n) || valid.contains("*") {
                true => AuthCheck::Accepted,
                false => AuthCheck::Rejected,
            };
        for _ in 0..100 {
            let n = next(t, &rec, &p);
            seen.push(n);
            match n {
                Load => p.read = true,
                Enter(s) => p.enter(s),
                Complete(s) => p.complete(s),
                Stage(how) => {
                    if how == Staging::Generate {
                        rec.pending = Some(ver("new", Some(T), Some(t.strategy)));
                    }
                    p.step_staged = true;
                }
                Canary => p.canary = Some(check(&valid, "wrong")),
                Probe(s) => {
                    p.login = (check(&valid, &name(&rec, s)) == AuthCheck::Accepted)
                        .then(|| "login".into());
                    p.step_probed = true;
                }
                ReadBack(Previous) => p.step_previous = Some(check(&valid, &name(&rec, Previous))),
                ReadBack(s) => p.step_current = Some(check(&valid, &name(&rec, s))),
                ProveRejected(s) => p.step_proof = Some(check(&valid, &name(&rec, s))),
                Target(op, s) => {
                    let n = name(&rec, s);
                    match op {
                        TargetOp::Add => {
                            valid.insert(n);
                        }
                        TargetOp::Replace => valid = HashSet::from([n]),
                        TargetOp::Remove => {
                            valid.remove(&n);
                        }
                    }
                    p.step_changed = true;
                }
                Promote => super::promote(&mut rec, t, p.login.clone(), (None, None), 0)
                    .expect("a staged secret"),
                Restore => super::restore(&mut rec, t, p.login.clone(), (None, None), 0)
                    .expect("two versions"),
                Announce => p.announced = true,
                VerifyConsumers { .. } => p.consumers_verified = true,
                Resume => p.done = Promoted,
                Report(_) | Finish(_) | Fail(_) => return (seen, rec, valid),
            }
        }
        panic!("no end after 100 steps: {seen:?}");
    }

    fn steps(t: &Task, rec: Record, valid: &[&str]) -> Vec<Next> {
        play(t, rec, valid).0
    }

    #[test]
    fn nothing_happens_before_the_record_is_read() {
        for t in [rotate(Strategy::Continuity), rollback()] {
            assert_eq!(next(&t, &enrolled(), &Progress::default()), Load);
        }
    }

    #[test]
    fn continuity_rotation_adds_then_revokes_after_the_consumers() {
        let t = rotate(Strategy::Continuity);
        let (seen, rec, valid) = play(&t, enrolled(), &["old"]);
        assert_eq!(
            seen,
            vec![
                Load,
                Enter(Staged),
                Canary,
                Stage(Staging::Generate),
                Complete(Staged),
                Enter(Set),
                Probe(Pending),
                Target(TargetOp::Add, Pending),
                Complete(Set),
                Enter(Tested),
                Probe(Pending),
                Complete(Tested),
                Enter(Promoted),
                Promote,
                Announce,
                Complete(Promoted),
                VerifyConsumers { required: true },
                Enter(Revoked),
                Target(TargetOp::Remove, Previous),
                Complete(Revoked),
                Enter(Verified),
                ProveRejected(Previous),
                Complete(Verified),
                Finish(Outcome::Succeeded),
            ]
        );
        assert_eq!(valid, HashSet::from(["new".to_string()]));
        assert_eq!(rec.last_task.as_deref(), Some(T));
    }

    #[test]
    fn containment_rotation_replaces_at_set_and_checks_consumers_last() {
        let t = rotate(Strategy::Containment);
        let seen = steps(&t, enrolled(), &["old"]);
        assert!(seen.contains(&Target(TargetOp::Replace, Pending)));
        let tail = &seen[seen.len() - 8..];
        assert_eq!(
            tail,
            [
                Complete(Promoted),
                Enter(Revoked),
                Complete(Revoked),
                Enter(Verified),
                ProveRejected(Previous),
                Complete(Verified),
                VerifyConsumers { required: false },
                Finish(Outcome::Succeeded),
            ]
        );
    }

    #[test]
    fn a_staged_secret_of_this_task_is_reused_and_not_set_again_when_it_authenticates() {
        let t = rotate(Strategy::Continuity);
        let mut rec = enrolled();
        rec.pending = Some(ver("new", Some(T), Some(Strategy::Continuity)));
        let seen = steps(&t, rec.clone(), &["old", "new"]);
        assert_eq!(
            seen[3..13],
            [
                Stage(Staging::Reuse),
                Complete(Staged),
                Enter(Set),
                Probe(Pending),
                Complete(Set),
                Enter(Tested),
                Complete(Tested),
                Enter(Promoted),
                Promote,
                Announce,
            ]
        );
        // Staged but never set (a crash after stage): set it, test it.
        let seen = steps(&t, rec, &["old"]);
        assert_eq!(seen[3], Stage(Staging::Reuse));
        assert!(seen.contains(&Target(TargetOp::Add, Pending)));
    }

    #[test]
    fn an_abandoned_staged_secret_is_removed_first_under_continuity_only() {
        let mut rec = enrolled();
        rec.pending = Some(ver("stale", Some("t0"), Some(Strategy::Continuity)));
        let seen = steps(
            &rotate(Strategy::Continuity),
            rec.clone(),
            &["old", "stale"],
        );
        assert_eq!(
            seen[1..6],
            [
                Enter(Staged),
                Canary,
                Target(TargetOp::Remove, Pending),
                Stage(Staging::Generate),
                Complete(Staged),
            ]
        );
        let seen = steps(&rotate(Strategy::Containment), rec, &["old", "stale"]);
        assert_eq!(
            seen[1..4],
            [Enter(Staged), Canary, Stage(Staging::Generate)]
        );
    }

    #[test]
    fn a_new_secret_that_does_not_authenticate_fails_the_test() {
        let t = rotate(Strategy::Continuity);
        let mut rec = enrolled();
        rec.pending = Some(ver("new", Some(T), Some(Strategy::Continuity)));
        let mut p = inside(Set, Tested);
        assert_eq!(next(&t, &rec, &p), Probe(Pending));
        p.step_probed = true;
        assert_eq!(next(&t, &rec, &p), Fail(Refusal::NewSecretRejected));
    }

    #[test]
    fn after_promote_this_delivery_resumes_revoke_and_verify() {
        let t = rotate(Strategy::Continuity);
        let (seen, _, valid) = play(&t, promoted(Strategy::Continuity), &["old", "new"]);
        assert_eq!(
            seen[..5],
            [
                Load,
                Resume,
                Announce,
                VerifyConsumers { required: true },
                Enter(Revoked)
            ]
        );
        assert_eq!(seen.last(), Some(&Finish(Outcome::Succeeded)));
        assert!(!seen.iter().any(|n| matches!(n, Stage(_) | Promote)));
        assert_eq!(valid, HashSet::from(["new".to_string()]));

        // After a crash after revoke, the second revoke is harmless.
        let (_, _, valid) = play(&t, promoted(Strategy::Continuity), &["new"]);
        assert_eq!(valid.len(), 1);
    }

    #[test]
    fn a_promoted_task_whose_secret_is_not_current_is_an_inconsistency() {
        let t = rotate(Strategy::Continuity);
        let mut rec = promoted(Strategy::Continuity);
        rec.current = Some(ver("other", Some("t9"), None));
        let mut p = read();
        p.done = Promoted;
        assert_eq!(next(&t, &rec, &p), Fail(Refusal::PromotedNotCurrent));
    }

    #[test]
    fn a_task_superseded_by_a_later_one_is_reported_untouched() {
        let mut rec = promoted(Strategy::Continuity);
        applied(&mut rec, "t2", TaskAction::Rotate);
        assert_eq!(
            steps(&rotate(Strategy::Continuity), rec.clone(), &["x"]),
            [Load, Report(Outcome::Succeeded)]
        );
        // A rollback task remembered but not last: reported, not announced.
        let mut rec = enrolled();
        applied(&mut rec, T, TaskAction::Rollback);
        applied(&mut rec, "t2", TaskAction::Rotate);
        assert_eq!(
            steps(&rotate(Strategy::Continuity), rec.clone(), &[]),
            [Load, Report(Outcome::RolledBack)]
        );
        assert_eq!(
            steps(&rollback(), rec, &[]),
            [Load, Report(Outcome::RolledBack)]
        );
    }

    #[test]
    fn revoke_without_an_enrolled_secret_leaves_only_the_new_one() {
        let t = rotate(Strategy::Continuity);
        let (seen, _, valid) = play(&t, Record::default(), &["unknown"]);
        assert!(seen.contains(&Target(TargetOp::Replace, Current)));
        assert!(!seen.iter().any(|n| matches!(n, ProveRejected(_))));
        assert_eq!(valid, HashSet::from(["new".to_string()]));
    }

    #[test]
    fn an_old_secret_still_accepted_after_revoke_fails_verification() {
        let t = rotate(Strategy::Continuity);
        let rec = promoted(Strategy::Continuity);
        let mut p = inside(Revoked, Verified);
        assert_eq!(next(&t, &rec, &p), ProveRejected(Previous));
        p.step_proof = Some(AuthCheck::Accepted);
        assert_eq!(next(&t, &rec, &p), Fail(Refusal::OldSecretStillAccepted));
        p.step_proof = Some(AuthCheck::Rejected);
        assert_eq!(next(&t, &rec, &p), Complete(Verified));
    }

    #[test]
    fn entering_a_step_forgets_the_previous_steps_observations_only() {
        let mut p = read();
        p.enter(Set);
        p.step_probed = true;
        p.step_changed = true;
        p.step_previous = Some(AuthCheck::Accepted);
        p.login = Some("app".into());
        p.announced = true;
        p.complete(Set);
        p.enter(Tested);
        assert_eq!(
            p,
            Progress {
                read: true,
                done: Set,
                open: Some(Tested),
                login: Some("app".into()),
                announced: true,
                ..Progress::default()
            }
        );
    }

    /// A rotated credential: "new" CURRENT (by `by`), "old" PREVIOUS.
    fn rotated(by: Strategy) -> Record {
        let mut rec = promoted(by);
        rec.current.as_mut().unwrap().task_id = Some("t0".into());
        rec.history.clear();
        applied(&mut rec, "t0", TaskAction::Rotate);
        rec
    }

    #[test]
    fn rollback_restores_the_previous_secret_then_swaps() {
        let (seen, rec, valid) = play(&rollback(), rotated(Strategy::Continuity), &["new"]);
        assert_eq!(
            seen,
            [
                Load,
                Enter(Set),
                Canary,
                ReadBack(Previous),
                Target(TargetOp::Replace, Previous),
                Complete(Set),
                Enter(Tested),
                Probe(Previous),
                ProveRejected(Current),
                Complete(Tested),
                Enter(Restored),
                Restore,
                Announce,
                Complete(Restored),
                Finish(Outcome::RolledBack),
            ]
        );
        assert_eq!(valid, HashSet::from(["old".to_string()]));
        assert_eq!(rec.current.unwrap().secret.expose(), "old");
    }

    #[test]
    fn rollback_skips_the_set_an_earlier_delivery_did() {
        let seen = steps(&rollback(), rotated(Strategy::Continuity), &["old"]);
        assert_eq!(
            seen[1..6],
            [
                Enter(Set),
                Canary,
                ReadBack(Previous),
                ReadBack(Current),
                Complete(Set)
            ]
        );
        // Both valid (continuity mid-rotation): the set is not skipped.
        let seen = steps(&rollback(), rotated(Strategy::Continuity), &["old", "new"]);
        assert_eq!(seen[5], Target(TargetOp::Replace, Previous));
    }

    #[test]
    fn rollback_fails_when_the_restore_does_not_take() {
        let t = rollback();
        let rec = rotated(Strategy::Continuity);
        let mut p = inside(Set, Tested);
        p.step_probed = true;
        assert_eq!(next(&t, &rec, &p), Fail(Refusal::NewSecretRejected));
        p.login = Some("app".into());
        p.step_proof = Some(AuthCheck::Accepted);
        assert_eq!(next(&t, &rec, &p), Fail(Refusal::OldSecretStillAccepted));
    }

    #[test]
    fn rollback_is_refused_for_containment_and_fails_without_previous() {
        let rb = rollback();
        let contained = task(TaskAction::Rollback, Strategy::Containment);
        assert_eq!(
            steps(&contained, rotated(Strategy::Continuity), &[]),
            [Load, Finish(Outcome::RollbackRefused)]
        );
        assert_eq!(
            steps(&rb, rotated(Strategy::Containment), &[]),
            [Load, Finish(Outcome::RollbackRefused)]
        );
        assert_eq!(
            steps(&rb, enrolled(), &[]),
            [Load, Fail(Refusal::NoPrevious)]
        );
        assert_eq!(
            steps(&rb, Record::default(), &[]),
            [Load, Fail(Refusal::NoPrevious)]
        );
    }

    #[test]
    fn a_rollback_applied_earlier_announces_again_only_while_it_is_last() {
        let mut rec = rotated(Strategy::Continuity);
        applied(&mut rec, T, TaskAction::Rollback);
        assert_eq!(
            steps(&rollback(), rec.clone(), &[]),
            [Load, Announce, Report(Outcome::RolledBack)]
        );
        applied(&mut rec, "t2", TaskAction::Rotate);
        assert_eq!(
            steps(&rollback(), rec, &[]),
            [Load, Report(Outcome::RolledBack)]
        );
    }

    #[test]
    fn steps_the_protocols_never_reach_are_refused() {
        let rec = enrolled();
        let mut p = read();
        p.done = Restored;
        assert_eq!(
            next(&rotate(Strategy::Continuity), &rec, &p),
            Fail(Refusal::OutOfOrder)
        );
        p.done = Revoked;
        assert_eq!(next(&rollback(), &rec, &p), Fail(Refusal::OutOfOrder));
        let p = inside(Received, Staged);
        assert_eq!(next(&rollback(), &rec, &p), Fail(Refusal::OutOfOrder));
    }
    /// Every combination of record and target state the protocols can meet
    /// (and some they cannot) ends within a bounded number of steps, and never
    /// in a step out of order.
    #[test]
    fn every_start_ends_without_a_step_out_of_order() {
        let versions = |who: &str| {
            vec![
                None,
                Some(ver(who, None, None)),
                Some(ver(who, Some(T), Some(Strategy::Continuity))),
                Some(ver(who, Some("t0"), Some(Strategy::Containment))),
            ]
        };
        let histories: [&[(&str, TaskAction)]; 4] = [
            &[],
            &[(T, TaskAction::Rotate)],
            &[(T, TaskAction::Rollback)],
            &[(T, TaskAction::Rotate), ("t2", TaskAction::Rotate)],
        ];
        let targets: [&[&str]; 4] = [&[], &["old"], &["new"], &["old", "new", "stale"]];
        let mut runs = 0;
        for action in [TaskAction::Rotate, TaskAction::Rollback] {
            for strategy in [Strategy::Continuity, Strategy::Containment] {
                let t = task(action, strategy);
                for current in versions("cur") {
                    for previous in versions("old") {
                        for pending in versions("stale") {
                            for history in histories {
                                for valid in targets {
                                    let mut rec = Record {
                                        current: current.clone(),
                                        previous: previous.clone(),
                                        pending: pending.clone(),
                                        ..Record::default()
                                    };
                                    for (id, a) in history {
                                        applied(&mut rec, id, *a);
                                    }
                                    let seen = steps(&t, rec, valid);
                                    assert!(
                                        !seen.contains(&Fail(Refusal::OutOfOrder)),
                                        "{t:?} {seen:?}"
                                    );
                                    runs += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(runs, 4 * 4 * 4 * 4 * 4 * 4);
    }
    #[test]
    fn promote_and_restore_move_the_versions_and_remember_the_task() {
        let t = rotate(Strategy::Continuity);
        let mut rec = enrolled();
        assert_eq!(promote(&mut rec, &t, None, (None, None), 7), None);
        rec.pending = Some(ver("new", Some(T), Some(Strategy::Continuity)));
        let fps = (Some("fp-new".to_string()), Some("fp-old".to_string()));
        promote(&mut rec, &t, Some("app".into()), fps.clone(), 7).unwrap();
        let cur = rec.current.clone().unwrap();
        assert_eq!(
            (cur.secret.expose(), cur.login.as_deref(), cur.since_ms),
            ("new", Some("app"), 7)
        );
        assert_eq!(rec.previous.as_ref().unwrap().secret.expose(), "old");
        assert!(rec.pending.is_none());
        let a = rec.applied(T).unwrap();
        assert_eq!(
            (a.step, a.action, a.at_ms),
            (Promoted, TaskAction::Rotate, 7)
        );
        assert_eq!((a.new_fingerprint.clone(), a.old_fingerprint.clone()), fps);

        let rb = Task {
            task_id: "t2",
            ..rollback()
        };
        rec.pending = Some(ver("stale", Some("t3"), None));
        restore(&mut rec, &rb, Some("app_b".into()), (None, None), 9).unwrap();
        let cur = rec.current.clone().unwrap();
        assert_eq!(
            (cur.secret.expose(), cur.login.as_deref()),
            ("old", Some("app_b"))
        );
        assert_eq!(rec.previous.as_ref().unwrap().secret.expose(), "new");
        assert!(rec.pending.is_none());
        assert_eq!(rec.last_step, Some(Restored));
        assert_eq!(rec.last_task.as_deref(), Some("t2"));
        assert_eq!(
            restore(&mut Record::default(), &rb, None, (None, None), 9),
            None
        );
    }

    #[test]
    fn a_target_that_lets_any_secret_in_fails_before_anything_is_staged_set_or_recorded() {
        for strategy in [Strategy::Continuity, Strategy::Containment] {
            let t = rotate(strategy);
            let (seen, rec, valid) = play(&t, enrolled(), &["old", "*"]);
            assert_eq!(
                seen,
                [Load, Enter(Staged), Canary, Fail(Refusal::AcceptsAnySecret)]
            );
            assert_eq!(rec, enrolled(), "nothing staged or recorded");
            assert_eq!(valid.len(), 2, "nothing changed at the target");
        }
        // A secret staged by an earlier delivery that "authenticates" is not
        // taken as set when any secret would.
        let mut rec = enrolled();
        rec.pending = Some(ver("new", Some(T), Some(Strategy::Continuity)));
        let (seen, after, _) = play(&rotate(Strategy::Continuity), rec.clone(), &["*"]);
        assert!(!seen.iter().any(|n| matches!(n, Probe(_) | Promote)));
        assert_eq!(after, rec);
        // Rollback: nothing read back or restored.
        let (seen, after, _) = play(&rollback(), rotated(Strategy::Continuity), &["*"]);
        assert_eq!(
            seen,
            [Load, Enter(Set), Canary, Fail(Refusal::AcceptsAnySecret)]
        );
        assert_eq!(after, rotated(Strategy::Continuity));
    }

    #[test]
    fn nothing_is_promoted_or_restored_in_a_delivery_whose_target_did_not_refuse_a_wrong_secret() {
        let mut rec = enrolled();
        rec.pending = Some(ver("new", Some(T), Some(Strategy::Continuity)));
        for (t, rec, step) in [
            (rotate(Strategy::Continuity), rec, Promoted),
            (rollback(), rotated(Strategy::Continuity), Restored),
        ] {
            let mut p = inside(Tested, step);
            p.login = Some("app".into());
            p.canary = None;
            assert_eq!(next(&t, &rec, &p), Canary);
            p.canary = Some(AuthCheck::Accepted);
            assert_eq!(next(&t, &rec, &p), Fail(Refusal::AcceptsAnySecret));
        }
    }
}
