//! The caller side of actors: one [`ActorClient`] per actor a process calls. Its sender
//! task takes calls in submission order, resolves their arguments, learns the actor's
//! address from the control store (waiting while it is pending or restarting), numbers
//! each call per (caller, incarnation) and sends it on one `ActorCalls` stream without
//! waiting for earlier replies; replies come back in batches. When the stream breaks, the
//! calls it left unanswered are retried on the next incarnation up to `max_task_retries`
//! (one that never reached the worker, always), else fail with `ActorDied`, or with the
//! error the actor died of (`Infeasible`).
//!
//! Each call is a task of the state API (`ACTOR_TASK`, named `Class.method`): queued
//! (or waiting for its arguments) when made, running once sent to the actor's worker,
//! then finished or failed, recorded like the tasks of `crate::submit`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::rpc::proto::gcs::{ActorInfo, ActorState, GetActorRequest, TaskState};
use ionet_common::rpc::proto::worker::{
    push_task_reply, ActorCallBatch, NumberedReply, PushActorTaskRequest, PushTaskReply,
};
use ionet_common::rpc::CoreWorkerClient;
use ionet_common::{ActorId, IonetError, IonetResult, ObjectId, TaskId};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::actor_policy::{self, AfterBreak, Delivery};
use crate::actor_rows::Followed;
use crate::object_ref::Arg;
use crate::runtime::{self, CoreWorker, ObjectState};
use crate::task_events::{Place, Tracked, Update};

/// An actor's state as its worker holds it: `&self` methods share it, `&mut self` methods
/// hold it alone; blocking methods lock it from their thread, async ones across awaits.
use crate::actor::{actor_row, ActorHandle};
pub(crate) struct ActorCall {
    pub(crate) method: Arc<str>,
    pub(crate) args: Vec<Arg>,
    pub(crate) return_id: ObjectId,
    /// The call as a task of the state API.
    pub(crate) task: Tracked,
    pub(crate) attempt: u32,
}

/// This process's side of one actor: the ordered queue of its calls.
pub(crate) struct ActorClient {
    pub(crate) queue: mpsc::UnboundedSender<ActorCall>,
    shared: Arc<SenderShared>,
}

impl ActorClient {
    /// Where the call producing `id` runs, if it was sent and not answered yet: the
    /// actor worker's address and the call's task id.
    pub(crate) fn running_call(&self, id: &ObjectId) -> Option<(String, TaskId)> {
        let current = self.shared.current.lock().unwrap_or_else(|p| p.into_inner());
        let (address, sent) = current.as_ref()?;
        let sent = sent.lock().unwrap_or_else(|p| p.into_inner());
        let task_id = sent.calls.values().find(|(call, _)| call.return_id == *id)?.0.task.task_id;
        Some((address.clone(), task_id))
    }

    /// Something in this process learnt the actor's current row: a newer incarnation
    /// means every older one is gone.
    pub(crate) fn learn(&self, info: &ActorInfo) {
        self.shared.learn(info);
    }

    /// Queues a call of `method` (its first event recorded): it goes to the actor in the
    /// order made.
    pub(crate) fn submit(&self, method: &str, args: Vec<Arg>, return_id: ObjectId) {
        let worker = &self.shared.worker;
        let task = worker.task_events.admit(TaskId::random());
        let call = if task.recorded() {
            let (method, name, queued) = self.shared.names.lock().unwrap_or_else(|p| p.into_inner()).of(method);
            let call = ActorCall { method, args, return_id, task, attempt: 0 };
            let ready = crate::submit::args_ready(worker, &call.args);
            let state = if ready { TaskState::PendingNodeAssignment } else { TaskState::PendingArgsAvail };
            worker.task_events.record(call.task, state, |event| {
                event.name = Some(name.into());
                event.actor_id = Some(self.shared.actor_id.clone());
                event.reason = Some(if ready { queued } else { crate::submit::waiting_for_arguments() });
            });
            call
        } else {
            ActorCall { method: method.into(), args, return_id, task, attempt: 0 }
        };
        if let Err(mpsc::error::SendError(call)) = self.queue.send(call) {
            self.shared.fail(&call, queue_closed());
        }
    }
}

