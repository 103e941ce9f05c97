//! The keywave dev kit: everything needed to run the whole system on one
//! machine, for demos, benchmarks and tests. The coordinator daemon never
//! links it.
//!
//! # Layout
//! - [`fleet`]: the in-process fleet (regional workers and coordinators as tasks of this process, one by
//!   one for the tests or signed and stopped together for `dev` and `bench`).
//! - [`dev`]: `keywave dev`, a complete in-process demo (nats-server, sim workers, coordinator).
//! - [`bench`]: `keywave bench`, one measured sim campaign next to the bare broker path's throughput.

pub mod bench;
pub mod dev;
pub mod fleet;
