//! Ray's task patterns from Rust: tasks that wait for tasks they submitted (a worker
//! blocked in `get`/`wait` lends its CPU to the tasks it waits for, so a tree of tasks
//! deeper than the node's CPUs finishes, and the daemon starts a bounded number of extra
//! workers for it), generator tasks streaming items to their caller, and `ActorPool`.

mod harness;

use std::time::{Duration, Instant};

use ionet::{GeneratorSink, InitConfig, IonetError};

/// Sends `0..n`, each after `millis`, writing how many were sent so far to `progress`.
#[ionet::remote]
fn count_up(n: u64, millis: u64, progress: String, sink: GeneratorSink<u64>) -> u64 {
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(millis));
        if !sink.send(&i).unwrap() {
            return i;
        }
        if !progress.is_empty() {
            std::fs::write(&progress, (i + 1).to_string()).unwrap();
        }
    }
    n
}

/// Sends two items, then fails.
#[ionet::remote]
fn two_then_fail(sink: GeneratorSink<String>) -> u64 {
    sink.send(&"first".to_string()).unwrap();
    sink.send(&"x".repeat(300_000)).unwrap(); // a large item: through the store
    panic!("the generator broke")
}

pub struct Doubler;

#[ionet::actor]
impl Doubler {
    pub fn new() -> Self {
        Doubler
    }

    pub fn double(&self, value: u64) -> u64 {
        2 * value
    }
}

/// The squares of `0..n`: a generator task by its return type.
#[ionet::remote]
fn squares_below(n: u64) -> impl Iterator<Item = u64> {
    (0..n).map(|i| i * i)
}

/// The words of `text`, boxed.
#[ionet::remote]
fn words(text: String) -> Box<dyn Iterator<Item = String>> {
    Box::new(text.split_whitespace().map(str::to_string).collect::<Vec<_>>().into_iter())
}

/// 0, 1, 2, ... for ever, one every `millis`.
#[ionet::remote]
fn naturals(millis: u64) -> impl Iterator<Item = u64> {
    (0..).inspect(move |_| std::thread::sleep(Duration::from_millis(millis)))
}

/// The processes a binary tree of tasks of `depth` ran in, each task's and its children's.
#[ionet::remote]
fn tree_pids(depth: u32) -> Vec<u32> {
    let mut pids = vec![std::process::id()];
    if depth > 0 {
        let children = [tree_pids::remote(depth - 1), tree_pids::remote(depth - 1)];
        for child in ionet::get_all(&children).unwrap() {
            pids.extend(child);
        }
    }
    pids
}

/// Notes in `marker` that it started, then waits until its caller cancels it and notes
/// that too.
#[ionet::remote]
fn wait_for_cancel(marker: String) -> u64 {
    std::fs::write(&marker, "started").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ionet::is_canceled() {
        assert!(Instant::now() < deadline, "the cancel never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&marker, "cancelled").unwrap();
    1
}

/// Waits for a child that waits to be cancelled.
#[ionet::remote]
fn parent_of_waiter(marker: String) -> u64 {
    ionet::get(&wait_for_cancel::remote(marker)).unwrap_or(0)
}

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

/// Submits a child that sleeps `child_millis`, then waits for it `millis` at most: whether
/// the wait timed out, and how long it took.
#[ionet::remote]
fn timed_wait_for_child(child_millis: u64, millis: u64) -> (bool, u64) {
    let child = slow_value::remote(child_millis, 1u64);
    let started = std::time::Instant::now();
    let timed_out = matches!(ionet::get_timeout(&child, Duration::from_millis(millis)), Err(IonetError::Timeout(_)));
    (timed_out, started.elapsed().as_millis() as u64)
}

/// `value` after `millis`, writing `marker` first.
#[ionet::remote]
fn marked_slow_value(marker: String, millis: u64, value: u64) -> u64 {
    std::fs::write(&marker, "started").unwrap();
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
    //
    // The slow task is running before the others start: were it still waiting for a CPU
    // when every worker holding one blocked, the daemon would lend past the cap (else
    // nothing could ever run), and which waiting task took that CPU would be luck.
    std::env::set_var("IONET_MAX_BLOCKED_WORKERS", "8");
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    std::env::remove_var("IONET_MAX_BLOCKED_WORKERS");
    let started = harness::temp_path("gate-started");
    let gate = marked_slow_value::remote(started.display().to_string(), 1_500u64, 1u64);
    harness::wait_until("the slow task to start", Duration::from_secs(60), || started.exists());
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

fn streaming_generator_items_arrive_while_it_runs() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let mut items = ionet::stream(|sink| count_up::remote(1000u64, 1u64, String::new(), sink)).unwrap();
    let first = items.next().unwrap().unwrap();
    assert_eq!(ionet::get(&first).unwrap(), 0);
    assert!(
        ionet::wait(&[items.task().clone()], 1, Some(Duration::ZERO)).unwrap().0.is_empty(),
        "the first item came only after the generator finished"
    );
    let rest: Vec<u64> = items.map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(rest, (1..1000).collect::<Vec<_>>());

    // A failing generator: its items, then its error, then the end.
    let mut failing = ionet::stream(two_then_fail::remote).unwrap();
    assert_eq!(ionet::get(&failing.next().unwrap().unwrap()).unwrap(), "first");
    assert_eq!(ionet::get(&failing.next().unwrap().unwrap()).unwrap().len(), 300_000);
    match failing.next() {
        Some(Err(IonetError::TaskFailed { message, .. })) => {
            assert!(message.contains("the generator broke"), "{message}")
        }
        other => panic!("expected the generator's failure, got {other:?}"),
    }
    assert!(failing.next().is_none());
    ionet::shutdown();
}

fn a_generator_waits_for_a_slow_consumer() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let progress = harness::temp_path("generator-progress");
    let _ = std::fs::remove_file(&progress);
    let path = progress.to_string_lossy().into_owned();
    let mut items =
        ionet::stream_with_backpressure(3, |sink| count_up::remote(20u64, 0u64, path.clone(), sink)).unwrap();
    let sent = || std::fs::read_to_string(&progress).ok().and_then(|text| text.parse::<u64>().ok()).unwrap_or(0);
    harness::wait_until("three items to be sent", Duration::from_secs(60), || sent() == 3);
    // Nothing is consumed: the producer stays three ahead (checked for a while).
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(sent(), 3, "the producer ran past its backpressure");
        std::thread::sleep(Duration::from_millis(20));
    }
    let values: Vec<u64> = items.by_ref().map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(values, (0..20).collect::<Vec<_>>());
    // Dropping a consumer early stops the producer.
    let task = {
        let mut early =
            ionet::stream_with_backpressure(1, |sink| count_up::remote(1000u64, 0u64, String::new(), sink)).unwrap();
        early.next().unwrap().unwrap();
        early.task_as::<u64>()
    };
    assert!(ionet::get_timeout(&task, Duration::from_secs(60)).unwrap() < 1000);
    ionet::shutdown();
}

