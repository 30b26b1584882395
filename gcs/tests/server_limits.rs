//! What the control store's socket bounds for every peer: streams per connection.

use std::time::{Duration, Instant};

use ionet_common::config::ClusterConfig;
use ionet_common::rpc::MAX_STREAMS_PER_CONNECTION;
use ionet_gcs::{GcsServer, GcsServerOptions};

#[tokio::test]
async fn a_connection_may_hold_a_bounded_number_of_streams() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = GcsServer::start(GcsServerOptions::new(ClusterConfig::default()), listener).await.unwrap();
    // A raw HTTP/2 client: the limit is what the server announces in its SETTINGS.
    let tcp = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.current_max_send_streams() != MAX_STREAMS_PER_CONNECTION as usize {
        assert!(Instant::now() < deadline, "announced {} streams", client.current_max_send_streams());
        tokio::time::sleep(Duration::from_millis(10)).await;
        client = client.ready().await.unwrap();
    }
    server.shutdown().await;
}
