//! [`ObjectManagerService`]: the `ObjectManager` gRPC service over a node's store.
//!
//! Pull streams a sealed object in fixed-size chunks, in order, from one read-only
//! mapping taken at the start: the bytes stay valid for the whole stream even if the
//! object is spilled or deleted meanwhile. Chunks are produced on demand, so a slow
//! puller holds at most one chunk plus HTTP/2 flow-control windows in memory.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use ionet_common::rpc::proto::object::object_manager_server::{ObjectManager, ObjectManagerServer};
use ionet_common::rpc::proto::object::{FreeReply, FreeRequest, ObjectChunk, PullRequest, StatsReply, StatsRequest};
use ionet_common::ObjectId;
use tonic::{Request, Response, Status};

use crate::error::ObjectStoreResult;
use crate::store::LocalObjectStore;

/// Bytes per `ObjectChunk` unless configured otherwise.
pub const DEFAULT_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Largest chunk a [`crate::Puller`] accepts (a gRPC message cap, with room for framing).
pub const MAX_CHUNK_BYTES: usize = 60 * 1024 * 1024;

/// Cheap to clone: clones share the store and the counters.
#[derive(Clone)]
pub struct ObjectManagerService {
    store: Arc<LocalObjectStore>,
    chunk_bytes: usize,
    pulls_served: Arc<AtomicU64>,
    owned_by: Option<OwnerCheck>,
}

/// Whether an object is an account's (what a pull for that account must show).
pub type OwnerCheck = Arc<dyn Fn(&ObjectId, &str) -> bool + Send + Sync>;

impl ObjectManagerService {
    pub fn new(store: Arc<LocalObjectStore>) -> ObjectManagerService {
        ObjectManagerService {
            store,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            pulls_served: Arc::new(AtomicU64::new(0)),
            owned_by: None,
        }
    }

    /// A pull for an account is served only if `owned_by` says the object is its.
    pub fn with_owner_check(mut self, owned_by: OwnerCheck) -> ObjectManagerService {
        self.owned_by = Some(owned_by);
        self
    }

    /// Sets the chunk size, clamped to 1 byte ..= [`MAX_CHUNK_BYTES`].
    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> ObjectManagerService {
        self.chunk_bytes = chunk_bytes.clamp(1, MAX_CHUNK_BYTES);
        self
    }

    /// Pull streams started (objects found) since this service was made.
    pub fn pulls_served(&self) -> u64 {
        self.pulls_served.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Arc<LocalObjectStore> {
        &self.store
    }

    /// The service ready for an authorized server's `add_service`
    /// (`ionet_common::rpc::server`, which refuses calls the authorization table does not
    /// allow before they reach it).
    pub fn into_server(self) -> ObjectManagerServer<ObjectManagerService> {
        ObjectManagerServer::new(self)
            .max_decoding_message_size(ionet_common::rpc::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_CHUNK_BYTES + 1024 * 1024)
    }

    /// Runs a blocking store call (it may copy files to spill or restore) off the async
    /// worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&LocalObjectStore) -> ObjectStoreResult<T> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|err| Status::internal(format!("object store task failed: {err}")))?
            .map_err(Status::from)
    }
}

fn parse_id(bytes: &[u8]) -> Result<ObjectId, Status> {
    ObjectId::from_bytes(bytes).map_err(|err| Status::invalid_argument(err.to_string()))
}

pub type PullStream = Pin<Box<dyn Stream<Item = Result<ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ObjectManager for ObjectManagerService {
    type PullStream = PullStream;

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullStream>, Status> {
        let id = parse_id(&request.get_ref().object_id)?;
        let account = &request.get_ref().account;
        if let Some(owned_by) = &self.owned_by {
            if !account.is_empty() && !owned_by(&id, account) {
                return Err(Status::permission_denied(format!(
                    "object {} is not account {account}'s: a copy goes to its own account's jobs only",
                    id.short()
                )));
            }
        }
        let view = self
            .blocking(move |store| store.get(&id))
            .await?
            .ok_or_else(|| Status::not_found(format!("object {} is not on this node", id.hex())))?;
        self.pulls_served.fetch_add(1, Ordering::Relaxed);
        let chunk_bytes = self.chunk_bytes;
        let total = view.len();
        tracing::debug!(object = %id.short(), size = total, "serving pull");
        // State: (view, next offset, whether the first chunk is still to send). The first
        // chunk is always sent so that an empty object still announces its size.
        let stream = futures::stream::unfold((view, 0usize, true), move |(view, offset, first)| async move {
            if offset >= total && !first {
                return None;
            }
            let end = (offset + chunk_bytes).min(total);
            let chunk =
                ObjectChunk { total_size: total as u64, offset: offset as u64, data: view[offset..end].to_vec() };
            Some((Ok(chunk), (view, end, false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn free(&self, request: Request<FreeRequest>) -> Result<Response<FreeReply>, Status> {
        let ids = request.get_ref().object_ids.iter().map(|bytes| parse_id(bytes)).collect::<Result<Vec<_>, _>>()?;
        let freed = self.blocking(move |store| store.delete_many(&ids)).await?;
        Ok(Response::new(FreeReply { freed }))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        let stats = self.store.stats();
        Ok(Response::new(StatsReply {
            capacity: stats.capacity,
            bytes_in_memory: stats.bytes_in_memory,
            bytes_spilled: stats.bytes_spilled,
            objects_in_memory: stats.objects_in_memory,
            objects_spilled: stats.objects_spilled,
            pulls_served: self.pulls_served(),
        }))
    }
}
