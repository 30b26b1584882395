//! Remote tasks end to end: an embedded cluster and a real multi-process one on
//! loopback, worker processes being this test binary re-executed.

mod harness;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_port, node_named, shared_tempdir, temp_path, wait_until, Cluster};
use ionet::{InitConfig, IonetError, SchedulingStrategy, TaskOptions};

#[ionet::remote]
fn square(x: u64) -> u64 {
    x * x
}

#[ionet::remote]
fn add_one(x: u64) -> u64 {
    x + 1
}

#[ionet::remote]
fn square_where(x: u64) -> (u64, String) {
    (x * x, ionet::get_runtime_context().unwrap().node_id.hex())
}

#[ionet::remote]
fn slow_where(x: u64, millis: u64) -> (u64, String) {
    std::thread::sleep(Duration::from_millis(millis));
    (x, ionet::get_runtime_context().unwrap().node_id.hex())
}

/// Writes its worker's pid to `path`, then runs for `millis`.
#[ionet::remote]
fn pid_then_sleep(path: String, millis: u64) {
    std::fs::write(&path, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_millis(millis));
}

/// Whether process `pid` is gone (exited, or a zombie nobody reaped).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Marks `path` when it starts, then runs for `millis`.
#[ionet::remote]
fn marked_where(path: String, millis: u64) -> String {
    std::fs::write(&path, b"started").unwrap();
    std::thread::sleep(Duration::from_millis(millis));
    ionet::get_runtime_context().unwrap().node_id.hex()
}

#[ionet::remote]
fn boom(message: String) -> u64 {
    panic!("{message}")
}

#[ionet::remote]
fn fallible(fail: bool) -> Result<u64, String> {
    if fail {
        Err("the input was rejected".to_string())
    } else {
        Ok(42)
    }
}

/// First attempt: records its pid and hangs (to be killed). Later attempts: answer.
#[ionet::remote]
fn crash_once(marker: String) -> u64 {
    if std::path::Path::new(&marker).exists() {
        return 7;
    }
    std::fs::write(&marker, std::process::id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(120));
    0
}

/// Waits until `expected` tasks have checked in under `dir`: proves they run at once.
#[ionet::remote]
fn rendezvous(dir: String, expected: usize) -> (String, Vec<u32>) {
    harness::meet(&dir, expected);
    (std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default(), ionet::get_gpu_ids())
}

/// Sums the values of `refs`, when asked to look at them.
#[ionet::remote]
fn sum_of(refs: Vec<ionet::ObjectRef<u64>>, look: bool) -> u64 {
    if !look {
        return 0;
    }
    ionet::get_all(&refs).unwrap().into_iter().sum()
}

/// The kind of error a get of the first of `refs` ends with, read as a borrower.
#[ionet::remote]
fn error_kind_of(refs: Vec<ionet::ObjectRef<u64>>) -> String {
    match ionet::get(&refs[0]) {
        Ok(value) => format!("a value: {value}"),
        Err(error) => format!("{}: {error}", error.kind()),
    }
}

#[ionet::remote]
fn exit_worker() -> u64 {
    std::process::exit(3)
}

#[ionet::remote]
fn slow_value(millis: u64, value: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    value
}

/// Short tasks queue several deep on a worker, but a long task never queues behind
/// another: after a thousand short tasks, four tasks that can only finish together (on a
/// 4-CPU node) still run at once.
fn long_tasks_never_queue_behind_short_ones() {
    ionet::init(InitConfig::default().num_cpus(4.0)).unwrap();
    for _ in 0..2 {
        let refs: Vec<_> = (0..500u64).map(square::remote).collect();
        assert_eq!(ionet::get_all(&refs).unwrap().len(), 500);
    }
    let dir = temp_path("rendezvous-after-short");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let together: Vec<_> = (0..4).map(|_| rendezvous::remote(dir.to_string_lossy().into_owned(), 4)).collect();
    assert_eq!(ionet::get_all(&together).unwrap().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
    ionet::shutdown();
}

/// A task learnt to be short runs in place on its worker's event loop; when such a task
/// waits for an object after all (a `get` inside it), the wait still works.
fn a_short_task_may_wait_inside() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let ready: Vec<_> = (0..3u64).map(|x| ionet::put(&x).unwrap()).collect();
    for _ in 0..50 {
        assert_eq!(ionet::get(&sum_of::remote(ready.clone(), false)).unwrap(), 0);
    }
    // The slow task's ref lives only inside the argument: the call holds it.
    let waiting = sum_of::remote(vec![slow_value::remote(300u64, 40u64), ready[2].clone()], true);
    assert_eq!(ionet::get_timeout(&waiting, Duration::from_secs(60)).unwrap(), 42);
    ionet::shutdown();
}

/// A ref written inside an argument or a stored value lives as long as the call or the
/// value needs it, though the caller keeps no handle of its own.
fn refs_inside_values_outlive_the_callers_handles() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let total = sum_of::remote(vec![ionet::put(&40u64).unwrap(), ionet::put(&2u64).unwrap()], true);
    assert_eq!(ionet::get(&total).unwrap(), 42);
    let outer = ionet::put(&vec![ionet::put(&7u64).unwrap()]).unwrap();
    let inner: Vec<ionet::ObjectRef<u64>> = ionet::get(&outer).unwrap();
    assert_eq!(ionet::get(&inner[0]).unwrap(), 7);
    ionet::shutdown();
}

/// The worker process a call ran in.
#[ionet::remote]
fn worker_pid() -> u32 {
    std::process::id()
}

/// `max_calls`: a worker runs at most that many calls of the function, then a fresh
/// process takes over; without it the same worker serves call after call.
fn max_calls_replaces_the_worker() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let run = |options: TaskOptions| {
        ionet::get_timeout(&worker_pid::options(options).remote(), Duration::from_secs(60)).unwrap()
    };
    let reused: BTreeSet<u32> = (0..4).map(|_| run(TaskOptions::default())).collect();
    assert!(reused.len() < 4, "idle workers serve calls in turn: {reused:?}");
    let once: Vec<u32> = (0..4).map(|_| run(TaskOptions::default().max_calls(1))).collect();
    assert_eq!(once.iter().collect::<BTreeSet<_>>().len(), 4, "a worker per call: {once:?}");
    let twice: Vec<u32> = (0..4).map(|_| run(TaskOptions::default().max_calls(2))).collect();
    let mut per_worker = std::collections::BTreeMap::new();
    for pid in &twice {
        *per_worker.entry(pid).or_insert(0) += 1;
    }
    assert!(per_worker.values().all(|calls| *calls <= 2), "at most two calls a worker: {twice:?}");
    // Submitted together, the calls still never share a worker.
    let together: Vec<_> = (0..6).map(|_| worker_pid::options(TaskOptions::default().max_calls(1)).remote()).collect();
    let pids = ionet::get_all(&together).unwrap();
    assert_eq!(pids.iter().collect::<BTreeSet<_>>().len(), 6, "a worker per call: {pids:?}");
    ionet::shutdown();
}

fn embedded_thousand_tasks_and_a_chain() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let refs: Vec<_> = (0..1000u64).map(square::remote).collect();
    let values = ionet::get_all(&refs).unwrap();
    assert_eq!(values, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());

    // A chain of 100 dependent tasks, each taking the previous one's ref.
    let mut current = add_one::remote(0u64);
    for _ in 1..100 {
        current = add_one::remote(current);
    }
    assert_eq!(ionet::get(&current).unwrap(), 100);

    // put, get, wait.
    let stored = ionet::put(&vec![1u8, 2, 3]).unwrap();
    assert_eq!(ionet::get(&stored).unwrap(), vec![1, 2, 3]);
    assert_eq!(ionet::get(&square::remote(&ionet::put(&9u64).unwrap())).unwrap(), 81);
    let (ready, rest) = ionet::wait(&refs[..10], 10, Some(Duration::from_secs(30))).unwrap();
    assert_eq!((ready.len(), rest.len()), (10, 0));
    ionet::shutdown();
}

