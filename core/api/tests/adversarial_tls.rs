//! TLS between machines, tried as an eavesdropper and an impostor would: a cluster whose
//! head serves TLS, nodes joining it as other machines (their own session directories,
//! pinning the CA by hash), every byte between a node and the head and between two nodes
//! passing a relay that records it. Real daemons on loopback, this process a driver.

mod harness;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::Cluster;
use ionet::{SchedulingStrategy, TaskOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;
/// Bytes no encrypted stream would show: the payload the tasks move.
const MARKER: &[u8] = b"ionet-cleartext-marker:";
/// What every plaintext HTTP/2 connection starts with (RFC 9113 section 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[ionet::remote]
fn make_marked(size: u64) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(size as usize).collect()
}

#[ionet::remote]
fn count_markers(blob: Vec<u8>) -> (u64, String) {
    let count = blob.windows(MARKER.len()).filter(|window| *window == MARKER).count() as u64;
    (count, ionet::get_runtime_context().unwrap().node_id.hex())
}

/// A TCP relay that records every byte it passes, both ways.
struct Relay {
    address: SocketAddr,
    recorded: Arc<Mutex<Vec<u8>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Relay {
    /// Listens on `listen` and forwards each connection to `target`.
    fn start(listen: &str, target: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(listen)).unwrap();
        let address = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let record = recorded.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, record.clone()));
                tokio::spawn(pump(server_read, client_write, record.clone()));
            }
        });
        Self { address, recorded, _runtime: runtime }
    }

    fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        record.lock().unwrap().extend_from_slice(&buffer[..read]);
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

fn port_of(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn join_token(cluster: &Cluster) -> String {
    cluster.ionet(&["token", "create", "--role", "node"]).trim().to_string()
}

fn ca_hash(cluster: &Cluster) -> String {
    let pem = std::fs::read_to_string(cluster.session().join("ca.pem")).unwrap();
    ionet::tls::ca_hash_of_pem(&pem).unwrap()
}

fn machine(cluster: &Cluster, name: &str) -> std::path::PathBuf {
    let dir = cluster.session().join("machines").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nothing_in_clear_between_machines() {
    let mut cluster = Cluster::start(&["--tls", "--num-cpus", "0"]);
    let head = cluster.address();
    assert!(head.starts_with("https://127.0.0.1:"), "a head started with --tls says so in its address: {head}");
    let (token, hash) = (join_token(&cluster), ca_hash(&cluster));
    // Node a's traffic with the head passes one relay; its server is reached only through
    // another (it binds 127.0.0.2 and tells the cluster it is at the relay's port on
    // 127.0.0.1, the host its certificate names).
    let to_head = Relay::start("127.0.0.1:0", format!("127.0.0.1:{}", port_of(&head)).parse().unwrap());
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let to_a = Relay::start(&format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}").parse().unwrap());
    let via_relay = format!("https://127.0.0.1:{}", to_head.address.port());
    let port = port.to_string();
    let machine_a = machine(&cluster, "a");
    cluster.add_machine(
        &machine_a,
        &[
            "--address",
            &via_relay,
            "--ca-hash",
            &hash,
            "--join-token",
            &token,
            "--num-cpus",
            "1",
            "--labels",
            "name=a",
            "--bind",
            "127.0.0.2",
            "--node-ip-address",
            "127.0.0.1",
            "--node-manager-port",
            &port,
        ],
    );
    let machine_b = machine(&cluster, "b");
    cluster.add_machine(
        &machine_b,
        &["--address", &head, "--ca-hash", &hash, "--join-token", &token, "--num-cpus", "1", "--labels", "name=b"],
    );
    // The CA a joining machine fetched is the one it pinned.
    let fetched = std::fs::read_to_string(machine_a.join("ca.pem")).unwrap();
    assert_eq!(ionet::tls::ca_hash_of_pem(&fetched).unwrap(), hash);

    cluster.init();
    let nodes = ionet::nodes().unwrap();
    let node =
        |name: &str| nodes.iter().find(|node| node.labels.get("name").map(String::as_str) == Some(name)).unwrap();
    let (a, b) = (node("a"), node("b"));
    for node in &nodes {
        assert!(node.address.starts_with("https://"), "every node of a TLS cluster serves TLS: {}", node.address);
    }
    let pinned = |node: &ionet::Node| {
        TaskOptions::default()
            .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node.node_id, soft: false })
    };
    // 4 MiB made on a, read on b: the object moves from a's daemon to b's through the relay.
    let blob = make_marked::options(pinned(a)).remote(4 * MIB as u64);
    let verdict = count_markers::options(pinned(b)).remote(&blob);
    let (count, ran_on) = ionet::get_timeout(&verdict, Duration::from_secs(120)).unwrap();
    assert_eq!(count as usize, 4 * MIB / MARKER.len(), "the object arrived whole");
    assert_eq!(ran_on, b.node_id.hex());

    let (head_stream, node_stream) = (to_head.recorded(), to_a.recorded());
    assert!(head_stream.len() > 1000, "node a spoke to the head through the relay ({} bytes)", head_stream.len());
    assert!(node_stream.len() > 4 * MIB, "the object passed the relay ({} bytes)", node_stream.len());
    for (name, stream) in [("node a ↔ head", &head_stream), ("node b ↔ node a", &node_stream)] {
        assert_eq!(stream[0], 0x16, "{name}: the stream starts with a TLS handshake record");
        assert!(!contains(stream, HTTP2_PREFACE), "{name}: no HTTP/2 (so no header, no credential) in clear");
        assert!(!contains(stream, MARKER), "{name}: no payload in clear");
        assert!(!contains(stream, token.as_bytes()), "{name}: the join token is not in clear");
        assert!(!contains(stream, b"Bearer"), "{name}: no credential in clear");
    }
    drop(cluster);
}

