//! The cluster simulator: one real head in a process of its own and many real node
//! daemons ([`ionet_worker::node_daemon::NodeDaemon`]: the real registration, heartbeat,
//! cluster-view refresh, lease and spillback code) in a few fleet processes, so that
//! thousands of nodes join one head on one machine. It reports what grows with the
//! cluster: the head's CPU and memory, the latency a node sees for its heartbeat and its
//! view of the cluster, how long a fleet takes to register, and false deaths (nodes the
//! head declared dead though their daemons ran throughout).
//!
//! The fleet runs no tasks here (the benchmark is about the control plane): its nodes
//! offer CPUs and take leases like any node, but nothing asks them for any.
//!
//! Both the head and a fleet are the `ionet-sim` binary of this crate (`ionet-sim head`,
//! `ionet-sim fleet`); [`simulate`] starts them and measures.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use ionet_common::auth::Bearer;
use ionet_common::config::ClusterConfig;
use ionet_common::credential::{registration_message, KeyPair};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState, ResourceQuantities};
use ionet_common::rpc::proto::gcs::{CreateTokenRequest, GetAllNodesRequest, HeartbeatRequest, RegisterNodeRequest};
use ionet_common::{NodeId, Quantity, ResourceSet};

/// Most node daemons one fleet process holds: each takes three descriptors (its server's
/// listener, its connection to the head, its scratch lock), and a process may have 20,000
/// here.
pub const NODES_PER_FLEET: usize = 2_500;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The `ionet-sim` binary.
    pub binary: PathBuf,
    pub nodes: usize,
    /// How many of them keep a view of the cluster, as every real node does (a view is
    /// the size of the cluster: thousands of them do not fit one machine); the rest
    /// heartbeat without reading the node table.
    pub view_nodes: usize,
    /// How long the steady window lasts, after every node registered.
    pub window: Duration,
    /// Longest the fleet may take to register.
    pub register_timeout: Duration,
}

/// What the simulation measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    pub nodes: usize,
    /// From starting the fleet processes to every node registered (their daemons' own
    /// word), and to the head listing every one alive.
    pub registered_in: Duration,
    /// The head's CPU time from starting the fleet to every node registered: what the
    /// registrations (and the views of the cluster joining meanwhile) cost the head, which
    /// on this machine shares two cores with the fleet simulating the nodes.
    pub head_cpu_registering: Duration,
    /// The fleet processes' CPU time from their start to all their nodes registered:
    /// with the head's, whether registering was bound by this machine's two cores.
    pub fleet_cpu_registering: Duration,
    pub listed_in: Duration,
    /// The head's CPU over the steady window, as a share of one core.
    pub head_cpu_share: f64,
    /// The fleet processes' CPU over the window, in cores (what the simulation itself costs).
    pub fleet_cpu_cores: f64,
    /// The head's resident memory at the end of the window, in MiB.
    pub head_rss_mib: f64,
    /// A probe node's heartbeats (20 a second, each reading what changed in the node
    /// table, as a node's does) over the window: median and 99th percentile.
    pub heartbeat_p50: Duration,
    pub heartbeat_p99: Duration,
    /// Probe heartbeats the head refused or did not answer (counted, not timed).
    pub heartbeats_failed: usize,
    /// The whole node table as a node reads it when it (re)joins (`GetAllNodes`), read
    /// [`TABLE_READS`] times after the window.
    pub view_p50: Duration,
    pub view_p99: Duration,
    /// Nodes of the fleet the head declared dead, and registrations beyond each node's first.
    pub false_deaths: usize,
    pub reregistrations: u64,
    /// The fewest and most alive nodes a fleet node's cluster view held at the end (the
    /// fleet and the probe, which joined after the fleet: learnt from heartbeat deltas).
    pub view_least: usize,
    pub view_most: usize,
    pub view_nodes: usize,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            out,
            "cluster sim: {} nodes registered in {:.2} s (listed alive by the head in {:.2} s; the head's CPU meanwhile \
             {:.2} s, the fleet's {:.2} s); steady window: \
             head CPU {:.1}% of one core, head RSS {:.0} MiB, heartbeat p50 {:.2} ms p99 {:.2} ms ({} failed), \
             node-table read p50 {:.2} ms p99 {:.2} ms, fleet CPU {:.2} cores; \
             false deaths {}, re-registrations {}, nodes in each node's view {}..{} ({} nodes keep one)",
            self.nodes,
            self.registered_in.as_secs_f64(),
            self.listed_in.as_secs_f64(),
            self.head_cpu_registering.as_secs_f64(),
            self.fleet_cpu_registering.as_secs_f64(),
            100.0 * self.head_cpu_share,
            self.head_rss_mib,
            ms(self.heartbeat_p50),
            ms(self.heartbeat_p99),
            self.heartbeats_failed,
            ms(self.view_p50),
            ms(self.view_p99),
            self.fleet_cpu_cores,
            self.false_deaths,
            self.reregistrations,
            self.view_least,
            self.view_most,
            self.view_nodes
        )
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn failed(what: &str, why: impl std::fmt::Display) -> String {
    format!("{what}: {why}")
}

