//! Distributed tracing: a sim campaign run by an in-process coordinator and
//! worker under the production subscriber (`keywave_common::telemetry`)
//! exporting to memory. Every worker task span is a child of the
//! coordinator's wave span (same trace, parent id = the wave span's id,
//! carried by the `traceparent` header of the task), every protocol step
//! span a child of its task span, and every result carries the task span's
//! trace context.
//!
//! The subscriber is installed for this thread only (`set_default`) and the
//! runtime is single-threaded, so every task of the campaign runs under it
//! and no global state is shared with other tests.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::telemetry::{self, LogFormat};
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_tests::NatsServer;
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::{InMemorySpanExporterBuilder, SpanData};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const REGION: &str = "eu";
const N: usize = 12;

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[test]
fn worker_task_spans_are_children_of_the_coordinators_wave_span() {
    let exporter = InMemorySpanExporterBuilder::new().build();
    let (dispatch, provider) = telemetry::dispatch_with_exporter(
        &telemetry::Options::new("keywave-tests", LogFormat::Text, "warn"),
        exporter.clone(),
    );
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (cid, traceparents) = rt.block_on(async {
        let server = NatsServer::start();
        let client = server.client().await;
        let creds = credentials("traced", N, &[REGION], "sim-main", TargetKind::Sim);
        support::put_inventory(&client, &creds).await;
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 16);
        let key = keywave_common::crypto::RegionKey::generate();
        let worker =
            support::start_worker(&client, REGION, &key, Arc::new(targets), Faults::none()).await;
        for c in &creds {
            let s = secret();
            sim.seed(&c.principal, &s);
            worker.store.enroll(&c.id, s).await.unwrap();
        }
        let coordinator = support::start_coordinator(&client).await;
        let api = ApiClient::new(client.clone());
        let cid = api
            .start(spec(
                in_regions(&[REGION]),
                Strategy::Continuity,
                "2,100%",
                0.0,
                OnFailure::Pause,
            ))
            .await
            .unwrap();
        let status = api
            .wait_terminal(&cid, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
        assert_eq!(status.succeeded(), N as u64);
        let results = support::read_stream(
            &client,
            keywave_common::topology::STREAM_RESULTS,
            &keywave_common::subjects::result_campaign_filter(&cid),
        )
        .await;
        let traceparents: Vec<Option<String>> = results
            .iter()
            .map(|m| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(telemetry::TRACEPARENT))
                    .map(|v| v.as_str().to_string())
            })
            .collect();
        coordinator.stop().await;
        worker.stop().await;
        (cid, traceparents)
    });
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let named = |n: &str| {
        spans
            .iter()
            .filter(move |s| s.name == n)
            .collect::<Vec<_>>()
    };

    // The campaign's root span and its waves.
    let campaign = named("campaign");
    let campaign = campaign
        .iter()
        .find(|s| attr(s, "campaign").as_deref() == Some(cid.as_str()))
        .expect("a campaign span");
    assert_eq!(
        campaign.parent_span_id,
        SpanId::INVALID,
        "campaign is a root"
    );
    let waves: HashMap<SpanId, &SpanData> = named("wave")
        .into_iter()
        .filter(|w| w.span_context.trace_id() == campaign.span_context.trace_id())
        .map(|w| (w.span_context.span_id(), w))
        .collect();
    assert_eq!(waves.len(), 2, "one span per wave (2, 100%)");
    for w in waves.values() {
        assert_eq!(w.parent_span_id, campaign.span_context.span_id());
    }

    // Every task span is a child of a wave span, in the wave's trace.
    let tasks: Vec<_> = named("task")
        .into_iter()
        .filter(|t| attr(t, "campaign").as_deref() == Some(cid.as_str()))
        .collect();
    assert_eq!(tasks.len(), N, "one task span per credential");
    let mut per_wave: HashMap<SpanId, usize> = HashMap::new();
    for t in &tasks {
        let wave = waves
            .get(&t.parent_span_id)
            .unwrap_or_else(|| panic!("task span {:?} has no wave span as parent", t.name));
        assert_eq!(t.span_context.trace_id(), wave.span_context.trace_id());
        assert!(t.parent_span_is_remote, "the parent came over NATS");
        assert_eq!(
            attr(t, "wave"),
            attr(wave, "wave"),
            "the task's wave is its parent's"
        );
        *per_wave.entry(t.parent_span_id).or_default() += 1;
    }
    let mut sizes: Vec<usize> = per_wave.values().copied().collect();
    sizes.sort();
    assert_eq!(sizes, vec![2, N - 2]);

    // Each step span is a child of a task span.
    let task_ids: HashMap<SpanId, &SpanData> = tasks
        .iter()
        .map(|t| (t.span_context.span_id(), *t))
        .collect();
    let steps: Vec<_> = named("step")
        .into_iter()
        .filter(|s| task_ids.contains_key(&s.parent_span_id))
        .collect();
    assert!(
        steps.len() >= N * 5,
        "stage, set, test, promote, revoke, verify per task: {} step spans",
        steps.len()
    );
    assert!(steps
        .iter()
        .any(|s| attr(s, "step").as_deref() == Some("set")));

    // Every result carries the trace context of its task span.
    assert_eq!(traceparents.len(), N);
    for tp in traceparents {
        let tp = tp.expect("a result without traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(
            parts[1],
            campaign.span_context.trace_id().to_string(),
            "result in the campaign's trace"
        );
        let parent = SpanId::from_hex(parts[2]).unwrap();
        assert!(
            task_ids.contains_key(&parent),
            "result's parent is a task span"
        );
    }
}
