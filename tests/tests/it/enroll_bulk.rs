//! `keywave-worker enroll --file`, the real binary against a private
//! nats-server: 10,000 sim credentials from one 0600 file, a bad record that
//! fails alone and is named by its line, a second run that skips everything
//! stored, a file others can read refused, and no secret in any output. Then
//! real Redis ACL users: the given secret must log in unless --no-verify,
//! and a login that lets any secret in is refused either way.

use crate::support::{self, secret};
use keywave_common::crypto::{RegionKey, Secret};
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::store::SecretStore;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

const CREDENTIALS: usize = 10_000;
/// The line of the one bad record (its principal holds a tab).
const BAD_LINE: usize = 5_000;
/// Every secret of the sim records starts with this, so that any echo of
/// one is found.
const MARK: &str = "kwbulk-";

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Run {
    use std::io::Write;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        ok: status.success(),
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn worker(bin: &Path, config: &Path, key: &str, nats: &NatsServer) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .env("KEYWAVE_REGION_KEY", key)
        .env("KEYWAVE_NATS_URL", nats.url())
        .env("NO_COLOR", "1")
        .env_remove("KEYWAVE_ENROLL_SECRET")
        .env_remove("KEYWAVE_DETECT_KEY")
        .env_remove("KEYWAVE_DETECT_KEY_FILE");
    cmd
}

