//! Actors end to end: ordered calls, handles passed to tasks on two nodes, named detached
//! actors reached from a second driver process, restarts after SIGKILL, GPU actors waiting
//! for their GPU, concurrent calls, and the errors a caller gets.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{wait_until, Cluster};
use ionet::{ActorOptions, InitConfig, IonetError, SchedulingStrategy, TaskOptions};

/// Set in a re-executed test binary that plays a second driver.
const DRIVER_ENV: &str = "IONET_TEST_DRIVER";
const SESSION_ENV: &str = "IONET_TEST_DRIVER_SESSION";

pub struct Counter {
    value: i64,
    seen: Vec<i64>,
}

#[ionet::actor]
impl Counter {
    pub fn new(start: i64) -> Self {
        Counter { value: start, seen: Vec::new() }
    }

    pub fn incr(&mut self, by: i64) -> i64 {
        self.value += by;
        self.value
    }

    pub fn record(&mut self, call: i64) -> usize {
        self.seen.push(call);
        self.seen.len()
    }

    pub fn seen(&self) -> Vec<i64> {
        self.seen.clone()
    }

    pub fn get(&self) -> i64 {
        self.value
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The actor id and incarnation the method's context names.
    pub fn whoami(&self) -> (String, u32) {
        let context = ionet::get_runtime_context().unwrap();
        (context.actor_id.map(|id| id.hex()).unwrap_or_default(), context.actor_incarnation)
    }

    /// Creates an actor of its own (not detached: it dies with this one).
    pub fn child(&self) -> CounterHandle {
        Counter::remote(0i64).unwrap()
    }

    /// Ends the actor from inside (`exit_actor`).
    pub fn leave(&self) -> i64 {
        match ionet::exit_actor() {
            Ok(never) => match never {},
            Err(err) => panic!("exit_actor failed: {err}"),
        }
    }

    pub fn devices(&self) -> (String, Vec<u32>) {
        (std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default(), ionet::get_gpu_ids())
    }

    pub fn slow_incr(&mut self, millis: u64) -> i64 {
        std::thread::sleep(Duration::from_millis(millis));
        self.value += 1;
        self.value
    }

    pub fn refuse(&self, why: String) -> Result<i64, String> {
        Err(why)
    }

    /// Adds the values of `refs` (when asked to look), waiting for them inside the method.
    pub fn add_from(&mut self, refs: Vec<ionet::ObjectRef<i64>>, look: bool) -> i64 {
        if look {
            self.value += ionet::get_all(&refs).unwrap().into_iter().sum::<i64>();
        }
        self.value
    }
}

#[ionet::remote]
fn late_value(millis: u64, value: i64) -> i64 {
    std::thread::sleep(Duration::from_millis(millis));
    value
}

pub struct Sleeper;

#[ionet::actor]
impl Sleeper {
    pub fn new() -> Self {
        Sleeper
    }

    pub fn nap(&self, millis: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(millis));
        millis
    }
}

/// An actor whose methods are async: they run on the worker's event loop.
pub struct Waiter {
    woken: std::sync::atomic::AtomicU64,
}

#[ionet::actor]
impl Waiter {
    pub fn new() -> Self {
        Waiter { woken: std::sync::atomic::AtomicU64::new(0) }
    }