/// Why a call fails when its actor's queue is gone (this process is stopping).
fn queue_closed() -> Arc<IonetError> {
    Arc::new(IonetError::Internal("the actor's call queue is closed".into()))
}

/// The names this process's calls of one actor are listed under (`Class.method`), made
/// once a method, and why a queued call waits; by the class as the actor's row shows it
/// (a Python class's own name) once this process knows it.
struct Names {
    class: Arc<str>,
    actor: ActorId,
    by_method: HashMap<Box<str>, (Arc<str>, Arc<str>)>,
    queued: Arc<str>,
}

impl Names {
    fn new(class: &str, actor: ActorId) -> Self {
        Self { class: class.into(), actor, by_method: HashMap::new(), queued: Self::queued_text(class, actor) }
    }

    fn queued_text(class: &str, actor: ActorId) -> Arc<str> {
        format!("queued for actor {class} ({})", actor.short()).into()
    }

    /// A method's name, its calls' name and why one waits while queued.
    fn of(&mut self, method: &str) -> (Arc<str>, Arc<str>, Arc<str>) {
        let queued = self.queued.clone();
        if let Some((method, name)) = self.by_method.get(method) {
            return (method.clone(), name.clone(), queued);
        }
        let made: (Arc<str>, Arc<str>) = (method.into(), format!("{}.{method}", self.class).into());
        self.by_method.insert(method.into(), made.clone());
        (made.0, made.1, queued)
    }

    /// The class as the actor's row shows it.
    fn shown_as(&mut self, class: &str) {
        if !class.is_empty() && *self.class != *class {
            self.class = class.into();
            self.queued = Self::queued_text(class, self.actor);
            self.by_method.clear();
        }
    }
}

impl SenderShared {
    fn learn(&self, info: &ActorInfo) {
        let state = ActorState::try_from(info.state).unwrap_or(ActorState::Unspecified);
        if let Some(dead) = actor_policy::dead_through(state, info.incarnation) {
            self.broken.fetch_max(dead, Ordering::SeqCst);
        }
    }
}

/// Follows the actor's row (the process's one stream of them, `crate::actor_rows`), so
/// that calls made after a restart go to the new incarnation without first failing on
/// the old one. Ends when the actor is DEAD or its handles are gone.
async fn watch_actor(shared: std::sync::Weak<SenderShared>, mut row: watch::Receiver<Followed>) {
    // The row there already is news too (a new receiver has seen it); a row not yet seen
    // is taken even once the channel is closed (DEAD: its last row).
    row.mark_changed();
    while row.changed().await.is_ok() {
        let Some(current) = shared.upgrade() else { return };
        match &*row.borrow_and_update() {
            Followed::Row(info) => {
                current.learn(info);
                if info.state == ActorState::Dead as i32 {
                    return;
                }
            }
            Followed::Refused => return,
            Followed::Unknown => {}
        }
    }
}

/// The actor's followed row once it is ALIVE in an incarnation newer than `broken`, or
/// DEAD; `None` if the head will not follow it or the process stopped following.
async fn followed_past(row: &mut watch::Receiver<Followed>, broken: i64) -> Option<ActorInfo> {
    loop {
        match &*row.borrow_and_update() {
            Followed::Row(info)
                if info.state == ActorState::Dead as i32
                    || (info.state == ActorState::Alive as i32 && i64::from(info.incarnation) > broken) =>
            {
                return Some(ActorInfo::clone(info));
            }
            Followed::Refused => return None,
            _ => {}
        }
        row.changed().await.ok()?;
    }
}

/// The connection the sender uses: a call stream to the actor's current incarnation and
/// the caller's next sequence number in it.
struct Connection {
    incarnation: u32,
    /// The actor's node and worker (its calls' events say where they ran).
    place: Arc<Place>,
    next_sequence: u64,
    batches: mpsc::UnboundedSender<ActorCallBatch>,
    sent: Arc<Mutex<SentCalls>>,
}

/// Calls sent on a stream and not yet answered. Once the stream has ended (`closed`), the
/// reply reader has taken them over and nothing more may be added.
#[derive(Default)]
struct SentCalls {
    calls: HashMap<u64, (ActorCall, OwnedSemaphorePermit)>,
    closed: bool,
}

