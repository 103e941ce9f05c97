//! The keywave process harness: real servers started from the binaries on
//! `PATH` on random loopback ports with temporary directories and killed on
//! drop, plus polling helpers so that no test ever sleeps to wait. The
//! integration tests (`tests/`), the worker's and the coordinator's own tests
//! use it, and so do `keywave dev` and `keywave bench` for their
//! `nats-server`; it depends on no keywave crate but `keywave-common`.
//!
//! The `nats-server` a program starts ([`NatsServer::try_start`],
//! [`NatsServer::try_restart`], [`NatsCluster::try_start`]) and the process
//! layer ([`process::locate`], [`process::Daemon::try_spawn`],
//! [`process::Daemon::wait_ready`]) return a [`HarnessError`]; `start` and
//! the database servers' constructors panic with the server log, as tests
//! want.
//!
//! # Layout
//! - [`nats`]: [`NatsServer`] (single JetStream node, restartable on the same
//!   port and store; [`NatsOptions`] chooses the tests' configuration or
//!   `nats-server`'s defaults), [`NatsCluster`] (3-node JetStream cluster) and
//!   [`NatsSupercluster`] (home cluster plus regions eu, us, ap over gateways).
//! - [`netns`]: [`RegionNet`] (one Linux network namespace per region on a
//!   bridge; a region cut off and joined again by its link) and
//!   [`NetSupercluster`] (the supercluster with each region's server in its
//!   namespace), for region outage tests; needs root.
//! - [`redis`]: [`RedisServer`], a private `redis-server` for ACL-user rotation. It
//!   can run inside a region's namespace ([`RedisServer::start_in`]).
//! - [`secure`]: [`SecureNats`], a `nats-server` running the least-privilege
//!   `deploy/nats-secure.conf` (optionally with TLS), one user per role.
//! - [`postgres`]: [`PostgresServer`], a private PostgreSQL (scram-sha-256) for role rotation.
//! - [`mariadb`]: [`MariaDbServer`], a private MariaDB for MariaDB/MySQL user rotation.
//! - [`process`]: [`require`] a binary or fail with how to install it, free
//!   ports, and the log-capturing, kill-on-drop [`process::Daemon`].
//! - [`wait`]: [`wait_until`] / [`wait_for`] (poll with a timeout) and
//!   [`unique`] names.
//! - [`error`]: [`HarnessError`], why a server did not start.
//!
//! Missing binaries are never a silent skip in tests: [`require`] panics and
//! says what to install (`deploy/test.sh` installs or starts everything).

pub mod error;
pub mod mariadb;
pub mod nats;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod secure;
pub mod wait;

pub use error::HarnessError;
pub use mariadb::MariaDbServer;
pub use nats::{NatsCluster, NatsOptions, NatsServer, NatsSupercluster};
pub use netns::{NetSupercluster, Netns, RegionNet};
pub use postgres::PostgresServer;
pub use process::require;
pub use redis::RedisServer;
pub use secure::SecureNats;
pub use wait::{unique, wait_for, wait_until, TimedOut};