    pub async fn wait(&self, millis: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        self.woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    pub async fn reset(&mut self) -> u64 {
        self.woken.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    pub fn woken(&self) -> u64 {
        self.woken.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct Picky;

#[ionet::actor]
impl Picky {
    pub fn new(ok: bool) -> Result<Self, String> {
        if ok {
            Ok(Picky)
        } else {
            Err("refusing to start without a model".to_string())
        }
    }

    pub fn hello(&self) -> String {
        "hello".into()
    }
}

/// An actor whose constructor takes a while, logging when it starts and ends.
pub struct SlowStart;

#[ionet::actor]
impl SlowStart {
    pub fn new(log: String, millis: u64) -> Self {
        let note = |what: &str| {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
            writeln!(file, "{what}").unwrap();
        };
        note("start");
        std::thread::sleep(Duration::from_millis(millis));
        note("end");
        SlowStart
    }

    pub fn ready(&self) -> bool {
        true
    }
}

/// An actor that submits tasks: it holds CPU leases of its own.
pub struct Submitter;

#[ionet::actor]
impl Submitter {
    pub fn new() -> Self {
        Submitter
    }

    pub fn flood(&self, tasks: u64) -> u64 {
        let refs: Vec<_> = (0..tasks).map(one::remote).collect();
        ionet::get_all(&refs).unwrap().into_iter().sum()
    }
}

#[ionet::remote]
fn one(_index: u64) -> u64 {
    1
}

/// Increments the counter `times` times, one call after the other; returns the node it ran on.
#[ionet::remote]
fn bump(counter: CounterHandle, times: u32) -> String {
    for _ in 0..times {
        ionet::get(&counter.incr(1)).unwrap();
    }
    ionet::get_runtime_context().unwrap().node_id.hex()
}

/// Finds an actor by name in the job's namespace (the driver's) and bumps it once.
#[ionet::remote]
fn bump_named(name: String) -> i64 {
    let counter: CounterHandle = ionet::get_actor(&name, None).unwrap();
    ionet::get(&counter.incr(1)).unwrap()
}

fn ten_thousand_calls_run_in_order() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let counter = Counter::remote(0i64).unwrap();
    let refs: Vec<_> = (0..10_000i64).map(|call| counter.record(call)).collect();
    let lengths = ionet::get_all(&refs).unwrap();
    assert_eq!(lengths, (1..=10_000usize).collect::<Vec<_>>(), "each call saw every earlier one");
    assert_eq!(ionet::get(&counter.seen()).unwrap(), (0..10_000i64).collect::<Vec<_>>());
    // Values and refs as arguments; a method's error reaches the caller.
    let five = ionet::put(&5i64).unwrap();
    assert_eq!(ionet::get(&counter.incr(&five)).unwrap(), 5);
    match ionet::get(&counter.refuse("no".to_string())) {
        Err(IonetError::TaskFailed { function, message, .. }) => {
            assert!(function.ends_with("Counter.refuse") && message == "no", "{function}: {message}")
        }
        other => panic!("expected the method's error, got {other:?}"),
    }
    // A method learnt to be short runs in place; one that then waits for an object
    // (a `get` inside it) still works, and later calls keep their order.
    let zero = ionet::put(&0i64).unwrap();
    for _ in 0..50 {
        assert_eq!(ionet::get(&counter.add_from(vec![zero.clone()], false)).unwrap(), 5);
    }
    // The slow task's ref lives only inside the argument: the call holds it.
    let waits = counter.add_from(vec![late_value::remote(300u64, 10i64), zero.clone()], true);
    let after = counter.incr(1);
    assert_eq!(ionet::get_timeout(&waits, Duration::from_secs(60)).unwrap(), 15);
    assert_eq!(ionet::get(&after).unwrap(), 16);
    assert_eq!(ionet::get(&counter.incr(-11)).unwrap(), 5);
    // A handle is cheap to clone and serialise; its clone reaches the same actor.
    let again: CounterHandle =
        ionet::task::decode_value(&ionet::task::encode_value(&counter.clone()).unwrap()).unwrap();
    assert_eq!(ionet::get(&again.get()).unwrap(), 5);
    // The driver's named actors are found by name from its tasks, as in Ray.
    let _tally = Counter::options(ActorOptions::new().name("tally")).remote(41i64).unwrap();
    assert_eq!(ionet::get_timeout(&bump_named::remote("tally".to_string()), Duration::from_secs(60)).unwrap(), 42);
    ionet::shutdown();
}

fn handle_passed_to_tasks_on_two_nodes() {
    let mut cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.add_node(&["--num-cpus", "2"]);
    cluster.init();
    wait_until("two nodes", Duration::from_secs(30), || ionet::nodes().map(|n| n.len() == 2).unwrap_or(false));
    let counter = Counter::remote(0i64).unwrap();
    let nodes = ionet::nodes().unwrap();
    let refs: Vec<_> = (0..10)
        .map(|task| {
            let node_id = nodes[task % 2].node_id;
            let options =
                TaskOptions::default().scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id, soft: false });
            bump::options(options).remote(counter.clone(), 100u32)
        })
        .collect();
    let nodes: std::collections::BTreeSet<String> = ionet::get_all(&refs).unwrap().into_iter().collect();
    assert_eq!(nodes.len(), 2, "the tasks ran on both nodes: {nodes:?}");
    assert_eq!(ionet::get(&counter.get()).unwrap(), 1000);
}

/// The second driver: creates a named detached actor and a named owned one, then exits.
fn second_driver() {
    let session = std::env::var(SESSION_ENV).expect("session dir");
    let config = InitConfig { session_dir: Some(session.into()), ..Default::default() };
    ionet::init(config.address("auto")).unwrap();
    let detached = Counter::options(ActorOptions::new().name("keeper").namespace("shared").detached()).remote(41i64);
    let detached = detached.unwrap();
    assert_eq!(ionet::get(&detached.incr(1)).unwrap(), 42);
    let owned = Counter::options(ActorOptions::new().name("owned").namespace("shared")).remote(0i64).unwrap();
    assert_eq!(ionet::get(&owned.incr(1)).unwrap(), 1);
    ionet::shutdown();
}

fn named_detached_actor_outlives_its_driver() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    let status = Command::new(std::env::current_exe().unwrap())
        .env(DRIVER_ENV, "second_driver")
        .env(SESSION_ENV, cluster.session())
        .status()
        .unwrap();
    assert!(status.success(), "the second driver failed: {status}");
    cluster.init();
    let keeper: CounterHandle = ionet::get_actor("keeper", Some("shared")).unwrap();
    assert_eq!(ionet::get(&keeper.incr(1)).unwrap(), 43, "the detached actor kept its state");
    // The owned one died with its driver, freeing its name.
    wait_until("the owned actor to die with its driver", Duration::from_secs(30), || {
        matches!(ionet::get_actor::<CounterHandle>("owned", Some("shared")), Err(IonetError::NotFound(_)))
    });
    // Names: a duplicate is refused, get_if_exists returns the live one, unknown is not found.
    let duplicate = Counter::options(ActorOptions::new().name("keeper").namespace("shared")).remote(0i64);
    match duplicate {
        Err(IonetError::AlreadyExists(message)) => assert!(message.contains("\"keeper\""), "{message}"),
        other => panic!("a duplicate name must be refused, got {other:?}"),
    }
    let same = Counter::options(ActorOptions::new().name("keeper").namespace("shared").get_if_exists(true))
        .remote(0i64)
        .unwrap();
    assert_eq!(same.actor_handle().id(), keeper.actor_handle().id());
    match ionet::get_actor::<CounterHandle>("nobody", Some("shared")) {
        Err(IonetError::NotFound(message)) => assert!(message.contains("\"nobody\""), "{message}"),
        other => panic!("expected not found, got {other:?}"),
    }
    match ionet::get_actor::<SleeperHandle>("keeper", Some("shared")) {
        Err(IonetError::InvalidArgument(message)) => assert!(message.contains("Counter"), "{message}"),
        other => panic!("expected a class mismatch, got {other:?}"),
    }
    // Killing frees the name.
    ionet::kill(&keeper, true).unwrap();
    match ionet::get(&keeper.get()) {
        Err(IonetError::ActorDied(message)) => assert!(message.contains("killed by ionet::kill"), "{message}"),
        other => panic!("a call on a killed actor must fail, got {other:?}"),
    }
    let fresh = Counter::options(ActorOptions::new().name("keeper").namespace("shared")).remote(7i64).unwrap();
    assert_eq!(ionet::get(&fresh.get()).unwrap(), 7);
}

