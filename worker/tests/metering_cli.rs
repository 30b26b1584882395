//! Metering against a live head: leases reported over gRPC as node daemons report them,
//! usage records stamped by the head's clock, settlement through the CLI (provider paid
//! usage × price, payer debited that plus the 2.5% fee, the treasury the fee, balances
//! summing to zero, nothing paid twice), earnings, refunds, bad input, and a node killed
//! with a lease open.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS};
use ionet_common::resources::{Quantity, ResourceSet, GPU};
use ionet_common::rpc::proto::common::ResourceQuantities;
use ionet_common::rpc::proto::gcs::AddJobRequest;
use ionet_common::rpc::proto::metering::{
    HeldLease, LeaseEndedRequest, LeaseStartedRequest, ReportHeldLeasesRequest, UsageRecord,
};
use ionet_common::LeaseId;
use serde_json::Value;
use tonic::Code;

/// $3600 per GPU-hour: one micro-USD per GPU-millisecond, so costs read as durations.
const PRICE: &str = "3600";
const MICROS_PER_GPU_MS: u64 = 1_000;

/// A head whose epochs are too long to close on their own during the test.
fn cluster(extra: &[&str]) -> (TestCluster, tempfile::TempDir) {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("ionet.toml");
    std::fs::write(&config, "epoch_length_ms = 864000000\n").unwrap();
    let cluster = TestCluster::start(&[&["--config", config.to_str().unwrap()], extra].concat());
    (cluster, config_dir)
}

fn node_id_of(cluster: &TestCluster, pid: u32) -> (Vec<u8>, Value) {
    let status = cluster.status_json();
    let node = status.as_array().unwrap().iter().find(|node| node["pid"] == pid).expect("node listed").clone();
    (hex::decode(node["node_id"].as_str().unwrap()).unwrap(), node)
}

