//! The lease side's own tests: lending blocked CPUs, idle grace, deepest first, requesters
//! that go away.

use ionet_common::resources::CPU;

use super::process::EXCESS_IDLE_GRACE;
use super::state::{Doing, Process};
use super::*;

fn leases(cpus: i64) -> Leases {
    let options = WorkerPoolOptions {
        idle_timeout: Duration::from_secs(1),
        max_idle_workers: 1,
        log_dir: None,
        max_blocked_workers: 2,
    };
    let total = ResourceSet::new().with(CPU, Quantity::whole(cpus));
    Leases::new(NodeId::random(), "127.0.0.1:1".into(), total, Vec::new(), options)
}

#[test]
fn bundles_are_held_apart_from_the_general_pool() {
    let leases = leases(2);
    let group = PlacementGroupId::random();
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    leases.prepare_bundle(group.as_bytes(), 0, &[], one.clone()).unwrap();
    assert_eq!(leases.available(), one, "the bundle's CPU left the general pool");
    // Preparing again is a no-op; a bundle beyond what is free is refused untouched.
    leases.prepare_bundle(group.as_bytes(), 0, &[], one.clone()).unwrap();
    let two = ResourceSet::new().with(CPU, Quantity::whole(2));
    assert!(matches!(
        leases.prepare_bundle(group.as_bytes(), 1, &[], two.clone()),
        Err(IonetError::ResourceExhausted(_))
    ));
    assert_eq!((leases.available(), leases.bundle_count()), (one.clone(), 1));

    // Uncommitted: a lease naming it waits; committed: granted from the bundle only.
    let key = (group, 0);
    assert!(matches!(leases.decide_bundle(&key, &one), Step::Wait(_)));
    leases.commit_bundle(group.as_bytes(), 0).unwrap();
    let Step::Grant(resources, gpus) = leases.decide_bundle(&key, &one) else { panic!("expected a grant") };
    assert_eq!(leases.available(), one, "the general pool is untouched by the bundle's lease");
    assert!(matches!(leases.decide_bundle(&key, &one), Step::Wait(_)), "the bundle is full");
    assert!(matches!(leases.decide_bundle(&(group, 7), &one), Step::Infeasible(_)));

    // Cancelled while the lease runs: the free part comes back now, the lease's on return.
    assert!(leases.cancel_bundle(group.as_bytes(), 0).unwrap());
    assert_eq!(leases.available(), one);
    leases.give_back(&resources, gpus.as_ref(), Some(&key));
    assert_eq!(leases.available(), two);
    assert!(!leases.cancel_bundle(group.as_bytes(), 0).unwrap(), "cancelling twice is harmless");
}

/// Puts a lease of one CPU on a fresh worker, as a grant would.
fn lease_one_cpu(leases: &Leases) -> (WorkerId, LeaseId) {
    let (worker, lease_id) = (WorkerId::random(), LeaseId::random());
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    let mut state = leases.lock();
    state.available.try_subtract(&one).unwrap();
    let granted = Granted {
        resources: one,
        gpus: None,
        worker,
        bundle: None,
        pool: None,
        holder: String::new(),
        blocked: false,
        released: Quantity::ZERO,
    };
    let key = PoolKey { job_id: Vec::new(), argv: Vec::new(), gpu_ids: Vec::new(), runtime_env: String::new() };
    state
        .processes
        .insert(worker, Process { pid: 0, key, address: String::new(), doing: Doing::Starting, holding: false });
    assert!(state.record_lease(lease_id, granted));
    state.check().unwrap();
    (worker, lease_id)
}

fn cpus(leases: &Leases) -> i64 {
    leases.lock().available.get(CPU).units() / Quantity::whole(1).units()
}

