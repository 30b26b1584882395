//! The `CoreWorker` gRPC service every ionet process serves: tasks pushed to workers,
//! and owners answering for their objects.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::authz::Principal;
use ionet_common::rpc::proto::worker::core_worker_server::CoreWorker as CoreWorkerRpc;
use ionet_common::rpc::proto::worker::{
    generator_item, get_object_reply, push_task_reply, task_arg, task_failure, ActorCallBatch, BorrowObjectsReply,
    BorrowObjectsRequest, CancelTaskReply, CancelTaskRequest, CreateActorReply, CreateActorRequest, EndActorReply,
    EndActorRequest, ExitReply, ExitRequest, GetObjectReply, GetObjectRequest, ListReferencesReply,
    ListReferencesRequest, NumberedReply, PushActorTaskRequest, PushTaskReply, PushTaskRequest, ReleaseBorrowsReply,
    ReleaseBorrowsRequest, ReplyBatch, ReportGeneratorItemReply, ReportGeneratorItemRequest, ReturnIdleLeasesReply,
    ReturnIdleLeasesRequest, TaskArg, TaskBatch, TaskFailure, WatchEvent, WatchRequest,
};
use ionet_common::{ActorId, IonetError, ObjectId, TaskId};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::actor::{self, HostedActor, MethodCall};
use crate::context;
use crate::object_store::Bytes;
use crate::runtime::{CoreWorker, Job, ObjectState};
use crate::task::{self, ArgBytes, Failure, FailureKind};

/// Reads a call's arguments (stored ones from the object store). The outer error is a
/// malformed request; the inner one an argument that could not be read.
async fn read_args(worker: &CoreWorker, args: Vec<TaskArg>) -> Result<Result<Vec<ArgBytes>, Failure>, Status> {
    let mut read = Vec::with_capacity(args.len());
    for (index, arg) in args.into_iter().enumerate() {
        match arg.value {
            Some(task_arg::Value::Inline(bytes)) => read.push(ArgBytes(Bytes::Owned(Arc::new(bytes)))),
            Some(task_arg::Value::Stored(stored)) => match worker.read_stored(&stored).await {
                Ok(bytes) => read.push(ArgBytes(bytes)),
                Err(err) => {
                    return Ok(Err(Failure::bad_arguments(format!("argument {index} could not be read: {err}"))))
                }
            },
            None => return Err(Status::invalid_argument(format!("argument {index} has no value"))),
        }
    }
    Ok(Ok(read))
}

/// Runs a call on the current thread (the executor, or a lane of a concurrent actor),
/// catching panics; large values go to this node's store and only their location travels
/// back.
#[allow(clippy::too_many_arguments)]
fn run_blocking(
    worker: &CoreWorker,
    function_name: &str,
    task_bytes: &[u8],
    task_id: Option<TaskId>,
    depth: u32,
    return_id: ObjectId,
    inline_threshold: u64,
    lend_to: Option<Lending>,
    call: impl FnOnce() -> Result<Vec<u8>, Failure>,
) -> PushTaskReply {
    let started = Instant::now();
    // A task may run inside another that waits for it (`inline`): that one resumes after.
    let (outer_task, outer_depth) = context::current_task_and_depth();
    context::set_current_task(task_id, depth);
    // A remote caller is lent the refs the value holds; refs of others' objects the call
    // decoded and this process still holds are borrowed from their owners (`crate::borrows`).
    let ((result, contained), mut decoded) = if lend_to.is_some() {
        crate::borrows::collect_decoded(|| {
            crate::object_ref::collect_contained(|| std::panic::catch_unwind(AssertUnwindSafe(call)))
        })
    } else {
        ((std::panic::catch_unwind(AssertUnwindSafe(call)), Vec::new()), Default::default())
    };
    context::set_current_task(outer_task, outer_depth);
    if let Some(task_id) = task_id {
        context::call_ended(worker, task_id);
    }
    let outcome =
        result.map(|value| value.and_then(|bytes| placed(worker, return_id, inline_threshold as usize, bytes)));
    let mut reply = reply_of(worker, function_name, task_bytes, outcome);
    if let Some(Lending { caller, decoded: decoded_before }) = lend_to {
        decoded.extend(decoded_before);
        worker.borrows.borrow_kept(decoded, &contained);
        if matches!(reply.result, Some(push_task_reply::Result::Inline(_) | push_task_reply::Result::Stored(_))) {
            reply.lent = worker.borrows.lend(contained, caller);
        }
    }
    reply.run_micros = started.elapsed().as_micros() as u64;
    worker.record_run(function_name, reply.run_micros);
    reply
}

