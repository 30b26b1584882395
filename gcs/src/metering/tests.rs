use super::*;
use crate::storage::{GcsStorage, MemoryStorage};
use ionet_common::clock::ManualClock;
use ionet_common::config::ClusterConfig;
use ionet_common::resources::{parse_usd, Quantity, CPU, GPU};
use ionet_common::rpc::proto::common::ResourceQuantities;
use ionet_common::rpc::proto::common::{JobInfo, NodeInfo};
use ionet_common::ResourceSet;

const START: u64 = 1_700_000_000_000;

fn gpu_node(node_id: NodeId, gpus: i64, price: &str, wallet: &str) -> NodeInfo {
    let total = ResourceSet::new().with(GPU, Quantity::whole(gpus)).with(CPU, Quantity::whole(8));
    NodeInfo {
        node_id: node_id.to_vec(),
        address: "127.0.0.1:1".into(),
        total: Some((&total).into()),
        available: Some((&total).into()),
        price_per_gpu_hour_micros: parse_usd(price).unwrap(),
        wallet: wallet.into(),
        ..Default::default()
    }
}

struct Fixture {
    clock: ManualClock,
    state: Arc<GcsState>,
    metering: Arc<Metering>,
    storage: Arc<dyn GcsStorage>,
}

async fn fixture_on(storage: Arc<dyn GcsStorage>, clock: ManualClock) -> Fixture {
    fixture_with(ClusterConfig::default(), storage, clock).await
}

/// `config` with heartbeats every 100 ms, dead after a second's silence.
async fn fixture_with(config: ClusterConfig, storage: Arc<dyn GcsStorage>, clock: ManualClock) -> Fixture {
    let config = ClusterConfig { heartbeat_interval_ms: 100, heartbeat_timeout_ms: 1_000, ..config };
    let state = GcsState::open(config, storage.clone(), Arc::new(clock.clone())).await.unwrap();
    let metering = Metering::open(state.clone(), MeteringOptions::default()).await.unwrap();
    Fixture { clock, state, metering, storage }
}

async fn fixture() -> Fixture {
    fixture_on(Arc::new(MemoryStorage::new()), ManualClock::new(START)).await
}

fn gpus(count: &str) -> Option<ResourceQuantities> {
    Some((&ResourceSet::new().with(GPU, count.parse().unwrap())).into())
}

async fn job(state: &GcsState, payer: &str) -> JobId {
    let job = state.add_job(JobInfo { payer_account: payer.into(), ..Default::default() }).await.unwrap();
    JobId::from_bytes(&job.job_id).unwrap()
}

fn node_says(
    lease: LeaseId,
    node: NodeId,
    job: JobId,
    resources: Option<ResourceQuantities>,
) -> proto::LeaseStartedRequest {
    proto::LeaseStartedRequest {
        lease_id: lease.to_vec(),
        node_id: node.to_vec(),
        job_id: job.to_vec(),
        resources,
        ..Default::default()
    }
}

fn holder_says(lease: LeaseId, node: NodeId, granted: bool) -> proto::HeldLease {
    proto::HeldLease { lease_id: lease.to_vec(), node_id: node.to_vec(), granted, age_ms: 0, resources: None }
}

/// Both sides say the lease started: the node, then its holder.
async fn start_both(
    metering: &Metering,
    lease: LeaseId,
    node: NodeId,
    job: JobId,
    resources: Option<ResourceQuantities>,
) -> GcsResult<u64> {
    let start = metering.lease_started(&node_says(lease, node, job, resources)).await?;
    metering.holder_report(job, &[holder_says(lease, node, true)], false).await?;
    Ok(start)
}

fn balance(balances: &[(Account, i64)], account: Account) -> i64 {
    balances.iter().find(|(a, _)| *a == account).map(|(_, b)| *b).unwrap_or(0)
}

