//! `deploy/consumers-demo.sh`, the README's consumers example, runs as
//! documented with the debug binaries: its private `nats-server` and
//! `redis-server`, a coordinator, a worker and the agent of `orders-api`; the
//! continuity campaign completes, the agent's file changes (0600), the new
//! password logs in and the old one is refused. Its output holds no secret,
//! and it leaves no directory or process behind. Without the binaries it
//! fails with a clear message.

use crate::support;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The directory holding `keywave`, `keywave-coordinator` and
/// `keywave-worker` (built by cargo when run under it).
fn bin_dir() -> PathBuf {
    let worker = support::workspace_binary("keywave-worker", "keywave-worker");
    let cli = support::workspace_binary("keywave-cli", "keywave");
    let coordinator = support::workspace_binary("keywave-coordinator", "keywave-coordinator");
    let dir = worker.parent().expect("binary directory").to_path_buf();
    for b in [&cli, &coordinator] {
        assert_eq!(b.parent(), Some(dir.as_path()), "{}", b.display());
    }
    dir
}

struct Run {
    ok: bool,
    elapsed: Duration,
    output: String,
}

/// Runs `bash deploy/consumers-demo.sh` from the workspace root with
/// `TMPDIR=tmp`, stdout and stderr interleaved into one file; stopped with
/// SIGTERM (the script then cleans up) after [`TIMEOUT`].
fn run_demo(tmp: &Path, envs: &[(&str, &str)]) -> Run {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let log = tmp.join("demo.out");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg("deploy/consumers-demo.sh")
        .current_dir(&root)
        .env("TMPDIR", tmp)
        .env_remove("RUST_LOG")
        .env_remove("KEYWAVE_NATS_URL")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("bash runs");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "consumers-demo.sh still running after {TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Run {
        ok: status.success(),
        elapsed: started.elapsed(),
        output: std::fs::read_to_string(&log).unwrap(),
    }
}

/// The script's private directories (`keywave-consumers-demo.*`) still in `tmp`.
fn leftovers(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("keywave-consumers-demo."))
        .collect()
}

/// Processes whose command line names `tmp` (the script's nats-server,
/// redis-server, worker and agent all do).
fn processes_under(tmp: &Path) -> Vec<String> {
    let needle = tmp.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Runs of 20 or more letters and digits with upper case, lower case and
/// digits: what a generated secret looks like (fingerprints, hashes and
/// campaign ids are lower-case hex).
fn secret_like_runs(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() >= 20
                && w.chars().any(|c| c.is_ascii_uppercase())
                && w.chars().any(|c| c.is_ascii_lowercase())
                && w.chars().any(|c| c.is_ascii_digit())
        })
        .collect()
}

#[test]
fn consumers_demo_rotates_through_the_agent_and_prints_no_secret() {
    let bin = bin_dir();
    let tmp = tempfile::tempdir().unwrap();
    // The initial password is ours, so that the output can be searched for it.
    let password = support::secret().expose().to_string();
    let run = run_demo(
        tmp.path(),
        &[
            ("KEYWAVE_BIN_DIR", bin.to_str().unwrap()),
            ("KEYWAVE_DEMO_PASSWORD", &password),
        ],
    );
    let out = &run.output;
    assert!(run.ok, "consumers-demo.sh failed:\n{out}");
    eprintln!("consumers-demo.sh took {:.1?}", run.elapsed);

    for expected in [
        "consumer orders-api",
        "verify attest",
        "\"consumers-demo\": completed",
        "succeeded 1 · failed 0 · rolled back 0",
        "# keywave campaign report: c-",
        "| cache-orders | eu | 0 | rotate succeeded | yes | yes | orders-api: verified",
        "new password (from the agent's file): OK",
        "Done: orders-api moved to the new secret",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    let old = out
        .lines()
        .find(|l| l.contains("old password (enrolled):"))
        .unwrap_or_else(|| panic!("no old-password line in:\n{out}"));
    assert!(old.trim_end().ends_with("refused"), "{old}");
    // The agent's file, before and after: 0600, and a different hash.
    let modes: Vec<_> = out
        .lines()
        .filter(|l| l.contains("app/redis.env  mode"))
        .collect();
    assert_eq!(modes.len(), 2, "{out}");
    assert!(modes.iter().all(|l| l.contains("mode 0600")), "{modes:?}");
    assert!(modes[1].contains("(was sha256:"), "{}", modes[1]);

    assert!(
        !out.contains(&password),
        "the initial password is in the output"
    );
    assert_eq!(
        secret_like_runs(out),
        Vec::<&str>::new(),
        "secret-like strings in the output:\n{out}"
    );
    assert_eq!(
        leftovers(tmp.path()),
        Vec::<String>::new(),
        "not cleaned up"
    );
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
}

#[test]
fn consumers_demo_fails_clearly_without_the_binaries() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("bin");
    std::fs::create_dir(&empty).unwrap();
    let run = run_demo(tmp.path(), &[("KEYWAVE_BIN_DIR", empty.to_str().unwrap())]);
    assert!(!run.ok, "succeeded without binaries:\n{}", run.output);
    assert!(
        run.output.contains("consumers-demo: error:")
            && run.output.contains("keywave is missing")
            && run.output.contains("consumers-demo: FAILED"),
        "{}",
        run.output
    );
    assert_eq!(
        leftovers(tmp.path()),
        Vec::<String>::new(),
        "not cleaned up"
    );
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
}

#[test]
fn secret_like_runs_finds_generated_secrets_only() {
    let secret = support::secret();
    let text = format!(
        "fp1:83cabc0cd04f6ebef5c05dda14d5e685 c-f0228807a9c8 /tmp/keywave-consumers-demo.kIC0OW \
         #8 60a6a6ec038f606e4bd288300141c89a87684dc57c8bd11c0f192e07f7d7ad10 x{}y",
        secret.expose()
    );
    assert_eq!(secret_like_runs(&text).len(), 1, "{text}");
}