/// Calls one process may have in flight to one actor; more wait in the queue.
const MAX_IN_FLIGHT: usize = 1_000;

/// Calls sent in one message at most.
const MAX_BATCH: usize = 256;

struct SenderShared {
    worker: Arc<CoreWorker>,
    in_flight: Arc<Semaphore>,
    actor: ActorHandle,
    queue: mpsc::UnboundedSender<ActorCall>,
    /// The newest incarnation a send found dead (-1: none).
    broken: AtomicI64,
    /// From the actor's spec, once known.
    max_task_retries: AtomicI64,
    /// The worker address and sent calls of the current stream (read by cancels).
    current: Mutex<Option<(String, Arc<Mutex<SentCalls>>)>>,
    /// What the calls' events say: the actor, their names, why a queued call waits.
    actor_id: Arc<[u8]>,
    names: Mutex<Names>,
}

impl SenderShared {
    /// Records an event of `call` (its attempt; `fill` adds what the state says).
    fn record(&self, call: &ActorCall, state: TaskState, fill: impl FnOnce(&mut Update)) {
        self.worker.task_events.record(call.task, state, |event| {
            event.attempt = call.attempt;
            fill(event);
        });
    }

    /// Fails `call` with `error` (recorded).
    fn fail(&self, call: &ActorCall, error: Arc<IonetError>) {
        self.record(call, TaskState::Failed, |event| event.error = Some(error.to_string()));
        self.worker.settle_object(&call.return_id, ObjectState::Failed(error));
    }

    /// Whether `call`'s object was settled before its answer (its owner cancelled it):
    /// recorded as failed, cancelled.
    fn cancelled(&self, call: &ActorCall) -> bool {
        let settled = self.worker.objects.get(&call.return_id).is_some_and(|entry| entry.is_settled());
        if settled {
            self.record(call, TaskState::Failed, |event| event.error = Some("cancelled by its owner".into()));
        }
        settled
    }

    /// Settles `call` with the actor's `state` for it (recorded: finished, or failed
    /// with what; it ran for `run_us`).
    fn answered(&self, call: &ActorCall, state: ObjectState, run_us: u64) {
        if call.task.recorded() && self.cancelled(call) {
            return;
        }
        match &state {
            ObjectState::Failed(error) => {
                self.record(call, TaskState::Failed, |event| {
                    event.error = Some(error.to_string());
                    event.run_us = run_us;
                });
            }
            _ => self.record(call, TaskState::Finished, |event| event.run_us = run_us),
        }
        self.worker.settle_object(&call.return_id, state);
    }
}