#[tokio::test]
async fn interval_times_price_is_exact_and_settles_once() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 4, "2.50", "wallet-a")).await.unwrap();
    let job = job(&f.state, "alice").await;
    f.metering.add_credits("alice", 100_000_000).await.unwrap();
    let lease = LeaseId::random();
    let start = start_both(&f.metering, lease, node, job, gpus("2")).await.unwrap();
    assert_eq!(start, START);
    // The same report again is harmless.
    f.clock.advance_ms(5);
    assert_eq!(start_both(&f.metering, lease, node, job, gpus("2")).await.unwrap(), START);
    f.clock.advance_ms(90 * 60_000 - 5);
    let record = f.metering.lease_ended(lease.as_bytes()).await.unwrap().unwrap();
    assert_eq!((record.start_ms, record.end_ms), (START, START + 5_400_000));
    // 2 GPUs × 1.5 h × $2.50 = $7.50, exactly.
    assert_eq!(record.cost_micros, 7_500_000);
    assert_eq!(record.payer_account, "alice");
    assert_eq!(record.provider_wallet, "wallet-a");
    assert_eq!(record.record_id, record_id(&lease, 0).to_string());
    // Ending twice returns the same record.
    f.clock.advance_ms(1_000);
    let again = f.metering.lease_ended(lease.as_bytes()).await.unwrap().unwrap();
    assert_eq!(again.end_ms, record.end_ms);

    let summary = f.metering.settle_now(false).await.unwrap();
    assert_eq!((summary.epoch_id, summary.records, summary.total_usage, summary.total_fee), (0, 1, 7_500_000, 187_500));
    let balances = f.metering.balances().await.unwrap();
    assert_eq!(balance(&balances, Account::provider("wallet-a")), 7_500_000);
    assert_eq!(balance(&balances, Account::Treasury), 187_500);
    assert_eq!(balance(&balances, Account::payer("alice")), 100_000_000 - 7_500_000 - 187_500);
    assert_eq!(balances.iter().map(|(_, b)| b).sum::<i64>(), 0);
    let listed = f.metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].settled && listed[0].settled_epoch == 0);

    f.clock.advance_ms(1_000);
    let second = f.metering.settle_now(false).await.unwrap();
    assert_eq!((second.epoch_id, second.records, second.total_usage), (1, 0, 0));
    assert_eq!(f.metering.balances().await.unwrap(), balances);
    let (earnings, provider_balance) = f.metering.earnings("wallet-a").await.unwrap();
    assert_eq!(earnings[0].0.revenue, 7_500_000);
    assert!(earnings[0].1.is_empty(), "no reward pool, nothing withheld");
    assert_eq!(provider_balance, 7_500_000);
}

#[tokio::test]
async fn a_dead_node_ends_its_leases_at_its_last_heartbeat() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "3.60", "")).await.unwrap();
    let job = job(&f.state, "").await;
    let lease = LeaseId::random();
    start_both(&f.metering, lease, node, job, gpus("0.5")).await.unwrap();
    // A start the node alone speaks of (no holder confirms it) counts for nothing.
    f.metering.lease_started(&node_says(LeaseId::random(), node, job, gpus("0.5"))).await.unwrap();
    f.clock.advance_ms(700);
    f.state.heartbeat(node.as_bytes(), None).unwrap();
    f.clock.advance_ms(1_500);
    assert_eq!(f.state.check_heartbeats().await.unwrap(), vec![node]);
    assert_eq!(f.metering.end_leases_of_dead_nodes().await.unwrap(), 1);
    let records = f.metering.list_usage(None, Some(node)).await.unwrap();
    assert_eq!(records.len(), 1);
    assert!(!records[0].open);
    assert_eq!(records[0].end_ms, START + 700);
    assert_eq!(records[0].payer_account, DEFAULT_PAYER);
    assert_eq!(records[0].provider_wallet, format!("node-{node}"));
    // 0.5 GPU × 0.7 s × $3.60/h = $0.00035.
    assert_eq!(records[0].cost_micros, 350);
    let err = f.metering.lease_started(&node_says(LeaseId::random(), node, job, gpus("1"))).await.unwrap_err();
    assert!(err.to_string().contains("is dead"), "{err}");

    // Its reliability: one lease (both sides started it), lost to its death (counted once,
    // however often the dead nodes' leases are ended); the time it stays gone counts
    // against it too.
    assert_eq!(f.metering.end_leases_of_dead_nodes().await.unwrap(), 0);
    let record = f.state.node(&node).unwrap().reliability.unwrap();
    assert_eq!((record.leases, record.leases_lost, record.down_ms), (1, 1, 0));
    f.clock.advance_ms(10_000);
    let mut back = gpu_node(node, 1, "3.60", "");
    back.reliability = Some(ionet_common::rpc::proto::common::NodeReliability::default());
    f.state.register_node(back).await.unwrap();
    let node_info = f.state.node(&node).unwrap();
    let record = node_info.reliability.clone().unwrap();
    assert_eq!((record.leases, record.leases_lost), (1, 1), "the head's record, not the node's word");
    assert_eq!(record.down_ms, 11_500, "gone from its last heartbeat until it came back");
    let score = ionet_common::reliability::score_bps(&node_info, f.state.now_ms());
    assert!(score < 5_000, "half its life gone, its only lease lost: {score}");
}

#[tokio::test]
async fn an_open_lease_is_cut_at_the_epoch_end_and_survives_a_restart() {
    let storage: Arc<dyn GcsStorage> = Arc::new(MemoryStorage::new());
    let clock = ManualClock::new(START);
    let f = fixture_on(storage.clone(), clock.clone()).await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "1", "w")).await.unwrap();
    let job = job(&f.state, "bob").await;
    let lease = LeaseId::random();
    start_both(&f.metering, lease, node, job, gpus("1")).await.unwrap();
    f.clock.advance_ms(3_600_000);
    let summary = f.metering.settle_now(false).await.unwrap();
    assert_eq!((summary.records, summary.total_usage), (1, 1_000_000));
    f.clock.advance_ms(1_800_000);
    drop(f);

    // A head restarted on the same storage still has the lease open.
    let g = fixture_on(storage, clock).await;
    let record = g.metering.lease_ended(lease.as_bytes()).await.unwrap().unwrap();
    assert_eq!(record.segment, 1);
    assert_eq!(record.start_ms, START + 3_600_000);
    assert_eq!(record.cost_micros, 500_000);
    assert_ne!(record.record_id, record_id(&lease, 0).to_string());
    let err = g.metering.lease_ended(LeaseId::random().as_bytes()).await.unwrap_err();
    assert!(err.to_string().contains("is not open"), "{err}");
    let _ = g.storage.describe();
}

