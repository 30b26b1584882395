//! Chunked pulls between two stores over real gRPC on loopback, behind the authorization
//! layer: peers present node credentials a head signed.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::{contents, id, matches, store, MIB};
use futures::Stream;
use ionet_common::auth::{Bearer, SharedCredential};
use ionet_common::authz::Authorizer;
use ionet_common::credential::Issuer;
use ionet_common::rpc::proto::object::object_manager_client::ObjectManagerClient;
use ionet_common::rpc::proto::object::object_manager_server::{ObjectManager, ObjectManagerServer};
use ionet_common::rpc::proto::object::{FreeReply, FreeRequest, ObjectChunk, PullRequest, StatsReply, StatsRequest};
use ionet_common::rpc::AuthorizedRouter;
use ionet_common::IonetError;
use ionet_object_store::{LocalObjectStore, ObjectManagerService, ObjectStoreError, Puller};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A server on an ephemeral loopback port; stops when dropped.
struct Served {
    address: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve_router(router: AuthorizedRouter) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
        let _ = stopped.await;
    }));
    Served { address, _stop: stop }
}

/// The head of a test cluster: it signs the nodes' credentials.
struct Head(Issuer);

impl Head {
    fn new() -> Self {
        Head(Issuer::generate())
    }

    /// A node's credential, as a node daemon holds it.
    fn node(&self) -> SharedCredential {
        let node = self.0.issue_node(&[7; 28], &[1; 32], Duration::from_secs(600));
        SharedCredential::new(&Bearer::new(&node).unwrap())
    }

    fn authorizer(&self) -> Authorizer {
        Authorizer::new(Some(self.0.verifier()))
    }
}

async fn serve(service: ObjectManagerService, head: &Head) -> Served {
    serve_router(ionet_common::rpc::server(head.authorizer()).add_service(service.into_server())).await
}

/// A store holding object 4.
fn remote_of_id4() -> Arc<LocalObjectStore> {
    let remote = Arc::new(store(64 * MIB));
    remote.put(id(4), &contents(MIB, 4)).unwrap();
    remote
}

fn two_nodes(capacity: u64) -> (Arc<LocalObjectStore>, Arc<LocalObjectStore>) {
    (Arc::new(store(capacity)), Arc::new(store(capacity)))
}