fn sigkill(pid: u32) {
    // SAFETY: killing a worker process of this test's cluster.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn killed_actor_restarts_or_dies() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init();
    // With restarts: a later call succeeds on a fresh instance.
    let restarting = Counter::options(ActorOptions::new().max_restarts(2)).remote(0i64).unwrap();
    assert_eq!(ionet::get(&restarting.incr(5)).unwrap(), 5);
    let first_pid = ionet::get(&restarting.pid()).unwrap();
    sigkill(first_pid);
    wait_until("the actor to restart", Duration::from_secs(60), || {
        restarting
            .actor_handle()
            .info()
            .is_ok_and(|info| info.incarnation == 1 && info.state == ionet::ActorState::Alive)
    });
    let value = ionet::get_timeout(&restarting.incr(1), Duration::from_secs(60)).unwrap();
    assert_eq!(value, 1, "the constructor ran again: state reset");
    assert_ne!(ionet::get(&restarting.pid()).unwrap(), first_pid);
    let info = restarting.actor_handle().info().unwrap();
    assert_eq!((info.restarts, info.incarnation), (1, 1));

    // Without: calls queued behind a running one, and later ones, fail as actor-died.
    let mortal = Counter::options(ActorOptions::new().max_restarts(0)).remote(0i64).unwrap();
    let pid = ionet::get(&mortal.pid()).unwrap();
    let queued: Vec<_> = (0..3).map(|_| mortal.slow_incr(30_000)).collect();
    sigkill(pid);
    for call in &queued {
        match ionet::get_timeout(call, Duration::from_secs(60)) {
            Err(IonetError::ActorDied(message)) => assert!(message.contains("died"), "{message}"),
            other => panic!("a queued call must fail as actor-died, got {other:?}"),
        }
    }
    match ionet::get_timeout(&mortal.get(), Duration::from_secs(60)) {
        Err(IonetError::ActorDied(message)) => assert!(message.contains("worker process"), "{message}"),
        other => panic!("a later call must fail as actor-died, got {other:?}"),
    }
    // The actor table shows both, with restarts and the cause of death.
    let listed: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["list", "actors", "--all", "--json"])).unwrap();
    let rows = listed.as_array().unwrap();
    let row = |id: &ionet::ActorId| rows.iter().find(|row| row["actor_id"] == id.hex()).unwrap().clone();
    let alive = row(&restarting.actor_handle().id());
    assert_eq!((alive["state"].as_str(), alive["restarts"].as_u64()), (Some("ALIVE"), Some(1)), "{alive}");
    let dead = row(&mortal.actor_handle().id());
    assert_eq!(dead["state"], "DEAD", "{dead}");
    assert!(dead["death_cause"].as_str().unwrap().contains("worker process"), "{dead}");

    // A constructor that fails: the actor is dead with its message.
    let picky = Picky::remote(false).unwrap();
    match ionet::get_timeout(&picky.hello(), Duration::from_secs(60)) {
        Err(IonetError::ActorDied(message)) => assert!(message.contains("refusing to start"), "{message}"),
        other => panic!("expected the constructor's failure, got {other:?}"),
    }

    // Each creation is a task of the state API (`Class.__init__`): the restarted actor's
    // in its second attempt, the dead one's first done, the picky one's failed with why.
    let creation = |actor: ionet::ActorId| {
        let tasks = ionet::state::list_tasks(ionet::state::TaskFilter::default()).unwrap();
        let row = tasks.into_iter().find(|row| row["actor_id"] == actor.hex() && row["type"] == "ACTOR_CREATION_TASK");
        row.map(|row| {
            let text = |field: &str| row[field].as_str().unwrap_or_default().to_string();
            (text("name"), text("state"), row["attempt_number"].as_u64().unwrap(), text("error_message"))
        })
    };
    let (name, state, attempt, _) = creation(restarting.actor_handle().id()).expect("the restarted actor's creation");
    assert_eq!((name.as_str(), state.as_str(), attempt), ("actors::Counter.__init__", "FINISHED", 1));
    let (_, state, attempt, _) = creation(mortal.actor_handle().id()).expect("the dead actor's creation");
    assert_eq!((state.as_str(), attempt), ("FINISHED", 0), "it was created; its worker died after");
    wait_until("the failed constructor listed", Duration::from_secs(30), || {
        creation(picky.actor_handle().id()).is_some_and(|(name, state, _, error)| {
            name == "actors::Picky.__init__" && state == "FAILED" && error.contains("refusing to start")
        })
    });
}

