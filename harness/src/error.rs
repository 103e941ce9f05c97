//! What can go wrong when the harness starts a server.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A server of the harness that could not be started (or restarted).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The binary is installed neither on `PATH` nor in the `sbin` directories.
    #[error("`{binary}` was not found on PATH or in {searched:?}; install it: {hint}")]
    Missing {
        binary: String,
        /// The directories searched after `PATH`.
        searched: &'static [&'static str],
        /// How to install it.
        hint: &'static str,
    },
    /// A file, a directory or a process could not be set up.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The server exited before it was ready.
    #[error("{name} exited during start-up ({status}); log {}:\n{log_tail}", log.display())]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        log_tail: String,
    },
    /// A command that sets something up (`ip netns add`, `ip link set`)
    /// failed, or this process may not run it.
    #[error("{what}: {detail}")]
    Setup { what: String, detail: String },
    /// The server was still not ready when the start-up timeout passed.
    #[error("{name} not ready after {after:?} (last probe: {probe}); log {}:\n{log_tail}", log.display())]
    NotReady {
        name: String,
        after: Duration,
        /// What the last readiness probe said.
        probe: String,
        log: PathBuf,
        log_tail: String,
    },
}

impl HarnessError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }

    /// The port was taken between [`crate::process::free_port`] and the
    /// server's bind: retry elsewhere.
    pub fn port_clash(&self) -> bool {
        match self {
            HarnessError::Exited { log_tail, .. } | HarnessError::NotReady { log_tail, .. } => {
                log_tail
                    .to_ascii_lowercase()
                    .contains("address already in use")
            }
            _ => false,
        }
    }
}
