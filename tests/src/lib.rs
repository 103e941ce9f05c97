//! keywave's integration tests live in `tests/tests/it/`; this library only
//! re-exports the process harness ([`keywave_harness`]: private nats-server,
//! PostgreSQL, MariaDB and Redis servers, polling helpers) under the name the
//! tests use. The in-process fleet they run comes from `keywave-devkit`.

pub use keywave_harness::*;
