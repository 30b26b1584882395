//! Generator tasks: a task that yields items, each an object its caller owns, consumed
//! while the task still runs (Ray's `num_returns="streaming"`), with backpressure.
//!
//! ```ignore
//! #[ionet::remote]
//! fn count(n: u64, sink: ionet::GeneratorSink<u64>) -> u64 {
//!     for i in 0..n { sink.send(&i).unwrap(); }
//!     n
//! }
//! let items = ionet::stream(|sink| count::remote(10u64, sink))?;
//! for item in items { println!("{}", ionet::get(&item?)?); }
//! ```
//!
//! Protocol: the caller opens a stream (an id in its `generators` table) and passes the
//! task a [`GeneratorSink`] naming itself and the id. The task sends its items with
//! `ReportGeneratorItem` to the caller, numbered from 0, one report at a time, each with
//! every item yielded while the previous one was on its way; the caller makes each an
//! object it owns (the value inline, or the location in the producing node's store) and
//! answers once the consumer is within `backpressure` items of the last, with the index
//! below which the producer may go on without waiting. So a fast producer neither waits
//! for a round trip per item nor runs past a slow consumer; before the task returns, its
//! last report is answered ([`flush_stream`]). Items are kept by index: a retried task that sends them again changes
//! nothing. The stream ends when the task's own return object settles: every item was
//! acknowledged before the task returned. If the task failed, the consumer gets its error
//! after the items it sent. Dropping the consumer closes the stream: later sends answer
//! "closed" and the producer stops.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::rpc::proto::worker::{generator_item, GeneratorItem, ReportGeneratorItemRequest};
use ionet_common::rpc::CoreWorkerClient;
use ionet_common::{IonetError, IonetResult, ObjectId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::object_ref::ObjectRef;
use crate::runtime::{self, CoreWorker, ObjectState};

/// Items a producer may run ahead of its consumer by default.
pub const DEFAULT_BACKPRESSURE: u64 = 1024;

/// The caller's side of one stream: the items so far, and how far the consumer read.
pub(crate) struct GeneratorState {
    items: Mutex<Vec<ObjectRef<()>>>,
    /// Items the consumer has taken.
    taken: AtomicU64,
    backpressure: u64,
    changed: Notify,
}

impl GeneratorState {
    /// Records consecutive `items` (ignoring those already recorded), then waits until the
    /// consumer is within `backpressure` of the last. `None`: the stream is closed; else
    /// the index below which the producer may send without waiting.
    pub(crate) async fn report(
        self: &Arc<Self>,
        worker: &CoreWorker,
        id: &ObjectId,
        items: Vec<(u64, ObjectState)>,
    ) -> IonetResult<Option<u64>> {
        let Some(last) = items.last().map(|(index, _)| *index) else {
            return Ok(worker.generators.contains_key(id).then(|| self.allowed_until()));
        };
        {
            let mut recorded_items = self.items.lock().unwrap_or_else(|p| p.into_inner());
            for (index, value) in items {
                let recorded = recorded_items.len() as u64;
                if index > recorded {
                    return Err(IonetError::InvalidArgument(format!(
                        "generator item {index} came before item {recorded} of stream {}",
                        id.short()
                    )));
                }
                if index == recorded {
                    recorded_items.push(worker.new_object(ObjectId::random(), value));
                }
            }
        }
        self.changed.notify_waiters();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !worker.generators.contains_key(id) {
                return Ok(None);
            }
            if last < self.allowed_until() {
                return Ok(Some(self.allowed_until()));
            }
            // Woken when the consumer takes an item or closes the stream.
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }

    /// Items numbered below this are within the backpressure of the consumer's position.
    fn allowed_until(&self) -> u64 {
        self.taken.load(Ordering::SeqCst) + self.backpressure
    }
}

/// Where a generator task sends its items: the caller's address and the stream's id.
/// Serialisable: pass it to the task as an argument.
#[derive(Serialize, Deserialize)]
pub struct GeneratorSink<T> {
    owner: String,
    id: ObjectId,
    #[serde(skip)]
    next: AtomicU64,
    #[serde(skip)]
    _item: PhantomData<fn(T)>,
}

impl<T> Drop for GeneratorSink<T> {
    /// The producer's sink goes with its task: every item it sent reaches the consumer
    /// before the task's own value does (the caller's copy, which sent nothing, does nothing).
    fn drop(&mut self) {
        if self.next.load(Ordering::SeqCst) > 0 {
            let _ = flush_stream(&self.id);
        }
    }
}

impl<T: Serialize> GeneratorSink<T> {
    /// Sends the next item, waiting while the consumer is too far behind. `Ok(false)`:
    /// the consumer is gone, so the producer may stop.
    pub fn send(&self, item: &T) -> IonetResult<bool> {
        let bytes = crate::task::encode_value(item).map_err(IonetError::InvalidArgument)?;
        let index = self.next.fetch_add(1, Ordering::SeqCst);
        send_item(&self.owner, &self.id, index, bytes)
    }
}

/// Sends item `index` of stream `id` to its owner (see the module protocol); large
/// values go to this node's store first. Returns at once while the consumer's last
/// answer allows the item; else waits for an answer that does. `Ok(false)`: the stream is
/// closed. The producer calls [`flush_stream`] before it returns.
pub fn send_item(owner: &str, id: &ObjectId, index: u64, bytes: Vec<u8>) -> IonetResult<bool> {
    let worker = runtime::current()?;
    let value = if bytes.len() <= worker.inline_threshold {
        generator_item::Value::Inline(bytes)
    } else {
        let size = bytes.len() as u64;
        let stored = worker.store_value(ObjectId::random(), |buffer| buffer.copy_from_slice(&bytes), size, false)?;
        generator_item::Value::Stored(stored)
    };
    let outgoing = worker
        .outgoing_streams
        .entry(*id)
        .or_insert_with(|| Arc::new(Outgoing { owner: owner.to_string(), ..Outgoing::default() }))
        .clone();
    {
        let mut sending = outgoing.sending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = sending.verdict() {
            return answer;
        }
        sending.queued.push(GeneratorItem { index, value: Some(value) });
        if !sending.in_flight {
            sending.in_flight = true;
            worker.handle.spawn(send_reports(worker.clone(), *id, outgoing.clone()));
        }
        if index < sending.allowed_until {
            return Ok(true);
        }
    }
    // Past what the consumer allowed: wait for an answer (lending the CPU meanwhile).
    worker
        .block_on_objects(outgoing.wait_until(|sending| sending.verdict().is_some() || index < sending.allowed_until));
    let verdict = outgoing.sending.lock().unwrap_or_else(|p| p.into_inner()).verdict();
    verdict.unwrap_or(Ok(true))
}

/// Waits until every item this process sent on stream `id` has reached its consumer (a
/// generator task calls it before it returns: its stream ends with it). `Ok(false)`: the
/// stream was closed.
pub fn flush_stream(id: &ObjectId) -> IonetResult<bool> {
    let worker = runtime::current()?;
    let Some((_, outgoing)) = worker.outgoing_streams.remove(id) else { return Ok(true) };
    worker.block_on_objects(outgoing.wait_until(|sending| !sending.in_flight));
    let verdict = outgoing.sending.lock().unwrap_or_else(|p| p.into_inner()).verdict();
    verdict.unwrap_or(Ok(true))
}

/// The producer's side of one stream: items waiting to go, and what the consumer said.
#[derive(Default)]
pub(crate) struct Outgoing {
    owner: String,
    sending: Mutex<Sending>,
    changed: Notify,
}

#[derive(Default)]
struct Sending {
    /// Items waiting for the report on its way to answer.
    queued: Vec<GeneratorItem>,
    /// A report is on its way (its task sends what queued meanwhile next).
    in_flight: bool,
    /// Items numbered below this go without waiting (from the consumer's last answer).
    allowed_until: u64,
    closed: bool,
    failed: Option<String>,
}

impl Sending {
    /// How every later send ends, once the stream is closed or unreachable.
    fn verdict(&self) -> Option<IonetResult<bool>> {
        if let Some(why) = &self.failed {
            return Some(Err(IonetError::Unavailable(why.clone())));
        }
        self.closed.then_some(Ok(false))
    }
}

impl Outgoing {
    async fn wait_until(&self, done: impl Fn(&Sending) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.sending.lock().unwrap_or_else(|p| p.into_inner())) {
                return;
            }
            changed.await;
        }
    }
}

