//! Calls the cluster must refuse: every RPC of every service walked with every kind of
//! caller against the authorization table; money moved by someone other than the
//! operator; a provider acting for another provider's node; a tenant acting on another
//! tenant's job, its actors and its processes. Real daemons on loopback, this process a
//! driver among them.

mod harness;

use std::time::Duration;

use harness::Cluster;
use ionet::auth::Bearer;
use ionet::authz::{decide, Access, Principal, TABLE};
use ionet::credential::{registration_message, Issuer, KeyPair, Role};
use ionet::rpc::proto::common::NodeInfo;
use ionet::rpc::proto::gcs::{
    ActorSpec, AddJobRequest, CreateActorRequest, CreatePlacementGroupRequest, CreateTokenRequest, DrainNodeRequest,
    HeartbeatRequest, KillActorRequest, MarkJobFinishedRequest, RegisterNodeRequest, RemovePlacementGroupRequest,
};
use ionet::rpc::proto::gcs::{
    GetActorRequest, GetNamedActorRequest, GetPlacementGroupRequest, ListActorsRequest, ListObjectsRequest,
    ListPlacementGroupsRequest, WatchActorsRequest,
};
use ionet::rpc::proto::gcs::{KvGetRequest, KvPutRequest};
use ionet::rpc::proto::metering::{
    lease_event, AddCreditsRequest, BalancesRequest, HeldLease, JobCostRequest, LeaseEndedRequest, LeaseEvent,
    LeaseStartedRequest, ListUsageRequest, RefundRequest, ReportHeldLeasesRequest, ReportLeasesRequest, SettleRequest,
};
use ionet::rpc::proto::node::{
    AddObjectLocationRequest, CancelBundleRequest, FreeObjectsRequest, ListNodeObjectsRequest,
    RequestWorkerLeaseRequest, SealObjectRequest, SetWorkerHoldingRequest, StreamLogsRequest,
};
use ionet::rpc::proto::worker::{
    BorrowObjectsRequest, CancelTaskRequest, CreateActorRequest as WorkerCreateActorRequest, EndActorRequest,
    ExitRequest, ListReferencesRequest, ReleaseBorrowsRequest,
};
use ionet::rpc::RawCodec;
use ionet::{JobId, NodeId, Quantity, ResourceSet, SchedulingStrategy, TaskOptions};
use tonic::Code;

/// How a call ended: its status code and message (`Ok` for a stream that ended well).
type Outcome = (Code, String);

/// Calls `path` at `address` with the raw message `body` and the bearer `credential`.
fn call(address: &str, path: &'static str, credential: Option<&str>, body: Vec<u8>) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap_or_else(|err| panic!("{address} unreachable: {err}"));
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let mut request = tonic::Request::new(tokio_stream::iter(vec![body]));
            if let Some(credential) = credential {
                request.metadata_mut().insert("authorization", format!("Bearer {credential}").parse().unwrap());
            }
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            match grpc.streaming(request, path, RawCodec).await {
                Err(status) => (status.code(), status.message().to_string()),
                Ok(response) => match response.into_inner().message().await {
                    Err(status) => (status.code(), status.message().to_string()),
                    Ok(_) => (Code::Ok, String::new()),
                },
            }
        };
        // A refusal is immediate; a call admitted to a stream that stays open is admitted.
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or((Code::DeadlineExceeded, "admitted; still open".into()))
    })
}

/// The operator's calls, from the test: a join token, and a node of our own registered
/// with it (its id, its key, the node credential the head issued).
struct Provider {
    node_id: NodeId,
    key: KeyPair,
    credential: Bearer,
}

fn admin_of(cluster: &Cluster) -> Bearer {
    Bearer::new(&std::fs::read_to_string(cluster.session().join("admin_credential")).unwrap()).unwrap()
}

/// The head's signing key, read from its file (only to check what the head issued).
fn head_of(cluster: &Cluster) -> Issuer {
    Issuer::load_or_create(&cluster.session().join("signing_key")).unwrap()
}

async fn join_token(address: &str, admin: &Bearer) -> Bearer {
    let mut operator = ionet::rpc::gcs_client(address, admin).await.unwrap();
    let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 600, account: String::new() };
    Bearer::new(&operator.create_token(request).await.unwrap().into_inner().token).unwrap()
}

/// An API key for `account`, made by the operator.
async fn account_key(address: &str, admin: &Bearer, account: &str) -> Bearer {
    let mut operator = ionet::rpc::gcs_client(address, admin).await.unwrap();
    let request = CreateTokenRequest { role: "account".into(), ttl_seconds: 600, account: account.into() };
    Bearer::new(&operator.create_token(request).await.unwrap().into_inner().token).unwrap()
}

