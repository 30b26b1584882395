//! Calls the cluster must refuse: every RPC of every service walked with every kind of
//! caller against the authorization table; money moved by someone other than the
//! operator; a provider acting for another provider's node. Real daemons on loopback,
//! this process a driver among them.

mod harness;

use std::time::Duration;

use harness::Cluster;
use ionet::auth::ClusterToken;
use ionet::authz::{decide, Access, Principal, TABLE};
use ionet::credential::{registration_message, KeyPair};
use ionet::rpc::proto::common::NodeInfo;
use ionet::rpc::proto::gcs::{
    ActorSpec, AddJobRequest, CreateActorRequest, CreatePlacementGroupRequest, CreateTokenRequest, DrainNodeRequest,
    HeartbeatRequest, KillActorRequest, MarkJobFinishedRequest, RegisterNodeRequest, RemovePlacementGroupRequest,
};
use ionet::rpc::proto::metering::{
    AddCreditsRequest, BalancesRequest, LeaseEndedRequest, LeaseStartedRequest, ListUsageRequest, RefundRequest,
    SettleRequest,
};
use ionet::rpc::proto::node::RequestWorkerLeaseRequest;
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
    credential: ClusterToken,
}

fn admin_of(cluster: &Cluster) -> ClusterToken {
    ClusterToken::new(&std::fs::read_to_string(cluster.session().join("admin_credential")).unwrap()).unwrap()
}

fn token_of(cluster: &Cluster) -> ClusterToken {
    ClusterToken::new(&std::fs::read_to_string(cluster.session().join("token")).unwrap()).unwrap()
}

async fn join_token(address: &str, admin: &ClusterToken) -> ClusterToken {
    let mut operator = ionet::rpc::gcs_client(address, admin).await.unwrap();
    let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 600, account: String::new() };
    ClusterToken::new(&operator.create_token(request).await.unwrap().into_inner().token).unwrap()
}

/// An API key for `account`, made by the operator.
async fn account_key(address: &str, admin: &ClusterToken, account: &str) -> ClusterToken {
    let mut operator = ionet::rpc::gcs_client(address, admin).await.unwrap();
    let request = CreateTokenRequest { role: "account".into(), ttl_seconds: 600, account: account.into() };
    ClusterToken::new(&operator.create_token(request).await.unwrap().into_inner().token).unwrap()
}

/// Starts a job with `starter` (an account key), naming `payer`: the job and its credential.
async fn start_job(address: &str, starter: &ClusterToken, payer: &str) -> Result<(JobId, ClusterToken), tonic::Status> {
    let mut client = ionet::rpc::gcs_client(address, starter).await.unwrap();
    let reply = client.add_job(AddJobRequest { payer_account: payer.into(), ..Default::default() }).await?.into_inner();
    let job = JobId::from_bytes(&reply.job.unwrap().job_id).unwrap();
    Ok((job, ClusterToken::new(&reply.job_credential).unwrap()))
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
    RegisterNodeRequest { node: Some(node), proof }
}