/// Runs a task this process submitted on the calling thread, as a worker it was pushed
/// to would (see `crate::inline`), and gives the reply that worker would send.
pub(crate) fn run_task_here(
    worker: &Arc<CoreWorker>,
    function_name: &str,
    task_id: TaskId,
    depth: u32,
    return_id: ObjectId,
    inline_threshold: u64,
    args: Vec<TaskArg>,
) -> PushTaskReply {
    let task_bytes = task_id.to_vec();
    let Some(function) = task::lookup(function_name) else {
        let failure = Failure::unknown_function(format!("no remote function named {function_name} in this binary"));
        return failure_reply(worker, function_name, &task_bytes, failure);
    };
    let args = match crate::runtime::block_on(read_args(worker, args)) {
        Ok(Ok(args)) => args,
        Ok(Err(failure)) => return failure_reply(worker, function_name, &task_bytes, failure),
        Err(why) => return malformed_reply(worker, function_name, &task_bytes, why.message()),
    };
    let invoke = function.invoke;
    let call = move || invoke(args);
    run_blocking(worker, function_name, &task_bytes, Some(task_id), depth, return_id, inline_threshold, None, call)
}

/// A value inline when small, else written to this node's store.
fn placed(
    worker: &CoreWorker,
    return_id: ObjectId,
    inline_threshold: usize,
    bytes: Vec<u8>,
) -> Result<push_task_reply::Result, Failure> {
    if bytes.len() <= inline_threshold {
        return Ok(push_task_reply::Result::Inline(bytes));
    }
    let size = bytes.len() as u64;
    worker
        .store_value(return_id, |buffer| buffer.copy_from_slice(&bytes), size, false)
        .map(push_task_reply::Result::Stored)
        .map_err(|err| Failure::error(format!("the return value could not be stored: {err}")))
}

type Outcome = Result<Result<push_task_reply::Result, Failure>, Box<dyn std::any::Any + Send>>;

fn reply_of(worker: &CoreWorker, function_name: &str, task_bytes: &[u8], outcome: Outcome) -> PushTaskReply {
    match outcome {
        Ok(Ok(result)) => PushTaskReply { result: Some(result), ..Default::default() },
        Ok(Err(failure)) => failure_reply(worker, function_name, task_bytes, failure),
        Err(payload) => {
            let failure = Failure::panic(panic_message(payload.as_ref()));
            failure_reply(worker, function_name, task_bytes, failure)
        }
    }
}

/// Runs an async method on this worker's event loop (a panic is caught by its task).
async fn run_async_call(
    worker: &Arc<CoreWorker>,
    function_name: &str,
    task_bytes: &[u8],
    return_id: ObjectId,
    inline_threshold: u64,
    call: actor::MethodFuture,
) -> PushTaskReply {
    let started = Instant::now();
    let outcome: Outcome = match tokio::spawn(call).await {
        Ok(value) => {
            let store = worker.clone();
            Ok(value.and_then(|bytes| {
                // Storing a large value copies it: off the event loop's other tasks.
                tokio::task::block_in_place(|| placed(&store, return_id, inline_threshold as usize, bytes))
            }))
        }
        Err(err) if err.is_panic() => Err(err.into_panic()),
        Err(err) => Ok(Err(Failure::error(format!("the method's task was cancelled: {err}")))),
    };
    let mut reply = reply_of(worker, function_name, task_bytes, outcome);
    reply.run_micros = started.elapsed().as_micros() as u64;
    reply
}

/// Checks a pushed task and reads its arguments: the reply at once when it cannot run
/// (unknown function, unreadable or malformed arguments), else the task as a job that
/// sends its reply when done, with the name it may run in place under.
async fn prepare_task(
    worker: &Arc<CoreWorker>,
    request: PushTaskRequest,
    caller: &Arc<str>,
    replies: &ReplySender,
) -> Result<(Option<&'static str>, Job), PushTaskReply> {
    let function_name = request.function_name;
    let Some(function) = task::lookup(&function_name) else {
        let failure = Failure::unknown_function(format!("no remote function named {function_name} in this binary"));
        return Err(failure_reply(worker, &function_name, &request.task_id, failure));
    };
    let return_id = match ObjectId::from_bytes(&request.return_object_id) {
        Ok(id) => id,
        Err(why) => return Err(malformed_reply(worker, &function_name, &request.task_id, why)),
    };
    let args = match read_args(worker, request.args).await {
        Ok(Ok(args)) => args,
        Ok(Err(failure)) => return Err(failure_reply(worker, &function_name, &request.task_id, failure)),
        Err(why) => return Err(malformed_reply(worker, &function_name, &request.task_id, why.message())),
    };
    let invoke = function.invoke;
    let call = DecodedCall {
        sequence: request.sequence,
        method: function_name,
        task_id: request.task_id,
        return_id,
        threshold: request.inline_threshold,
        depth: request.depth,
        lend_to: Lending::to(caller, Default::default()),
        shown_as: function.name,
        guest: None,
    };
    let (worker, replies) = (worker.clone(), replies.clone());
    let job: Job = Box::new(move || call.run_and_reply(&worker, Box::new(move || invoke(args)), &replies));
    Ok((function.in_place.then_some(function.name), job))
}