#[tokio::test]
async fn bad_input_is_refused_with_the_value() {
    let f = fixture().await;
    let err = f.metering.add_credits("alice", 0).await.unwrap_err();
    assert!(err.to_string().contains("invalid amount"), "{err}");
    let err = f.metering.refund("nobody").await.unwrap_err();
    assert!(err.to_string().contains("\"nobody\" has never been credited"), "{err}");
    let err = f.metering.lease_ended(&[1, 2, 3]).await.unwrap_err();
    assert!(err.to_string().contains("lease id must be 16 bytes"), "{err}");
    let err = f
        .metering
        .lease_started(&node_says(LeaseId::random(), NodeId::random(), JobId::from_sequence(1), gpus("1")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not registered"), "{err}");
}

#[tokio::test]
async fn scheduled_epochs_close_on_boundaries() {
    let config = ClusterConfig {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1_000,
        epoch_length_ms: 60_000,
        ..Default::default()
    };
    let clock = ManualClock::new(600_000 + 30_000);
    let state = GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap();
    let metering = Metering::open(state, MeteringOptions::default()).await.unwrap();
    assert!(metering.settle_due().await.unwrap().is_none());
    clock.advance_ms(30_000);
    let closed = metering.settle_due().await.unwrap().unwrap();
    assert_eq!((closed.epoch_id, closed.end_ms), (0, 660_000));
    assert!(metering.settle_due().await.unwrap().is_none());
    clock.advance_ms(185_000);
    let closed = metering.settle_due().await.unwrap().unwrap();
    assert_eq!((closed.epoch_id, closed.end_ms), (1, 840_000));
}

#[tokio::test]
async fn a_node_ends_only_its_own_leases_and_leases_only_what_it_has() {
    let f = fixture().await;
    let (mine, theirs) = (NodeId::random(), NodeId::random());
    f.state.register_checked_node(gpu_node(mine, 2, "1.00", "wallet-mine")).await.unwrap();
    f.state.register_checked_node(gpu_node(theirs, 2, "1.00", "wallet-theirs")).await.unwrap();
    let job = job(&f.state, "alice").await;
    let lease = LeaseId::random();
    start_both(&f.metering, lease, theirs, job, gpus("2")).await.unwrap();
    f.clock.advance_ms(3_600_000);

    let refused = f.metering.lease_ended_by(lease.as_bytes(), 0, Some(mine)).await.unwrap_err();
    assert!(matches!(IonetError::from(refused), IonetError::PermissionDenied(_)));
    assert_eq!(f.metering.list_usage(None, None).await.unwrap().len(), 1);
    let record = f.metering.lease_ended_by(lease.as_bytes(), 0, Some(theirs)).await.unwrap().unwrap();
    assert_eq!(record.node_id, theirs.to_vec(), "its own node ends it");
    // Ended: the other node still may not end it again (nor learn its record that way).
    assert!(f.metering.lease_ended_by(lease.as_bytes(), 0, Some(mine)).await.is_err());

    let beyond = start_both(&f.metering, LeaseId::random(), mine, job, gpus("3")).await;
    assert!(beyond.unwrap_err().to_string().contains("more than node"), "a lease beyond the node's total");
}

#[tokio::test]
async fn a_node_that_withholds_its_end_is_billed_only_to_the_holders_return() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "3.60", "provider")).await.unwrap();
    let job = job(&f.state, "alice").await;
    let lease = LeaseId::random();
    start_both(&f.metering, lease, node, job, gpus("1")).await.unwrap();
    f.clock.advance_ms(10_000);
    // The holder gives the lease back; the node keeps quiet for 30 s.
    f.metering.holder_report(job, &[holder_says(lease, node, false)], false).await.unwrap();
    let usage = f.metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert!(!usage[0].open, "the record closed at the holder's word");
    assert_eq!((usage[0].start_ms, usage[0].end_ms), (START, START + 10_000));
    assert_eq!(usage[0].ended_by, "holder");
    // The node is told to end it once the grace has passed without its own word.
    assert!(f.metering.due_stops().is_empty(), "not before the grace");
    f.clock.advance_ms(STOP_GRACE_MS);
    assert_eq!(f.metering.due_stops().get(&node), Some(&vec![lease]));
    f.clock.advance_ms(30_000 - STOP_GRACE_MS);
    let record = f.metering.lease_ended_by(lease.as_bytes(), 0, Some(node)).await.unwrap().unwrap();
    assert_eq!(record.end_ms, START + 10_000, "the node's late end changes nothing");
    assert_eq!(record.holder_ended_ms, START + 10_000);
    // 10 s of one GPU at $3.60/h = $0.01.
    assert_eq!(record.cost_micros, 10_000);
}