fn errors_reach_the_caller() {
    ionet::init(InitConfig::default().num_cpus(2.0).num_gpus(4).gpu_type("A100-80GB")).unwrap();
    match ionet::get(&boom::remote("the model diverged".to_string())) {
        Err(IonetError::TaskFailed { function, message, node, payload }) => {
            assert!(function.ends_with("boom"), "{function}");
            assert!(message.contains("panicked: the model diverged"), "{message}");
            assert_eq!(node.len(), 8);
            assert!(payload.is_empty(), "a Rust task has no language payload");
        }
        other => panic!("expected a task failure, got {other:?}"),
    }
    match ionet::get(&fallible::remote(true)) {
        Err(IonetError::TaskFailed { message, .. }) => assert_eq!(message, "the input was rejected"),
        other => panic!("expected a task failure, got {other:?}"),
    }
    assert_eq!(ionet::get(&fallible::remote(false)).unwrap(), 42);

    // A borrower reading a failed object sees the error its owner holds, kind and all.
    let crashed = exit_worker::options(TaskOptions::default().max_retries(0)).remote();
    assert!(matches!(ionet::get(&crashed), Err(IonetError::WorkerCrashed { .. })));
    let seen = ionet::get(&error_kind_of::remote(vec![crashed])).unwrap();
    assert!(seen.starts_with("WorkerCrashed: "), "{seen}");
    let failed = fallible::remote(true);
    let seen = ionet::get(&error_kind_of::remote(vec![failed])).unwrap();
    assert!(seen.starts_with("TaskFailed: ") && seen.ends_with("the input was rejected"), "{seen}");

    // A demand no node can ever fit fails clearly instead of hanging.
    let started = Instant::now();
    match ionet::get(&square::options(TaskOptions::default().num_gpus(64.0)).remote(1u64)) {
        Err(IonetError::Infeasible(message)) => {
            assert!(message.contains("GPU: 64"), "{message}");
        }
        other => panic!("expected infeasible, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20));

    // A get that cannot finish in time says so.
    let marker = temp_path("never");
    let _ = std::fs::remove_file(&marker);
    let hanging = crash_once::remote(marker.to_string_lossy().into_owned());
    assert!(matches!(ionet::get_timeout(&hanging, Duration::from_millis(300)), Err(IonetError::Timeout(_))));
    let _ = std::fs::remove_file(&marker);
    ionet::shutdown();
}

fn killed_worker_is_retried_or_reported() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    for (retries, expect_success) in [(2u32, true), (0u32, false)] {
        let marker = temp_path(&format!("crash-{retries}"));
        let _ = std::fs::remove_file(&marker);
        let result = crash_once::options(TaskOptions::default().max_retries(retries))
            .remote(marker.to_string_lossy().into_owned());
        let mut pid = String::new();
        wait_until("the task to record its pid", Duration::from_secs(60), || {
            pid = std::fs::read_to_string(&marker).unwrap_or_default();
            !pid.is_empty()
        });
        // SAFETY: killing the worker process our task runs in.
        unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
        match ionet::get_timeout(&result, Duration::from_secs(60)) {
            Ok(value) => assert!(expect_success && value == 7, "retries {retries}: got {value}"),
            Err(IonetError::WorkerCrashed { attempts, .. }) => {
                assert!(!expect_success && attempts == 1, "retries {retries}")
            }
            Err(other) => panic!("retries {retries}: unexpected {other:?}"),
        }
        let _ = std::fs::remove_file(&marker);
    }
    ionet::shutdown();
}

fn gpu_tasks_get_their_own_devices() {
    ionet::init(InitConfig::default().num_cpus(4.0).num_gpus(2).gpu_type("RTX4090")).unwrap();
    for (per_task, count) in [(1.0, 2usize), (0.5, 4usize)] {
        let dir = temp_path(&format!("gpus-{count}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let options = TaskOptions::default().num_gpus(per_task).num_cpus(0.5);
        let refs: Vec<_> = (0..count)
            .map(|_| rendezvous::options(options.clone()).remote(dir.to_string_lossy().into_owned(), count))
            .collect();
        let seen = ionet::get_all(&refs).unwrap();
        let devices: Vec<String> = seen.iter().map(|(visible, _)| visible.clone()).collect();
        for (visible, ids) in &seen {
            assert_eq!(visible, &ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
            assert_eq!(ids.len(), 1, "each task sees exactly one GPU");
        }
        let distinct: BTreeSet<_> = devices.iter().collect();
        assert_eq!(distinct.len(), 2, "{count} tasks of {per_task} GPU use both GPUs: {devices:?}");
        if count == 4 {
            for device in &distinct {
                assert_eq!(devices.iter().filter(|d| d == device).count(), 2, "two halves per GPU: {devices:?}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    ionet::shutdown();
}

fn thousand_tasks_spread_over_two_nodes() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2"]);
    cluster.add_node(&["--num-cpus", "2"]);
    cluster.init();
    let spread = TaskOptions::default().scheduling_strategy(SchedulingStrategy::Spread);
    let refs: Vec<_> = (0..1000u64).map(|x| square_where::options(spread.clone()).remote(x)).collect();
    let results = ionet::get_all(&refs).unwrap();
    assert_eq!(
        results.iter().map(|(square, _)| *square).collect::<Vec<_>>(),
        (0..1000u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let nodes: BTreeSet<String> = results.into_iter().map(|(_, node)| node).collect();
    assert_eq!(nodes.len(), 2, "tasks ran on both worker nodes: {nodes:?}");
    let mut current = add_one::remote(0u64);
    for _ in 1..100 {
        current = add_one::remote(current);
    }
    assert_eq!(ionet::get(&current).unwrap(), 100);
    drop(cluster);
}

/// A node daemon down for a few seconds, then back at the same address, delays the tasks
/// queued for it: none fails meanwhile, all run once it is back. (Lease requests to it
/// are refused connections, which are worth asking again, not a verdict of infeasible.)
fn queued_tasks_wait_out_a_daemon_restart() {
    // The head keeps the node in its view while it is down (as it would for a daemon
    // restarted under a supervisor), so it keeps spilling the tasks there.
    let mut cluster = Cluster::start_with_env(&["--num-cpus", "0"], &[("IONET_HEARTBEAT_TIMEOUT_MS", "60000")]);
    let port = free_port().to_string();
    let node = ["--num-cpus", "1", "--node-manager-port", port.as_str()];
    let first = cluster.add_node(&node);
    cluster.init();
    let (_, before) = ionet::get(&square_where::remote(1)).unwrap();

    cluster.kill(first);
    let down = Instant::now();
    let refs: Vec<_> = (0..8u64).map(|x| square_where::remote(x)).collect();
    // Longer than the old path's fifty retries (about 5 s) before it gave up as infeasible.
    while down.elapsed() < Duration::from_secs(7) {
        let (ready, _) = ionet::wait(&refs, 1, Some(Duration::from_millis(200))).unwrap();
        if let Some(early) = ready.first() {
            panic!("a task ended while its daemon was down: {:?}", ionet::get(early));
        }
    }
    cluster.add_node(&node);
    let results = ionet::get_all(&refs).unwrap();
    assert_eq!(
        results.iter().map(|(square, _)| *square).collect::<Vec<_>>(),
        (0..8u64).map(|x| x * x).collect::<Vec<_>>()
    );
    let after: BTreeSet<String> = results.into_iter().map(|(_, node)| node).collect();
    assert_eq!(after.len(), 1, "all ran on the restarted daemon: {after:?}");
    assert!(!after.contains(&before), "the restarted daemon is a new node");
    drop(cluster);
}

/// A node SIGKILLed while its tasks run: they run again on the other node without the
/// head having noticed (its heartbeat timeout is a minute): the callers see the broken
/// streams, and the daemon they ask again avoids the node they could not reach.
fn tasks_of_a_killed_node_run_elsewhere_before_the_head_notices() {
    let mut cluster = Cluster::start_with_env(&["--num-cpus", "0"], &[("IONET_HEARTBEAT_TIMEOUT_MS", "60000")]);
    let doomed = cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=b"]);
    cluster.init();
    let (a, b) = (node_named("a").node_id, node_named("b").node_id);
    let on_a = TaskOptions::default().scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a, soft: true });
    // A first task on a, so its workers are up; then a batch that runs there when a dies.
    let (_, first) =
        ionet::get_timeout(&slow_where::options(on_a.clone()).remote(0, 0), Duration::from_secs(60)).unwrap();
    assert_eq!(first, a.hex());
    let refs: Vec<_> = (0..6u64).map(|x| slow_where::options(on_a.clone()).remote(x, 2_000)).collect();
    // The first two finish on a; the rest are running or queued there when it dies.
    let (ready, _) = ionet::wait(&refs, 1, Some(Duration::from_secs(60))).unwrap();
    cluster.kill(doomed);
    let results: Vec<(u64, String)> =
        refs.iter().map(|reference| ionet::get_timeout(reference, Duration::from_secs(30)).unwrap()).collect();
    assert_eq!(results.iter().map(|(x, _)| *x).collect::<Vec<_>>(), (0..6u64).collect::<Vec<_>>());
    let rerun: Vec<_> = refs.iter().zip(&results).filter(|(reference, _)| !ready.contains(reference)).collect();
    assert!(rerun.len() >= 2, "tasks were left on a when it died");
    assert!(rerun.iter().all(|(_, (_, node))| *node == b.hex()), "those ran again on b: {results:?}");
    let head_view = ionet::nodes().unwrap();
    assert!(
        head_view.iter().any(|node| node.node_id == a && node.state == ionet::NodeState::Alive),
        "the head had not yet declared node a dead: recovery did not wait for it"
    );
    drop(cluster);
}

/// A node SIGKILLed while its workers run long tasks: they die with it at once (none is
/// left running unowned until its task ends), whether the node runs them as users of
/// their own (a root daemon: set up between fork and exec) or as its own user (spawned
/// without a fork: the worker sees to it itself).
fn a_killed_nodes_workers_die_with_it() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let own_users = cluster.add_node(&["--num-cpus", "1", "--labels", "name=a"]);
    let daemon_user = cluster.add_node(&["--num-cpus", "1", "--labels", "name=b", "--insecure-workers-as-daemon-user"]);
    cluster.init();
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let node_id = node_named(name).node_id;
        let on = TaskOptions::default()
            .max_retries(0)
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id, soft: false });
        let path = temp_path(&format!("worker-pid-{name}")).to_string_lossy().into_owned();
        let long = pid_then_sleep::options(on).remote(path.clone(), 600_000);
        wait_until("the long task to start", Duration::from_secs(60), || {
            std::fs::read_to_string(&path).is_ok_and(|pid| !pid.is_empty())
        });
        let worker: u32 = std::fs::read_to_string(&path).unwrap().trim().parse().unwrap();
        assert!(!process_gone(worker));
        running.push((long, worker));
    }
    cluster.kill(own_users);
    cluster.kill(daemon_user);
    for (long, worker) in running {
        wait_until("the killed node's worker to die with it", Duration::from_secs(10), || process_gone(worker));
        assert!(ionet::get_timeout(&long, Duration::from_secs(60)).is_err(), "the task failed with its node");
    }
    drop(cluster);
}

/// Notice to leave (SIGTERM) under load: the tasks running on the node finish there (not
/// run twice), tasks asked for it afterwards run on the other node, and the node leaves
/// as soon as its tasks are done, before its deadline.
fn a_node_given_notice_finishes_its_tasks_and_takes_no_new_ones() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let leaving = cluster.add_node(&["--num-cpus", "2", "--labels", "name=a", "--drain-deadline", "60"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=b"]);
    cluster.init();
    let (a, b) = (node_named("a").node_id, node_named("b").node_id);
    let on_a = TaskOptions::default().scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: a, soft: true });
    let markers: Vec<String> =
        (0..2).map(|index| temp_path(&format!("drain-{index}")).to_string_lossy().into_owned()).collect();
    let running: Vec<_> =
        markers.iter().map(|marker| marked_where::options(on_a.clone()).remote(marker.clone(), 3_000)).collect();
    wait_until("both tasks to start on a", Duration::from_secs(60), || {
        markers.iter().all(|marker| std::path::Path::new(marker).exists())
    });
    let asked = Instant::now();
    let notice = std::thread::spawn(move || {
        let took = cluster.terminate(leaving, Duration::from_secs(50));
        (cluster, took)
    });
    // Asked of a while it drains: they run on b.
    let later_marker = temp_path("drain-later").to_string_lossy().into_owned();
    let later: Vec<_> = (0..4).map(|_| marked_where::options(on_a.clone()).remote(later_marker.clone(), 10)).collect();
    for reference in &running {
        assert_eq!(ionet::get_timeout(reference, Duration::from_secs(30)).unwrap(), a.hex(), "finished where it ran");
    }
    for reference in &later {
        assert_eq!(ionet::get_timeout(reference, Duration::from_secs(30)).unwrap(), b.hex(), "no new work on a");
    }
    let (cluster, took) = notice.join().unwrap();
    assert!(took < Duration::from_secs(30), "left once its tasks were done, well before its deadline: {took:?}");
    assert!(asked.elapsed() >= Duration::from_millis(1_000), "it waited for its running tasks");
    let gone = ionet::nodes().unwrap().into_iter().find(|node| node.node_id == a);
    assert!(gone.is_none_or(|node| node.state != ionet::NodeState::Alive), "node a left the cluster");
    for marker in markers.iter().chain([&later_marker]) {
        let _ = std::fs::remove_file(marker);
    }
    drop(cluster);
}

/// `size` bytes of `seed`, past the inline threshold: stored where the task ran.
#[ionet::remote]
fn bulky(seed: u8, size: usize) -> Vec<u8> {
    vec![seed; size]
}

/// Meets `expected - 1` others (each task a CPU of its own), then names its node.
#[ionet::remote]
fn meet_where(dir: String, expected: usize) -> String {
    harness::meet(&dir, expected);
    ionet::get_runtime_context().unwrap().node_id.hex()
}

#[ionet::remote]
fn length_where(data: Vec<u8>) -> (usize, String) {
    (data.len(), ionet::get_runtime_context().unwrap().node_id.hex())
}

/// Bounded views: a head sampling its table at one row per view (`IONET_VIEW_SAMPLE=1`,
/// six nodes: four buckets) sends each node the rows of its own bucket only, so the
/// driver's node does not hold the cluster. It still reaches every node, through the
/// head: five tasks of a CPU each run at once on the five nodes that have one (found by
/// the head's search when nothing in the sample fits, or has room), a task needing a
/// resource one node has runs there, and an object made on one node is read on another
/// pinned by id (each node looks up a node or address its sample misses).
fn a_sampled_view_reaches_nodes_outside_its_sample() {
    let mut cluster = Cluster::start_with_env(&["--num-cpus", "0"], &[("IONET_VIEW_SAMPLE", "1")]);
    for name in ["a", "b", "c", "d"] {
        cluster.add_node(&["--num-cpus", "1", "--labels", &format!("name={name}")]);
    }
    cluster.add_node(&["--num-cpus", "1", "--resources", r#"{"special": 1}"#, "--labels", "name=e"]);
    cluster.init();
    wait_until("the driver's node to keep a sampled view", Duration::from_secs(30), || {
        ionet::testing::local_view().is_some_and(|(_, sampled)| sampled)
    });
    let (in_view, _) = ionet::testing::local_view().unwrap();
    assert!(in_view < 6, "a sample holds fewer than the six nodes: {in_view}");

    let dir = shared_tempdir();
    let meeting = dir.path().to_string_lossy().into_owned();
    let refs: Vec<_> = (0..5).map(|_| meet_where::remote(meeting.clone(), 5)).collect();
    let met: BTreeSet<String> = ionet::get_all(&refs).unwrap().into_iter().collect();
    assert_eq!(met.len(), 5, "five tasks at once on the five nodes with a CPU: {met:?}");

    let special = TaskOptions::default().resource("special", 1.0);
    let (_, node) = ionet::get(&square_where::options(special).remote(3)).unwrap();
    assert_eq!(node, node_named("e").node_id.hex(), "the one node with the resource");

    let (a, b) = (node_named("a").node_id, node_named("b").node_id);
    let on = |node| {
        TaskOptions::default().scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node, soft: false })
    };
    let made = bulky::options(on(a)).remote(7, 2 << 20);
    let (length, reader) = ionet::get(&length_where::options(on(b)).remote(made)).unwrap();
    assert_eq!((length, reader), (2 << 20, b.hex()), "read whole on b, pulled from a");
    ionet::shutdown();
    drop(cluster);
}

/// A tally that takes its time: calls in flight when its node is given notice.
pub struct Tally {
    total: i64,
}

#[ionet::actor]
impl Tally {
    pub fn new() -> Self {
        Tally { total: 0 }
    }

    pub fn add(&mut self, amount: i64, millis: u64) -> i64 {
        std::thread::sleep(Duration::from_millis(millis));
        self.total += amount;
        self.total
    }

    pub fn node(&self) -> String {
        ionet::get_runtime_context().unwrap().node_id.hex()
    }
}

/// Notice to leave under load: the objects whose primary copies the node held (task
/// results nothing could rebuild: `max_retries(0)`) are read back whole after it left,
/// from the node that took them; its restartable actor runs on another node with every
/// call completed; it leaves well before its deadline.
fn a_node_given_notice_moves_its_objects_and_actors() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let leaving = cluster.add_node(&["--num-cpus", "2", "--labels", "name=a", "--drain-deadline", "60"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=b"]);
    cluster.init();
    let a = node_named("a").node_id;
    let pinned = SchedulingStrategy::NodeAffinity { node_id: a, soft: true };
    let on_a = TaskOptions::default().max_retries(0).scheduling_strategy(pinned.clone());
    let made: Vec<ionet::ObjectRef<Vec<u8>>> =
        (0..12u8).map(|seed| bulky::options(on_a.clone()).remote(seed, 512 * 1024)).collect();
    let (ready, _) = ionet::wait(&made, made.len(), Some(Duration::from_secs(60))).unwrap();
    assert_eq!(ready.len(), made.len(), "every value was made on a");
    let options = ionet::ActorOptions::new().max_restarts(1).max_task_retries(-1).scheduling_strategy(pinned);
    let tally = Tally::options(options).remote().unwrap();
    assert_eq!(ionet::get(&tally.node()).unwrap(), a.hex());
    let calls: Vec<_> = (0..30).map(|_| tally.add(1, 20)).collect();

    let took = cluster.terminate(leaving, Duration::from_secs(50));
    assert!(took < Duration::from_secs(30), "it left well before its 60 s deadline: {took:?}");
    let gone = ionet::nodes().unwrap().into_iter().find(|node| node.node_id == a);
    assert!(gone.is_none_or(|node| node.state != ionet::NodeState::Alive), "node a left the cluster");
    for (seed, object) in made.iter().enumerate() {
        let value = ionet::get_timeout(object, Duration::from_secs(30)).unwrap();
        assert!(value.len() == 512 * 1024 && value.iter().all(|&byte| byte == seed as u8), "value {seed} is whole");
    }
    // Their owner frees them where they went: nothing is left behind on any node.
    drop((made, ready));
    let store_bytes = |address: &str| {
        let stats = ionet::testing::object_store_stats(address).unwrap();
        stats.bytes_in_memory + stats.bytes_spilled
    };
    wait_until("the moved objects to be freed", Duration::from_secs(30), || {
        let nodes = ionet::nodes().unwrap();
        nodes.iter().filter(|node| node.state == ionet::NodeState::Alive).all(|node| store_bytes(&node.address) == 0)
    });
    for call in &calls {
        ionet::get_timeout(call, Duration::from_secs(60)).expect("every call completes");
    }
    assert_ne!(ionet::get(&tally.node()).unwrap(), a.hex(), "the actor runs on another node now");
    drop(cluster);
}

/// The `region` label of the node whose id is `node_hex`.
fn region_of(node_hex: &str) -> String {
    let nodes = ionet::nodes().unwrap();
    let node = nodes.iter().find(|node| node.node_id.hex() == node_hex);
    node.and_then(|node| node.labels.get("region").cloned()).unwrap_or_default()
}

/// COST takes the lowest price per GPU-hour; COST_PER_TFLOP the lowest price per
/// TFLOP-hour: an H100 at $1.50 (67 TFLOPS, $0.022 per TFLOP-hour) before an A100 at $1.00
/// (19.5 TFLOPS, $0.051), by the published figures of these simulated models.
fn cost_per_tflop_prefers_the_gpu_cheapest_for_its_work() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    for (model, region, price) in [("A100-80GB", "us", "1.0"), ("H100", "ap", "1.5")] {
        let labels = format!("region={region}");
        cluster.add_node(&[
            "--num-cpus",
            "2",
            "--num-gpus",
            "1",
            "--gpu-type",
            model,
            "--labels",
            &labels,
            "--price-per-gpu-hour",
            price,
        ]);
    }
    cluster.ionet(&["credits", "add", "--account", "default", "--amount", "10"]);
    cluster.init();
    let run = |strategy: SchedulingStrategy| {
        let options = TaskOptions::default().num_gpus(1.0).scheduling_strategy(strategy);
        let (_, node) =
            ionet::get_timeout(&square_where::options(options).remote(3u64), Duration::from_secs(60)).unwrap();
        region_of(&node)
    };
    for _ in 0..2 {
        assert_eq!(run(SchedulingStrategy::Cost), "us", "COST: the lower price per GPU-hour");
        assert_eq!(run(SchedulingStrategy::CostPerTflop), "ap", "COST_PER_TFLOP: the lower price per TFLOP-hour");
    }
    assert_eq!("cost_per_tflop".parse::<SchedulingStrategy>().unwrap(), SchedulingStrategy::CostPerTflop);
    assert_eq!(SchedulingStrategy::CostPerTflop.to_string(), "COST_PER_TFLOP");
}

/// `COST` picks the cheaper of two fitting nodes; label selectors (Ray's forms) pick by
/// label, and one no node matches is refused as infeasible.
fn cost_and_label_selectors_choose_the_node() {
    let gpu_node = |region: &str, price: &str| {
        let labels = format!("region={region}");
        let args = ["--num-cpus", "2", "--num-gpus", "1", "--gpu-type", "A100-80GB", "--labels", &labels];
        [args.as_slice(), &["--price-per-gpu-hour", price]].concat().iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    for (region, price) in [("eu", "3.0"), ("us", "1.0")] {
        let args = gpu_node(region, price);
        cluster.add_node(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // Priced GPUs need credit to lease (the driver's jobs are paid by `default`).
    cluster.ionet(&["credits", "add", "--account", "default", "--amount", "10"]);
    cluster.init();
    let run = |options: TaskOptions| {
        ionet::get_timeout(&square_where::options(options).remote(3u64), Duration::from_secs(60)).map(|(_, node)| node)
    };
    let gpu = TaskOptions::default().num_gpus(1.0);
    for _ in 0..3 {
        let node = run(gpu.clone().scheduling_strategy(SchedulingStrategy::Cost)).unwrap();
        assert_eq!(region_of(&node), "us", "COST chose the dearer node");
    }
    assert_eq!("cost".parse::<SchedulingStrategy>().unwrap(), SchedulingStrategy::Cost);
    assert!(matches!("cheapest".parse::<SchedulingStrategy>(), Err(IonetError::InvalidArgument(_))));
    for (selector, region) in [("eu", "eu"), ("!eu", "us"), ("in(eu, asia)", "eu"), ("!in(eu,asia)", "us")] {
        for _ in 0..3 {
            let node = run(TaskOptions::default().label_selector("region", selector)).unwrap();
            assert_eq!(region_of(&node), region, "label_selector region={selector}");
        }
    }
    // The only matching node busy: the task waits for it, never goes to the other.
    let us = TaskOptions::default().label_selector("region", "us");
    let busy: Vec<_> = (0..2).map(|_| hold_gpus::options(us.clone()).remote(1500u64)).collect();
    let node = run(TaskOptions::default().label_selector("region", "!eu")).unwrap();
    assert_eq!(region_of(&node), "us", "a task waiting for its labelled node went elsewhere");
    ionet::get_all(&busy).unwrap();
    match run(TaskOptions::default().label_selector("region", "asia")) {
        Err(IonetError::Infeasible(message)) => assert!(message.contains("region"), "{message}"),
        other => panic!("no node is in asia: the task must be refused as infeasible, got {other:?}"),
    }
    match run(TaskOptions::default().label_selector("region", "in(eu")) {
        Err(IonetError::InvalidArgument(message)) => assert!(message.contains("label_selector"), "{message}"),
        other => panic!("a malformed selector must be refused, got {other:?}"),
    }
    drop(cluster);
}

#[ionet::remote]
fn hold_gpus(millis: u64) -> Vec<u32> {
    std::thread::sleep(Duration::from_millis(millis));
    ionet::get_gpu_ids()
}

/// A head with no CPUs and one provider node: 2 CPUs, 2 A100s at $1.20/GPU-hour, paying
/// `wallet`, with `extra` arguments.
fn provider_cluster(wallet: &str, extra: &[&str]) -> Cluster {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let node = ["--num-cpus", "2", "--num-gpus", "2", "--gpu-type", "A100-80GB", "--price-per-gpu-hour", "1.20"];
    cluster.add_node(&[&node[..], &["--wallet", wallet], extra].concat());
    cluster
}

/// A payer with about three seconds of credit for one GPU: its jobs lease GPUs until the
/// credit no longer covers a second more (the head's credit horizon), then its work is
/// refused with an error naming the account, its balance and what is needed; the
/// provider is credited for what ran.
fn an_unfunded_payer_gets_no_more_gpus() {
    let mut cluster = Cluster::start(&["--num-cpus", "0", "--credit-horizon", "1s"]);
    let node = ["--num-cpus", "2", "--num-gpus", "2", "--gpu-type", "A100-80GB", "--price-per-gpu-hour", "1.20"];
    cluster.add_node(&[&node[..], &["--wallet", "wallet-thrift"]].concat());
    // $1.23 an hour with the fee: 342 micro-USD a second.
    cluster.ionet(&["credits", "add", "--account", "acme", "--amount", "0.001"]);
    cluster.init_as("acme");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ended_running = 0;
    let refusal = loop {
        assert!(Instant::now() < deadline, "a payer with $0.001 leased GPUs for a minute");
        match ionet::get(&hold_gpus::options(TaskOptions::default().num_gpus(1.0).max_retries(0)).remote(300u64)) {
            Ok(_) => {}
            // A lease held on (reused for the next task) runs until the credit is gone,
            // then ends under its task; the next lease is refused.
            Err(error) if error.to_string().contains("crashed") => ended_running += 1,
            Err(error) => break error.to_string(),
        }
    };
    assert!(ended_running <= 3, "{ended_running} running leases ended before leases were refused");
    for part in ["account \"acme\" cannot cover its leases", "balance $0.001000", "the next 1.0 s need $"] {
        assert!(refusal.contains(part), "{part:?} in {refusal}");
    }
    ionet::shutdown();
    let usage: serde_json::Value = serde_json::from_str(&cluster.ionet(&["usage", "--json"])).unwrap();
    let billed: u64 = usage.as_array().unwrap().iter().map(|record| record["cost_micros"].as_u64().unwrap()).sum();
    assert!(billed > 0 && billed <= 1_000 + 200, "billed {billed} micro-USD against $0.001 of credit: {usage:#}");
}

/// A job holding 2 GPUs on a $1.20/GPU-hour node is charged for the interval the
/// control plane measured, and the provider is credited.
fn gpu_lease_is_metered_and_settled_to_the_provider() {
    let cluster = provider_cluster("wallet-eu-1", &["--power-watts", "700", "--electricity-price", "0.15"]);
    cluster.ionet(&["credits", "add", "--account", "acme", "--amount", "100"]);
    cluster.init_as("acme");
    let started = Instant::now();
    let gpus = ionet::get(&hold_gpus::options(TaskOptions::default().num_gpus(2.0)).remote(2_000u64)).unwrap();
    assert_eq!(gpus.len(), 2);
    let job = ionet::get_runtime_context().unwrap().job_id.hex();
    // The bill, live while the job runs.
    let live: serde_json::Value = serde_json::from_str(&cluster.ionet(&["job", "cost", &job, "--json"])).unwrap();
    assert_eq!((live["running"].as_bool(), live["payer_account"].as_str()), (Some(true), Some("acme")), "{live:#}");
    assert_eq!(live["lines"][0]["gpu_model"], "A100-80GB", "{live:#}");
    ionet::shutdown(); // returns the lease now
    let held_at_most = started.elapsed().as_millis() as u64;

    let mut record = serde_json::Value::Null;
    wait_until("the lease to be recorded as ended", Duration::from_secs(30), || {
        let usage: serde_json::Value = serde_json::from_str(&cluster.ionet(&["usage", "--json"])).unwrap();
        let records = usage.get("records").cloned().unwrap_or(usage);
        record = records
            .as_array()
            .unwrap()
            .iter()
            .find(|record| record["resources"]["GPU"] == 2.0 && record["open"] == false)
            .cloned()
            .unwrap_or_default();
        !record.is_null()
    });
    let duration = record["duration_ms"].as_u64().unwrap();
    assert!(
        duration >= 2_000 && duration <= held_at_most,
        "lease of {duration} ms, task 2000 ms, held at most {held_at_most} ms"
    );
    assert_eq!(record["provider_wallet"], "wallet-eu-1");
    assert_eq!(record["payer_account"], "acme");
    let expected = duration as f64 * 2.0 * 1_200_000.0 / 3_600_000.0;
    let cost = record["cost_micros"].as_f64().unwrap();
    assert!(
        (cost - expected).abs() <= expected * 0.01,
        "charged {cost} micro-USD for {duration} ms of 2 GPUs at $1.20/h, expected {expected}"
    );

    // The receipt: each lease's seconds at its quoted price is its cost, plus the fee.
    let receipt: serde_json::Value = serde_json::from_str(&cluster.ionet(&["job", "cost", &job, "--json"])).unwrap();
    assert_eq!(receipt["running"], false, "{receipt:#}");
    let line = &receipt["lines"][0];
    let (seconds, price) = (line["seconds"].as_f64().unwrap(), line["price_per_gpu_hour_micros"].as_f64().unwrap());
    let quoted = seconds * 2.0 * price / 3600.0;
    assert!((line["cost_micros"].as_f64().unwrap() - quoted).abs() <= 1.0, "{line:#}: {quoted}");
    assert_eq!(line["fee_micros"].as_u64().unwrap(), line["cost_micros"].as_u64().unwrap() * 250 / 10_000);
    assert_eq!(
        receipt["total_micros"],
        receipt["total_cost_micros"].as_u64().unwrap() + receipt["total_fee_micros"].as_u64().unwrap()
    );
    let csv = cluster.ionet(&["job", "cost", &job, "--csv"]);
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("lease_id,record_id,node_id,gpu_model,") && rows.len() == 2, "{csv}");
    assert!(rows[1].contains(",A100-80GB,\"") && rows[1].ends_with(",false"), "{csv}");
    let table = cluster.ionet(&["job", "cost", &job]);
    let ended = table.contains("ended by holder") || table.contains("ended by node");
    assert!(table.contains("finished") && ended, "{table}");

    cluster.ionet(&["settle"]);
    let balances: serde_json::Value = serde_json::from_str(&cluster.ionet(&["ledger", "balances", "--json"])).unwrap();
    let balance = |suffix: &str| {
        balances["balances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["account"].as_str().unwrap().ends_with(suffix))
            .map(|row| row["balance_micros"].as_f64().unwrap())
            .unwrap_or_else(|| panic!("no account {suffix} in {balances:#}"))
    };
    let provider = balance("wallet-eu-1");
    assert!((provider - expected).abs() <= expected * 0.01, "provider credited {provider}, expected {expected}");
    let payer = balance("acme");
    let fee = (provider * 250.0 / 10_000.0).floor();
    assert!((100_000_000.0 - payer - provider - fee).abs() <= 1.0, "payer {payer}, provider {provider}, fee {fee}");
    assert_eq!(balances["sum_micros"], 0);

    // The provider's earnings show its power cost beside revenue: 700 W at $0.15/kWh.
    let earnings: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["earnings", "--wallet", "wallet-eu-1", "--json"])).unwrap();
    let epoch = &earnings["epochs"][0];
    let uptime = epoch["uptime_ms"].as_u64().unwrap();
    assert!(uptime > 0, "{earnings:#}");
    assert_eq!(epoch["power_cost_micros"].as_u64().unwrap(), 700 * uptime * 150_000 / 3_600_000_000, "{earnings:#}");
    assert_eq!(epoch["revenue_micros"].as_f64().unwrap(), provider, "{earnings:#}");
}

/// A placement-group bundle holding a GPU is billed from its reservation to its removal,
/// once: the task that ran inside it is not billed again.
fn placement_group_bundle_is_metered_once() {
    let cluster = provider_cluster("wallet-pg", &[]);
    cluster.ionet(&["credits", "add", "--account", "acme", "--amount", "100"]);
    cluster.init_as("acme");
    let bundle = [("GPU".to_string(), 1.0), ("CPU".to_string(), 1.0)].into_iter().collect();
    let group = ionet::placement_group(vec![bundle], ionet::PlacementStrategy::StrictPack).unwrap();
    assert!(group.wait(Duration::from_secs(30)).unwrap(), "the group was placed");
    let placed = Instant::now();
    let inside = TaskOptions::default().num_gpus(1.0).placement_group(&group, 0);
    assert_eq!(ionet::get(&hold_gpus::options(inside).remote(500u64)).unwrap().len(), 1);
    // The user keeps the reservation, idle, for a while: a reserved GPU is billed too.
    std::thread::sleep(Duration::from_millis(2_000).saturating_sub(placed.elapsed()));
    ionet::remove_placement_group(&group).unwrap();

    let mut gpu_records = Vec::new();
    wait_until("the bundle's lease to be recorded as ended", Duration::from_secs(30), || {
        let usage: serde_json::Value = serde_json::from_str(&cluster.ionet(&["usage", "--json"])).unwrap();
        let records = usage.get("records").cloned().unwrap_or(usage);
        gpu_records = records.as_array().unwrap().iter().filter(|r| r["resources"]["GPU"] == 1.0).cloned().collect();
        !gpu_records.is_empty() && gpu_records.iter().all(|record| record["open"] == false)
    });
    assert_eq!(gpu_records.len(), 1, "one lease for the bundle, none for the task inside: {gpu_records:#?}");
    let record = &gpu_records[0];
    let duration = record["duration_ms"].as_u64().unwrap();
    assert!(duration >= 2_000, "the bundle was held 2000 ms (its task ran 500 ms), billed {duration} ms");
    assert_eq!(record["provider_wallet"], "wallet-pg");
    assert_eq!(record["payer_account"], "acme");
    let expected = duration as f64 * 1_200_000.0 / 3_600_000.0;
    let cost = record["cost_micros"].as_f64().unwrap();
    assert!((cost - expected).abs() <= expected * 0.01, "charged {cost}, expected {expected}");
    ionet::shutdown();
}

/// Prints a line naming the node it runs on.
#[ionet::remote]
fn shout(node: String) -> u32 {
    println!("hello from node {node}");
    std::process::id()
}

/// Prints the same line as every other call, once `expected` calls run at once (each in a
/// worker of its own).
#[ionet::remote]
fn chant(dir: String, expected: usize) -> u32 {
    harness::meet(&dir, expected);
    println!("the same line");
    std::process::id()
}

/// Prints lines of one kind (they differ only in a number) from one worker.
#[ionet::remote]
fn count_epochs() -> u32 {
    for epoch in 1..=3 {
        println!("epoch {epoch} done");
    }
    3
}

/// The id (hex) of the node labelled `name=<name>`, read with the operator's `ionet status`.
fn node_named_in(cluster: &Cluster, name: &str) -> String {
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&["status", "--json"])).unwrap();
    let node =
        nodes.iter().find(|node| node["labels"]["name"] == name).unwrap_or_else(|| panic!("no node {name}: {nodes:?}"));
    node["node_id"].as_str().unwrap().to_string()
}

/// Workers printing the same line at once in the printing driver.
const CHANTS: usize = 8;

/// A detached actor that prints (its output is read by `ionet logs --actor`).
pub struct Crier;

#[ionet::actor]
impl Crier {
    pub fn new() -> Self {
        Crier
    }

    pub fn cry(&mut self, what: String) -> u32 {
        println!("the crier cries {what}");
        std::process::id()
    }
}

/// Holds its resources until `path` exists (at most 60 s).
#[ionet::remote]
fn hold_until(path: String) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(&path).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    1
}