/// Sends a stream's queued items to its consumer, a report at a time, each with every
/// item queued while the previous one was on its way, until none is left.
async fn send_reports(worker: Arc<CoreWorker>, id: ObjectId, outgoing: Arc<Outgoing>) {
    loop {
        let items = {
            let mut sending = outgoing.sending.lock().unwrap_or_else(|p| p.into_inner());
            if sending.queued.is_empty() || sending.verdict().is_some() {
                sending.in_flight = false;
                sending.queued.clear();
                drop(sending);
                outgoing.changed.notify_waiters();
                return;
            }
            std::mem::take(&mut sending.queued)
        };
        let request = ReportGeneratorItemRequest { generator_id: id.to_vec(), items };
        let answer = async {
            let mut client = CoreWorkerClient::new(worker.channel(&outgoing.owner)?);
            Ok::<_, IonetError>(client.report_generator_item(request).await?.into_inner())
        }
        .await;
        {
            let mut sending = outgoing.sending.lock().unwrap_or_else(|p| p.into_inner());
            match answer {
                Ok(reply) if reply.closed => sending.closed = true,
                Ok(reply) => sending.allowed_until = sending.allowed_until.max(reply.allowed_until),
                Err(error) => {
                    sending.failed = Some(format!(
                        "the consumer of stream {} at {} is unreachable: {error}",
                        id.short(),
                        outgoing.owner
                    ))
                }
            }
        }
        outgoing.changed.notify_waiters();
    }
}

