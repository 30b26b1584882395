//! Health: a node daemon killed with SIGKILL is declared dead within the heartbeat
//! timeout plus one interval, and subscribers hear of it; a SIGTERM drains instead.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS};
use ionet_common::rpc::proto::common::NodeState;
use ionet_common::rpc::proto::gcs::{cluster_event::Event, Channel, GetAllNodesRequest, SubscribeRequest};
use tokio_stream::StreamExt;

/// Collects node events from a subscription into a channel, from a background task.
fn subscribe_nodes(cluster: &TestCluster) -> std::sync::mpsc::Receiver<(Instant, Event)> {
    let mut client = cluster.client();
    let (sender, receiver) = std::sync::mpsc::channel();
    let mut stream = cluster
        .runtime
        .block_on(client.subscribe(SubscribeRequest { channels: vec![Channel::Nodes as i32] }))
        .expect("subscribe")
        .into_inner();
    cluster.runtime.spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            if let Some(event) = event.event {
                if sender.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

#[test]
fn killed_node_is_declared_dead_within_timeout_and_published() {
    let mut cluster = TestCluster::start(&[]);
    let index = cluster.add_node(&["--num-gpus", "2", "--gpu-type", "RTX4090"]);
    let events = subscribe_nodes(&cluster);
    let node_pid = cluster.nodes[index].id();

    cluster.nodes[index].kill().unwrap(); // SIGKILL: no drain, no goodbye.
    let killed_at = Instant::now();
    cluster.nodes[index].wait().unwrap();

    let limit = Duration::from_millis(HEARTBEAT_TIMEOUT_MS + HEARTBEAT_INTERVAL_MS);
    // Generous slack for a loaded CI machine; the head's own timestamps are checked exactly below.
    let (seen_at, dead) = loop {
        let (at, event) = events.recv_timeout(limit * 10).expect("a node_dead event");
        if let Event::NodeDead(node) = event {
            break (at, node);
        }
    };
    assert_eq!(dead.pid, node_pid);
    assert_eq!(dead.state, NodeState::Dead as i32);
    assert!(dead.death_cause.contains("missed heartbeats"), "{}", dead.death_cause);
    // By the control store's clock: declared dead after the timeout, and within timeout + one interval
    // (+ the health check period, a quarter interval) of the last heartbeat.
    let silent_for = dead
        .death_cause
        .split_whitespace()
        .nth(3)
        .and_then(|ms| ms.parse::<u64>().ok())
        .expect("cause names the silence in ms");
    assert!(silent_for > HEARTBEAT_TIMEOUT_MS, "{silent_for}");
    // Time the head itself stood still (a loaded machine) is not the node's silence: the
    // cause says how much of it was excused.
    let excused = dead
        .death_cause
        .split("plus ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map_or(0, |ms| ms.parse::<u64>().expect("the excused stall in ms"));
    assert!(
        silent_for <= HEARTBEAT_TIMEOUT_MS + excused + HEARTBEAT_INTERVAL_MS + HEARTBEAT_INTERVAL_MS / 2,
        "{}",
        dead.death_cause
    );
    // An idle node's last heartbeat came at most an idle interval before the kill (and
    // an interval more if its own timer ran late).
    let config = ionet_common::config::ClusterConfig {
        heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
        heartbeat_timeout_ms: HEARTBEAT_TIMEOUT_MS,
        ..Default::default()
    };
    let idle_every = config.idle_heartbeat_interval(HEARTBEAT_TIMEOUT_MS);
    let earliest =
        Duration::from_millis(HEARTBEAT_TIMEOUT_MS) - idle_every - Duration::from_millis(HEARTBEAT_INTERVAL_MS);
    assert!(seen_at.duration_since(killed_at) >= earliest);

    let nodes = cluster
        .runtime
        .block_on(cluster.client().get_all_nodes(GetAllNodesRequest { include_dead: true, ..Default::default() }))
        .unwrap()
        .into_inner()
        .nodes;
    let recorded = nodes.iter().find(|node| node.pid == node_pid).expect("dead nodes stay listed");
    assert_eq!(recorded.state, NodeState::Dead as i32);
    let status = cluster.status_json();
    assert!(status.as_array().unwrap().iter().any(|node| node["pid"] == node_pid && node["state"] == "DEAD"));
}

#[test]
fn sigterm_drains_the_node_and_publishes_it() {
    let mut cluster = TestCluster::start(&[]);
    let index = cluster.add_node(&[]);
    let events = subscribe_nodes(&cluster);
    let pid = cluster.nodes[index].id();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(cluster.nodes[index].wait().unwrap().success());
    let mut drained = false;
    let mut dead_cause = String::new();
    while dead_cause.is_empty() {
        match events.recv_timeout(Duration::from_secs(30)).expect("drain events").1 {
            Event::NodeDrained(node) if node.pid == pid => drained = true,
            Event::NodeDead(node) if node.pid == pid => dead_cause = node.death_cause,
            _ => {}
        }
    }
    assert!(drained, "node_drained comes before node_dead");
    assert!(dead_cause.starts_with("drained"), "{dead_cause}");
}

/// `ionet drain --node <id prefix>`: the operator gives a node notice to leave; it leaves
/// (the command returns once the head no longer lists it) and its process exits cleanly.
/// The same call with a tenant's credential is refused.
#[test]
fn ionet_drain_gives_a_node_notice_and_it_leaves() {
    let mut cluster = TestCluster::start(&[]);
    let index = cluster.add_node(&[]);
    let pid = cluster.nodes[index].id();
    let status = cluster.status_json();
    let node = status
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap_or_else(|| panic!("the node in {status}"))
        .clone();
    let node_id = node["node_id"].as_str().unwrap().to_string();
    let address = node["address"].as_str().unwrap().to_string();

    // A tenant may not send the node away.
    let api_key = cluster.ionet_ok(&["account", "create", "acme"]).trim().to_string();
    let tenant = ionet_common::auth::Bearer::new(&api_key).unwrap();
    let refused = cluster.runtime.block_on(async {
        let channel = ionet_common::rpc::connect(&address, &tenant, Duration::from_secs(5)).await.unwrap();
        let mut node = ionet_common::rpc::proto::node::node_manager_client::NodeManagerClient::new(channel);
        let request = ionet_common::rpc::proto::node::DrainRequest { deadline_ms: 0, reason: "mine now".into() };
        node.drain(request).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(cluster.nodes[index].try_wait().unwrap().is_none(), "the node is still there");

    let left = cluster.ionet_ok(&["drain", "--node", &node_id[..8], "--deadline", "10s"]);
    assert!(left.contains("left the cluster"), "{left}");
    assert!(cluster.nodes[index].wait().unwrap().success(), "it exited cleanly");
}
