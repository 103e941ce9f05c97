//! `cargo run -p keywave-xtask -- config-ref`: rewrites
//! `docs/configuration.md` from the clap definitions and the worker's
//! configuration keys. A unit test of [`config_ref`] fails while the committed
//! file is stale.

mod config_ref;

use std::process::ExitCode;

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "config-ref" => {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(config_ref::PATH);
            if let Err(e) = std::fs::write(&path, config_ref::render()) {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {}", config_ref::PATH);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: cargo run -p keywave-xtask -- config-ref\n\n  config-ref   regenerate docs/configuration.md from the code");
            ExitCode::from(2)
        }
    }
}