/// The per-record JSON reports by line, and the summary.
fn reports(stdout: &str) -> (BTreeMap<u64, Value>, Value) {
    let mut by_line = BTreeMap::new();
    let mut summary = None;
    for l in stdout.lines() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        if let Some(s) = v.get("summary") {
            summary = Some(s.clone());
        } else {
            let line = v["line"].as_u64().unwrap();
            assert!(
                by_line.insert(line, v).is_none(),
                "line {line} reported twice"
            );
        }
    }
    (by_line, summary.expect("a summary line"))
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn ten_thousand_sim_credentials_from_one_file_resume_and_never_echo() {
    // Built before any clock starts.
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        "region = \"eu\"\n[[endpoint]]\nname = \"sim-a\"\nkind = \"sim\"\n",
    )
    .unwrap();
    let key = RegionKey::generate();
    let key_hex = key.to_hex();

    // Records without "endpoint" take --endpoint; every 10th names its own.
    let mut text = String::new();
    let mut secrets = Vec::with_capacity(CREDENTIALS);
    for i in 0..CREDENTIALS {
        if i + 1 == BAD_LINE {
            text.push_str(
                &serde_json::json!({
                    "credential": "bad-1", "principal": "app\tbad",
                    "secret": format!("{MARK}bad-{}", secret().expose()),
                })
                .to_string(),
            );
            text.push('\n');
        }
        let s = format!("{MARK}{i}-{}", secret().expose());
        let mut rec = serde_json::json!({
            "credential": format!("sim-{i:05}"),
            "principal": format!("app_{i}"),
            "secret": s,
        });
        if i % 10 == 0 {
            rec["endpoint"] = "sim-a".into();
        }
        text.push_str(&rec.to_string());
        text.push('\n');
        secrets.push(s);
    }
    let file = dir.path().join("records.jsonl");
    write_private(&file, &text);

    // The sim target lives in the enrolling process and knows no secret,
    // so the secrets' own logins are skipped (--no-verify); the check that
    // the endpoint refuses a random wrong secret still runs for each.
    let enroll = |extra: &[&str]| {
        let mut cmd = worker(&bin, &config, &key_hex, &nats);
        cmd.args(["enroll", "--endpoint", "sim-a", "--no-verify", "--file"])
            .arg(&file)
            .args(extra);
        cmd
    };
    let started = Instant::now();
    let first = run(&mut enroll(&["--json"]), None);
    let first_elapsed = started.elapsed();
    println!(
        "enroll --file: {CREDENTIALS} sim credentials (+1 bad record) enrolled in {:.2} s",
        first_elapsed.as_secs_f64()
    );
    let all = format!("{}{}", first.stdout, first.stderr);
    assert!(!all.contains(MARK), "a secret was echoed");
    assert_eq!(first.code, Some(1), "one record failed: {}", first.stderr);
    assert!(
        first.stderr.contains("1 of 10001 records failed"),
        "{}",
        first.stderr
    );
    let (by_line, summary) = reports(&first.stdout);
    assert_eq!(by_line.len(), CREDENTIALS + 1);
    assert_eq!(
        (
            &summary["records"],
            &summary["enrolled"],
            &summary["skipped"],
            &summary["failed"]
        ),
        (
            &Value::from(CREDENTIALS + 1),
            &Value::from(CREDENTIALS),
            &Value::from(0),
            &Value::from(1)
        ),
        "{summary}"
    );
    let bad = &by_line[&(BAD_LINE as u64)];
    assert_eq!(bad["credential"], "bad-1", "{bad}");
    assert_eq!(bad["outcome"], "failed", "{bad}");
    assert_eq!(bad["error_class"], "invalid_record", "{bad}");
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("control characters"),
        "{bad}"
    );
    let enrolled: HashSet<&str> = by_line
        .values()
        .filter(|r| r["outcome"] == "enrolled")
        .map(|r| r["credential"].as_str().unwrap())
        .collect();
    assert_eq!(enrolled.len(), CREDENTIALS);

    // The store holds each secret as CURRENT, sealed with the region key;
    // the bad record left nothing.
    let js = keywave_common::topology::context(nats.client().await);
    let store = SecretStore::open(&js, "eu", key.clone()).await.unwrap();
    for i in [0, 1, BAD_LINE - 1, CREDENTIALS - 1] {
        let r = store.get(&format!("sim-{i:05}")).await.unwrap().unwrap();
        assert_eq!(r.current.unwrap().secret, Secret::new(secrets[i].clone()));
    }
    assert!(store.get("bad-1").await.unwrap().is_none());

    // Again, in text: every stored credential is skipped, the bad line
    // fails again and is named.
    let started = Instant::now();
    let second = run(&mut enroll(&[]), None);
    println!(
        "enroll --file again: {CREDENTIALS} skipped in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let all = format!("{}{}", second.stdout, second.stderr);
    assert!(!all.contains(MARK), "a secret was echoed");
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    assert!(
        second
            .stdout
            .contains("10001 records: 0 enrolled, 10000 skipped, 1 failed"),
        "{}",
        second.stdout.lines().last().unwrap_or_default()
    );
    assert!(
        second
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("line {BAD_LINE}: failed bad-1: "))),
        "the bad record is named by its line"
    );
    assert_eq!(
        second
            .stdout
            .lines()
            .filter(|l| l.contains(": skipped "))
            .count(),
        CREDENTIALS
    );
    // Nothing was rewritten.
    let r = store.get("sim-00001").await.unwrap().unwrap();
    assert_eq!(r.current.unwrap().secret, Secret::new(secrets[1].clone()));

    // A file group or others can read is refused before anything is read.
    let exposed = dir.path().join("exposed.jsonl");
    std::fs::write(
        &exposed,
        serde_json::json!({"credential": "exposed-1", "endpoint": "sim-a", "principal": "p", "secret": format!("{MARK}exposed")}).to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = worker(&bin, &config, &key_hex, &nats);
    cmd.args(["enroll", "--file"]).arg(&exposed);
    let refused = run(&mut cmd, None);
    assert!(!refused.ok);
    assert_eq!(refused.code, Some(2), "a usage error");
    assert!(
        refused
            .stderr
            .contains("readable or writable by group or others")
            && refused.stderr.contains("0644"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains(MARK) && refused.stdout.is_empty());
    assert!(store.get("exposed-1").await.unwrap().is_none());
}

#[tokio::test]
async fn redis_secrets_must_log_in_unless_no_verify_and_open_logins_never_enrol() {
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (a, b) = (secret(), secret());
    for args in [
        vec!["SETUSER", "kw-open", "on", "nopass", "+ping"],
        vec![
            "SETUSER",
            "kw-a",
            "on",
            &format!(">{}", a.expose()),
            "+ping",
        ],
        vec![
            "SETUSER",
            "kw-b",
            "on",
            &format!(">{}", b.expose()),
            "+ping",
        ],
    ] {
        let _: () = redis::cmd("ACL")
            .arg(&args)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"eu\"\n[[endpoint]]\nname = \"redis-main\"\nkind = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let key = RegionKey::generate();
    let wrong = format!("{MARK}not-kw-b");
    let records = [
        serde_json::json!({"credential": "a", "endpoint": "redis-main", "principal": "kw-a", "secret": a.expose()}),
        serde_json::json!({"credential": "b", "endpoint": "redis-main", "principal": "kw-b", "secret": wrong}),
        serde_json::json!({"credential": "open", "endpoint": "redis-main", "principal": "kw-open", "secret": format!("{MARK}anything")}),
    ]
    .map(|r| r.to_string())
    .join("\n");
    let outcomes = |extra: &[&str]| {
        // From stdin, as from a secrets manager's export: never on disk.
        let mut cmd = worker(&bin, &config, &key.to_hex(), &nats);
        cmd.args(["enroll", "--file", "-", "--json"]).args(extra);
        let r = run(&mut cmd, Some(records.as_bytes()));
        let all = format!("{}{}", r.stdout, r.stderr);
        for s in [a.expose(), b.expose(), wrong.as_str(), MARK] {
            assert!(!all.contains(s), "a secret was echoed: {all}");
        }
        assert!(!r.ok, "a record failed: {}", r.stderr);
        let (by_line, _) = reports(&r.stdout);
        by_line
            .values()
            .map(|v| {
                let what = v["error_class"].as_str().or(v["outcome"].as_str());
                (
                    v["credential"].as_str().unwrap().to_string(),
                    what.unwrap().to_string(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let verified = outcomes(&[]);
    assert_eq!(verified["a"], "enrolled");
    assert_eq!(verified["b"], "secret_rejected");
    assert_eq!(verified["open"], "target_accepts_any_secret");

    // Without the login check the wrong secret of b is stored as given; the
    // open login is still refused, and a is skipped.
    let unverified = outcomes(&["--no-verify"]);
    assert_eq!(unverified["a"], "skipped");
    assert_eq!(unverified["b"], "enrolled");
    assert_eq!(unverified["open"], "target_accepts_any_secret");

    let js = keywave_common::topology::context(nats.client().await);
    let store = SecretStore::open(&js, "eu", key).await.unwrap();
    assert_eq!(
        store
            .get("a")
            .await
            .unwrap()
            .unwrap()
            .current
            .unwrap()
            .secret,
        a
    );
    assert!(store.get("open").await.unwrap().is_none());
}