/// Starts a job with `starter` (an account key), naming `payer`: the job and its credential.
async fn start_job(address: &str, starter: &Bearer, payer: &str) -> Result<(JobId, Bearer), tonic::Status> {
    let mut client = ionet::rpc::gcs_client(address, starter).await.unwrap();
    let request = AddJobRequest {
        payer_account: payer.into(),
        worker_command: Some(ionet::rpc::proto::common::WorkerCommand {
            argv: vec![std::env::current_exe().unwrap().to_string_lossy().into_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let reply = client.add_job(request).await?.into_inner();
    let job = JobId::from_bytes(&reply.job.unwrap().job_id).unwrap();
    Ok((job, Bearer::new(&reply.job_credential).unwrap()))
}

/// A registration of `node_id` signed by `key`.
fn registration(node_id: NodeId, key: &KeyPair, gpus: i64) -> RegisterNodeRequest {
    let total = ResourceSet::new().with("CPU", Quantity::whole(1)).with("GPU", Quantity::whole(gpus));
    let node = NodeInfo {
        node_id: node_id.to_vec(),
        address: "127.0.0.1:1".into(),
        total: Some((&total).into()),
        available: Some((&total).into()),
        public_key: key.public_key().to_vec(),
        wallet: "mallory-wallet".into(),
        ..Default::default()
    };
    let proof = key.sign(&registration_message(&node.node_id, &node.public_key)).to_vec();
    RegisterNodeRequest { node: Some(node), proof, ..Default::default() }
}

/// Joins a node of our own (no daemon behind it) with a join token.
async fn join_as_provider(address: &str, admin: &Bearer) -> Provider {
    let join = join_token(address, admin).await;
    let mut joiner = ionet::rpc::gcs_client(address, &join).await.unwrap();
    let (node_id, key) = (NodeId::random(), KeyPair::generate());
    // A CPU: a node offering GPUs takes no leases until they pass the head's check
    // (`worker/tests/gpu_checks.rs`), and these tests are about what else it may do.
    let reply = joiner.register_node(registration(node_id, &key, 0)).await.unwrap().into_inner();
    Provider { node_id, key, credential: Bearer::new(&reply.node_credential).unwrap() }
}

/// The message of a call refused with PERMISSION_DENIED (`what` names it if it was not).
fn denied<T>(result: Result<T, tonic::Status>, what: &str) -> String {
    let status = result.err().unwrap_or_else(|| panic!("{what} was allowed"));
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    status.message().to_string()
}

fn refused(outcome: &Outcome) -> bool {
    matches!(outcome.0, Code::Unauthenticated | Code::PermissionDenied)
}

/// Every row of the table, called at its server by nobody, by a stranger (another head's
/// admin), by the admin, by a node, by a joining machine, by an account, by a job of
/// another account and by a job of the driver's own account. The message is a malformed
/// one, so that an admitted call fails in decoding and no handler changes anything.
fn every_rpc_is_answered_as_the_table_says() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    cluster.init();
    let head = cluster.address();
    let node = ionet::testing::local_node_address().unwrap();
    let worker = ionet::testing::core_worker_address().unwrap();
    let admin = admin_of(&cluster);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (provider, join, account, (job, job_credential), (sibling, sibling_credential)) = runtime.block_on(async {
        let account = account_key(&head, &admin, "acme").await;
        let job = start_job(&head, &account, "").await.unwrap();
        // The driver's own account (`default`, the operator's): another job of it.
        let sibling = start_job(&head, &admin, "").await.unwrap();
        (join_as_provider(&head, &admin).await, join_token(&head, &admin).await, account, job, sibling)
    });
    let stranger = Bearer::new(&Issuer::generate().issue(Role::Admin, Duration::from_secs(600))).unwrap();

    // (who, credential, the principal the table knows it as)
    let callers: Vec<(&str, Option<Bearer>, Option<Principal>)> = vec![
        ("nobody", None, None),
        ("a stranger", Some(stranger), None),
        ("not a credential", Some(Bearer::new("hunter2").unwrap()), None),
        ("the admin", Some(admin), Some(Principal::Admin)),
        ("a node", Some(provider.credential.clone()), Some(Principal::Node(provider.node_id))),
        ("a joining machine", Some(join), Some(Principal::Joiner)),
        ("an account", Some(account), Some(Principal::Account("acme".into()))),
        ("another account's job", Some(job_credential), Some(Principal::Job { job, account: "acme".into() })),
        (
            "a job of the driver's account",
            Some(sibling_credential),
            Some(Principal::Job { job: sibling, account: "default".into() }),
        ),
    ];
    for rule in TABLE {
        // Every server knows the head's key: the head's own, a node daemon from its
        // registration, a driver from its job's start.
        // The driver's core worker belongs to its account; the others to the cluster.
        let (address, tenant) = match rule.path.split('.').nth(1) {
            Some("gcs") | Some("metering") => (head.as_str(), None),
            Some("node") | Some("object") => (node.as_str(), None),
            Some("worker") => (worker.as_str(), Some("default")),
            other => panic!("{}: a service of no known server ({other:?})", rule.path),
        };
        for (who, credential, principal) in &callers {
            let outcome = call(address, rule.path, credential.as_ref().map(Bearer::as_str), vec![0xff; 8]);
            let context = format!("{} by {who}: {outcome:?}", rule.path);
            match principal {
                None => assert_eq!(outcome.0, Code::Unauthenticated, "{context}"),
                Some(principal) => match decide(principal, rule.path, tenant) {
                    Ok(()) => assert!(!refused(&outcome), "{context}"),
                    Err(why) => {
                        assert_eq!(outcome.0, Code::PermissionDenied, "{context}");
                        assert_eq!(outcome.1, why, "the refusal names principal, call and missing right");
                    }
                },
            }
        }
    }
    // The head's ask of what a node holds is minted for that node alone: another node's
    // refuses it (a provider that kept one can ask no other node).
    let issuer = head_of(&cluster);
    let own_node = ionet::get_runtime_context().unwrap().node_id;
    let ask = |node: NodeId| Bearer::new(&issuer.issue_inspect(&node.to_vec(), Duration::from_secs(60))).unwrap();
    let list = "/ionet.node.NodeManager/ListObjects";
    let mine = call(&node, list, Some(ask(own_node).as_str()), Vec::new());
    assert_eq!(mine.0, Code::Ok, "{mine:?}");
    let theirs = call(&node, list, Some(ask(provider.node_id).as_str()), Vec::new());
    assert_eq!(theirs.0, Code::PermissionDenied, "{theirs:?}");
    assert!(theirs.1.contains("may not list what node"), "{theirs:?}");
    assert!(TABLE.iter().any(|rule| rule.access == Access::Admin), "the walk met admin-only calls");
    assert!(TABLE.iter().any(|rule| rule.access == Access::Tenant), "the walk met a tenant's own calls");
}

/// A provider with a valid node credential tries to act for another provider's node:
/// heartbeats, drains, lease reports, taking over its id; and to report resources it does
/// not have. Each is refused, and the victim node keeps running tasks, exactly.
fn a_provider_acts_only_for_its_own_node() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=victim"]);
    cluster.init();
    let victim = ionet::nodes()
        .unwrap()
        .into_iter()
        .find(|node| node.labels.get("name").map(String::as_str) == Some("victim"))
        .unwrap();
    let pinned = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: victim.node_id, soft: false });
    assert_eq!(ionet::get_timeout(&add::options(pinned.clone()).remote(40, 2), Duration::from_secs(60)).unwrap(), 42);
    let head = cluster.address();
    let admin = admin_of(&cluster);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mallory = join_as_provider(&head, &admin).await;
        let mut as_mallory = ionet::rpc::gcs_client(&head, &mallory.credential).await.unwrap();
        let mut metering = ionet::rpc::metering_client(&head, &mallory.credential).await.unwrap();
        let mut ledger = ionet::rpc::metering_client(&head, &admin).await.unwrap();
        let balances = ledger.balances(BalancesRequest {}).await.unwrap().into_inner();
        assert!(
            metering.balances(BalancesRequest {}).await.unwrap().into_inner().balances.is_empty(),
            "not hers to read"
        );

        let message = denied(
            as_mallory
                .heartbeat(HeartbeatRequest { node_id: victim.node_id.to_vec(), available: None, ..Default::default() })
                .await,
            "a heartbeat for another node",
        );
        assert!(message.contains(&mallory.node_id.short()) && message.contains(&victim.node_id.short()), "{message}");
        // On a heartbeat stream alike: her own heartbeat is answered, one for another
        // node is refused and ends the stream (a quiet one too: a refusal always answers).
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let mut replies = as_mallory
            .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        let beat =
            |node: &NodeId, quiet: bool| HeartbeatRequest { node_id: node.to_vec(), quiet, ..Default::default() };
        sender.send(beat(&mallory.node_id, false)).await.unwrap();
        let own = tokio::time::timeout(Duration::from_secs(30), replies.message()).await.unwrap();
        assert!(own.unwrap().unwrap().incarnation > 0, "her own heartbeat is answered on the stream");
        sender.send(beat(&victim.node_id, true)).await.unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(30), replies.message()).await.unwrap();
        let message = denied(refused, "a heartbeat for another node on a stream");
        assert!(message.contains(&victim.node_id.short()), "{message}");
        let after = tokio::time::timeout(Duration::from_secs(30), replies.message()).await.unwrap();
        assert!(matches!(after, Ok(None) | Err(_)), "the stream ends with the refusal: {after:?}");
        denied(
            as_mallory
                .drain_node(DrainNodeRequest {
                    node_id: victim.node_id.to_vec(),
                    reason: "mine now".into(),
                    exiting: true,
                })
                .await,
            "draining another node",
        );
        // Taking over the victim's id (and so its wallet and price) with her own key: with
        // her node credential, and with a fresh join token.
        denied(
            as_mallory.register_node(registration(victim.node_id, &mallory.key, 8)).await,
            "re-registering another node",
        );
        let join = join_token(&head, &admin).await;
        let mut joiner = ionet::rpc::gcs_client(&head, &join).await.unwrap();
        let message =
            denied(joiner.register_node(registration(victim.node_id, &mallory.key, 8)).await, "taking over a node id");
        assert!(message.contains("bound to another key"), "{message}");
        // A node credential registers no other node.
        denied(
            as_mallory.register_node(registration(NodeId::random(), &mallory.key, 1)).await,
            "a second node on one credential",
        );
        // Redirecting the victim's objects: moves are recorded for the calling node only,
        // and a node hands over its own objects only, pulled from itself.
        use ionet::rpc::proto::gcs::{ObjectMove, ObjectsMovedRequest};
        let moved =
            ObjectMove { object_id: ionet::ObjectId::random().to_vec(), holder_address: victim.address.clone() };
        let request = ObjectsMovedRequest { node_id: victim.node_id.to_vec(), moves: vec![moved], forget: false };
        denied(as_mallory.objects_moved(request).await, "recording another node's objects as moved");
        use ionet::rpc::proto::node::{TakeObjectsRequest, TakenObject};
        let channel = ionet::rpc::connect(&victim.address, &mallory.credential, Duration::from_secs(5)).await.unwrap();
        let mut victim_node = ionet::rpc::NodeManagerClient::new(channel);
        let handed =
            TakenObject { object_id: ionet::ObjectId::random().to_vec(), account: "acme".into(), copies: vec![] };
        let request = TakeObjectsRequest { source_address: victim.address.clone(), objects: vec![handed] };
        let message = denied(victim_node.take_objects(request).await, "handing over objects from another node");
        assert!(message.contains("a node hands over its own"), "{message}");
        // Billing a tenant for the victim's GPUs, or ending the victim's leases.
        let job = ionet::rpc::proto::gcs::GetAllJobsRequest::default();
        assert!(as_mallory.get_all_jobs(job).await.unwrap().into_inner().jobs.is_empty(), "tenants' jobs are theirs");
        let mut operator = ionet::rpc::gcs_client(&head, &admin).await.unwrap();
        let job = ionet::rpc::proto::gcs::GetAllJobsRequest::default();
        let job_id = operator.get_all_jobs(job).await.unwrap().into_inner().jobs.last().unwrap().job_id.clone();
        let resources = Some((&ResourceSet::new().with("CPU", Quantity::whole(1))).into());
        denied(
            metering
                .lease_started(LeaseStartedRequest {
                    lease_id: ionet::LeaseId::random().to_vec(),
                    node_id: victim.node_id.to_vec(),
                    job_id: job_id.clone(),
                    resources: resources.clone(),
                    ..Default::default()
                })
                .await,
            "reporting a lease on another node",
        );
        // Nor in a batch: as another node, or naming another node inside her own report.
        let batch = |node: &NodeId| ReportLeasesRequest {
            node_id: mallory.node_id.to_vec(),
            events: vec![LeaseEvent {
                event: Some(lease_event::Event::Started(LeaseStartedRequest {
                    lease_id: ionet::LeaseId::random().to_vec(),
                    node_id: node.to_vec(),
                    job_id: job_id.clone(),
                    resources: resources.clone(),
                    ..Default::default()
                })),
            }],
        };
        denied(
            metering
                .report_leases(ReportLeasesRequest { node_id: victim.node_id.to_vec(), ..batch(&victim.node_id) })
                .await,
            "a batch of another node's leases",
        );
        let refusals = metering.report_leases(batch(&victim.node_id)).await.unwrap().into_inner().refusals;
        assert!(refusals[0].contains("may report only its own leases"), "{refusals:?}");
        // The victim's lease reaches the head's meter shortly after the task ran.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let victims_lease = loop {
            let request = ListUsageRequest { node_id: victim.node_id.to_vec(), ..Default::default() };
            if let Some(record) = ledger.list_usage(request.clone()).await.unwrap().into_inner().records.first() {
                let hers = metering.list_usage(request).await.unwrap().into_inner().records;
                assert!(hers.is_empty(), "another node's usage is not hers to read");
                break record.lease_id.clone();
            }
            assert!(std::time::Instant::now() < deadline, "the victim's lease was never metered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        denied(
            metering.lease_ended(LeaseEndedRequest { lease_id: victims_lease, age_ms: 0 }).await,
            "ending another node's lease",
        );
        // Her own node: no more than it has.
        let eight = Some((&ResourceSet::new().with("GPU", Quantity::whole(8))).into());
        let status = metering
            .lease_started(LeaseStartedRequest {
                lease_id: ionet::LeaseId::random().to_vec(),
                node_id: mallory.node_id.to_vec(),
                job_id: job_id.clone(),
                resources: eight.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        // Her own node, within its size, for a job that never asked her: no record, ever.
        let forged = ionet::LeaseId::random().to_vec();
        let one_cpu = LeaseStartedRequest {
            lease_id: forged.clone(),
            node_id: mallory.node_id.to_vec(),
            job_id: job_id.clone(),
            resources: resources.clone(),
            ..Default::default()
        };
        metering.lease_started(one_cpu).await.unwrap();
        let ended = metering.lease_ended(LeaseEndedRequest { lease_id: forged, age_ms: 0 }).await.unwrap();
        assert_eq!(ended.into_inner().record, None, "a lease the job never asked for is billed to nobody");
        let request = ListUsageRequest { node_id: mallory.node_id.to_vec(), ..Default::default() };
        assert!(ledger.list_usage(request).await.unwrap().into_inner().records.is_empty());
        let status = as_mallory
            .heartbeat(HeartbeatRequest { node_id: mallory.node_id.to_vec(), available: eight, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        // A job's credential names no node at all.
        let (_, job) = start_job(&head, &admin, "").await.unwrap();
        let mut tenant = ionet::rpc::gcs_client(&head, &job).await.unwrap();
        denied(
            tenant
                .heartbeat(HeartbeatRequest { node_id: victim.node_id.to_vec(), available: None, ..Default::default() })
                .await,
            "a heartbeat with a job's credential",
        );
        let (_keep, receiver) = tokio::sync::mpsc::channel::<HeartbeatRequest>(1);
        denied(
            tenant.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)).await,
            "a heartbeat stream with a job's credential",
        );

        let after = ledger.balances(BalancesRequest {}).await.unwrap().into_inner();
        assert_eq!(format!("{balances:?}"), format!("{after:?}"), "the ledger is as before");
    });
    // The victim is untouched: alive, its own record, and still running tasks exactly.
    let row = ionet::nodes().unwrap().into_iter().find(|node| node.node_id == victim.node_id).unwrap();
    assert_eq!(row.state, ionet::NodeState::Alive);
    assert_eq!((row.total, row.price_per_gpu_hour), (victim.total, victim.price_per_gpu_hour), "its record as it was");
    assert_eq!(ionet::get_timeout(&add::options(pinned).remote(1, 2), Duration::from_secs(60)).unwrap(), 3);
}

