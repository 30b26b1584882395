//! The head's check of nodes' GPUs against a live head: an honest node daemon with
//! simulated GPUs passes and is schedulable within seconds of joining; cheating nodes (test
//! clients holding their own node keys and answering the check as a cheat would: a cached
//! product, a skipped fill, a late answer) are quarantined with the reason in `ionet status
//! --json`, and the head bills none of their leases; a node that never answers takes no
//! work either, and registering again clears nothing.

mod common;

use std::time::{Duration, Instant};

use common::{wait_until, TestCluster};
use ionet_common::auth::Bearer;
use ionet_common::credential::{registration_message, KeyPair};
use ionet_common::gpu_proof::{chunk_leaf, row_bytes, Answer, CpuProver, GpuChallenge, Prover};
use ionet_common::resources::{Quantity, ResourceSet, CPU, GPU};
use ionet_common::rpc::proto::common::{GpuCheckState, GpuInfo, NodeInfo};
use ionet_common::rpc::proto::gcs::{
    AddJobRequest, ClearUntrustedRequest, CommitGpuCheckRequest, CreateTokenRequest, HeartbeatRequest,
    RegisterNodeRequest, RevealGpuCheckRequest, StartGpuCheckRequest,
};
use ionet_common::rpc::proto::metering::LeaseStartedRequest;
use ionet_common::rpc::GcsClient;
use ionet_common::{LeaseId, NodeId};
use ionet_gcs::gpu_checks::{challenge_from_wire, commit_to_wire, reveal_to_wire, sample_from_wire};
use serde_json::Value;

/// A head whose GPU checks are due within 1.5 s (simulated GPUs answer in well under).
fn cluster() -> (TestCluster, tempfile::TempDir) {
    cluster_with("")
}

fn cluster_with(settings: &str) -> (TestCluster, tempfile::TempDir) {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("ionet.toml");
    std::fs::write(&config, format!("gpu_check_deadline_ms = 1500\n{settings}")).unwrap();
    (TestCluster::start(&["--config", config.to_str().unwrap()]), config_dir)
}

fn node_row(cluster: &TestCluster, node_id: &str) -> Value {
    let status = cluster.status_json();
    status.as_array().unwrap().iter().find(|node| node["node_id"] == node_id).cloned().expect("the node is listed")
}

#[test]
fn an_honest_node_with_simulated_gpus_passes_and_is_schedulable_within_seconds_of_joining() {
    let (mut cluster, _config) = cluster();
    let joined = Instant::now();
    cluster.add_node(&["--num-gpus", "4", "--gpu-type", "A100-80GB"]);
    // `add_node` returns once the daemon is ready: registered and its GPUs checked.
    let status = cluster.status_json();
    let node = status.as_array().unwrap().iter().find(|node| !node["gpus"].as_array().unwrap().is_empty()).unwrap();
    let check = &node["gpu_check"];
    assert_eq!(check["state"], "passed", "{node:#}");
    assert_eq!(check["simulated"], true);
    assert_eq!(check["passes"], 1);
    let registered = node["registered_at_ms"].as_u64().unwrap();
    let checked = check["checked_at_ms"].as_u64().unwrap();
    assert!(
        checked >= registered && checked - registered < 10_000,
        "checked {} ms after joining",
        checked - registered
    );
    assert!(joined.elapsed() < Duration::from_secs(10));
    assert!(check["tflops"].as_f64().unwrap() > 0.0 && check["bandwidth_gb_per_s"].as_f64().unwrap() > 0.0);
    // Measured performance and reliability wherever nodes are listed: a simulated GPU is
    // ranked by its model's published figure (the CPU's speed says nothing of it).
    assert_eq!((node["gpu_tflops"].as_f64(), node["gpu_tflops_measured"].as_bool()), (Some(19.5), Some(false)));
    assert_eq!(node["reliability"], 0.6667, "a first pass: (1 + 1) / (1 + 2): {node:#}");
    let table = cluster.ionet_ok(&["status"]);
    assert!(table.contains("GPU CHECK") && table.contains("passed (simulated)"), "{table}");
    assert!(table.contains("RELIABILITY") && table.contains("19.5 (published)") && table.contains("0.67"), "{table}");

    // Schedulable: the head bills a lease of its GPUs.
    let job = add_job(&cluster);
    let node_id = hex::decode(node["node_id"].as_str().unwrap()).unwrap();
    let mut metering = cluster.metering_client();
    cluster.runtime.block_on(metering.lease_started(lease(&node_id, &job))).expect("a checked node's lease is billed");

    // A job's least reliability is a share of 1.
    let mut operator = cluster.admin_client();
    let request = AddJobRequest { min_reliability_bps: 10_001, ..Default::default() };
    let refused = cluster.runtime.block_on(operator.add_job(request)).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("min_reliability_bps 10001 is above 10000"), "{refused:?}");
}