/// Set in a re-executed test binary that plays the driver whose tasks the state API lists
/// (its value: the session, then the file that ends it).
const STATE_DRIVER_ENV: &str = "IONET_TEST_STATE_DRIVER";

/// An actor that keeps the refs it is given (borrowed from the driver) and says where it
/// runs.
pub struct Holder {
    refs: Vec<ionet::ObjectRef<Vec<u8>>>,
}

#[ionet::actor]
impl Holder {
    pub fn new() -> Self {
        Holder { refs: Vec::new() }
    }

    pub fn hold(&mut self, refs: Vec<ionet::ObjectRef<Vec<u8>>>) -> u32 {
        self.refs = refs;
        std::process::id()
    }

    pub fn node(&self) -> String {
        ionet::get_runtime_context().unwrap().node_id.hex()
    }
}

/// 1,000 tasks on two nodes (100 of them named `ping`), one that fails, one holding the
/// only GPU and one waiting for it; 10 actors, one of them keeping an 8 MiB object the
/// driver put, and one waiting for the GPU with a call queued for it; says what it made,
/// then `ready`, then waits for `release` to exist.
fn state_driver(session: &str, release: &str) {
    let config = InitConfig { session_dir: Some(session.into()), ..Default::default() };
    ionet::init(config.address("auto")).unwrap();
    println!("job {}", ionet::get_runtime_context().unwrap().job_id.hex());
    let spread = || TaskOptions::default().scheduling_strategy(SchedulingStrategy::Spread);
    let squares: Vec<_> = (0..900).map(|x| square::options(spread()).remote(x)).collect();
    let pings: Vec<_> = (0..100).map(|x| square::options(spread().name("ping")).remote(x)).collect();
    ionet::get_all(&squares).unwrap();
    ionet::get_all(&pings).unwrap();
    assert!(ionet::get_timeout(&boom::remote("the model diverged".to_string()), Duration::from_secs(60)).is_err());
    let gpu = || TaskOptions::default().num_gpus(1.0).num_cpus(0.0);
    let holder = hold_until::options(gpu()).remote(release.to_string());
    let waiter = hold_until::options(gpu().name("gpu waiter")).remote(release.to_string());
    let spread_actor = || ionet::actor::ActorOptions::new().scheduling_strategy(SchedulingStrategy::Spread);
    let holders: Vec<HolderHandle> = (0..10).map(|_| Holder::options(spread_actor()).remote().unwrap()).collect();
    let placed: Vec<String> = holders
        .iter()
        .map(|holder| format!("{}={}", holder.actor_handle().id().hex(), ionet::get(&holder.node()).unwrap()))
        .collect();
    println!("actors {}", placed.join(","));
    // The GPU actor only once a task holds the GPU (it must wait, not take it first).
    let deadline = Instant::now() + Duration::from_secs(60);
    while ionet::nodes().unwrap().iter().any(|node| node.available.get("GPU").as_f64() > 0.0) {
        assert!(Instant::now() < deadline, "no task took the GPU within a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gpu_actor = Holder::options(ionet::actor::ActorOptions::new().num_gpus(1.0).num_cpus(0.0)).remote().unwrap();
    let _queued = gpu_actor.node();
    let big = ionet::put(&vec![5u8; 8 << 20]).unwrap();
    println!(
        "big {} held by {} and {}",
        big.id().hex(),
        std::process::id(),
        ionet::get(&holders[0].hold(vec![big.clone()])).unwrap()
    );
    println!("ready");
    ionet::get_timeout(&holder, Duration::from_secs(90)).unwrap();
    // The GPU may have gone to the actor: the waiting task has it once the actor is gone.
    ionet::kill(&gpu_actor, true).unwrap();
    ionet::get_timeout(&waiter, Duration::from_secs(90)).unwrap();
    drop((big, holders));
    ionet::shutdown();
}

/// The state API on a running two-node cluster: `ionet list tasks` lists a job's 1,000
/// tasks finished on both nodes, a failed one with its error, one waiting for the GPU
/// another holds with that reason, and its actors' calls where they ran; `ionet summary
/// tasks` counts them; `ionet timeline` writes 100 `ping` slices on two nodes as Chrome
/// trace JSON.
fn the_state_api_lists_a_jobs_tasks_with_states_nodes_and_reasons() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "2", "--num-gpus", "1", "--gpu-type", "A100-80GB", "--labels", "name=b"]);
    let release = temp_path("release");
    let mut driver = std::process::Command::new(std::env::current_exe().unwrap())
        .env(STATE_DRIVER_ENV, format!("{}\n{}", cluster.session().display(), release.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(driver.stdout.take().unwrap()));
    let job = lines.next().unwrap().unwrap().strip_prefix("job ").expect("the driver names its job").to_string();
    // What the driver made, on lines of their own (its workers' output may come between).
    let mut said = std::collections::BTreeMap::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some((word, rest)) = line.split_once(' ').filter(|(word, _)| ["actors", "big"].contains(word)) {
            said.insert(word.to_string(), rest.to_string());
        }
    }
    let actors: Vec<(String, String)> = said["actors"]
        .split(',')
        .map(|placed| placed.split_once('=').map(|(actor, node)| (actor.to_string(), node.to_string())).unwrap())
        .collect();
    let big: Vec<&str> = said["big"].split(' ').collect();
    let (big_id, driver_pid, holder_pid) = (big[0].to_string(), big[3].to_string(), big[5].to_string());

    let list = |extra: &[&str]| -> Vec<serde_json::Value> {
        let args: Vec<&str> =
            ["list", "tasks", "--job", job.as_str(), "--json"].iter().copied().chain(extra.iter().copied()).collect();
        serde_json::from_str(&cluster.ionet(&args)).unwrap()
    };
    // Events reach the head within a second or two of happening.
    wait_until("the job's tasks listed as they are", Duration::from_secs(30), || {
        let waiting = list(&["--state", "PENDING_NODE_ASSIGNMENT", "--filter", "type=NORMAL_TASK"]);
        waiting.len() == 1
            && waiting[0]["name"] == "gpu waiter"
            && list(&["--state", "PENDING_NODE_ASSIGNMENT", "--filter", "type=ACTOR_TASK"]).len() == 1
            && list(&["--state", "FAILED"]).len() == 1
            && list(&["--state", "RUNNING"]).len() == 1
            && list(&["--state", "FINISHED", "--filter", "type=NORMAL_TASK"]).len() == 1_000
            && list(&["--state", "FINISHED", "--filter", "type=ACTOR_TASK"]).len() == 11
            && list(&["--state", "FINISHED", "--filter", "type=ACTOR_CREATION_TASK"]).len() == 10
            && list(&["--state", "PENDING_NODE_ASSIGNMENT", "--filter", "type=ACTOR_CREATION_TASK"]).len() == 1
    });
    let finished = list(&["--state", "FINISHED", "--filter", "type=NORMAL_TASK"]);
    let nodes: BTreeSet<&str> = finished.iter().map(|task| task["node_id"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "finished on both nodes");
    assert!(finished.iter().all(|task| task["start_time_ms"].as_u64() <= task["end_time_ms"].as_u64()));
    let waiting = &list(&["--state", "PENDING_NODE_ASSIGNMENT", "--filter", "type=NORMAL_TASK"])[0];
    assert_eq!(waiting["name"], "gpu waiter");
    assert!(waiting["pending_reason"].as_str().unwrap().contains("GPU: 1"), "{waiting}");
    let failed = list(&["--state", "FAILED"]);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["name"], "tasks::boom", "a Rust task is named by its function's path");
    assert!(failed[0]["error_message"].as_str().unwrap().contains("the model diverged"), "{}", failed[0]);
    let running = list(&["--state", "RUNNING"]);
    assert_eq!(running.len(), 1, "the GPU holder runs: {running:?}");
    // Its actors' calls are tasks too (`Class.method`): each `node` call ran where its
    // actor lives.
    let calls = list(&["--name", "tasks::Holder.node", "--state", "FINISHED"]);
    assert_eq!(calls.len(), 10, "{calls:?}");
    for call in &calls {
        let actor = call["actor_id"].as_str().unwrap_or_else(|| panic!("an actor task names its actor: {call}"));
        let node = &actors.iter().find(|(id, _)| id == actor).expect("a call of one of the driver's actors").1;
        assert_eq!(
            (call["type"].as_str(), call["state"].as_str(), call["node_id"].as_str()),
            (Some("ACTOR_TASK"), Some("FINISHED"), Some(node.as_str())),
            "{call}"
        );
        assert!(call["start_time_ms"].as_u64() <= call["end_time_ms"].as_u64(), "{call}");
    }
    assert_eq!(list(&["--name", "tasks::Holder.hold"]).len(), 1);
    // Each actor's creation is a task too (`Class.__init__`), run where the actor lives;
    // the GPU actor's waits, saying for what.
    let created = list(&["--filter", "type=ACTOR_CREATION_TASK", "--state", "FINISHED"]);
    for creation in &created {
        let actor = creation["actor_id"].as_str().unwrap();
        let node = &actors.iter().find(|(id, _)| id == actor).expect("a creation of one of the driver's actors").1;
        assert_eq!(
            (creation["name"].as_str(), creation["node_id"].as_str(), creation["attempt_number"].as_u64()),
            (Some("tasks::Holder.__init__"), Some(node.as_str()), Some(0)),
            "{creation}"
        );
        assert!(creation["start_time_ms"].as_u64() <= creation["end_time_ms"].as_u64(), "{creation}");
    }
    let creating = &list(&["--filter", "type=ACTOR_CREATION_TASK", "--state", "PENDING_NODE_ASSIGNMENT"])[0];
    assert!(creating["pending_reason"].as_str().unwrap().contains("GPU: 1"), "{creating}");
    // A call to an actor still waiting for the GPU is queued, and says for what.
    let queued = list(&["--name", "tasks::Holder.node", "--state", "PENDING_NODE_ASSIGNMENT"]);
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(
        queued[0]["pending_reason"].as_str().unwrap().starts_with("queued for actor tasks::Holder"),
        "{}",
        queued[0]
    );

    let summary = cluster.ionet(&["summary", "tasks", "--job", &job]);
    assert!(summary.contains("FINISHED: 900") && summary.contains("FINISHED: 100"), "{summary}");
    let trace_path = temp_path("trace.json");
    let trace_file = trace_path.to_string_lossy().into_owned();
    cluster.ionet(&["timeline", "--job", &job, "--name", "ping", "-o", &trace_file]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
    let slices: Vec<&serde_json::Value> =
        trace["traceEvents"].as_array().unwrap().iter().filter(|event| event["ph"] == "X").collect();
    assert_eq!(slices.len(), 100);
    let pids: BTreeSet<u64> = slices.iter().map(|slice| slice["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 2, "slices on two nodes");
    assert!(slices.iter().all(|slice| slice["name"] == "ping" && slice["dur"].is_u64()));
    cluster.ionet(&["timeline", "--job", &job, "--name", "tasks::Holder.node", "-o", &trace_file]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace_path).unwrap()).unwrap();
    let calls = trace["traceEvents"].as_array().unwrap().iter().filter(|event| event["ph"] == "X").count();
    assert_eq!(calls, 10, "an actor's calls are slices of the timeline too");

    // The nodes and the job, as `ionet list` shows them.
    let nodes: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ionet(&["list", "nodes", "--json", "--filter", "state=alive"])).unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ionet(&["list", "jobs", "--json", "--filter", &format!("job_id={job}")]))
            .unwrap();
    assert_eq!(
        (jobs.len(), jobs[0]["status"].as_str(), jobs[0]["type"].as_str()),
        (1, Some("RUNNING"), Some("DRIVER"))
    );
    let table = cluster.ionet(&["list", "nodes"]);
    assert!(table.starts_with("NODE_ID") && table.contains("ALIVE") && table.contains("3 rows"), "{table}");
    let refused = cluster.ionet_fails(&["list", "nodes", "--filter", "colour=red"]);
    assert!(refused.contains("no field \"colour\" to filter on"), "{refused}");

    // Its 10 actors (spread), alive where they say they run.
    let listed: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&["list", "actors", "--json"])).unwrap();
    for (actor, node) in &actors {
        let row = listed.iter().find(|row| row["actor_id"] == actor.as_str()).expect("every actor listed");
        assert_eq!((row["state"].as_str(), row["node_id"].as_str()), (Some("ALIVE"), Some(node.as_str())), "{row}");
    }
    // SPREAD sends actors round the nodes (all three: they use no CPU while they run).
    assert_eq!(actors.iter().map(|(_, node)| node).collect::<BTreeSet<_>>().len(), 3, "actors on every node");

    // `ionet memory` names the holders of the large object: the driver that put it, the
    // actor that keeps it, and the node whose store has it.
    let objects: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&[
        "list",
        "objects",
        "--json",
        "--filter",
        &format!("object_id={big_id}"),
    ]))
    .unwrap();
    let holder =
        |kind: &str| objects.iter().find(|row| row["type"] == kind).unwrap_or_else(|| panic!("{kind} in {objects:?}"));
    let driver_row = holder("DRIVER");
    assert_eq!(driver_row["pid"].to_string(), driver_pid);
    assert_eq!(driver_row["reference_type"], "LOCAL_REFERENCE");
    assert_eq!(driver_row["task_status"], "IN_STORE");
    assert_eq!(driver_row["object_size"].as_u64().map(|size| size >= 8 << 20), Some(true), "{driver_row}");
    assert_eq!(driver_row["store_node_ids"].as_array().map(Vec::len), Some(1), "{driver_row}");
    let actor_row = holder("WORKER");
    assert_eq!(
        (actor_row["pid"].to_string(), actor_row["reference_type"].as_str()),
        (holder_pid.clone(), Some("BORROWED"))
    );
    assert_eq!(actor_row["object_size"], driver_row["object_size"], "sized by the store");
    let memory = cluster.ionet(&["memory", "--job", &job]);
    let holding: Vec<&str> = memory.lines().filter(|line| line.contains(&big_id[..16])).collect();
    let driver_line = holding.iter().find(|line| line.contains("DRIVER")).unwrap_or_else(|| panic!("{memory}"));
    assert!(driver_line.contains(&driver_pid) && driver_line.contains("8.0 MiB"), "{memory}");
    let actor_line = holding.iter().find(|line| line.contains("WORKER")).unwrap_or_else(|| panic!("{memory}"));
    assert!(actor_line.contains(&holder_pid) && actor_line.contains("BORROWED"), "{memory}");
    let summary = cluster.ionet(&["summary", "objects", "--job", &job]);
    assert!(summary.contains("BORROWED") && summary.contains("LOCAL_REFERENCE"), "{summary}");

    // Another account sees none of it.
    let created: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["account", "create", "rival", "--json"])).unwrap();
    let rival = created["api_key"].as_str().unwrap();
    let theirs = cluster.ionet(&["list", "tasks", "--job", &job, "--json", "--credential", rival]);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&theirs).unwrap().len(), 0);
    let theirs = cluster.ionet(&["list", "objects", "--json", "--credential", rival]);
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&theirs).unwrap().len(), 0, "{theirs}");
    std::fs::write(&release, "go").unwrap();
    assert!(driver.wait().unwrap().success());
}