/// The failure reply to a call the caller sent malformed.
fn malformed_reply(worker: &CoreWorker, function: &str, task_id: &[u8], why: impl std::fmt::Display) -> PushTaskReply {
    let failure = Failure::bad_arguments(format!("malformed call: {why}"));
    failure_reply(worker, function, task_id, failure)
}

/// The actor this worker hosts, if it is the one (and incarnation) the call is for.
fn hosted_actor(worker: &CoreWorker, call: &PushActorTaskRequest) -> Result<Arc<HostedActor>, Status> {
    let actor_id = ActorId::from_bytes(&call.actor_id)?;
    let Some(hosted) = worker.hosted_actor(&actor_id) else {
        return Err(Status::failed_precondition(format!(
            "this worker does not host actor {} (it ended here, or never ran here)",
            actor_id.short()
        )));
    };
    if hosted.incarnation != call.incarnation {
        return Err(Status::failed_precondition(format!(
            "this worker hosts actor {} incarnation {}, not incarnation {}",
            hosted.id.short(),
            hosted.incarnation,
            call.incarnation
        )));
    }
    Ok(hosted)
}

/// An actor call, decoded and ready to run.
struct DecodedCall {
    sequence: u64,
    method: String,
    task_id: Vec<u8>,
    return_id: ObjectId,
    threshold: u64,
    /// Its depth in a tree of tasks (actor calls: 0, so what they submit is at depth 1).
    depth: u32,
    /// The caller's lends (`crate::borrows`), when it named itself.
    lend_to: Option<Lending>,
    /// What its output is shown under (its function, or its actor's class).
    shown_as: &'static str,
    /// The guest actor it is a call of, in a shared process.
    guest: Option<(ActorId, u32)>,
}

/// What a remote caller is lent by a call, and how to tell what the call kept.
struct Lending {
    /// The caller's address: lends go to it.
    caller: Arc<str>,
    /// Refs of other processes' objects decoded for the call before it ran (an actor
    /// method's arguments): with those it decodes itself, the refs it may keep.
    decoded: crate::borrows::DecodedRefs,
}

impl Lending {
    /// Lends to `caller`; one that names no address (an older one) is lent nothing it
    /// could lose.
    fn to(caller: &Arc<str>, decoded: crate::borrows::DecodedRefs) -> Option<Lending> {
        (!caller.is_empty()).then(|| Lending { caller: caller.clone(), decoded })
    }
}

impl DecodedCall {
    /// Runs the call on this thread (see [`run_blocking`]) and sends its numbered reply.
    fn run_and_reply(self, worker: &CoreWorker, run: BlockingCall, replies: &ReplySender) {
        let task_id = TaskId::from_bytes(&self.task_id).ok();
        crate::output::name_output(self.shown_as);
        let reply = context::with_guest(self.guest, || {
            run_blocking(
                worker,
                &self.method,
                &self.task_id,
                task_id,
                self.depth,
                self.return_id,
                self.threshold,
                self.lend_to,
                run,
            )
        });
        let _ = replies.send(Ok(NumberedReply { sequence: self.sequence, reply: Some(reply) }));
    }
}

/// A blocking method call, decoded.
type BlockingCall = Box<dyn FnOnce() -> Result<Vec<u8>, Failure> + Send>;
/// Where a stream's replies go, in the order they are ready.
type ReplySender = mpsc::UnboundedSender<Result<NumberedReply, Status>>;

enum Decoded {
    /// Answered already (its arguments could not be read, or the method is unknown).
    Done(PushTaskReply),
    Blocking((DecodedCall, BlockingCall)),
    Async(DecodedCall, actor::MethodFuture),
}

