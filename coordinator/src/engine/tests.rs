//! Engine tests against the real nats-server on 127.0.0.1:4222, with a tiny
//! fake worker per test region that answers tasks directly. Every scenario
//! uses its own random region (and selects only it), so runs do not see each
//! other's credentials, tasks or results.

use super::*;
use async_nats::jetstream::consumer::{pull, DeliverPolicy, ReplayPolicy};
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::{
    codec::{self, Format},
    publish, subjects,
    wire::{
        CampaignEvent, CampaignSpec, Credential, ErrorClass, OnFailure, Outcome, RotationResult,
        RotationTask, Selector, Step, Strategy, TargetKind, TaskAction, WaveSize, SCHEMA_VERSION,
    },
};
use std::sync::Mutex as StdMutex;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(60);

/// A private nats-server for this test process: test processes run in
/// parallel and coordinators on one server would answer each other's API
/// requests (they share the API queue group).
async fn connect() -> (keywave_harness::NatsServer, async_nats::Client) {
    let server = keywave_harness::NatsServer::start();
    let client = server.client().await;
    (server, client)
}

fn creds(region: &str, n: usize) -> Vec<Credential> {
    (0..n)
        .map(|i| Credential {
            v: SCHEMA_VERSION,
            id: format!("{region}-c{i:03}"),
            region: region.to_string(),
            endpoint: "sim".into(),
            kind: TargetKind::Sim,
            principal: format!("svc-{i}"),
            tags: vec!["env=test".into()],
            owner: None,
            consumers: vec![],
        })
        .collect()
}