#[tokio::test]
async fn a_lease_no_holder_asked_for_makes_no_record() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 2, "2.00", "provider")).await.unwrap();
    let other = job(&f.state, "mallory").await;
    let job = job(&f.state, "alice").await;
    // The node says it granted a lease the job never asked for.
    let forged = LeaseId::random();
    f.metering.lease_started(&node_says(forged, node, job, gpus("2"))).await.unwrap();
    f.clock.advance_ms(60_000);
    assert!(f.metering.list_usage(None, None).await.unwrap().is_empty(), "nothing runs on one side's word");
    assert_eq!(f.metering.lease_ended_by(forged.as_bytes(), 0, Some(node)).await.unwrap(), None);
    // Another unconfirmed grant is dropped after the window, and the node told to end it.
    let unconfirmed = LeaseId::random();
    f.metering.lease_started(&node_says(unconfirmed, node, job, gpus("1"))).await.unwrap();
    f.clock.advance_ms(CONFIRM_WINDOW_MS);
    assert!(f.metering.drop_unmatched().await.unwrap() >= 1);
    assert_eq!(f.metering.due_stops().get(&node), Some(&vec![unconfirmed]));
    // Another job's holder cannot speak for this job's lease either.
    let lease = LeaseId::random();
    f.metering.lease_started(&node_says(lease, node, job, gpus("1"))).await.unwrap();
    f.metering.holder_report(other, &[holder_says(lease, node, true)], false).await.unwrap();
    f.clock.advance_ms(1_000);
    assert_eq!(f.metering.lease_ended_by(lease.as_bytes(), 0, Some(node)).await.unwrap(), None);
    let summary = f.metering.settle_now(false).await.unwrap();
    assert_eq!((summary.records, summary.total_usage), (0, 0));
}

#[tokio::test]
async fn a_holder_that_ends_a_lease_early_ends_it_for_the_node_too() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "1.00", "provider")).await.unwrap();
    let job = job(&f.state, "alice").await;
    let lease = LeaseId::random();
    // The holder's words come late (batched): their ages date them back, by 2 s at most.
    f.metering.lease_started(&node_says(lease, node, job, gpus("1"))).await.unwrap();
    f.clock.advance_ms(5_000);
    let late = proto::HeldLease { age_ms: 60_000, ..holder_says(lease, node, true) };
    f.metering.holder_report(job, &[late], false).await.unwrap();
    let usage = f.metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!(usage[0].start_ms, START + 5_000 - two_party::MAX_AGE_MS, "the later start, dated back 2 s at most");
    f.clock.advance_ms(1_000);
    f.metering.holder_report(job, &[holder_says(lease, node, false)], false).await.unwrap();
    f.clock.advance_ms(STOP_GRACE_MS);
    assert_eq!(f.metering.due_stops().get(&node), Some(&vec![lease]));
    // A node that ends it first needs no telling.
    let quick = LeaseId::random();
    start_both(&f.metering, quick, node, job, gpus("1")).await.unwrap();
    f.metering.holder_report(job, &[holder_says(quick, node, false)], false).await.unwrap();
    f.metering.lease_ended_by(quick.as_bytes(), 0, Some(node)).await.unwrap().unwrap();
    f.clock.advance_ms(STOP_GRACE_MS);
    assert!(f.metering.due_stops().is_empty());
}

#[tokio::test]
async fn half_said_leases_survive_a_restart() {
    let storage: Arc<dyn GcsStorage> = Arc::new(MemoryStorage::new());
    let clock = ManualClock::new(START);
    let f = fixture_on(storage.clone(), clock.clone()).await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "3.60", "w")).await.unwrap();
    let job = job(&f.state, "bob").await;
    let (node_first, holder_first) = (LeaseId::random(), LeaseId::random());
    f.metering.lease_started(&node_says(node_first, node, job, gpus("1"))).await.unwrap();
    f.metering.holder_report(job, &[holder_says(holder_first, node, true)], false).await.unwrap();
    drop(f);
    let g = fixture_on(storage, clock.clone()).await;
    clock.advance_ms(1_000);
    g.metering.holder_report(job, &[holder_says(node_first, node, true)], false).await.unwrap();
    g.metering.lease_started(&node_says(holder_first, node, job, gpus("1"))).await.unwrap();
    clock.advance_ms(1_000);
    for lease in [node_first, holder_first] {
        let record = g.metering.lease_ended_by(lease.as_bytes(), 0, Some(node)).await.unwrap().unwrap();
        assert_eq!((record.start_ms, record.end_ms), (START + 1_000, START + 2_000));
        assert_eq!(record.ended_by, "node");
    }
}

#[tokio::test]
async fn a_finished_jobs_leases_end_with_it() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 1, "3.60", "w")).await.unwrap();
    let job = job(&f.state, "bob").await;
    let lease = LeaseId::random();
    start_both(&f.metering, lease, node, job, gpus("1")).await.unwrap();
    f.clock.advance_ms(4_000);
    assert_eq!(f.metering.end_leases_of_job(job).await.unwrap(), 1);
    let usage = f.metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!((usage[0].end_ms, usage[0].ended_by.as_str()), (START + 4_000, "job finished"));
    f.clock.advance_ms(STOP_GRACE_MS);
    assert_eq!(f.metering.due_stops().get(&node), Some(&vec![lease]));
}

