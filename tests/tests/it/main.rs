//! keywave's integration tests: one binary, one module per area, every test
//! against real servers started by `keywave-tests` (see `tests/src/lib.rs`).
//! Run them with `cargo test -p keywave-tests` or `./deploy/test.sh`.
//!
//! # Layout
//! - `support`: topology with short redelivery, credential fleets, in-process workers and coordinators.
//! - `harness`: the harness itself (restart keeps data, cluster survives a node kill, private servers).
//! - `campaign`: a 1,000-credential sim campaign over 3 regions, waves `1,10%,50%`.
//! - `redis_acl`: continuity and containment campaigns on real Redis ACL users, proven with `AUTH`.
//! - `rollback`: a canary over budget is rolled back; containment refuses and pauses.
//! - `crash`: a worker stopped between set and promote; the task resumes and rotates once.
//! - `deadletter`: malformed, oversized and unknown-version tasks are dead-lettered; the queue moves on.
//! - `coordinator_restart`: a new coordinator finishes a campaign, counting each credential once.
//! - `nats_restart`, `cluster`: the NATS server restarted, a cluster node lost mid-campaign.
//! - `readme`: the README's commands and inventory example work when pasted.

mod campaign;
mod cluster;
mod coordinator_restart;
mod crash;
mod deadletter;
mod harness;
mod nats_restart;
mod readme;
mod redis_acl;
mod rollback;
mod support;
