use std::sync::Arc;

use ionet_common::clock::ManualClock;
use ionet_common::config::ClusterConfig;
use ionet_common::resources::{Quantity, CPU};
use ionet_common::rpc::proto::common::NodeInfo;

use super::*;
use crate::storage::MemoryStorage;

/// The job creating the groups under test.
const JOB: [u8; 4] = [0, 0, 0, 7];

/// Nodes that keep their reservations in memory; the node at `refusing` refuses.
#[derive(Default)]
struct FakeNodes {
    refusing: Mutex<HashSet<String>>,
    reserved: Mutex<HashMap<(String, PlacementGroupId, u32), bool>>,
    /// Commits never answer (a head that dies in the middle of a reservation).
    hang_commits: std::sync::atomic::AtomicBool,
}

#[tonic::async_trait]
impl BundleAgent for FakeNodes {
    async fn prepare(
        &self,
        address: &str,
        group: PlacementGroupId,
        index: u32,
        _job_id: &[u8],
        _resources: &ResourceSet,
    ) -> IonetResult<()> {
        if self.refusing.lock().unwrap().contains(address) {
            return Err(IonetError::ResourceExhausted(format!("{address} has no room")));
        }
        self.reserved.lock().unwrap().insert((address.to_string(), group, index), false);
        Ok(())
    }
    async fn commit(&self, address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()> {
        if self.hang_commits.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.reserved.lock().unwrap().insert((address.to_string(), group, index), true);
        Ok(())
    }
    async fn cancel(&self, address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()> {
        self.reserved.lock().unwrap().remove(&(address.to_string(), group, index));
        Ok(())
    }
}

async fn cluster_of(nodes: usize) -> Arc<GcsState> {
    let state = GcsState::open(ClusterConfig::default(), Arc::new(MemoryStorage::new()), Arc::new(ManualClock::new(0)))
        .await
        .unwrap();
    for index in 0..nodes {
        let cpus = ResourceSet::new().with(CPU, Quantity::whole(2));
        let node = NodeInfo {
            node_id: NodeId::random().to_vec(),
            address: format!("node-{index}:1"),
            total: Some((&cpus).into()),
            available: Some((&cpus).into()),
            ..Default::default()
        };
        state.register_checked_node(node).await.unwrap();
    }
    state
}

fn cpu_bundles(count: usize) -> Vec<ResourceSet> {
    (0..count).map(|_| ResourceSet::new().with(CPU, Quantity::whole(1))).collect()
}

#[tokio::test]
async fn a_refused_prepare_leaves_no_reservation_and_the_group_pending() {
    let state = cluster_of(3).await;
    let nodes = Arc::new(FakeNodes::default());
    nodes.refusing.lock().unwrap().insert("node-2:1".into());
    let groups = PlacementGroups::new(state, nodes.clone());
    let id =
        groups.create(cpu_bundles(3), PlacementStrategy::StrictSpread, "spread".into(), JOB.to_vec()).await.unwrap();
    let unbilled = groups.create(cpu_bundles(1), PlacementStrategy::Pack, String::new(), Vec::new()).await.unwrap_err();
    assert!(unbilled.to_string().contains("billed to that job"), "{unbilled}");
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Pending));
    assert!(nodes.reserved.lock().unwrap().is_empty(), "a failed prepare left reservations behind");
    assert!(groups.get(&id).unwrap().pending_reason.contains("refused"), "{:?}", groups.get(&id).unwrap());

    // Once the node has room the next pass places and commits every bundle.
    nodes.refusing.lock().unwrap().clear();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Created));
    let reserved = nodes.reserved.lock().unwrap().clone();
    assert_eq!(reserved.len(), 3);
    assert!(reserved.values().all(|committed| *committed));
    let distinct: HashSet<&String> = reserved.keys().map(|(address, ..)| address).collect();
    assert_eq!(distinct.len(), 3, "strict spread uses three nodes");

    tokio::time::timeout(Duration::from_secs(10), groups.remove(&id)).await.unwrap().unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Removed));
    assert!(nodes.reserved.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_group_on_a_dead_node_is_released_and_placed_again() {
    let state = cluster_of(4).await;
    let nodes = Arc::new(FakeNodes::default());
    let groups = PlacementGroups::new(state.clone(), nodes.clone());
    let id = groups.create(cpu_bundles(3), PlacementStrategy::StrictSpread, String::new(), JOB.to_vec()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    let placed = groups.get(&id).unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Created));

    state.drain_node(&placed.bundle_node_ids[0], "gone", true).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    let replaced = groups.get(&id).unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Created));
    assert!(!replaced.bundle_node_ids.contains(&placed.bundle_node_ids[0]), "the dead node holds no bundle");
    let reserved = nodes.reserved.lock().unwrap().clone();
    assert_eq!(reserved.len(), 3, "the old reservations were cancelled: {reserved:?}");
    assert!(!reserved.keys().any(|(address, ..)| *address == placed.bundle_node_addresses[0]));
}