/// Actors that share a process: one process for many (each its own state and context),
/// each ended alone (kill, restart, `exit_actor`, calls queued behind a running one fail
/// at once), and all of them ended when the process dies (each by its own rules).
fn actors_sharing_a_process_live_and_end_apart() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init();
    let shared = |restarts: i32| ActorOptions::new().share_process(true).max_restarts(restarts);
    let actors: Vec<CounterHandle> = (0..6)
        .map(|index| Counter::options(shared(if index < 2 { 1 } else { 0 })).remote(index * 10).unwrap())
        .collect();
    let pids = ionet::get_all(&actors.iter().map(|actor| actor.pid()).collect::<Vec<_>>()).unwrap();
    assert!(pids.iter().all(|pid| *pid == pids[0]), "one process hosts them all: {pids:?}");
    let alone = Counter::remote(0i64).unwrap();
    assert_ne!(ionet::get(&alone.pid()).unwrap(), pids[0], "an actor not sharing has its own process");
    for (index, actor) in actors.iter().enumerate() {
        assert_eq!(ionet::get(&actor.incr(1)).unwrap(), index as i64 * 10 + 1, "each its own state");
        let (id, incarnation) = ionet::get(&actor.whoami()).unwrap();
        assert_eq!((id, incarnation), (actor.actor_handle().id().hex(), 0), "each call knows its actor");
    }
    let refused = Counter::options(ActorOptions::new().share_process(true).num_cpus(1.0)).remote(0i64);
    match refused {
        Err(IonetError::InvalidArgument(message)) => assert!(message.contains("cannot share"), "{message}"),
        other => panic!("an actor holding a CPU cannot share a process, got {other:?}"),
    }

    // Killed for good while a call runs: the calls queued behind it fail at once, and
    // the process and its other actors live on.
    let running = actors[2].slow_incr(3_000);
    let queued = actors[2].get();
    std::thread::sleep(Duration::from_millis(300)); // the slow call has started
    let killed_at = Instant::now();
    ionet::kill(&actors[2], true).unwrap();
    match ionet::get_timeout(&queued, Duration::from_secs(60)) {
        Err(IonetError::ActorDied(_)) => {}
        other => panic!("a call queued behind the killed actor's running one must fail, got {other:?}"),
    }
    assert!(killed_at.elapsed() < Duration::from_millis(2_500), "it did not wait for the running call");
    assert!(ionet::get_timeout(&running, Duration::from_secs(60)).is_err(), "the running call's reply is dropped");
    assert_eq!(ionet::get(&actors[3].pid()).unwrap(), pids[0], "the process lives on");
    assert_eq!(ionet::get(&actors[3].get()).unwrap(), 31, "its other actors keep their state");

    // Killed with a restart left: a fresh instance, in a shared process again.
    ionet::kill(&actors[0], false).unwrap();
    wait_until("the shared actor to restart", Duration::from_secs(60), || {
        actors[0]
            .actor_handle()
            .info()
            .is_ok_and(|info| info.incarnation == 1 && info.state == ionet::ActorState::Alive)
    });
    assert_eq!(ionet::get_timeout(&actors[0].get(), Duration::from_secs(60)).unwrap(), 0, "the constructor ran again");
    assert_eq!(ionet::get(&actors[0].whoami()).unwrap().1, 1);
    assert_eq!(ionet::get(&actors[1].get()).unwrap(), 11, "a neighbour is untouched");

    // Killed (restart allowed) while its constructor runs: the next incarnation's
    // constructor starts only after that one returned (never two at once).
    let log = harness::temp_path("slow-start");
    let log_text = log.to_string_lossy().into_owned();
    let slow = SlowStart::options(shared(1)).remote(log_text, 1_500u64).unwrap();
    wait_until("the constructor to start", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("start"))
    });
    ionet::kill(&slow, false).unwrap();
    assert!(ionet::get_timeout(&slow.ready(), Duration::from_secs(60)).unwrap(), "the next incarnation runs");
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(lines.starts_with("start\nend\nstart\n"), "one constructor at a time:\n{lines}");

    // `exit_actor` inside a shared actor ends it alone, and the actors it created.
    let child = ionet::get(&actors[4].child()).unwrap();
    assert_eq!(ionet::get(&child.incr(2)).unwrap(), 2);
    match ionet::get_timeout(&actors[4].leave(), Duration::from_secs(60)) {
        Err(IonetError::ActorDied(_)) => {}
        other => panic!("the call that exits fails as actor-died, got {other:?}"),
    }
    wait_until("the exited actor to be DEAD", Duration::from_secs(30), || {
        actors[4].actor_handle().info().is_ok_and(|info| info.state == ionet::ActorState::Dead)
    });
    assert_eq!(ionet::get(&actors[5].pid()).unwrap(), pids[0], "the process lives on after exit_actor");
    wait_until("the exited actor's child to be DEAD", Duration::from_secs(30), || {
        child.actor_handle().info().is_ok_and(|info| info.state == ionet::ActorState::Dead)
    });

    // The process dies: each of its actors restarts or dies by its own rules.
    let host = ionet::get(&actors[1].pid()).unwrap();
    sigkill(host);
    wait_until("the shared actor with a restart left to come back", Duration::from_secs(60), || {
        actors[1]
            .actor_handle()
            .info()
            .is_ok_and(|info| info.incarnation == 1 && info.state == ionet::ActorState::Alive)
    });
    assert_eq!(ionet::get_timeout(&actors[1].get(), Duration::from_secs(60)).unwrap(), 10);
    assert_ne!(ionet::get(&actors[1].pid()).unwrap(), host);
    for mortal in [&actors[3], &actors[5]] {
        match ionet::get_timeout(&mortal.get(), Duration::from_secs(60)) {
            Err(IonetError::ActorDied(_)) => {}
            other => panic!("an actor without restarts dies with its shared process, got {other:?}"),
        }
    }
    assert_eq!(ionet::get(&alone.get()).unwrap(), 0, "an actor of its own process is untouched");
    drop(cluster);
}

/// Thousands of actors created at once by one driver, each called once: every one is
/// ready, and the driver follows them all on one stream. (Regression: the head's HTTP/2
/// connection window let h2 end the driver's connection mid-burst, its guard against
/// floods of small frames.)
fn thousands_of_actors_created_at_once_are_all_ready() {
    let cluster = Cluster::start(&["--num-cpus", "2"]);
    cluster.init();
    let count = 10_000;
    let actors: Vec<CounterHandle> = (0..count)
        .map(|index| Counter::options(ActorOptions::new().share_process(true)).remote(index).unwrap())
        .collect();
    let values: Vec<_> = actors.iter().map(|actor| actor.incr(1)).collect();
    let deadline = Instant::now() + Duration::from_secs(150);
    for (index, value) in values.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert_eq!(ionet::get_timeout(value, left).unwrap(), index as i64 + 1);
    }
    // Their rows are followed on one stream to the head, not a long poll each (ten
    // thousand streams on one connection, where hyper's client can hang).
    assert_eq!(ionet::testing::actor_rows_followed().unwrap(), (1, count as usize));
    drop(cluster);
}

