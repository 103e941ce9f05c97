//! Secret hygiene: during a campaign of 1,000 simulated credentials plus
//! real Redis ACL users, everything that crosses the bus (a subscriber on
//! `>`), everything stored (every message of every stream, KV buckets
//! included, read back at the end) and every log line of the in-process
//! coordinator and workers (TRACE for keywave, DEBUG for the rest) is
//! recorded; none of it may contain any secret that was enrolled, generated
//! or replaced, in clear, base64 (standard or URL-safe, at any byte
//! alignment) or hex (lower or upper case). A self-check plants a secret in
//! a copy of the recordings, in every encoding, and proves the search
//! finds it, so the test can fail.

use crate::support::{self, credentials, in_regions, secret, spec};
use aho_corasick::AhoCorasick;
use base64::Engine;
use futures::StreamExt;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::detect::DetectKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use keywave_worker::WorkerOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIM_CREDENTIALS: usize = 1000;
const REDIS_USERS: usize = 20;
const REGIONS: [&str; 2] = ["eu", "us"];

/// An append-only byte buffer shared by the log writer and the test.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn append(&self, b: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(b);
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.append(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

/// Every way a secret could be written down that the test looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Clear,
    Base64,
    Base64Url,
    HexLower,
    HexUpper,
}

/// The base64 characters that depend only on `s`'s bytes when `s` starts
/// at byte offset `align` (0, 1 or 2) of a longer encoded text.
fn base64_core(engine: &base64::engine::GeneralPurpose, s: &[u8], align: usize) -> Vec<u8> {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(s);
    let enc = engine.encode(&padded).into_bytes();
    let first = (8 * align).div_ceil(6);
    let end = (8 * (align + s.len())) / 6;
    enc[first..end.min(enc.len())].to_vec()
}

/// The needles for one secret, each with the form it stands for.
fn needles(s: &[u8]) -> Vec<(Vec<u8>, Form)> {
    let mut out = vec![
        (s.to_vec(), Form::Clear),
        (hex::encode(s).into_bytes(), Form::HexLower),
        (hex::encode_upper(s).into_bytes(), Form::HexUpper),
    ];
    for align in 0..3 {
        out.push((
            base64_core(&base64::engine::general_purpose::STANDARD, s, align),
            Form::Base64,
        ));
        out.push((
            base64_core(&base64::engine::general_purpose::URL_SAFE, s, align),
            Form::Base64Url,
        ));
    }
    out
}

/// Searches recordings for many secrets at once.
struct Finder {
    ac: AhoCorasick,
    /// Per pattern: index of the secret and the form.
    what: Vec<(usize, Form)>,
}

impl Finder {
    fn new(secrets: &[Vec<u8>]) -> Finder {
        let mut patterns = Vec::new();
        let mut what = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            assert!(s.len() >= 12, "secret {i} is too short to search for");
            for (p, form) in needles(s) {
                patterns.push(p);
                what.push((i, form));
            }
        }
        Finder {
            ac: AhoCorasick::new(&patterns).expect("patterns"),
            what,
        }
    }

    /// Every (secret index, form, position) found in `hay`.
    fn find(&self, hay: &[u8]) -> Vec<(usize, Form, usize)> {
        self.ac
            .find_overlapping_iter(hay)
            .map(|m| {
                let (i, f) = self.what[m.pattern().as_usize()];
                (i, f, m.start())
            })
            .collect()
    }
}

async fn redis_admin(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every stored message of every stream (KV buckets included), as
/// subject, headers and payload bytes.
async fn read_back_everything(client: &async_nats::Client) -> (Vec<u8>, usize) {
    let js = topology::context(client.clone());
    let names: Vec<String> = js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert!(
        names.iter().any(|n| n == "KV_keywave-secrets-eu"),
        "{names:?}"
    );
    let mut out = Vec::new();
    let mut count = 0;
    for name in names {
        let mut stream = js.get_stream(&name).await.expect("stream");
        let state = stream.info().await.expect("stream info").state.clone();
        if state.messages == 0 {
            continue;
        }
        let seqs = state.first_sequence..=state.last_sequence;
        let msgs: Vec<_> = futures::stream::iter(seqs)
            .map(|seq| {
                let stream = stream.clone();
                async move { stream.get_raw_message(seq).await.ok() }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for m in msgs.into_iter().flatten() {
            count += 1;
            out.extend_from_slice(m.subject.as_bytes());
            out.push(b'\n');
            for (k, vs) in m.headers.iter() {
                for v in vs {
                    out.extend_from_slice(AsRef::<[u8]>::as_ref(k));
                    out.push(b':');
                    out.extend_from_slice(v.as_str().as_bytes());
                    out.push(b'\n');
                }
            }
            out.extend_from_slice(&m.payload);
            out.push(b'\n');
        }
    }
    (out, count)
}

#[test]
fn no_secret_crosses_the_bus_is_stored_or_logged_in_any_encoding() {
    // Logs of everything running in this test's runtime, whatever global
    // subscriber another test may have installed: each runtime thread (and
    // the test thread) gets this dispatcher as its default.
    let logs = Buffer::default();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,keywave_common=trace,keywave_worker=trace,keywave_coordinator=trace",
            ))
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish(),
    );
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let d = dispatch.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            std::mem::forget(tracing::dispatcher::set_default(&d));
        })
        .build()
        .expect("runtime");
    rt.block_on(campaign_and_search(logs));
}