/// A child process of the simulation that says what it has to say in lines on stdout and
/// ends when its stdin closes.
struct Part {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Part {
    fn spawn(binary: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<Self, String> {
        let mut child = Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| failed(&format!("starting {}", binary.display()), err))?;
        let stdout = child.stdout.take().expect("piped");
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Self { child, stdin, lines })
    }

    /// Its next line, within `timeout`.
    fn line(&mut self, timeout: Duration, what: &str) -> Result<String, String> {
        self.lines.recv_timeout(timeout).map_err(|_| {
            let status = self.child.try_wait().ok().flatten();
            format!("{what}: no word within {timeout:?} (exited: {status:?})")
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin and waits for it to end.
    fn stop(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory of a process, in KiB (`/proc/<pid>/status`).
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], share: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * share).round() as usize]
}

/// Runs the simulation: a head, `options.nodes` nodes in fleets of at most
/// [`NODES_PER_FLEET`], a steady window; stops everything and reports.
pub fn simulate(options: &SimOptions) -> Result<SimReport, String> {
    let dir = tempfile::tempdir().map_err(|err| failed("a temp dir", err))?;
    let mut head = Part::spawn(&options.binary, &["head", "--dir", &dir.path().to_string_lossy()], &[])?;
    let address = head.line(Duration::from_secs(60), "the head's address")?;
    let admin = Bearer::new(&head.line(Duration::from_secs(10), "the head's admin credential")?)
        .map_err(|err| failed("the head's admin credential", err))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|err| failed("a runtime", err))?;
    let mut operator = runtime
        .block_on(ionet_common::rpc::gcs_client(&address, &admin))
        .map_err(|err| failed("connecting to the head", err))?;
    // The fleet joins as providers' nodes do: with a join token.
    let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 3600, ..Default::default() };
    let token =
        runtime.block_on(operator.create_token(request)).map_err(|err| failed("a join token", err))?.into_inner().token;
    let token_file = dir.path().join("join_token");
    std::fs::write(&token_file, &token).map_err(|err| failed("writing the join token", err))?;

    // Each node's scratch directories on a memory file system: 10,000 nodes' directories
    // made at once on this machine's one disk (ext4) cost the fleet a fifth of its CPU in
    // inode allocation, a cost each real node pays on its own disk.
    let scratch = tempfile::tempdir_in(if Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
        .map_err(|err| failed("a scratch dir", err))?;

    // Every fleet at once: the nodes register together, as after a head's restart.
    let started = Instant::now();
    let head_cpu_at_start = crate::process_cpu_seconds(head.pid()).unwrap_or_default();
    let mut fleets = Vec::new();
    let (mut left, mut views_left) = (options.nodes, options.view_nodes.min(options.nodes));
    let token_path = token_file.to_string_lossy().into_owned();
    while left > 0 {
        let count = left.min(NODES_PER_FLEET);
        // Views spread evenly over the fleets.
        let views = views_left.div_ceil(left.div_ceil(NODES_PER_FLEET)).min(count);
        left -= count;
        views_left -= views;
        let (count_text, views_text, fleet_text) = (count.to_string(), views.to_string(), fleets.len().to_string());
        let args = [
            "fleet",
            "--address",
            &address,
            "--token-file",
            &token_path,
            "--nodes",
            &count_text,
            "--view-nodes",
            &views_text,
            "--fleet",
            &fleet_text,
        ];
        fleets.push(Part::spawn(&options.binary, &args, &[("TMPDIR", scratch.path())])?);
    }
    let mut fleet_cpu_registering = Duration::ZERO;
    for fleet in &mut fleets {
        let line = fleet.line(options.register_timeout, "a fleet registering")?;
        if !line.starts_with("registered") {
            return Err(format!("a fleet could not register: {line}"));
        }
        let cpu = line.rsplit_once(" cpu ").and_then(|(_, seconds)| seconds.parse::<f64>().ok()).unwrap_or_default();
        fleet_cpu_registering += Duration::from_secs_f64(cpu);
    }
    let registered_in = started.elapsed();
    let head_cpu_registering =
        Duration::from_secs_f64(crate::process_cpu_seconds(head.pid()).unwrap_or_default() - head_cpu_at_start);
    let alive = |operator: &mut ionet_common::rpc::GcsClient| -> Result<Vec<NodeInfo>, String> {
        let reply =
            runtime.block_on(operator.get_all_nodes(GetAllNodesRequest { include_dead: true, ..Default::default() }));
        Ok(reply.map_err(|err| failed("reading the node table", err))?.into_inner().nodes)
    };
    let deadline = Instant::now() + options.register_timeout;
    loop {
        let nodes = alive(&mut operator)?;
        let living = nodes.iter().filter(|node| node.state == NodeState::Alive as i32).count();
        if living >= options.nodes {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the head lists {living} of {} nodes alive ({} dead) after {:.0} s, its CPU meanwhile {:.1} s",
                options.nodes,
                nodes.len() - living,
                started.elapsed().as_secs_f64(),
                crate::process_cpu_seconds(head.pid()).unwrap_or_default() - head_cpu_at_start
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed_in = started.elapsed();

    // The steady window: a probe node heartbeats 20 times a second, as a node does; the
    // head's CPU is read before and after. The probe's reads of the whole node table come
    // after it: each is tens of milliseconds of the head's CPU at 10,000 nodes, which
    // would be counted as the cost of the fleet's heartbeats.
    let mut probe = runtime.block_on(register_probe(&address, &token))?;
    let head_cpu_before = crate::process_cpu_seconds(head.pid()).unwrap_or_default();
    let fleet_cpu =
        |fleets: &[Part]| -> f64 { fleets.iter().filter_map(|fleet| crate::process_cpu_seconds(fleet.pid())).sum() };
    let fleet_cpu_before = fleet_cpu(&fleets);
    let window_started = Instant::now();
    let (heartbeats, heartbeats_failed) = runtime.block_on(probe.heartbeat(options.window));
    let window = window_started.elapsed().as_secs_f64();
    let head_cpu_share = (crate::process_cpu_seconds(head.pid()).unwrap_or_default() - head_cpu_before) / window;
    let fleet_cpu_cores = (fleet_cpu(&fleets) - fleet_cpu_before) / window;
    let views = runtime.block_on(probe.read_table(TABLE_READS));
    let head_rss_mib = resident_kib(head.pid()).unwrap_or_default() as f64 / 1024.0;

    let nodes = alive(&mut operator)?;
    let false_deaths = nodes.iter().filter(|node| node.state == NodeState::Dead as i32).count();
    let (mut reregistrations, mut view_least, mut view_most) = (0, usize::MAX, 0);
    for fleet in &mut fleets {
        if let Some(stdin) = fleet.stdin.as_mut() {
            let _ = writeln!(stdin, "report");
        }
        let line = fleet.line(Duration::from_secs(30), "a fleet's report")?;
        let numbers: Vec<u64> = line.split(' ').filter_map(|word| word.parse().ok()).collect();
        let [registrations, least, most] = numbers[..] else {
            return Err(format!("a fleet's report: {line}"));
        };
        reregistrations += registrations;
        // A fleet keeping no view reports none.
        if most > 0 {
            view_least = view_least.min(least as usize);
            view_most = view_most.max(most as usize);
        }
    }
    // Each node's first registration is not one again.
    let reregistrations = reregistrations.saturating_sub(options.nodes as u64);
    for fleet in fleets {
        fleet.stop();
    }
    head.stop();
    Ok(SimReport {
        nodes: options.nodes,
        registered_in,
        head_cpu_registering,
        fleet_cpu_registering,
        listed_in,
        head_cpu_share,
        fleet_cpu_cores,
        head_rss_mib,
        heartbeat_p50: percentile(&heartbeats, 0.5),
        heartbeat_p99: percentile(&heartbeats, 0.99),
        heartbeats_failed,
        view_p50: percentile(&views, 0.5),
        view_p99: percentile(&views, 0.99),
        false_deaths,
        reregistrations,
        view_least,
        view_most,
        view_nodes: options.view_nodes.min(options.nodes),
    })
}

/// Reads of the whole node table the probe times, after the steady window.
const TABLE_READS: usize = 5;

/// A node of the simulation's own, registered by hand, timing what a node asks.
struct Probe {
    node_id: NodeId,
    client: ionet_common::rpc::GcsClient,
}

async fn register_probe(address: &str, token: &str) -> Result<Probe, String> {
    let key = KeyPair::generate();
    let node_id = NodeId::random();
    let total = ResourceSet::new().with("CPU", Quantity::whole(1));
    let info = NodeInfo {
        node_id: node_id.to_vec(),
        address: "127.0.0.1:1".into(),
        total: Some(ResourceQuantities::from_set(&total)),
        available: Some(ResourceQuantities::from_set(&total)),
        public_key: key.public_key().to_vec(),
        ..Default::default()
    };
    let join = Bearer::new(token).map_err(|err| failed("the join token", err))?;
    let mut joiner =
        ionet_common::rpc::gcs_client(address, &join).await.map_err(|err| failed("connecting the probe", err))?;
    let proof = key.sign(&registration_message(&info.node_id, &info.public_key)).to_vec();
    let reply = joiner
        .register_node(RegisterNodeRequest { node: Some(info), proof, ..Default::default() })
        .await
        .map_err(|err| failed("registering the probe", err))?;
    let credential = Bearer::new(&reply.into_inner().node_credential).map_err(|err| failed("its credential", err))?;
    let client =
        ionet_common::rpc::gcs_client(address, &credential).await.map_err(|err| failed("connecting the probe", err))?;
    Ok(Probe { node_id, client })
}

impl Probe {
    /// Heartbeats 20 times a second for `window`: each one's latency, sorted, and how
    /// many failed.
    async fn heartbeat(&mut self, window: Duration) -> (Vec<Duration>, usize) {
        let (mut heartbeats, mut failed) = (Vec::new(), 0);
        let end = Instant::now() + window;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut beat = 0u64;
        // As a node does: each heartbeat reads what changed in the node table since.
        let mut view_at = (0, 0);
        while Instant::now() < end {
            tick.tick().await;
            let started = Instant::now();
            let request = HeartbeatRequest {
                node_id: self.node_id.to_vec(),
                available: None,
                read_view: true,
                view_since_version: view_at.0,
                view_since_incarnation: view_at.1,
                seq: beat + 1,
                quiet: false,
                sampled_view: true,
            };
            match self.client.heartbeat(request).await {
                Ok(reply) => {
                    heartbeats.push(started.elapsed());
                    if let Some(view) = reply.into_inner().view {
                        // Decoded as a node does, so that its cost is in the latency.
                        if view.decode_nodes().is_ok() {
                            view_at = (view.version, view.incarnation);
                        } else {
                            failed += 1;
                        }
                    }
                }
                Err(_) => failed += 1,
            }
            beat += 1;
        }
        heartbeats.sort();
        (heartbeats, failed)
    }

    /// Reads the whole node table `times`, one after another: each read's latency, sorted.
    async fn read_table(&mut self, times: usize) -> Vec<Duration> {
        let mut reads = Vec::new();
        for _ in 0..times {
            let started = Instant::now();
            let request = GetAllNodesRequest { include_dead: false, ..Default::default() };
            if self.client.get_all_nodes(request).await.is_ok() {
                reads.push(started.elapsed());
            }
        }
        reads.sort();
        reads
    }
}

/// `ionet-sim head --dir D`: a real control store on loopback with its tables in a file
/// under `D` (as `ionet start --head` keeps them), printing its address and the admin
/// credential, serving until stdin closes.
pub fn serve_head(dir: &Path) -> Result<(), String> {
    // As `ionet start` does: a connection per node.
    ionet_common::rpc::raise_descriptor_limit().map_err(|err| failed("raising the descriptor limit", err))?;
    let runtime = tokio::runtime::Runtime::new().map_err(|err| failed("a runtime", err))?;
    runtime.block_on(async {
        let config = ClusterConfig::load(None).map_err(|err| failed("the cluster config", err))?;
        let listener =
            ionet_common::rpc::listen("127.0.0.1", 0).await.map_err(|err| failed("binding the head", err))?;
        let mut options = ionet_gcs::GcsServerOptions::new(config);
        options.storage = ionet_gcs::storage::StorageLocation::File(dir.join("tables.redb"));
        options.ledger_path = Some(dir.join("ledger.redb"));
        options.signing_key_path = Some(dir.join("signing_key"));
        let server = ionet_gcs::GcsServer::start(options, listener).await.map_err(|err| failed("the head", err))?;
        println!("{}", server.address());
        println!("{}", server.admin_credential(Duration::from_secs(24 * 3600)).as_str());
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .map_err(|err| failed("waiting for stdin", err))?;
        server.shutdown().await;
        Ok(())
    })
}

/// `ionet-sim fleet --address A --token-file F --nodes N`: N real node daemons joining
/// the head with the join token in F, all at once. Prints `registered <nodes> cpu <seconds>`
/// (this process's CPU time so far) once every one has (or why not); on each `report`
/// line read, `registrations <total> views <least> <most>`
/// (registrations of all its nodes, and the fewest and most nodes in one node's view);
/// stops them when stdin closes.
pub fn run_fleet(
    address: &str,
    token_file: &Path,
    nodes: usize,
    view_nodes: usize,
    fleet: usize,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| failed("a runtime", err))?;
    let token = std::fs::read_to_string(token_file).map_err(|err| failed("reading the join token", err))?;
    let join = Bearer::new(token.trim()).map_err(|err| failed("the join token", err))?;
    let config = ClusterConfig::load(None).map_err(|err| failed("the cluster config", err))?;
    raise_descriptor_limit(nodes * 3 + 256)?;
    runtime.block_on(async {
        let started = futures::future::join_all((0..nodes).map(|index| {
            let options = daemon_options(address, &join, &config, index < view_nodes, &node_host(fleet, index));
            ionet_worker::node_daemon::NodeDaemon::start(options)
        }))
        .await;
        let daemons: Vec<_> = match started.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(daemons) => daemons,
            Err(err) => {
                println!("failed: starting a node daemon: {err}");
                return Err(failed("starting a node daemon", err));
            }
        };
        let registered =
            futures::future::join_all(daemons.iter().map(|daemon| daemon.wait_registered(Duration::from_secs(600))))
                .await;
        if let Some(Err(err)) = registered.into_iter().find(Result::is_err) {
            println!("failed: {err}");
            return Err(failed("registering", err));
        }
        let cpu = crate::process_cpu_seconds(std::process::id()).unwrap_or_default();
        println!("registered {nodes} cpu {cpu:.2}");
        let (send, mut reports) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line.trim() == "report" && send.send(()).is_err() {
                    return;
                }
            }
        });
        while reports.recv().await.is_some() {
            let total: u64 = daemons.iter().map(|daemon| daemon.registrations()).sum();
            let views = daemons.iter().take(view_nodes).map(|daemon| daemon.nodes_in_view());
            let (least, most) = views.fold((usize::MAX, 0), |(least, most), view| (least.min(view), most.max(view)));
            println!("registrations {total} views {least} {most}");
        }
        futures::future::join_all(daemons.into_iter().map(|daemon| daemon.shutdown("the simulation ended"))).await;
        Ok(())
    })
}

