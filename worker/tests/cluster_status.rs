//! Operators' view: declared nodes appear in `ionet status` exactly as declared, and
//! `ionet stop` drains and ends every daemon of the session.

mod common;

use std::time::Duration;

use common::{wait_until, TestCluster};
use serde_json::Value;

fn worker_nodes(status: &Value) -> Vec<Value> {
    status.as_array().unwrap().iter().filter(|node| node["is_head"] == false).cloned().collect()
}

#[test]
fn declared_nodes_appear_with_their_resources_prices_and_labels() {
    let mut cluster = TestCluster::start(&[]);
    cluster.add_node(&[
        "--num-gpus",
        "4",
        "--gpu-type",
        "A100-80GB",
        "--price-per-gpu-hour",
        "1.20",
        "--labels",
        "region=eu",
        "--num-cpus",
        "16",
        "--wallet",
        "provider-eu",
    ]);
    cluster.add_node(&[
        "--num-gpus",
        "2",
        "--gpu-type",
        "RTX4090",
        "--price-per-gpu-hour",
        "0.35",
        "--labels",
        "region=us",
        "--num-cpus",
        "8",
        "--resources",
        r#"{"nvme": 2}"#,
    ]);
    let status = cluster.status_json();
    let mut nodes = worker_nodes(&status);
    assert_eq!(nodes.len(), 2, "{status:#}");
    nodes.sort_by(|a, b| a["accelerator_type"].as_str().cmp(&b["accelerator_type"].as_str()));
    let (a100, rtx) = (&nodes[0], &nodes[1]);

    assert_eq!(a100["accelerator_type"], "A100-80GB");
    assert_eq!(a100["resources_total"]["GPU"], 4.0);
    assert_eq!(a100["resources_total"]["CPU"], 16.0);
    assert_eq!(a100["resources_total"]["accelerator_type:A100-80GB"], 1.0);
    assert_eq!(a100["resources_available"]["GPU"], 4.0);
    assert_eq!(a100["price_per_gpu_hour_micros"], 1_200_000);
    assert_eq!(a100["labels"], serde_json::json!({"region": "eu"}));
    assert_eq!(a100["wallet"], "provider-eu");
    assert_eq!(a100["gpus"].as_array().unwrap().len(), 4);
    assert_eq!(a100["gpus"][3]["memory_bytes"], 80u64 << 30);
    assert_eq!(a100["state"], "ALIVE");

    assert_eq!(rtx["accelerator_type"], "RTX4090");
    assert_eq!(rtx["resources_total"]["GPU"], 2.0);
    assert_eq!(rtx["resources_total"]["CPU"], 8.0);
    assert_eq!(rtx["resources_total"]["nvme"], 2.0);
    assert_eq!(rtx["price_per_gpu_hour_micros"], 350_000);
    assert_eq!(rtx["labels"], serde_json::json!({"region": "us"}));
    assert_eq!(rtx["gpus"][0]["memory_bytes"], 24u64 << 30);

    // The table view names the same facts.
    let table = cluster.ionet(&["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("A100-80GB") && text.contains("1.20") && text.contains("region=eu"), "{text}");
    assert!(text.contains("0/0") || text.contains("(head)"), "{text}");
    assert!(text.contains("3 alive of 3 nodes"), "{text}");
}

#[test]
fn stop_drains_every_daemon_and_clears_the_session() {
    let mut cluster = TestCluster::start(&[]);
    cluster.add_node(&["--num-gpus", "1", "--gpu-type", "T4"]);
    let pids: Vec<u32> =
        cluster.nodes.iter().map(|child| child.id()).chain(cluster.head.as_ref().map(|child| child.id())).collect();
    let output = cluster.ionet(&["stop", "--grace-period", "20"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("stopped 2 ionet daemon(s)"));
    for child in cluster.nodes.iter_mut().chain(cluster.head.iter_mut()) {
        let status = child.wait().unwrap();
        assert!(status.success(), "a drained daemon exits cleanly, got {status}");
    }
    let pid_dir = cluster.session().join("pids");
    wait_until("pid files removed", Duration::from_secs(5), || std::fs::read_dir(&pid_dir).unwrap().next().is_none());
    assert_eq!(pids.len(), 2);
    let again = cluster.ionet(&["stop"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("no ionet daemons"));
}

#[test]
fn status_without_a_head_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::ionet_binary())
        .args(["status", "--temp-dir"])
        .arg(dir.path())
        .env_remove("IONET_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no head address"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bad_declarations_fail_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::ionet_binary())
        .args(["start", "--head", "--port", "0", "--labels", "region", "--temp-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("must be key=value"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