#[test]
fn blocked_workers_lend_their_cpus_up_to_the_cap() {
    let leases = leases(4); // the cap of released blocked workers is 2
    let (x, _) = lease_one_cpu(&leases); // runs without blocking until the end
    let (a, lease_a) = lease_one_cpu(&leases);
    let (b, _) = lease_one_cpu(&leases);
    let (c, _) = lease_one_cpu(&leases);
    assert_eq!(cpus(&leases), 0);
    leases.set_worker_blocked(a.as_bytes(), true).unwrap();
    leases.set_worker_blocked(a.as_bytes(), true).unwrap(); // said twice: counted once
    leases.set_worker_blocked(b.as_bytes(), true).unwrap();
    assert_eq!(cpus(&leases), 2, "two blocked workers lend their CPUs");
    leases.set_worker_blocked(c.as_bytes(), true).unwrap();
    assert_eq!(cpus(&leases), 2, "past the cap a blocked worker keeps its CPU");

    // Both lent CPUs are taken by new leases; the first worker resumes: it takes its
    // CPU back past what is free, which is reported as none free.
    let (d, _) = lease_one_cpu(&leases);
    let (_, lease_e) = lease_one_cpu(&leases);
    assert_eq!(cpus(&leases), 0);
    leases.set_worker_blocked(a.as_bytes(), false).unwrap();
    assert_eq!(cpus(&leases), 0, "under the cap again, the third lends its CPU: -1 + 1");
    leases.set_worker_blocked(b.as_bytes(), false).unwrap();
    assert_eq!(cpus(&leases), -1, "the second takes its CPU back past what is free");
    assert_eq!(leases.available().get(CPU), Quantity::ZERO, "reported clamped");

    // Leases end: each gives back what it holds, exactly once.
    leases.end_lease(lease_a, false).unwrap();
    leases.end_lease(lease_e, false).unwrap();
    assert_eq!(cpus(&leases), 1);
    leases.set_worker_blocked(d.as_bytes(), true).unwrap();
    assert_eq!(cpus(&leases), 2, "one lent (c), so d may lend too");

    // Past the cap, a blocked worker keeps its CPU while another runs; once every
    // holder of CPUs is blocked, nothing could run, so the last to block lends anyway.
    leases.set_worker_blocked(x.as_bytes(), true).unwrap();
    assert_eq!(cpus(&leases), 2, "b still runs: x keeps its CPU");
    leases.set_worker_blocked(b.as_bytes(), true).unwrap();
    assert_eq!(cpus(&leases), 3, "every holder blocked: b lends past the cap");

    assert!(matches!(leases.set_worker_blocked(WorkerId::random().as_bytes(), true), Err(IonetError::NotFound(_))));
    for worker in [b, c, d, x] {
        let Some(Doing::Leased(lease_id)) = leases.lock().processes.get(&worker).map(|process| process.doing) else {
            panic!("worker {} holds no lease", worker.short())
        };
        leases.end_lease(lease_id, false).unwrap();
    }
    assert_eq!(cpus(&leases), 4, "available = total once every lease has ended");
    assert_eq!(leases.lock().released_leases, 0);
    leases.lock().check().unwrap();
}