#[tokio::test]
async fn a_group_that_cannot_fit_stays_pending_without_reserving() {
    let state = cluster_of(3).await;
    let nodes = Arc::new(FakeNodes::default());
    let groups = PlacementGroups::new(state, nodes.clone());
    let id = groups.create(cpu_bundles(4), PlacementStrategy::StrictSpread, String::new(), JOB.to_vec()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Pending));
    assert!(nodes.reserved.lock().unwrap().is_empty());
}

/// A payer whose credit runs out loses its placement groups: bundles are not stopped
/// lease by lease, so the head removes the group (its reservations are cancelled on the
/// node, which ends the bundle's lease) and says why.
#[tokio::test]
async fn a_payer_out_of_credit_loses_its_placement_groups() {
    use crate::metering::{Metering, MeteringOptions};
    use ionet_common::resources::{parse_usd, GPU};
    use ionet_common::rpc::proto::common::JobInfo;
    use ionet_common::rpc::proto::metering::LeaseStartedRequest;
    use ionet_common::LeaseId;

    let clock = ManualClock::new(1_700_000_000_000);
    let state = GcsState::open(ClusterConfig::default(), Arc::new(MemoryStorage::new()), Arc::new(clock.clone()))
        .await
        .unwrap();
    let node = NodeId::random();
    let total = ResourceSet::new().with(CPU, Quantity::whole(4)).with(GPU, Quantity::whole(1));
    let gpu_node = NodeInfo {
        node_id: node.to_vec(),
        address: "gpu-node:1".into(),
        total: Some((&total).into()),
        available: Some((&total).into()),
        price_per_gpu_hour_micros: parse_usd("3.60").unwrap(),
        wallet: "provider".into(),
        ..Default::default()
    };
    state.register_checked_node(gpu_node).await.unwrap();
    let job = state.add_job(JobInfo { payer_account: "frugal".into(), ..Default::default() }).await.unwrap().job_id;
    let metering = Metering::open(state.clone(), MeteringOptions::default()).await.unwrap();
    let nodes = Arc::new(FakeNodes::default());
    let groups = PlacementGroups::new(state.clone(), nodes.clone());
    metering.set_head_holdings(groups.clone());
    // $1 of credit: under 1,000 s of one GPU at $3.60/h.
    metering.add_credits("frugal", 1_000_000).await.unwrap();
    let bundle = vec![ResourceSet::new().with(GPU, Quantity::whole(1))];
    let id = groups.create(bundle, PlacementStrategy::Pack, "trainer".into(), job.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Created));
    let gpu = ResourceSet::new().with(GPU, Quantity::whole(1));
    let lease = LeaseStartedRequest {
        lease_id: LeaseId::random().to_vec(),
        node_id: node.to_vec(),
        job_id: job.clone(),
        resources: Some((&gpu).into()),
        placement_group_id: id.to_vec(),
        bundle_index: 0,
        age_ms: 0,
    };
    metering.lease_started(&lease).await.unwrap();

    clock.advance_ms(60_000);
    metering.check_funding().await.unwrap();
    assert_eq!(groups.state_of(&id), Some(PlacementGroupState::Created), "still funded after a minute");

    clock.advance_ms(3_600_000);
    metering.check_funding().await.unwrap();
    // Removed in the background (it waits on the group's nodes).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while groups.state_of(&id) != Some(PlacementGroupState::Removed) {
        assert!(std::time::Instant::now() < deadline, "the unfunded group was never removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(nodes.reserved.lock().unwrap().is_empty(), "the node's reservation is cancelled");
    let reason = groups.get(&id).unwrap().pending_reason;
    assert!(reason.starts_with("removed: account \"frugal\" cannot cover its leases"), "{reason}");
}