/// A node of the test's own: its key, its id, and a client holding its node credential.
struct Cheat {
    node_id: NodeId,
    key: KeyPair,
    info: NodeInfo,
    client: GcsClient,
}

fn join(cluster: &TestCluster, gpus: u32) -> Cheat {
    let mut operator = cluster.admin_client();
    let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 600, ..Default::default() };
    let join = cluster.runtime.block_on(operator.create_token(request)).unwrap().into_inner().token;
    let (node_id, key) = (NodeId::random(), KeyPair::generate());
    let total = ResourceSet::new().with(CPU, Quantity::whole(4)).with(GPU, Quantity::whole(i64::from(gpus)));
    let info = NodeInfo {
        node_id: node_id.to_vec(),
        address: "127.0.0.1:1".into(),
        total: Some((&total).into()),
        available: Some((&total).into()),
        gpus: (0..gpus)
            .map(|index| GpuInfo { index, model: "H100".into(), memory_bytes: 80 << 30, simulated: true })
            .collect(),
        accelerator_type: "H100".into(),
        public_key: key.public_key().to_vec(),
        wallet: "cheat-wallet".into(),
        ..Default::default()
    };
    let mut joiner = cluster.client_with(&Bearer::new(&join).unwrap());
    let credential = register(cluster, &mut joiner, &info, &key);
    let client = cluster.client_with(&credential);
    // It heartbeats, as any node that wants to stay in the cluster does.
    let mut beating = client.clone();
    cluster.runtime.spawn(async move {
        loop {
            let request = HeartbeatRequest { node_id: node_id.to_vec(), available: None, ..Default::default() };
            if beating.heartbeat(request).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(common::HEARTBEAT_INTERVAL_MS)).await;
        }
    });
    Cheat { node_id, key, info, client }
}

fn register(cluster: &TestCluster, client: &mut GcsClient, info: &NodeInfo, key: &KeyPair) -> Bearer {
    let proof = key.sign(&registration_message(&info.node_id, &info.public_key)).to_vec();
    let request = RegisterNodeRequest { node: Some(info.clone()), proof, ..Default::default() };
    let reply = cluster.runtime.block_on(client.register_node(request)).expect("registered").into_inner();
    Bearer::new(&reply.node_credential).unwrap()
}

/// Answers the check with `answer` (what the cheat computes for each challenge), after
/// `delay`; the head's verdict or its refusal.
fn answer_check(
    cluster: &TestCluster,
    cheat: &mut Cheat,
    delay: Duration,
    answer: impl Fn(&GpuChallenge) -> Answer,
) -> Result<ionet_common::rpc::proto::common::GpuCheck, tonic::Status> {
    let node_id = cheat.node_id.to_vec();
    cluster.runtime.block_on(async {
        let start = cheat.client.start_gpu_check(StartGpuCheckRequest { node_id: node_id.clone() }).await?.into_inner();
        let answers: Vec<Answer> =
            start.challenges.iter().map(|challenge| answer(&challenge_from_wire(challenge).unwrap())).collect();
        tokio::time::sleep(delay).await;
        let commits = answers.iter().map(|answer| commit_to_wire(&answer.commit())).collect();
        let request = CommitGpuCheckRequest { node_id: node_id.clone(), check_id: start.check_id, commits };
        let samples = cheat.client.commit_gpu_check(request).await?.into_inner().samples;
        let reveals = answers
            .iter()
            .zip(&samples)
            .map(|(answer, sample)| reveal_to_wire(&answer.reveal(&sample_from_wire(sample)).unwrap()))
            .collect();
        let request = RevealGpuCheckRequest { node_id, check_id: start.check_id, reveals };
        Ok(cheat.client.reveal_gpu_check(request).await?.into_inner().check.expect("a verdict"))
    })
}

