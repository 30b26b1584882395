//! [`Puller`]: fetches objects from other nodes into the local store.
//!
//! Protocol of one transfer: open `ObjectManager.Pull`, `create` the object in the local
//! store at the size the first chunk announces, copy each chunk straight into the
//! created mapping (offsets must be contiguous and stay inside the size), then `seal`
//! once exactly `total_size` bytes arrived. Anything else — the peer going away, a bad
//! offset, a short stream, the pulling task being dropped — aborts the unsealed object
//! (an [`AbortGuard`] runs on every exit path), so no partial object is ever visible.
//!
//! Merging: the first `pull` of an object spawns the transfer as its own task and puts a
//! shared future of its result in `in_flight`; later pulls of the same object await that
//! future. The task removes the entry when it finishes, after sealing, so a caller that
//! misses the entry finds the sealed object in the store instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures::future::{BoxFuture, FutureExt, Shared};
use ionet_common::auth::SharedCredential;
use ionet_common::rpc::proto::object::object_manager_client::ObjectManagerClient;
use ionet_common::rpc::proto::object::PullRequest;
use ionet_common::rpc::AuthChannel;
use ionet_common::ObjectId;

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::service::MAX_CHUNK_BYTES;
use crate::store::{LocalObjectStore, StreamedObject};
use crate::view::ObjectView;

type SharedPull = Shared<BoxFuture<'static, ObjectStoreResult<ObjectView>>>;

/// How long a peer may keep a pull waiting for its answer or its next chunk.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Cheap to clone; clones share in-flight transfers and connections.
#[derive(Clone)]
pub struct Puller {
    inner: Arc<PullerInner>,
}

struct PullerInner {
    store: Arc<LocalObjectStore>,
    credential: SharedCredential,
    connect_timeout: Duration,
    /// Longest a peer may go without answering or sending the next chunk: a peer that
    /// stalls (crashed, or a provider holding the pull hostage) breaks the transfer.
    stall_timeout: Duration,
    in_flight: DashMap<ObjectId, SharedPull>,
    channels: DashMap<String, AuthChannel>,
    transfers_started: AtomicU64,
}

impl Puller {
    /// Pulls into `store`, authenticating to peers with the node's `credential`.
    pub fn new(store: Arc<LocalObjectStore>, credential: SharedCredential) -> Puller {
        Puller {
            inner: Arc::new(PullerInner {
                store,
                credential,
                connect_timeout: Duration::from_secs(5),
                stall_timeout: DEFAULT_STALL_TIMEOUT,
                in_flight: DashMap::new(),
                channels: DashMap::new(),
                transfers_started: AtomicU64::new(0),
            }),
        }
    }

    /// With another stall deadline (see [`DEFAULT_STALL_TIMEOUT`]); before it is cloned.
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Puller {
        Arc::get_mut(&mut self.inner).expect("set before the puller is shared").stall_timeout = timeout;
        self
    }

    /// Transfers this puller started (merged pulls count once).
    pub fn transfers_started(&self) -> u64 {
        self.inner.transfers_started.load(Ordering::Relaxed)
    }

    /// The object from the local store, pulling it from the node at `address`
    /// (`host:port` of its `ObjectManager` service) if it is not here yet. Concurrent
    /// pulls of one object share one transfer and its result.
    pub async fn pull(&self, address: &str, id: ObjectId) -> ObjectStoreResult<ObjectView> {
        self.pull_for(address, id, "").await
    }

    /// [`Puller::pull`] of a copy for `account` (a job's): the node at `address` gives
    /// it only if the object is that account's. Callers pulling for different accounts
    /// must not overlap on one object (a concurrent pull shares the first's transfer).
    pub async fn pull_for(&self, address: &str, id: ObjectId, account: &str) -> ObjectStoreResult<ObjectView> {
        if let Some(view) = local_get(&self.inner.store, id).await? {
            return Ok(view);
        }
        let shared = match self.inner.in_flight.entry(id) {
            Entry::Occupied(entry) => entry.get().clone(),
            Entry::Vacant(entry) => {
                let inner = self.inner.clone();
                let address = address.to_string();
                let task_address = address.clone();
                let account = account.to_string();
                let task = tokio::spawn(async move {
                    let result = inner.transfer(&task_address, id, &account).await;
                    inner.in_flight.remove(&id);
                    result
                });
                let shared = async move {
                    task.await.unwrap_or_else(|err| {
                        Err(ObjectStoreError::TransferBroken {
                            id,
                            address,
                            reason: format!("transfer task failed: {err}"),
                        })
                    })
                }
                .boxed()
                .shared();
                entry.insert(shared.clone());
                shared
            }
        };
        shared.await
    }
}