/// A head restarted from its storage keeps its groups: a created one stays where it is
/// (and the head still vouches for its bundles), and one whose reservation the head's
/// death cut short is cancelled on the nodes that prepared it and reserved afresh.
#[tokio::test]
async fn a_restarted_head_keeps_its_groups_and_redoes_a_reservation_cut_short() {
    let state = cluster_of(3).await;
    let nodes = Arc::new(FakeNodes::default());
    let groups = PlacementGroups::new(state.clone(), nodes.clone());
    let placed =
        groups.create(cpu_bundles(2), PlacementStrategy::StrictSpread, "kept".into(), JOB.to_vec()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&placed), Some(PlacementGroupState::Created));
    let placed_row = groups.get(&placed).unwrap();

    // The next group's reservation is cut short after its bundles were prepared.
    nodes.hang_commits.store(true, std::sync::atomic::Ordering::SeqCst);
    let cut = groups.create(cpu_bundles(1), PlacementStrategy::Pack, "cut".into(), JOB.to_vec()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(300), groups.place_pending()).await.is_err());
    drop(groups);
    nodes.hang_commits.store(false, std::sync::atomic::Ordering::SeqCst);
    let prepared: Vec<_> =
        nodes.reserved.lock().unwrap().keys().filter(|(_, group, _)| *group == cut).cloned().collect();
    assert_eq!(prepared.len(), 1, "the cut reservation left its bundle prepared");

    // The head comes back on the same storage; the node daemons kept what they held.
    let restarted = PlacementGroups::new(state.clone(), nodes.clone());
    assert_eq!(restarted.restore().await.unwrap(), 2);
    assert_eq!(restarted.get(&placed).unwrap(), placed_row, "a created group stays where it was");
    let node = NodeId::from_bytes(&placed_row.bundle_node_ids[0]).unwrap();
    let job = JobId::from_bytes(&JOB).unwrap();
    use crate::metering::HeadHoldings;
    assert!(restarted.bundle_of(&job, &node, placed.as_bytes(), 0).is_some(), "the head still vouches for its bundles");
    assert_eq!(restarted.state_of(&cut), Some(PlacementGroupState::Pending));
    tokio::time::timeout(Duration::from_secs(10), restarted.place_pending()).await.unwrap();
    assert_eq!(restarted.state_of(&cut), Some(PlacementGroupState::Created));
    let reserved = nodes.reserved.lock().unwrap().clone();
    assert_eq!(reserved.len(), 3, "one reservation per bundle, none left over: {reserved:?}");
    assert!(reserved.values().all(|committed| *committed));
    // A new group is placed after the restored ones.
    let later = restarted.create(cpu_bundles(1), PlacementStrategy::Pack, String::new(), JOB.to_vec()).await.unwrap();
    let sequence = |id: &PlacementGroupId| restarted.lock().get(id).unwrap().sequence;
    assert!(sequence(&later) > sequence(&cut));
}

/// A job that runs only on reliable nodes has its groups placed only on them.
#[tokio::test]
async fn a_jobs_groups_go_only_to_nodes_as_reliable_as_it_asks() {
    let state = cluster_of(3).await;
    let flaky = state.nodes(false).into_iter().find(|node| node.address == "node-0:1").unwrap();
    let flaky = NodeId::from_bytes(&flaky.node_id).unwrap();
    // Passing again after a failure: (2 + 1) / (3 + 2) = 0.60; the others passed once: 0.67.
    state.record_gpu_check(&flaky, Err("GPU 0: answered late".into())).await.unwrap();
    state.record_gpu_check(&flaky, Ok((1.0, 1.0, 1))).await.unwrap();
    let job = state
        .add_job(ionet_common::rpc::proto::common::JobInfo { min_reliability_bps: 6_500, ..Default::default() })
        .await
        .unwrap();
    let nodes = Arc::new(FakeNodes::default());
    let groups = PlacementGroups::new(state, nodes.clone());
    let two = groups.create(cpu_bundles(2), PlacementStrategy::StrictSpread, String::new(), job.job_id.clone()).await;
    let two = two.unwrap();
    let three = groups.create(cpu_bundles(3), PlacementStrategy::StrictSpread, String::new(), job.job_id).await;
    let three = three.unwrap();
    tokio::time::timeout(Duration::from_secs(10), groups.place_pending()).await.unwrap();
    assert_eq!(groups.state_of(&two), Some(PlacementGroupState::Created));
    let placed = groups.get(&two).unwrap();
    assert!(!placed.bundle_node_addresses.contains(&"node-0:1".to_string()), "{placed:?}");
    assert_eq!(groups.state_of(&three), Some(PlacementGroupState::Pending), "three reliable nodes there are not");
    let why = groups.get(&three).unwrap().pending_reason;
    assert!(why.contains("its job runs only on nodes of reliability >= 0.65"), "{why}");
}