fn actor_pool_maps_over_four_actors() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let actors: Vec<DoublerHandle> = (0..4).map(|_| Doubler::remote().unwrap()).collect();
    let mut pool = ionet::ActorPool::new(actors);
    let results = pool.map(|actor: &DoublerHandle, value: u64| actor.double(value), 0..20u64);
    let results: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(results, (0..20).map(|v| 2 * v).collect::<Vec<_>>());
    pool.submit(|actor, value| actor.double(value), 21);
    assert_eq!(pool.get_next_unordered(Some(Duration::from_secs(60))).unwrap().unwrap(), 42);
    assert!(!pool.has_next() && pool.has_free());
    ionet::shutdown();
}

fn an_iterator_returning_function_is_a_generator_task() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let squares: Vec<u64> = squares_below::remote(1000u64).map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(squares, (0..1000u64).map(|i| i * i).collect::<Vec<_>>());
    assert_eq!(squares_below(3).collect::<Vec<_>>(), vec![0, 1, 4], "still callable in place");
    let mut said = words::options(ionet::TaskOptions::default()).backpressure(1).remote("to be or not".to_string());
    let task = said.task_as::<u64>();
    let read: Vec<String> = said.by_ref().map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(read, ["to", "be", "or", "not"]);
    assert_eq!(ionet::get_timeout(&task, Duration::from_secs(60)).unwrap(), 4, "the task's value counts the items");
    // An endless generator: items arrive while it runs, and dropping the consumer stops it.
    let mut endless = naturals::remote(5u64);
    let task = endless.task_as::<u64>();
    let first: Vec<u64> = endless.by_ref().take(3).map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(first, [0, 1, 2]);
    drop(endless);
    let sent = ionet::get_timeout(&task, Duration::from_secs(60)).unwrap();
    assert!(sent >= 3, "{sent} items sent");
    ionet::shutdown();
}

fn a_waiting_task_runs_the_children_nobody_started() {
    // One CPU, held by the tree's root: its children's leases cannot be granted, so the
    // root runs them itself as it waits (and they theirs), all in its process, instead of
    // lending its CPU to a new worker for each.
    ionet::init(InitConfig::default().num_cpus(1.0)).unwrap();
    let pids = ionet::get_timeout(&tree_pids::remote(4u32), Duration::from_secs(60)).unwrap();
    assert_eq!(pids.len(), 31);
    let processes: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(processes.len(), 1, "the tree ran in {} processes", processes.len());
    ionet::shutdown();
    // Turned off (the workers inherit the variable from the embedded daemon), each
    // waiting task lends its CPU and the children go to other workers.
    std::env::set_var(ionet::inline::WORK_FIRST_ENV, "0");
    ionet::init(InitConfig::default().num_cpus(1.0)).unwrap();
    let pids = ionet::get_timeout(&tree_pids::remote(2u32), Duration::from_secs(60)).unwrap();
    std::env::remove_var(ionet::inline::WORK_FIRST_ENV);
    let processes: std::collections::BTreeSet<u32> = pids.iter().copied().collect();
    assert!(processes.len() > 1, "with work-first off the tree still ran in one process");
    ionet::shutdown();
}