#[tokio::test]
async fn a_payer_out_of_credit_gets_no_new_leases_and_its_running_ones_end() {
    let config = ClusterConfig {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1_000,
        credit_horizon_ms: 60_000,
        ..Default::default()
    };
    let clock = ManualClock::new(START);
    let state = GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap();
    let metering = Metering::open(state.clone(), MeteringOptions::default()).await.unwrap();
    let node = NodeId::random();
    // $3.60 per GPU-hour: $0.06 a minute, $0.0615 with the 2.5% fee.
    state.register_checked_node(gpu_node(node, 1, "3.60", "provider")).await.unwrap();
    let job = job(&state, "alice").await;
    let thrifty = job_with_credit(&state, &metering, "bob", 1_000_000).await;
    metering.add_credits("alice", 61_500).await.unwrap();
    let lease = LeaseId::random();
    start_both(&metering, lease, node, job, gpus("1")).await.unwrap();
    assert!(metering.check_funding().await.unwrap().is_empty(), "a minute of credit covers a minute");
    assert!(state.unfunded().is_empty());

    clock.advance_ms(30_000);
    let short = metering.check_funding().await.unwrap();
    assert_eq!(short.len(), 1);
    let reason = state.unfunded().get(&job).cloned().expect("alice's job may lease no more");
    for part in ["account \"alice\"", "balance $0.061500", "owed $0.030750", "next 1 min", "need $0.030750 more"] {
        assert!(reason.contains(part), "{part:?} in {reason}");
    }
    assert!(!state.unfunded().contains_key(&thrifty), "another payer's job is not touched");
    assert_eq!(metering.list_usage(Some(job), None).await.unwrap()[0].open, true, "running leases run on");

    clock.advance_ms(30_000);
    metering.check_funding().await.unwrap();
    let usage = metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!((usage[0].open, usage[0].end_ms, usage[0].ended_by.as_str()), (false, START + 60_000, "unfunded"));
    assert_eq!(usage[0].cost_micros, 60_000);
    clock.advance_ms(STOP_GRACE_MS);
    assert_eq!(metering.due_stops().get(&node), Some(&vec![lease]), "its node is told to end it");
    let summary = metering.settle_now(false).await.unwrap();
    assert_eq!(summary.payers.iter().find(|p| p.payer == "alice").unwrap().shortfall, 0);
    // Paid up: funded again.
    metering.add_credits("alice", 1_000_000).await.unwrap();
    metering.check_funding().await.unwrap();
    assert!(state.unfunded().is_empty());
}

async fn job_with_credit(state: &GcsState, metering: &Metering, payer: &str, micros: u64) -> JobId {
    metering.add_credits(payer, micros).await.unwrap();
    job(state, payer).await
}

#[tokio::test]
async fn the_heads_own_leases_outlive_their_job_and_a_holder_cannot_name_another_node() {
    let f = fixture().await;
    let (node, elsewhere) = (NodeId::random(), NodeId::random());
    f.state.register_checked_node(gpu_node(node, 2, "1.00", "w")).await.unwrap();
    f.state.register_checked_node(gpu_node(elsewhere, 2, "1.00", "v")).await.unwrap();
    let job = job(&f.state, "bob").await;
    f.metering.add_credits("bob", 100_000_000).await.unwrap();
    // A detached actor's lease, held by the head: the job's end does not end it.
    let actor = LeaseId::random();
    f.metering.lease_started(&node_says(actor, node, job, gpus("1"))).await.unwrap();
    f.metering.holder_report(job, &[holder_says(actor, node, true)], true).await.unwrap();
    // A holder that names another node than the grantor's: its word counts for nothing.
    let lying = LeaseId::random();
    f.metering.holder_report(job, &[holder_says(lying, elsewhere, true)], false).await.unwrap();
    f.metering.lease_started(&node_says(lying, node, job, gpus("1"))).await.unwrap();
    f.clock.advance_ms(1_000);
    assert_eq!(f.metering.end_leases_of_job(job).await.unwrap(), 0);
    let usage = f.metering.list_usage(Some(job), None).await.unwrap();
    assert_eq!(usage.len(), 1, "the actor's lease runs on; the other never started: {usage:?}");
    assert_eq!(usage[0].lease_id, actor.to_vec());
    // Holders that leave grants unconfirmed: past a few, their job gets no more leases.
    for _ in 0..MAX_UNCONFIRMED_PER_JOB {
        let grant = LeaseId::random();
        f.metering.lease_started(&node_says(grant, node, job, gpus("0.1"))).await.unwrap();
    }
    f.clock.advance_ms(CONFIRM_WINDOW_MS);
    f.metering.drop_unmatched().await.unwrap();
    f.metering.check_funding().await.unwrap();
    let reason = f.state.unfunded().get(&job).cloned().expect("refused");
    assert!(reason.contains("never confirmed"), "{reason}");
}

