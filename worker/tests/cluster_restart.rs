//! A head killed and restarted with the same `--storage` file keeps its jobs and KV,
//! and node daemons that kept running re-register on their own.

mod common;

use std::time::Duration;

use common::{wait_until, TestCluster};
use ionet_common::rpc::proto::common::{JobState, NodeState};
use ionet_common::rpc::proto::gcs::*;
use ionet_common::rpc::proto::node::GetNodeStatsRequest;
use ionet_common::rpc::NodeManagerClient;

#[test]
fn restarted_head_keeps_jobs_and_kv_and_nodes_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("gcs.redb");
    let storage_arg = storage.to_str().unwrap();
    let mut cluster = TestCluster::start(&["--storage", storage_arg]);
    let index = cluster.add_node(&["--num-gpus", "1", "--gpu-type", "H100"]);
    let node_pid = cluster.nodes[index].id();
    // The operator's credential from before the restart.
    let admin = cluster.admin_credential();
    let port = cluster.address().rsplit(':').next().unwrap().to_string();

    let mut client = cluster.client();
    // A job is started by the operator here (a tenant would use its account's key).
    let mut operator = cluster.admin_client();
    let job = cluster
        .runtime
        .block_on(operator.add_job(AddJobRequest {
            driver_address: "127.0.0.1:1".into(),
            entrypoint: "train.py".into(),
            payer_account: "acme".into(),
            worker_command: Some(ionet_common::rpc::proto::common::WorkerCommand {
                argv: vec!["python".into(), "train.py".into()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    cluster
        .runtime
        .block_on(client.kv_put(KvPutRequest {
            namespace: "models".into(),
            key: b"llama".to_vec(),
            value: b"weights at s3://x".to_vec(),
            overwrite: true,
        }))
        .unwrap();
    let node_id = cluster
        .runtime
        .block_on(client.get_all_nodes(GetAllNodesRequest { include_dead: false, ..Default::default() }))
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|node| node.pid == node_pid)
        .unwrap()
        .node_id;

    cluster.kill_head(); // SIGKILL: no clean shutdown.
    cluster.start_head(&["--port", &port, "--storage", storage_arg]);

    // The signing key is kept beside --storage: what the head issued before still holds.
    let mut client = cluster.client_with(&admin);
    let jobs = cluster.runtime.block_on(client.get_all_jobs(GetAllJobsRequest {})).unwrap().into_inner().jobs;
    let kept = jobs.iter().find(|kept| kept.job_id == job.job_id).expect("job survives the restart");
    assert_eq!(kept.entrypoint, "train.py");
    assert_eq!(kept.payer_account, "acme");
    assert_eq!(kept.state, JobState::Running as i32);
    let value = cluster
        .runtime
        .block_on(client.kv_get(KvGetRequest { namespace: "models".into(), key: b"llama".to_vec() }))
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(value, b"weights at s3://x");
    // A new job gets the next id, not a reused one.
    // The restarted head kept its signing key (beside --storage) and wrote a fresh admin
    // credential into the session.
    let mut operator = cluster.admin_client();
    let command = ionet_common::rpc::proto::common::WorkerCommand { argv: vec!["python".into()], ..Default::default() };
    let request = AddJobRequest { worker_command: Some(command), ..Default::default() };
    let next = cluster.runtime.block_on(operator.add_job(request)).unwrap().into_inner().job.unwrap();
    assert!(next.job_id > job.job_id);

    // The node daemon never restarted, yet registers again with the same id.
    let node_address = std::cell::RefCell::new(String::new());
    wait_until("the node re-registers", Duration::from_secs(30), || {
        let nodes = cluster
            .runtime
            .block_on(client.get_all_nodes(GetAllNodesRequest { include_dead: true, ..Default::default() }))
            .unwrap()
            .into_inner()
            .nodes;
        nodes.iter().any(|node| {
            let fresh = node.node_id == node_id && node.state == NodeState::Alive as i32 && node.pid == node_pid;
            if fresh {
                *node_address.borrow_mut() = node.address.clone();
            }
            fresh
        })
    });
    assert!(cluster.nodes[index].try_wait().unwrap().is_none(), "the node daemon kept running");
    let address = node_address.borrow().clone();
    let stats = cluster.runtime.block_on(async {
        let channel = ionet_common::rpc::connect(&address, &admin, Duration::from_secs(5)).await.unwrap();
        let mut node = NodeManagerClient::new(channel);
        let poll = async {
            loop {
                let stats = node.get_node_stats(GetNodeStatsRequest {}).await.unwrap().into_inner();
                if stats.registrations >= 2 && stats.connected_to_gcs {
                    return stats;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), poll).await
    });
    let stats =
        stats.unwrap_or_else(|_| panic!("node stats never showed a second registration:\n{}", cluster.daemon_output()));
    assert_eq!(stats.node.unwrap().node_id, node_id);
}