/// A get with a timeout returns by its deadline even where work-first would have run the
/// awaited task in place (one CPU, held by the waiting task: the child's lease waits).
fn a_timed_get_keeps_its_deadline() {
    ionet::init(InitConfig::default().num_cpus(1.0)).unwrap();
    let waiter = timed_wait_for_child::remote(5_000u64, 200u64);
    let (timed_out, waited) = ionet::get_timeout(&waiter, Duration::from_secs(60)).unwrap();
    assert!(timed_out, "the child sleeps 5 s: a 200 ms get must time out");
    assert!(waited < 2_000, "a get with a 200 ms timeout returned after {waited} ms");
    ionet::shutdown();
}

fn a_recursive_cancel_reaches_the_tasks_a_task_submitted() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let marker = harness::temp_path("grandchild");
    let read = || std::fs::read_to_string(&marker).unwrap_or_default();
    let parent = parent_of_waiter::remote(marker.display().to_string());
    harness::wait_until("the child to start", Duration::from_secs(60), || read() == "started");
    ionet::cancel(&parent, false, true).unwrap();
    assert!(matches!(ionet::get_timeout(&parent, Duration::from_secs(60)), Err(IonetError::Cancelled(_))));
    harness::wait_until("the child to see the cancel", Duration::from_secs(60), || read() == "cancelled");
    // Cancelling what is already done changes nothing; a ref this process does not own is refused.
    let done = slow_value::remote(0u64, 5u64);
    assert_eq!(ionet::get_timeout(&done, Duration::from_secs(60)).unwrap(), 5);
    ionet::cancel(&done, false, true).unwrap();
    assert_eq!(ionet::get(&done).unwrap(), 5);
    ionet::shutdown();
}

/// The core worker's calls that move work (reporting generator items, cancelling) refuse
/// a caller without a credential of this cluster, and the stream is untouched.
fn a_stranger_cannot_report_items_or_cancel() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let mut items =
        ionet::stream_with_backpressure(4, |sink| count_up::remote(3u64, 0u64, String::new(), sink)).unwrap();
    let address = ionet::testing::core_worker_address().unwrap();
    let stranger = ionet::auth::Bearer::new("not-a-credential").unwrap();
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = ionet::rpc::connect(&address, &stranger, Duration::from_secs(5)).await.unwrap();
        let mut client = ionet::rpc::CoreWorkerClient::new(channel);
        let report = ionet::rpc::proto::worker::ReportGeneratorItemRequest { generator_id: vec![0; 28], items: vec![] };
        let cancel = ionet::rpc::proto::worker::CancelTaskRequest { task_id: vec![0; 24], recursive: true };
        [client.report_generator_item(report).await.unwrap_err(), client.cancel_task(cancel).await.unwrap_err()]
    });
    for status in refused {
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    let values: Vec<u64> = items.by_ref().map(|item| ionet::get(&item.unwrap()).unwrap()).collect();
    assert_eq!(values, [0, 1, 2]);
    ionet::shutdown();
}

fn main() {
    harness::run(
        &[
            ("streaming_generator_items_arrive_while_it_runs", streaming_generator_items_arrive_while_it_runs),
            ("a_generator_waits_for_a_slow_consumer", a_generator_waits_for_a_slow_consumer),
            ("actor_pool_maps_over_four_actors", actor_pool_maps_over_four_actors),
            ("a_stranger_cannot_report_items_or_cancel", a_stranger_cannot_report_items_or_cancel),
            ("an_iterator_returning_function_is_a_generator_task", an_iterator_returning_function_is_a_generator_task),
            (
                "a_recursive_cancel_reaches_the_tasks_a_task_submitted",
                a_recursive_cancel_reaches_the_tasks_a_task_submitted,
            ),
            ("a_timed_get_keeps_its_deadline", a_timed_get_keeps_its_deadline),
            ("a_waiting_task_runs_the_children_nobody_started", a_waiting_task_runs_the_children_nobody_started),
            ("recursion_deeper_than_the_cpus_finishes", recursion_deeper_than_the_cpus_finishes),
            ("extra_workers_are_capped", extra_workers_are_capped),
            ("tree_of_tasks_quicksorts_two_million_numbers", tree_of_tasks_quicksorts_two_million_numbers),
        ],
        Duration::from_secs(240),
    );
}
