//! A node's quiet heartbeats on a `HeartbeatStream` are answered only with news (here, a
//! change of the node table since the node's view; what else is news: `has_news`'s unit
//! test). A heartbeat that asks is always answered, each reply names the one it answers,
//! and a `Heartbeat` call is answered whatever it says.

use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::config::ClusterConfig;
use ionet_common::credential::{registration_message, KeyPair};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::common::ResourceQuantities;
use ionet_common::rpc::proto::gcs::{
    FindNodesRequest, GetAllNodesRequest, HeartbeatReply, HeartbeatRequest, RegisterNodeRequest,
};
use ionet_common::rpc::GcsClient;
use ionet_common::{NodeId, Quantity, ResourceSet};
use ionet_gcs::{GcsServer, GcsServerOptions};

/// Registers a node with the operator's client; its id and a client holding its own
/// node credential.
async fn register(operator: &mut GcsClient, address: &str) -> (NodeId, GcsClient) {
    register_with(operator, address, NodeInfo { address: "127.0.0.1:7000".into(), ..Default::default() }).await
}

/// [`register`] of a node whose row is `node` (its id and key are filled in).
async fn register_with(operator: &mut GcsClient, address: &str, node: NodeInfo) -> (NodeId, GcsClient) {
    let key = KeyPair::generate();
    let node_id = NodeId::random();
    let node = NodeInfo { node_id: node_id.to_vec(), public_key: key.public_key().to_vec(), ..node };
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

/// Bounded views: past twice `view_sample` rows, a node asking for a sampled view is sent
/// the rows of its own bucket (itself among them), whole and by delta, and a change of a
/// node outside it is not sent to it. What it misses it finds: `FindNodes` searches the
/// whole table for a demand (nodes only: a tenant may not), and `GetAllNodes` looks nodes
/// up by id and address.
#[tokio::test]
async fn a_large_cluster_sends_each_node_its_sample_and_finds_the_rest() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ClusterConfig { view_sample: 2, ..Default::default() };
    let server = GcsServer::start(GcsServerOptions::new(config), listener).await.unwrap();
    let address = server.address().to_string();
    let admin = server.admin_credential(Duration::from_secs(60));
    let mut operator = ionet_common::rpc::gcs_client(&address, &admin).await.unwrap();
    let cpus = |count: i64| Some(ResourceQuantities::from_set(&ResourceSet::new().with("CPU", Quantity::whole(count))));
    let mut nodes = Vec::new();
    for index in 0..16i64 {
        let row = NodeInfo {
            address: format!("127.0.0.1:{}", 7000 + index),
            total: cpus(index + 1),
            available: cpus(index + 1),
            ..Default::default()
        };
        nodes.push(register_with(&mut operator, &address, row).await);
    }
    let ids: Vec<NodeId> = nodes.iter().map(|(id, _)| *id).collect();
    let view = |node: NodeId, since: (u64, u64), sampled: bool| HeartbeatRequest {
        node_id: node.to_vec(),
        read_view: true,
        sampled_view: sampled,
        view_since_incarnation: since.0,
        view_since_version: since.1,
        ..Default::default()
    };
    let rows_of = |reply: &HeartbeatReply| -> Vec<NodeId> {
        let nodes = reply.view.as_ref().unwrap().decode_nodes().unwrap();
        nodes.iter().map(|node| NodeId::from_bytes(&node.node_id).unwrap()).collect()
    };

    // Whole views for a node that does not ask for a sample.
    let whole = nodes[0].1.heartbeat(view(ids[0], (0, 0), false)).await.unwrap().into_inner();
    assert!(!whole.view.as_ref().unwrap().sampled);
    assert_eq!(rows_of(&whole).len(), 16);

    // Sixteen rows, samples of two: eight buckets, so some bucket holds two nodes or more.
    let mut samples = Vec::new();
    for (index, (id, client)) in nodes.iter_mut().enumerate() {
        let reply = client.heartbeat(view(*id, (0, 0), true)).await.unwrap().into_inner();
        let sample = rows_of(&reply);
        let read = reply.view.unwrap();
        assert!(read.sampled && !read.delta, "node {index}: a sample, read whole");
        assert!(sample.contains(id), "node {index}'s sample holds itself");
        assert!(sample.len() < 16, "node {index}'s sample is not the table: {}", sample.len());
        samples.push((sample, (read.incarnation, read.version)));
    }
    let viewer = samples.iter().position(|(sample, _)| sample.len() >= 2).expect("a bucket of two");
    let (sample, at) = samples[viewer].clone();
    let peer = *sample.iter().find(|node| **node != ids[viewer]).unwrap();
    let stranger = *ids.iter().find(|node| !sample.contains(node)).unwrap();
    let index_of = |node: NodeId| ids.iter().position(|id| *id == node).unwrap();
    for changed in [peer, stranger] {
        let (id, client) = &mut nodes[index_of(changed)];
        let beat = HeartbeatRequest { node_id: id.to_vec(), available: cpus(0), ..Default::default() };
        client.heartbeat(beat).await.unwrap();
    }
    let delta = nodes[viewer].1.heartbeat(view(ids[viewer], at, true)).await.unwrap().into_inner();
    assert!(delta.view.as_ref().unwrap().delta);
    assert_eq!(rows_of(&delta), vec![peer], "the change in its bucket, not the stranger's");

    // What the sample misses: found in the whole table, by demand, id or address.
    let client = &mut nodes[viewer].1;
    let search = |cpus_wanted: i64, limit: u32| FindNodesRequest {
        resources: cpus(cpus_wanted),
        free_now: true,
        limit,
        avoid: vec![ids[viewer].to_vec()],
        ..Default::default()
    };
    let found = client.find_nodes(search(15, 8)).await.unwrap().into_inner().nodes;
    let found: Vec<NodeId> = found.iter().map(|node| NodeId::from_bytes(&node.node_id).unwrap()).collect();
    // Nodes 14 and 15 have 15 and 16 CPUs (one of them free of them all, unless changed above).
    let expected: Vec<NodeId> = [14, 15]
        .into_iter()
        .map(|index| ids[index])
        .filter(|node| *node != ids[viewer] && *node != peer && *node != stranger)
        .collect();
    assert_eq!(found.len(), expected.len(), "{found:?}");
    assert!(found.iter().all(|node| expected.contains(node)));
    assert!(client.find_nodes(search(17, 8)).await.unwrap().into_inner().nodes.is_empty(), "none has 17");
    assert_eq!(client.find_nodes(search(1, 3)).await.unwrap().into_inner().nodes.len(), 3, "at most the limit");
    let refused = client.find_nodes(search(1, 0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let looked_up = GetAllNodesRequest {
        node_ids: vec![stranger.to_vec()],
        addresses: vec!["127.0.0.1:7003".into()],
        ..Default::default()
    };
    let reply = client.get_all_nodes(looked_up).await.unwrap().into_inner();
    let mut rows: Vec<NodeId> = reply.nodes.iter().map(|node| NodeId::from_bytes(&node.node_id).unwrap()).collect();
    let mut expected = vec![stranger, ids[3]];
    rows.sort();
    expected.sort();
    expected.dedup();
    assert_eq!(rows, expected, "exactly the nodes named");
    assert_eq!(reply.version, 0, "a look-up is no view's version");

    // A search that left out the one node that fits is not remembered as finding nothing:
    // another node asking at once finds it.
    let sixteen = |avoid: Vec<NodeId>| FindNodesRequest {
        resources: cpus(16),
        limit: 1,
        avoid: avoid.iter().map(|node| node.to_vec()).collect(),
        ..Default::default()
    };
    let none = nodes[0].1.find_nodes(sixteen(vec![ids[0], ids[15]])).await.unwrap().into_inner().nodes;
    assert!(none.is_empty(), "the only node of 16 CPUs avoided");
    let found = nodes[1].1.find_nodes(sixteen(vec![ids[1]])).await.unwrap().into_inner().nodes;
    assert_eq!(found.len(), 1, "found by the next asker");
    assert_eq!(found[0].node_id, ids[15].to_vec());

    // A tenant may not search the table (a node's spillback only), nor read a node's
    // sample; a node reads its own only.
    let tenant = server.account_credential("alice", Duration::from_secs(60));
    let mut tenant = ionet_common::rpc::gcs_client(&address, &tenant).await.unwrap();
    let refused = tenant.find_nodes(search(1, 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let sample_of = |node: NodeId| GetAllNodesRequest { sample_for: node.to_vec(), ..Default::default() };
    let refused = tenant.get_all_nodes(sample_of(ids[0])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = nodes[0].1.get_all_nodes(sample_of(ids[1])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let own = nodes[0].1.get_all_nodes(sample_of(ids[0])).await.unwrap().into_inner();
    assert!(own.sampled && own.nodes.iter().any(|node| node.node_id == ids[0].to_vec()));
    server.shutdown().await;
}