/// A process's resident memory, in KiB (Linux's /proc).
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A million tasks submitted at once by one driver on a real cluster, every one recorded
/// (the driver's rate raised past what it submits): the driver's `remote()` waits while
/// too many are pending, so its memory stays bounded; the head keeps at most its bound of
/// task rows for the job's account, forgets the oldest ones and counts them (none lost
/// uncounted), and its memory stops growing once the bound is reached.
fn a_million_tasks_keep_the_heads_task_events_bounded() {
    let tasks: u64 = 1_000_000;
    const PENDING: usize = 50_000;
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2"]);
    // Read once, by the recorder `init` starts (the daemons are started already).
    std::env::set_var("IONET_TASK_EVENTS_PER_SECOND", "1000000");
    std::env::set_var(ionet::task::MAX_PENDING_TASKS_ENV, PENDING.to_string());
    cluster.init();
    std::env::remove_var("IONET_TASK_EVENTS_PER_SECOND");
    std::env::remove_var(ionet::task::MAX_PENDING_TASKS_ENV);
    let job = ionet::get_runtime_context().unwrap().job_id.hex();
    // The driver's (this process's) and the head's memory, and the driver's pending
    // tasks, sampled throughout.
    let driver_before = resident_kib(std::process::id());
    let done = Arc::new(AtomicBool::new(false));
    let head = cluster.pid(0);
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut driver_peak, mut pending_peak, mut head_resident) = (0, 0, Vec::new());
            while !done.load(Ordering::SeqCst) {
                driver_peak = driver_peak.max(resident_kib(std::process::id()));
                pending_peak = pending_peak.max(ionet::task::pending_tasks());
                head_resident.push(resident_kib(head));
                std::thread::sleep(Duration::from_millis(50));
            }
            (driver_peak, pending_peak, head_resident)
        })
    };
    let started = Instant::now();
    let refs: Vec<_> = (0..tasks).map(square::remote).collect();
    let submitted = started.elapsed();
    let driver_submitted = resident_kib(std::process::id());
    let values = ionet::get_all(&refs).unwrap();
    assert_eq!(values.len() as u64, tasks);
    assert_eq!(values.last(), Some(&((tasks - 1) * (tasks - 1))));
    let finished = started.elapsed();
    drop((refs, values));
    done.store(true, Ordering::SeqCst);
    let (driver_peak, pending_peak, resident) = sampler.join().unwrap();
    eprintln!(
        "{tasks} tasks submitted in {submitted:?}, all done in {finished:?}; driver resident {driver_before} KiB \
         before, {driver_submitted} KiB once submitted, {driver_peak} KiB at most; at most {pending_peak} pending"
    );
    assert!(pending_peak <= PENDING, "remote() waits while {PENDING} are pending: {pending_peak} were");
    // Bounded: its pending tasks and a million settled return values (the refs this
    // driver holds), not a million tasks in flight, nor what they freed.
    let grown = driver_peak.saturating_sub(driver_before);
    assert!(grown < 1536 * 1024, "the driver grew by {grown} KiB");
    // Every task is listed, or counted as forgotten or dropped: none goes uncounted.
    let counted = |printed: &str| -> (u64, u64, u64) {
        let shown = printed.lines().find(|line| line.ends_with("matching tasks shown")).expect(printed);
        let total: u64 = shown.split(' ').nth(2).unwrap().parse().unwrap();
        let note = printed.lines().find(|line| line.starts_with("note: ")).unwrap_or_default();
        let numbers: Vec<u64> = note.split(' ').filter_map(|word| word.parse().ok()).collect();
        (total, numbers.first().copied().unwrap_or(0), numbers.get(1).copied().unwrap_or(0))
    };
    let mut last = (0, 0, 0);
    wait_until("every task's events counted by the head", Duration::from_secs(60), || {
        last = counted(&cluster.run_ionet_output(&["list", "tasks", "--job", &job, "--limit", "1"]));
        let (listed, dropped, forgotten) = last;
        listed + forgotten >= tasks.saturating_sub(dropped)
    });
    let (listed, dropped, forgotten) = last;
    eprintln!("listed {listed}, dropped on the way {dropped}, forgotten {forgotten}");
    assert!(listed <= 50_000, "the head keeps at most its bound of one account's tasks: {listed}");
    assert!(dropped < tasks / 100, "the driver recorded (nearly) every task: {last:?}");
    assert!(forgotten >= tasks - 50_000 - dropped, "the rest forgotten and counted: {last:?}");
    // Past the bound the head grows no more: its memory at the end is that around the
    // middle, give or take what an allocator keeps.
    let middle = resident[resident.len() / 2 - 2..resident.len() / 2 + 2].iter().max().unwrap();
    let end = resident[resident.len() - 4..].iter().max().unwrap();
    assert!(end < &(middle + middle / 10), "the head grew from {middle} KiB to {end} KiB over the second half");
    ionet::shutdown();
    drop(cluster);
}

