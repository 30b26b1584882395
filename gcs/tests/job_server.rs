//! The head's job server refuses what its authorization table does not allow, before any
//! handler runs, and a submission's credential starts jobs only while it runs; a job
//! ships only packages its account uploaded; task events are written by a job for its
//! own tasks and read by its account (a job's credential: its own job's only).

use std::time::Duration;

use ionet_common::authz::{Access, HTTP_TABLE};
use ionet_common::config::ClusterConfig;
use ionet_common::rpc::proto::common::{JobPackages, WorkerCommand};
use ionet_common::rpc::proto::gcs::{
    AddJobRequest, AddTaskEventsRequest, CreateTokenRequest, GetAllNodesRequest, GetPackageRequest, ListTasksRequest,
    PutPackageRequest, TaskState,
};
use ionet_common::task_event_batch::{BatchBuilder, Event};
use ionet_gcs::{GcsServer, GcsServerOptions};

async fn head() -> (GcsServer, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = GcsServer::start(GcsServerOptions::new(ClusterConfig::default()), listener).await.unwrap();
    let jobs = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = server.serve_jobs(jobs, &server.address().to_string()).unwrap();
    (server, format!("http://{address}"))
}

async fn call(base: &str, method: &str, route: &str, credential: Option<&str>) -> (u16, String) {
    let path = route.replace("{submission_id}", "nobody-1").replace("{node_id}", &"ab".repeat(28));
    let client = reqwest::Client::new();
    let mut request = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(credential) = credential {
        request = request.bearer_auth(credential);
    }
    if method == "POST" && route.starts_with("/api/jobs") && !route.ends_with("/stop") {
        request = request.json(&serde_json::json!({ "entrypoint": "true" }));
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A job started by `account`'s key on `server`: its id, clients speaking with its own
/// credential and with the key, the key and the job's credential.
struct StartedJob {
    job_id: Vec<u8>,
    job: ionet_common::rpc::GcsClient,
    account: ionet_common::rpc::GcsClient,
    key: ionet_common::auth::Bearer,
    credential: ionet_common::auth::Bearer,
}

async fn start_job(server: &GcsServer, account: &str) -> StartedJob {
    let address = server.address().to_string();
    let key = server.account_credential(account, Duration::from_secs(600));
    let mut gcs = ionet_common::rpc::gcs_client(&address, &key).await.unwrap();
    let request = AddJobRequest {
        worker_command: Some(WorkerCommand { argv: vec!["/bin/true".into()], ..Default::default() }),
        ..Default::default()
    };
    let started = gcs.add_job(request).await.unwrap().into_inner();
    let credential = ionet_common::auth::Bearer::new(&started.job_credential).unwrap();
    StartedJob {
        job_id: started.job.unwrap().job_id,
        job: ionet_common::rpc::gcs_client(&address, &credential).await.unwrap(),
        account: gcs,
        key,
        credential,
    }
}

/// A report of job `job`'s task `events`.
fn report(job: &[u8], events: &[Event<'_>]) -> AddTaskEventsRequest {
    let mut batch = BatchBuilder::new(job);
    for event in events {
        batch.push(event);
    }
    AddTaskEventsRequest { events: Some(batch.finish()), dropped: 0 }
}

/// Task ids `[n; TaskId::LEN]`, by n.
const TASK_IDS: [[u8; ionet_common::TaskId::LEN]; 8] = {
    let mut ids = [[0; ionet_common::TaskId::LEN]; 8];
    let mut n = 0;
    while n < 8 {
        ids[n] = [n as u8; ionet_common::TaskId::LEN];
        n += 1;
    }
    ids
};

#[tokio::test]
async fn every_route_is_served_behind_its_row() {
    let (server, base) = head().await;
    let job = server.submission_credential("s-1", "n", "acme", Duration::from_secs(60));
    for rule in HTTP_TABLE {
        // The dashboard's page holds no data: anyone may load it.
        if rule.access == Access::Public {
            let (status, body) = call(&base, rule.method, rule.route, None).await;
            assert_eq!((rule.route, status), ("/", 200), "{body}");
            assert!(body.contains("<title>ionet dashboard</title>"), "{body}");
            continue;
        }
        // Every other row is a route the server serves, and refuses without a credential.
        let (status, body) = call(&base, rule.method, rule.route, None).await;
        assert_eq!(status, 401, "{} {} without a credential: {body}", rule.method, rule.route);
        assert!(body.contains("missing credential"), "{body}");
        let (status, _) = call(&base, rule.method, rule.route, Some("ionet1.forged.signature")).await;
        assert_eq!(status, 401, "{} {} with a forged credential", rule.method, rule.route);
        // A submitted job's entrypoint (a provider's node holds its credential) reads the
        // version, nothing of the account's: no submission, no output, no package.
        let (status, body) = call(&base, rule.method, rule.route, Some(job.as_str())).await;
        match rule.access {
            Access::Submit => {
                assert_eq!(status, 403, "{} {} by an entrypoint: {body}", rule.method, rule.route);
                assert!(body.contains("requires an account's API key"), "{body}");
            }
            // The version, and the dashboard's data as the public face: nothing of an account's.
            Access::Read => {
                assert_eq!(status, 200, "{} {}: {body}", rule.method, rule.route);
                assert!(!body.contains("acme"), "{body}");
            }
            // A node's metrics through the head: the operator's or a scraper's.
            Access::Metrics if rule.route.contains("{node_id}") => {
                assert_eq!(status, 403, "{} {}: {body}", rule.method, rule.route);
                assert!(body.contains("may not read node"), "{body}");
            }
            // The public face of the cluster, nothing of any account's.
            Access::Metrics => {
                assert_eq!(status, 200, "{} {}: {body}", rule.method, rule.route);
                assert!(!body.contains("account="), "{body}");
            }
            other => panic!("{} {} has an unexpected row: {other:?}", rule.method, rule.route),
        }
    }
    // A route the server does not serve is not found, whoever asks.
    let (status, _) = call(&base, "GET", "/api/secrets", None).await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn a_submission_credential_starts_jobs_only_while_its_submission_runs() {
    let (server, base) = head().await;
    let account = server.account_credential("acme", Duration::from_secs(60));
    // No node can run it: it fails at once.
    let (status, body) = call(&base, "POST", "/api/jobs/", Some(account.as_str())).await;
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["submission_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, details) = call(&base, "GET", &format!("/api/jobs/{id}"), Some(account.as_str())).await;
        let details: serde_json::Value = serde_json::from_str(&details).unwrap();
        if details["status"] == "FAILED" {
            assert!(details["message"].as_str().unwrap().contains("no node can run the entrypoint"), "{details}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{details}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let record = server.submissions().get(&ionet_common::authz::Principal::Admin, &id).unwrap();
    let ended = server.submission_credential(&id, &record.credential_nonce, "acme", Duration::from_secs(60));
    let mut gcs = ionet_common::rpc::gcs_client(&server.address().to_string(), &ended).await.unwrap();
    let request = AddJobRequest {
        worker_command: Some(WorkerCommand { argv: vec!["/bin/true".into()], ..Default::default() }),
        ..Default::default()
    };
    let refused = gcs.add_job(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("has ended"), "{}", refused.message());
    // Nor may a credential name a submission that never was.
    let forged = server.submission_credential("never-submitted", "n", "acme", Duration::from_secs(60));
    let mut gcs = ionet_common::rpc::gcs_client(&server.address().to_string(), &forged).await.unwrap();
    assert_eq!(gcs.add_job(request).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    server.shutdown().await;
}

#[tokio::test]
async fn a_credential_of_an_earlier_submission_of_the_same_id_starts_nothing() {
    let (server, base) = head().await;
    let account = server.account_credential("acme", Duration::from_secs(60));
    let submit = |base: String, account: String| async move {
        let client = reqwest::Client::new();
        let body = serde_json::json!({ "entrypoint": "true", "submission_id": "nightly" });
        client.post(format!("{base}/api/jobs/")).bearer_auth(account).json(&body).send().await.unwrap().status()
    };
    assert_eq!(submit(base.clone(), account.as_str().to_string()).await, 200);
    let admin = ionet_common::authz::Principal::Admin;
    let first = server.submissions().get(&admin, "nightly").unwrap().credential_nonce;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !server.submissions().get(&admin, "nightly").unwrap().status.is_terminal() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = call(&base, "DELETE", "/api/jobs/nightly", Some(account.as_str())).await;
    assert_eq!(status, 200);
    assert_eq!(submit(base.clone(), account.as_str().to_string()).await, 200);
    let second = server.submissions().get(&admin, "nightly").unwrap().credential_nonce;
    assert_ne!(first, second, "each submission's credential is its own");
    assert!(!server.submissions().is_live("nightly", &first));
    server.shutdown().await;
}

#[tokio::test]
async fn a_job_ships_only_packages_its_account_uploaded() {
    let (server, _) = head().await;
    let address = server.address().to_string();
    let acme = server.account_credential("acme", Duration::from_secs(60));
    let rival = server.account_credential("rival", Duration::from_secs(60));
    let name = "_ray_pkg_0123456789abcdef.zip";
    let shipping = AddJobRequest {
        worker_command: Some(WorkerCommand {
            argv: vec!["/bin/true".into()],
            packages: Some(JobPackages { working_dir: format!("gcs://{name}"), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut gcs = ionet_common::rpc::gcs_client(&address, &acme).await.unwrap();
    let has = |name: &str| GetPackageRequest { name: name.to_string() };
    assert!(!gcs.has_package(has(name)).await.unwrap().into_inner().exists);
    let refused = gcs.add_job(shipping.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("was not uploaded by account acme"), "{}", refused.message());

    // Uploaded in chunks, it may be shipped.
    let mut zip = b"PK\x03\x04".to_vec();
    zip.resize(3 << 20, 7);
    let chunks: Vec<PutPackageRequest> =
        zip.chunks(1 << 20).map(|data| PutPackageRequest { name: name.into(), data: data.to_vec() }).collect();
    gcs.put_package(tokio_stream::iter(chunks)).await.unwrap();
    assert!(gcs.has_package(has(name)).await.unwrap().into_inner().exists);
    let started = gcs.add_job(shipping.clone()).await.unwrap().into_inner();

    // Another account has none of it; a job's credential (a provider's node holds it)
    // uploads nothing; an upload is one package.
    let mut theirs = ionet_common::rpc::gcs_client(&address, &rival).await.unwrap();
    assert!(!theirs.has_package(has(name)).await.unwrap().into_inner().exists);
    assert_eq!(theirs.add_job(shipping).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let job = ionet_common::auth::Bearer::new(&started.job_credential).unwrap();
    let mut as_job = ionet_common::rpc::gcs_client(&address, &job).await.unwrap();
    let planted = vec![PutPackageRequest { name: "_ray_pkg_planted.zip".into(), data: b"PK".to_vec() }];
    assert_eq!(
        as_job.put_package(tokio_stream::iter(planted)).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let two = vec![
        PutPackageRequest { name: "_ray_pkg_a.zip".into(), data: b"PK".to_vec() },
        PutPackageRequest { name: "_ray_pkg_b.zip".into(), data: b"PK".to_vec() },
    ];
    let mixed = gcs.put_package(tokio_stream::iter(two)).await.unwrap_err();
    assert_eq!(mixed.code(), tonic::Code::InvalidArgument, "{}", mixed.message());
    let traversal = vec![PutPackageRequest { name: "../escape.zip".into(), data: b"PK".to_vec() }];
    assert_eq!(gcs.put_package(tokio_stream::iter(traversal)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn task_events_are_a_jobs_own_and_its_accounts_to_read() {
    let (server, _) = head().await;
    let StartedJob { job_id: first, job: mut first_job, account: mut acme, .. } = start_job(&server, "acme").await;
    let StartedJob { job_id: second, job: mut second_job, .. } = start_job(&server, "acme").await;
    let StartedJob { job: mut rival_job, account: mut rival, .. } = start_job(&server, "rival").await;
    let names: Vec<String> = (0..8).map(|task| format!("task {task}")).collect();
    let event = |task: usize| Event {
        task_id: &TASK_IDS[task],
        name: &names[task],
        state: TaskState::Running,
        ..Default::default()
    };
    first_job.add_task_events(report(&first, &[event(1)])).await.unwrap();
    second_job.add_task_events(report(&second, &[event(2)])).await.unwrap();

    // A job writes its own tasks only, in bounded, well-formed reports.
    let foreign = first_job.add_task_events(report(&second, &[event(3)])).await.unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied, "{}", foreign.message());
    let short = Event { task_id: &[4], ..event(4) };
    let refused = first_job.add_task_events(report(&first, &[short])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("no whole number"), "{}", refused.message());
    let mut uneven = report(&first, &[event(4), event(5)]);
    uneven.events.as_mut().unwrap().states.pop();
    let refused = first_job.add_task_events(uneven).await.unwrap_err();
    assert!(refused.message().contains("the column states holds 1"), "{}", refused.message());
    let flood: Vec<Event<'_>> = (0..10_001).map(|_| event(5)).collect();
    assert_eq!(
        first_job.add_task_events(report(&first, &flood)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // An actor's creation is the head's to record: a job may not speak for one (nor
    // begin an ended one again).
    let actor = ionet_common::ActorId::from_array([3; ionet_common::ActorId::LEN]);
    let creation = ionet_common::TaskId::actor_creation(&actor);
    let forged = Event { task_id: creation.as_bytes(), actor_id: actor.as_bytes(), attempt: u32::MAX, ..event(7) };
    let refused = first_job.add_task_events(report(&first, &[forged])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("the head records those"), "{}", refused.message());
    // An account's key starts jobs; it reports no tasks of its own.
    let keyed = acme.add_task_events(report(&first, &[event(6)])).await.unwrap_err();
    assert_eq!(keyed.code(), tonic::Code::PermissionDenied);

    let names = |reply: ionet_common::rpc::proto::gcs::ListTasksReply| -> Vec<String> {
        reply.tasks.into_iter().map(|task| task.name).collect()
    };
    let all = ListTasksRequest::default();
    // The account's key reads both of its jobs; a job's credential (a provider's node
    // holds it) its own job only; another account nothing.
    assert_eq!(names(acme.list_tasks(all.clone()).await.unwrap().into_inner()), ["task 1", "task 2"]);
    assert_eq!(names(first_job.list_tasks(all.clone()).await.unwrap().into_inner()), ["task 1"]);
    let other_job = ListTasksRequest { job_id: second.clone(), ..Default::default() };
    assert!(names(first_job.list_tasks(other_job.clone()).await.unwrap().into_inner()).is_empty());
    assert!(names(rival.list_tasks(other_job).await.unwrap().into_inner()).is_empty());
    assert!(names(rival_job.list_tasks(all).await.unwrap().into_inner()).is_empty());
    server.shutdown().await;
}

/// The value of the sample `series` (name and labels, as encoded) in metrics `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_show_each_credential_its_own_and_the_scrapers_token_reads_nothing_else() {
    let (server, base) = head().await;
    let address = server.address().to_string();
    let StartedJob { job_id: acme_job, job: mut acme_gcs, key: acme_key, credential: acme_job_credential, .. } =
        start_job(&server, "acme").await;
    let StartedJob { job_id: rival_job, job: mut rival_gcs, key: rival_key, .. } = start_job(&server, "rival").await;
    let event = |task: usize, state: TaskState| Event { task_id: &TASK_IDS[task], state, ..Default::default() };
    let acme_events = [event(1, TaskState::Running), event(2, TaskState::Running), event(2, TaskState::Finished)];
    acme_gcs.add_task_events(report(&acme_job, &acme_events)).await.unwrap();
    rival_gcs.add_task_events(report(&rival_job, &[event(1, TaskState::Running)])).await.unwrap();

    let scrape = |credential: String| {
        let base = base.clone();
        async move {
            let response =
                reqwest::Client::new().get(format!("{base}/metrics")).bearer_auth(credential).send().await.unwrap();
            let (status, kind) = (response.status().as_u16(), response.headers()["content-type"].clone());
            let text = response.text().await.unwrap();
            assert_eq!(status, 200, "{text}");
            assert!(kind.to_str().unwrap().starts_with("application/openmetrics-text"), "{kind:?}");
            assert!(text.ends_with("# EOF\n"), "{text}");
            text
        }
    };
    // An account's key: its own account's tasks and jobs, no stranger's.
    let acme = scrape(acme_key.as_str().to_string()).await;
    assert_eq!(sample(&acme, r#"ionet_tasks{state="RUNNING",account="acme"}"#), Some(1.0), "{acme}");
    assert_eq!(sample(&acme, r#"ionet_tasks{state="FINISHED",account="acme"}"#), Some(1.0), "{acme}");
    assert_eq!(sample(&acme, r#"ionet_task_events_total{account="acme"}"#), Some(3.0), "{acme}");
    assert_eq!(sample(&acme, r#"ionet_tasks_finished_total{account="acme"}"#), Some(1.0), "{acme}");
    assert_eq!(sample(&acme, r#"ionet_jobs{state="RUNNING",account="acme"}"#), Some(1.0), "{acme}");
    assert!(!acme.contains("rival"), "{acme}");
    let rival = scrape(rival_key.as_str().to_string()).await;
    assert_eq!(sample(&rival, r#"ionet_tasks{state="RUNNING",account="rival"}"#), Some(1.0), "{rival}");
    assert!(!rival.contains("acme"), "{rival}");
    // A job's credential (a provider's node holds it): the public face only.
    let public = scrape(acme_job_credential.as_str().to_string()).await;
    assert!(public.contains("ionet_nodes{") && !public.contains("account="), "{public}");

    // The scraper's token, made by the operator: the whole cluster, and nothing else.
    let admin = server.admin_credential(Duration::from_secs(60));
    let mut operator = ionet_common::rpc::gcs_client(&address, &admin).await.unwrap();
    let token = operator
        .create_token(CreateTokenRequest { role: "metrics".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let all = scrape(token.clone()).await;
    for account in ["acme", "rival"] {
        let series = format!(r#"ionet_tasks{{state="RUNNING",account="{account}"}}"#);
        assert_eq!(sample(&all, &series), Some(1.0), "{all}");
    }
    let (status, body) = call(&base, "GET", "/api/jobs/", Some(&token)).await;
    assert_eq!(status, 403, "{body}");
    let scraper = ionet_common::auth::Bearer::new(&token).unwrap();
    let mut gcs = ionet_common::rpc::gcs_client(&address, &scraper).await.unwrap();
    let refused = gcs.get_all_nodes(GetAllNodesRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{}", refused.message());
    // Only the operator makes one.
    let mut tenant = ionet_common::rpc::gcs_client(&address, &acme_key).await.unwrap();
    let refused = tenant.create_token(CreateTokenRequest { role: "metrics".into(), ..Default::default() }).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied);
    server.shutdown().await;
}

#[tokio::test]
async fn prometheus_discovers_each_nodes_metrics_at_the_address_it_registered_from_only() {
    use ionet_common::credential::{registration_message, KeyPair};
    use ionet_common::rpc::proto::common::NodeInfo;
    use ionet_common::rpc::proto::gcs::RegisterNodeRequest;
    let (server, base) = head().await;
    let admin = server.admin_credential(Duration::from_secs(60));
    let mut operator = ionet_common::rpc::gcs_client(&server.address().to_string(), &admin).await.unwrap();
    // Nodes registering from this machine (127.0.0.1), each naming a metrics address.
    let register = |address: &str, metrics: &str| {
        let mut client = operator.clone();
        let key = KeyPair::generate();
        let node = NodeInfo {
            node_id: ionet_common::NodeId::random().to_vec(),
            address: address.into(),
            metrics_address: metrics.into(),
            public_key: key.public_key().to_vec(),
            ..Default::default()
        };
        let proof = key.sign(&registration_message(&node.node_id, &node.public_key)).to_vec();
        let request = RegisterNodeRequest { node: Some(node.clone()), proof, tls_public_key: Vec::new() };
        async move {
            let reply = client.register_node(request).await.unwrap().into_inner();
            (hex::encode(&node.node_id), reply.node_credential)
        }
    };
    let (honest, honest_credential) = register("127.0.0.1:7000", "http://127.0.0.1:7001").await;
    // Providers naming another machine as their metrics server (the scraper would send
    // its token there): both of its addresses, or only the metrics one; and one asking
    // for plain HTTP in the wrong scheme.
    register("10.9.9.9:7000", "http://10.9.9.9:9090").await;
    let (elsewhere, _) = register("127.0.0.1:7002", "http://169.254.169.254:80").await;
    register("127.0.0.1:7003", "https://127.0.0.1:7004").await;
    register("127.0.0.1:7005", "").await;
    // A node the head only read from storage: where it registered from is unknown.
    let stored = NodeInfo {
        node_id: ionet_common::NodeId::random().to_vec(),
        address: "127.0.0.1:7006".into(),
        metrics_address: "http://127.0.0.1:7007".into(),
        public_key: vec![7; 32],
        ..Default::default()
    };
    server.state().register_node(stored).await.unwrap();

    let token = operator
        .create_token(CreateTokenRequest { role: "node-metrics".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (status, body) = call(&base, "GET", "/api/prometheus/targets", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let targets: serde_json::Value = serde_json::from_str(&body).unwrap();
    let head = base.trim_start_matches("http://");
    assert_eq!(
        targets,
        serde_json::json!([{
            "targets": [head],
            "labels": {
                "__scheme__": "http",
                "__metrics_path__": format!("/api/nodes/{honest}/metrics"),
                "instance": "127.0.0.1:7001",
                "node_id": honest,
                "gpu_type": "",
                "is_head": "false",
            },
        }])
    );
    // Scraped through the head: a node that does not answer is a 502 saying which; a
    // node not scraped, or none, a 404; no id, a 400.
    let (status, body) = call(&base, "GET", &format!("/api/nodes/{honest}/metrics"), Some(&token)).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&format!("node {}'s metrics", &honest[..8])), "{body}");
    // A node may not make the head fetch, not even its own (it reads its daemon directly).
    let (status, body) =
        call(&base, "GET", &format!("/api/nodes/{honest}/metrics"), Some(honest_credential.as_str())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not read node"), "{body}");
    let (status, body) = call(&base, "GET", &format!("/api/nodes/{}/metrics", "ab".repeat(28)), Some(&token)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = call(&base, "GET", "/api/nodes/nonsense/metrics", Some(&token)).await;
    assert_eq!((status, body.contains("is no node id")), (400, true), "{body}");
    // A node naming another machine is not fetched through the head either.
    let (status, body) = call(&base, "GET", &format!("/api/nodes/{elsewhere}/metrics"), Some(&token)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("is not scraped") && body.contains("169.254.169.254"), "{body}");
    // The node scraper's token reads the head's public face only.
    let (status, body) = call(&base, "GET", "/metrics", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ionet_nodes{") && !body.contains("account=") && !body.contains("ionet_rpc"), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn the_dashboards_data_is_each_accounts_own() {
    let (server, base) = head().await;
    let mut keys = Vec::new();
    for account in ["acme", "rival"] {
        let StartedJob { job_id, job: mut job_gcs, key, .. } = start_job(&server, account).await;
        let (name, error) = (format!("{account}-secret-task"), format!("{account}'s error"));
        let event =
            Event { task_id: &TASK_IDS[1], name: &name, state: TaskState::Failed, error: &error, ..Default::default() };
        job_gcs.add_task_events(report(&job_id, &[event])).await.unwrap();
        keys.push((account, key));
    }
    for (account, key) in &keys {
        let other = if *account == "acme" { "rival" } else { "acme" };
        for route in ["/api/v0/nodes", "/api/v0/jobs", "/api/v0/tasks", "/api/v0/market"] {
            let (status, body) = call(&base, "GET", route, Some(key.as_str())).await;
            assert_eq!(status, 200, "{route}: {body}");
            assert!(!body.contains(other), "{account} reads {other}'s in {route}: {body}");
        }
        let (_, tasks) = call(&base, "GET", "/api/v0/tasks?state=failed", Some(key.as_str())).await;
        assert!(tasks.contains(&format!("{account}'s error")), "{tasks}");
        let (_, jobs) = call(&base, "GET", "/api/v0/jobs", Some(key.as_str())).await;
        assert!(jobs.contains(&format!("\"account\":\"{account}\"")), "{jobs}");
    }
    // Bad filters are refused, saying why.
    let (status, body) = call(&base, "GET", "/api/v0/tasks?state=SLEEPING", Some(keys[0].1.as_str())).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no task state"), "{body}");
    let (status, _) = call(&base, "GET", "/api/v0/tasks?colour=red", Some(keys[0].1.as_str())).await;
    assert_eq!(status, 400);
    server.shutdown().await;
}

#[tokio::test]
async fn task_rows_outlive_a_head_with_storage() {
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = GcsServerOptions::new(ClusterConfig::default());
        options.storage = ionet_gcs::storage::StorageLocation::File(dir.path().join("gcs.redb"));
        options.signing_key_path = Some(dir.path().join("signing_key"));
        options
    };
    let start = || async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        GcsServer::start(options(), listener).await.unwrap()
    };
    let first = start().await;
    let StartedJob { job_id, job: mut job_gcs, key, .. } = start_job(&first, "acme").await;
    let names = ["step-0", "step-1", "step-2"];
    let event = |task: usize, state: TaskState, error: &'static str| Event {
        task_id: &TASK_IDS[task],
        name: names[task],
        state,
        error,
        time_us: 1_000 + task as u64,
        ..Default::default()
    };
    let events = [event(1, TaskState::Finished, ""), event(2, TaskState::Failed, "the loss is NaN")];
    job_gcs.add_task_events(report(&job_id, &events)).await.unwrap();
    first.shutdown().await;

    // The head starts again on the same storage: the past is still there, each row its
    // account's.
    let second = start().await;
    let address = second.address().to_string();
    let mut gcs = ionet_common::rpc::gcs_client(&address, &key).await.unwrap();
    let listed = gcs.list_tasks(ListTasksRequest::default()).await.unwrap().into_inner();
    let rows: Vec<(String, i32, String)> =
        listed.tasks.iter().map(|row| (row.name.clone(), row.state, row.error.clone())).collect();
    assert_eq!(
        rows,
        vec![
            ("step-1".into(), TaskState::Finished as i32, String::new()),
            ("step-2".into(), TaskState::Failed as i32, "the loss is NaN".into()),
        ]
    );
    let rival = second.account_credential("rival", Duration::from_secs(600));
    let mut rival = ionet_common::rpc::gcs_client(&address, &rival).await.unwrap();
    assert!(rival.list_tasks(ListTasksRequest::default()).await.unwrap().into_inner().tasks.is_empty());
    second.shutdown().await;
}

#[tokio::test]
async fn actor_listings_are_each_accounts_own_and_a_submissions_credential_lists_none() {
    use ionet_common::rpc::proto::gcs::{ActorSpec, CreateActorRequest, ListActorsRequest};
    use ionet_common::{Quantity, ResourceSet};
    let (server, base) = head().await;
    let StartedJob { job_id, job: mut job_gcs, key, .. } = start_job(&server, "acme").await;
    // No node has the resource: the actor waits, listed.
    let spec = ActorSpec {
        actor_id: ionet_common::ActorId::random().to_vec(),
        job_id,
        class_name: "ionet.python.actor".into(),
        display_class: "ParameterServer".into(),
        resources: Some((&ResourceSet::new().with("no-such-resource", Quantity::whole(1))).into()),
        ..Default::default()
    };
    job_gcs.create_actor(CreateActorRequest { spec: Some(spec.clone()), get_if_exists: false }).await.unwrap();
    let listed = |credential: ionet_common::auth::Bearer| {
        let address = server.address().to_string();
        async move {
            let mut gcs = ionet_common::rpc::gcs_client(&address, &credential).await.unwrap();
            gcs.list_actors(ListActorsRequest { include_dead: true }).await.unwrap().into_inner().actors.len()
        }
    };
    assert_eq!(listed(key.clone()).await, 1, "the account's key lists its actor");
    assert_eq!(listed(server.account_credential("rival", Duration::from_secs(60))).await, 0);
    let record_less = server.submission_credential("s-1", "n", "acme", Duration::from_secs(60));
    assert_eq!(listed(record_less).await, 0, "a submission's credential (a provider's node holds it) lists none");
    let (_, body) = call(&base, "GET", "/api/v0/actors", Some(key.as_str())).await;
    assert!(body.contains("\"class_name\":\"ParameterServer\""), "{body}");
    let (_, body) = call(
        &base,
        "GET",
        "/api/v0/actors",
        Some(server.account_credential("rival", Duration::from_secs(60)).as_str()),
    )
    .await;
    assert_eq!(body, "{\"actors\":[]}");
    // A shown class name is printable text.
    let bad = ActorSpec { actor_id: ionet_common::ActorId::random().to_vec(), display_class: "a\nb".into(), ..spec };
    let refused = job_gcs.create_actor(CreateActorRequest { spec: Some(bad), get_if_exists: false }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{}", refused.message());
    server.shutdown().await;
}