/// Joins a node of our own (no daemon behind it) with a join token.
async fn join_as_provider(address: &str, admin: &ClusterToken) -> Provider {
    let join = join_token(address, admin).await;
    let mut joiner = ionet::rpc::gcs_client(address, &join).await.unwrap();
    let (node_id, key) = (NodeId::random(), KeyPair::generate());
    let reply = joiner.register_node(registration(node_id, &key, 1)).await.unwrap().into_inner();
    Provider { node_id, key, credential: ClusterToken::new(&reply.node_credential).unwrap() }
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

/// Every row of the table, called at its server by nobody, by a stranger, by a member,
/// by the admin, by a node, by a joining machine, by an account and by a job. The message
/// is a malformed one, so that an admitted call fails in decoding and no handler changes
/// anything.
fn every_rpc_is_answered_as_the_table_says() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    cluster.init();
    let head = cluster.address();
    let node = ionet::testing::local_node_address().unwrap();
    let worker = ionet::testing::core_worker_address().unwrap();
    let (admin, token) = (admin_of(&cluster), token_of(&cluster));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (provider, join, account, (job, job_credential)) = runtime.block_on(async {
        let account = account_key(&head, &admin, "acme").await;
        let job = start_job(&head, &account, "").await.unwrap();
        (join_as_provider(&head, &admin).await, join_token(&head, &admin).await, account, job)
    });

    // (who, credential, the principal the table knows it as)
    let callers: Vec<(&str, Option<ClusterToken>, Option<Principal>)> = vec![
        ("nobody", None, None),
        ("a stranger", Some(ClusterToken::generate()), None),
        ("a member", Some(token), Some(Principal::Member)),
        ("the admin", Some(admin), Some(Principal::Admin)),
        ("a node", Some(provider.credential.clone()), Some(Principal::Node(provider.node_id))),
        ("a joining machine", Some(join), Some(Principal::Joiner)),
        ("an account", Some(account), Some(Principal::Account("acme".into()))),
        ("a job", Some(job_credential), Some(Principal::Job { job, account: "acme".into() })),
    ];
    for rule in TABLE {
        // Every server knows the head's key: the head's own, a node daemon from its
        // registration, a driver from its job's start.
        let address = match rule.path.split('.').nth(1) {
            Some("gcs") | Some("metering") => head.as_str(),
            Some("node") | Some("object") => node.as_str(),
            Some("worker") => worker.as_str(),
            other => panic!("{}: a service of no known server ({other:?})", rule.path),
        };
        for (who, credential, principal) in &callers {
            let outcome = call(address, rule.path, credential.as_ref().map(ClusterToken::as_str), vec![0xff; 8]);
            let context = format!("{} by {who}: {outcome:?}", rule.path);
            match principal {
                None => assert_eq!(outcome.0, Code::Unauthenticated, "{context}"),
                Some(principal) => match decide(principal, rule.path) {
                    Ok(()) => assert!(!refused(&outcome), "{context}"),
                    Err(why) => {
                        assert_eq!(outcome.0, Code::PermissionDenied, "{context}");
                        assert_eq!(outcome.1, why, "the refusal names principal, call and missing right");
                    }
                },
            }
        }
    }
    assert!(TABLE.iter().any(|rule| rule.access == Access::Admin), "the walk met admin-only calls");
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
    let (admin, token) = (admin_of(&cluster), token_of(&cluster));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mallory = join_as_provider(&head, &admin).await;
        let mut as_mallory = ionet::rpc::gcs_client(&head, &mallory.credential).await.unwrap();
        let mut metering = ionet::rpc::metering_client(&head, &mallory.credential).await.unwrap();
        let balances = metering.balances(BalancesRequest {}).await.unwrap().into_inner();

        let message = denied(
            as_mallory.heartbeat(HeartbeatRequest { node_id: victim.node_id.to_vec(), available: None }).await,
            "a heartbeat for another node",
        );
        assert!(message.contains(&mallory.node_id.short()) && message.contains(&victim.node_id.short()), "{message}");
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
        // Billing a tenant for the victim's GPUs, or ending the victim's leases.
        let job = ionet::rpc::proto::gcs::GetAllJobsRequest::default();
        let job_id = as_mallory.get_all_jobs(job).await.unwrap().into_inner().jobs.last().unwrap().job_id.clone();
        let resources = Some((&ResourceSet::new().with("CPU", Quantity::whole(1))).into());
        denied(
            metering
                .lease_started(LeaseStartedRequest {
                    lease_id: ionet::LeaseId::random().to_vec(),
                    node_id: victim.node_id.to_vec(),
                    job_id: job_id.clone(),
                    resources: resources.clone(),
                })
                .await,
            "reporting a lease on another node",
        );
        // The victim's lease reaches the head's meter shortly after the task ran.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let victims_lease = loop {
            let request = ListUsageRequest { node_id: victim.node_id.to_vec(), ..Default::default() };
            if let Some(record) = metering.list_usage(request).await.unwrap().into_inner().records.first() {
                break record.lease_id.clone();
            }
            assert!(std::time::Instant::now() < deadline, "the victim's lease was never metered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        denied(
            metering.lease_ended(LeaseEndedRequest { lease_id: victims_lease }).await,
            "ending another node's lease",
        );
        // Her own node: no more than it has.
        let eight = Some((&ResourceSet::new().with("GPU", Quantity::whole(8))).into());
        let status = metering
            .lease_started(LeaseStartedRequest {
                lease_id: ionet::LeaseId::random().to_vec(),
                node_id: mallory.node_id.to_vec(),
                job_id,
                resources: eight.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let status = as_mallory
            .heartbeat(HeartbeatRequest { node_id: mallory.node_id.to_vec(), available: eight })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        // The cluster token names no node at all.
        let mut member = ionet::rpc::gcs_client(&head, &token).await.unwrap();
        denied(
            member.heartbeat(HeartbeatRequest { node_id: victim.node_id.to_vec(), available: None }).await,
            "a heartbeat with the cluster token",
        );

        let after = metering.balances(BalancesRequest {}).await.unwrap().into_inner();
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
    let head = cluster.address();
    let node = ionet::testing::local_node_address().unwrap();
    let (admin, token) = (admin_of(&cluster), token_of(&cluster));
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
        // Neither the cluster token nor a job credential starts a job.
        let mut member = ionet::rpc::gcs_client(&head, &token).await.unwrap();
        denied(member.add_job(AddJobRequest::default()).await, "a job started with the cluster token");
        denied(as_mallory.add_job(AddJobRequest::default()).await, "a job started by a job");

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
        operator.remove_placement_group(removal).await.unwrap();
        let mut daemon = ionet::rpc::NodeManagerClient::new(
            ionet::rpc::connect(&node, &credential, Duration::from_secs(5)).await.unwrap(),
        );
        let lease = RequestWorkerLeaseRequest { job_id: victim_job.to_vec(), ..Default::default() };
        denied(daemon.request_worker_lease(lease).await, "a lease as another job");
        // Her own job finishes fine.
        as_mallory.mark_job_finished(MarkJobFinishedRequest { job_id: own_job.to_vec() }).await.unwrap();
    });
    assert_eq!(ionet::get_timeout(&tally.bump(1), Duration::from_secs(60)).unwrap(), 42, "the victim's actor lives on");
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
}