fn spec(region: &str, waves: &[u64], budget: f64, strategy: Strategy) -> CampaignSpec {
    CampaignSpec {
        v: SCHEMA_VERSION,
        name: format!("engine test {region}"),
        reason: None,
        selector: Selector {
            regions: vec![region.to_string()],
            ..Default::default()
        },
        strategy,
        waves: waves.iter().map(|&n| WaveSize::Count(n)).collect(),
        failure_budget: budget,
        bake_ms: 0,
        on_failure: OnFailure::Rollback,
        task_timeout_ms: 10_000,
        approve_before_waves: Vec::new(),
        preflight: None,
        preflight_max_unreachable: 0.0,
        requested_by: None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Succeed,
    Fail,
    Silent,
}

/// A fake worker: a pull consumer on the region's tasks that records every
/// task and answers it according to `rule`.
struct FakeWorker {
    tasks: Arc<StdMutex<Vec<RotationTask>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FakeWorker {
    async fn start(
        js: Context,
        region: &str,
        rule: impl Fn(&RotationTask) -> Answer + Send + Sync + 'static,
    ) -> FakeWorker {
        // The region's shared consumer. A silent fake worker's tasks are
        // not redelivered within a test (30 s ack wait) nor ever given up.
        let consumer = topology::ensure_region_tasks(
            &js,
            region,
            &topology::Config {
                task_backoff: vec![Duration::from_secs(30)],
                task_max_deliver: 1_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let tasks = Arc::new(StdMutex::new(Vec::new()));
        let stop = CancellationToken::new();
        // Announces itself as a real worker does (keywave_common::presence),
        // so its region counts as live.
        {
            let (client, s) = (js.client(), stop.clone());
            let beat = keywave_common::presence::Presence {
                v: keywave_common::presence::VERSION,
                region: region.to_string(),
                worker_id: "fake".into(),
                interval_ms: 500,
                in_flight: 0,
                concurrency: 1,
                leaving: false,
                at_ms: 0,
            };
            tokio::spawn(async move {
                let subject = subjects::worker_presence(&beat.region);
                loop {
                    let _ = client.publish(subject.clone(), beat.encode().into()).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = s.cancelled() => return,
                    }
                }
            });
        }
        let (t, s, region) = (tasks.clone(), stop.clone(), region.to_string());
        let task = tokio::spawn(async move {
            let mut msgs = consumer.messages().await.unwrap();
            loop {
                let m = tokio::select! {
                    m = msgs.next() => m,
                    _ = s.cancelled() => return,
                };
                let Some(Ok(m)) = m else { continue };
                let task: RotationTask = codec::decode(m.headers.as_ref(), &m.payload).unwrap();
                t.lock().unwrap().push(task.clone());
                let answer = rule(&task);
                if answer != Answer::Silent {
                    let (outcome, step, class) = match (task.action, answer) {
                        (TaskAction::Rotate, Answer::Succeed) => {
                            (Outcome::Succeeded, Step::Verified, None)
                        }
                        (TaskAction::Rotate, _) => {
                            (Outcome::Failed, Step::Set, Some(ErrorClass::Injected))
                        }
                        (TaskAction::Rollback, _) if task.strategy == Strategy::Containment => (
                            Outcome::RollbackRefused,
                            Step::Received,
                            Some(ErrorClass::RollbackRefused),
                        ),
                        (TaskAction::Rollback, _) => (Outcome::RolledBack, Step::Restored, None),
                    };
                    let result = RotationResult {
                        v: SCHEMA_VERSION,
                        task_id: task.task_id.clone(),
                        campaign_id: task.campaign_id.clone(),
                        wave: task.wave,
                        index: task.index,
                        action: task.action,
                        credential_id: task.credential_id.clone(),
                        region: region.clone(),
                        outcome,
                        step,
                        error_class: class,
                        error: None,
                        timings: vec![],
                        new_fingerprint: None,
                        old_fingerprint: None,
                        old_rejected: Some(true),
                        worker_id: "fake".into(),
                        finished_at_ms: now_ms(),
                        consumers: Vec::new(),
                    };
                    publish::send_and_confirm(
                        &js,
                        subjects::result(&region, &task.campaign_id),
                        Format::MsgPack,
                        &format!("result:{}", task.task_id),
                        &result,
                    )
                    .await
                    .unwrap();
                }
                m.ack().await.unwrap();
            }
        });
        FakeWorker { tasks, stop, task }
    }

    fn tasks(&self, action: TaskAction) -> Vec<RotationTask> {
        let mut v: Vec<_> = self
            .tasks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.action == action)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.credential_id.cmp(&b.credential_id));
        v.dedup_by(|a, b| a.task_id == b.task_id);
        v
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The names of a campaign's events, in order.
async fn event_names(js: &Context, cid: &str) -> Vec<String> {
    let stream = js.get_stream(topology::STREAM_EVENTS).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::event_campaign_filter(cid),
            deliver_policy: DeliverPolicy::All,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut names = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return names;
    }
    let mut msgs = consumer.messages().await.unwrap();
    while let Some(Ok(m)) = msgs.next().await {
        let ev: CampaignEvent = codec::decode(m.headers.as_ref(), &m.payload).unwrap();
        names.push(ev.kind.name().to_string());
        if m.info().unwrap().pending == 0 {
            break;
        }
    }
    names
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), CoordinatorError>>,
}

/// The fake workers never lose a delivery: a short redelivery schedule keeps
/// the deadlines' redelivery allowance small.
fn fake_topology() -> topology::Config {
    topology::Config {
        task_backoff: vec![Duration::from_millis(100)],
        ..Default::default()
    }
}

async fn run_coordinator(client: async_nats::Client) -> Running {
    let coordinator = Coordinator::start(
        client,
        CoordinatorOptions {
            progress_interval: Duration::from_millis(200),
            topology: fake_topology(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(coordinator.run(shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Waits until `f` holds for the campaign's status.
async fn wait_status(
    api: &ApiClient,
    cid: &str,
    what: &str,
    f: impl Fn(&CampaignStatus) -> bool,
) -> CampaignStatus {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(s) = api.status(cid).await {
            if f(&s) {
                return s;
            }
            if tokio::time::Instant::now() > until {
                panic!("campaign {cid} never reached: {what}; last status {s:#?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn setup(client: &async_nats::Client, n: usize) -> (Context, String) {
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &topology::Config::default())
        .await
        .unwrap();
    let region = ids::random_id("t");
    let kv = topology::inventory(&js, &topology::Config::default())
        .await
        .unwrap();
    inventory::put_all(&kv, &creds(&region, n)).await.unwrap();
    (js, region)
}

async fn three_waves_complete(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 10).await;
    let worker = FakeWorker::start(js.clone(), &region, |_| Answer::Succeed).await;
    let cid = api
        .start(spec(&region, &[2, 4], 0.0, Strategy::Continuity))
        .await
        .unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(
        s.waves.iter().map(|w| w.size).collect::<Vec<_>>(),
        vec![2, 4, 4]
    );
    assert_eq!(s.succeeded(), 10);
    assert_eq!(s.failed(), 0);
    assert_eq!(
        s.waves.iter().map(|w| w.decision).collect::<Vec<_>>(),
        vec![
            Some(Decision::NextWave),
            Some(Decision::NextWave),
            Some(Decision::Complete)
        ]
    );
    // Plan order is id order; task indexes are positions within the wave.
    let tasks = worker.tasks(TaskAction::Rotate);
    assert_eq!(tasks.len(), 10);
    let t = tasks
        .iter()
        .find(|t| t.credential_id.ends_with("c003"))
        .unwrap();
    assert_eq!((t.wave, t.index), (1, 1));
    assert_eq!(
        t.task_id,
        RotationTask::make_id(&cid, 1, TaskAction::Rotate, &t.credential_id)
    );
    let names = event_names(&js, &cid).await;
    assert_eq!(names.first().map(String::as_str), Some("created"));
    assert_eq!(names.iter().filter(|n| *n == "wave_started").count(), 3);
    assert_eq!(names.iter().filter(|n| *n == "decision").count(), 3);
    assert_eq!(names.last().map(String::as_str), Some("state_changed"));
    worker.stop().await;
}

use keywave_common::wire::Decision;

async fn failing_wave_rolls_back_only_succeeded(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 10).await;
    // Wave 1 (8 credentials): the first four fail.
    let worker = FakeWorker::start(js.clone(), &region, |t| {
        if t.wave == 1 && t.index < 4 {
            Answer::Fail
        } else {
            Answer::Succeed
        }
    })
    .await;
    let cid = api
        .start(spec(&region, &[2, 8], 0.1, Strategy::Continuity))
        .await
        .unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::RolledBack, "{s:#?}");
    let w1 = &s.waves[1];
    assert_eq!((w1.succeeded, w1.failed), (4, 4));
    assert_eq!(w1.decision, Some(Decision::Rollback));
    assert_eq!(w1.rollback_tasks, 4);
    assert_eq!(w1.rolled_back, 4);
    assert!(
        s.reason.as_deref().unwrap().contains("top class: injected"),
        "{:?}",
        s.reason
    );
    let rollbacks = worker.tasks(TaskAction::Rollback);
    let rolled: Vec<u32> = rollbacks.iter().map(|t| t.index).collect();
    assert_eq!(rolled.len(), 4);
    assert!(
        rollbacks.iter().all(|t| t.wave == 1 && t.index >= 4),
        "{rolled:?}"
    );
    assert!(rollbacks.iter().all(|t| t.task_id.contains(":rb1:")));
    let names = event_names(&js, &cid).await;
    for n in ["rollback_started", "rollback_finished"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    worker.stop().await;
}

async fn containment_refuses_rollback_then_resumes(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 10).await;
    let worker = FakeWorker::start(js.clone(), &region, |t| {
        if t.wave == 1 && t.index < 2 {
            Answer::Fail
        } else {
            Answer::Succeed
        }
    })
    .await;
    let cid = api
        .start(spec(&region, &[2, 4], 0.1, Strategy::Containment))
        .await
        .unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Paused, "{s:#?}");
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("containment never restores an exposed secret"),
        "{:?}",
        s.reason
    );
    assert!(worker.tasks(TaskAction::Rollback).is_empty());
    assert!(event_names(&js, &cid)
        .await
        .iter()
        .any(|n| n == "rollback_refused"));
    // An operator resumes: the campaign goes on with the next wave.
    let s = api.resume(&cid).await.unwrap();
    assert_ne!(s.state, CampaignState::Paused);
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(s.succeeded(), 8);
    assert_eq!(s.waves[2].succeeded, 4);
    worker.stop().await;
}

async fn missing_result_counts_as_no_result(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 3).await;
    let worker = FakeWorker::start(js.clone(), &region, |t| {
        if t.index == 1 {
            Answer::Silent
        } else {
            Answer::Succeed
        }
    })
    .await;
    let mut sp = spec(&region, &[3], 0.5, Strategy::Continuity);
    sp.task_timeout_ms = 300;
    let started = tokio::time::Instant::now();
    let cid = api.start(sp).await.unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert!(started.elapsed() >= Duration::from_millis(300) + DEADLINE_GRACE);
    let w = &s.waves[0];
    assert_eq!((w.succeeded, w.failed, w.no_result), (2, 0, 1));
    assert_eq!(w.failures.get("no_result"), Some(&1));
    assert_eq!(s.failed(), 1);
    worker.stop().await;
}

async fn pause_resume_abort_and_bad_requests(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 6).await;
    let worker = FakeWorker::start(js.clone(), &region, |_| Answer::Succeed).await;
    let mut sp = spec(&region, &[1, 2], 0.0, Strategy::Continuity);
    sp.bake_ms = 600_000;
    let cid = api.start(sp).await.unwrap();
    wait_status(&api, &cid, "baking", |s| s.state == CampaignState::Baking).await;
    let s = api.pause(&cid).await.unwrap();
    assert_eq!(s.state, CampaignState::Paused);
    // Resuming a campaign paused while baking starts the next wave at once.
    let s = api.resume(&cid).await.unwrap();
    assert_eq!(s.state, CampaignState::Running);
    wait_status(&api, &cid, "wave 1 finished, baking", |s| {
        s.current_wave == 1 && s.state == CampaignState::Baking
    })
    .await;
    let s = api.abort(&cid).await.unwrap();
    assert_eq!(s.state, CampaignState::Aborted);
    assert_eq!(
        worker.tasks(TaskAction::Rotate).len(),
        3,
        "wave 2 never issued"
    );
    assert!(matches!(
        api.resume(&cid).await,
        Err(ClientError::Conflict(_))
    ));
    assert!(matches!(
        api.status("c-doesnotexist").await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        api.start(spec(
            &ids::random_id("empty"),
            &[1],
            0.0,
            Strategy::Continuity
        ))
        .await,
        Err(ClientError::BadRequest(_))
    ));
    let mut bad = spec(&region, &[1], 0.0, Strategy::Continuity);
    bad.failure_budget = 3.0;
    assert!(matches!(
        api.start(bad).await,
        Err(ClientError::BadRequest(_))
    ));
    // Malformed requests get a bad_request reply, and the server lives on.
    let reply = client
        .request(subjects::api("campaign.start"), "not json".into())
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["class"], "bad_request");
    assert!(api.ping().await.is_ok());
    assert!(api
        .list()
        .await
        .unwrap()
        .iter()
        .any(|c| c.campaign_id == cid));
    worker.stop().await;
}

async fn approval_gates_hold_waves_until_approved(client: async_nats::Client, api: ApiClient) {
    let (js, region) = setup(&client, 5).await;
    let worker = FakeWorker::start(js.clone(), &region, |_| Answer::Succeed).await;
    let mut bad = spec(&region, &[1, 2], 0.0, Strategy::Continuity);
    bad.approve_before_waves = vec![7];
    assert!(matches!(
        api.start(bad).await,
        Err(ClientError::BadRequest(m)) if m.contains("wave 7")
    ));
    // Waves of 1, 2, 2: the canary and the last wave need an approval.
    let mut sp = spec(&region, &[1, 2], 0.0, Strategy::Continuity);
    sp.approve_before_waves = vec![0, 2];
    let cid = api.start(sp).await.unwrap();
    let s = wait_status(&api, &cid, "awaiting approval of wave 0", |s| {
        s.state == CampaignState::AwaitingApproval
    })
    .await;
    assert_eq!(s.current_wave, 0);
    assert!(s.waves[0].approval_required && !s.waves[1].approval_required);
    assert!(
        worker.tasks(TaskAction::Rotate).is_empty(),
        "nothing issued"
    );
    assert!(matches!(
        api.approve(&cid, Some(1), "alice").await,
        Err(ClientError::Conflict(m)) if m.contains("does not need an approval")
    ));
    assert!(matches!(
        api.approve(&cid, Some(9), "alice").await,
        Err(ClientError::Conflict(_))
    ));
    assert!(matches!(
        api.approve(&cid, None, " ").await,
        Err(ClientError::BadRequest(_))
    ));
    let t = std::time::Instant::now();
    let s = api.approve(&cid, None, "alice").await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_ne!(s.state, CampaignState::AwaitingApproval, "{s:#?}");
    assert_eq!(s.waves[0].approved_by.as_deref(), Some("alice"));
    let s = wait_status(&api, &cid, "awaiting approval of wave 2", |s| {
        s.state == CampaignState::AwaitingApproval && s.current_wave == 2
    })
    .await;
    assert!(s.reason.unwrap().contains("keywave campaign approve"));
    assert_eq!(worker.tasks(TaskAction::Rotate).len(), 3);
    // Paused while waiting, resumed: it waits again; resuming approves nothing.
    assert_eq!(api.pause(&cid).await.unwrap().state, CampaignState::Paused);
    api.resume(&cid).await.unwrap();
    wait_status(&api, &cid, "awaiting approval again", |s| {
        s.state == CampaignState::AwaitingApproval
    })
    .await;
    let s = api.approve(&cid, Some(2), "bob").await.unwrap();
    assert_eq!(s.waves[2].approved_by.as_deref(), Some("bob"));
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(s.succeeded(), 5);
    assert!(matches!(
        api.approve(&cid, None, "carol").await,
        Err(ClientError::Conflict(m)) if m.contains("completed")
    ));
    let names = event_names(&js, &cid).await;
    assert_eq!(
        names.iter().filter(|n| *n == "approval_required").count(),
        2
    );
    assert_eq!(names.iter().filter(|n| *n == "approved").count(), 2);
    let approvals = read_approvals(&js, &cid).await.unwrap();
    assert_eq!(
        approvals
            .iter()
            .map(|a| (a.wave, a.by.as_str()))
            .collect::<Vec<_>>(),
        vec![(0, "alice"), (2, "bob")]
    );
    worker.stop().await;
}

/// Every event of a campaign, in order.
async fn events_of(js: &Context, cid: &str) -> Vec<CampaignEvent> {
    let stream = js.get_stream(topology::STREAM_EVENTS).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::event_campaign_filter(cid),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return out;
    }
    let mut msgs = consumer.messages().await.unwrap();
    while let Some(Ok(m)) = msgs.next().await {
        out.push(codec::decode(m.headers.as_ref(), &m.payload).unwrap());
        if m.info().unwrap().pending == 0 {
            break;
        }
    }
    out
}

