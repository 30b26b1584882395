//! Tasks that wait for tasks they submitted: a worker blocked in `get`/`wait` lends its
//! CPU to the tasks it waits for, so a tree of tasks deeper than the node's CPUs finishes
//! (Ray's divide-and-conquer pattern), and the daemon starts a bounded number of extra
//! workers for it.

mod harness;

use std::time::Duration;

use ionet::InitConfig;

/// 2^depth, by a binary tree of tasks that each wait for their two children.
#[ionet::remote]
fn tree(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    let children = [tree::remote(depth - 1), tree::remote(depth - 1)];
    ionet::get_all(&children).unwrap().into_iter().sum()
}

/// The same tree, waiting with `wait` for each child before reading it.
#[ionet::remote]
fn tree_by_wait(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    let mut pending = vec![tree_by_wait::remote(depth - 1), tree_by_wait::remote(depth - 1)];
    let mut total = 0;
    while !pending.is_empty() {
        let (ready, rest) = ionet::wait(&pending, 1, None).unwrap();
        total += ionet::get(&ready[0]).unwrap();
        pending = rest;
    }
    total
}

#[ionet::remote]
fn slow_value(millis: u64, value: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    value
}

/// The value of the first ref (passed inside a list, so the task starts before it exists).
#[ionet::remote]
fn first_of(refs: Vec<ionet::ObjectRef<u64>>) -> u64 {
    ionet::get(&refs[0]).unwrap()
}

/// Sorts `values` by a tree of tasks: pivot, partition, sort both sides remotely.
#[ionet::remote]
fn quicksort(values: Vec<u64>) -> Vec<u64> {
    const LEAF: usize = 200_000;
    if values.len() <= LEAF {
        let mut values = values;
        values.sort_unstable();
        return values;
    }
    let pivot = values[values.len() / 2];
    let (mut less, mut equal, mut more) = (Vec::new(), Vec::new(), Vec::new());
    for value in values {
        match value.cmp(&pivot) {
            std::cmp::Ordering::Less => less.push(value),
            std::cmp::Ordering::Equal => equal.push(value),
            std::cmp::Ordering::Greater => more.push(value),
        }
    }
    let (less, more) = (quicksort::remote(less), quicksort::remote(more));
    let mut sorted = ionet::get(&less).unwrap();
    sorted.extend(equal);
    sorted.extend(ionet::get(&more).unwrap());
    sorted
}

/// How many worker processes the node daemon started: the children of this process
/// that re-execute it (a worker is this binary with the worker-mode variable set).
fn worker_processes() -> usize {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            status.lines().any(|line| line.starts_with("PPid:") && line.split_whitespace().nth(1) == Some(&me))
        })
        .count()
}

fn recursion_deeper_than_the_cpus_finishes() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    assert_eq!(ionet::get_timeout(&tree::remote(4u32), Duration::from_secs(60)).unwrap(), 16);
    assert_eq!(ionet::get_timeout(&tree::remote(6u32), Duration::from_secs(120)).unwrap(), 64);
    assert_eq!(ionet::get_timeout(&tree_by_wait::remote(5u32), Duration::from_secs(120)).unwrap(), 32);
    // The node's CPUs are all free again once the tree is done (nothing leaked, no
    // CPU taken back twice).
    harness::wait_until("the CPUs to come back", Duration::from_secs(30), || {
        ionet::testing::available_cpus().is_some_and(|cpus| cpus == 2.0)
    });
    ionet::shutdown();
}

fn extra_workers_are_capped() {
    // Twenty tasks wait for one slow task's value. Each that blocks lends its CPU, so the
    // next can start: without a cap all twenty would run at once, each in a worker of its
    // own. With at most 8 blocked workers lending their CPUs, the ninth keeps its CPU and
    // the rest wait for room: at most 2 + 8 workers (and the slow task's) at once, and
    // every task still finishes.
    std::env::set_var("IONET_MAX_BLOCKED_WORKERS", "8");
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    std::env::remove_var("IONET_MAX_BLOCKED_WORKERS");
    let gate = slow_value::remote(1_500u64, 1u64);
    let waiters: Vec<_> = (0..20).map(|_| first_of::remote(vec![gate.clone()])).collect();
    let mut most = 0;
    while ionet::wait(&waiters, waiters.len(), Some(Duration::from_millis(20))).unwrap().1.len() > 0 {
        most = most.max(worker_processes());
    }
    assert_eq!(ionet::get_all(&waiters).unwrap(), vec![1u64; 20]);
    assert!(most > 2, "blocked tasks lent no CPU: only {most} workers ran at once");
    assert!(most <= 2 + 8 + 1, "the node ran {most} workers at once for a cap of 8 blocked ones");
    harness::wait_until("the CPUs to come back", Duration::from_secs(30), || {
        ionet::testing::available_cpus().is_some_and(|cpus| cpus == 2.0)
    });
    ionet::shutdown();
}

fn tree_of_tasks_quicksorts_two_million_numbers() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let values: Vec<u64> = (0..2_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % 1_000_000_000
        })
        .collect();
    let mut expected = values.clone();
    expected.sort_unstable();
    let sorted = ionet::get_timeout(&quicksort::remote(values), Duration::from_secs(120)).unwrap();
    assert_eq!(sorted.len(), expected.len());
    assert!(sorted == expected, "the tree of tasks sorted wrongly");
    ionet::shutdown();
}

fn main() {
    harness::run(
        &[
            ("recursion_deeper_than_the_cpus_finishes", recursion_deeper_than_the_cpus_finishes),
            ("extra_workers_are_capped", extra_workers_are_capped),
            ("tree_of_tasks_quicksorts_two_million_numbers", tree_of_tasks_quicksorts_two_million_numbers),
        ],
        Duration::from_secs(240),
    );
}
