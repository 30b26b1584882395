//! How many node heartbeats one head absorbs, and at what CPU cost.
//!
//! The bench re-executes itself as the head (a real control store in its own
//! process), registers N simulated nodes from this process, each on its own
//! connection, and has every node heartbeat (staggered; how often: below) for the
//! measured window. It reports heartbeats/s absorbed and the head process's CPU share of one
//! core, read from /proc.
//!
//! As node daemons do, a node heartbeats each second when its available resources
//! changed, with them, and otherwise every quarter of the head's timeout (2.5 s by
//! default), on a `HeartbeatStream` of its own, asking for no answer but news (`quiet`).
//! `--changing 1` makes every node's resources change every second (the worst case: a
//! heartbeat each second from each). The protocol before, for comparison in one sitting:
//! `--answered 1`, each node a heartbeat each second, each answered; `--calls 1`, the
//! same by `Heartbeat` calls (what nodes do with a head that has no streams).
//!
//! `--views 1` has every node keep a view of the cluster as real nodes do (each
//! heartbeat asks for the rows changed since its view; a node's first, or one on a
//! stream the head ended after a whole table, reads every row): with `--changing 1`,
//! each change goes to every node, the cost that grows with the square of the cluster,
//! unless views are sampled: nodes ask for sampled views as real ones do, and the head
//! samples past twice `--view-sample N` nodes (64, the default; 0: whole views, the
//! square cost).
//!
//!   cargo bench -p ionet-benches --bench gcs_heartbeats -- [--nodes 1000] [--seconds 10] [--changing 1] [--answered 1] [--calls 1] [--views 1] [--view-sample N] [--period-ms N]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet::auth::Bearer;
use ionet::config::ClusterConfig;
use ionet::credential::{registration_message, KeyPair};
use ionet::rpc::proto::common::{NodeInfo, ResourceQuantities};
use ionet::rpc::proto::gcs::{HeartbeatReply, HeartbeatRequest, NodeRows, RegisterNodeRequest};
use ionet::rpc::GcsClient;
use ionet::{NodeId, Quantity, ResourceSet};
use ionet_gcs::{GcsServer, GcsServerOptions};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn serve_head() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let view_sample = arg("--view-sample", ClusterConfig::default().view_sample as u64) as usize;
        let config = ClusterConfig { heartbeat_timeout_ms: 30_000, view_sample, ..Default::default() };
        let listener = ionet_common::rpc::listen("127.0.0.1", 0).await.unwrap();
        let server = GcsServer::start(GcsServerOptions::new(config), listener).await.unwrap();
        println!("{}", server.address());
        // The operator's credential, for registering the simulated nodes.
        println!("{}", server.admin_credential(Duration::from_secs(3600)).as_str());
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .unwrap();
        server.shutdown().await;
    });
}