/// The head ends a process's stream of actor rows when its time is up (it was admitted by
/// the credential it opened with); the process opens another and follows its actors on
/// it: a restart is still learnt, and calls go on.
fn the_stream_of_actor_rows_is_opened_again_when_its_time_is_up() {
    let cluster = Cluster::start_with_env(&["--num-cpus", "2"], &[("IONET_HEARTBEAT_STREAM_LIFETIME_MS", "300")]);
    cluster.init();
    let counter = Counter::options(ActorOptions::new().max_restarts(1)).remote(0i64).unwrap();
    assert_eq!(ionet::get_timeout(&counter.incr(1), Duration::from_secs(60)).unwrap(), 1);
    wait_until("the stream opened again twice", Duration::from_secs(30), || {
        ionet::testing::actor_rows_followed().unwrap().0 >= 3
    });
    assert_eq!(ionet::testing::actor_rows_followed().unwrap().1, 1, "still followed");
    assert_eq!(ionet::get_timeout(&counter.incr(1), Duration::from_secs(60)).unwrap(), 2);
    // A restart while the streams come and go: the next call goes to the new incarnation.
    sigkill(ionet::get_timeout(&counter.pid(), Duration::from_secs(60)).unwrap());
    wait_until("the actor to restart", Duration::from_secs(60), || {
        counter.actor_handle().info().is_ok_and(|info| info.incarnation == 1 && info.state == ionet::ActorState::Alive)
    });
    let value = ionet::get_timeout(&counter.incr(1), Duration::from_secs(60)).unwrap();
    assert_eq!(value, 1, "the constructor ran again: state reset");
    drop(cluster);
}

fn gpu_actor_waits_for_the_gpu() {
    let cluster = Cluster::start(&["--num-cpus", "4", "--num-gpus", "1", "--gpu-type", "A100-80GB"]);
    cluster.init();
    let options = ActorOptions::new().num_gpus(1.0).accelerator_type("A100-80GB");
    let first = Counter::options(options.clone()).remote(0i64).unwrap();
    assert_eq!(ionet::get(&first.devices()).unwrap(), ("0".to_string(), vec![0]));
    let second = Counter::options(options).remote(0i64).unwrap();
    let devices = second.devices();
    match ionet::get_timeout(&devices, Duration::from_secs(2)) {
        Err(IonetError::Timeout(_)) => {}
        other => panic!("the second GPU actor must wait for the GPU, got {other:?}"),
    }
    let state = second.actor_handle().info().unwrap().state;
    assert_eq!(state, ionet::ActorState::PendingCreation);
    // A call cancelled while it waits for the actor is never sent; the next one is.
    let cancelled = second.record(7);
    ionet::cancel(&cancelled, false, false).unwrap();
    let kept = second.record(8);
    ionet::kill(&first, true).unwrap();
    assert_eq!(ionet::get_timeout(&devices, Duration::from_secs(60)).unwrap(), ("0".to_string(), vec![0]));
    assert!(matches!(ionet::get(&cancelled), Err(IonetError::Cancelled(_))), "{:?}", ionet::get(&cancelled));
    assert_eq!(ionet::get_timeout(&kept, Duration::from_secs(60)).unwrap(), 1, "the cancelled call did not run");
    assert_eq!(ionet::get(&second.seen()).unwrap(), vec![8]);
}

/// Regression: an actor killed while it held leases for its own tasks left those CPUs
/// leased forever, and every later task waited.
fn leases_of_a_killed_actor_come_back() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let submitters: Vec<_> =
        (0..2).map(|_| Submitter::options(ActorOptions::new().num_cpus(0.0)).remote().unwrap()).collect();
    let floods: Vec<_> = submitters.iter().map(|submitter| submitter.flood(500)).collect();
    assert_eq!(ionet::get_all(&floods).unwrap(), vec![500, 500]);
    for submitter in &submitters {
        ionet::kill(submitter, true).unwrap();
    }
    let both_cpus = one::options(TaskOptions::default().num_cpus(2.0)).remote(0);
    assert_eq!(ionet::get_timeout(&both_cpus, Duration::from_secs(30)).unwrap(), 1, "the CPUs came back");
    ionet::shutdown();
}

/// The head remembers at most `max_dead_actors` DEAD actors: past it the longest dead are
/// forgotten (listed no more), the newest dead stay listed, and live ones are untouched.
fn the_head_forgets_the_longest_dead_actors_past_its_limit() {
    let cluster = Cluster::start_with_env(&[], &[("IONET_MAX_DEAD_ACTORS", "3")]);
    cluster.init();
    let dead_ids = || -> Vec<String> {
        let actors = ionet::state::list_actors().unwrap();
        let mut dead: Vec<String> = actors
            .iter()
            .filter(|actor| actor["state"] == "DEAD")
            .map(|actor| actor["actor_id"].as_str().unwrap().to_string())
            .collect();
        dead.sort();
        dead
    };
    let live = Counter::options(ActorOptions::new().num_cpus(0.0)).remote(100).unwrap();
    let mut killed = Vec::new();
    for start in 0..6 {
        let actor = Counter::options(ActorOptions::new().num_cpus(0.0)).remote(start).unwrap();
        assert_eq!(ionet::get(&actor.incr(1)).unwrap(), start + 1);
        ionet::kill(&actor, true).unwrap();
        let id = ionet::ActorClassHandle::handle(&actor).id().hex();
        wait_until("the killed actor to be DEAD", Duration::from_secs(30), || dead_ids().contains(&id));
        killed.push(id);
    }
    let mut newest = killed[3..].to_vec();
    newest.sort();
    assert_eq!(dead_ids(), newest, "the three longest dead are forgotten, the newest three kept");
    assert_eq!(ionet::get(&live.incr(1)).unwrap(), 101, "a live actor is untouched");
    drop(cluster);
}