/// The consumer of a stream: yields each item's ref as it arrives, then the task's error
/// if it failed. Dropping it closes the stream.
pub struct ObjectRefGenerator<T> {
    id: ObjectId,
    state: Arc<GeneratorState>,
    /// The producing task's return object: settled once every item has been sent.
    task: ObjectRef<()>,
    position: usize,
    finished: bool,
    _item: PhantomData<fn() -> T>,
}

/// Opens a stream and starts its producer: `submit` gets the sink and submits the task
/// that fills it (returning that task's ref).
pub fn stream<T, R>(submit: impl FnOnce(GeneratorSink<T>) -> ObjectRef<R>) -> IonetResult<ObjectRefGenerator<T>> {
    stream_with_backpressure(DEFAULT_BACKPRESSURE, submit)
}

/// [`stream`] letting the producer run at most `backpressure` items ahead of the consumer.
pub fn stream_with_backpressure<T, R>(
    backpressure: u64,
    submit: impl FnOnce(GeneratorSink<T>) -> ObjectRef<R>,
) -> IonetResult<ObjectRefGenerator<T>> {
    let (id, owner, state) = open(backpressure)?;
    let sink = GeneratorSink { owner, id, next: AtomicU64::new(0), _item: PhantomData };
    let task = crate::inline::kept_apart(|| submit(sink)).erase();
    Ok(ObjectRefGenerator { id, state, task, position: 0, finished: false, _item: PhantomData })
}

/// Opens a stream in this process: its id, this process's address, and its state.
pub(crate) fn open(backpressure: u64) -> IonetResult<(ObjectId, String, Arc<GeneratorState>)> {
    let worker = runtime::current()?;
    let id = ObjectId::random();
    let state = Arc::new(GeneratorState {
        items: Mutex::new(Vec::new()),
        taken: AtomicU64::new(0),
        backpressure: backpressure.max(1),
        changed: Notify::new(),
    });
    worker.generators.insert(id, state.clone());
    Ok((id, worker.address.to_string(), state))
}

/// For bindings that keep the consumer themselves: opens a stream in this process and
/// returns its id and this process's address (what the producer's sink names).
pub fn open_stream(backpressure: u64) -> IonetResult<(ObjectId, String)> {
    open(backpressure).map(|(id, owner, _)| (id, owner))
}

/// For bindings: item `position` of stream `id` produced by `task` (see
/// [`ObjectRefGenerator`] for what each answer means).
pub fn next_of_stream<T>(
    id: &ObjectId,
    task: &ObjectRef<T>,
    position: usize,
    timeout: Option<Duration>,
) -> Option<IonetResult<ObjectRef<T>>> {
    let state = match runtime::current() {
        Ok(worker) => worker.generators.get(id).map(|state| state.clone()),
        Err(err) => return Some(Err(err)),
    };
    let Some(state) = state else {
        return Some(Err(IonetError::NotFound(format!("stream {} is closed", id.short()))));
    };
    next_item(&state, task, position, timeout).map(|item| item.map(ObjectRef::retype))
}