async fn campaign_and_search(logs: Buffer) {
    let server = NatsServer::start();
    let redis = RedisServer::start();
    let client = server.client().await;

    // The recorder: every message on every subject, with headers.
    let wire = Buffer::default();
    let slow = Arc::new(Mutex::new(0u64));
    let slow_cb = slow.clone();
    let recorder = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 17)
        .event_callback(move |e| {
            let slow = slow_cb.clone();
            async move {
                if let async_nats::Event::SlowConsumer(_) = e {
                    *slow.lock().unwrap() += 1;
                }
            }
        })
        .connect(server.url())
        .await
        .expect("recorder connects");
    let mut everything = recorder.subscribe(">").await.unwrap();
    recorder.flush().await.unwrap();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (w, n) = (wire.clone(), seen.clone());
    let recording = tokio::spawn(async move {
        while let Some(m) = everything.next().await {
            let mut b = Vec::with_capacity(m.payload.len() + 64);
            b.extend_from_slice(m.subject.as_bytes());
            b.push(b'\n');
            if let Some(r) = &m.reply {
                b.extend_from_slice(r.as_bytes());
                b.push(b'\n');
            }
            if let Some(h) = &m.headers {
                for (k, vs) in h.iter() {
                    for v in vs {
                        b.extend_from_slice(AsRef::<[u8]>::as_ref(k));
                        b.push(b':');
                        b.extend_from_slice(v.as_str().as_bytes());
                        b.push(b'\n');
                    }
                }
            }
            b.extend_from_slice(&m.payload);
            b.push(b'\n');
            w.append(&b);
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });

    // 1,000 simulated credentials over eu and us, and real Redis ACL users in eu.
    let mut creds = credentials("hy", SIM_CREDENTIALS, &REGIONS, "sim-main", TargetKind::Sim);
    let redis_creds: Vec<Credential> =
        credentials("hyr", REDIS_USERS, &["eu"], "redis-main", TargetKind::Redis);
    creds.extend(redis_creds.iter().cloned());
    support::put_inventory(&client, &creds).await;

    let mut admin = redis_admin(&redis).await;
    let detect_key = DetectKey::generate();
    let mut sims = HashMap::new();
    let mut stores = HashMap::new();
    let mut workers = Vec::new();
    for region in REGIONS {
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 64);
        if region == "eu" {
            let target = RedisTarget::connect(RedisOptions { url: redis.url() })
                .await
                .unwrap();
            targets.insert("redis-main", target, 16);
        }
        let opts = WorkerOptions {
            region: region.to_string(),
            worker_id: keywave_tests::unique(&format!("worker-{region}")),
            concurrency: 32,
            topology: support::topology(),
            faults: Faults::none(),
            detect_key: Some(detect_key.clone()),
            ..Default::default()
        };
        let worker =
            support::start_worker_with(&client, opts, &RegionKey::generate(), Arc::new(targets))
                .await;
        stores.insert(region, worker.store.clone());
        workers.push(worker);
        sims.insert(region, sim);
    }

    // Today's secrets: seeded at the targets and enrolled.
    let mut enrolled: HashMap<String, Secret> = HashMap::new();
    for c in &creds {
        let s = secret();
        match c.kind {
            TargetKind::Redis => {
                redis::cmd("ACL")
                    .arg("SETUSER")
                    .arg(&c.principal)
                    .arg("on")
                    .arg(format!(">{}", s.expose()))
                    .arg("+ping")
                    .query_async::<()>(&mut admin)
                    .await
                    .unwrap();
            }
            _ => sims[c.region.as_str()].seed(&c.principal, &s),
        }
        stores[c.region.as_str()]
            .enroll(&c.id, s.clone())
            .await
            .unwrap();
        enrolled.insert(c.id.clone(), s);
    }

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "1,10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), (SIM_CREDENTIALS + REDIS_USERS) as u64);

    // Every secret generated or replaced: enrolled, CURRENT, PREVIOUS, PENDING.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut label: Vec<String> = Vec::new();
    for c in &creds {
        let rec = stores[c.region.as_str()]
            .get(&c.id)
            .await
            .unwrap()
            .expect("record");
        let current = rec.current.as_ref().expect("current");
        assert!(current.secret != enrolled[&c.id], "{} was rotated", c.id);
        for (what, v) in [
            ("enrolled", Some(&enrolled[&c.id])),
            ("current", Some(&current.secret)),
            ("previous", rec.previous.as_ref().map(|v| &v.secret)),
            ("pending", rec.pending.as_ref().map(|v| &v.secret)),
        ] {
            if let Some(s) = v {
                secrets.push(s.expose().as_bytes().to_vec());
                label.push(format!("{} {what}", c.id));
            }
        }
    }
    assert!(secrets.len() >= 2 * creds.len());

    coordinator.stop().await;
    for worker in workers {
        worker.stop().await;
    }
    // Everything published has reached the recorder.
    client.flush().await.unwrap();
    recorder.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    recording.abort();
    assert_eq!(
        *slow.lock().unwrap(),
        0,
        "the recorder fell behind and missed messages"
    );
    let (stored, stored_count) = read_back_everything(&client).await;
    let wire = wire.take();
    let logs = logs.take();
    let on_wire = seen.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "hygiene: {} secrets searched in {on_wire} bus messages ({} bytes), {stored_count} stored messages ({} bytes), {} bytes of logs",
        secrets.len(),
        wire.len(),
        stored.len(),
        logs.len()
    );
    // The recordings are real: the campaign's traffic, data and logs are there.
    assert!(
        on_wire > 3 * creds.len() as u64,
        "{on_wire} messages recorded"
    );
    assert!(
        stored_count > 2 * creds.len(),
        "{stored_count} messages stored"
    );
    assert!(
        memchr_all(&logs, b"keywave_worker")
            && (memchr_all(&logs, b"TRACE") || memchr_all(&logs, b"DEBUG")),
        "the workers' TRACE/DEBUG logs were captured"
    );
    assert!(memchr_all(&logs, b"keywave_coordinator"));

    let finder = Finder::new(&secrets);
    for (name, hay) in [("bus", &wire), ("stored", &stored), ("logs", &logs)] {
        let found = finder.find(hay);
        assert!(
            found.is_empty(),
            "{} secret occurrence(s) in the {name} recording, e.g. {:?}",
            found.len(),
            found
                .iter()
                .take(5)
                .map(|(i, f, at)| format!("{} as {f:?} at byte {at}", label[*i]))
                .collect::<Vec<_>>()
        );
    }

    // Self-check: the search finds a planted secret in every form, at any
    // base64 alignment, inside copies of the real recordings.
    let planted = &secrets[secrets.len() / 2];
    let mut checks = Vec::new();
    for (needle, form) in [
        (planted.clone(), Form::Clear),
        (hex::encode(planted).into_bytes(), Form::HexLower),
        (hex::encode_upper(planted).into_bytes(), Form::HexUpper),
    ] {
        checks.push((needle, form));
    }
    for prefix in 0..3usize {
        let mut data = b"xyz"[..prefix].to_vec();
        data.extend_from_slice(planted);
        data.extend_from_slice(b"tail");
        checks.push((
            base64::engine::general_purpose::STANDARD
                .encode(&data)
                .into_bytes(),
            Form::Base64,
        ));
        checks.push((
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&data)
                .into_bytes(),
            Form::Base64Url,
        ));
    }
    for (hay_name, hay) in [("bus", &wire), ("stored", &stored), ("logs", &logs)] {
        // A copy of (up to) 1 MiB of the real recording around its middle.
        let mid = hay.len() / 2;
        let window = &hay[mid.saturating_sub(512 * 1024)..(mid + 512 * 1024).min(hay.len())];
        for (needle, form) in &checks {
            let mut copy = window.to_vec();
            let at = copy.len() / 2;
            copy.splice(at..at, needle.iter().copied());
            let found = finder.find(&copy);
            let same_form = |f: &Form| match form {
                // Alphanumeric secrets often encode the same in both alphabets.
                Form::Base64 | Form::Base64Url => matches!(f, Form::Base64 | Form::Base64Url),
                other => f == other,
            };
            assert!(
                found
                    .iter()
                    .any(|(i, f, _)| secrets[*i] == *planted && same_form(f)),
                "self-check: a secret planted as {form:?} in the {hay_name} recording was not found"
            );
        }
    }
}

fn memchr_all(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