struct OneBundle(ResourceSet);

#[tonic::async_trait]
impl HeadHoldings for OneBundle {
    fn bundle_of(&self, _job: &JobId, _node: &NodeId, _group: &[u8], index: u32) -> Option<ResourceSet> {
        (index == 0).then(|| self.0.clone())
    }

    async fn remove_unfunded_group(&self, _group: &[u8], _why: &str) {}
}

#[tokio::test]
async fn a_bundle_is_metered_once_for_what_it_reserves() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 8, "1.00", "w")).await.unwrap();
    let job = job(&f.state, "bob").await;
    f.metering.set_head_holdings(Arc::new(OneBundle(ResourceSet::new().with(GPU, Quantity::whole(2)))));
    let bundle = |lease: LeaseId, count: &str, index: u32| proto::LeaseStartedRequest {
        placement_group_id: vec![7; 18],
        bundle_index: index,
        ..node_says(lease, node, job, gpus(count))
    };
    let err = f.metering.lease_started(&bundle(LeaseId::random(), "8", 0)).await.unwrap_err();
    assert!(err.to_string().contains("reserves"), "more than the bundle reserves: {err}");
    assert!(f.metering.lease_started(&bundle(LeaseId::random(), "2", 1)).await.is_err(), "not the job's bundle");
    f.metering.lease_started(&bundle(LeaseId::random(), "2", 0)).await.unwrap();
    let err = f.metering.lease_started(&bundle(LeaseId::random(), "2", 0)).await.unwrap_err();
    assert!(err.to_string().contains("already metered"), "{err}");
    assert_eq!(f.metering.list_usage(Some(job), None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_lease_bills_no_more_than_its_holder_asked_for() {
    let f = fixture().await;
    let node = NodeId::random();
    f.state.register_checked_node(gpu_node(node, 8, "3.60", "w")).await.unwrap();
    let job = job(&f.state, "bob").await;
    f.metering.add_credits("bob", 100_000_000).await.unwrap();
    let lease = LeaseId::random();
    // The node claims all 8 GPUs; the holder asked for one.
    f.metering.lease_started(&node_says(lease, node, job, gpus("8"))).await.unwrap();
    let asked = proto::HeldLease { resources: gpus("1"), ..holder_says(lease, node, true) };
    f.metering.holder_report(job, &[asked], false).await.unwrap();
    f.clock.advance_ms(10_000);
    let record = f.metering.lease_ended_by(lease.as_bytes(), 0, Some(node)).await.unwrap().unwrap();
    let billed = record.resources.unwrap().to_set().unwrap();
    assert_eq!(billed.get(GPU), Quantity::whole(1));
    assert_eq!(record.cost_micros, 10_000, "10 s of one GPU at $3.60/h");
}

#[tokio::test]
async fn availability_rewards_go_only_to_real_gpus_that_passed_their_check_and_did_not_fail_in_the_epoch() {
    let clock = ManualClock::new(START);
    let config = ClusterConfig {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 10 * 3_600_000,
        reward_pool_per_hour_micros: 1_000_000,
        ..Default::default()
    };
    let state = GcsState::open(config, Arc::new(MemoryStorage::new()), Arc::new(clock.clone())).await.unwrap();
    let metering = Metering::open(state.clone(), MeteringOptions::default()).await.unwrap();
    let [honest, cheat, simulated, unchecked, distrusted] = [(); 5].map(|_| NodeId::random());
    state.register_checked_node(gpu_node(honest, 4, "1", "honest")).await.unwrap();
    state.register_checked_node(gpu_node(cheat, 4, "1", "cheat")).await.unwrap();
    state.register_checked_node(gpu_node(distrusted, 4, "1", "distrusted")).await.unwrap();
    let mut declared = gpu_node(simulated, 4, "1", "simulated");
    declared.gpus = (0..4)
        .map(|index| ionet_common::rpc::proto::common::GpuInfo {
            index,
            model: "A100-80GB".into(),
            memory_bytes: 80 << 30,
            simulated: true,
        })
        .collect();
    state.register_checked_node(declared).await.unwrap();
    state.register_node(gpu_node(unchecked, 4, "1", "unchecked")).await.unwrap();
    // Half an hour in, the cheat fails a check (and passes the next one at once).
    clock.advance_ms(1_800_000);
    state.record_gpu_check(&cheat, Err("GPU 1: row 3 of the product is wrong".into())).await.unwrap();
    state.record_gpu_check(&cheat, Ok((1.0, 1.0, 1))).await.unwrap();
    // Another fails three (untrusted until the operator clears it), then passes.
    for _ in 0..3 {
        state.record_gpu_check(&distrusted, Err("GPU 0: memory chunk 9 does not hold the fill".into())).await.unwrap();
    }
    state.record_gpu_check(&distrusted, Ok((1.0, 1.0, 1))).await.unwrap();
    clock.advance_ms(1_800_000);

    let summary = metering.settle_at(START + 3_600_000, false).await.unwrap();
    let reward = |wallet: &str| summary.providers.iter().find(|p| p.wallet == wallet).map_or(0, |p| p.reward);
    assert!(reward("honest") > 0, "{summary:?}");
    assert_eq!(reward("honest"), summary.total_rewards, "the only node earning takes the whole pool");
    for wallet in ["cheat", "simulated", "unchecked", "distrusted"] {
        assert_eq!(reward(wallet), 0, "{wallet} earns no availability reward: {summary:?}");
    }
    // Each provider's earnings say why.
    let mut withheld = std::collections::HashMap::new();
    for wallet in ["honest", "cheat", "simulated", "unchecked", "distrusted"] {
        let (earnings, _) = metering.earnings(wallet).await.unwrap();
        withheld.insert(wallet, earnings[0].1.join("; "));
    }
    assert_eq!(withheld["honest"], "");
    assert!(withheld["cheat"].contains("it failed a GPU check this epoch: GPU 1: row 3 of the product is wrong"));
    assert!(withheld["cheat"].starts_with(&format!("node {}: ", cheat.short())), "{withheld:?}");
    assert!(withheld["simulated"].contains("its GPUs are simulated"));
    assert!(withheld["unchecked"].contains("have not passed the head's check"));
    assert!(withheld["distrusted"].contains("untrusted after repeated failed checks (3 on record)"), "{withheld:?}");
    // The next epoch, the cheat's passing time counts again; the simulated node's never.
    clock.advance_ms(3_600_000);
    let next = metering.settle_at(START + 7_200_000, false).await.unwrap();
    let reward = |wallet: &str| next.providers.iter().find(|p| p.wallet == wallet).map_or(0, |p| p.reward);
    assert!(reward("cheat") > 0 && reward("honest") > 0, "{next:?}");
    assert_eq!(reward("simulated"), 0);
    assert_eq!(reward("distrusted"), 0, "untrusted, it earns nothing however its checks go");
    // Cleared half-way through the next epoch: it earns for the half since, not before.
    clock.advance_ms(1_800_000);
    state.clear_untrusted(&distrusted).await.unwrap();
    clock.advance_ms(1_800_000);
    let third = metering.settle_at(START + 3 * 3_600_000, false).await.unwrap();
    let reward = |wallet: &str| third.providers.iter().find(|p| p.wallet == wallet).map_or(0, |p| p.reward);
    assert!(reward("distrusted") > 0, "{third:?}");
    assert!(reward("distrusted").abs_diff(reward("honest") / 2) <= 1, "{third:?}");
}

#[tokio::test]
async fn a_job_pays_for_no_lease_on_a_node_below_its_minimum_reliability() {
    let f = fixture().await;
    let (flaky, steady) = (NodeId::random(), NodeId::random());
    f.state.register_checked_node(gpu_node(flaky, 1, "1", "flaky")).await.unwrap();
    f.state.register_checked_node(gpu_node(steady, 1, "1", "steady")).await.unwrap();
    // Two checks passed, one failed: (2 + 1) / (3 + 2) = 0.60; the other passed one: 0.67.
    f.state.record_gpu_check(&flaky, Err("GPU 0: row 1 of the product is wrong".into())).await.unwrap();
    f.state.record_gpu_check(&flaky, Ok((1.0, 1.0, 1))).await.unwrap();
    let strict = f.state.add_job(JobInfo { min_reliability_bps: 6_500, ..Default::default() }).await.unwrap();
    let strict = JobId::from_bytes(&strict.job_id).unwrap();
    let refused = f.metering.lease_started(&node_says(LeaseId::random(), flaky, strict, gpus("1"))).await.unwrap_err();
    assert!(refused.to_string().contains("scores 0.60 for reliability, below job"), "{refused}");
    assert!(refused.to_string().contains("minimum of 0.65"), "{refused}");
    f.metering.lease_started(&node_says(LeaseId::random(), steady, strict, gpus("1"))).await.expect("a reliable node");
    let any = job(&f.state, "").await;
    f.metering.lease_started(&node_says(LeaseId::random(), flaky, any, gpus("1"))).await.expect("no minimum");
}

/// The head keeps at most `max_dead_nodes` dead rows. Once an epoch covering their deaths
/// has closed, the longest dead with no lease open are forgotten, in memory and in the
/// database file; what they leave is their trust record, so one that registers again,
/// after a restart too, gets back its first registration, the time it was gone, its
/// untrusted GPU check, and its key binding (nobody else takes the id meanwhile).
#[tokio::test]
async fn the_longest_dead_nodes_are_forgotten_once_settled_and_their_records_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gcs.redb");
    let config = ClusterConfig { max_dead_nodes: 2, gpu_check_untrusted_failures: 1, ..Default::default() };
    let clock = ManualClock::new(START);
    let f =
        fixture_with(config.clone(), Arc::new(crate::storage::RedbStorage::open(&path).unwrap()), clock.clone()).await;
    let with_key = |node: NodeId, key: u8| NodeInfo {
        public_key: vec![key; 32],
        accelerator_type: "A100-80GB".into(),
        ..gpu_node(node, 1, "1", "w")
    };
    // Dying in this order: `busy` first (a lease stays open on it), then `untrusted`
    // (it failed a GPU check), then the others; `alive` stays.
    let nodes: Vec<NodeId> = (0..6).map(|_| NodeId::random()).collect();
    let [busy, untrusted, second, third, last, alive] = nodes[..] else { unreachable!() };
    for node in &nodes {
        f.state.register_checked_node(with_key(*node, 1)).await.unwrap();
    }
    f.state.record_gpu_check(&untrusted, Err("wrong answers".into())).await.unwrap();
    let job = job(&f.state, "").await;
    start_both(&f.metering, LeaseId::random(), busy, job, gpus("1")).await.unwrap();
    // `second` ran a lease to its end: its bill names its GPUs after it is forgotten.
    let ended = LeaseId::random();
    start_both(&f.metering, ended, second, job, gpus("1")).await.unwrap();
    f.metering.lease_ended(ended.as_bytes()).await.unwrap();
    for node in [untrusted, second, third, last] {
        f.clock.advance_ms(100);
        f.state.heartbeat(node.as_bytes(), None).unwrap();
    }
    f.clock.advance_ms(1_500);
    f.state.heartbeat(alive.as_bytes(), None).unwrap();
    assert_eq!(f.state.check_heartbeats().await.unwrap().len(), 5);
    let dead_ids = |state: &GcsState| {
        let mut ids: Vec<Vec<u8>> = state
            .nodes(true)
            .into_iter()
            .filter(|node| node.state == NodeState::Dead as i32)
            .map(|node| node.node_id)
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut ids: Vec<Vec<u8>>| {
        ids.sort();
        ids
    };

    // An epoch ending before `second` died covers the deaths of `busy` and `untrusted`
    // alone, and `busy` has a lease open: only `untrusted` goes.
    f.metering.settle_at(START + 150, false).await.unwrap();
    assert!(f.state.node(&untrusted).is_none(), "forgotten");
    assert_eq!(dead_ids(&f.state), sorted(vec![busy.to_vec(), second.to_vec(), third.to_vec(), last.to_vec()]));
    // The next epoch covers them all: the longest dead past two go, but for `busy`.
    f.metering.settle_now(false).await.unwrap();
    assert_eq!(dead_ids(&f.state), sorted(vec![busy.to_vec(), last.to_vec()]));
    assert_eq!(f.state.nodes(false).len(), 1, "the living are never forgotten");
    let stored = |table| f.storage.scan_prefix(table, b"").unwrap().into_iter().map(|(key, _)| key).collect::<Vec<_>>();
    assert_eq!(sorted(stored(Table::Nodes)), sorted(vec![busy.to_vec(), last.to_vec(), alive.to_vec()]));
    assert_eq!(
        sorted(stored(Table::ForgottenNodes)),
        sorted(vec![untrusted.to_vec(), second.to_vec(), third.to_vec()])
    );
    let bill = f.metering.job_cost(job).await.unwrap();
    let line = bill.lines.iter().find(|line| line.lease_id == ended.to_vec()).unwrap();
    assert_eq!((line.node_id.clone(), line.gpu_model.as_str()), (second.to_vec(), "A100-80GB"));
    // Its id stays bound to its key.
    let err = f.state.register_node(with_key(second, 2)).await.unwrap_err();
    assert!(err.to_string().contains("bound to another key"), "{err}");
    assert!(f.state.node(&second).is_none(), "refused, and still forgotten");
    // Leases its death ended, counted once it is forgotten (metering ends them, then
    // counts them), count against its record all the same.
    f.state.note_leases_lost(&third, 2).await.unwrap();
    let died_at = START + 100;
    drop(f);

    // A head restarted on the file: the forgotten stay forgotten until they register.
    let g = fixture_with(config, Arc::new(crate::storage::RedbStorage::open(&path).unwrap()), clock).await;
    assert_eq!(dead_ids(&g.state), sorted(vec![busy.to_vec(), last.to_vec()]));
    g.clock.advance_ms(60_000);
    g.state.register_node(with_key(untrusted, 1)).await.unwrap();
    let back = g.state.node(&untrusted).unwrap();
    assert_eq!(back.registered_at_ms, START, "its first registration");
    assert_eq!(back.reliability.unwrap().down_ms, g.state.now_ms() - died_at, "gone since its death");
    let check = back.gpu_check.unwrap();
    assert!(check.untrusted_since_ms != 0 && check.failures == 1, "its failed check is not washed away: {check:?}");
    assert!(ionet_common::gpu_proof::held_back(&g.state.node(&untrusted).unwrap()));
    assert!(g.storage.get(Table::ForgottenNodes, untrusted.as_bytes()).unwrap().is_none(), "a row again, not a record");
    assert!(g.storage.get(Table::Nodes, untrusted.as_bytes()).unwrap().is_some());
    let err = g.state.register_node(with_key(third, 2)).await.unwrap_err();
    assert!(err.to_string().contains("bound to another key"), "after a restart too: {err}");
    g.state.register_node(with_key(third, 1)).await.unwrap();
    assert_eq!(g.state.node(&third).unwrap().reliability.unwrap().leases_lost, 2);
}