fn add_job(cluster: &TestCluster, payer: &str) -> Vec<u8> {
    // The operator starts it, naming its payer (an account's key would be the payer).
    let mut client = cluster.admin_client();
    let reply = cluster
        .runtime
        .block_on(client.add_job(AddJobRequest {
            payer_account: payer.into(),
            worker_command: Some(ionet_common::rpc::proto::common::WorkerCommand {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .expect("add job");
    reply.into_inner().job.unwrap().job_id
}

fn gpus(count: i64) -> Option<ResourceQuantities> {
    Some((&ResourceSet::new().with(GPU, Quantity::whole(count))).into())
}

/// Both sides of a lease say it started: the node (here the operator in its stead), then
/// its holder (the operator may speak for any job).
fn start_lease(cluster: &TestCluster, lease: &LeaseId, node: &[u8], job: &[u8], gpu_count: i64) -> u64 {
    let mut client = cluster.metering_client();
    let node_start_ms = cluster
        .runtime
        .block_on(client.lease_started(LeaseStartedRequest {
            lease_id: lease.to_vec(),
            node_id: node.to_vec(),
            job_id: job.to_vec(),
            resources: gpus(gpu_count),
            ..Default::default()
        }))
        .expect("lease started")
        .into_inner()
        .start_ms;
    let word =
        HeldLease { lease_id: lease.to_vec(), node_id: node.to_vec(), granted: true, age_ms: 0, resources: None };
    cluster
        .runtime
        .block_on(client.report_held_leases(ReportHeldLeasesRequest { job_id: job.to_vec(), leases: vec![word] }))
        .expect("the holder's word");
    // The record runs from the later of the two words.
    let open = usage(cluster);
    let record = open.iter().find(|record| record["lease_id"] == lease.hex()).expect("the lease runs");
    let start_ms = record["start_ms"].as_u64().unwrap();
    assert!(start_ms >= node_start_ms, "{record}");
    start_ms
}

fn end_lease(cluster: &TestCluster, lease: &LeaseId) -> Result<UsageRecord, tonic::Status> {
    let mut client = cluster.metering_client();
    cluster
        .runtime
        .block_on(client.lease_ended(LeaseEndedRequest { lease_id: lease.to_vec(), age_ms: 0 }))
        .map(|reply| reply.into_inner().record.expect("a record"))
}

fn usage(cluster: &TestCluster) -> Vec<Value> {
    let stdout = cluster.ionet_ok(&["usage", "--json"]);
    serde_json::from_str::<Value>(&stdout).expect("usage --json prints JSON").as_array().unwrap().clone()
}

fn balances(cluster: &TestCluster) -> (Vec<(String, i64)>, i64) {
    let stdout = cluster.ionet_ok(&["ledger", "balances", "--json"]);
    let value: Value = serde_json::from_str(&stdout).expect("balances --json prints JSON");
    let rows = value["balances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["account"].as_str().unwrap().to_string(), row["balance_micros"].as_i64().unwrap()))
        .collect();
    (rows, value["sum_micros"].as_i64().unwrap())
}

fn balance(rows: &[(String, i64)], account: &str) -> i64 {
    rows.iter().find(|(name, _)| name == account).map(|(_, b)| *b).unwrap_or(0)
}

#[test]
fn leases_are_metered_on_the_head_clock_and_settled_once() {
    let export_dir = tempfile::tempdir().unwrap();
    let export = export_dir.path().join("usage.jsonl");
    let (mut cluster, _config) = cluster(&["--usage-export", export.to_str().unwrap()]);
    let index = cluster.add_node(&[
        "--num-gpus",
        "2",
        "--gpu-type",
        "A100-80GB",
        "--price-per-gpu-hour",
        PRICE,
        "--wallet",
        "wallet-w",
    ]);
    let (node, _) = node_id_of(&cluster, cluster.nodes[index].id());
    let out = cluster.ionet_ok(&["credits", "add", "--account", "alice", "--amount", "100"]);
    assert!(out.contains("added $100.00 to payer alice; balance $100.00"), "{out}");
    let job = add_job(&cluster, "alice");

    let lease = LeaseId::random();
    let before = ionet_common::clock::now_ms();
    let start_ms = start_lease(&cluster, &lease, &node, &job, 2);
    assert!(start_ms >= before, "the head's clock stamps the start");
    let open = usage(&cluster);
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["open"], true);
    std::thread::sleep(Duration::from_millis(300)); // the lease's length, not a wait for an event
    let record = end_lease(&cluster, &lease).expect("lease ended");
    let after = ionet_common::clock::now_ms();
    assert_eq!(record.start_ms, start_ms);
    assert!(record.end_ms >= start_ms + 300 && record.end_ms <= after, "{record:?}");
    let duration = record.end_ms - record.start_ms;
    let cost = 2 * duration * MICROS_PER_GPU_MS;
    assert_eq!(record.cost_micros, cost);
    // Who said what, and which word counted.
    let explained = cluster.ionet_ok(&["usage", "--job", &hex::encode(&job), "--explain"]);
    for said in
        ["node     granted 20", "holder   confirmed 20", "the node ended it first", "holder   gave back not said"]
    {
        assert!(explained.contains(said), "{said:?} in {explained}");
    }

    let records = usage(&cluster);
    assert_eq!(records.len(), 1);
    let listed = &records[0];
    assert_eq!(listed["lease_id"], lease.hex());
    assert_eq!(listed["job_id"], hex::encode(&job));
    assert_eq!(listed["node_id"], hex::encode(&node));
    assert_eq!(listed["payer_account"], "alice");
    assert_eq!(listed["provider_wallet"], "wallet-w");
    assert_eq!((listed["start_ms"].as_u64(), listed["end_ms"].as_u64()), (Some(start_ms), Some(record.end_ms)));
    assert_eq!(listed["cost_micros"].as_u64(), Some(cost));
    assert_eq!((listed["open"].as_bool(), listed["settled"].as_bool()), (Some(false), Some(false)));
    let filtered = cluster.ionet_ok(&["usage", "--json", "--job", "00000063"]);
    assert_eq!(serde_json::from_str::<Value>(&filtered).unwrap(), Value::Array(vec![]));

    // Settle: provider + usage, payer − (usage + 2.5%), treasury + fee, sum zero.
    let dry = cluster.ionet_ok(&["settle", "--dry-run", "--json"]);
    let dry: Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(dry["total_usage_micros"].as_u64(), Some(cost));
    assert_eq!(balance(&balances(&cluster).0, "provider:wallet-w"), 0, "a dry run posts nothing");
    let settled = cluster.ionet_ok(&["settle"]);
    assert!(settled.contains("closed epoch 0") && settled.contains("1 record(s)"), "{settled}");
    let fee = cost * 250 / 10_000;
    let (rows, sum) = balances(&cluster);
    assert_eq!(balance(&rows, "provider:wallet-w"), cost as i64);
    assert_eq!(balance(&rows, "payer:alice"), 100_000_000 - (cost + fee) as i64);
    assert_eq!(balance(&rows, "treasury"), fee as i64);
    assert_eq!(balance(&rows, "funding"), -100_000_000);
    assert_eq!(sum, 0);
    assert_eq!(rows.iter().map(|(_, b)| b).sum::<i64>(), 0);
    assert_eq!(usage(&cluster)[0]["settled_epoch"], 0);

    // Settling again pays nothing twice.
    let again: Value = serde_json::from_str(&cluster.ionet_ok(&["settle", "--json"])).unwrap();
    assert_eq!((again["epoch_id"].as_u64(), again["records"].as_u64()), (Some(1), Some(0)));
    assert_eq!(balances(&cluster).0, rows);
    // Ending the lease again returns the same record and pays nothing either.
    assert_eq!(end_lease(&cluster, &lease).unwrap().end_ms, record.end_ms);

    let earnings: Value =
        serde_json::from_str(&cluster.ionet_ok(&["earnings", "--wallet", "wallet-w", "--json"])).unwrap();
    assert_eq!(earnings["total_revenue_micros"].as_u64(), Some(cost));
    assert_eq!(earnings["balance_micros"].as_i64(), Some(cost as i64));
    assert_eq!(earnings["epochs"][0]["epoch_id"], 0);
    assert!(earnings["epochs"][0]["uptime_ms"].as_u64().unwrap() > 0, "{earnings:#}");

    // The exporter saw the record too.
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(exported.lines().count(), 1, "{exported}");
    assert!(exported.contains(&format!("\"record_id\":\"{}\"", lease.hex())), "{exported}");

    let refunded = cluster.ionet_ok(&["credits", "refund", "--account", "alice"]);
    let left = 100_000_000 - cost - fee;
    assert!(refunded.contains(&format!("refunded ${}", ionet_common::resources::format_usd(left))), "{refunded}");
    let (rows, sum) = balances(&cluster);
    assert_eq!((balance(&rows, "payer:alice"), sum), (0, 0));

    // Bad input is refused, clearly, and the head carries on.
    let unknown = LeaseId::random();
    let status = end_lease(&cluster, &unknown).unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains(&format!("lease {} is not open", unknown.hex())), "{}", status.message());
    let mut client = cluster.metering_client();
    let status = cluster
        .runtime
        .block_on(client.lease_ended(LeaseEndedRequest { lease_id: vec![1, 2, 3], age_ms: 0 }))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("lease id must be 16 bytes, got 3"), "{}", status.message());
    for amount in ["-5", "abc", "1.2345678"] {
        let stderr = cluster.ionet_err(&["credits", "add", "--account", "alice", "--amount", amount]);
        assert!(stderr.contains(&format!("amount {amount:?} is not a valid USD amount")), "{stderr}");
    }
    let stderr = cluster.ionet_err(&["credits", "add", "--account", "alice", "--amount", "0"]);
    assert!(stderr.contains("is zero"), "{stderr}");
    let stderr = cluster.ionet_err(&["credits", "refund", "--account", "nobody"]);
    assert!(stderr.contains("payer account \"nobody\" has never been credited"), "{stderr}");
    let status = cluster
        .runtime
        .block_on(client.lease_started(LeaseStartedRequest {
            lease_id: LeaseId::random().to_vec(),
            node_id: node.clone(),
            job_id: ionet_common::JobId::from_sequence(99).to_vec(),
            resources: gpus(1),
            ..Default::default()
        }))
        .unwrap_err();
    assert!(status.message().contains("job 00000063 does not exist"), "{}", status.message());

    // This head pays nothing on chain, and says how to make it.
    let payouts = cluster.ionet_ok(&["payouts"]);
    assert!(payouts.contains("does not pay out on chain") && payouts.contains("--payout-rpc-url"), "{payouts}");
    let json: Value = serde_json::from_str(&cluster.ionet_ok(&["payouts", "--json"])).unwrap();
    assert_eq!(json["enabled"], false);
    // Nor takes deposits: it says so, and how to make it.
    let stderr = cluster.ionet_err(&["credits", "deposit-address"]);
    assert!(stderr.contains("does not pay out on chain") && stderr.contains("--payout-asset"), "{stderr}");
    let json: Value = serde_json::from_str(&cluster.ionet_ok(&["credits", "deposits", "--json"])).unwrap();
    assert_eq!(json["watching"], false);
    // A payout configuration missing its keypair is refused before anything starts.
    let stderr = cluster.ionet_err(&["start", "--head", "--port", "0", "--payout-rpc-url", "http://127.0.0.1:1"]);
    let refused = stderr.contains("needs --payout-keypair") || stderr.contains("cargo feature `solana`");
    assert!(refused, "{stderr}");
    cluster.status_json();
}

#[test]
fn a_killed_node_ends_its_open_lease_at_its_last_heartbeat() {
    let (mut cluster, _config) = cluster(&[]);
    let index = cluster.add_node(&[
        "--num-gpus",
        "1",
        "--gpu-type",
        "RTX4090",
        "--price-per-gpu-hour",
        PRICE,
        "--wallet",
        "wallet-v",
    ]);
    let pid = cluster.nodes[index].id();
    let (node, _) = node_id_of(&cluster, pid);
    let job = add_job(&cluster, "bob");
    // Funded: a payer with no credit would see its lease ended for that first.
    cluster.ionet_ok(&["credits", "add", "--account", "bob", "--amount", "100"]);
    let lease = LeaseId::random();
    let start_ms = start_lease(&cluster, &lease, &node, &job, 1);

    // Let the node heartbeat at least once into the lease, so that it has a length.
    common::wait_until("a heartbeat after the lease started", Duration::from_secs(30), || {
        node_id_of(&cluster, pid).1["last_heartbeat_ms"].as_u64().unwrap() > start_ms
    });
    cluster.nodes[index].kill().unwrap(); // SIGKILL: the node never reports the lease's end.
    cluster.nodes[index].wait().unwrap();
    let killed_ms = ionet_common::clock::now_ms();

    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let records = usage(&cluster);
        if let Some(record) = records.iter().find(|r| r["lease_id"] == lease.hex() && r["open"] == false) {
            break record.clone();
        }
        assert!(Instant::now() < deadline, "the lease never ended: {records:?}\n{}", cluster.daemon_output());
        std::thread::sleep(Duration::from_millis(100));
    };
    let checked_ms = ionet_common::clock::now_ms();
    let (_, dead) = node_id_of(&cluster, pid);
    assert_eq!(dead["state"], "DEAD");
    let last_heartbeat_ms = dead["last_heartbeat_ms"].as_u64().unwrap();
    let end_ms = ended["end_ms"].as_u64().unwrap();
    assert_eq!(end_ms, last_heartbeat_ms, "the lease ends at the node's last heartbeat");
    assert!(end_ms > start_ms && end_ms <= killed_ms + HEARTBEAT_INTERVAL_MS, "{ended:#}");
    assert!(end_ms + HEARTBEAT_TIMEOUT_MS <= checked_ms, "ended well before the check: {end_ms} vs {checked_ms}");
    assert_eq!(ended["cost_micros"].as_u64(), Some((end_ms - start_ms) * MICROS_PER_GPU_MS));
    // Ending it again (a node daemon that comes back late) returns the same record.
    assert_eq!(end_lease(&cluster, &lease).unwrap().end_ms, end_ms);
}