impl ActorClient {
    pub(crate) fn start(worker: &Arc<CoreWorker>, actor: &ActorHandle) -> Arc<Self> {
        let (queue, calls) = mpsc::unbounded_channel();
        let shared = Arc::new(SenderShared {
            worker: worker.clone(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            actor: actor.clone(),
            queue: queue.clone(),
            broken: AtomicI64::new(-1),
            max_task_retries: AtomicI64::new(0),
            current: Mutex::new(None),
            actor_id: actor.id.to_vec().into(),
            names: Mutex::new(Names::new(
                &worker.actor_classes.get(&actor.id).map_or_else(|| actor.class.as_str().into(), |shown| shown.clone()),
                actor.id,
            )),
        });
        worker.handle.spawn(send_calls(shared.clone(), calls));
        worker.handle.spawn(watch_actor(Arc::downgrade(&shared), worker.actor_rows.follow(worker, actor.id)));
        Arc::new(ActorClient { queue, shared })
    }
}

/// How long the sender waits for an actor that is pending or restarting before asking again.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

async fn send_calls(shared: Arc<SenderShared>, mut calls: mpsc::UnboundedReceiver<ActorCall>) {
    let worker = shared.worker.clone();
    let mut connection: Option<Connection> = None;
    let mut dead: Option<Arc<IonetError>> = None;
    let mut batch: Vec<PushActorTaskRequest> = Vec::new();
    while let Some(first) = calls.recv().await {
        let mut taken = vec![first];
        while taken.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(call) => taken.push(call),
                Err(_) => break,
            }
        }
        for call in taken {
            if let Some(error) = &dead {
                shared.fail(&call, error.clone());
                continue;
            }
            if shared.cancelled(&call) {
                continue; // not sent: nobody waits for its answer
            }
            // Whatever may wait goes after the calls gathered so far are on their way: an
            // argument may be the result of one of them.
            if call.args.iter().any(|arg| matches!(arg, Arg::Ref(_))) {
                flush(&connection, &mut batch);
            }
            let waited = call.task.recorded() && !crate::submit::args_ready(&worker, &call.args);
            let args = match runtime::resolve_call_args(&worker, &call.method, &call.args).await {
                Ok(args) => args,
                Err(error) => {
                    shared.fail(&call, Arc::new(error));
                    continue;
                }
            };
            if waited {
                // Its arguments are here now: it waits for its actor.
                let queued = shared.names.lock().unwrap_or_else(|p| p.into_inner()).queued.clone();
                shared.record(&call, TaskState::PendingNodeAssignment, |event| event.reason = Some(queued));
            }
            let broken = shared.broken.load(Ordering::SeqCst);
            let usable = connection.as_ref().is_some_and(|c| {
                i64::from(c.incarnation) > broken && !c.sent.lock().unwrap_or_else(|p| p.into_inner()).closed
            });
            if !usable {
                flush(&connection, &mut batch);
                connection = None;
                match connect(&shared, broken).await {
                    Ok(Ok(fresh)) => connection = Some(fresh),
                    Ok(Err(error)) => {
                        let error = Arc::new(error);
                        shared.fail(&call, error.clone());
                        dead = Some(error);
                        continue;
                    }
                    Err(error) => {
                        shared.fail(&call, Arc::new(error));
                        continue;
                    }
                }
            }
            let permit = match shared.in_flight.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    flush(&connection, &mut batch);
                    let Ok(permit) = shared.in_flight.clone().acquire_owned().await else { return };
                    permit
                }
            };
            let current = connection.as_mut().expect("connected above");
            let sequence = current.next_sequence;
            let request = PushActorTaskRequest {
                actor_id: shared.actor.id.to_vec(),
                incarnation: current.incarnation,
                caller_id: worker.caller_id.to_vec(),
                sequence,
                method: call.method.to_string(),
                args,
                task_id: call.task.task_id.to_vec(),
                return_object_id: call.return_id.to_vec(),
                inline_threshold: worker.inline_threshold as u64,
            };
            // Named again: the class may be shown by its own name by now (a Python class's).
            let name =
                call.task.recorded().then(|| shared.names.lock().unwrap_or_else(|p| p.into_inner()).of(&call.method).1);
            // The actor again: the row says so even if the first event was dropped.
            let actor_id = call.task.recorded().then(|| shared.actor_id.clone());
            let mut sent = current.sent.lock().unwrap_or_else(|p| p.into_inner());
            if sent.closed {
                // The stream ended meanwhile: the call goes round again, to the next incarnation.
                drop(sent);
                requeue(&shared, call);
                continue;
            }
            shared.record(&call, TaskState::Running, |event| {
                event.name = name.map(Into::into);
                event.actor_id = actor_id;
                event.place = Some(current.place.clone());
            });
            sent.calls.insert(sequence, (call, permit));
            drop(sent);
            current.next_sequence += 1;
            batch.push(request);
        }
        flush(&connection, &mut batch);
    }
}

/// Sends the gathered calls as one message.
fn flush(connection: &Option<Connection>, batch: &mut Vec<PushActorTaskRequest>) {
    if batch.is_empty() {
        return;
    }
    let calls = std::mem::take(batch);
    if let Some(connection) = connection {
        // A closed stream has already handed its sent calls back for retry.
        let _ = connection.batches.send(ActorCallBatch { calls, caller_address: String::new() });
    }
}

fn requeue(shared: &SenderShared, call: ActorCall) {
    if call.task.recorded() {
        let queued = shared.names.lock().unwrap_or_else(|p| p.into_inner()).queued.clone();
        shared.record(&call, TaskState::PendingNodeAssignment, |event| event.reason = Some(queued));
    }
    if let Err(mpsc::error::SendError(call)) = shared.queue.send(call) {
        shared.fail(&call, queue_closed());
    }
}

