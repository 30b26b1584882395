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
    Ok(worker.new_object(ObjectId::random(), ObjectState::Inline(std::sync::Arc::new(bytes))))
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