/// Raises this process's soft limit on open descriptors to its hard limit; an error if
/// that is below `needed`.
fn raise_descriptor_limit(needed: usize) -> Result<(), String> {
    let most =
        ionet_common::rpc::raise_descriptor_limit().map_err(|err| failed("raising the descriptor limit", err))?;
    if (most as usize) < needed {
        return Err(format!("a fleet of this size needs {needed} descriptors; this process may have {most}"));
    }
    Ok(())
}

/// The loopback address node `index` of fleet `fleet` serves on: one of its own, as each
/// real node has (its connection to the head still comes from 127.0.0.1). With every
/// node's server on 127.0.0.1 too, 10,000 servers and 10,000 connections to the head
/// shared one address's ephemeral ports, and the kernel's search for a free one at each
/// bind cost the fleet a fifth of its CPU.
fn node_host(fleet: usize, index: usize) -> String {
    format!("127.{}.{}.{}", 1 + fleet % 254, index / 250 % 256, 1 + index % 250)
}

fn daemon_options(
    address: &str,
    join: &Bearer,
    config: &ClusterConfig,
    keeps_view: bool,
    host: &str,
) -> ionet_worker::node_daemon::NodeDaemonOptions {
    let total = ResourceSet::new().with("CPU", Quantity::whole(8)).with("memory", Quantity::whole(32 << 30));
    ionet_worker::node_daemon::NodeDaemonOptions {
        gcs_address: address.to_string(),
        join_credential: join.clone(),
        node_key: KeyPair::generate(),
        config: config.clone(),
        spec: ionet_worker::node_spec::NodeSpec {
            total,
            gpus: Vec::new(),
            accelerator_type: String::new(),
            labels: Default::default(),
            price_per_gpu_hour: 0,
            price_per_cpu_hour: 0,
            wallet: String::new(),
            power_watts: 0,
            electricity_price_per_kwh: 0,
        },
        bind_host: host.into(),
        port: 0,
        advertise_host: host.into(),
        is_head: false,
        runs_workloads: true,
        workers: ionet_worker::lease::WorkerPoolOptions {
            idle_timeout: Duration::from_secs(60),
            max_idle_workers: 1,
            log_dir: None,
            max_blocked_workers: 8,
        },
        object_store_capacity: 64 << 20,
        worker_identities: None,
        cluster_ca: None,
        metrics_port: None,
        keeps_view,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head of `config` and one node daemon (keeping a view or not) it registered.
    async fn head_and_node(
        config: &ClusterConfig,
        keeps_view: bool,
    ) -> (ionet_gcs::GcsServer, ionet_worker::node_daemon::NodeDaemon) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server =
            ionet_gcs::GcsServer::start(ionet_gcs::GcsServerOptions::new(config.clone()), listener).await.unwrap();
        let address = server.address().to_string();
        let admin = server.admin_credential(Duration::from_secs(600));
        let mut operator = ionet_common::rpc::gcs_client(&address, &admin).await.unwrap();
        let request = CreateTokenRequest { role: "node".into(), ttl_seconds: 600, ..Default::default() };
        let join = Bearer::new(&operator.create_token(request).await.unwrap().into_inner().token).unwrap();
        let options = daemon_options(&address, &join, config, keeps_view, "127.0.0.1");
        let daemon = ionet_worker::node_daemon::NodeDaemon::start(options).await.unwrap();
        daemon.wait_registered(Duration::from_secs(30)).await.unwrap();
        (server, daemon)
    }

    /// Waits (a minute at most) until the head has taken `count` more heartbeats.
    async fn wait_for_heartbeats(state: &ionet_gcs::state::GcsState, count: u64) {
        let target = state.heartbeats_received() + count;
        let deadline = Instant::now() + Duration::from_secs(60);
        while state.heartbeats_received() < target {
            assert!(Instant::now() < deadline, "the node stopped heartbeating");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The head ends each heartbeat stream when its time is up; the node opens another
    /// and heartbeats on, without registering again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_heartbeats_on_across_the_ends_of_its_streams() {
        let config = ClusterConfig {
            heartbeat_interval_ms: 50,
            heartbeat_timeout_ms: 2_000,
            heartbeat_stream_lifetime_ms: 200,
            ..Default::default()
        };
        let (server, daemon) = head_and_node(&config, true).await;
        let state = server.state().clone();
        let streams = state.heartbeat_streams_opened();
        assert!(streams <= 1, "one stream at a time: {streams}");
        // Forty heartbeats at 20 a second (a 2 s timeout leaves no room for quiet ones)
        // span ten lifetimes of a stream.
        wait_for_heartbeats(&state, 40).await;
        let opened = state.heartbeat_streams_opened() - streams;
        assert!(opened >= 3, "the head ended its streams and the node opened others: {opened}");
        assert_eq!(daemon.registrations(), 1, "a stream's end is not a lost registration");
        assert!(state.is_alive(&daemon.node_id()), "alive throughout");
        daemon.shutdown("the test ended").await;
        server.shutdown().await;
    }

    /// A node with nothing new heartbeats every quarter of the head's timeout, not every
    /// interval, and its quiet heartbeats still bring it news: a node that joins reaches
    /// its view.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_node_heartbeats_seldom_and_hears_news() {
        let config = ClusterConfig { heartbeat_interval_ms: 50, heartbeat_timeout_ms: 3_000, ..Default::default() };
        let every = config.idle_heartbeat_interval(config.heartbeat_timeout_ms);
        assert_eq!(every, Duration::from_millis(750), "a quarter of the timeout");
        let (server, daemon) = head_and_node(&config, true).await;
        let state = server.state().clone();
        wait_for_heartbeats(&state, 1).await;
        // Four more take three idle intervals at least (a heartbeat an interval: 0.2 s).
        let started = Instant::now();
        wait_for_heartbeats(&state, 4).await;
        let took = started.elapsed();
        assert!(took >= 3 * every - Duration::from_millis(100), "four heartbeats in {took:?}: one an interval");
        assert!(state.is_alive(&daemon.node_id()), "alive throughout");

        assert_eq!(daemon.nodes_in_view(), 1, "itself");
        let joined_id = NodeId::random();
        let joined = NodeInfo {
            node_id: joined_id.to_vec(),
            address: "127.0.0.1:7000".into(),
            total: Some(ResourceQuantities::from_set(&ResourceSet::new().with("CPU", Quantity::whole(4)))),
            available: Some(ResourceQuantities::from_set(&ResourceSet::new().with("CPU", Quantity::whole(4)))),
            public_key: vec![7; 32],
            ..Default::default()
        };
        state.register_node(joined).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.nodes_in_view() < 2 {
            assert!(Instant::now() < deadline, "the joined node never reached the idle node's view");
            // It has no daemon: the test heartbeats for it, so it lives until seen.
            state.heartbeat(&joined_id.to_vec(), None).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon.shutdown("the test ended").await;
        server.shutdown().await;
    }

    /// A head stopping while nodes hold heartbeat streams (ten minutes long) stops at once:
    /// its server waits for open streams, so they end when it stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_stops_while_nodes_hold_heartbeat_streams() {
        let config = ClusterConfig { heartbeat_interval_ms: 50, heartbeat_timeout_ms: 2_000, ..Default::default() };
        // A node without a view: its stream is never ended for carrying a whole table.
        let (server, daemon) = head_and_node(&config, false).await;
        let state = server.state().clone();
        wait_for_heartbeats(&state, 5).await;
        assert_eq!(state.heartbeat_streams_opened(), 1, "one stream, held open");
        let stopped = tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await;
        assert!(stopped.is_ok(), "the head waited for its nodes' heartbeat streams to end");
        daemon.shutdown("the test ended").await;
    }
}