/// Decodes an actor call; a malformed one is answered at once, as one whose arguments
/// cannot be read or whose method is unknown.
async fn decode_call(
    worker: &Arc<CoreWorker>,
    hosted: &HostedActor,
    call: PushActorTaskRequest,
    caller: &Arc<str>,
) -> Decoded {
    let return_id = match ObjectId::from_bytes(&call.return_object_id) {
        Ok(id) => id,
        Err(why) => return Decoded::Done(malformed_reply(worker, &call.method, &call.task_id, why)),
    };
    let args = match read_args(worker, call.args).await {
        Ok(args) => args,
        Err(why) => return Decoded::Done(malformed_reply(worker, &call.method, &call.task_id, why.message())),
    };
    let mut decoded = DecodedCall {
        sequence: call.sequence,
        return_id,
        method: call.method,
        task_id: call.task_id,
        threshold: call.inline_threshold,
        depth: 0,
        lend_to: None,
        shown_as: hosted.class.name,
        guest: hosted.is_guest().then_some((hosted.id, hosted.incarnation)),
    };
    // A Rust method decodes its arguments here, before it runs.
    let (method, revived) = crate::borrows::collect_decoded(|| {
        args.and_then(|args| (hosted.class.call)(hosted.instance.clone(), &decoded.method, args))
    });
    decoded.lend_to = Lending::to(caller, revived);
    match method {
        Ok(MethodCall::Blocking(run)) => Decoded::Blocking((decoded, run)),
        Ok(MethodCall::Async(run)) => {
            let run = context::in_guest(decoded.guest, run);
            Decoded::Async(decoded, run)
        }
        Err(failure) => Decoded::Done(failure_reply(worker, &decoded.method, &decoded.task_id, failure)),
    }
}

/// Runs a concurrent actor's blocking calls on up to `max_concurrency` blocking threads
/// ("lanes"), each taking the next call from a shared queue until none is left: a busy
/// stream wakes one thread per lane, not one per call.
fn run_in_lanes(
    worker: &Arc<CoreWorker>,
    hosted: &Arc<HostedActor>,
    calls: Vec<(DecodedCall, BlockingCall)>,
    replies: &ReplySender,
) {
    if calls.is_empty() {
        return;
    }
    let lanes = calls.len().min(hosted.max_concurrency);
    let queue = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(calls)));
    for _ in 0..lanes {
        let (worker, queue, replies, hosted) = (worker.clone(), queue.clone(), replies.clone(), hosted.clone());
        tokio::spawn(async move {
            let Ok(permit) = hosted.permits.clone().acquire_owned().await else { return };
            let _ = tokio::task::spawn_blocking(move || {
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some((call, run)) = next else { break };
                    if hosted.is_ended() {
                        break; // Ended meanwhile: its stream failed what it left.
                    }
                    call.run_and_reply(&worker, run, &replies);
                }
                drop(permit);
            })
            .await;
        });
    }
}

/// The reply stream of a call stream: each message carries every reply ready by then.
fn reply_batches(
    finished: mpsc::UnboundedReceiver<Result<NumberedReply, Status>>,
) -> impl tokio_stream::Stream<Item = Result<ReplyBatch, Status>> + Send {
    futures::stream::unfold((finished, None::<Status>), |(mut finished, failed)| async move {
        if let Some(status) = failed {
            return Some((Err(status), (finished, None)));
        }
        let mut batch = ReplyBatch::default();
        match finished.recv().await? {
            Ok(reply) => batch.replies.push(reply),
            Err(status) => return Some((Err(status), (finished, None))),
        }
        let mut failed = None;
        while failed.is_none() {
            match finished.try_recv() {
                Ok(Ok(reply)) => batch.replies.push(reply),
                Ok(Err(status)) => failed = Some(status),
                Err(_) => break,
            }
        }
        Some((Ok(batch), (finished, failed)))
    })
}

pub(crate) struct CoreWorkerService {
    pub(crate) worker: Arc<CoreWorker>,
}

fn failure_reply(worker: &CoreWorker, function: &str, task_id: &[u8], failure: Failure) -> PushTaskReply {
    let kind = match failure.kind {
        FailureKind::Error => task_failure::Kind::Error,
        FailureKind::Panic => task_failure::Kind::Panic,
        FailureKind::UnknownFunction => task_failure::Kind::UnknownFunction,
        FailureKind::BadArguments => task_failure::Kind::BadArguments,
        FailureKind::FinalError => task_failure::Kind::FinalError,
    };
    PushTaskReply {
        result: Some(push_task_reply::Result::Failure(TaskFailure {
            kind: kind as i32,
            function_name: function.to_string(),
            message: failure.message,
            node_id: worker.node_id.to_vec(),
            task_id: task_id.to_vec(),
            payload: failure.payload,
        })),
        ..Default::default()
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panicked: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panicked: {text}")
    } else {
        "panicked with a non-string payload".to_string()
    }
}

