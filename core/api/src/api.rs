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
    let (encoded, holding) = crate::object_ref::collect_contained(|| task::encode_value(value));
    let bytes = encoded.map_err(IonetError::InvalidArgument)?;
    let id = ObjectId::random();
    if bytes.len() <= worker.inline_threshold {
        return Ok(worker.new_object_holding(id, ObjectState::Inline(std::sync::Arc::new(bytes)), holding));
    }
    let stored = worker.store_value(id, |buffer| buffer.copy_from_slice(&bytes), bytes.len() as u64, true)?;
    Ok(worker.new_object_holding(id, ObjectState::Stored(stored), holding))
}

/// Stores an Arrow record batch as Arrow IPC in this node's shared-memory store.
pub fn put_record_batch(batch: &arrow_array::RecordBatch) -> IonetResult<ObjectRef<arrow_array::RecordBatch>> {
    let worker = runtime::current()?;
    let bytes = ionet_object_store::encode_record_batch(batch)
        .map_err(|err| IonetError::InvalidArgument(format!("cannot encode the record batch as Arrow IPC: {err}")))?;
    let id = ObjectId::random();
    let stored = worker.store_value(id, |buffer| buffer.copy_from_slice(&bytes), bytes.len() as u64, true)?;
    Ok(worker.new_object(id, ObjectState::Stored(stored)))
}