/// Pre-flight: the agent of wave 0's `attest` consumer is not running, so
/// the campaign pauses before the wave (no task issued) naming it; once an
/// agent answers and the campaign is resumed, the pre-flight passes and the
/// campaign completes. `http` and `none` consumers are not asked; an agent
/// that does not watch a credential of the wave is listed.
async fn preflight_holds_a_wave_until_its_agents_answer(
    client: async_nats::Client,
    api: ApiClient,
) {
    use keywave_common::wire::{ConsumerRef, VerifyKind};
    let (js, region) = setup(&client, 0).await;
    let mut cs = creds(&region, 3);
    cs[0].consumers = vec![ConsumerRef::id("api")];
    cs[1].consumers = vec![
        ConsumerRef::id("api"),
        ConsumerRef {
            verify: Some(VerifyKind::Http),
            url: Some("http://127.0.0.1:1/healthz".into()),
            ..ConsumerRef::id("web")
        },
    ];
    cs[2].consumers = vec![ConsumerRef {
        verify: Some(VerifyKind::None),
        ..ConsumerRef::id("cron")
    }];
    let kv = topology::inventory(&js, &topology::Config::default())
        .await
        .unwrap();
    inventory::put_all(&kv, &cs).await.unwrap();
    let worker = FakeWorker::start(js.clone(), &region, |_| Answer::Succeed).await;
    let cid = api
        .start(spec(&region, &[1, 2], 0.0, Strategy::Continuity))
        .await
        .unwrap();
    let s = wait_status(&api, &cid, "paused by the pre-flight", |s| {
        s.state == CampaignState::Paused
    })
    .await;
    assert_eq!(
        s.spec.preflight,
        Some(true),
        "on: the plan has attest consumers"
    );
    let reason = s.reason.unwrap();
    assert_eq!(
        reason,
        format!("pre-flight: 1 of 1 consumer agents unreachable (api in {region}) > allowed 0.0%; wave 0 not started")
    );
    assert!(s.waves[0].started_at_ms.is_none() && !s.waves[0].published);
    assert!(
        worker.tasks(TaskAction::Rotate).is_empty(),
        "no task issued"
    );
    // Resumed without an agent: checked again, paused again.
    api.resume(&cid).await.unwrap();
    let events = wait_for_events(&js, &cid, "a second pre-flight", |e| {
        e.iter().filter(|e| e.kind.name() == "preflight").count() >= 2
    })
    .await;
    assert!(!events.iter().any(|e| e.kind.name() == "wave_started"));
    wait_status(&api, &cid, "paused again", |s| {
        s.state == CampaignState::Paused
    })
    .await;

    // An agent answers (it watches only the first credential), resume.
    let stop = CancellationToken::new();
    let agent = answer_pings(&client, "api", &region, &cs[0].id, stop.clone()).await;
    api.resume(&cid).await.unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(worker.tasks(TaskAction::Rotate).len(), 3);
    let pre: Vec<_> = events_of(&js, &cid)
        .await
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Preflight {
                wave,
                asked,
                unreachable,
                passed,
                not_watching,
                ..
            } => Some((wave, asked, unreachable, passed, not_watching)),
            _ => None,
        })
        .collect();
    assert_eq!(pre.len(), 4, "{pre:#?}");
    assert_eq!(
        pre.iter().map(|p| (p.0, p.1, p.2, p.3)).collect::<Vec<_>>(),
        vec![
            (0, 1, 1, false),
            (0, 1, 1, false),
            (0, 1, 0, true),
            // Wave 1: only `api` is asked (`web` is http, `cron` none).
            (1, 1, 0, true)
        ]
    );
    assert_eq!(
        pre[3].4.len(),
        1,
        "api does not watch the second credential"
    );
    assert_eq!(pre[3].4[0].credential.as_deref(), Some(cs[1].id.as_str()));

    // --no-preflight: the same campaign runs without asking anyone.
    let mut off = spec(&region, &[3], 0.0, Strategy::Continuity);
    off.preflight = Some(false);
    stop.cancel();
    agent.await.unwrap();
    let cid = api.start(off).await.unwrap();
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert!(!event_names(&js, &cid)
        .await
        .iter()
        .any(|n| n == "preflight"));
    worker.stop().await;
}