/// A tenant with a valid account key and a job of its own tries to bill another account,
/// and to act on a second tenant's job running at the same time: finish it, kill its
/// actor, create actors and reserve groups billed to it, lease workers as it. Each is
/// refused; the victim's actor keeps its state and answers exactly.
fn a_tenant_acts_only_for_its_own_job() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init_as("victim-co");
    let tally = Tally::remote(40i64).unwrap();
    assert_eq!(ionet::get_timeout(&tally.bump(1), Duration::from_secs(60)).unwrap(), 41);
    let victim_job = ionet::get_runtime_context().unwrap().job_id;
    let victim_actor = tally.actor_handle().id();
    let victim_worker: ionet::WorkerId =
        ionet::get_timeout(&tally.worker_id(), Duration::from_secs(60)).unwrap().parse().unwrap();
    // An object in the node's shared memory (above the inline threshold).
    let weights: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let stored = ionet::put(&weights).unwrap();
    ionet::raw::kv_put("shared", b"k", b"victim's".to_vec(), true).unwrap();
    let named = Tally::options(ionet::ActorOptions::new().name("ledger").namespace("shared")).remote(7i64).unwrap();
    assert_eq!(ionet::get_timeout(&named.bump(1), Duration::from_secs(60)).unwrap(), 8);
    let head = cluster.address();
    let node = ionet::testing::local_node_address().unwrap();
    let driver = ionet::testing::core_worker_address().unwrap();
    let admin = admin_of(&cluster);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mallory = account_key(&head, &admin, "mallory-co").await;
        // The payer is the key's account: naming another is refused; naming none bills it.
        let message = denied(start_job(&head, &mallory, "victim-co").await, "a job billed to another account");
        assert!(message.contains("mallory-co") && message.contains("victim-co"), "{message}");
        let (own_job, credential) = start_job(&head, &mallory, "").await.unwrap();
        let mut as_mallory = ionet::rpc::gcs_client(&head, &credential).await.unwrap();
        let jobs = as_mallory.get_all_jobs(ionet::rpc::proto::gcs::GetAllJobsRequest::default()).await.unwrap();
        let own = jobs.into_inner().jobs.into_iter().find(|job| job.job_id == own_job.to_vec()).unwrap();
        assert_eq!(own.payer_account, "mallory-co");
        // A job credential starts no job.
        denied(as_mallory.add_job(AddJobRequest::default()).await, "a job started by a job");
        // Nor speaks, as a lease's holder, for another job's leases.
        let mut her_meter = ionet::rpc::metering_client(&head, &credential).await.unwrap();
        let word = HeldLease { lease_id: ionet::LeaseId::random().to_vec(), granted: false, ..Default::default() };
        let report = ReportHeldLeasesRequest { job_id: victim_job.to_vec(), leases: vec![word] };
        denied(her_meter.report_held_leases(report).await, "ending another job's leases as their holder");
        let bill = JobCostRequest { job_id: victim_job.to_vec() };
        let message = denied(her_meter.job_cost(bill).await, "reading another job's bill");
        assert!(message.contains("may not read the bill"), "{message}");
        // Actor names are per account: the victim's is not hers to find, and she takes
        // the same name in her own account without touching the victim's.
        let lookup = GetNamedActorRequest { name: "ledger".into(), namespace: "shared".into() };
        assert_eq!(as_mallory.get_named_actor(lookup).await.unwrap_err().code(), Code::NotFound);
        let homonym =
            ActorSpec { name: "ledger".into(), namespace: "shared".into(), ..unplaceable_actor(own_job, "Homonym") };
        as_mallory.create_actor(CreateActorRequest { spec: Some(homonym), ..Default::default() }).await.unwrap();
        // She names her own listener as her actor's owner: the head, watching it, presents
        // her own job's credential, never one that could move money or act for others.
        let listener = Listener::default();
        let owner = listen(listener.clone()).await;
        let spec = ActorSpec { owner_address: owner, ..unplaceable_actor(own_job, "Bait") };
        as_mallory.create_actor(CreateActorRequest { spec: Some(spec), ..Default::default() }).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let presented = loop {
            if let Some(bearer) = listener.0.lock().unwrap().first().cloned() {
                break bearer;
            }
            assert!(std::time::Instant::now() < deadline, "the head never watched the owner");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let claims = head_of(&cluster).verifier().verify(presented.as_bytes()).expect("a credential the head signed");
        assert_eq!((claims.role, claims.job_id), (Role::Job, Some(own_job.hex())), "her own job's, nothing more");

        denied(
            as_mallory.mark_job_finished(MarkJobFinishedRequest { job_id: victim_job.to_vec() }).await,
            "finishing another job",
        );
        denied(
            as_mallory.kill_actor(KillActorRequest { actor_id: victim_actor.to_vec(), no_restart: true }).await,
            "killing another job's actor",
        );
        let spec = ActorSpec {
            actor_id: ionet::ActorId::random().to_vec(),
            job_id: victim_job.to_vec(),
            ..Default::default()
        };
        denied(
            as_mallory.create_actor(CreateActorRequest { spec: Some(spec), ..Default::default() }).await,
            "an actor billed to another job",
        );
        let group = CreatePlacementGroupRequest { job_id: victim_job.to_vec(), ..Default::default() };
        denied(as_mallory.create_placement_group(group).await, "a placement group billed to another job");
        // The victim's group (reserved here by the operator for it) is not hers to remove.
        let mut operator = ionet::rpc::gcs_client(&head, &admin).await.unwrap();
        let bundle = (&ResourceSet::new().with("CPU", Quantity::whole(1))).into();
        let victims_group =
            CreatePlacementGroupRequest { job_id: victim_job.to_vec(), bundles: vec![bundle], ..Default::default() };
        let group_id = operator.create_placement_group(victims_group).await.unwrap().into_inner().placement_group_id;
        let removal = RemovePlacementGroupRequest { placement_group_id: group_id.clone() };
        denied(as_mallory.remove_placement_group(removal.clone()).await, "removing another job's placement group");
        let lookup = GetPlacementGroupRequest { placement_group_id: group_id.clone() };
        denied(as_mallory.get_placement_group(lookup).await, "finding where another tenant's bundles are");
        let groups = as_mallory.list_placement_groups(ListPlacementGroupsRequest {}).await.unwrap().into_inner();
        assert!(groups.groups.is_empty(), "another tenant's groups are not listed");
        let groups = operator.list_placement_groups(ListPlacementGroupsRequest {}).await.unwrap().into_inner();
        assert_eq!(groups.groups.len(), 1, "the operator sees them");
        operator.remove_placement_group(removal).await.unwrap();
        let mut daemon = ionet::rpc::NodeManagerClient::new(
            ionet::rpc::connect(&node, &credential, Duration::from_secs(5)).await.unwrap(),
        );
        let lease = RequestWorkerLeaseRequest { job_id: victim_job.to_vec(), ..Default::default() };
        denied(daemon.request_worker_lease(lease).await, "a lease as another job");
        // The victim's object: not hers to free or seal, even knowing its id.
        let object_ids = vec![stored.id().to_vec()];
        let message = denied(daemon.free_objects(FreeObjectsRequest { object_ids }).await, "freeing another's object");
        assert!(message.contains("belongs to account victim-co"), "{message}");
        denied(daemon.seal_object(SealObjectRequest { object_id: stored.id().to_vec() }).await, "sealing it");
        // Nor to point the node at a holder of her choosing.
        let bogus = AddObjectLocationRequest { object_id: stored.id().to_vec(), holder_address: "10.6.6.6:1".into() };
        denied(daemon.add_object_location(bogus).await, "adding a copy's location");
        // Her KV is her account's: the victim's key is not there, and her write lands apart.
        let key = KvGetRequest { namespace: "shared".into(), key: b"k".to_vec() };
        assert_eq!(as_mallory.kv_get(key.clone()).await.unwrap_err().code(), Code::NotFound);
        let put =
            KvPutRequest { namespace: "shared".into(), key: b"k".to_vec(), value: b"hers".to_vec(), overwrite: true };
        assert!(as_mallory.kv_put(put).await.unwrap().into_inner().added, "a key of her own");
        assert_eq!(as_mallory.kv_get(key).await.unwrap().into_inner().value, b"hers");
        // Bundles are the head's to reserve and cancel.
        let cancel = CancelBundleRequest { placement_group_id: group_id, bundle_index: 0 };
        denied(daemon.cancel_bundle(cancel).await, "cancelling a bundle on a node");
        // Nor to read what the victim's workers print.
        let logs = StreamLogsRequest { job_id: victim_job.to_vec(), worker_address: String::new() };
        denied(daemon.stream_logs(logs).await, "reading another tenant's workers' output");
        // Nor to say whether the victim's worker holds objects (keeping it from being
        // stopped when idle, or letting it be stopped with the victim's objects).
        for holding in [true, false] {
            let report = SetWorkerHoldingRequest { worker_id: victim_worker.to_vec(), holding };
            denied(daemon.set_worker_holding(report).await, "speaking for another tenant's worker");
        }
        // The victim's own processes: its driver and its actor's worker take no calls from
        // another account's job (no pushed tasks, no actor calls, no exit).
        let lookup = GetActorRequest { actor_id: victim_actor.to_vec(), wait_newer_than: -1, timeout_ms: 0 };
        denied(as_mallory.get_actor(lookup.clone()).await, "finding where another tenant's actor runs");
        // Nor by following it: the stream answers with the refusal and no row.
        let follow = WatchActorsRequest { actor_id: victim_actor.to_vec(), stop: false };
        let mut followed = as_mallory.watch_actors(futures::stream::iter([follow])).await.unwrap().into_inner();
        let answer = followed.message().await.unwrap().unwrap();
        assert!(answer.actor.is_none(), "another tenant's actor's row: {answer:?}");
        assert!(answer.error.contains("may not act for account"), "{answer:?}");
        let listed = as_mallory.list_actors(ListActorsRequest { include_dead: true }).await.unwrap().into_inner();
        let others = listed.actors.iter().filter(|actor| actor.spec.as_ref().unwrap().job_id != own_job.to_vec());
        assert_eq!(others.count(), 0, "another tenant's actors are not listed: {listed:?}");
        let actor = operator.get_actor(lookup);
        let actor_worker = actor.await.unwrap().into_inner().actor.unwrap().address;
        for address in [&driver, &actor_worker] {
            let channel = ionet::rpc::connect(address, &credential, Duration::from_secs(5)).await.unwrap();
            let mut victim = ionet::rpc::CoreWorkerClient::new(channel);
            let message = denied(victim.exit(ExitRequest {}).await, "stopping another tenant's process");
            assert!(message.contains("mallory-co") && message.contains("account this process belongs to"), "{message}");
            let cancel = CancelTaskRequest { task_id: vec![0; 24], recursive: true };
            denied(victim.cancel_task(cancel).await, "cancelling another tenant's tasks");
            let release =
                ReleaseBorrowsRequest { object_ids: vec![stored.id().to_vec()], counts: vec![1], ..Default::default() };
            denied(victim.release_borrows(release).await, "giving back another tenant's lent objects");
            let borrow =
                BorrowObjectsRequest { object_ids: vec![stored.id().to_vec()], borrower_address: "10.6.6.6:1".into() };
            denied(victim.borrow_objects(borrow).await, "pinning another tenant's objects");
            let references = ListReferencesRequest { limit: 0 };
            denied(victim.list_references(references).await, "reading what another tenant's process holds");
        }
        // Nor to see the victim's objects: the operator does, she does not, and the nodes
        // list theirs to the head alone.
        let stored_id = stored.id().to_vec();
        let everyone = operator.list_objects(ListObjectsRequest::default()).await.unwrap().into_inner();
        assert!(everyone.objects.iter().any(|row| row.object_id == stored_id), "the operator sees it: {everyone:?}");
        // Neither her job's credential nor her account's key lists it.
        let hers = as_mallory.list_objects(ListObjectsRequest::default()).await.unwrap().into_inner();
        assert!(!hers.objects.iter().any(|row| row.object_id == stored_id), "{hers:?}");
        let mut as_account = ionet::rpc::gcs_client(&head, &mallory).await.unwrap();
        let accounts = as_account.list_objects(ListObjectsRequest::default()).await.unwrap().into_inner();
        assert!(accounts.objects.is_empty(), "her account holds nothing; she sees nothing: {accounts:?}");
        denied(daemon.list_objects(ListNodeObjectsRequest::default()).await, "listing a node's objects");
        // Another job of the victim's own account (a colleague's, or a provider's run of
        // its code) does not start, end or stop actors in the victim job's processes.
        let victim_key = account_key(&head, &admin, "victim-co").await;
        let (_, colleague) = start_job(&head, &victim_key, "").await.unwrap();
        for address in [&driver, &actor_worker] {
            let channel = ionet::rpc::connect(address, &colleague, Duration::from_secs(5)).await.unwrap();
            let mut victim = ionet::rpc::CoreWorkerClient::new(channel);
            let message = denied(victim.exit(ExitRequest {}).await, "stopping another job's process");
            assert!(message.contains("may not act for job"), "{message}");
            let end = EndActorRequest { actor_id: victim_actor.to_vec(), incarnation: 0 };
            denied(victim.end_actor(end).await, "ending another job's actor in its process");
            let create = WorkerCreateActorRequest {
                actor_id: ionet::ActorId::random().to_vec(),
                class_name: "Intruder".into(),
                job_id: victim_job.to_vec(),
                shared: true,
                ..Default::default()
            };
            denied(victim.create_actor(create).await, "starting an actor in another job's process");
        }
        // Her own job finishes fine.
        as_mallory.mark_job_finished(MarkJobFinishedRequest { job_id: own_job.to_vec() }).await.unwrap();
    });
    assert_eq!(ionet::get_timeout(&tally.bump(1), Duration::from_secs(60)).unwrap(), 42, "the victim's actor lives on");
    assert_eq!(ionet::get(&stored).unwrap(), weights, "the victim's object is intact");
    let found = ionet::get_actor::<TallyHandle>("ledger", Some("shared")).unwrap();
    assert_eq!(ionet::get_timeout(&found.bump(1), Duration::from_secs(60)).unwrap(), 9, "its named actor is its own");
    let kept = ionet::raw::kv_get("shared", b"k").unwrap();
    assert_eq!(kept, Some(b"victim's".to_vec()), "the victim's KV is untouched");
}

