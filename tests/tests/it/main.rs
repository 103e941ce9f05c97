//! keywave's integration tests: one binary, one module per area, every test
//! against real servers started by `keywave-tests` (see `tests/src/lib.rs`).
//! Run them with `cargo test -p keywave-tests` or `./deploy/test.sh`.
//!
//! # Layout
//! - `support`: topology with short redelivery, credential fleets, in-process workers and coordinators.
//! - `harness`: the harness itself (restart keeps data, cluster survives a node kill, private servers).
//! - `chaos`: 5,000 Redis ACL users, 3 regions x 2 worker processes, a random worker SIGKILLed every
//!   1-2 s: the campaign completes, every credential consistent and set once.
//! - `bench`: a 2,000-credential `keywave bench` smoke run with its baseline; valid `--json` output.
//! - `campaign`: a 1,000-credential sim campaign over 3 regions, waves `1,10%,50%`.
//! - `db_targets`: PostgreSQL roles and MariaDB users: containment (hostile names included) and continuity with alternating users, proven with `psql` / `mariadb`.
//! - `redis_acl`: continuity and containment campaigns on real Redis ACL users, proven with `AUTH`.
//! - `rollback`: a canary over budget is rolled back; containment refuses and pauses.
//! - `crash`: a worker stopped between set and promote; the task resumes and rotates once.
//! - `deadletter`: malformed, oversized and unknown-version tasks are dead-lettered; the queue moves on.
//! - `faults`: a crash before and after every protocol step, recovered by a fresh worker; a poison
//!   task dead-lettered at max deliveries and counted at once; Redis frozen mid-wave.
//! - `detect`: webhooks (GitHub, GitGuardian, generic) over real HTTP; detections contain real Redis
//!   ACL users; 1,000 overlapping detections make one campaign; a restart mid-window still contains.
//! - `coordinator_faults`: the coordinator killed mid-publish, between waves and mid-rollback ends
//!   as an undisturbed run.
//! - `coordinator_restart`: a new coordinator finishes a campaign, counting each credential once.
//! - `lease`: two coordinators: the active one killed, the standby finishes; SIGTERM hands over;
//!   a leader whose lease was taken is fenced.
//! - `nats_restart`, `cluster`: the NATS server restarted, a cluster node lost mid-campaign.
//! - `readme`: the README's commands and inventory example work when pasted.

mod bench;
mod campaign;
mod chaos;
mod cluster;
mod coordinator_faults;
mod coordinator_restart;
mod crash;
mod db_targets;
mod deadletter;
mod detect;
mod faults;
mod harness;
mod lease;
mod nats_restart;
mod readme;
mod redis_acl;
mod rollback;
mod support;