/// Opens a call stream to the actor's worker; its reader settles the replies.
fn open_stream(
    shared: &Arc<SenderShared>,
    incarnation: u32,
    place: Arc<Place>,
    channel: ionet_common::rpc::AuthChannel,
) -> Connection {
    let (batches, outgoing) = mpsc::unbounded_channel();
    // The first batch names this process: the actor lends it refs in its replies.
    let _ = batches.send(ActorCallBatch { calls: Vec::new(), caller_address: shared.worker.address.to_string() });
    let sent = Arc::new(Mutex::new(SentCalls::default()));
    let address = place.worker_address.as_str().into();
    let reader = read_replies(shared.clone(), incarnation, address, channel, outgoing, sent.clone());
    shared.worker.handle.spawn(reader);
    Connection { incarnation, place, next_sequence: 0, batches, sent }
}

/// Settles each reply as it comes; when the stream ends, the calls still unanswered are
/// retried or failed.
async fn read_replies(
    shared: Arc<SenderShared>,
    incarnation: u32,
    address: Arc<str>,
    channel: ionet_common::rpc::AuthChannel,
    outgoing: mpsc::UnboundedReceiver<ActorCallBatch>,
    sent: Arc<Mutex<SentCalls>>,
) {
    let mut client =
        CoreWorkerClient::new(channel).max_decoding_message_size(ionet_common::rpc::DEFAULT_MAX_MESSAGE_BYTES);
    let ended = match client.actor_calls(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing)).await {
        Err(status) => status,
        Ok(response) => {
            let ended_by_worker = "the actor's worker ended the call stream";
            runtime::read_reply_batches(response.into_inner(), ended_by_worker, |replies| {
                let answered: Vec<_> = {
                    let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                    replies
                        .into_iter()
                        .map(|NumberedReply { sequence, reply }| (sent.calls.remove(&sequence), sequence, reply))
                        .collect()
                };
                for (call, sequence, reply) in answered {
                    let Some((call, permit)) = call else {
                        tracing::warn!(sequence, "a reply to a call this caller did not send");
                        continue;
                    };
                    let reply = reply.unwrap_or_default();
                    // Refs inside the value: held while the value is; refs the actor kept:
                    // lent to it (`crate::borrows`).
                    let borrows = &shared.worker.borrows;
                    borrows.settle_reply(call.return_id, &reply, &call.args, &address);
                    if shared.worker.objects.get(&call.return_id).is_none() {
                        borrows.forget_container(&call.return_id);
                    }
                    let run_us = reply.run_micros;
                    let state = reply_state(&shared, &call.method, reply);
                    shared.answered(&call, state, run_us);
                    drop((call, permit)); // releases argument refs and the in-flight slot
                }
            })
            .await
        }
    };
    let unanswered = {
        let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.closed = true;
        std::mem::take(&mut sent.calls)
    };
    if unanswered.is_empty() {
        return; // the caller let go of the stream: nothing was lost
    }
    // The worker is gone (or no longer hosts this incarnation).
    shared.broken.fetch_max(i64::from(incarnation), Ordering::SeqCst);
    let mut unanswered: Vec<_> = unanswered.into_iter().collect();
    unanswered.sort_by_key(|(sequence, _)| *sequence);
    let retries = shared.max_task_retries.load(Ordering::SeqCst);
    let mut cause: Option<String> = None;
    let delivery = if actor_policy::never_delivered(&ended) { Delivery::Never } else { Delivery::Maybe };
    for (_, (mut call, permit)) in unanswered {
        drop(permit);
        if let AfterBreak::Resend { attempt } = actor_policy::after_break(delivery, call.attempt, retries) {
            call.attempt = attempt;
            requeue(&shared, call);
            continue;
        }
        if cause.is_none() {
            cause = Some(death_cause(&shared, incarnation).await);
        }
        let cause = cause.as_deref().unwrap_or_default();
        let error = IonetError::ActorDied(format!("{cause}; call {} was lost ({})", call.method, ended.message()));
        shared.fail(&call, Arc::new(error));
    }
}