/// What a worker of this job was given to call with, and whether it also sees anything
/// broader (a cluster token, the operator's credential) in its environment.
#[ionet::remote]
fn credentials_in_my_environment() -> (String, Vec<String>) {
    let broader = ["IONET_TOKEN", "IONET_CREDENTIAL", "IONET_API_KEY", "IONET_JOIN_TOKEN", "IONET_JOB_CREDENTIAL"]
        .into_iter()
        .filter(|name| std::env::var_os(name).is_some())
        .map(str::to_string)
        .collect();
    (ionet::testing::job_credential().unwrap(), broader)
}

/// What this worker can learn of credentials from the other processes on its node: the
/// processes whose environment or command line holds one, and whether its own memory is
/// private (`PR_GET_DUMPABLE` 0).
#[ionet::remote]
fn credentials_on_my_node() -> (Vec<String>, bool) {
    let mut exposed = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        for file in ["environ", "cmdline"] {
            let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
            if bytes.windows(7).any(|window| window == b"ionet1.") {
                exposed.push(format!("/proc/{name}/{file}"));
            }
        }
    }
    // SAFETY: prctl PR_GET_DUMPABLE only reads this process's flag.
    let private = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } == 0;
    (exposed, private)
}

/// A node starts the command a job declared when it was created, never one a lease
/// request names: a tenant's request carrying a command of its own (in the field lease
/// requests once had) still gets a worker of the job's declared program.
fn a_node_runs_only_the_jobs_declared_command() {
    use prost::Message;
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    let (head, admin) = (cluster.address(), admin_of(&cluster));
    // Where the request's own command would leave its mark, writable by any user.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let marker = open.path().join("the-requests-command-ran");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (job, credential, node) = runtime.block_on(async {
        let (job, credential) = start_job(&head, &admin, "").await.unwrap();
        let mut gcs = ionet::rpc::gcs_client(&head, &admin).await.unwrap();
        let nodes = gcs.get_all_nodes(ionet::rpc::proto::gcs::GetAllNodesRequest::default()).await.unwrap();
        (job, credential, nodes.into_inner().nodes[0].address.clone())
    });
    let mut body = RequestWorkerLeaseRequest {
        job_id: job.to_vec(),
        resources: Some((&ResourceSet::new().with("CPU", Quantity::whole(1))).into()),
        no_spillback: true,
        ..Default::default()
    }
    .encode_to_vec();
    let command = ionet::rpc::proto::common::WorkerCommand {
        argv: vec!["/bin/sh".into(), "-c".into(), format!("touch {}", marker.display())],
        ..Default::default()
    };
    // Field 4, length-delimited: a command, as lease requests once carried one.
    prost::encoding::message::encode(4, &command, &mut body);
    let (code, message) = call(&node, "/ionet.node.NodeManager/RequestWorkerLease", Some(credential.as_str()), body);
    assert_eq!(code, Code::Ok, "the lease is granted with the job's own program: {message}");
    assert!(!marker.exists(), "the command in the request never ran");
    drop(cluster);
}

