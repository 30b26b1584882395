//! Bad input: a wrong or missing credential is refused with UNAUTHENTICATED; malformed,
//! oversize and unknown-id requests get an error; the head keeps serving others.

mod common;

use std::time::Duration;

use common::TestCluster;
use ionet_common::auth::Bearer;
use ionet_common::credential::{registration_message, KeyPair};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::gcs::*;
use ionet_common::rpc::RawCodec;
use ionet_common::NodeId;
use tonic::Code;

fn assert_still_serving(cluster: &TestCluster) {
    let mut client = cluster.client();
    let nodes =
        cluster.runtime.block_on(client.get_all_nodes(GetAllNodesRequest::default())).unwrap().into_inner().nodes;
    assert!(!nodes.is_empty(), "the head still answers other clients");
}

#[test]
fn wrong_or_missing_credential_is_unauthenticated() {
    let cluster = TestCluster::start(&[]);
    let mut intruder = cluster.client_with(&Bearer::new("not-a-credential").unwrap());
    let status = cluster.runtime.block_on(intruder.get_all_nodes(GetAllNodesRequest::default())).unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("not a credential of this cluster"), "{}", status.message());
    // One another head signed (another cluster's operator) is no better.
    let elsewhere = ionet_common::credential::Issuer::generate();
    let forged = elsewhere.issue(ionet_common::credential::Role::Admin, Duration::from_secs(600));
    let mut intruder = cluster.client_with(&Bearer::new(&forged).unwrap());
    let status = cluster.runtime.block_on(intruder.get_all_nodes(GetAllNodesRequest::default())).unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // No credential at all: a plain channel without the interceptor.
    let address = cluster.address();
    let status = cluster.runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
        let mut bare = gcs_client::GcsClient::new(channel);
        bare.kv_get(KvGetRequest { namespace: "x".into(), key: b"k".to_vec() }).await.unwrap_err()
    });
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("missing credential"), "{}", status.message());

    // The CLI says so too.
    let output = cluster.ionet(&["status", "--credential", "not-a-credential"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unauthenticated") && stderr.contains("not a credential"), "{stderr}");

    // And the head logged the refusal with the peer address.
    let logs = std::fs::read_dir(cluster.session().join("logs")).unwrap();
    let head_log = logs
        .filter_map(|entry| entry.ok())
        .find(|entry| entry.file_name().to_string_lossy().starts_with("head-"))
        .map(|entry| std::fs::read_to_string(entry.path()).unwrap())
        .unwrap();
    assert!(head_log.contains("refused an unauthenticated call") && head_log.contains("peer=127.0.0.1:"), "{head_log}");
    assert_still_serving(&cluster);
}

#[test]
fn malformed_oversize_and_unknown_requests_get_errors_and_the_head_keeps_serving() {
    let cluster = TestCluster::start(&[]);
    let token = cluster.admin_credential();
    let address = cluster.address();

    // Malformed: bytes that are not a protobuf message.
    let status = cluster.runtime.block_on(async {
        let channel = ionet_common::rpc::connect(&address, &token, Duration::from_secs(5)).await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/ionet.gcs.Gcs/KvPut");
        grpc.unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(vec![0xff; 64]), path, RawCodec).await.unwrap_err()
    });
    assert!(matches!(status.code(), Code::Internal | Code::InvalidArgument), "{status:?}");
    assert!(status.message().to_lowercase().contains("decode"), "{}", status.message());

    let mut client = cluster.client();
    // Oversize: a KV value above the limit, and a message above the server's cap.
    let status = cluster
        .runtime
        .block_on(client.kv_put(KvPutRequest {
            namespace: "n".into(),
            key: b"big".to_vec(),
            value: vec![7; 17 * 1024 * 1024],
            overwrite: true,
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("above the limit"), "{}", status.message());
    let status = cluster
        .runtime
        .block_on(client.kv_put(KvPutRequest {
            namespace: "n".into(),
            key: b"huge".to_vec(),
            value: vec![7; 65 * 1024 * 1024],
            overwrite: true,
        }))
        .unwrap_err();
    assert!(matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange), "{status:?}");
    assert!(status.message().contains("too large"), "{}", status.message());

    // Unknown ids and ids of the wrong size (the operator's credential: a node may only
    // speak for itself, so only the admin reaches the unknown-id answers).
    let mut operator = cluster.admin_client();
    let status = cluster
        .runtime
        .block_on(operator.heartbeat(HeartbeatRequest {
            node_id: NodeId::random().to_vec(),
            available: None,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("is not registered"), "{}", status.message());
    let status = cluster
        .runtime
        .block_on(operator.heartbeat(HeartbeatRequest {
            node_id: vec![1, 2, 3],
            available: None,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("node id must be 28 bytes, got 3"), "{}", status.message());
    let status = cluster
        .runtime
        .block_on(operator.mark_job_finished(MarkJobFinishedRequest { job_id: vec![0, 0, 0, 42] }))
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = cluster
        .runtime
        .block_on(client.kv_get(KvGetRequest { namespace: "n".into(), key: b"missing".to_vec() }))
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = cluster.runtime.block_on(operator.register_node(RegisterNodeRequest::default())).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let key = KeyPair::generate();
    let node = NodeInfo {
        node_id: NodeId::random().to_vec(),
        address: String::new(),
        public_key: key.public_key().to_vec(),
        ..Default::default()
    };
    let proof = key.sign(&registration_message(&node.node_id, &node.public_key)).to_vec();
    let status = cluster
        .runtime
        .block_on(operator.register_node(RegisterNodeRequest { node: Some(node), proof, ..Default::default() }))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("without an address"), "{}", status.message());

    assert_still_serving(&cluster);
    let value = cluster
        .runtime
        .block_on(client.kv_put(KvPutRequest {
            namespace: "n".into(),
            key: b"ok".to_vec(),
            value: b"1".to_vec(),
            overwrite: false,
        }))
        .unwrap()
        .into_inner();
    assert!(value.added);
}

#[test]
fn only_the_operator_makes_join_tokens_and_account_keys() {
    let cluster = TestCluster::start(&[]);
    // The operator (its credential in the session directory) makes both.
    let key = cluster.ionet_ok(&["account", "create", "acme", "--ttl", "30d"]);
    assert!(key.trim().starts_with("ionet1."), "{key}");
    let join = cluster.ionet_ok(&["token", "create", "--role", "node", "--ttl", "1h"]);
    assert!(join.trim().starts_with("ionet1."), "{join}");
    // Bad input says what and why.
    let stderr = cluster.ionet_err(&["account", "create", "default"]);
    assert!(stderr.contains("operator's own jobs' payer"), "{stderr}");
    let stderr = cluster.ionet_err(&["token", "create", "--ttl", "90d"]);
    assert!(stderr.contains("at most 30 days"), "{stderr}");
    let stderr = cluster.ionet_err(&["token", "create", "--ttl", "5 weeks"]);
    assert!(stderr.contains("duration"), "{stderr}");
    // A tenant's API key makes neither (nor would a node's or a job's credential).
    let stderr = cluster.ionet_err(&["account", "create", "mallory", "--credential", key.trim()]);
    assert!(stderr.contains("permission denied") && stderr.contains("CreateToken"), "{stderr}");
    let stderr = cluster.ionet_err(&["token", "create", "--role", "node", "--credential", key.trim()]);
    assert!(stderr.contains("permission denied") && stderr.contains("account acme"), "{stderr}");
    // It reads the cluster, as a tenant choosing where to run would.
    let status = cluster.ionet_ok(&["status", "--credential", key.trim()]);
    assert!(status.contains("ALIVE") || status.contains("alive"), "{status}");
}