#[test]
fn idle_workers_past_the_soft_limit_get_a_grace() {
    let leases = leases(2); // keeps 1 idle worker; idle timeout 1 s
    let mut children: Vec<std::process::Child> =
        (0..3).map(|_| std::process::Command::new("sleep").arg("60").spawn().unwrap()).collect();
    let now = Instant::now();
    let idle = |child: &std::process::Child, since: Instant| {
        let key = PoolKey { job_id: Vec::new(), argv: Vec::new(), gpu_ids: Vec::new(), runtime_env: String::new() };
        (
            WorkerId::random(),
            Process { pid: child.id(), key, address: String::new(), doing: Doing::Idle { since }, holding: false },
        )
    };
    {
        let mut state = leases.lock();
        state.processes.extend([
            idle(&children[0], now),
            idle(&children[1], now), // past the limit, idle just now: kept
            idle(&children[2], now - EXCESS_IDLE_GRACE * 2), // past it, idle long: stopped
        ]);
    }
    leases.reap_idle();
    assert_eq!(leases.lock().idle_count(), 2);
    let ended = |child: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    assert!(ended(&mut children[2]), "the long-idle excess worker was stopped");
    assert!(children[0].try_wait().unwrap().is_none() && children[1].try_wait().unwrap().is_none());
    for child in &mut children[..2] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn deeper_waiting_requests_go_first() {
    let leases = leases(1);
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    let strategy = SchedulingStrategy::Default;
    // A request at depth 3 waits here (ticket 7); one CPU comes free.
    leases.lock().waiters.insert(7, (3, one.clone()));
    assert!(
        matches!(leases.decide(&one, &strategy, &Needs::default(), true, None, 1, &[]), Step::Wait(_)),
        "a shallower request took the CPU a deeper one waits for"
    );
    assert!(matches!(leases.decide(&one, &strategy, &Needs::default(), true, Some(7), 3, &[]), Step::Grant(..)));
    // With room for both, nobody waits.
    let leases = leases_with(2);
    leases.lock().waiters.insert(7, (3, one.clone()));
    assert!(matches!(leases.decide(&one, &strategy, &Needs::default(), true, None, 1, &[]), Step::Grant(..)));
}

/// A lease request whose caller goes away while its worker starts (the caller's
/// process killed, its call dropped) leaves the node's resources as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_that_goes_away_strands_nothing() {
    let leases = Arc::new(leases(1));
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    // A worker that never registers and exits after a moment.
    let command = WorkerCommand { argv: vec!["sleep".into(), "1".into()], ..Default::default() };
    leases.declare_job_command(JobId::from_sequence(1), command);
    let request = RequestWorkerLeaseRequest {
        job_id: JobId::from_sequence(1).to_vec(),
        resources: Some((&one).into()),
        no_spillback: true,
        ..Default::default()
    };
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        leases.request(request, ionet_common::auth::Bearer::new("job").unwrap(), "default".into()),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still starting its worker");
    assert_eq!(cpus(&leases), 0, "the starting worker's CPU is taken");
    let deadline = Instant::now() + Duration::from_secs(30);
    while cpus(&leases) != 1 {
        assert!(Instant::now() < deadline, "the abandoned request's CPU never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(leases.lock().leases.is_empty());
}

fn leases_with(cpus: i64) -> Leases {
    leases(cpus)
}

/// A draining node sends a request away: never to a node its requester could not reach,
/// only to the pinned node under a hard affinity, and nowhere when pinned to itself.
#[test]
fn a_draining_node_sends_requests_only_where_they_may_go() {
    let leases = leases(2);
    let (b, c) = (NodeId::random(), NodeId::random());
    let two = ResourceSet::new().with(CPU, Quantity::whole(2));
    let nodes: Vec<NodeInfo> = [(b, "b:1"), (c, "c:1")]
        .into_iter()
        .map(|(id, address)| NodeInfo {
            node_id: id.to_vec(),
            address: address.into(),
            total: Some((&two).into()),
            available: Some((&two).into()),
            state: ionet_common::rpc::proto::common::NodeState::Alive as i32,
            ..Default::default()
        })
        .collect();
    leases.refresh_view(&nodes);
    leases.start_draining();
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    let any = SchedulingStrategy::Default;
    let target = |strategy: &SchedulingStrategy, avoid: &[NodeId]| {
        leases.elsewhere(&one, strategy, &Default::default(), avoid).map(|(node, _)| node)
    };
    assert!(target(&any, &[]).is_some_and(|node| node == b || node == c));
    assert_eq!(target(&any, &[b]), Some(c), "not where its requester could not reach");
    assert_eq!(target(&any, &[b, c]), None, "nowhere left: it asks again later");
    let on_b = SchedulingStrategy::NodeAffinity { node_id: b, soft: false };
    assert_eq!(target(&on_b, &[]), Some(b));
    assert_eq!(target(&on_b, &[b]), None, "pinned to a node it cannot reach");
    let here = SchedulingStrategy::NodeAffinity { node_id: leases.node_id, soft: false };
    assert_eq!(target(&here, &[]), None, "pinned to the leaving node");
}

/// A job's least reliability: a node that scores below it sends the job's requests to one
/// that does, and when none does, the request is infeasible and says why.
#[test]
fn a_job_that_asks_for_reliable_nodes_is_placed_only_on_them() {
    let leases = leases(2);
    let other = NodeId::random();
    let two = ResourceSet::new().with(CPU, Quantity::whole(2));
    let node = |id: NodeId, address: &str, down_ms: u64| NodeInfo {
        node_id: id.to_vec(),
        address: address.into(),
        total: Some((&two).into()),
        available: Some((&two).into()),
        state: ionet_common::rpc::proto::common::NodeState::Alive as i32,
        registered_at_ms: 1_000,
        last_heartbeat_ms: 11_000,
        reliability: Some(ionet_common::rpc::proto::common::NodeReliability { down_ms, ..Default::default() }),
        ..Default::default()
    };
    // This node was gone half its life (0.50); the other never (1.00).
    leases.refresh_view(&[node(leases.node_id, "self:1", 5_000), node(other, "other:1", 0)]);
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    let any = SchedulingStrategy::Default;
    let strict = Needs { min_reliability_bps: 9_000, ..Default::default() };
    assert!(
        matches!(leases.decide(&one, &any, &strict, false, None, 1, &[]), Step::Spill(node, _) if node == other),
        "sent on to the reliable node"
    );
    // Idle here (below the hybrid threshold): kept here when this node is good enough.
    let lenient = Needs { min_reliability_bps: 5_000, ..Default::default() };
    assert!(matches!(leases.decide(&one, &any, &lenient, false, None, 1, &[]), Step::Grant(..)));

    leases.refresh_view(&[node(leases.node_id, "self:1", 5_000)]);
    match leases.decide(&one, &any, &strict, false, None, 1, &[]) {
        Step::Infeasible(why) => {
            assert!(why.contains("reliability >= 0.90") && why.contains("reliability 0.50"), "{why}")
        }
        _ => panic!("no node is reliable enough: infeasible"),
    }
    // Sent here by another node on a stale view: refused, not run.
    match leases.decide(&one, &any, &strict, true, None, 1, &[]) {
        Step::Infeasible(why) => assert!(why.contains("node") && why.contains("scores 0.50"), "{why}"),
        _ => panic!("a node below the job's minimum does not take its work"),
    }
}

/// A node the head's GPU check holds back grants nothing itself (the head would bill none
/// of it), even to a request sent here to stay; it takes work again once it passes.
#[test]
fn a_node_held_back_by_its_gpu_check_grants_nothing() {
    use ionet_common::rpc::proto::common::{GpuCheck, GpuCheckState};
    let leases = leases(2);
    let two = ResourceSet::new().with(CPU, Quantity::whole(2));
    let own = |state: GpuCheckState| NodeInfo {
        node_id: leases.node_id.to_vec(),
        address: "self:1".into(),
        total: Some((&two).into()),
        available: Some((&two).into()),
        state: ionet_common::rpc::proto::common::NodeState::Alive as i32,
        gpu_check: Some(GpuCheck { state: state as i32, reason: "GPU 0: answered late".into(), ..Default::default() }),
        ..Default::default()
    };
    let one = ResourceSet::new().with(CPU, Quantity::whole(1));
    let any = SchedulingStrategy::Default;
    leases.refresh_view(&[own(GpuCheckState::Failed)]);
    match leases.decide(&one, &any, &Needs::default(), true, None, 1, &[]) {
        Step::Wait(why) => assert!(why.contains("takes no work until its GPUs pass the head's check"), "{why}"),
        _ => panic!("a quarantined node granted a lease"),
    }
    // A soft preference for this node goes elsewhere meanwhile.
    let other = NodeId::random();
    let elsewhere =
        NodeInfo { node_id: other.to_vec(), address: "other:1".into(), gpu_check: None, ..own(GpuCheckState::Passed) };
    leases.refresh_view(&[own(GpuCheckState::Failed), elsewhere]);
    let soft_here = SchedulingStrategy::NodeAffinity { node_id: leases.node_id, soft: true };
    assert!(
        matches!(leases.decide(&one, &soft_here, &Needs::default(), false, None, 1, &[]), Step::Spill(node, _) if node == other)
    );
    // Overdue (a lease put its check off too long): no new work either.
    leases.refresh_view(&[own(GpuCheckState::Overdue)]);
    assert!(matches!(leases.decide(&one, &any, &Needs::default(), true, None, 1, &[]), Step::Wait(_)));
    leases.refresh_view(&[own(GpuCheckState::Passed)]);
    // While a check of its GPUs runs, whatever the head's view says, nothing is granted.
    leases.set_checking(true);
    leases.refresh_view(&[own(GpuCheckState::Passed)]);
    match leases.decide(&one, &any, &Needs::default(), true, None, 1, &[]) {
        Step::Wait(why) => assert!(why.contains("takes no work while its GPUs are checked"), "{why}"),
        _ => panic!("a lease granted during a check of the node's GPUs"),
    }
    leases.set_checking(false);
    assert!(matches!(leases.decide(&one, &any, &Needs::default(), true, None, 1, &[]), Step::Grant(..)));
}

/// A spill counts against its target in this node's view only until the view next moves
/// on: a delta that does not carry the target's row (its use came and went between its
/// heartbeats, so the head's row never changed) must not leave it full here for ever.
#[test]
fn a_spill_counts_against_its_target_only_until_the_next_view() {
    // Two CPUs here, both busy: a request waits here unless the other node has room.
    let leases = leases(2);
    let other = NodeId::random();
    let two = ResourceSet::new().with(CPU, Quantity::whole(2));
    leases.lock().available.try_subtract(&two).unwrap();
    let row = NodeInfo {
        node_id: other.to_vec(),
        address: "other:1".into(),
        total: Some((&two).into()),
        available: Some((&two).into()),
        state: ionet_common::rpc::proto::common::NodeState::Alive as i32,
        ..Default::default()
    };
    leases.refresh_view_at(&[row], (1, 1), false);
    let any = SchedulingStrategy::Default;
    let spilled = |leases: &Leases| matches!(leases.decide(&two, &any, &Needs::default(), false, None, 1, &[]), Step::Spill(node, _) if node == other);
    assert!(spilled(&leases));
    assert!(!spilled(&leases), "a burst spreads: the first spill is counted there");
    // The head's next word changes nothing of the other node: its room is back.
    assert!(leases.apply_view_delta(&[], &[], (1, 1), (1, 2)));
    assert!(spilled(&leases), "the spill was forgotten with the view it was counted in");
}