#[ionet::remote]
fn add(a: u64, b: u64) -> u64 {
    a + b
}

/// A member (any node daemon, driver or worker) cannot add credits, refund or settle;
/// the ledger is as before; the operator can, with the credential the head wrote.
fn only_the_operator_moves_money() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    let session = cluster.session();
    let (admin, token) = (admin_of(&cluster), token_of(&cluster));
    use std::os::unix::fs::PermissionsExt;
    for secret in ["token", "admin_credential", "signing_key", "node_key"] {
        let mode = std::fs::metadata(session.join(secret)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{secret} is the owner's alone");
    }
    assert_eq!(std::fs::metadata(session).unwrap().permissions().mode() & 0o777, 0o700);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let address = cluster.address();
        let mut member = ionet::rpc::metering_client(&address, &token).await.unwrap();
        let before = member.balances(BalancesRequest {}).await.unwrap().into_inner();

        let credit = AddCreditsRequest { account: "mallory".into(), amount_micros: 1_000_000_000 };
        let status = member.add_credits(credit.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = member.refund(RefundRequest { account: "mallory".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = member.settle(SettleRequest { dry_run: false }).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let after = member.balances(BalancesRequest {}).await.unwrap().into_inner();
        assert_eq!(format!("{before:?}"), format!("{after:?}"), "the refused calls changed nothing");

        let mut operator = ionet::rpc::metering_client(&address, &admin).await.unwrap();
        let balance = operator.add_credits(credit).await.unwrap().into_inner().balance_micros;
        assert_eq!(balance, 1_000_000_000);
        operator.settle(SettleRequest { dry_run: true }).await.unwrap();
    });
    // The CLI finds the operator's credential in the session directory.
    let text = cluster.ionet(&["credits", "refund", "--account", "mallory"]);
    assert!(text.contains("refunded $1000"), "{text}");
}

fn main() {
    harness::run(
        &[
            ("every_rpc_is_answered_as_the_table_says", every_rpc_is_answered_as_the_table_says),
            ("only_the_operator_moves_money", only_the_operator_moves_money),
            ("a_provider_acts_only_for_its_own_node", a_provider_acts_only_for_its_own_node),
            ("a_tenant_acts_only_for_its_own_job", a_tenant_acts_only_for_its_own_job),
        ],
        Duration::from_secs(240),
    );
}