fn main() {
    if std::env::args().any(|a| a == "--serve-head") {
        return serve_head();
    }
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let nodes = arg("--nodes", 1000) as usize;
    let seconds = arg("--seconds", 10).max(2);
    let changing = arg("--changing", 0) == 1;
    let calls = arg("--calls", 0) == 1;
    let answered = calls || arg("--answered", 0) == 1;
    let views = arg("--views", 0) == 1;
    // What a node of the default configuration does with nothing new (the bench's head
    // has a longer timeout only so that the first nodes live while the last register).
    let defaults = ClusterConfig::default();
    let every = match changing || answered {
        true => Duration::from_millis(defaults.heartbeat_interval_ms),
        false => defaults.idle_heartbeat_interval(defaults.heartbeat_timeout_ms),
    };
    // `--period-ms N`: each node's heartbeats N ms apart instead (a long one: the head's
    // own cost with its nodes registered and quiet).
    let every = match arg("--period-ms", 0) {
        0 => every,
        ms => Duration::from_millis(ms),
    };
    let mut head = Command::new(std::env::current_exe().unwrap())
        .arg("--serve-head")
        .args(["--view-sample", &arg("--view-sample", ClusterConfig::default().view_sample as u64).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the head");
    let mut line = String::new();
    let mut stdout = BufReader::new(head.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let address = line.trim().to_string();
    let mut admin = String::new();
    stdout.read_line(&mut admin).unwrap();
    let admin = Bearer::new(admin.trim()).unwrap();
    let head_pid = head.id();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut rows_in_window, mut opened_in_window) = (0, 0);
    let (absorbed, cpu, wall) = runtime.block_on(async {
        let mut operator = ionet::rpc::gcs_client(&address, &admin).await.expect("connect");
        let total = ResourceSet::new().with("CPU", Quantity::whole(8)).with("GPU", Quantity::whole(8));
        let mut clients: Vec<(GcsClient, NodeId)> = Vec::with_capacity(nodes);
        for index in 0..nodes {
            // Each simulated node as a real one: its own key, registered with a proof, then
            // heartbeating with the node credential the head issued it.
            let key = KeyPair::generate();
            let node_id = NodeId::random();
            let info = NodeInfo {
                node_id: node_id.to_vec(),
                address: format!("127.0.0.1:{}", 10_000 + index),
                total: Some(ResourceQuantities::from_set(&total)),
                available: Some(ResourceQuantities::from_set(&total)),
                public_key: key.public_key().to_vec(),
                ..Default::default()
            };
            let proof = key.sign(&registration_message(&info.node_id, &info.public_key)).to_vec();
            let reply = operator
                .register_node(RegisterNodeRequest { node: Some(info), proof, ..Default::default() })
                .await
                .expect("register");
            let credential = Bearer::new(&reply.into_inner().node_credential).unwrap();
            let client = ionet::rpc::gcs_client(&address, &credential).await.expect("connect");
            clients.push((client, node_id));
        }
        let absorbed = Arc::new(AtomicU64::new(0));
        let views_rows = Arc::new(AtomicU64::new(0));
        // Nodes whose first heartbeat was answered, and streams opened.
        let (ready, opened) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let less = ResourceSet::new().with("CPU", Quantity::whole(7)).with("GPU", Quantity::whole(8));
        // Set once the window is measured: every node stops at its next tick.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (index, (mut client, node_id)) in clients.into_iter().enumerate() {
            let absorbed = absorbed.clone();
            // A change each second is a change: what is free moves between two values.
            let available = [ResourceQuantities::from_set(&total), ResourceQuantities::from_set(&less)];
            let (views_rows, ready, opened, stop) = (views_rows.clone(), ready.clone(), opened.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                // The open stream (`None`: by calls, or to be opened), and where the view
                // stands. The first is opened before the window, as nodes hold theirs.
                let mut link = None;
                let mut since = (0u64, 0u64);
                let mut seq = 0;
                if !calls {
                    link = Some(open_link(&mut client, &opened).await);
                }
                // Stagger the fleet across the period, as real nodes started at different times are.
                let offset = Duration::from_micros(every.as_micros() as u64 * index as u64 / nodes as u64);
                tokio::time::sleep(offset).await;
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                while !stop.load(Ordering::Relaxed) {
                    if link.is_none() && !calls {
                        link = Some(open_link(&mut client, &opened).await);
                    }
                    seq += 1;
                    let request = HeartbeatRequest {
                        node_id: node_id.to_vec(),
                        available: changing.then(|| available[(seq % 2) as usize].clone()),
                        seq,
                        read_view: views,
                        sampled_view: views,
                        view_since_incarnation: since.0,
                        view_since_version: since.1,
                        ..Default::default()
                    };
                    let taken = match link.as_mut() {
                        None => match client.heartbeat(request).await {
                            Ok(reply) => {
                                learn_view(&mut since, reply.into_inner().view, &views_rows);
                                if seq == 1 {
                                    ready.fetch_add(1, Ordering::Relaxed);
                                }
                                true
                            }
                            Err(_) => false,
                        },
                        // A stream's first heartbeat is answered (its incarnation), as are all
                        // with `--answered`; else replies (news only) are read as they come.
                        Some(open) if answered || open.first => {
                            open.first = false;
                            let request = HeartbeatRequest { quiet: false, ..request };
                            let reply = match open.sender.send(request).await {
                                Ok(()) => open.replies.message().await.ok().flatten(),
                                Err(_) => None,
                            };
                            match reply {
                                Some(reply) => {
                                    learn_view(&mut since, reply.view, &views_rows);
                                    if seq == 1 {
                                        ready.fetch_add(1, Ordering::Relaxed);
                                    }
                                    true
                                }
                                // Ended (after a whole table, or a large delta): the next
                                // heartbeat opens another.
                                None => {
                                    link = None;
                                    false
                                }
                            }
                        }
                        Some(open) => open.sender.send(HeartbeatRequest { quiet: true, ..request }).await.is_ok(),
                    };
                    if taken {
                        absorbed.fetch_add(1, Ordering::Relaxed);
                    }
                    loop {
                        tokio::select! {
                            _ = ticker.tick() => break,
                            reply = async { link.as_mut().unwrap().replies.message().await }, if link.is_some() && !answered => {
                                match reply {
                                    Ok(Some(reply)) => learn_view(&mut since, reply.view, &views_rows),
                                    // The head ends a stream after a whole table: the next tick opens another.
                                    _ => link = None,
                                }
                            }
                        }
                    }
                }
            }));
        }
        // Every node's first heartbeat answered (its stream open, its view read whole), and a
        // second more, then a steady window.
        let ramp = Instant::now() + Duration::from_secs(120);
        while ready.load(Ordering::Relaxed) < nodes as u64 && Instant::now() < ramp {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu_start, beats_start, wall_start) =
            (ionet_benches::process_cpu_seconds(head_pid).unwrap(), absorbed.load(Ordering::Relaxed), Instant::now());
        let (rows_start, opened_start) = (views_rows.load(Ordering::Relaxed), opened.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(seconds - 1)).await;
        let cpu = ionet_benches::process_cpu_seconds(head_pid).unwrap() - cpu_start;
        let beats = absorbed.load(Ordering::Relaxed) - beats_start;
        rows_in_window = views_rows.load(Ordering::Relaxed) - rows_start;
        opened_in_window = opened.load(Ordering::Relaxed) - opened_start;
        let wall = wall_start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        futures::future::join_all(tasks).await;
        (beats, cpu, wall)
    });
    drop(head.stdin.take());
    let _ = head.wait();
    let kept = if views {
        format!(
            ", every node keeping a view: {:.0} rows/s sent, {:.0} streams/s opened (the head ends one after a large delta)",
            rows_in_window as f64 / wall,
            opened_in_window as f64 / wall
        )
    } else {
        String::new()
    };
    println!(
        "gcs heartbeats: {nodes} nodes ({}, {}{kept}): {:.0} heartbeats/s absorbed, head CPU {:.2}% of one core ({:.1} µs CPU per heartbeat) over {wall:.1} s",
        match (changing, answered) {
            (true, _) => "resources changing each second",
            (false, true) => "a heartbeat each second",
            (false, false) => "idle: a heartbeat each quarter timeout",
        },
        match (calls, answered) {
            (true, _) => "a call each",
            (false, true) => "on streams, each answered",
            (false, false) => "on streams, quiet",
        },
        absorbed as f64 / wall,
        100.0 * cpu / wall,
        1e6 * cpu / absorbed.max(1) as f64
    );
}

/// A heartbeat stream to the head.
struct Link {
    sender: tokio::sync::mpsc::Sender<HeartbeatRequest>,
    replies: tonic::Streaming<HeartbeatReply>,
    /// Its first heartbeat is still to be sent (that one is answered).
    first: bool,
}

async fn open_link(client: &mut GcsClient, opened: &AtomicU64) -> Link {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let replies = client.heartbeat_stream(stream).await.expect("open a heartbeat stream").into_inner();
    opened.fetch_add(1, Ordering::Relaxed);
    Link { sender, replies, first: true }
}

/// Moves a node's view to the rows a reply carried (where the view stands; the rows are
/// counted, not kept: the bench measures the head).
fn learn_view(since: &mut (u64, u64), view: Option<NodeRows>, rows: &AtomicU64) {
    if let Some(view) = view {
        rows.fetch_add(view.nodes.len() as u64, Ordering::Relaxed);
        *since = (view.incarnation, view.version);
    }
}