/// Set in a re-executed test binary that plays a driver whose output is read.
const PRINTING_DRIVER_ENV: &str = "IONET_TEST_PRINTING_DRIVER";

/// The driver whose output `what_tasks_print_reaches_the_driver_prefixed_and_folded`
/// reads: tasks print on two nodes, then 8 workers print the same line, then one worker
/// prints three lines of one kind.
fn printing_driver(session: String) {
    let config = InitConfig { session_dir: Some(session.into()), ..Default::default() };
    ionet::init(config.address("auto")).unwrap();
    println!("job {}", ionet::get_runtime_context().unwrap().job_id.hex());
    for name in ["a", "b"] {
        let node = node_named(name);
        let pinned = TaskOptions::default()
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node.node_id, soft: false });
        ionet::get_timeout(&shout::options(pinned).remote(name.to_string()), Duration::from_secs(60)).unwrap();
    }
    let dir = harness::shared_tempdir();
    let dir_name = dir.path().to_string_lossy().into_owned();
    let chants: Vec<_> = (0..CHANTS).map(|_| chant::remote(dir_name.clone(), CHANTS)).collect();
    let pids: BTreeSet<u32> = ionet::get_all(&chants).unwrap().into_iter().collect();
    assert_eq!(pids.len(), CHANTS, "each chant ran in a worker of its own");
    assert_eq!(ionet::get_timeout(&count_epochs::remote(), Duration::from_secs(60)).unwrap(), 3);
    // Outlives the driver, for `ionet logs --actor`.
    let crier = Crier::options(ionet::actor::ActorOptions::new().name("crier").detached()).remote().unwrap();
    let pid = ionet::get_timeout(&crier.cry("hear ye".to_string()), Duration::from_secs(60)).unwrap();
    println!("crier pid {pid}");
    ionet::shutdown();
}

