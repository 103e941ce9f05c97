//! The configuration reference, `docs/configuration.md`, generated from the
//! code: the clap definitions of `keywave`, `keywave-coordinator` and
//! `keywave-worker` (flags, environment variables, defaults, help) and the
//! worker's [`keywave_worker::config_keys::CONFIG_KEYS`] table (checked
//! against the configuration structs by a unit test of the worker).
//!
//! A unit test fails when the committed file differs; regenerate it with
//! `cargo run -p keywave-xtask -- config-ref`.

use clap::CommandFactory;
use std::fmt::Write as _;

/// Where the reference lives, relative to the workspace root.
pub const PATH: &str = "docs/configuration.md";

/// Environment variables read outside clap and the worker file, with what they do.
const OTHER_ENV: &[(&str, &str, &str)] = &[
    ("RUST_LOG", "all", "Log filter, e.g. `info`, `keywave_coordinator=debug` (default `info`; `keywave`: `warn,keywave_worker=error`)."),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "all", "OTLP/HTTP endpoint (e.g. `http://otel-collector:4318`); spans are exported only when this (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Default: off."),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "all", "Full URL of the traces endpoint (instead of the base URL above)."),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "all", "`http/protobuf` (the only protocol of this build; others are refused at start-up)."),
    ("OTEL_EXPORTER_OTLP_HEADERS", "all", "Extra headers of the export requests, `key=value,...`."),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "all", "Export timeout in milliseconds (default 10000)."),
    ("OTEL_SERVICE_NAME", "all", "`service.name` of the spans (default: the binary's name)."),
    ("OTEL_RESOURCE_ATTRIBUTES", "all", "More resource attributes, `key=value,...`."),
    ("OTEL_SDK_DISABLED", "all", "`true` turns span export off."),
    ("KEYWAVE_ENROLL_SECRET", "keywave-worker enroll", "Today's secret of the credential being enrolled (else read from stdin)."),
];

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn flag_name(a: &clap::Arg) -> Option<String> {
    if let Some(l) = a.get_long() {
        let mut n = format!("`--{l}`");
        if let Some(s) = a.get_short() {
            n = format!("`-{s}`, {n}");
        }
        if a.get_action().takes_values() {
            if let Some(v) = a.get_value_names().and_then(|v| v.first()) {
                n = format!("{n} `{v}`");
            }
        }
        Some(n)
    } else if a.is_positional() {
        let v = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| v.to_string())
            .unwrap_or_else(|| a.get_id().to_string().to_uppercase());
        Some(format!("`<{v}>`"))
    } else {
        None
    }
}

fn args_table(out: &mut String, cmd: &clap::Command) {
    let rows: Vec<_> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .filter_map(|a| Some((a, flag_name(a)?)))
        .collect();
    if rows.is_empty() {
        out.push_str("No options.\n\n");
        return;
    }
    out.push_str("| option | environment | default | description |\n|---|---|---|---|\n");
    for (a, name) in rows {
        let env = a
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let default = a
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let help = a
            .get_long_help()
            .or(a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let global = if a.is_global_set() {
            " (any subcommand)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {} | {env} | {} | {}{global} |",
            cell(&name),
            cell(&default),
            cell(&help)
        );
    }
    out.push('\n');
}

fn command(out: &mut String, cmd: &clap::Command, path: &str, depth: usize) {
    let heading = "#".repeat((depth + 2).min(4));
    let _ = writeln!(out, "{heading} `{path}`\n");
    if let Some(about) = cmd.get_about() {
        let _ = writeln!(out, "{}\n", cell(&about.to_string()));
    }
    args_table(out, cmd);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        command(out, sub, &format!("{path} {}", sub.get_name()), depth + 1);
    }
}

/// The whole reference, as committed in `docs/configuration.md`.
pub fn render() -> String {
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         Every option of `keywave-coordinator`, `keywave-worker` and `keywave`: command-line \
         flags with their environment variable and default, the worker's TOML keys, and the \
         other environment variables read. Precedence: flag, then environment variable, then \
         the worker file, then the default.\n\n\
         _Generated from the code (`xtask/src/config_ref.rs`); do not edit by hand. \
         Regenerate with `cargo run -p keywave-xtask -- config-ref`._\n\n",
    );
    command(
        &mut out,
        &keywave_coordinator::config::DaemonArgs::command(),
        "keywave-coordinator",
        0,
    );
    command(
        &mut out,
        &keywave_worker::cli::Cli::command(),
        "keywave-worker",
        0,
    );
    out.push_str(
        "### Worker configuration file\n\n\
         The file given with `--config` (TOML; `worker/keywave-worker.example.toml` shows every \
         key). Unknown keys are refused. `endpoint[]` keys belong to each `[[endpoint]]` table.\n\n\
         | key | environment | default | description |\n|---|---|---|---|\n",
    );
    for k in keywave_worker::config_keys::CONFIG_KEYS {
        let env = if k.env.is_empty() {
            String::new()
        } else {
            format!("`{}`", k.env)
        };
        let _ = writeln!(
            out,
            "| `{}` | {env} | {} | {} |",
            k.key,
            cell(k.default),
            cell(k.doc)
        );
    }
    out.push('\n');
    command(&mut out, &keywave_cli::args::Cli::command(), "keywave", 0);
    out.push_str(
        "## Other environment variables\n\n| variable | read by | meaning |\n|---|---|---|\n",
    );
    for (var, who, what) in OTHER_ENV {
        let _ = writeln!(out, "| `{var}` | {who} | {} |", cell(what));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_ref_is_up_to_date() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(PATH);
        let want = render();
        if std::env::var("KEYWAVE_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(&path, &want).expect("write docs/configuration.md");
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            let line = have
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .map_or_else(
                    || have.lines().count().min(want.lines().count()) + 1,
                    |i| i + 1,
                );
            panic!(
                "{PATH} is out of date (first difference at line {line}): regenerate it with\n  \
                 cargo run -p keywave-xtask -- config-ref\nand commit it"
            );
        }
    }

    #[test]
    fn every_option_with_an_environment_variable_is_listed() {
        let doc = render();
        for var in [
            "KEYWAVE_METRICS_ADDR",
            "KEYWAVE_LOG_FORMAT",
            "KEYWAVE_NATS_URL",
            "KEYWAVE_SIGNING_KEY_FILE",
            "KEYWAVE_REGION_KEY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(doc.contains(var), "{var} missing");
        }
        assert!(doc.contains("`endpoint[].url`") && doc.contains("`--metrics-addr` `ADDR`"));
    }
}
