//! The `keywave` operator CLI: parse flags, run the command, turn an error
//! into one line on stderr (and a JSON object with `--json`) and an exit code.

use clap::Parser;
use keywave_cli::{args::Cli, commands};

/// Exit status of a command whose reader closed stdout early: 128 + SIGPIPE,
/// what a shell reports for a Unix tool that a closed pipe stopped.
const CLOSED_PIPE_EXIT: i32 = 141;

/// `keywave ... | head` closes stdout before everything is printed: stop
/// quietly, as Unix tools do, instead of panicking ("failed printing to
/// stdout: Broken pipe").
fn stop_quietly_on_a_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(CLOSED_PIPE_EXIT);
        }
        default(info);
    }));
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    stop_quietly_on_a_closed_pipe();
    let cli = Cli::parse();
    // Quiet by default: `keywave dev` runs workers in-process, whose
    // per-task warnings would drown the progress lines.
    let telemetry = match keywave_common::telemetry::init(&keywave_common::telemetry::Options::new(
        "keywave",
        cli.log_format,
        "warn,keywave_worker=error",
    )) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let json = cli.json;
    // Who this CLI is on NATS (--nats-user, --nats-creds, ...): every
    // connection the commands make uses it.
    match cli.nats_auth.to_config() {
        Ok(auth) => {
            if auth != keywave_common::nats::ConnectConfig::default() {
                keywave_common::nats::install(auth);
            }
        }
        Err(e) => {
            let line = e.to_string();
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": line }));
            }
            eprintln!("error: {line}");
            return std::process::ExitCode::from(2);
        }
    }
    let code = match commands::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            let line = e.to_string().replace('\n', " ");
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": line }));
            }
            eprintln!("error: {line}");
            std::process::ExitCode::from(e.exit_code())
        }
    };
    telemetry.shutdown().await;
    code
}