/// What tasks print on remote nodes reaches their driver's stdout as it is printed, with
/// Ray's `(task pid=…, ip=…)` prefix; one line printed by many workers shows once, with
/// the count of its repeats; one worker's own lines all show.
fn what_tasks_print_reaches_the_driver_prefixed_and_folded() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "4", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "4", "--labels", "name=b"]);
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env(PRINTING_DRIVER_ENV, cluster.session())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the driver failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    for name in ["a", "b"] {
        let line = stdout.lines().find(|line| line.ends_with(&format!("hello from node {name}")));
        let line = line.unwrap_or_else(|| panic!("node {name}'s line is missing from the driver's output:\n{stdout}"));
        assert!(line.starts_with("(shout pid=") && line.contains(", ip=127.0.0.1) "), "{line}");
    }
    assert!(!stdout.contains(":ionet_task:"), "markers are not passed on:\n{stdout}");
    let chants: Vec<&str> = stdout.lines().filter(|line| line.contains("the same line")).collect();
    let repeated: u32 =
        chants.iter().filter_map(|line| line.split("[repeated ").nth(1)?.split('x').next()?.parse::<u32>().ok()).sum();
    let shown = chants.iter().filter(|line| !line.contains("[repeated")).count() as u32;
    assert_eq!((shown, repeated), (1, CHANTS as u32 - 1), "shown once, its repeats counted:\n{stdout}");
    let epochs = stdout.lines().filter(|line| line.starts_with("(count_epochs pid=") && line.ends_with(" done"));
    assert_eq!(epochs.count(), 3, "one worker's own lines all show:\n{stdout}");

    // `ionet logs` reads the same output afterwards, every line as it was printed.
    let job = stdout.lines().find_map(|line| line.strip_prefix("job ")).expect("the driver names its job");
    let logs = cluster.ionet(&["logs", "--job", job]);
    for name in ["a", "b"] {
        assert!(
            logs.lines()
                .any(|line| line.starts_with("(shout pid=") && line.ends_with(&format!("hello from node {name}"))),
            "{logs}"
        );
    }
    assert_eq!(logs.lines().filter(|line| line.ends_with(") the same line")).count(), CHANTS, "{logs}");
    let a = node_named_in(&cluster, "a");
    let only_a = cluster.ionet(&["logs", "--job", job, "--node", &a[..8]]);
    assert!(only_a.contains("hello from node a") && !only_a.contains("hello from node b"), "{only_a}");
    // One actor's output, found by its name (its job is the actor's).
    let crier = cluster.ionet(&["logs", "--actor", "crier"]);
    let pid = stdout.lines().find_map(|line| line.strip_prefix("crier pid ")).expect("the crier cried");
    assert_eq!(crier.trim().lines().count(), 1, "the actor's lines only: {crier}");
    assert!(crier.contains(&format!("pid={pid}")) && crier.trim().ends_with("the crier cries hear ye"), "{crier}");
    let unknown = cluster.ionet_fails(&["logs", "--actor", "nobody"]);
    assert!(unknown.contains("no actor has the id or name \"nobody\""), "{unknown}");
    drop(cluster);
}