/// The length and byte sum of a value, read where the task runs.
#[ionet::remote]
fn length_and_sum(bytes: Vec<u8>) -> (u64, u64) {
    (bytes.len() as u64, bytes.iter().map(|&byte| u64::from(byte)).sum())
}

/// An object is copied only to its own account's jobs: another tenant that names its id
/// gets it neither pulled to another node (the holder refuses the copy) nor opened on
/// the node that holds it; the owner's own task on the other node then reads it. Nor is
/// the owner's job's worker command told to that tenant or to a provider.
fn another_accounts_object_is_never_copied_to_a_tenant() {
    use ionet::rpc::proto::node::EnsureObjectLocalRequest;
    let mut cluster = Cluster::start(&["--num-cpus", "1"]);
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=b"]);
    cluster.init_as("victim");
    let secret: Vec<u8> = (0..1024 * 1024u32).map(|n| (n % 253) as u8).collect();
    let object = ionet::put(&secret).unwrap();
    let holder = ionet::testing::local_node_address().unwrap();
    let b = ionet::nodes().unwrap().into_iter().find(|node| node.labels.get("name").map(String::as_str) == Some("b"));
    let b = b.expect("node b");
    let pinned = TaskOptions::default()
        .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: b.node_id, soft: false });
    let (head, admin) = (cluster.address(), admin_of(&cluster));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (_, mallory) = start_job(&head, &admin, "mallory").await.unwrap();
        let id = object.id().to_vec();
        for (node, source) in [(b.address.clone(), holder.clone()), (holder.clone(), String::new())] {
            let channel = ionet::rpc::connect(&node, &mallory, Duration::from_secs(5)).await.unwrap();
            let mut client = ionet::rpc::NodeManagerClient::new(channel);
            let request = EnsureObjectLocalRequest { object_id: id.clone(), source_address: source };
            let status = client.ensure_object_local(request).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("mallory"), "{}", status.message());
        }
        // A job's worker command is told to that job alone: not to another tenant's job,
        // not to a provider's node.
        use ionet::rpc::proto::gcs::GetJobWorkerCommandRequest;
        let (own_job, mallory_job) = start_job(&head, &admin, "mallory").await.unwrap();
        let victim = ionet::get_runtime_context().unwrap().job_id.to_vec();
        let mut as_mallory = ionet::rpc::gcs_client(&head, &mallory_job).await.unwrap();
        let refused =
            as_mallory.get_job_worker_command(GetJobWorkerCommandRequest { job_id: victim.clone() }).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let own = as_mallory.get_job_worker_command(GetJobWorkerCommandRequest { job_id: own_job.to_vec() }).await;
        assert!(own.unwrap().into_inner().worker_command.is_some_and(|command| !command.argv.is_empty()));
        let provider = join_as_provider(&head, &admin).await;
        let mut as_provider = ionet::rpc::gcs_client(&head, &provider.credential).await.unwrap();
        let refused =
            as_provider.get_job_worker_command(GetJobWorkerCommandRequest { job_id: victim }).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    });
    // Node b has no copy yet: the owner's own task there gets one, whole.
    let expected = (secret.len() as u64, secret.iter().map(|&byte| u64::from(byte)).sum());
    assert_eq!(
        ionet::get_timeout(&length_and_sum::options(pinned).remote(&object), Duration::from_secs(60)).unwrap(),
        expected,
        "the owner's task on node b reads its object"
    );
    assert_eq!(ionet::get(&object).unwrap(), secret, "the victim's object is unharmed");
    drop(cluster);
}

