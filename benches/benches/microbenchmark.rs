//! `ionet microbenchmark`: Ray's `ray microbenchmark` lines, measured on ionet.
//!
//! Runs against an embedded local cluster (this binary is also the worker binary).
//! Prints one line per benchmark in Ray's format, `<name> per second <mean> +- <stddev>`,
//! so the output can be set beside `../shared/bench/ray-baseline.sh`.
//!
//!   cargo bench -p ionet-benches --bench microbenchmark [-- FILTER] [--seconds S]
//!
//! With `IONET_BENCH_ADDRESS` set (`auto`, or a head's address), it joins a cluster
//! started with `ionet start` instead: how TLS (`ionet start --head --tls`) and jobs
//! running as users of their own cost against the same cluster served plain.
//!
//! "multi client" lines use several driver threads in one process (Ray uses several
//! actor processes); the cluster is the same for all lines: one node with this
//! machine's CPUs.

use std::time::{Duration, Instant};

use ionet::{InitConfig, ObjectRef};

#[ionet::remote]
fn small_value() -> u8 {
    0
}

/// The actor of the actor lines (Ray's `Actor` with `small_value`).
pub struct Bench;

#[ionet::actor]
impl Bench {
    pub fn new() -> Self {
        Bench
    }

    pub fn small_value(&self) -> u8 {
        0
    }

    pub fn small_value_arg(&self, x: u8) -> u8 {
        x
    }
}

const TRIALS: usize = 5;

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// Runs `body` (which reports how many operations it did) repeatedly for about
/// `seconds` per trial, and prints Ray's line.
fn timeit(name: &str, filter: &Option<String>, seconds: f64, mut body: impl FnMut() -> usize) {
    if filter.as_ref().is_some_and(|filter| !name.contains(filter.as_str())) {
        return;
    }
    body(); // warm up: workers started, leases held
    let mut rates = Vec::with_capacity(TRIALS);
    for _ in 0..TRIALS {
        let started = Instant::now();
        let mut count = 0;
        while started.elapsed().as_secs_f64() < seconds {
            count += body();
        }
        rates.push(count as f64 / started.elapsed().as_secs_f64());
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let variance = rates.iter().map(|rate| (rate - mean).powi(2)).sum::<f64>() / rates.len() as f64;
    println!("{name} per second {mean:.2} +- {:.2}", variance.sqrt());
}

fn actor_lines(filter: &Option<String>, seconds: f64, clients: usize) {
    let wanted = |name: &str| filter.as_ref().is_none_or(|filter| name.contains(filter.as_str()));
    let names = [
        "1:1 actor calls sync",
        "1:1 actor calls async",
        "1:1 actor calls concurrent",
        "1:n actor calls async",
        "n:n actor calls async",
        "n:n actor calls with arg async",
        "actor creations",
    ];
    if !names.iter().any(|name| wanted(name)) {
        return;
    }
    let actor = Bench::remote().unwrap();
    timeit("1:1 actor calls sync", filter, seconds, || {
        for _ in 0..100 {
            ionet::get(&actor.small_value()).unwrap();
        }
        100
    });
    timeit("1:1 actor calls async", filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| actor.small_value()).collect();
        ionet::get_all(&refs).unwrap();
        1000
    });
    let concurrent = Bench::options(ionet::ActorOptions::new().max_concurrency(16)).remote().unwrap();
    timeit("1:1 actor calls concurrent", filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| concurrent.small_value()).collect();
        ionet::get_all(&refs).unwrap();
        1000
    });
    let actors: Vec<BenchHandle> = (0..clients).map(|_| Bench::remote().unwrap()).collect();
    timeit("1:n actor calls async", filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = (0..1000).map(|i| actors[i % actors.len()].small_value()).collect();
        ionet::get_all(&refs).unwrap();
        1000
    });
    timeit("n:n actor calls async", filter, seconds, || {
        std::thread::scope(|scope| {
            for actor in &actors {
                scope.spawn(move || {
                    let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| actor.small_value()).collect();
                    ionet::get_all(&refs).unwrap();
                });
            }
        });
        clients * 1000
    });
    let arg = ionet::put(&1u8).unwrap();
    timeit("n:n actor calls with arg async", filter, seconds, || {
        std::thread::scope(|scope| {
            for actor in &actors {
                let arg = &arg;
                scope.spawn(move || {
                    let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| actor.small_value_arg(arg)).collect();
                    ionet::get_all(&refs).unwrap();
                });
            }
        });
        clients * 1000
    });
    timeit("actor creations", filter, seconds, || {
        let created: Vec<BenchHandle> = (0..10).map(|_| Bench::remote().unwrap()).collect();
        let ready: Vec<ObjectRef<u8>> = created.iter().map(|actor| actor.small_value()).collect();
        ionet::get_all(&ready).unwrap();
        for actor in &created {
            ionet::kill(actor, true).unwrap();
        }
        10
    });
    timeit("actor creations (shared process)", filter, seconds, || {
        let options = || ionet::ActorOptions::new().share_process(true);
        let created: Vec<BenchHandle> = (0..10).map(|_| Bench::options(options()).remote().unwrap()).collect();
        let ready: Vec<ObjectRef<u8>> = created.iter().map(|actor| actor.small_value()).collect();
        ionet::get_all(&ready).unwrap();
        for actor in &created {
            ionet::kill(actor, true).unwrap();
        }
        10
    });
    for actor in actors.iter().chain([&actor, &concurrent]) {
        let _ = ionet::kill(actor, true);
    }
}