fn hundred_concurrent_calls_share_one_actor() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let sleeper = Sleeper::options(ActorOptions::new().max_concurrency(100)).remote().unwrap();
    assert_eq!(ionet::get(&sleeper.nap(0)).unwrap(), 0);
    let started = Instant::now();
    let naps: Vec<_> = (0..100).map(|_| sleeper.nap(1_000)).collect();
    assert_eq!(ionet::get_all(&naps).unwrap(), vec![1_000; 100]);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(30), "100 one-second calls took {elapsed:?}: they did not overlap");

    // Async methods interleave on the event loop: 200 one-second waits on two threads.
    let waiter = Waiter::options(ActorOptions::new().max_concurrency(1000)).remote().unwrap();
    let started = Instant::now();
    let waits: Vec<_> = (0..200).map(|_| waiter.wait(1_000)).collect();
    let mut woken = ionet::get_all(&waits).unwrap();
    woken.sort_unstable();
    assert_eq!(woken, (1..=200).collect::<Vec<u64>>());
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(30), "200 async waits took {elapsed:?}: they did not interleave");
    assert_eq!(ionet::get(&waiter.reset()).unwrap(), 200);
    assert_eq!(ionet::get(&waiter.woken()).unwrap(), 0);
    ionet::shutdown();
}

/// An actor whose demand no node can ever meet fails (its creation and every call) with
/// `Infeasible`, instead of waiting for ever; a feasible one created after it still runs.
fn an_actor_no_node_can_fit_fails_as_infeasible() {
    ionet::init(InitConfig::default().num_cpus(2.0)).unwrap();
    let giant = Counter::options(ActorOptions::new().num_cpus(64.0)).remote(0i64).unwrap();
    for _ in 0..2 {
        match ionet::get_timeout(&giant.incr(1), Duration::from_secs(60)) {
            Err(IonetError::Infeasible(message)) => assert!(message.contains("64"), "{message}"),
            other => panic!("a call on an actor no node can fit must fail as infeasible, got {other:?}"),
        }
    }
    let state = giant.actor_handle().info().unwrap().state;
    assert_eq!(state, ionet::ActorState::Dead);
    let small = Counter::remote(1i64).unwrap();
    assert_eq!(ionet::get_timeout(&small.incr(1), Duration::from_secs(60)).unwrap(), 2);
    ionet::shutdown();
}

/// Leaves a file of its own in the directory `runs` each time it runs (named by `index`;
/// workers on two nodes run as two users), then works for `millis`.
#[ionet::remote]
fn logged(runs: String, index: u64, millis: u64) -> u64 {
    let unique = ionet::TaskId::random();
    std::fs::write(format!("{runs}/{index}.{}", unique.hex()), b"").unwrap();
    std::thread::sleep(Duration::from_millis(millis));
    index * 2
}

/// The index of every run recorded in `runs`.
fn runs_in(runs: &std::path::Path) -> Vec<u64> {
    let entries = std::fs::read_dir(runs).unwrap().flatten();
    entries.filter_map(|entry| entry.file_name().to_str()?.split('.').next()?.parse().ok()).collect()
}

/// A load across a head's death: named counters taking 40 calls each, and 200 tasks that
/// each leave a marker per run (in a directory anyone may write: tasks run as the node's
/// worker users).
struct Load {
    counters: Vec<CounterHandle>,
    pids: Vec<u32>,
    prefix: &'static str,
    shared: std::path::PathBuf,
    tasks: Vec<ionet::ObjectRef<u64>>,
    calls: Vec<Vec<ionet::ObjectRef<i64>>>,
}

impl Load {
    /// `actors` counters named `prefix-N`, then the calls and tasks; returns once tasks run.
    fn start(prefix: &'static str, actors: usize) -> Load {
        let counters: Vec<CounterHandle> = (0..actors)
            .map(|index| Counter::options(ActorOptions::new().name(format!("{prefix}-{index}"))).remote(0i64).unwrap())
            .collect();
        let pids = counters.iter().map(|counter| ionet::get(&counter.pid()).unwrap()).collect();
        let shared = harness::temp_path(prefix);
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        let runs = shared.to_string_lossy().into_owned();
        let tasks = (0..200u64).map(|index| logged::remote(runs.clone(), index, 60)).collect();
        let calls = counters.iter().map(|counter| (0..40).map(|_| counter.slow_incr(25)).collect()).collect();
        wait_until("tasks to be running", Duration::from_secs(60), || runs_in(&shared).len() >= 20);
        Load { counters, pids, prefix, shared, tasks, calls }
    }

    fn runs(&self) -> usize {
        runs_in(&self.shared).len()
    }

    /// Every task ran once and only once; every call ran once, in order, on the actor's
    /// first worker and incarnation; the names resolve as before; new work still runs.
    fn check(self) {
        let values = ionet::get_all(&self.tasks).unwrap();
        assert_eq!(values, (0..200u64).map(|index| index * 2).collect::<Vec<_>>());
        let mut runs = runs_in(&self.shared);
        runs.sort_unstable();
        assert_eq!(runs, (0..200u64).collect::<Vec<_>>(), "each task ran exactly once");
        for (index, (counter, calls)) in self.counters.iter().zip(&self.calls).enumerate() {
            let name = format!("{}-{index}", self.prefix);
            assert_eq!(ionet::get_all(calls).unwrap(), (1..=40).collect::<Vec<i64>>(), "calls of {name}");
            assert_eq!(ionet::get(&counter.get()).unwrap(), 40);
            assert_eq!(ionet::get(&counter.pid()).unwrap(), self.pids[index], "{name} kept its worker");
            let named: CounterHandle = ionet::get_actor(&name, None).unwrap();
            assert_eq!(named.actor_handle().id(), counter.actor_handle().id(), "the name resolves as before");
            let info = counter.actor_handle().info().unwrap();
            assert_eq!((info.incarnation, info.restarts), (0, 0), "{name} was never restarted");
        }
        let runs = self.shared.to_string_lossy().into_owned();
        assert_eq!(ionet::get(&logged::remote(runs, 1000, 0)).unwrap(), 2000, "new work runs");
        let _ = std::fs::remove_dir_all(&self.shared);
    }
}