/// Reads a record batch stored by [`put_record_batch`]; its column buffers point into
/// the shared-memory mapping (no copy on this node).
pub fn get_record_batch(object: &ObjectRef<arrow_array::RecordBatch>) -> IonetResult<arrow_array::RecordBatch> {
    let worker = runtime::current()?;
    match worker.block_on_objects(worker.fetch(object.id(), object.owner_address(), None))? {
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
    // A get with a deadline never runs the task itself: the task could outlast it.
    if deadline.is_none() {
        crate::inline::run_waited_tasks(&worker, std::iter::once(object.id()));
    }
    if let Some(entry) = &object.entry {
        entry.spin_while_pending(deadline);
    }
    let bytes = if object.entry.as_ref().is_some_and(|entry| entry.is_settled()) {
        block_on(worker.fetch(object.id(), object.owner_address(), deadline))?
    } else {
        worker.block_on_objects(worker.fetch(object.id(), object.owner_address(), deadline))?
    };
    decode_holding(|| task::decode_value(&bytes).map_err(IonetError::InvalidArgument))
}

/// Decodes a value read by `get` (whose ref the caller still holds): the refs inside it
/// to other processes' objects are then lent to this process by their owners, so they
/// outlive the value (`crate::borrows`).
fn decode_holding<R>(decode: impl FnOnce() -> R) -> R {
    let (value, decoded) = crate::borrows::collect_decoded(decode);
    crate::borrows::borrow_decoded(decoded);
    value
}

/// Most objects one `get` of many fetches at once.
pub(crate) const GET_CONCURRENCY: usize = 1024;

/// The values of all `objects`, in order.
pub fn get_all<T: DeserializeOwned>(objects: &[ObjectRef<T>]) -> IonetResult<Vec<T>> {
    let worker = runtime::current()?;
    crate::inline::run_waited_tasks(&worker, objects.iter().map(ObjectRef::id));
    // At most GET_CONCURRENCY fetches at once, in order: a future per ref for a million
    // refs at once cost a driver 2.4 GiB.
    let all: Vec<_> = worker.block_on_objects(
        futures::stream::iter(objects.iter().map(|object| worker.fetch(object.id(), object.owner_address(), None)))
            .buffered(GET_CONCURRENCY)
            .collect(),
    );
    decode_holding(|| {
        all.into_iter().map(|bytes| task::decode_value(&bytes?).map_err(IonetError::InvalidArgument)).collect()
    })
}

/// Cancels the task or actor call producing `object` (Ray's `cancel`); this process must
/// own it. Its `get` fails with `Cancelled`. A call already running is told
/// ([`crate::is_canceled`] turns true in it); `force` kills the worker running a task
/// instead. With `recursive` the tasks it submitted are cancelled too, and theirs. An
/// object already produced is left alone.
pub fn cancel<T>(object: &ObjectRef<T>, force: bool, recursive: bool) -> IonetResult<()> {
    runtime::current()?.cancel_owned(&object.id(), force, recursive)
}

/// Waits until `num_returns` of `objects` are ready (or `timeout` passes); returns the
/// ready ones and the rest, each in their input order, as Ray's `wait`.
pub fn wait<T>(
    objects: &[ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> IonetResult<(Vec<ObjectRef<T>>, Vec<ObjectRef<T>>)> {
    let borrowed: Vec<&ObjectRef<T>> = objects.iter().collect();
    let ready_flags = wait_flags(&borrowed, num_returns, timeout)?;
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

/// [`wait`] without copying refs: which of `objects` are counted ready (exactly
/// `num_returns` of them unless the timeout passed first).
pub fn wait_flags<T>(
    objects: &[&ObjectRef<T>],
    num_returns: usize,
    timeout: Option<Duration>,
) -> IonetResult<Vec<bool>> {
    if num_returns > objects.len() {
        return Err(IonetError::InvalidArgument(format!(
            "num_returns {num_returns} exceeds the {} refs given",
            objects.len()
        )));
    }
    let worker = runtime::current()?;
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    // Fast path: enough of the objects this process owns are ready already (the common
    // case of a loop of waits over a shrinking list).
    let mut ready_here = vec![false; objects.len()];
    let mut count = 0;
    for (index, object) in objects.iter().enumerate() {
        if count == num_returns {
            break;
        }
        if worker.is_ready_here(&object.id()) {
            ready_here[index] = true;
            count += 1;
        }
    }
    if count == num_returns {
        return Ok(ready_here);
    }
    Ok(worker.block_on_objects(async {
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
    }))
}

/// The cluster's nodes, alive and dead, as the control store records them (Ray's `nodes()`).
pub fn nodes() -> IonetResult<Vec<crate::Node>> {
    let worker = runtime::current()?;
    let rows = block_on(async {
        let request = ionet_common::rpc::proto::gcs::GetAllNodesRequest { include_dead: true, ..Default::default() };
        let reply = worker.call_head(request, |mut gcs, request| async move { gcs.get_all_nodes(request).await });
        Ok::<_, IonetError>(reply.await?.nodes)
    })?;
    rows.into_iter().map(crate::Node::try_from).collect()
}

/// Bytes of an object, borrowed from the node's shared-memory store when the object
/// lives there (no copy), or from the owner's memory.
pub struct ObjectBytes {
    bytes: crate::object_store::Bytes,
    offset: usize,
}

impl ObjectBytes {
    /// All of an object's bytes.
    pub(crate) fn whole(bytes: crate::object_store::Bytes) -> Self {
        ObjectBytes { bytes, offset: 0 }
    }
}

impl std::ops::Deref for ObjectBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.offset..]
    }
}

/// The header bincode (standard configuration) writes before a `Vec<u8>`'s bytes: its
/// length as a variable-length integer. Writing it ourselves lets a byte buffer go into
/// the store with a single copy, and still decode as a `Vec<u8>`.
fn byte_vec_header(len: usize) -> Vec<u8> {
    let len = len as u64;
    let mut header = Vec::with_capacity(9);
    if len < 251 {
        header.push(len as u8);
    } else if len <= u64::from(u16::MAX) {
        header.push(251);
        header.extend_from_slice(&(len as u16).to_le_bytes());
    } else if len <= u64::from(u32::MAX) {
        header.push(252);
        header.extend_from_slice(&(len as u32).to_le_bytes());
    } else {
        header.push(253);
        header.extend_from_slice(&len.to_le_bytes());
    }
    header
}

/// Stores a byte buffer with one copy (straight into shared memory when large); reads
/// back as a `Vec<u8>` with [`get`], or without copying with [`get_bytes`].
pub fn put_bytes(data: &[u8]) -> IonetResult<ObjectRef<Vec<u8>>> {
    let worker = runtime::current()?;
    let header = byte_vec_header(data.len());
    let id = ObjectId::random();
    let size = header.len() + data.len();
    if size <= worker.inline_threshold {
        let mut bytes = header;
        bytes.extend_from_slice(data);
        return Ok(worker.new_object(id, ObjectState::Inline(std::sync::Arc::new(bytes))));
    }
    let stored = worker.store_value(
        id,
        |buffer| {
            buffer[..header.len()].copy_from_slice(&header);
            buffer[header.len()..].copy_from_slice(data);
        },
        size as u64,
        true,
    )?;
    Ok(worker.new_object(id, ObjectState::Stored(stored)))
}

/// The bytes of a `Vec<u8>` object without copying them (a view of the store's mapping
/// for large objects).
pub fn get_bytes(object: &ObjectRef<Vec<u8>>) -> IonetResult<ObjectBytes> {
    let worker = runtime::current()?;
    let bytes = worker.block_on_objects(worker.fetch(object.id(), object.owner_address(), None))?;
    let (len, offset) = match bytes.first() {
        Some(&small) if small < 251 => (small as usize, 1),
        Some(251) if bytes.len() >= 3 => (u16::from_le_bytes([bytes[1], bytes[2]]) as usize, 3),
        Some(252) if bytes.len() >= 5 => (u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize, 5),
        Some(253) if bytes.len() >= 9 => (u64::from_le_bytes(bytes[1..9].try_into().unwrap()) as usize, 9),
        _ => return Err(IonetError::InvalidArgument(format!("object {} is not a byte vector", object.id().short()))),
    };
    if bytes.len() != offset + len {
        return Err(IonetError::InvalidArgument(format!(
            "object {} holds {} bytes, not a byte vector of {len}",
            object.id().short(),
            bytes.len()
        )));
    }
    Ok(ObjectBytes { bytes, offset })
}

#[cfg(test)]
mod tests {
    use super::byte_vec_header;

    #[test]
    fn byte_vec_header_matches_bincode() {
        for len in [0usize, 1, 250, 251, 65_535, 65_536, 5_000_000] {
            let data = vec![3u8; len];
            let encoded = crate::task::encode_value(&data).unwrap();
            let mut ours = byte_vec_header(len);
            ours.extend_from_slice(&data);
            assert_eq!(ours, encoded, "length {len}");
        }
    }
}