/// The actor line, only when named (`-- "10k actors"`): ten thousand actors of no
/// resources sharing processes, created at once and each called once; prints the rate
/// at which they were created and ready, then kills them.
fn ten_thousand_actors(filter: &Option<String>) {
    if !filter.as_ref().is_some_and(|filter| filter.starts_with("10k actors")) {
        return;
    }
    // `IONET_BENCH_ACTORS` sets another count.
    let count: usize = std::env::var("IONET_BENCH_ACTORS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let options = || ionet::ActorOptions::new().share_process(true);
    let started = Instant::now();
    let created: Vec<BenchHandle> = (0..count).map(|_| Bench::options(options()).remote().unwrap()).collect();
    let ready: Vec<ObjectRef<u8>> = created.iter().map(|actor| actor.small_value()).collect();
    ionet::get_all(&ready).unwrap();
    let took = started.elapsed();
    let rate = count as f64 / took.as_secs_f64();
    println!("10k actors ({count}) created and ready in {:.1} s: {rate:.0} per second", took.as_secs_f64());
    for actor in &created {
        let _ = ionet::kill(actor, true);
    }
}

/// The scale line, only when named (`-- "1m tasks"`): a million no-op tasks
/// submitted at once from this driver (backpressure holds at most
/// `IONET_MAX_PENDING_TASKS` pending) and all gotten; prints the time and this process's
/// peak memory (it hosts the embedded cluster's daemons too).
fn million_tasks(filter: &Option<String>) {
    if !filter.as_ref().is_some_and(|filter| filter.starts_with("1m tasks")) {
        return;
    }
    let started = Instant::now();
    let refs: Vec<ObjectRef<u8>> = (0..1_000_000).map(|_| small_value::remote()).collect();
    let submitted = started.elapsed();
    ionet::get_all(&refs).unwrap();
    let took = started.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status.lines().find(|line| line.starts_with("VmHWM")).unwrap_or("VmHWM: ?").to_string();
    println!(
        "1m tasks queued and done in {:.1} s (submitted in {:.1} s); {peak}",
        took.as_secs_f64(),
        submitted.as_secs_f64()
    );
}

/// A lease of one CPU asked of the local node daemon and given back, as a core worker
/// does (its worker is reused): the lease path with the node's metering reports on, or
/// off with `IONET_METERING=off` (compare the two runs).
fn lease_line(filter: &Option<String>, seconds: f64) {
    use ionet::rpc::proto::node::request_worker_lease_reply::Outcome;
    use ionet::rpc::proto::node::{RequestWorkerLeaseReply, RequestWorkerLeaseRequest, ReturnWorkerLeaseRequest};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let node = ionet::testing::local_node_address().unwrap();
    let credential = ionet::auth::Bearer::new(&ionet::testing::job_credential().unwrap()).unwrap();
    let job = ionet::get_runtime_context().unwrap().job_id;
    let channel = runtime.block_on(ionet::rpc::connect(&node, &credential, Duration::from_secs(5))).unwrap();
    let mut client = ionet::rpc::NodeManagerClient::new(channel);
    let request = RequestWorkerLeaseRequest {
        job_id: job.to_vec(),
        resources: Some((&ionet::ResourceSet::new().with("CPU", ionet::Quantity::whole(1))).into()),
        ..Default::default()
    };
    timeit("single client lease grant and return", filter, seconds, || {
        runtime.block_on(async {
            for _ in 0..100 {
                let reply: RequestWorkerLeaseReply =
                    client.request_worker_lease(request.clone()).await.unwrap().into_inner();
                let Some(Outcome::Granted(lease)) = reply.outcome else { panic!("no lease: {reply:?}") };
                let back = ReturnWorkerLeaseRequest { lease_id: lease.lease_id, worker_failed: false };
                client.return_worker_lease(back).await.unwrap();
            }
        });
        100
    });
}

fn main() {
    ionet::testing::run_worker_if_requested();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-') && a.parse::<f64>().is_err());
    let seconds: f64 = arg_value("--seconds").and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let config = match std::env::var("IONET_BENCH_ADDRESS") {
        Ok(address) if !address.is_empty() => InitConfig::default().address(address),
        _ => InitConfig::default(),
    };
    ionet::init(config).expect("a cluster to measure");
    let clients = 4;

    let value = ionet::put(&0u8).unwrap();
    timeit("single client get calls", &filter, seconds, || {
        for _ in 0..1000 {
            ionet::get(&value).unwrap();
        }
        1000
    });
    timeit("single client put calls", &filter, seconds, || {
        for _ in 0..1000 {
            ionet::put(&0u8).unwrap();
        }
        1000
    });
    timeit("multi client put calls", &filter, seconds, || {
        std::thread::scope(|scope| {
            for _ in 0..clients {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        ionet::put(&0u8).unwrap();
                    }
                });
            }
        });
        clients * 1000
    });
    // Ray puts numpy arrays (its one-copy path); the Rust counterpart is `put_bytes`.
    let gigabyte_chunk = vec![7u8; 100 * 1024 * 1024];
    timeit("single client put gigabytes", &filter, seconds, || {
        for _ in 0..10 {
            ionet::put_bytes(&gigabyte_chunk).unwrap();
        }
        1 // gigabytes
    });
    let mut target = vec![0u8; gigabyte_chunk.len()];
    timeit("single thread memcpy gigabytes (reference)", &filter, seconds, || {
        for _ in 0..10 {
            target.copy_from_slice(std::hint::black_box(&gigabyte_chunk));
        }
        1
    });
    timeit("multi client put gigabytes", &filter, seconds, || {
        std::thread::scope(|scope| {
            for _ in 0..clients {
                scope.spawn(|| {
                    for _ in 0..10 {
                        ionet::put_bytes(&gigabyte_chunk).unwrap();
                    }
                });
            }
        });
        clients
    });
    timeit("single client tasks and get batch", &filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| small_value::remote()).collect();
        ionet::get_all(&refs).unwrap();
        1
    });
    let many: Vec<ObjectRef<u8>> = (0..10_000).map(|_| ionet::put(&0u8).unwrap()).collect();
    let container = ionet::put(&many).unwrap();
    timeit("single client get object containing 10k refs", &filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = ionet::get(&container).unwrap();
        assert_eq!(refs.len(), 10_000);
        1
    });
    // As Ray's: one wait per ref, each over the refs not yet returned.
    timeit("single client wait 1k refs", &filter, seconds, || {
        let mut not_ready: Vec<ObjectRef<u8>> = (0..1000).map(|_| small_value::remote()).collect();
        for _ in 0..1000 {
            let (ready, rest) = ionet::wait(&not_ready, 1, None).unwrap();
            assert_eq!(ready.len(), 1);
            not_ready = rest;
        }
        assert!(not_ready.is_empty());
        1
    });
    timeit("single client tasks sync", &filter, seconds, || {
        for _ in 0..100 {
            ionet::get(&small_value::remote()).unwrap();
        }
        100
    });
    timeit("single client tasks async", &filter, seconds, || {
        let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| small_value::remote()).collect();
        ionet::get_all(&refs).unwrap();
        1000
    });
    timeit("multi client tasks async", &filter, seconds, || {
        std::thread::scope(|scope| {
            for _ in 0..clients {
                scope.spawn(|| {
                    let refs: Vec<ObjectRef<u8>> = (0..1000).map(|_| small_value::remote()).collect();
                    ionet::get_all(&refs).unwrap();
                });
            }
        });
        clients * 1000
    });
    // As Ray's: 100 groups of one small bundle made, waited for, and removed.
    timeit("placement group create/removal", &filter, seconds, || {
        let bundle = std::collections::BTreeMap::from([("CPU".to_string(), 0.001)]);
        let groups: Vec<_> = (0..100)
            .map(|_| ionet::placement_group(vec![bundle.clone()], ionet::PlacementStrategy::Pack).unwrap())
            .collect();
        for group in &groups {
            assert!(group.wait(Duration::from_secs(30)).unwrap(), "placed");
        }
        for group in &groups {
            ionet::remove_placement_group(group).unwrap();
        }
        100
    });
    lease_line(&filter, seconds);
    actor_lines(&filter, seconds, clients);
    million_tasks(&filter);
    ten_thousand_actors(&filter);
    drop((value, many, container));
    ionet::shutdown();
    let _ = Duration::ZERO;
}