async fn with_timeout<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, future).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_is_pulled_in_chunks_intact() {
    with_timeout(async {
        let head = Head::new();
        let (remote, local) = two_nodes(512 * MIB);
        let size = 200 * MIB + 12_345;
        remote.put(id(1), &contents(size, 1)).unwrap();
        let service = ObjectManagerService::new(remote.clone());
        let server = serve(service.clone(), &head).await;

        let puller = Puller::new(local.clone(), head.node());
        let view = puller.pull(&server.address.to_string(), id(1)).await.unwrap();
        assert!(matches(&view, size, 1));
        assert_eq!(local.stats().bytes_in_memory, size);
        assert!(matches(&local.get(&id(1)).unwrap().unwrap(), size, 1));
        assert_eq!(service.pulls_served(), 1);

        // Already local: no second transfer.
        puller.pull(&server.address.to_string(), id(1)).await.unwrap();
        assert_eq!(service.pulls_served(), 1);
        assert_eq!(puller.transfers_started(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_object_share_one_transfer() {
    with_timeout(async {
        let head = Head::new();
        let (remote, local) = two_nodes(256 * MIB);
        let size = 24 * MIB + 1;
        remote.put(id(2), &contents(size, 2)).unwrap();
        // Small chunks make the transfer long enough for every pull to overlap it.
        let service = ObjectManagerService::new(remote.clone()).with_chunk_bytes(256 * 1024);
        let server = serve(service.clone(), &head).await;
        let address = server.address.to_string();

        let puller = Puller::new(local.clone(), head.node());
        let pulls = (0..8).map(|_| {
            let puller = puller.clone();
            let address = address.clone();
            tokio::spawn(async move { puller.pull(&address, id(2)).await })
        });
        let views: Vec<_> =
            futures::future::join_all(pulls).await.into_iter().map(|joined| joined.unwrap().unwrap()).collect();
        assert_eq!(service.pulls_served(), 1, "pulls were not merged");
        assert_eq!(puller.transfers_started(), 1);
        for view in &views {
            assert!(matches(view, size, 2));
        }
        assert_eq!(local.stats().objects_in_memory, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulling_an_unknown_object_is_not_found() {
    with_timeout(async {
        let head = Head::new();
        let (remote, local) = two_nodes(64 * MIB);
        let server = serve(ObjectManagerService::new(remote), &head).await;
        let puller = Puller::new(local.clone(), head.node());
        let err = puller.pull(&server.address.to_string(), id(3)).await.unwrap_err();
        match &err {
            ObjectStoreError::PullFailed { code, message, .. } => {
                assert_eq!(*code, tonic::Code::NotFound);
                assert!(message.contains(&id(3).hex()), "{message}");
            }
            other => panic!("expected NOT_FOUND, got {other}"),
        }
        assert!(matches!(IonetError::from(err), IonetError::NotFound(_)));
        assert_eq!(local.stats().bytes_in_memory, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_node_is_unauthenticated() {
    with_timeout(async {
        let (remote, local) = two_nodes(64 * MIB);
        remote.put(id(4), &contents(MIB, 4)).unwrap();
        // A node of another cluster (another head's credential) is not one of this one's.
        let server = serve(ObjectManagerService::new(remote), &Head::new()).await;
        let puller = Puller::new(local.clone(), Head::new().node());
        let err = puller.pull(&server.address.to_string(), id(4)).await.unwrap_err();
        assert!(matches!(&err, ObjectStoreError::PullFailed { code: tonic::Code::Unauthenticated, .. }), "{err}");
        assert!(matches!(IonetError::from(err), IonetError::Unauthenticated(_)));
        assert!(local.get(&id(4)).unwrap().is_none());

        // A tenant's job of this cluster is no peer: it cannot pull a node's objects.
        let head = Head::new();
        let server = serve(ObjectManagerService::new(remote_of_id4()), &head).await;
        let job = head.0.issue_job(&[0, 0, 0, 1], "acme", Duration::from_secs(600));
        let puller = Puller::new(local.clone(), SharedCredential::new(&Bearer::new(&job).unwrap()));
        let err = puller.pull(&server.address.to_string(), id(4)).await.unwrap_err();
        assert!(matches!(&err, ObjectStoreError::PullFailed { code: tonic::Code::PermissionDenied, .. }), "{err}");
        assert!(err.to_string().contains("node credential"), "the refusal names the right: {err}");
        assert!(local.get(&id(4)).unwrap().is_none());
        // A node of this cluster pulls it.
        assert!(Puller::new(local.clone(), head.node()).pull(&server.address.to_string(), id(4)).await.is_ok());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_unavailable() {
    with_timeout(async {
        let local = Arc::new(store(64 * MIB));
        // Bind then drop to get a port nobody listens on.
        let address = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let puller = Puller::new(local, Head::new().node());
        let err = puller.pull(&address.to_string(), id(5)).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(matches!(IonetError::from(err), IonetError::Unavailable(_)));
    })
    .await
}

/// A peer that misbehaves after sending part of an object.
struct BrokenPeer {
    /// Chunks to send, then optionally an error status.
    chunks: Vec<ObjectChunk>,
    fail_with: Option<Status>,
    /// Then send nothing more, keeping the stream open.
    stall: bool,
}

#[tonic::async_trait]
impl ObjectManager for BrokenPeer {
    type PullStream = Pin<Box<dyn Stream<Item = Result<ObjectChunk, Status>> + Send>>;

    async fn pull(&self, _: Request<PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        let mut items: Vec<Result<ObjectChunk, Status>> = self.chunks.iter().cloned().map(Ok).collect();
        if let Some(status) = &self.fail_with {
            items.push(Err(status.clone()));
        }
        let sent = futures::stream::iter(items);
        if self.stall {
            use futures::StreamExt;
            return Ok(Response::new(Box::pin(sent.chain(futures::stream::pending()))));
        }
        Ok(Response::new(Box::pin(sent)))
    }

    async fn free(&self, _: Request<FreeRequest>) -> Result<Response<FreeReply>, Status> {
        Err(Status::unimplemented("broken peer"))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        Err(Status::unimplemented("broken peer"))
    }
}

async fn pull_from_broken(peer: BrokenPeer) -> (ObjectStoreError, Arc<LocalObjectStore>) {
    let head = Head::new();
    let router = ionet_common::rpc::server(head.authorizer()).add_service(ObjectManagerServer::new(peer));
    let server = serve_router(router).await;
    let local = Arc::new(store(64 * MIB));
    let puller = Puller::new(local.clone(), head.node()).with_stall_timeout(Duration::from_millis(300));
    let err = puller.pull(&server.address.to_string(), id(6)).await.unwrap_err();
    (err, local)
}

fn assert_nothing_left(local: &LocalObjectStore) {
    assert!(local.get(&id(6)).unwrap().is_none());
    let stats = local.stats();
    assert_eq!((stats.bytes_in_memory, stats.objects_unsealed), (0, 0), "{stats:?}");
    assert_eq!(std::fs::read_dir(local.dir()).unwrap().count(), 0, "partial file left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_breaks_off_leaves_no_partial_object() {
    with_timeout(async {
        let chunk = |offset: u64, len: usize| ObjectChunk { total_size: MIB, offset, data: vec![7; len] };

        // The peer fails mid-stream.
        let (err, local) = pull_from_broken(BrokenPeer {
            chunks: vec![chunk(0, 1000)],
            fail_with: Some(Status::unavailable("peer going away")),
            stall: false,
        })
        .await;
        assert!(matches!(&err, ObjectStoreError::TransferBroken { .. }), "{err}");
        assert!(err.to_string().contains("after 1000 bytes"), "{err}");
        assert_nothing_left(&local);

        // The stream ends short of the announced size.
        let (err, local) = pull_from_broken(BrokenPeer {
            chunks: vec![chunk(0, 1000), chunk(1000, 24)],
            fail_with: None,
            stall: false,
        })
        .await;
        assert!(err.to_string().contains(&format!("ended after 1024 of {MIB} bytes")), "{err}");
        assert!(err.is_retryable());
        assert_nothing_left(&local);

        // A chunk out of order.
        let (err, local) =
            pull_from_broken(BrokenPeer { chunks: vec![chunk(0, 10), chunk(20, 10)], fail_with: None, stall: false })
                .await;
        assert!(err.to_string().contains("does not follow"), "{err}");
        assert_nothing_left(&local);

        // More bytes than announced.
        let (err, local) = pull_from_broken(BrokenPeer {
            chunks: vec![ObjectChunk { total_size: 4, offset: 0, data: vec![1; 8] }],
            fail_with: None,
            stall: false,
        })
        .await;
        assert!(err.to_string().contains("does not follow"), "{err}");
        assert_nothing_left(&local);

        // The peer stops sending, the stream held open: the pull breaks at its deadline.
        let (err, local) =
            pull_from_broken(BrokenPeer { chunks: vec![chunk(0, 1000)], fail_with: None, stall: true }).await;
        assert!(err.to_string().contains("sent nothing for 300ms after 1000 bytes"), "{err}");
        assert!(err.is_retryable());
        assert_nothing_left(&local);
        // Or never answers at all.
        let (err, local) = pull_from_broken(BrokenPeer { chunks: vec![], fail_with: None, stall: true }).await;
        assert!(err.to_string().contains("sent nothing for 300ms after 0 bytes"), "{err}");
        assert_nothing_left(&local);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_objects_travel_and_free_and_stats_answer() {
    with_timeout(async {
        let head = Head::new();
        let (remote, local) = two_nodes(64 * MIB);
        remote.put(id(7), &[]).unwrap();
        remote.put(id(8), &contents(MIB, 8)).unwrap();
        let server = serve(ObjectManagerService::new(remote.clone()), &head).await;
        let address = server.address.to_string();
        let view = Puller::new(local.clone(), head.node()).pull(&address, id(7)).await.unwrap();
        assert!(view.is_empty());
        assert!(local.contains(&id(7)));

        let channel = ionet_common::rpc::connect_shared(&address, &head.node(), Duration::from_secs(5)).await.unwrap();
        let mut client = ObjectManagerClient::new(channel);
        let stats = client.stats(StatsRequest {}).await.unwrap().into_inner();
        assert_eq!((stats.objects_in_memory, stats.bytes_in_memory, stats.pulls_served), (2, MIB, 1));
        let freed = client
            .free(FreeRequest { object_ids: vec![id(7).to_vec(), id(8).to_vec(), id(9).to_vec()] })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(freed.freed, 2);
        assert_eq!(remote.stats().objects_in_memory, 0);
        let status = client.free(FreeRequest { object_ids: vec![vec![1, 2, 3]] }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    })
    .await
}