/// Closes a stream this process opened (later sends answer "closed").
pub fn close_stream(id: &ObjectId) {
    close(id)
}

/// Closes a stream this process opened (later sends answer "closed").
pub(crate) fn close(id: &ObjectId) {
    if let Ok(worker) = runtime::current() {
        if let Some((_, state)) = worker.generators.remove(id) {
            state.changed.notify_waiters();
        }
    }
}

/// The next item of stream `state`, waiting for it: `Some(Ok(item))`, `Some(Err(..))` once
/// if the task failed, `None` at the end. `timeout`: `Err(Timeout)` if nothing came.
pub(crate) fn next_item<R>(
    state: &GeneratorState,
    task: &ObjectRef<R>,
    position: usize,
    timeout: Option<Duration>,
) -> Option<IonetResult<ObjectRef<()>>> {
    let worker = match runtime::current() {
        Ok(worker) => worker,
        Err(err) => return Some(Err(err)),
    };
    let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
    let taken = |item: ObjectRef<()>| {
        state.taken.fetch_max(position as u64 + 1, Ordering::SeqCst);
        state.changed.notify_waiters();
        Some(Ok(item))
    };
    if let Some(item) = state.items.lock().unwrap_or_else(|p| p.into_inner()).get(position).cloned() {
        return taken(item);
    }
    worker.block_on_objects(async {
        loop {
            let changed = state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(item) = state.items.lock().unwrap_or_else(|p| p.into_inner()).get(position).cloned() {
                return taken(item);
            }
            if let Some(entry) = &task.entry {
                if entry.is_settled() {
                    // Every item was acknowledged before the task answered: none is coming.
                    if let Some(item) = state.items.lock().unwrap_or_else(|p| p.into_inner()).get(position).cloned() {
                        return taken(item);
                    }
                    return match entry.state() {
                        ObjectState::Failed(error) => Some(Err(ionet_common::rpc::status::copy_of(&error))),
                        _ => None,
                    };
                }
                let mut settled = entry.subscribe();
                let ended = settled.wait_for(|state| !state.is_pending());
                let wait = async {
                    tokio::select! {
                        _ = changed.as_mut() => {}
                        _ = ended => {}
                    }
                };
                match deadline {
                    Some(deadline) => {
                        if tokio::time::timeout_at(deadline, wait).await.is_err() {
                            return Some(Err(IonetError::Timeout("no generator item within the timeout".into())));
                        }
                    }
                    None => wait.await,
                }
            } else {
                return Some(Err(IonetError::InvalidArgument("a stream's task must be owned by its consumer".into())));
            }
        }
    })
}

impl<T> ObjectRefGenerator<T> {
    /// The next item, waiting at most `timeout`: `Err(Timeout)` if none came by then.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<IonetResult<ObjectRef<T>>> {
        self.advance(Some(timeout))
    }

    /// The producing task's return value's ref (untyped: see [`Self::task_as`]).
    pub fn task(&self) -> &ObjectRef<()> {
        &self.task
    }

    /// The producing task's return value's ref, as the type `R` the task returns.
    pub fn task_as<R>(&self) -> ObjectRef<R> {
        self.task.clone().retype()
    }

    fn advance(&mut self, timeout: Option<Duration>) -> Option<IonetResult<ObjectRef<T>>> {
        if self.finished {
            return None;
        }
        let next = next_item(&self.state, &self.task, self.position, timeout);
        match &next {
            Some(Ok(_)) => self.position += 1,
            Some(Err(IonetError::Timeout(_))) => {}
            _ => self.finished = true,
        }
        next.map(|item| item.map(ObjectRef::retype))
    }
}

impl<T> Iterator for ObjectRefGenerator<T> {
    type Item = IonetResult<ObjectRef<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.advance(None)
    }
}

impl<T> Drop for ObjectRefGenerator<T> {
    fn drop(&mut self) {
        close(&self.id);
    }
}