/// Why the actor died, if the control store knows by now.
async fn death_cause(shared: &SenderShared, incarnation: u32) -> String {
    let request = GetActorRequest {
        actor_id: shared.actor.id.to_vec(),
        wait_newer_than: i64::from(incarnation),
        timeout_ms: 2_000,
    };
    let known = match shared.worker.gcs() {
        Ok(mut gcs) => match gcs.get_actor(request).await {
            Ok(reply) => reply.into_inner().actor.map(|info| death_message(&shared.actor, &info)),
            Err(_) => None,
        },
        Err(_) => None,
    };
    known.unwrap_or_else(|| format!("actor {} ({}) died", shared.actor.id.short(), shared.actor.class))
}

fn reply_state(shared: &SenderShared, method: &str, reply: PushTaskReply) -> ObjectState {
    match reply.result {
        Some(push_task_reply::Result::Inline(bytes)) => ObjectState::Inline(Arc::new(bytes)),
        Some(push_task_reply::Result::Stored(stored)) => ObjectState::Stored(stored),
        Some(push_task_reply::Result::Failure(failure)) => {
            let function = format!("{}.{}", shared.actor.class, failure.function_name);
            ObjectState::Failed(Arc::new(crate::task::task_failed(function, failure)))
        }
        None => ObjectState::Failed(Arc::new(IonetError::Internal(format!("empty reply to {method}")))),
    }
}

/// Waits until the actor runs in an incarnation newer than `broken`. `Ok(Err(error))`: it
/// is dead, and calls fail with `error`.
async fn connect(shared: &Arc<SenderShared>, broken: i64) -> IonetResult<Result<Connection, IonetError>> {
    let worker = &shared.worker;
    let mut row = worker.actor_rows.follow(worker, shared.actor.id);
    loop {
        // The followed row once it says where to go; else (no stream open, the head will
        // not follow the actor, or nothing for a while: the actor pending long) the head's
        // answer to a long poll, which also gives the error of an actor it will not follow.
        let followed = if worker.actor_rows.is_open() {
            tokio::time::timeout(CONNECT_WAIT, followed_past(&mut row, broken)).await.ok().flatten()
        } else {
            None
        };
        let info = match followed {
            Some(info) => info,
            None => {
                let request = GetActorRequest {
                    actor_id: shared.actor.id.to_vec(),
                    wait_newer_than: broken,
                    timeout_ms: CONNECT_WAIT.as_millis() as u64,
                };
                let reply = worker.call_head(request, |mut gcs, request| async move { gcs.get_actor(request).await });
                actor_row(reply.await?.actor)?
            }
        };
        let spec = info.spec.clone().unwrap_or_default();
        shared.max_task_retries.store(i64::from(spec.max_task_retries), Ordering::SeqCst);
        shared.names.lock().unwrap_or_else(|p| p.into_inner()).shown_as(&spec.display_class);
        match ActorState::try_from(info.state).unwrap_or(ActorState::Unspecified) {
            ActorState::Dead => return Ok(Err(death_error(&shared.actor, &info))),
            ActorState::Alive if i64::from(info.incarnation) > broken => {
                let channel = worker.channel(&info.address)?;
                let place = Arc::new(Place { node_id: info.node_id.clone(), worker_address: info.address.clone() });
                let connection = open_stream(shared, info.incarnation, place, channel);
                *shared.current.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((info.address.clone(), connection.sent.clone()));
                return Ok(Ok(connection));
            }
            _ => continue,
        }
    }
}

/// The error calls on a dead actor fail with: the one it died of when it has a kind of
/// its own (infeasible), else `ActorDied` with its cause.
fn death_error(actor: &ActorHandle, info: &ActorInfo) -> IonetError {
    let message = death_message(actor, info);
    match info.death_error.clone().and_then(ionet_common::rpc::status::error_of) {
        Some(IonetError::Infeasible(_)) => IonetError::Infeasible(message),
        _ => IonetError::ActorDied(message),
    }
}

fn death_message(actor: &ActorHandle, info: &ActorInfo) -> String {
    let cause = if info.death_cause.is_empty() { "cause unknown" } else { info.death_cause.as_str() };
    format!("actor {} ({}) is dead: {cause}", actor.id.short(), actor.class)
}
