//! `get`, `put` and `wait`: reading and writing objects from synchronous code.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use ionet_common::{IonetError, IonetResult, ObjectId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::object_ref::ObjectRef;
use crate::runtime::{self, block_on, ObjectState};
use crate::task;

/// Stores `value` in the cluster; this process owns it.
pub fn put<T: Serialize>(value: &T) -> IonetResult<ObjectRef<T>> {
    let worker = runtime::current()?;
    let bytes = task::encode_value(value).map_err(IonetError::InvalidArgument)?;
    let id = ObjectId::random();
    if bytes.len() <= worker.inline_threshold {
        return Ok(worker.new_object(id, ObjectState::Inline(std::sync::Arc::new(bytes))));
    }
    let stored = worker.store_value(id, |buffer| buffer.copy_from_slice(&bytes), bytes.len() as u64)?;
    Ok(worker.new_object(id, ObjectState::Stored(stored)))
}

/// Stores an Arrow record batch as Arrow IPC in this node's shared-memory store.
pub fn put_record_batch(batch: &arrow_array::RecordBatch) -> IonetResult<ObjectRef<arrow_array::RecordBatch>> {
    let worker = runtime::current()?;
    let bytes = ionet_object_store::encode_record_batch(batch)
        .map_err(|err| IonetError::InvalidArgument(format!("cannot encode the record batch as Arrow IPC: {err}")))?;
    let id = ObjectId::random();
    let stored = worker.store_value(id, |buffer| buffer.copy_from_slice(&bytes), bytes.len() as u64)?;
    Ok(worker.new_object(id, ObjectState::Stored(stored)))
}

/// Reads a record batch stored by [`put_record_batch`]; its column buffers point into
/// the shared-memory mapping (no copy on this node).
pub fn get_record_batch(object: &ObjectRef<arrow_array::RecordBatch>) -> IonetResult<arrow_array::RecordBatch> {
    let worker = runtime::current()?;
    match block_on(worker.fetch(object.id(), object.owner_address(), None))? {
        crate::object_store::Bytes::Mapped(view) => {
            ionet_object_store::decode_record_batch(&view).map_err(IonetError::from)
        }
        crate::object_store::Bytes::Owned(_) => {
            Err(IonetError::InvalidArgument(format!("object {} is not a stored record batch", object.id().short())))
        }
    }
}

/// The value of `object`, waiting for it as long as it takes.
pub fn get<T: DeserializeOwned>(object: &ObjectRef<T>) -> IonetResult<T> {
    get_with_deadline(object, None)
}

/// The value of `object`, or a timeout error after `timeout`.
pub fn get_timeout<T: DeserializeOwned>(object: &ObjectRef<T>, timeout: Duration) -> IonetResult<T> {
    get_with_deadline(object, Some(Instant::now() + timeout))
}

fn get_with_deadline<T: DeserializeOwned>(object: &ObjectRef<T>, deadline: Option<Instant>) -> IonetResult<T> {
    let worker = runtime::current()?;
    let bytes = block_on(worker.fetch(object.id(), object.owner_address(), deadline))?;
    task::decode_value(&bytes).map_err(IonetError::InvalidArgument)
}

/// The values of all `objects`, in order.
pub fn get_all<T: DeserializeOwned>(objects: &[ObjectRef<T>]) -> IonetResult<Vec<T>> {
    let worker = runtime::current()?;
    let all = block_on(futures::future::join_all(
        objects.iter().map(|object| worker.fetch(object.id(), object.owner_address(), None)),
    ));
    all.into_iter().map(|bytes| task::decode_value(&bytes?).map_err(IonetError::InvalidArgument)).collect()
}

/// Waits until `num_returns` of `objects` are ready (or `timeout` passes); returns the
/// ready ones and the rest, each in their input order, as Ray's `wait`.
pub fn wait<T>(
    objects: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> IonetResult<(Vec<ObjectRef<T>>, Vec<ObjectRef<T>>)> {
    if num_returns > objects.len() {
        return Err(IonetError::InvalidArgument(format!(
            "num_returns {num_returns} exceeds the {} refs given",
            objects.len()
        )));
    }
    let worker = runtime::current()?;
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let ready_flags = block_on(async {
        let mut ready = vec![false; objects.len()];
        let mut pending: FuturesUnordered<_> = objects
            .iter()
            .enumerate()
            .map(|(index, object)| {
                let worker = worker.clone();
                async move { (index, worker.resolve(object.id(), object.owner_address(), deadline).await) }
            })
            .collect();
        let mut count = 0;
        while count < num_returns {
            match pending.next().await {
                Some((index, Ok(_))) | Some((index, Err(IonetError::ObjectLost(_)))) => {
                    ready[index] = true;
                    count += 1;
                }
                Some((_, Err(IonetError::Timeout(_)))) | None => break,
                Some((index, Err(_))) => {
                    ready[index] = true;
                    count += 1;
                }
            }
        }
        ready
    });
    let (mut done, mut rest) = (Vec::new(), Vec::new());
    for (object, is_ready) in objects.iter().zip(ready_flags) {
        if is_ready {
            done.push(object.clone());
        } else {
            rest.push(object.clone());
        }
    }
    Ok((done, rest))
}

/// The cluster's nodes, alive and dead, as the control store records them (Ray's `nodes()`).
pub fn nodes() -> IonetResult<Vec<ionet_common::rpc::proto::common::NodeInfo>> {
    let worker = runtime::current()?;
    block_on(async {
        let mut gcs = ionet_common::rpc::gcs_client(&worker.gcs_address, &worker.token).await?;
        let request = ionet_common::rpc::proto::gcs::GetAllNodesRequest { include_dead: true };
        Ok(gcs.get_all_nodes(request).await?.into_inner().nodes)
    })
}