/// Waits until the campaign's events satisfy `f`.
async fn wait_for_events(
    js: &Context,
    cid: &str,
    what: &str,
    f: impl Fn(&[CampaignEvent]) -> bool,
) -> Vec<CampaignEvent> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let e = events_of(js, cid).await;
        if f(&e) {
            return e;
        }
        if tokio::time::Instant::now() > until {
            panic!("campaign {cid} never recorded: {what}; events {e:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One coordinator serves every scenario (several coordinators in one
/// process would share the API queue group and answer each other's
/// requests); the scenarios run concurrently on their own regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_scenarios_against_real_nats() {
    let (_server, client) = connect().await;
    let _serial = COORDINATOR_TEST_LOCK.lock().await;
    let running = run_coordinator(client.clone()).await;
    let api = ApiClient::new(client.clone());
    tokio::join!(
        three_waves_complete(client.clone(), api.clone()),
        failing_wave_rolls_back_only_succeeded(client.clone(), api.clone()),
        containment_refuses_rollback_then_resumes(client.clone(), api.clone()),
        missing_result_counts_as_no_result(client.clone(), api.clone()),
        pause_resume_abort_and_bad_requests(client.clone(), api.clone()),
        approval_gates_hold_waves_until_approved(client.clone(), api.clone()),
        preflight_holds_a_wave_until_its_agents_answer(client.clone(), api.clone()),
    );
    running.stop().await;

    // A coordinator restart in the middle of a campaign: the next one
    // replays the results and finishes the same campaign.
    let (js, region) = setup(&client, 5).await;
    let worker = FakeWorker::start(js.clone(), &region, |_| Answer::Succeed).await;
    let running = run_coordinator(client.clone()).await;
    let mut sp = spec(&region, &[2, 3], 0.0, Strategy::Continuity);
    sp.bake_ms = 1_500;
    let cid = api.start(sp).await.unwrap();
    wait_status(&api, &cid, "baking", |s| s.state == CampaignState::Baking).await;
    running.stop().await;
    let running = run_coordinator(client.clone()).await;
    let s = api.wait_terminal(&cid, WAIT).await.unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(s.succeeded(), 5);
    assert_eq!(s.waves[0].succeeded, 2);
    assert_eq!(worker.tasks(TaskAction::Rotate).len(), 5);
    running.stop().await;
    worker.stop().await;
}

/// Answers the consumer `consumer`'s liveness pings as its agent would (the
/// real agent, in the worker crate, is tested against this coordinator by the
/// integration tests): it watches `credential`, not yet checked.
async fn answer_pings(
    client: &async_nats::Client,
    consumer: &str,
    region: &str,
    credential: &str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    use keywave_common::wire::{AgentCredential, AgentStatus};
    let subject = keywave_common::subjects::agent_ping(region, consumer).unwrap();
    let sub = client.subscribe(subject).await.unwrap();
    client.flush().await.unwrap();
    let (client, consumer, region, credential) = (
        client.clone(),
        consumer.to_string(),
        region.to_string(),
        credential.to_string(),
    );
    tokio::spawn(async move {
        let mut sub = std::pin::pin!(sub.take_until(stop.cancelled_owned()));
        while let Some(msg) = sub.next().await {
            let status = AgentStatus {
                v: keywave_common::wire::SCHEMA_VERSION,
                consumer_id: consumer.clone(),
                region: region.clone(),
                version: "test".into(),
                credentials: vec![AgentCredential {
                    id: credential.clone(),
                    healthy: None,
                }],
                healthy: true,
                at_ms: keywave_common::now_ms(),
            };
            let body = keywave_common::codec::encode(keywave_common::codec::Format::Json, &status)
                .unwrap();
            let headers = keywave_common::codec::headers(
                keywave_common::codec::Format::Json,
                &format!("ping:{region}:{consumer}:{}", status.at_ms),
            );
            let reply = msg.reply.expect("pings carry a reply subject");
            client
                .publish_with_headers(reply, headers, body)
                .await
                .unwrap();
        }
    })
}