fn main() {
    ionet::testing::run_worker_if_requested();
    if let Ok(given) = std::env::var(STATE_DRIVER_ENV) {
        let (session, release) = given.split_once('\n').unwrap();
        state_driver(session, release);
        std::process::exit(0);
    }
    if let Ok(session) = std::env::var(PRINTING_DRIVER_ENV) {
        printing_driver(session);
        std::process::exit(0);
    }
    harness::run(
        &[
            ("embedded_thousand_tasks_and_a_chain", embedded_thousand_tasks_and_a_chain),
            (
                "what_tasks_print_reaches_the_driver_prefixed_and_folded",
                what_tasks_print_reaches_the_driver_prefixed_and_folded,
            ),
            (
                "the_state_api_lists_a_jobs_tasks_with_states_nodes_and_reasons",
                the_state_api_lists_a_jobs_tasks_with_states_nodes_and_reasons,
            ),
            ("a_million_tasks_keep_the_heads_task_events_bounded", a_million_tasks_keep_the_heads_task_events_bounded),
            (
                "tasks_of_a_killed_node_run_elsewhere_before_the_head_notices",
                tasks_of_a_killed_node_run_elsewhere_before_the_head_notices,
            ),
            ("a_killed_nodes_workers_die_with_it", a_killed_nodes_workers_die_with_it),
            (
                "a_node_given_notice_finishes_its_tasks_and_takes_no_new_ones",
                a_node_given_notice_finishes_its_tasks_and_takes_no_new_ones,
            ),
            ("a_node_given_notice_moves_its_objects_and_actors", a_node_given_notice_moves_its_objects_and_actors),
            ("errors_reach_the_caller", errors_reach_the_caller),
            ("max_calls_replaces_the_worker", max_calls_replaces_the_worker),
            ("long_tasks_never_queue_behind_short_ones", long_tasks_never_queue_behind_short_ones),
            ("a_short_task_may_wait_inside", a_short_task_may_wait_inside),
            ("refs_inside_values_outlive_the_callers_handles", refs_inside_values_outlive_the_callers_handles),
            ("killed_worker_is_retried_or_reported", killed_worker_is_retried_or_reported),
            ("gpu_tasks_get_their_own_devices", gpu_tasks_get_their_own_devices),
            ("thousand_tasks_spread_over_two_nodes", thousand_tasks_spread_over_two_nodes),
            ("a_sampled_view_reaches_nodes_outside_its_sample", a_sampled_view_reaches_nodes_outside_its_sample),
            ("queued_tasks_wait_out_a_daemon_restart", queued_tasks_wait_out_a_daemon_restart),
            ("cost_and_label_selectors_choose_the_node", cost_and_label_selectors_choose_the_node),
            (
                "cost_per_tflop_prefers_the_gpu_cheapest_for_its_work",
                cost_per_tflop_prefers_the_gpu_cheapest_for_its_work,
            ),
            ("gpu_lease_is_metered_and_settled_to_the_provider", gpu_lease_is_metered_and_settled_to_the_provider),
            ("an_unfunded_payer_gets_no_more_gpus", an_unfunded_payer_gets_no_more_gpus),
            ("placement_group_bundle_is_metered_once", placement_group_bundle_is_metered_once),
        ],
        Duration::from_secs(180),
    );
}
