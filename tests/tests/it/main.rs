//! keywave's integration tests: one binary, one module per area, every test
//! against real servers started by `keywave-harness` (see `harness/src/lib.rs`,
//! re-exported as `keywave_tests`).
//! Run them with `cargo test -p keywave-tests` or `./deploy/test.sh`.
//!
//! # Layout
//! - `support`: topology with short redelivery, credential fleets, workers and coordinators of the dev kit's
//!   in-process fleet.
//! - `approval`: waves gated by `--approve-before-wave` wait for `keywave campaign approve` (real CLI,
//!   exit codes, `--json`); approvals survive a killed coordinator; pause/resume/abort act within a
//!   second and survive restarts.
//! - `cli`: the `keywave` binary end to end: plan, start with a gate, `watch` (`--once`, NDJSON, ends at the
//!   gate and with the campaign; exit 3 when rolled back or aborted), pause, resume, approve, `report` in JSON,
//!   Markdown and HTML (a forged result's hostile id escaped), operator rollback of a paused continuity
//!   campaign, containment rollback refused, abort.
//! - `harness`: the harness itself (restart keeps data, cluster survives a node kill, private servers).
//! - `chaos`: 5,000 Redis ACL users, 3 regions x 2 worker processes, a random worker SIGKILLed every
//!   1-2 s: the campaign completes, every credential consistent and set once.
//! - `chaos_default`: the same at the default redelivery settings (5 s ack wait) and a 60 s task timeout:
//!   1,000 Redis ACL users, 3 worker processes of one region, one SIGKILLed every 2 s for 60 s across
//!   five waves: no failure, no task without result, each wave at most 10 s slower than undisturbed.
//! - `bench`: a 2,000-credential `keywave bench` smoke run with its baseline; valid `--json` output.
//! - `campaign`: a 1,000-credential sim campaign over 3 regions, waves `1,10%,50%`.
//! - `db_scale`: 500 PostgreSQL roles and 200 MariaDB users in continuity then containment, proven with
//!   real logins; PostgreSQL stopped and MariaDB killed mid-campaign (unreachable, paused, re-run consistent); the admin
//!   pool never over its limit during a 2,000-role campaign (`pg_stat_activity` sampled every 20 ms).
//! - `db_targets`: PostgreSQL roles and MariaDB users: containment (hostile names included) and continuity with alternating users, proven with `psql` / `mariadb`.
//! - `redis_acl`: continuity and containment campaigns on real Redis ACL users, proven with `AUTH`.
//! - `regions`: a campaign over a region no worker serves pauses within 15 s naming the region (its queued
//!   tasks never become `no_result`, even past twice the task timeout) and completes once a worker runs there
//!   and it is resumed; a region whose only worker stops mid-campaign pauses the same way.
//! - `region_cut`: each region's NATS server, Redis and worker process in its own network namespace (root
//!   needed); eu's link down for 20 s mid-wave: paused within 30 s naming eu (nothing failed, nothing rolled
//!   back), us and ap finish the wave; healed and resumed: completed, consistent (AUTH and reconcile), set once.
//! - `rollback`: a canary over budget is rolled back; containment refuses and pauses.
//! - `consumers`: two real `keywave-worker agent` processes write each new Redis ACL secret atomically (0600), reload,
//!   health-check with `redis-cli` and attest; the old secret is refused only after both attested; a stopped agent or
//!   an HTTP consumer answering 500 keeps the old secret (`consumer_not_verified`) and the wave rolls back, leaving
//!   the stopped agent's file with a secret that works; `none` is reported unverified.
//! - `consumers_pg`: 100 PostgreSQL roles with alternating users, consumed by two real agents writing `{{login}}` and
//!   `{{secret}}`: an application stand-in reconnecting from the files is never refused and never reads a partial
//!   file through a continuity campaign; the old passwords are refused afterwards.
//! - `preflight`: real agents answer the coordinator's pre-flight pings; a killed one pauses the campaign before the
//!   wave (nothing issued) until it is back and the campaign resumed; a 0.5 threshold lets 1 of 3 down through.
//! - `crash`: a worker stopped between set and promote; the task resumes and rotates once.
//! - `deadletter`: malformed, oversized and unknown-version tasks are dead-lettered; the queue moves on.
//! - `supercluster`: the multi-region supercluster of `deploy/multi-region/` with placement: each region's
//!   secret store only on its region's server, the home state at R3 on the home cluster, an unsatisfiable
//!   placement refused naming the region and tag; a campaign over eu, us, ap with each worker on its own region.
//! - `home_cluster`: the supercluster's home cluster at default settings: the coordinator's home server (leader of
//!   the campaigns bucket) SIGKILLed mid-campaign, which completes without pausing; two coordinator processes on
//!   different home servers, the active one SIGKILLed mid-wave, the standby takes over and completes.
//! - `signing`: tasks signed by an unknown key, unsigned, altered, moved to another region's subject
//!   or expired are refused, dead-lettered with their reason and change nothing; a second key works;
//!   a campaign signed by the coordinator completes.
//! - `audit`: the hash chain covers a campaign across a coordinator restart; `keywave audit verify`
//!   passes, then finds a deleted, a forged and an edited record at the right position.
//! - `faults`: a crash before and after every protocol step, recovered by a fresh worker; a poison
//!   task dead-lettered at max deliveries and counted at once; Redis frozen mid-wave.
//! - `detect`: webhooks (GitHub, GitGuardian, generic) over real HTTP; detections contain real Redis
//!   ACL users; 1,000 overlapping detections make one campaign; a restart mid-window still contains.
//! - `coordinator_faults`: the coordinator killed mid-publish, between waves and mid-rollback ends
//!   as an undisturbed run.
//! - `coordinator_restart`: a new coordinator finishes a campaign, counting each credential once.
//! - `failover`: real coordinator processes, default lease timings: the active one SIGKILLed while
//!   `keywave campaign status` is polled (never fails), take-over within 5 s; a restart with the same
//!   `--id` takes the lease back at once; a duplicate id stops for good.
//! - `lease`: two coordinators: the active one killed, the standby finishes; SIGTERM hands over;
//!   a leader whose lease was taken is fenced.
//! - `nats_restart`, `cluster`: the NATS server restarted, a cluster node lost mid-campaign.
//! - `hygiene`: 1,000 sim credentials and real Redis ACL users: no secret on the bus, in any stream or
//!   bucket, or in TRACE logs, in clear, base64 or hex (with a self-check that the search finds one).
//! - `permissions`: the real least-privilege `deploy/nats-secure.conf`: a campaign with every component as
//!   its own user; each identity refused what its role does not need; TLS required.
//! - `tracing`: a sim campaign under the production subscriber exporting to memory: worker task spans are
//!   children of the coordinator's wave span (W3C trace context in NATS headers); results carry it too.
//! - `metrics`: `/metrics`, `/healthz`, `/readyz` of coordinator and workers over real HTTP, parsed as
//!   Prometheus text, agree with a campaign's final counts; `/readyz` 503 before NATS / the consumer.
//! - `readme`: the README's commands and inventory example work when pasted.
//! - `demo`: `deploy/consumers-demo.sh` runs with the debug binaries, prints no secret, leaves nothing behind.
//! - `reconcile`: `keywave reconcile` on real Redis ACL users: consistent after a campaign; a crash between
//!   set and promote left in flight, then repaired (old secret refused); out-of-band drift exits non-zero.
//! - `enroll_bulk`: `keywave-worker enroll --file`: 10,000 sim credentials from one 0600 file (a bad record fails
//!   alone, named by its line), a second run skips them all, a file others can read is refused, no secret in any
//!   output; real Redis ACL users: the secret must log in unless `--no-verify`, an open login never enrols.
//! - `discover`: `keywave inventory discover` on private PostgreSQL and MariaDB: privileged logins and the
//!   admin left out, `--match`, `--import` (existing ids skipped), then a campaign rotates the imports.

mod approval;
mod audit;
mod bench;
mod campaign;
mod chaos;
mod chaos_default;
mod cli;
mod cluster;
mod consumers;
mod consumers_pg;
mod coordinator_faults;
mod coordinator_restart;
mod crash;
mod db_scale;
mod db_targets;
mod deadletter;
mod demo;
mod detect;
mod discover;
mod enroll_bulk;
mod failover;
mod faults;
mod harness;
mod home_cluster;
mod hygiene;
mod late_results;
mod lease;
mod metrics;
mod nats_restart;
mod permissions;
mod preflight;
mod proof;
mod readme;
mod reconcile;
mod redis_acl;
mod region_cut;
mod regions;
mod rollback;
mod signing;
mod supercluster;
mod support;
mod tracing;