/// What a task may do with each of `paths` on its node: `read` (a file read whole, or a
/// directory, named with a trailing `/`, listed), or the kind of error it got.
#[ionet::remote]
fn try_to_read(paths: Vec<String>) -> Vec<(String, String)> {
    paths
        .into_iter()
        .map(|path| {
            let outcome = match path.strip_suffix('/') {
                Some(dir) => std::fs::read_dir(dir).and_then(|mut entries| entries.next().transpose()).map(drop),
                None => std::fs::read(&path).map(drop),
            };
            let verdict = outcome.map(|_| "read".to_string()).unwrap_or_else(|err| format!("{:?}", err.kind()));
            (path, verdict)
        })
        .collect()
}

/// The user and group this task runs as, and a file it wrote (with its default mode).
#[ionet::remote]
fn who_am_i_and_a_file() -> (u32, u32, String) {
    let path = std::env::temp_dir().join(format!("ionet-task-file-{}", std::process::id()));
    std::fs::write(&path, b"mine").unwrap();
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    (uid, gid, path.to_string_lossy().into_owned())
}

const DRIVER_ENV: &str = "IONET_TEST_DRIVER";
const SESSION_ENV: &str = "IONET_TEST_DRIVER_SESSION";
const PATHS_ENV: &str = "IONET_TEST_PATHS";

/// Another tenant's driver (a process of its own, account `mallory`): its task tries the
/// paths it is given and reports who it ran as; printed as one JSON line.
fn intruder_driver() {
    let session = std::env::var(SESSION_ENV).expect("session dir");
    let paths: Vec<String> = serde_json::from_str(&std::env::var(PATHS_ENV).expect("paths")).unwrap();
    let config =
        ionet::InitConfig { session_dir: Some(session.into()), payer_account: "mallory".into(), ..Default::default() };
    ionet::init(config.address("auto")).unwrap();
    let verdicts = ionet::get_timeout(&try_to_read::remote(paths), Duration::from_secs(60)).unwrap();
    let (uid, gid, _) = ionet::get_timeout(&who_am_i_and_a_file::remote(), Duration::from_secs(60)).unwrap();
    println!("RESULT {}", serde_json::json!({ "verdicts": verdicts, "uid": uid, "gid": gid }));
    ionet::shutdown();
}

