//! Untyped objects for language bindings (the Python package): bytes in, bytes out.
//!
//! A raw object's bytes are exactly what its producer wrote: a `put_raw` fill, a task's
//! returned bytes (`RemoteFunction::invoke`), an actor method's. The binding chooses the
//! encoding (Python: pickle protocol 5 with out-of-band buffers). Reading returns
//! [`ObjectBytes`], a view of the node's shared memory for stored objects (no copy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::{IonetError, IonetResult, ObjectId};

use crate::api::ObjectBytes;
use crate::object_ref::ObjectRef;
use crate::runtime::{self, block_on, ObjectState};

/// The value type of a raw object.
pub enum Raw {}

/// Stores `size` bytes written by `fill` (straight into shared memory above the inline
/// threshold: one copy).
pub fn put_raw(size: usize, fill: impl FnOnce(&mut [u8])) -> IonetResult<ObjectRef<Raw>> {
    put_raw_holding(size, fill, Vec::new())
}

/// [`put_raw`] of a value with the refs `holding` inside (see [`crate::collect_contained`]):
/// the object keeps them alive as long as it lives.
pub fn put_raw_holding(
    size: usize,
    fill: impl FnOnce(&mut [u8]),
    holding: Vec<ObjectRef<()>>,
) -> IonetResult<ObjectRef<Raw>> {
    let worker = runtime::current()?;
    let id = ObjectId::random();
    if size <= worker.inline_threshold {
        let mut bytes = vec![0u8; size];
        fill(&mut bytes);
        return Ok(worker.new_object_holding(id, ObjectState::Inline(Arc::new(bytes)), holding));
    }
    let stored = worker.store_value(id, fill, size as u64, true)?;
    Ok(worker.new_object_holding(id, ObjectState::Stored(stored), holding))
}

/// An object of this process holding `bytes` once `ready` completes (or its error).
pub fn pending_raw<F>(ready: F) -> IonetResult<ObjectRef<Raw>>
where
    F: std::future::Future<Output = IonetResult<Vec<u8>>> + Send + 'static,
{
    let worker = runtime::current()?;
    let id = ObjectId::random();
    let object = worker.new_object(id, ObjectState::Pending);
    let settler = worker.clone();
    worker.handle.spawn(async move {
        let state = match ready.await {
            Ok(bytes) => ObjectState::Inline(Arc::new(bytes)),
            Err(error) => ObjectState::Failed(Arc::new(error)),
        };
        settler.settle_object(&id, state);
    });
    Ok(object)
}

/// The bytes of every object, fetched concurrently (at most
/// [`GET_CONCURRENCY`](crate::api::GET_CONCURRENCY) at once); fails with the first error.
pub fn get_raw(objects: &[ObjectRef<Raw>], timeout: Option<Duration>) -> IonetResult<Vec<ObjectBytes>> {
    let worker = runtime::current()?;
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let fetches = objects.iter().map(|object| worker.fetch(object.id(), object.owner_address(), deadline));
    let fetched: Vec<_> = worker.block_on_objects(futures::StreamExt::collect(futures::StreamExt::buffered(
        futures::stream::iter(fetches),
        crate::api::GET_CONCURRENCY,
    )));
    fetched.into_iter().map(|bytes| bytes.map(ObjectBytes::whole)).collect()
}

pub use crate::blocked::BlockedGuard;
pub use crate::borrows::{borrow_decoded, collect_decoded, DecodedRefs};
pub use crate::output::name_output;

/// Marks the calling thread as waiting for objects until the guard drops: in a worker,
/// its node daemon lends the lease's CPUs to other tasks meanwhile. For a binding that
/// waits in slices (to let signals through) across several calls; `get_raw` and the
/// other waits mark themselves.
pub fn waiting_for_objects() -> Option<BlockedGuard> {
    runtime::current().ok().and_then(|worker| worker.waiting_for_objects())
}

/// Calls `callback` (on a runtime thread) once the object is ready or failed.
pub fn on_ready(object: &ObjectRef<Raw>, callback: impl FnOnce() + Send + 'static) -> IonetResult<()> {
    let worker = runtime::current()?;
    let (id, owner) = (object.id(), object.owner_address().to_string());
    let waiter = worker.clone();
    worker.handle.spawn(async move {
        let _ = waiter.resolve(id, &owner, None).await;
        callback();
    });
    Ok(())
}

/// Before a wait for `objects` (a binding's `get`): runs here those that are tasks this
/// process submitted from the running task and nobody has started (see `crate::inline`).
pub fn run_waited_tasks(objects: &[ObjectRef<Raw>]) {
    if let Ok(worker) = runtime::current() {
        crate::inline::run_waited_tasks(&worker, objects.iter().map(ObjectRef::id));
    }
}

/// [`crate::cancel`] of an untyped ref.
pub fn cancel(object: &ObjectRef<Raw>, force: bool, recursive: bool) -> IonetResult<()> {
    crate::api::cancel(object, force, recursive)
}

/// Puts a value into the control store's KV (`overwrite: false` keeps an existing one).
pub fn kv_put(namespace: &str, key: &[u8], value: Vec<u8>, overwrite: bool) -> IonetResult<bool> {
    let worker = runtime::current()?;
    block_on(async {
        let request = ionet_common::rpc::proto::gcs::KvPutRequest {
            namespace: namespace.to_string(),
            key: key.to_vec(),
            value,
            overwrite,
        };
        Ok(worker.gcs()?.kv_put(request).await?.into_inner().added)
    })
}

/// A value of the control store's KV, if present.
pub fn kv_get(namespace: &str, key: &[u8]) -> IonetResult<Option<Vec<u8>>> {
    let worker = runtime::current()?;
    block_on(async {
        let request =
            ionet_common::rpc::proto::gcs::KvGetRequest { namespace: namespace.to_string(), key: key.to_vec() };
        match worker.call_head(request, |mut gcs, request| async move { gcs.kv_get(request).await }).await {
            Ok(reply) => Ok(Some(reply.value)),
            Err(IonetError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    })
}
