//! The rotation and rollback protocols as one pure function, [`next`]: from
//! the task, the credential's record and what this delivery has done so far
//! ([`Progress`]), the one thing to do next. No I/O and no clock: the executor
//! in `protocol.rs` performs each [`Next`] and notes what it saw.

use crate::store::{Record, Version};
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
pub enum Stage {
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
    Stage(Stage),
    /// Which login a slot's secret opens (`None`: it opens none).
    Probe(Slot),
    /// Whether a slot's secret authenticates, to learn what an earlier
    /// delivery did.
    ReadBack(Slot),
    /// Whether the secret being retired is rejected, reported in the result.
    ProveRejected(Slot),
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
        Staged => match &rec.pending {
            _ if p.step_staged => Next::Complete(Staged),
            p2 @ Some(_) if owned_by(t, p2) => Next::Stage(Stage::Reuse),
            // Staged by a task that never promoted it; it may have been added
            // at the target, and continuity would leave it valid (a
            // containment set replaces it anyway).
            Some(_) if continuity && !p.step_changed => {
                Next::Target(TargetOp::Remove, Slot::Pending)
            }
            _ => Next::Stage(Stage::Generate),
        },
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
        return match p.done {
            Received => {
                if rec.applied(t.task_id).is_some() {
                    // Restored by an earlier delivery, which may have stopped
                    // before its notice; a later task may have changed CURRENT
                    // since, and then there is nothing to announce.
                    let last = rec.last_task.as_deref() == Some(t.task_id);
                    if last && rec.current.is_some() && !p.announced {
                        return Next::Announce;
                    }
                    return Next::Report(Outcome::RolledBack);
                }
                // Never restore an exposed secret.
                let exposed = |v: &Version| v.strategy == Some(Strategy::Containment);
                if t.strategy == Strategy::Containment || rec.current.as_ref().is_some_and(exposed)
                {
                    return Next::Finish(Outcome::RollbackRefused);
                }
                if rec.previous.is_none() || rec.current.is_none() {
                    return Next::Fail(Refusal::NoPrevious);
                }
                Next::Enter(Set)
            }
            Set => Next::Enter(Tested),
            Tested => Next::Enter(Restored),
            Restored => Next::Finish(Outcome::RolledBack),
            Staged | Promoted | Revoked | Verified => Next::Fail(Refusal::OutOfOrder),
        };
    };
    use AuthCheck::{Accepted, Rejected};
    match open {
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
