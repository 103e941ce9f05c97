//! The tamper-evident audit trail: after a campaign whose
//! coordinator was replaced mid-way, its hash chain on `KEYWAVE_AUDIT` holds
//! every event and every result exactly once and `keywave audit verify`
//! passes; deleting a record, forging a replacement, or purging the chain and
//! republishing it with one record edited is reported at the right record.
//! The coordinators sign their records: `--public-key` verification passes,
//! and a chain rewritten consistently (every hash and link recomputed, the
//! old signature headers copied), which fools the hash chain alone, is
//! reported at the first rewritten record.

use crate::support::{self, credentials, in_regions, secret};
use keywave_common::audit::{self, AuditRecord, Break, Entry};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::sign::{SigningKey, TaskSigner};
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_common::{subjects, topology};
use keywave_coordinator::engine::CoordinatorOptions;
use keywave_tests::{wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const N: usize = 30;

/// `keywave --nats <url> --json audit verify --campaign <cid> [--public-key K]`:
/// exit code and JSON.
async fn cli_verify(bin: &Path, url: &str, cid: &str) -> (i32, serde_json::Value) {
    cli_verify_with(bin, url, cid, &[]).await
}

async fn cli_verify_with(
    bin: &Path,
    url: &str,
    cid: &str,
    extra: &[&str],
) -> (i32, serde_json::Value) {
    let out = tokio::process::Command::new(bin)
        .args([
            "--nats",
            url,
            "--json",
            "audit",
            "verify",
            "--campaign",
            cid,
        ])
        .args(extra)
        .output()
        .await
        .expect("keywave runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The chain's records, parsed (stream sequence, record).
async fn records(
    js: &async_nats::jetstream::Context,
    cid: &str,
) -> Vec<(u64, Vec<u8>, AuditRecord)> {
    keywave_coordinator::audit::read_chain(js, cid)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, p, _)| {
            let r: AuditRecord = serde_json::from_slice(&p).unwrap();
            (s, p, r)
        })
        .collect()
}

/// A record's payload and its signature headers (key id, signature).
type Signed = (Vec<u8>, Option<(String, String)>);

/// Purges the chain and republishes `records` in order, each with the
/// signature headers given.
async fn republish_with_headers(
    js: &async_nats::jetstream::Context,
    cid: &str,
    records: &[Signed],
) {
    let stream = js.get_stream(topology::STREAM_AUDIT).await.unwrap();
    stream.purge().filter(subjects::audit(cid)).await.unwrap();
    for (p, sig) in records {
        let mut h = async_nats::HeaderMap::new();
        if let Some((key, sig)) = sig {
            h.insert(audit::SIG_KEY_ID_HEADER, key.as_str());
            h.insert(audit::SIG_HEADER, sig.as_str());
        }
        js.publish_with_headers(subjects::audit(cid), h, p.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Purges the chain and republishes `payloads` in order.
async fn republish(js: &async_nats::jetstream::Context, cid: &str, payloads: &[Vec<u8>]) {
    let stream = js.get_stream(topology::STREAM_AUDIT).await.unwrap();
    stream.purge().filter(subjects::audit(cid)).await.unwrap();
    for p in payloads {
        js.publish(subjects::audit(cid), p.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_covers_a_campaign_across_a_coordinator_restart_and_shows_tampering() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let bin = tokio::task::spawn_blocking(|| support::workspace_binary("keywave-cli", "keywave"))
        .await
        .unwrap();

    let creds = credentials("aud", N, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 16);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s).await.unwrap();
    }

    // A campaign whose coordinator is replaced after the canary: the second
    // one continues the chain the first one wrote. Both sign tasks and
    // audit records with the same key, as a deployment does.
    let key = SigningKey::generate();
    let public = key.public().clone();
    let signer = TaskSigner::new(key, Duration::from_secs(300));
    let coordinator = |signer: TaskSigner| CoordinatorOptions {
        topology: support::topology(),
        coordinator_id: keywave_tests::unique("coordinator"),
        signer: Some(signer),
        ..Default::default()
    };
    let first = support::start_coordinator_with(&client, coordinator(signer.clone())).await;
    let api = ApiClient::new(client.clone());
    let mut s = support::spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1,50%",
        0.0,
        OnFailure::Pause,
    );
    s.bake_ms = 1_500;
    let cid = api.start(s).await.unwrap();
    keywave_tests::wait_until(Duration::from_secs(30), || {
        let api = api.clone();
        let cid = cid.clone();
        async move {
            api.status(&cid)
                .await
                .is_ok_and(|s| s.waves.first().is_some_and(|w| w.succeeded == 1))
        }
    })
    .await
    .expect("the canary succeeds");
    first.stop().await;
    let second = support::start_coordinator_with(&client, coordinator(signer)).await;
    let status = api
        .wait_terminal(&cid, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");

    // Everything gets appended: each event and each result, exactly once.
    let events = support::events(&client, &cid).await.len();
    let chain = wait_for(Duration::from_secs(20), || {
        let js = js.clone();
        let cid = cid.clone();
        async move {
            let rs = records(&js, &cid).await;
            let results: usize = rs
                .iter()
                .map(|(_, _, r)| match &r.entry {
                    Entry::Results { results } => results.len(),
                    _ => 0,
                })
                .sum();
            let evs = rs
                .iter()
                .filter(|(_, _, r)| matches!(r.entry, Entry::Event { .. }))
                .count();
            (results >= N && evs >= events).then_some(rs)
        }
    })
    .await
    .expect("the chain covers the campaign");
    second.stop().await;
    worker.stop().await;

    let mut seen = BTreeSet::new();
    for (_, _, r) in &chain {
        if let Entry::Results { results } = &r.entry {
            for d in results {
                assert!(
                    seen.insert(d.stream_seq),
                    "result {} audited twice",
                    d.stream_seq
                );
                assert!(d.new_fingerprint.is_some() && d.task_id.is_some());
            }
        }
    }
    assert_eq!(seen.len(), N);
    let writers: BTreeSet<&str> = chain.iter().map(|(_, _, r)| r.writer.as_str()).collect();
    assert_eq!(writers.len(), 2, "both coordinators appended: {writers:?}");
    assert!(chain.len() >= 4, "{}", chain.len());

    // Intact: the library and the CLI agree.
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.chains[0].records, chain.len() as u64);
    let (code, json) = cli_verify(&bin, &server.url(), &cid).await;
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["ok"], true);
    let all = keywave_coordinator::audit::verify(&js, None, &[])
        .await
        .unwrap();
    assert!(all.ok && all.chains.iter().any(|c| c.campaign_id == cid));
    // Every record is signed by the coordinators' key.
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), std::slice::from_ref(&public))
        .await
        .unwrap();
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.chains[0].signed, chain.len() as u64);
    let pk = public.to_hex();
    let (code, json) = cli_verify_with(&bin, &server.url(), &cid, &["--public-key", &pk]).await;
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["chains"][0]["signed"], chain.len() as u64);
    let signatures: Vec<Option<(String, String)>> =
        keywave_coordinator::audit::read_chain(&js, &cid)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, sig)| sig)
            .collect();
    assert!(signatures.iter().all(Option::is_some));

    let payloads: Vec<Vec<u8>> = chain.iter().map(|(_, p, _)| p.clone()).collect();

    // 1. Record 3 deleted through the JetStream API: a gap at 3.
    let stream = js.get_stream(topology::STREAM_AUDIT).await.unwrap();
    assert!(stream.delete_message(chain[2].0).await.unwrap());
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    match &report.chains[0].broken {
        Some(Break::Gap {
            expected_seq: 3,
            found_seq: 4,
            ..
        }) => {}
        other => panic!("expected a gap at record 3, got {other:?}"),
    }
    let (code, json) = cli_verify(&bin, &server.url(), &cid).await;
    assert_eq!(code, 4, "{json}");
    assert_eq!(json["chains"][0]["broken"]["problem"], "gap");
    assert_eq!(json["chains"][0]["broken"]["expected_seq"], 3);

    // 2. ... and a forged record 3 published in its place (correctly hashed
    // and chained to record 2): it lands at the end, record 4 still follows
    // record 2.
    let mut forged = chain[2].2.clone();
    forged.writer = "mallory".into();
    let (forged_payload, _) = audit::seal(&forged).unwrap();
    js.publish(subjects::audit(&cid), forged_payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    assert!(
        matches!(
            report.chains[0].broken,
            Some(Break::Gap {
                expected_seq: 3,
                found_seq: 4,
                ..
            })
        ),
        "{report:#?}"
    );

    // 3. Purged and republished with record 3's content edited (hash kept):
    // record 3 does not match its hash.
    let mut edited = payloads.clone();
    let text = String::from_utf8(edited[2].clone()).unwrap();
    let writer = &chain[2].2.writer;
    edited[2] = text
        .replacen(
            &format!("\"writer\":\"{writer}\""),
            "\"writer\":\"mallory\"",
            1,
        )
        .into_bytes();
    assert_ne!(edited[2], payloads[2]);
    republish(&js, &cid, &edited).await;
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    match &report.chains[0].broken {
        Some(Break::HashMismatch { seq: 3, found, .. }) => {
            assert_eq!(found, &audit::open(&payloads[2]).unwrap().0.hash);
        }
        other => panic!("expected record 3 altered, got {other:?}"),
    }

    // 4. Republished with record 3 edited and re-hashed: record 4 no longer
    // chains to it.
    let mut rehashed = payloads.clone();
    rehashed[2] = audit::seal(&forged).unwrap().0;
    republish(&js, &cid, &rehashed).await;
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    assert!(
        matches!(
            report.chains[0].broken,
            Some(Break::PrevMismatch { seq: 4, .. })
        ),
        "{report:#?}"
    );
    let (code, _) = cli_verify(&bin, &server.url(), &cid).await;
    assert_eq!(code, 4);

    // The original, republished as it was (with its signatures), verifies
    // again, signatures included.
    let original: Vec<_> = payloads.iter().cloned().zip(signatures.clone()).collect();
    republish_with_headers(&js, &cid, &original).await;
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), std::slice::from_ref(&public))
        .await
        .unwrap();
    assert!(report.ok, "{report:#?}");

    // 5. A consistent rewrite: record 3 edited and every later record
    // re-sealed onto it, the old signature headers copied. The hash chain
    // alone cannot tell; the signatures can, at record 3.
    let mut rewritten = Vec::new();
    let mut prev = String::new();
    for (i, (_, p, r)) in chain.iter().enumerate() {
        if i < 2 {
            prev = audit::open(p).unwrap().0.hash;
            rewritten.push((p.clone(), signatures[i].clone()));
            continue;
        }
        let mut r = r.clone();
        if i == 2 {
            r.writer = "mallory".into();
        }
        r.prev = prev.clone();
        let (payload, hash) = audit::seal(&r).unwrap();
        prev = hash;
        rewritten.push((payload, signatures[i].clone()));
    }
    republish_with_headers(&js, &cid, &rewritten).await;
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), &[])
        .await
        .unwrap();
    assert!(report.ok, "the hash chain alone is fooled: {report:#?}");
    let report = keywave_coordinator::audit::verify(&js, Some(&cid), std::slice::from_ref(&public))
        .await
        .unwrap();
    assert!(
        matches!(
            report.chains[0].broken,
            Some(Break::BadSignature { seq: 3, .. })
        ),
        "{report:#?}"
    );
    let (code, json) = cli_verify_with(&bin, &server.url(), &cid, &["--public-key", &pk]).await;
    assert_eq!(code, 4, "{json}");
    assert_eq!(json["chains"][0]["broken"]["problem"], "bad_signature");
}