/// A tenant's code on a provider's machine runs as a user of its own: it reads neither the
/// node's key nor the session's credentials nor another tenant's objects or files, and
/// lists neither the session nor the object store; the owner's own tasks read them.
fn a_tenants_code_reads_nothing_of_the_node_or_of_other_jobs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: only a node daemon running as root gives jobs users of their own");
        return;
    }
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init_as("victim");
    let secret: Vec<u8> = (0..1024 * 1024u32).map(|n| (n % 251) as u8).collect();
    let object = ionet::put(&secret).unwrap();
    let store = ionet::testing::object_store_dir().unwrap();
    let object_file = format!("{store}/{}", object.id().hex());
    assert!(std::path::Path::new(&object_file).exists(), "the object's file is {object_file}");
    let session = cluster.session().to_string_lossy().into_owned();
    let (victim_uid, victim_gid, victim_file) =
        ionet::get_timeout(&who_am_i_and_a_file::remote(), Duration::from_secs(60)).unwrap();
    assert!(victim_uid != 0 && victim_gid != 0, "a tenant's task does not run as root ({victim_uid}:{victim_gid})");
    // The owner's own tasks read its object's file.
    let own = ionet::get_timeout(&try_to_read::remote(vec![object_file.clone()]), Duration::from_secs(60)).unwrap();
    assert_eq!(own[0].1, "read", "a task reads its own account's object: {own:?}");

    let targets = vec![
        format!("{session}/node_key"),
        format!("{session}/admin_credential"),
        format!("{session}/signing_key"),
        format!("{session}/"),
        object_file.clone(),
        format!("{store}/"),
        victim_file.clone(),
    ];
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env(DRIVER_ENV, "intruder")
        .env(SESSION_ENV, cluster.session())
        .env(PATHS_ENV, serde_json::to_string(&targets).unwrap())
        .env_remove("IONET_CREDENTIAL")
        .env_remove("IONET_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the intruder's driver failed: {}", String::from_utf8_lossy(&output.stderr));
    let line = stdout.lines().find_map(|line| line.strip_prefix("RESULT ")).expect("the intruder reports");
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    let (uid, gid) = (report["uid"].as_u64().unwrap() as u32, report["gid"].as_u64().unwrap() as u32);
    assert!(uid != 0 && uid != victim_uid, "each job runs as a user of its own ({uid} vs {victim_uid})");
    assert!(gid != 0 && gid != victim_gid, "each account as a group of its own ({gid} vs {victim_gid})");
    for verdict in report["verdicts"].as_array().unwrap() {
        let (path, outcome) = (verdict[0].as_str().unwrap(), verdict[1].as_str().unwrap());
        assert_eq!(outcome, "PermissionDenied", "another tenant's task tried {path}");
    }
    // The victim's object and file are as they were, and still its own.
    assert_eq!(ionet::get(&object).unwrap(), secret);
    let again = ionet::get_timeout(&try_to_read::remote(vec![victim_file.clone()]), Duration::from_secs(60)).unwrap();
    assert_eq!(again[0].1, "read");
    let _ = std::fs::remove_file(&victim_file);
    drop(cluster);
}

/// A job's workers (its tasks' and its actors') hold the job's credential and nothing
/// broader: the head signed it for this job and its account, and with it a worker can
/// neither move money nor start jobs.
fn a_jobs_workers_hold_its_credential_and_nothing_broader() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init_as("acme");
    let job = ionet::get_runtime_context().unwrap().job_id;
    let (credential, broader) =
        ionet::get_timeout(&credentials_in_my_environment::remote(), Duration::from_secs(60)).unwrap();
    assert!(broader.is_empty(), "a worker sees {broader:?}");
    let claims = head_of(&cluster).verifier().verify(credential.as_bytes()).expect("the head signed it");
    assert_eq!(claims.role, Role::Job);
    assert_eq!(claims.job_id.as_deref(), Some(job.hex().as_str()), "this job's");
    assert_eq!(claims.account.as_deref(), Some("acme"), "paid by this job's account");
    // An actor's worker (placed by the head) holds the same job's credential.
    let tally = Tally::remote(0i64).unwrap();
    assert_eq!(ionet::get_timeout(&tally.bump(1), Duration::from_secs(60)).unwrap(), 1);
    let (actors, _) = ionet::get_timeout(&tally.credentials(), Duration::from_secs(60)).unwrap();
    // No process on the node shows a credential in its environment or command line (the
    // workers read theirs from a pipe; the daemons take join tokens from their
    // environment), and a worker's memory is its own.
    let (exposed, private) = ionet::get_timeout(&credentials_on_my_node::remote(), Duration::from_secs(60)).unwrap();
    assert!(exposed.is_empty(), "credentials readable at {exposed:?}");
    assert!(private, "a worker is not dumpable");
    let actor_claims = head_of(&cluster).verifier().verify(actors.as_bytes()).unwrap();
    assert_eq!(
        (actor_claims.role, actor_claims.job_id, actor_claims.account),
        (claims.role, claims.job_id, claims.account)
    );

    let credential = Bearer::new(&credential).unwrap();
    let head = cluster.address();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut metering = ionet::rpc::metering_client(&head, &credential).await.unwrap();
        let credit = AddCreditsRequest { account: "acme".into(), amount_micros: 1_000_000 };
        denied(metering.add_credits(credit).await, "credits from a worker");
        let mut gcs = ionet::rpc::gcs_client(&head, &credential).await.unwrap();
        denied(gcs.add_job(AddJobRequest::default()).await, "a job started from a worker");
    });
}

/// A stand-in for a tenant's own process: answers every call `UNIMPLEMENTED`, and keeps
/// the credential each call presented (what a tenant learns from whoever calls it).
#[derive(Clone, Default)]
struct Listener(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl tonic::server::NamedService for Listener {
    const NAME: &'static str = "ionet.worker.CoreWorker";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Listener {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = request.headers().get("authorization").and_then(|value| value.to_str().ok()) {
            self.0.lock().unwrap().push(value.trim_start_matches("Bearer ").to_string());
        }
        std::future::ready(Ok(tonic::Status::unimplemented("a tenant's listener").into_http()))
    }
}

/// An actor of `job` no node can ever fit (it dies infeasible once placed): what a test
/// creates to see what the head does on the way.
fn unplaceable_actor(job: JobId, class_name: &str) -> ActorSpec {
    ActorSpec {
        actor_id: ionet::ActorId::random().to_vec(),
        job_id: job.to_vec(),
        class_name: class_name.into(),
        resources: Some((&ResourceSet::new().with("no-such-resource", Quantity::whole(1))).into()),
        ..Default::default()
    }
}

/// Serves a [`Listener`] on a loopback port; its address.
async fn listen(listener: Listener) -> String {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(listener)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(socket)),
    );
    address
}

/// The node this task or actor runs on.
#[ionet::remote]
fn where_am_i() -> String {
    ionet::get_runtime_context().unwrap().node_id.hex()
}

/// A payout keypair file as the Solana CLI writes it (a JSON array of the 32 secret and
/// 32 public bytes).
fn payout_keypair(dir: &std::path::Path) -> std::path::PathBuf {
    let raw = dir.join("raw.key");
    let pair = KeyPair::load_or_create(&raw).unwrap();
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes.extend_from_slice(&pair.public_key());
    let path = dir.join("payout.json");
    std::fs::write(&path, serde_json::to_string(&bytes).unwrap()).unwrap();
    path
}

