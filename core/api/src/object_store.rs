//! Object values as the core worker holds them, and the way to the node's shared-memory
//! store: values above the inline threshold are written straight into the store's files
//! and read back by mapping them (zero copies on a node).

use std::ops::Deref;
use std::sync::Arc;

use ionet_common::rpc::proto::gcs::GetObjectMovesRequest;
use ionet_common::rpc::proto::node::{
    CreateObjectRequest, EnsureObjectLocalRequest, FreeObjectsRequest, SealObjectRequest,
};
use ionet_common::rpc::proto::worker::StoredObject;
use ionet_common::rpc::NodeManagerClient;
use ionet_common::{IonetError, IonetResult, ObjectId};
use ionet_object_store::{ObjectView, StoreClient};

use crate::runtime::{block_on, CoreWorker};

/// An immutable byte buffer: owned, or a read-only mapping of the node's store.
#[derive(Clone)]
pub(crate) enum Bytes {
    Owned(Arc<Vec<u8>>),
    Mapped(ObjectView),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(bytes) => bytes,
            Bytes::Mapped(view) => view,
        }
    }
}

impl CoreWorker {
    fn store(&self) -> IonetResult<&StoreClient> {
        self.store
            .as_ref()
            .ok_or_else(|| IonetError::FailedPrecondition("this process has no object store on its node".into()))
    }

    fn node(&self) -> IonetResult<NodeManagerClient> {
        Ok(NodeManagerClient::new(self.channel(&self.node_address)?))
    }

    /// Writes `bytes` as object `id` into this node's store (call from a non-async thread).
    /// `owned_here`: this process owns it (a put), so the node frees it when this process
    /// exits; a task's value is its caller's.
    pub(crate) fn store_value(
        &self,
        id: ObjectId,
        write: impl FnOnce(&mut [u8]),
        size: u64,
        owned_here: bool,
    ) -> IonetResult<StoredObject> {
        let mut node = self.node()?;
        let owner_address = if owned_here { self.address.to_string() } else { String::new() };
        block_on(node.create_object(CreateObjectRequest { object_id: id.to_vec(), size, owner_address }))?;
        self.store()?.write_unsealed(&id, size, write).map_err(IonetError::from)?;
        block_on(node.seal_object(SealObjectRequest { object_id: id.to_vec() }))?;
        Ok(StoredObject {
            object_id: id.to_vec(),
            node_id: self.node_id.to_vec(),
            node_address: self.node_address.clone(),
            size,
        })
    }

    /// Maps a stored object, first making it local (restored from spill, or pulled from
    /// the node that has it).
    pub(crate) async fn read_stored(&self, stored: &StoredObject) -> IonetResult<Bytes> {
        let id = ObjectId::from_bytes(&stored.object_id)?;
        if let Ok(view) = self.store()?.map(&id) {
            return Ok(Bytes::Mapped(view));
        }
        let source = if stored.node_address == self.node_address { String::new() } else { stored.node_address.clone() };
        let mut node = self.node()?;
        node.ensure_object_local(EnsureObjectLocalRequest { object_id: id.to_vec(), source_address: source }).await?;
        let view = self.store()?.map(&id).map_err(|err| {
            IonetError::ObjectLost(format!(
                "object {} vanished from the store after being made local: {err}",
                id.short()
            ))
        })?;
        Ok(Bytes::Mapped(view))
    }

    /// Frees a stored object at its node (and every copy the node knows of); at the node
    /// that took it, if its node left.
    pub(crate) fn free_stored(&self, stored: StoredObject) {
        let Ok(channel) = self.channel(&stored.node_address) else { return };
        self.handle.spawn(async move {
            let request = FreeObjectsRequest { object_ids: vec![stored.object_id.clone()] };
            // Not there (its node left, or came back anew at the same address): where the
            // head says it went.
            let elsewhere = match NodeManagerClient::new(channel).free_objects(request).await {
                Ok(reply) => reply.into_inner().freed == 0,
                Err(status) => {
                    tracing::debug!(error = %status.message(), "freeing an object failed");
                    status.code() == tonic::Code::Unavailable
                }
            };
            if elsewhere {
                if let Ok(worker) = crate::runtime::current() {
                    worker.free_moved(stored).await;
                }
            }
        });
    }

    /// Frees an object whose node is gone where the head says it moved.
    async fn free_moved(&self, stored: StoredObject) {
        let request = GetObjectMovesRequest {
            from_address: stored.node_address.clone(),
            object_ids: vec![stored.object_id.clone()],
        };
        let Ok(mut gcs) = self.gcs() else { return };
        let Ok(reply) = gcs.get_object_moves(request).await else { return };
        let Some(holder) = reply.into_inner().holder_addresses.into_iter().find(|holder| !holder.is_empty()) else {
            return;
        };
        let Ok(channel) = self.channel(&holder) else { return };
        let request = FreeObjectsRequest { object_ids: vec![stored.object_id] };
        if let Err(status) = NodeManagerClient::new(channel).free_objects(request).await {
            tracing::debug!(error = %status.message(), "freeing a moved object failed");
        }
    }
}