fn add_job(cluster: &TestCluster) -> Vec<u8> {
    let mut operator = cluster.admin_client();
    let request = AddJobRequest {
        payer_account: "acme".into(),
        worker_command: Some(ionet_common::rpc::proto::common::WorkerCommand {
            argv: vec!["/bin/true".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    cluster.runtime.block_on(operator.add_job(request)).unwrap().into_inner().job.unwrap().job_id
}

fn lease(node_id: &[u8], job: &[u8]) -> LeaseStartedRequest {
    let one_gpu = ResourceSet::new().with(GPU, Quantity::whole(1));
    LeaseStartedRequest {
        lease_id: LeaseId::random().to_vec(),
        node_id: node_id.to_vec(),
        job_id: job.to_vec(),
        resources: Some((&one_gpu).into()),
        ..Default::default()
    }
}

/// A cached product: the right sizes, another seed's numbers.
fn cached_product(challenge: &GpuChallenge) -> Answer {
    let mut stale = challenge.clone();
    stale.compute.seed = [7; 32];
    CpuProver.run(&stale).unwrap()
}

/// The honest product, with every chunk of the fill after the first third left as zeros
/// (and committed so: the tree is of what it holds).
fn skipped_fill(challenge: &GpuChallenge) -> Answer {
    let memory = challenge.memory.clone();
    let held = move |j: u32| {
        if j < memory.chunks / 3 {
            memory.chunk(j)
        } else {
            vec![0; memory.chunk_bytes as usize]
        }
    };
    let b = challenge.compute.b_matrix();
    let rows = (0..challenge.compute.n).map(|i| row_bytes(&challenge.compute.row(i, &b))).collect();
    let leaves = (0..challenge.memory.chunks).map(|j| chunk_leaf(j, &held(j))).collect();
    Answer::new(challenge.gpu_index, rows, leaves, Box::new(held))
}

#[test]
fn cheating_nodes_are_quarantined_with_the_reason_shown_and_their_leases_are_not_billed() {
    // Cheats answer again at once here (a node not passing may, once per gap).
    let (cluster, _config) = cluster_with("reward_pool_per_hour_micros = 3600000000\ngpu_check_min_gap_ms = 0\n");
    let job = add_job(&cluster);
    let mut metering = cluster.metering_client();

    // Never answered: pending, and no lease of it is billed.
    let mut silent = join(&cluster, 2);
    let row = node_row(&cluster, &silent.node_id.hex());
    assert_eq!(row["gpu_check"]["state"], "pending", "{row:#}");
    let refused = cluster.runtime.block_on(metering.lease_started(lease(&silent.node_id.to_vec(), &job))).unwrap_err();
    assert!(refused.message().contains("takes no leases until its GPUs pass the head's check"), "{refused:?}");

    // A node asks for, or answers, only its own check.
    let mut cached = join(&cluster, 2);
    let other = cluster
        .runtime
        .block_on(silent.client.start_gpu_check(StartGpuCheckRequest { node_id: cached.node_id.to_vec() }))
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    let stranger = cluster
        .runtime
        .block_on(
            silent
                .client
                .commit_gpu_check(CommitGpuCheckRequest { node_id: cached.node_id.to_vec(), ..Default::default() }),
        )
        .unwrap_err();
    assert_eq!(stranger.code(), tonic::Code::PermissionDenied, "{stranger:?}");

    // A cached product: the right sizes, another seed's numbers.
    let check = answer_check(&cluster, &mut cached, Duration::ZERO, cached_product).unwrap();
    assert!(check.reason.contains("of the product is wrong"), "{check:?}");

    // Memory filled a third of the way.
    let mut lazy = join(&cluster, 2);
    let check = answer_check(&cluster, &mut lazy, Duration::ZERO, skipped_fill).unwrap();
    assert!(check.reason.contains("does not hold the fill"), "{check:?}");

    // Right, but after the deadline: refused at the commit (or, should a heartbeat come
    // first, the check is already over, failed as left unanswered).
    let mut slow = join(&cluster, 1);
    let late =
        answer_check(&cluster, &mut slow, Duration::from_millis(1_700), |challenge| CpuProver.run(challenge).unwrap())
            .unwrap_err();
    assert!(
        late.message().contains("past the deadline of 1.50 s") || late.message().contains("no GPU check"),
        "{late:?}"
    );

    for (cheat, why) in
        [(&cached, "of the product is wrong"), (&lazy, "does not hold the fill"), (&slow, "past the deadline")]
    {
        let row = node_row(&cluster, &cheat.node_id.hex());
        assert_eq!(row["gpu_check"]["state"], "failed", "{row:#}");
        assert!(row["gpu_check"]["reason"].as_str().unwrap().contains(why), "{row:#}");
        assert_eq!(row["gpu_check"]["failures"], 1);
        let refused =
            cluster.runtime.block_on(metering.lease_started(lease(&cheat.node_id.to_vec(), &job))).unwrap_err();
        assert!(refused.message().contains(why), "the refusal says why: {refused:?}");
    }
    let table = cluster.ionet_ok(&["status"]);
    assert!(table.contains("does not hold the fill") && table.contains("past the deadline of 1.50 s"), "{table}");

    // Registering again clears nothing: the head keeps its word on the same GPUs.
    let mut again = cluster.client_with(&cluster.admin_credential());
    register(&cluster, &mut again, &cached.info, &cached.key);
    assert_eq!(node_row(&cluster, &cached.node_id.hex())["gpu_check"]["state"], "failed");

    // Nor does registering with another GPU list: checked afresh, its failure on record.
    let mut changed = cached.info.clone();
    changed.gpus[0].memory_bytes += 1;
    register(&cluster, &mut again, &changed, &cached.key);
    let row = node_row(&cluster, &cached.node_id.hex());
    assert_eq!((row["gpu_check"]["state"].as_str(), row["gpu_check"]["failures"].as_u64()), (Some("pending"), Some(1)));
    cached.info = changed;

    // An honest answer afterwards lifts the quarantine.
    let check =
        answer_check(&cluster, &mut cached, Duration::ZERO, |challenge| CpuProver.run(challenge).unwrap()).unwrap();
    assert!(check.reason.contains("of the product is wrong"), "the last failure stays on record: {check:?}");
    wait_until("the quarantine to lift", Duration::from_secs(10), || {
        node_row(&cluster, &cached.node_id.hex())["gpu_check"]["state"] == "passed"
    });
    cluster.runtime.block_on(metering.lease_started(lease(&cached.node_id.to_vec(), &job))).expect("billed again");

    // The epoch's availability rewards are withheld from every one of them, and the
    // provider's earnings say why, node by node.
    cluster.ionet_ok(&["settle"]);
    let earnings: Value =
        serde_json::from_str(&cluster.ionet_ok(&["earnings", "--wallet", "cheat-wallet", "--json"])).unwrap();
    let epoch = &earnings["epochs"][0];
    assert_eq!(epoch["reward_micros"], 0, "{earnings:#}");
    let withheld: Vec<&str> =
        epoch["rewards_withheld"].as_array().unwrap().iter().map(|why| why.as_str().unwrap()).collect();
    assert_eq!(withheld.len(), 4, "{withheld:?}");
    for why in ["does not hold the fill", "past the deadline", "it failed a GPU check this epoch", "not passed"] {
        assert!(withheld.iter().any(|line| line.contains(why)), "{why}: {withheld:?}");
    }
    let table = cluster.ionet_ok(&["earnings", "--wallet", "cheat-wallet"]);
    assert!(table.contains(&format!("reward withheld: node {}: ", lazy.node_id.short())), "{table}");
}

#[test]
fn repeated_failures_make_a_node_untrusted_until_the_operator_clears_it() {
    let (cluster, _config) = cluster_with("gpu_check_untrusted_failures = 2\ngpu_check_min_gap_ms = 0\n");
    let job = add_job(&cluster);
    let mut metering = cluster.metering_client();
    let mut cheat = join(&cluster, 1);
    let honest = |challenge: &GpuChallenge| CpuProver.run(challenge).unwrap();
    answer_check(&cluster, &mut cheat, Duration::ZERO, cached_product).unwrap();
    assert_eq!(node_row(&cluster, &cheat.node_id.hex())["gpu_check"]["state"], "failed", "one failure quarantines");
    answer_check(&cluster, &mut cheat, Duration::ZERO, skipped_fill).unwrap();

    // Two within the window: untrusted, and passing does not lift it.
    let check = answer_check(&cluster, &mut cheat, Duration::ZERO, honest).unwrap();
    assert_eq!(
        (check.state, check.passes),
        (GpuCheckState::Passed as i32, 0),
        "a pass while untrusted counts for nothing"
    );
    let row = node_row(&cluster, &cheat.node_id.hex());
    let shown = &row["gpu_check"];
    assert_eq!(shown["state"], "untrusted", "{row:#}");
    assert!(shown["untrusted_since_ms"].as_u64().unwrap() > 0);
    assert_eq!(shown["recent_failures_ms"].as_array().unwrap().len(), 2);
    let because = shown["held_back_because"].as_str().unwrap();
    assert!(
        because.contains("untrusted after repeated failed checks (2 on record)")
            && because.contains("does not hold the fill"),
        "{because}"
    );
    let refused = cluster.runtime.block_on(metering.lease_started(lease(&cheat.node_id.to_vec(), &job))).unwrap_err();
    assert!(refused.message().contains("untrusted after repeated failed checks (2 on record)"), "{refused:?}");
    let table = cluster.ionet_ok(&["status"]);
    assert!(table.contains("UNTRUSTED: untrusted after repeated failed checks (2 on record)"), "{table}");
    assert_eq!(row["reliability"], 0.0, "an untrusted node scores nothing");

    // Only the operator trusts it again: not the node itself.
    let request = ClearUntrustedRequest { node_id: cheat.node_id.to_vec() };
    let denied = cluster.runtime.block_on(cheat.client.clear_untrusted(request.clone())).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // Nor a tenant.
    let tenant = cluster.ionet_ok(&["account", "create", "acme"]);
    let mut tenant = cluster.client_with(&Bearer::new(tenant.trim()).unwrap());
    let denied = cluster.runtime.block_on(tenant.clear_untrusted(request)).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let hex = cheat.node_id.hex();
    let said = cluster.ionet_ok(&["trust", "--node", &hex[..8]]);
    assert!(said.contains("is trusted again and takes work"), "{said}");
    let row = node_row(&cluster, &hex);
    assert_eq!(row["gpu_check"]["state"], "passed", "{row:#}");
    assert!(row["gpu_check"]["cleared_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(row["reliability"], 0.25, "no pass counted, two failures, and the prior: 1 / 4: {row:#}");
    cluster.runtime.block_on(metering.lease_started(lease(&cheat.node_id.to_vec(), &job))).expect("billed again");
    let twice = cluster.ionet_err(&["trust", "--node", &hex[..8]]);
    assert!(twice.contains("is not untrusted"), "{twice}");
}

#[test]
fn a_node_cannot_make_the_head_verify_checks_at_will() {
    let (cluster, _config) = cluster();
    let mut cheat = join(&cluster, 1);
    answer_check(&cluster, &mut cheat, Duration::ZERO, cached_product).unwrap();
    // Quarantined, it may try again, but not at once: each check costs the head work.
    let again = answer_check(&cluster, &mut cheat, Duration::ZERO, cached_product).unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("may start a GPU check unasked at most once per 30 s"), "{again:?}");
    let row = node_row(&cluster, &cheat.node_id.hex());
    assert_eq!((row["gpu_check"]["state"].as_str(), row["gpu_check"]["failures"].as_u64()), (Some("failed"), Some(1)));
}

/// A non-loopback address of this machine: the source of its route toward a public
/// address (connecting a UDP socket sends nothing), if it has one.
fn machine_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("8.8.8.8:53").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn simulated_gpus_are_taken_only_from_the_heads_own_machine_unless_the_operator_accepts_them() {
    let Some(ip) = machine_address() else {
        eprintln!("skipped: this machine has no address but loopback to join from");
        return;
    };
    for accept in [false, true] {
        // The head serves on the machine's own address: a node joining through it is not
        // on loopback, as a provider's machine would not be.
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("ionet.toml");
        std::fs::write(&config, format!("accept_remote_simulated_gpus = {accept}\n")).unwrap();
        let cluster = TestCluster::start(&["--config", config.to_str().unwrap(), "--host", &ip.to_string()]);
        assert!(cluster.address().contains(&ip.to_string()), "{}", cluster.address());
        // A head other machines can reach speaks TLS only: this process trusts its CA.
        let ca = std::fs::read_to_string(cluster.session().join("ca.pem")).expect("the head wrote its CA");
        ionet_common::tls::trust(&ca).unwrap();
        let mut operator = cluster.admin_client();
        let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 600, ..Default::default() };
        let join = cluster.runtime.block_on(operator.create_token(request)).unwrap().into_inner().token;
        let (node_id, key) = (NodeId::random(), KeyPair::generate());
        let total = ResourceSet::new().with(CPU, Quantity::whole(2)).with(GPU, Quantity::whole(2));
        let info = NodeInfo {
            node_id: node_id.to_vec(),
            address: format!("{ip}:1"),
            total: Some((&total).into()),
            available: Some((&total).into()),
            gpus: (0..2)
                .map(|index| GpuInfo { index, model: "A100-80GB".into(), memory_bytes: 80 << 30, simulated: true })
                .collect(),
            public_key: key.public_key().to_vec(),
            ..Default::default()
        };
        let proof = key.sign(&registration_message(&info.node_id, &info.public_key)).to_vec();
        let request = RegisterNodeRequest { node: Some(info.clone()), proof: proof.clone(), ..Default::default() };
        let mut joiner = cluster.client_with(&Bearer::new(&join).unwrap());
        let answer = cluster.runtime.block_on(joiner.register_node(request));
        if accept {
            // A real node daemon joining through the machine's address: accepted, checked.
            answer.expect_err("a node of a TLS cluster registers with its https:// address and certificate key");
            let mut cluster = cluster;
            cluster.add_node(&["--num-gpus", "2", "--gpu-type", "A100-80GB"]);
            let status = cluster.status_json();
            let node = status.as_array().unwrap().iter().find(|node| !node["gpus"].as_array().unwrap().is_empty());
            let node = node.expect("the node with simulated GPUs joined");
            assert_eq!(node["gpu_check"]["state"], "passed", "{node:#}");
        } else {
            let refused = answer.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
            assert!(
                refused.message().contains(&format!("offers simulated GPUs from {ip}"))
                    && refused.message().contains("accept_remote_simulated_gpus = true"),
                "{refused:?}"
            );
            let listed = cluster.status_json();
            assert!(listed.as_array().unwrap().iter().all(|node| node["node_id"] != node_id.hex()), "not registered");
            // The operator's own registration (the head's own node joins so, through any
            // address) is the operator's word.
            let request = RegisterNodeRequest { node: Some(info), proof, ..Default::default() };
            let registered = cluster.runtime.block_on(operator.register_node(request));
            let refused_tls = registered.expect_err("a node of a TLS cluster names its certificate key");
            assert!(refused_tls.message().contains("must join with its https:// address"), "{refused_tls:?}");
        }
    }
}