impl PullerInner {
    async fn channel(&self, address: &str) -> ObjectStoreResult<AuthChannel> {
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = ionet_common::rpc::connect_shared(address, &self.credential, self.connect_timeout)
            .await
            .map_err(|err| ObjectStoreError::PullFailed {
                id: ObjectId::from_array([0; ObjectId::LEN]),
                address: address.to_string(),
                code: tonic::Code::Unavailable,
                message: err.to_string(),
            })?;
        self.channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    async fn transfer(&self, address: &str, id: ObjectId, account: &str) -> ObjectStoreResult<ObjectView> {
        // A transfer that finished between the caller's check and this task's start.
        if let Some(view) = local_get(&self.store, id).await? {
            return Ok(view);
        }
        self.transfers_started.fetch_add(1, Ordering::Relaxed);
        let result = self.transfer_once(address, id, account).await;
        let reconnect = match &result {
            Err(ObjectStoreError::TransferBroken { .. }) => true,
            Err(ObjectStoreError::PullFailed { code, .. }) => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        };
        if reconnect {
            // The connection may be dead: reconnect next time (cheap if it was not).
            self.channels.remove(address);
        }
        result
    }

    async fn transfer_once(&self, address: &str, id: ObjectId, account: &str) -> ObjectStoreResult<ObjectView> {
        let pull_failed = |status: tonic::Status| ObjectStoreError::PullFailed {
            id,
            address: address.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        };
        let broken = |reason: String| ObjectStoreError::TransferBroken { id, address: address.to_string(), reason };
        let channel = self.channel(address).await.map_err(|err| match err {
            ObjectStoreError::PullFailed { address, code, message, .. } => {
                ObjectStoreError::PullFailed { id, address, code, message }
            }
            other => other,
        })?;
        let mut client = ObjectManagerClient::new(channel).max_decoding_message_size(MAX_CHUNK_BYTES + 1024 * 1024);
        let stall = self.stall_timeout;
        let answer = tokio::time::timeout(
            stall,
            client.pull(PullRequest { object_id: id.to_vec(), account: account.to_string() }),
        )
        .await
        .map_err(|_| broken(format!("the peer did not answer within {stall:?}")))?;
        let mut stream = answer.map_err(pull_failed)?.into_inner();

        let mut created: Option<(StreamedObject, AbortGuard)> = None;
        let mut received: u64 = 0;
        loop {
            let next = tokio::time::timeout(stall, stream.message())
                .await
                .map_err(|_| broken(format!("the peer sent nothing for {stall:?} after {received} bytes")))?;
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                // A status before any data is the server's answer (NOT_FOUND, …); after
                // data it means the stream broke.
                Err(status) if created.is_none() => return Err(pull_failed(status)),
                Err(status) => {
                    return Err(broken(format!(
                        "stream failed after {received} bytes: {:?}: {}",
                        status.code(),
                        status.message()
                    )))
                }
            };
            if created.is_none() {
                let store = self.store.clone();
                let size = chunk.total_size;
                let object = tokio::task::spawn_blocking(move || store.create_streamed(id, size))
                    .await
                    .map_err(|err| broken(format!("create task failed: {err}")))??;
                created = Some((object, AbortGuard::new(self.store.clone(), id)));
            }
            let (object, _) = created.as_ref().expect("created above");
            let total = object.size();
            let len = chunk.data.len() as u64;
            if chunk.total_size != total {
                return Err(broken(format!(
                    "chunk at offset {} announces {} bytes, the first announced {total}",
                    chunk.offset, chunk.total_size
                )));
            }
            if chunk.offset != received || received + len > total {
                return Err(broken(format!(
                    "chunk of {len} bytes at offset {} does not follow {received} of {total} bytes",
                    chunk.offset
                )));
            }
            object.write_at(&chunk.data, received)?;
            received += len;
        }
        let Some((object, guard)) = created else {
            return Err(broken("stream ended before the first chunk".into()));
        };
        if received != object.size() {
            return Err(broken(format!("stream ended after {received} of {} bytes", object.size())));
        }
        drop(object);
        let store = self.store.clone();
        let view = tokio::task::spawn_blocking(move || store.seal(&id))
            .await
            .map_err(|err| broken(format!("seal task failed: {err}")))??;
        guard.disarm();
        tracing::debug!(object = %id.short(), size = received, %address, "pulled object");
        Ok(view)
    }
}

async fn local_get(store: &Arc<LocalObjectStore>, id: ObjectId) -> ObjectStoreResult<Option<ObjectView>> {
    if !store.contains(&id) {
        return Ok(None);
    }
    // May restore from spill: file copies, so off the async threads.
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.get(&id)).await.map_err(|err| {
        ObjectStoreError::io(format!("object {} get task failed", id.short()), std::io::Error::other(err.to_string()))
    })?
}

/// Aborts the unsealed object on drop unless disarmed after a successful seal.
struct AbortGuard {
    store: Arc<LocalObjectStore>,
    id: ObjectId,
    armed: bool,
}

impl AbortGuard {
    fn new(store: Arc<LocalObjectStore>, id: ObjectId) -> AbortGuard {
        AbortGuard { store, id, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(err) = self.store.abort(&self.id) {
                tracing::warn!(object = %self.id.short(), error = %err,
                    "could not discard a partial pulled object");
            } else {
                tracing::debug!(object = %self.id.short(), "discarded a partial pulled object");
            }
        }
    }
}