fn plaintext_and_impostors_are_refused() {
    let cluster = Cluster::start(&["--tls", "--num-cpus", "0"]);
    let head = cluster.address();
    let plain = head.trim_start_matches("https://").to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    // A plaintext HTTP/2 client gets no answer from a TLS port.
    let refused = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{plain}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        let mut client = ionet::rpc::proto::gcs::gcs_client::GcsClient::new(channel);
        client
            .get_all_nodes(ionet::rpc::proto::gcs::GetAllNodesRequest { include_dead: true, ..Default::default() })
            .await
    });
    let status = refused.expect_err("a plaintext call to a TLS port fails");
    assert_ne!(status.code(), tonic::Code::PermissionDenied, "it never reaches the authorization layer: {status}");
    assert_ne!(status.code(), tonic::Code::Unauthenticated, "it never reaches the authorization layer: {status}");
    // Nor does a raw client speaking HTTP/2 in clear get a byte of HTTP/2 back.
    runtime.block_on(async {
        let mut stream = tokio::net::TcpStream::connect(&plain).await.unwrap();
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut reply)).await;
        assert!(!contains(&reply, b"\x00\x00"), "no HTTP/2 frame comes back in clear: {reply:?}");
    });

    // A machine pinning another CA's hash refuses this head, and never joins.
    let token = join_token(&cluster);
    let wrong = ionet::tls::ClusterCa::generate().unwrap().hash();
    let stranger = machine(&cluster, "stranger");
    let output = join_once(&stranger, &head, Some(&wrong), &token);
    assert!(!output.status.success(), "a node pinning the wrong CA does not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not the cluster pinned by"), "it says why: {stderr}");
    // A hash that is not even one is refused too, and a TLS head without a hash.
    let output = join_once(&stranger, &head, Some("sha256:00"), &token);
    assert!(!output.status.success());
    let output = join_once(&stranger, &head, None, &token);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--ca-hash"), "it names the missing pin");
    assert_eq!(cluster_nodes(&cluster), 1, "only the head's own node is in the cluster");

    drop(cluster);
}

fn run_cli(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(ionet::testing::CLI_ARGS_ENV, serde_json::to_string(args).unwrap())
        .env_remove("IONET_CREDENTIAL")
        .env_remove("IONET_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("ionet {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A node started once in the foreground, joining `head` with `token` and the CA `hash`
/// (none: `None`), from its own session directory; how it ended.
fn join_once(session: &Path, head: &str, hash: Option<&str>, token: &str) -> std::process::Output {
    let session = session.to_str().unwrap();
    let mut args = vec!["start", "--block", "--address", head, "--join-token", token, "--connect-timeout", "5"];
    if let Some(hash) = hash {
        args.extend(["--ca-hash", hash]);
    }
    args.extend(["--temp-dir", session]);
    run_cli(&args)
}

fn cluster_nodes(cluster: &Cluster) -> usize {
    let status = cluster.ionet(&["status", "--json"]);
    let nodes: serde_json::Value = serde_json::from_str(&status).unwrap();
    nodes.as_array().map(Vec::len).unwrap_or_else(|| nodes["nodes"].as_array().unwrap().len())
}

fn main() {
    harness::run(
        &[
            ("nothing_in_clear_between_machines", nothing_in_clear_between_machines),
            ("plaintext_and_impostors_are_refused", plaintext_and_impostors_are_refused),
        ],
        Duration::from_secs(240),
    );
}