#[tonic::async_trait]
impl CoreWorkerRpc for CoreWorkerService {
    type TasksStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ReplyBatch, Status>> + Send>>;

    async fn tasks(
        &self,
        request: Request<tonic::Streaming<TaskBatch>>,
    ) -> Result<Response<Self::TasksStream>, Status> {
        if !self.worker.is_worker {
            return Err(Status::failed_precondition("this process is a driver; tasks go to leased workers"));
        }
        let mut incoming = request.into_inner();
        let worker = self.worker.clone();
        let (replies, finished) = mpsc::unbounded_channel::<Result<NumberedReply, Status>>();
        tokio::spawn(async move {
            // A leased worker runs its holder's tasks one at a time, in the order sent, on
            // its executor thread; this loop reads the next ones meanwhile.
            // The caller names itself in the stream's first batch.
            let mut caller: Arc<str> = Arc::from("");
            while let Ok(Some(batch)) = incoming.message().await {
                if !batch.caller_address.is_empty() {
                    caller = batch.caller_address.as_str().into();
                }
                for task in batch.tasks {
                    let sequence = task.sequence;
                    match prepare_task(&worker, task, &caller, &replies).await {
                        Ok((in_place_as, job)) => worker.run_in_order(in_place_as, job),
                        Err(reply) => {
                            let _ = replies.send(Ok(NumberedReply { sequence, reply: Some(reply) }));
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(reply_batches(finished))))
    }

    async fn get_object(&self, request: Request<GetObjectRequest>) -> Result<Response<GetObjectReply>, Status> {
        let request = request.into_inner();
        let id = ObjectId::from_bytes(&request.object_id)?;
        let deadline = Instant::now() + Duration::from_millis(request.timeout_ms.min(60_000));
        let result = match self.worker.resolve(id, &self.worker.address, Some(deadline)).await {
            Ok(ObjectState::Inline(bytes)) => get_object_reply::Result::Inline(bytes.to_vec()),
            Ok(ObjectState::Stored(stored)) => get_object_reply::Result::Stored(stored),
            Ok(ObjectState::Failed(error)) => {
                get_object_reply::Result::Error(ionet_common::rpc::status::detail_of(&error))
            }
            Ok(ObjectState::Pending) | Err(IonetError::Timeout(_)) => get_object_reply::Result::Pending(true),
            Err(error) => get_object_reply::Result::Unknown(error.to_string()),
        };
        Ok(Response::new(GetObjectReply { result: Some(result) }))
    }

    async fn report_generator_item(
        &self,
        request: Request<ReportGeneratorItemRequest>,
    ) -> Result<Response<ReportGeneratorItemReply>, Status> {
        let request = request.into_inner();
        let id = ObjectId::from_bytes(&request.generator_id)?;
        let mut items = Vec::with_capacity(request.items.len());
        for item in request.items {
            let value = match item.value {
                Some(generator_item::Value::Inline(bytes)) => ObjectState::Inline(Arc::new(bytes)),
                Some(generator_item::Value::Stored(stored)) => ObjectState::Stored(stored),
                None => return Err(Status::invalid_argument(format!("generator item {} has no value", item.index))),
            };
            items.push((item.index, value));
        }
        let Some(state) = self.worker.generators.get(&id).map(|state| state.clone()) else {
            return Ok(Response::new(ReportGeneratorItemReply { closed: true, allowed_until: 0 }));
        };
        let allowed_until = state.report(&self.worker, &id, items).await?;
        Ok(Response::new(ReportGeneratorItemReply {
            closed: allowed_until.is_none(),
            allowed_until: allowed_until.unwrap_or(0),
        }))
    }

    async fn cancel_task(&self, request: Request<CancelTaskRequest>) -> Result<Response<CancelTaskReply>, Status> {
        let request = request.into_inner();
        let task_id = TaskId::from_bytes(&request.task_id)?;
        // The hook may take a language's lock (Python's GIL): off the event loop.
        let worker = self.worker.clone();
        let _ = tokio::task::spawn_blocking(move || context::cancelled(&worker, task_id, request.recursive)).await;
        Ok(Response::new(CancelTaskReply {}))
    }

    async fn release_borrows(
        &self,
        request: Request<ReleaseBorrowsRequest>,
    ) -> Result<Response<ReleaseBorrowsReply>, Status> {
        let request = request.into_inner();
        if request.object_ids.len() != request.counts.len() {
            return Err(Status::invalid_argument(format!(
                "{} object ids but {} counts: each id needs its count",
                request.object_ids.len(),
                request.counts.len()
            )));
        }
        for (id, count) in request.object_ids.iter().zip(request.counts) {
            let id = ObjectId::from_bytes(id)?;
            self.worker.borrows.release(id, count, &request.borrower_address);
        }
        Ok(Response::new(ReleaseBorrowsReply {}))
    }

    async fn borrow_objects(
        &self,
        request: Request<BorrowObjectsRequest>,
    ) -> Result<Response<BorrowObjectsReply>, Status> {
        let request = request.into_inner();
        if request.borrower_address.is_empty() {
            return Err(Status::invalid_argument("a borrower must name its address: lends are given back under it"));
        }
        let ids = request.object_ids.iter().map(|id| ObjectId::from_bytes(id)).collect::<Result<Vec<_>, _>>()?;
        let lent = self.worker.borrows.lend_owned(&self.worker, &ids, &request.borrower_address);
        Ok(Response::new(BorrowObjectsReply { lent: lent.iter().map(ObjectId::to_vec).collect() }))
    }

    async fn list_references(
        &self,
        request: Request<ListReferencesRequest>,
    ) -> Result<Response<ListReferencesReply>, Status> {
        // What a process holds is its own job's to read: another job of the account (a
        // provider runs those) may not list it.
        Principal::of(&request)?.may_act_for_job(&self.worker.job_id)?;
        let limit = match request.into_inner().limit {
            0 => crate::memory::MAX_ROWS,
            limit => limit as usize,
        };
        Ok(Response::new(self.worker.references(limit)))
    }

    async fn return_idle_leases(
        &self,
        _request: Request<ReturnIdleLeasesRequest>,
    ) -> Result<Response<ReturnIdleLeasesReply>, Status> {
        let returned = self.worker.return_idle_leases(false, Duration::ZERO).await;
        Ok(Response::new(ReturnIdleLeasesReply { returned: returned as u32 }))
    }

    async fn exit(&self, request: Request<ExitRequest>) -> Result<Response<ExitReply>, Status> {
        Principal::of(&request)?.may_act_for_job(&self.worker.job_id)?;
        if self.worker.is_worker {
            let worker = self.worker.clone();
            tokio::spawn(async move {
                // What its own tasks did reaches the head first (briefly).
                worker.task_events.flush(Duration::from_millis(300)).await;
                std::process::exit(0);
            });
        }
        Ok(Response::new(ExitReply {}))
    }

    async fn create_actor(&self, request: Request<CreateActorRequest>) -> Result<Response<CreateActorReply>, Status> {
        // The head places actors here with the credential of this worker's job: another
        // job of the account may not start or end actors in this process.
        Principal::of(&request)?.may_act_for_job(&self.worker.job_id)?;
        if !self.worker.is_worker {
            return Err(Status::failed_precondition("this process is a driver; actors live in leased workers"));
        }
        let request = request.into_inner();
        let actor_id = ActorId::from_bytes(&request.actor_id)?;
        let failed = |kind, message: String| {
            let failure = TaskFailure {
                kind: kind as i32,
                function_name: request.class_name.clone(),
                message,
                node_id: self.worker.node_id.to_vec(),
                task_id: Vec::new(),
                payload: Vec::new(),
            };
            Ok(Response::new(CreateActorReply { failure: Some(failure) }))
        };
        // A worker hosts one actor of its own, or guests (a shared process), never both.
        if let Some(hosted) = self.worker.hosted.get() {
            return Err(Status::failed_precondition(format!("this worker already hosts actor {}", hosted.id.short())));
        }
        if !request.shared && !self.worker.guests.is_empty() {
            return Err(Status::failed_precondition(
                "this worker hosts shared actors; an actor of its own needs another",
            ));
        }
        if self.worker.guests.contains_key(&actor_id) {
            return Err(Status::failed_precondition(format!("this worker already hosts actor {}", actor_id.short())));
        }
        let Some(class) = actor::lookup_class(&request.class_name) else {
            let why = format!("no actor class named {} in this binary", request.class_name);
            return failed(task_failure::Kind::UnknownFunction, why);
        };
        let args: Vec<ArgBytes> =
            request.args.into_iter().map(|bytes| ArgBytes(Bytes::Owned(Arc::new(bytes)))).collect();
        if request.shared && !class.in_place {
            // Its calls may wait in ways the runtime cannot see (Python's): a process each.
            let why = format!("actor class {} cannot share a process", request.class_name);
            return Err(Status::invalid_argument(why));
        }
        let constructing =
            request.shared.then(|| actor::Constructing::start(&self.worker, actor_id, request.incarnation));
        let construct = class.construct;
        let built = tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(|| construct(args))))
            .await
            .map_err(|err| Status::internal(format!("constructor thread failed: {err}")))?;
        if constructing.as_ref().is_some_and(|constructing| constructing.cancelled()) {
            // Ended while its constructor ran: that incarnation never starts.
            tokio::task::spawn_blocking(move || drop(built));
            return Err(Status::aborted(format!("actor {} was ended while its constructor ran", actor_id.short())));
        }
        let instance = match built {
            Ok(Ok(instance)) => instance,
            Ok(Err(failure)) => return failed(task_failure::Kind::Error, failure.message),
            Err(payload) => return failed(task_failure::Kind::Panic, panic_message(payload.as_ref())),
        };
        let executor = request.shared.then(|| self.worker.executor_beside());
        let hosted = Arc::new(HostedActor::new(
            actor_id,
            request.incarnation,
            class,
            instance,
            request.max_concurrency,
            executor,
        ));
        let placed = if request.shared {
            match self.worker.guests.entry(actor_id) {
                dashmap::mapref::entry::Entry::Vacant(entry) => {
                    entry.insert(hosted);
                    true
                }
                dashmap::mapref::entry::Entry::Occupied(_) => false,
            }
        } else {
            self.worker.hosted.set(hosted).is_ok()
        };
        drop(constructing); // after the guest is in the table: an end waiting on it finds it
        if !placed {
            return Err(Status::failed_precondition("this worker started that actor, or another, meanwhile"));
        }
        tracing::info!(actor = %actor_id, class = class.name, shared = request.shared, "actor constructed");
        Ok(Response::new(CreateActorReply { failure: None }))
    }

    async fn end_actor(&self, request: Request<EndActorRequest>) -> Result<Response<EndActorReply>, Status> {
        Principal::of(&request)?.may_act_for_job(&self.worker.job_id)?;
        let request = request.into_inner();
        let actor_id = ActorId::from_bytes(&request.actor_id)?;
        if self.worker.hosted.get().is_some_and(|hosted| hosted.id == actor_id) {
            return Err(Status::failed_precondition(
                "that actor has this process to itself: it ends with its process (its lease returned as failed)",
            ));
        }
        // Being constructed: it never starts, and the end is answered once its
        // constructor returned (never two incarnations at once).
        let construction = self
            .worker
            .constructing
            .get(&actor_id)
            .filter(|entry| entry.0 == request.incarnation)
            .map(|entry| entry.1.clone());
        if let Some(construction) = construction {
            construction.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut done = construction.done.subscribe();
            let _ = done.wait_for(|done| *done).await;
        }
        // Only that incarnation: an end asked late never ends a later one.
        let removed = self.worker.guests.remove_if(&actor_id, |_, guest| guest.incarnation == request.incarnation);
        if let Some((_, guest)) = removed {
            guest.end();
            tracing::info!(actor = %actor_id, "shared actor ended");
            // Its state (and the user's `Drop`) goes off the event loop.
            tokio::task::spawn_blocking(move || drop(guest));
        }
        Ok(Response::new(EndActorReply {}))
    }

    type ActorCallsStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ReplyBatch, Status>> + Send>>;

    async fn actor_calls(
        &self,
        request: Request<tonic::Streaming<ActorCallBatch>>,
    ) -> Result<Response<Self::ActorCallsStream>, Status> {
        let mut incoming = request.into_inner();
        let worker = self.worker.clone();
        let (replies, finished) = mpsc::unbounded_channel::<Result<NumberedReply, Status>>();
        tokio::spawn(async move {
            // Ends when the caller closes its side (or goes away); the reply stream ends
            // once every call taken has answered. The caller names itself in the
            // stream's first batch.
            let mut caller: Arc<str> = Arc::from("");
            // A stream carries the calls of one actor: a guest's end fails what it left.
            let mut ended: Option<(ActorId, tokio::sync::watch::Receiver<bool>)> = None;
            loop {
                let next = match &mut ended {
                    Some((actor_id, ended)) => tokio::select! {
                        next = incoming.message() => next,
                        _ = ended.wait_for(|ended| *ended) => {
                            let why = format!("actor {} was ended in its shared process", actor_id.short());
                            let _ = replies.send(Err(Status::unavailable(why)));
                            return;
                        }
                    },
                    None => incoming.message().await,
                };
                let Ok(Some(batch)) = next else { break };
                if caller.is_empty() && !batch.caller_address.is_empty() {
                    caller = batch.caller_address.as_str().into();
                }
                let mut blocking = Vec::new();
                // The actor this batch's calls were decoded for (one per stream).
                let mut batch_actor = None;
                for call in batch.calls {
                    let hosted = match hosted_actor(&worker, &call) {
                        Ok(hosted) => hosted,
                        Err(status) => {
                            let _ = replies.send(Err(status));
                            return;
                        }
                    };
                    if hosted.is_guest() && ended.is_none() {
                        ended = Some((hosted.id, hosted.ended()));
                    }
                    batch_actor = Some(hosted.clone());
                    let sequence = call.sequence;
                    let ordered = hosted.ordered();
                    match decode_call(&worker, &hosted, call, &caller).await {
                        Decoded::Done(reply) => {
                            let _ = replies.send(Ok(NumberedReply { sequence, reply: Some(reply) }));
                        }
                        // An ordered actor runs its calls one at a time in arrival order
                        // (each caller's stream keeps its order): see `run_in_order`.
                        Decoded::Blocking((call, run)) if ordered => {
                            let (worker_ref, replies, method) = (worker.clone(), replies.clone(), call.method.clone());
                            let actor = hosted.clone();
                            hosted.run_in_order(
                                &worker,
                                hosted.class.in_place.then_some(method.as_str()),
                                Box::new(move || {
                                    if !actor.is_ended() {
                                        call.run_and_reply(&worker_ref, run, &replies);
                                    }
                                }),
                            );
                        }
                        Decoded::Async(call, run) if ordered => {
                            let (worker_ref, replies, actor) = (worker.clone(), replies.clone(), hosted.clone());
                            // Never in place: it runs on the event loop, waited for here.
                            hosted.run_in_order(
                                &worker,
                                None,
                                Box::new(move || {
                                    if actor.is_ended() {
                                        return;
                                    }
                                    let handle = worker_ref.handle.clone();
                                    let reply = handle.block_on(run_async_call(
                                        &worker_ref,
                                        &call.method,
                                        &call.task_id,
                                        call.return_id,
                                        call.threshold,
                                        run,
                                    ));
                                    let _ = replies.send(Ok(NumberedReply { sequence, reply: Some(reply) }));
                                }),
                            );
                        }
                        Decoded::Blocking(call) => blocking.push(call),
                        Decoded::Async(call, run) => {
                            let (worker, replies) = (worker.clone(), replies.clone());
                            tokio::spawn(async move {
                                let Ok(_permit) = hosted.permits.clone().acquire_owned().await else { return };
                                if hosted.is_ended() {
                                    return; // Ended meanwhile: its stream failed what it left.
                                }
                                let reply = run_async_call(
                                    &worker,
                                    &call.method,
                                    &call.task_id,
                                    call.return_id,
                                    call.threshold,
                                    run,
                                )
                                .await;
                                let _ = replies.send(Ok(NumberedReply { sequence, reply: Some(reply) }));
                            });
                        }
                    }
                }
                if let Some(hosted) = &batch_actor {
                    run_in_lanes(&worker, hosted, blocking, &replies);
                }
            }
        });
        Ok(Response::new(Box::pin(reply_batches(finished))))
    }

    type WatchStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchEvent, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        // Watching one actor: the stream ends when it does, too.
        let mut actor_ended = match request.actor_id.is_empty() {
            true => None,
            false => {
                let actor_id = ActorId::from_bytes(&request.actor_id)?;
                let Some(hosted) = self.worker.hosted_actor(&actor_id) else {
                    return Err(Status::not_found(format!("this worker does not host actor {}", actor_id.short())));
                };
                Some(hosted.ended())
            }
        };
        let mut stopping = self.worker.stopping.subscribe();
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<WatchEvent, Status>>(1);
        tokio::spawn(async move {
            let actor_ended = async {
                match &mut actor_ended {
                    Some(ended) => drop(ended.wait_for(|ended| *ended).await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopping.wait_for(|stopping| *stopping) => {}
                _ = sender.closed() => {}
                _ = actor_ended => {}
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}