/// A head that pays out on chain runs no tenant code: its node daemon takes no lease, so
/// tasks and (zero-CPU) actors run on a provider's node, or fail as infeasible when there
/// is none.
fn the_head_that_pays_out_runs_no_tenant_code() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = payout_keypair(dir.path());
    let mut cluster = Cluster::start(&[
        "--num-cpus",
        "2",
        "--payout-rpc-url",
        "http://127.0.0.1:9",
        "--payout-keypair",
        keypair.to_str().unwrap(),
        "--payout-asset",
        "sol:1000000",
    ]);
    cluster.init();
    let refused = ionet::get_timeout(&where_am_i::remote(), Duration::from_secs(60)).unwrap_err();
    assert!(refused.to_string().to_lowercase().contains("infeasible"), "{refused}");
    cluster.add_node(&["--num-cpus", "1", "--labels", "name=provider"]);
    let provider = ionet::nodes()
        .unwrap()
        .into_iter()
        .find(|node| node.labels.get("name").map(String::as_str) == Some("provider"))
        .unwrap()
        .node_id
        .hex();
    assert_eq!(ionet::get_timeout(&where_am_i::remote(), Duration::from_secs(60)).unwrap(), provider);
    let tally = Tally::remote(0i64).unwrap();
    assert_eq!(ionet::get_timeout(&tally.node(), Duration::from_secs(60)).unwrap(), provider, "an actor too");
}

pub struct Tally {
    value: i64,
}

#[ionet::actor]
impl Tally {
    pub fn new(start: i64) -> Self {
        Tally { value: start }
    }

    pub fn bump(&mut self, by: i64) -> i64 {
        self.value += by;
        self.value
    }

    pub fn node(&self) -> String {
        ionet::get_runtime_context().unwrap().node_id.hex()
    }

    pub fn worker_id(&self) -> String {
        ionet::get_runtime_context().unwrap().worker_id.unwrap()
    }

    pub fn credentials(&self) -> (String, Vec<String>) {
        (ionet::testing::job_credential().unwrap(), Vec::new())
    }
}

#[ionet::remote]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// Neither a job (a driver or worker) nor a node daemon can add credits, refund or
/// settle; the ledger is as before; the operator can, with the credential the head wrote.
fn only_the_operator_moves_money() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    let session = cluster.session();
    let admin = admin_of(&cluster);
    use std::os::unix::fs::PermissionsExt;
    assert!(!session.join("token").exists(), "there is no cluster-wide token");
    for secret in ["admin_credential", "signing_key", "node_key"] {
        let mode = std::fs::metadata(session.join(secret)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{secret} is the owner's alone");
    }
    assert_eq!(std::fs::metadata(session).unwrap().permissions().mode() & 0o777, 0o700);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let address = cluster.address();
        let (_, job) = start_job(&address, &admin, "").await.unwrap();
        let provider = join_as_provider(&address, &admin).await;
        let credit = AddCreditsRequest { account: "mallory".into(), amount_micros: 1_000_000_000 };
        for (who, credential) in [("a job", job), ("a node", provider.credential)] {
            let mut caller = ionet::rpc::metering_client(&address, &credential).await.unwrap();
            let before = caller.balances(BalancesRequest {}).await.unwrap().into_inner();
            let status = caller.add_credits(credit.clone()).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
            let status = caller.refund(RefundRequest { account: "mallory".into() }).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
            let status = caller.settle(SettleRequest { dry_run: false }).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
            let after = caller.balances(BalancesRequest {}).await.unwrap().into_inner();
            assert_eq!(format!("{before:?}"), format!("{after:?}"), "{who}: the refused calls changed nothing");
        }

        let mut operator = ionet::rpc::metering_client(&address, &admin).await.unwrap();
        let balance = operator.add_credits(credit).await.unwrap().into_inner().balance_micros;
        assert_eq!(balance, 1_000_000_000);
        operator.settle(SettleRequest { dry_run: true }).await.unwrap();
    });
    // The CLI finds the operator's credential in the session directory.
    let text = cluster.ionet(&["credits", "refund", "--account", "mallory"]);
    assert!(text.contains("refunded $1000"), "{text}");
}

#[ionet::remote]
fn spin_for(seconds: u64) -> u32 {
    std::thread::sleep(Duration::from_secs(seconds));
    std::process::id()
}

/// A tenant that tells the head its lease is over while its task still runs: the record
/// ends at its word, and the head has the node stop the lease's worker.
fn a_lease_its_holder_ended_stops_its_worker_there() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    cluster.init();
    let head = cluster.address();
    let admin = admin_of(&cluster);
    let job = ionet::get_runtime_context().unwrap().job_id;
    let credential = Bearer::new(&ionet::testing::job_credential().unwrap()).unwrap();
    let long = spin_for::options(TaskOptions::default().max_retries(0)).remote(300);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let said = runtime.block_on(async {
        let mut ledger = ionet::rpc::metering_client(&head, &admin).await.unwrap();
        let usage = ListUsageRequest { job_id: job.to_vec(), ..Default::default() };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let running = loop {
            let records = ledger.list_usage(usage.clone()).await.unwrap().into_inner().records;
            if let Some(record) = records.into_iter().find(|record| record.open) {
                break record;
            }
            assert!(std::time::Instant::now() < deadline, "the task's lease never ran with both sides' word");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(running.node_started_ms > 0 && running.holder_started_ms > 0, "{running:?}");
        let mut tenant = ionet::rpc::metering_client(&head, &credential).await.unwrap();
        let word = HeldLease {
            lease_id: running.lease_id.clone(),
            node_id: running.node_id.clone(),
            granted: false,
            age_ms: 0,
            resources: None,
        };
        let said = std::time::Instant::now();
        tenant.report_held_leases(ReportHeldLeasesRequest { job_id: job.to_vec(), leases: vec![word] }).await.unwrap();
        let records = ledger.list_usage(usage).await.unwrap().into_inner().records;
        let closed = records.iter().find(|record| record.lease_id == running.lease_id).unwrap();
        assert!(!closed.open, "the record ends at the holder's word: {closed:?}");
        assert_eq!((closed.ended_by.as_str(), closed.end_ms), ("holder", closed.holder_ended_ms));
        said
    });
    // The node stops the worker: the task fails (no retries), soon after the word.
    let failed = ionet::get_timeout(&long, Duration::from_secs(60));
    assert!(failed.is_err(), "the task ran on after its lease was ended: {failed:?}");
    assert!(said.elapsed() < Duration::from_secs(30), "the worker was stopped {:?} after the word", said.elapsed());
    ionet::shutdown();
}

fn main() {
    if let Ok(driver) = std::env::var(DRIVER_ENV) {
        ionet::testing::run_worker_if_requested();
        match driver.as_str() {
            "intruder" => intruder_driver(),
            other => panic!("unknown driver {other}"),
        }
        std::process::exit(0);
    }
    harness::run(
        &[
            ("every_rpc_is_answered_as_the_table_says", every_rpc_is_answered_as_the_table_says),
            ("only_the_operator_moves_money", only_the_operator_moves_money),
            ("a_provider_acts_only_for_its_own_node", a_provider_acts_only_for_its_own_node),
            ("a_tenant_acts_only_for_its_own_job", a_tenant_acts_only_for_its_own_job),
            ("a_lease_its_holder_ended_stops_its_worker_there", a_lease_its_holder_ended_stops_its_worker_there),
            (
                "a_jobs_workers_hold_its_credential_and_nothing_broader",
                a_jobs_workers_hold_its_credential_and_nothing_broader,
            ),
            ("the_head_that_pays_out_runs_no_tenant_code", the_head_that_pays_out_runs_no_tenant_code),
            ("a_node_runs_only_the_jobs_declared_command", a_node_runs_only_the_jobs_declared_command),
            (
                "another_accounts_object_is_never_copied_to_a_tenant",
                another_accounts_object_is_never_copied_to_a_tenant,
            ),
            (
                "a_tenants_code_reads_nothing_of_the_node_or_of_other_jobs",
                a_tenants_code_reads_nothing_of_the_node_or_of_other_jobs,
            ),
        ],
        Duration::from_secs(240),
    );
}
