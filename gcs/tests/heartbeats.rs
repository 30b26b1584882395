//! A node's quiet heartbeats on a `HeartbeatStream` are answered only with news (here, a
//! change of the node table since the node's view; what else is news: `has_news`'s unit
//! test). A heartbeat that asks is always answered, each reply names the one it answers,
//! and a `Heartbeat` call is answered whatever it says.

use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::config::ClusterConfig;
use ionet_common::credential::{registration_message, KeyPair};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::gcs::{GetAllNodesRequest, HeartbeatReply, HeartbeatRequest, RegisterNodeRequest};
use ionet_common::rpc::GcsClient;
use ionet_common::NodeId;
use ionet_gcs::{GcsServer, GcsServerOptions};

/// Registers a node with the operator's client; its id and a client holding its own
/// node credential.
async fn register(operator: &mut GcsClient, address: &str) -> (NodeId, GcsClient) {
    let key = KeyPair::generate();
    let node_id = NodeId::random();
    let node = NodeInfo {
        node_id: node_id.to_vec(),
        address: "127.0.0.1:7000".into(),
        public_key: key.public_key().to_vec(),
        ..Default::default()
    };
    let proof = key.sign(&registration_message(&node.node_id, &node.public_key)).to_vec();
    let request = RegisterNodeRequest { node: Some(node), proof, tls_public_key: Vec::new() };
    let reply = operator.register_node(request).await.unwrap().into_inner();
    let credential = Bearer::new(&reply.node_credential).unwrap();
    (node_id, ionet_common::rpc::gcs_client(address, &credential).await.unwrap())
}

async fn next(replies: &mut tonic::Streaming<HeartbeatReply>) -> HeartbeatReply {
    let next = tokio::time::timeout(Duration::from_secs(30), replies.message()).await;
    next.expect("a reply in time").expect("the stream goes on").expect("a reply, not the stream's end")
}

#[tokio::test]
async fn quiet_heartbeats_are_answered_only_with_news() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = GcsServer::start(GcsServerOptions::new(ClusterConfig::default()), listener).await.unwrap();
    let address = server.address().to_string();
    let admin = server.admin_credential(Duration::from_secs(60));
    let mut operator = ionet_common::rpc::gcs_client(&address, &admin).await.unwrap();
    let (node, mut client) = register(&mut operator, &address).await;
    let table = operator.get_all_nodes(GetAllNodesRequest::default()).await.unwrap().into_inner();
    let mut since = (table.incarnation, table.version);
    let beat = |seq: u64, quiet: bool, since: (u64, u64)| HeartbeatRequest {
        node_id: node.to_vec(),
        read_view: true,
        view_since_incarnation: since.0,
        view_since_version: since.1,
        seq,
        quiet,
        ..Default::default()
    };

    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let mut replies =
        client.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)).await.unwrap().into_inner();
    // The first asks: answered, with the incarnation and nothing in the view.
    sender.send(beat(1, false, since)).await.unwrap();
    let first = next(&mut replies).await;
    assert_eq!((first.answers, first.incarnation), (1, table.incarnation));
    assert!(first.view.as_ref().is_some_and(|view| view.delta && view.nodes.is_empty()), "{first:?}");
    assert!(first.unfunded_jobs.is_empty() && !first.gpu_check_due);

    // Nothing new: no answer. A node joining is news for the next one.
    sender.send(beat(2, true, since)).await.unwrap();
    // (This test's runtime has one thread: a heartbeat counted has been answered or
    // skipped whole, its view read before the node joins.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.state().heartbeats_received() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the head did not take the second heartbeat");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (joined, _) = register(&mut operator, &address).await;
    sender.send(beat(3, true, since)).await.unwrap();
    let news = next(&mut replies).await;
    assert_eq!(news.answers, 3, "the second heartbeat, with nothing new, went unanswered");
    let view = news.view.unwrap();
    let rows = view.decode_nodes().unwrap();
    assert!(view.delta && rows.len() == 1 && rows[0].node_id == joined.to_vec(), "the joined node alone");
    since = (view.incarnation, view.version);

    // One that asks is answered, news or not.
    sender.send(beat(4, true, since)).await.unwrap();
    sender.send(beat(5, false, since)).await.unwrap();
    let asked = next(&mut replies).await;
    assert_eq!(asked.answers, 5, "the fourth, with nothing new, went unanswered");
    assert!(asked.view.is_some_and(|view| view.delta && view.nodes.is_empty()));

    // A call is answered even if it says quiet: there is no later reply to wait for.
    let call = client.heartbeat(beat(6, true, since)).await.unwrap().into_inner();
    assert_eq!(call.answers, 6);
    assert_eq!(server.state().heartbeats_received(), 6);
    server.shutdown().await;
}