/// Starts a cluster with `head_args` and nodes a and b (4 CPUs each), and connects this
/// process as a driver through node a's daemon, as a driver on a worker machine.
fn cluster_with_a_driver_on_a(head_args: &[&str]) -> Cluster {
    let mut cluster = Cluster::start(head_args);
    cluster.add_node(&["--num-cpus", "4", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "4", "--labels", "name=b"]);
    cluster.init();
    let node_a = harness::node_named("a").address;
    ionet::shutdown();
    cluster.init_through(&node_a);
    cluster
}

/// The head is SIGKILLed while 5 named actors serve calls and 200 tasks run (which go on
/// while it is down), and comes back from its storage file: every call and task completes exactly once, the actors
/// keep their state, worker and incarnation, names resolve, and a placement group left
/// pending is created once a node that fits it joins.
fn head_restarted_from_storage_loses_nothing() {
    let storage = tempfile::tempdir().unwrap();
    head_restart_keeps_everything(storage.path().join("gcs.redb").to_str().unwrap());
}

/// The same with the head's tables on a real Redis server.
fn head_restarted_from_redis_loses_nothing() {
    let redis = ionet_gcs::storage::redis::testing::RedisServer::start();
    head_restart_keeps_everything(&redis.url());
}

fn head_restart_keeps_everything(storage: &str) {
    let port = harness::free_port().to_string();
    let mut cluster = cluster_with_a_driver_on_a(&["--port", port.as_str(), "--storage", storage, "--num-cpus", "0"]);
    let special: std::collections::BTreeMap<String, f64> = [("special".to_string(), 1.0)].into();
    let group = ionet::placement_group(vec![special], ionet::PlacementStrategy::Pack).unwrap();
    assert!(!group.wait(Duration::from_millis(200)).unwrap(), "no node has the resource yet");
    ionet::raw::kv_put("models", b"llama", b"weights".to_vec(), true).unwrap();
    let load = Load::start("counter", 5);
    // Two actors sharing a process (on node b: the head's own node dies with it): the
    // restarted head knows their process again.
    let on_b = SchedulingStrategy::NodeAffinity { node_id: harness::node_named("b").node_id, soft: false };
    let options = || ActorOptions::new().share_process(true).scheduling_strategy(on_b.clone());
    let shared: Vec<CounterHandle> = (0..2).map(|_| Counter::options(options()).remote(0i64).unwrap()).collect();
    let host = ionet::get(&shared[0].pid()).unwrap();
    assert_eq!(ionet::get(&shared[1].incr(7)).unwrap(), 7);
    cluster.kill(0);
    // Calls that need the head wait for it (up to a minute) rather than fail.
    let asked =
        std::thread::spawn(|| (ionet::raw::kv_get("models", b"llama"), ionet::nodes().map(|nodes| nodes.len())));
    // While the head is down, work on held leases goes on.
    let before = load.runs();
    wait_until("tasks to run without the head", Duration::from_secs(30), || load.runs() >= before + 16);
    cluster.start_head_again();
    let (value, nodes) = asked.join().unwrap();
    assert_eq!(value.unwrap(), Some(b"weights".to_vec()), "a KV read made while the head was down");
    assert!(nodes.unwrap() >= 3, "a node listing made while the head was down");
    load.check();
    assert_eq!(ionet::get(&shared[1].incr(1)).unwrap(), 8, "a shared actor kept its state and process");
    ionet::kill(&shared[0], true).unwrap();
    assert_eq!(ionet::get(&shared[1].pid()).unwrap(), host, "killing its neighbour ends only the neighbour");
    assert_eq!(ionet::get(&shared[1].get()).unwrap(), 8);
    // The group the head had pending is placed once a node with the resource joins.
    cluster.add_node(&["--num-cpus", "1", "--resources", r#"{"special": 1}"#, "--labels", "name=c"]);
    assert!(group.wait(Duration::from_secs(60)).unwrap(), "the pending placement group is created");
}

/// Two heads on one Redis: the active one is SIGKILLed while 3 named actors serve calls
/// and 200 tasks run; the standby takes over within the head lease's time (it starts
/// serving once the lease lapses), node daemons and the driver follow it, and every call
/// and task completes exactly once, actors keep their state and worker.
fn standby_head_takes_over_on_redis() {
    let redis = ionet_gcs::storage::redis::testing::RedisServer::start();
    let url = redis.url();
    let (active_port, standby_port) = (harness::free_port().to_string(), harness::free_port().to_string());
    let head_args = |own: &str, other: &str| -> Vec<String> {
        let other = format!("127.0.0.1:{other}");
        ["--port", own, "--storage", &url, "--other-heads", &other, "--head-lease", "2s", "--num-cpus", "0"]
            .iter()
            .map(|arg| arg.to_string())
            .collect()
    };
    let active = head_args(&active_port, &standby_port);
    let mut cluster = cluster_with_a_driver_on_a(&active.iter().map(String::as_str).collect::<Vec<_>>());
    let standby_args = head_args(&standby_port, &active_port);
    let standby = cluster.add_standby_head(&standby_args.iter().map(String::as_str).collect::<Vec<_>>());
    // Every head's address, for node daemons and drivers.
    assert_eq!(cluster.address(), format!("127.0.0.1:{active_port},127.0.0.1:{standby_port}"));
    let serving = |port: &str| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok();
    assert!(!serving(&standby_port), "the standby serves nothing while the other head is active");
    assert!(cluster.is_running(standby));

    let load = Load::start("keeper", 3);
    cluster.kill(0);
    let killed = Instant::now();
    wait_until("the standby to take over", Duration::from_secs(30), || serving(&standby_port));
    let takeover = killed.elapsed();
    // The lease lapses at most 2 s after the kill, and the standby asks every tenth of
    // it (what is left: starting to serve, on a busy machine).
    assert!(takeover < Duration::from_millis(3_000), "the standby took {takeover:?} to take over");
    load.check();
    // The node daemons follow the new head.
    wait_until("both nodes to register with the new head", Duration::from_secs(30), || {
        let nodes = ionet::nodes().unwrap();
        ["a", "b"].iter().all(|name| {
            nodes.iter().any(|node| {
                node.labels.get("name").map(String::as_str) == Some(*name) && node.state == ionet::NodeState::Alive
            })
        })
    });
    eprintln!("standby took over {takeover:?} after the active head was killed");
}

/// Holds the refs given to its constructor, which reads them (in every incarnation).
pub struct Keeper {
    refs: Vec<ionet::ObjectRef<Vec<u8>>>,
    seen: usize,
}

#[ionet::actor]
impl Keeper {
    pub fn new(refs: Vec<ionet::ObjectRef<Vec<u8>>>) -> Self {
        let seen = ionet::get_all(&refs).unwrap().iter().map(Vec::len).sum();
        Keeper { refs, seen }
    }

    pub fn seen(&self) -> usize {
        self.seen
    }

    pub fn total(&self) -> usize {
        ionet::get_all(&self.refs).unwrap().iter().map(Vec::len).sum()
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    /// The actor id and incarnation the method's context names.
    pub fn whoami(&self) -> (String, u32) {
        let context = ionet::get_runtime_context().unwrap();
        (context.actor_id.map(|id| id.hex()).unwrap_or_default(), context.actor_incarnation)
    }

    /// Ends the actor from inside (`exit_actor`).
    pub fn leave(&self) -> i64 {
        match ionet::exit_actor() {
            Ok(never) => match never {},
            Err(err) => panic!("exit_actor failed: {err}"),
        }
    }
}

/// A ref inside an actor's constructor arguments lives while the actor does, though its
/// creator dropped every handle: the actor reads it later, and so does its constructor
/// run again on a restart; once the actor is dead for good, the object is freed.
fn refs_in_constructor_args_live_as_long_as_the_actor() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    cluster.init();
    let head = ionet::nodes().unwrap().into_iter().find(|node| node.is_head).unwrap();
    let store_bytes = || {
        let stats = ionet::testing::object_store_stats(&head.address).unwrap();
        stats.bytes_in_memory + stats.bytes_spilled
    };
    let inner = ionet::put(&vec![7u8; 1 << 20]).unwrap();
    let keeper = Keeper::options(ActorOptions::new().max_restarts(1)).remote(vec![inner.clone()]).unwrap();
    drop(inner);
    assert_eq!(ionet::get(&keeper.seen()).unwrap(), 1 << 20);
    // Without a holder the free would have happened at once: give it a moment to.
    std::thread::sleep(Duration::from_secs(1));
    assert!(store_bytes() >= 1 << 20, "the object is still held for the actor");
    assert_eq!(ionet::get(&keeper.total()).unwrap(), 1 << 20, "the actor reads it later");

    sigkill(ionet::get(&keeper.pid()).unwrap());
    wait_until("the actor to restart", Duration::from_secs(60), || {
        keeper.actor_handle().info().is_ok_and(|info| info.incarnation == 1 && info.state == ionet::ActorState::Alive)
    });
    assert_eq!(ionet::get(&keeper.seen()).unwrap(), 1 << 20, "the constructor read it again on the restart");

    ionet::kill(&keeper, true).unwrap();
    wait_until("the object to be freed with the actor", Duration::from_secs(30), || store_bytes() == 0);
    drop(cluster);
}

fn main() {
    if let Ok(driver) = std::env::var(DRIVER_ENV) {
        match driver.as_str() {
            "second_driver" => second_driver(),
            other => panic!("unknown driver {other}"),
        }
        std::process::exit(0);
    }
    harness::run(
        &[
            ("ten_thousand_calls_run_in_order", ten_thousand_calls_run_in_order),
            ("handle_passed_to_tasks_on_two_nodes", handle_passed_to_tasks_on_two_nodes),
            ("named_detached_actor_outlives_its_driver", named_detached_actor_outlives_its_driver),
            ("killed_actor_restarts_or_dies", killed_actor_restarts_or_dies),
            ("actors_sharing_a_process_live_and_end_apart", actors_sharing_a_process_live_and_end_apart),
            ("thousands_of_actors_created_at_once_are_all_ready", thousands_of_actors_created_at_once_are_all_ready),
            ("leases_of_a_killed_actor_come_back", leases_of_a_killed_actor_come_back),
            (
                "the_stream_of_actor_rows_is_opened_again_when_its_time_is_up",
                the_stream_of_actor_rows_is_opened_again_when_its_time_is_up,
            ),
            ("gpu_actor_waits_for_the_gpu", gpu_actor_waits_for_the_gpu),
            ("hundred_concurrent_calls_share_one_actor", hundred_concurrent_calls_share_one_actor),
            (
                "the_head_forgets_the_longest_dead_actors_past_its_limit",
                the_head_forgets_the_longest_dead_actors_past_its_limit,
            ),
            ("an_actor_no_node_can_fit_fails_as_infeasible", an_actor_no_node_can_fit_fails_as_infeasible),
            ("head_restarted_from_storage_loses_nothing", head_restarted_from_storage_loses_nothing),
            ("head_restarted_from_redis_loses_nothing", head_restarted_from_redis_loses_nothing),
            ("standby_head_takes_over_on_redis", standby_head_takes_over_on_redis),
            ("refs_in_constructor_args_live_as_long_as_the_actor", refs_in_constructor_args_live_as_long_as_the_actor),
        ],
        Duration::from_secs(180),
    );
}
