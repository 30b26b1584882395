//! The lease book's property test: its invariants under any order of steps.

use proptest::prelude::*;

use super::*;

/// One step a node's book may take, in any order.
#[derive(Debug, Clone)]
enum Op {
    /// A grant of `cpus` (and `gpus`), from bundle `bundle` if `Some`, on a fresh or idle worker.
    Grant {
        cpus: i64,
        gpus: i64,
        bundle: Option<u32>,
        reuse: bool,
    },
    /// Lease number `n` (mod the number held) ends; its worker failed or not.
    End {
        n: usize,
        failed: bool,
    },
    /// The worker of lease `n` exits.
    Exit {
        n: usize,
    },
    /// An idle worker exits.
    IdleExit,
    Block {
        n: usize,
        blocked: bool,
    },
    Prepare {
        bundle: u32,
        cpus: i64,
    },
    Commit {
        bundle: u32,
    },
    Cancel {
        bundle: u32,
    },
    Reap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3i64, 0..2i64, prop::option::of(0..3u32), any::<bool>())
            .prop_map(|(cpus, gpus, bundle, reuse)| Op::Grant { cpus, gpus, bundle, reuse }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(n, failed)| Op::End { n, failed }),
        1 => any::<usize>().prop_map(|n| Op::Exit { n }),
        1 => Just(Op::IdleExit),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(n, blocked)| Op::Block { n, blocked }),
        1 => (0..3u32, 0..3i64).prop_map(|(bundle, cpus)| Op::Prepare { bundle, cpus }),
        1 => (0..3u32).prop_map(|bundle| Op::Commit { bundle }),
        1 => (0..3u32).prop_map(|bundle| Op::Cancel { bundle }),
        1 => Just(Op::Reap),
    ]
}

fn nth_lease(state: &LeaseState, n: usize) -> Option<LeaseId> {
    let mut ids: Vec<LeaseId> = state.leases.keys().copied().collect();
    ids.sort_by_key(|id| id.to_vec());
    (!ids.is_empty()).then(|| ids[n % ids.len()])
}

fn key() -> PoolKey {
    PoolKey { job_id: vec![1], argv: vec!["worker".into()], gpu_ids: Vec::new(), runtime_env: String::new() }
}

/// Applies `op` as `Leases` would (the same calls in the same order).
fn apply(state: &mut LeaseState, group: PlacementGroupId, op: Op, cap: usize) {
    let now = Instant::now();
    match op {
        Op::Grant { cpus, gpus, bundle, reuse } => {
            let demand = ResourceSet::new().with(CPU, Quantity::whole(cpus)).with(GPU, Quantity::whole(gpus));
            let bundle = bundle.map(|index| (group, index));
            if bundle.is_some_and(|key| !state.bundles.get(&key).is_some_and(|b| b.committed)) {
                return; // a request for an uncommitted or unknown bundle waits or is refused
            }
            let Step::Grant(resources, assignment) = state.take(&demand, bundle.as_ref(), "busy") else { return };
            let worker = match state.idle_of(&key()).filter(|_| reuse) {
                Some(idle) => idle,
                None => {
                    let worker = WorkerId::random();
                    let process =
                        Process { pid: 0, key: key(), address: String::new(), doing: Doing::Starting, holding: false };
                    state.processes.insert(worker, process);
                    worker
                }
            };
            let granted = Granted {
                resources,
                gpus: assignment,
                worker,
                bundle,
                pool: bundle,
                holder: String::new(),
                blocked: false,
                released: Quantity::ZERO,
            };
            let (resources, gpus) = (granted.resources.clone(), granted.gpus.clone());
            if !state.record_lease(LeaseId::random(), granted) {
                state.give_back(&resources, gpus.as_ref(), bundle.as_ref());
            }
        }
        Op::End { n, failed } => {
            if let Some(lease_id) = nth_lease(state, n) {
                state.end_lease(lease_id, failed, now, cap).unwrap();
            }
        }
        Op::Exit { n } => {
            if let Some(lease_id) = nth_lease(state, n) {
                let worker = state.leases[&lease_id].worker;
                assert!(state.process_exited(worker, now, cap).is_some(), "a leased worker's exit ends its lease");
                assert!(state.process_exited(worker, now, cap).is_none(), "an exit is seen once");
            }
        }
        Op::IdleExit => {
            if let Some(worker) = state.idle_of(&key()) {
                assert!(state.process_exited(worker, now, cap).is_none(), "an idle worker held no lease");
            }
        }
        Op::Block { n, blocked } => {
            if let Some(lease_id) = nth_lease(state, n) {
                let worker = state.leases[&lease_id].worker;
                state.set_blocked(worker, blocked, cap).unwrap();
            }
        }
        Op::Prepare { bundle, cpus } => {
            let _ = state.prepare_bundle((group, bundle), ResourceSet::new().with(CPU, Quantity::whole(cpus)), None);
        }
        Op::Commit { bundle } => {
            if let Some(bundle) = state.bundles.get_mut(&(group, bundle)) {
                bundle.committed = true;
            }
        }
        Op::Cancel { bundle } => {
            let _ = state.cancel_bundle(&(group, bundle));
        }
        Op::Reap => {
            let _ = state.reap_idle(now, 1, Duration::from_secs(3600), Duration::ZERO);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// "available = total − Σ held" (per pool), one lease per worker and one worker per
    /// lease, under any order of grants, returns, exits, blocks and bundle changes;
    /// and once every lease has ended and every bundle is gone, all is free again.
    #[test]
    fn the_book_balances_under_any_order(ops in prop::collection::vec(op(), 1..80), cap in 0..3usize) {
        let total = ResourceSet::new().with(CPU, Quantity::whole(4)).with(GPU, Quantity::whole(2));
        let mut state = LeaseState::new(total.clone(), vec![0, 1]);
        let group = PlacementGroupId::random();
        for op in ops {
            let said = format!("{op:?}");
            apply(&mut state, group, op, cap);
            if let Err(why) = state.check() {
                prop_assert!(false, "after {said}: {why}");
            }
        }
        for index in 0..3 {
            let _ = state.cancel_bundle(&(group, index));
        }
        while let Some(lease_id) = nth_lease(&state, 0) {
            state.end_lease(lease_id, false, Instant::now(), cap).unwrap();
            prop_assert!(state.check().is_ok(), "{:?}", state.check());
        }
        prop_assert!(same(&state.available, &total), "all ended, {} free of {}", state.available, total);
        prop_assert_eq!(state.gpus.total_free(), Quantity::whole(2));
        prop_assert_eq!(state.released_leases, 0);
    }
}
