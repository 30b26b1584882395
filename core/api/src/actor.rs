//! Actors from Rust: creating them, calling them, and hosting one in a worker.
//!
//! `#[ionet::actor]` on an `impl` block registers the type as an [`ActorClass`] and
//! generates a typed handle (`CounterHandle` for `Counter`) whose methods submit calls.
//!
//! Caller side: every process keeps one [`ActorClient`] per actor it calls. Its sender task
//! takes calls in submission order, resolves their arguments, learns the actor's address
//! from the control store (waiting while it is pending or restarting), numbers each call
//! with the caller's next sequence number for that incarnation and sends it on a call
//! stream to the actor's worker (`ActorCalls`) without waiting for earlier replies. Calls
//! queued together go out as one message, and the worker answers with every reply ready
//! at once, so a busy caller pays one message per batch. When the stream breaks, the calls
//! it left unanswered mark the incarnation broken; each is retried on the next incarnation
//! up to `max_task_retries` (a call that never reached the worker is always retried), else
//! it fails with `ActorDied` and the cause the control store recorded.
//!
//! Worker side: a worker hosts at most one actor ([`HostedActor`]). With
//! `max_concurrency == 1` each caller's calls run one at a time in sequence order; with
//! more, up to `max_concurrency` calls run at once on blocking threads (`&self` methods
//! share a read lock, `&mut self` methods take the write lock).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::rpc::proto::gcs::{
    ActorInfo, ActorSpec, ActorState, CreateActorRequest, GetActorRequest, GetNamedActorRequest, KillActorRequest,
};
use ionet_common::rpc::proto::worker::{
    push_task_reply, ActorCallBatch, NumberedReply, PushActorTaskRequest, PushTaskReply,
};
use ionet_common::rpc::{CoreWorkerClient, GcsClient};
use ionet_common::{ActorId, IonetError, IonetResult, ObjectId, TaskId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::object_ref::{Arg, ObjectRef};
use crate::options::{SchedulingStrategy, TaskOptions};
use crate::runtime::{self, CoreWorker, ObjectState};
use crate::task::{ArgBytes, Failure};

/// An actor's state as its worker holds it: `&self` methods share it, `&mut self` methods
/// hold it alone; blocking methods lock it from their thread, async ones across awaits.
pub type ActorInstance = tokio::sync::RwLock<Box<dyn Any + Send + Sync>>;

/// An async method's run, on the worker's event loop.
pub type MethodFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, Failure>> + Send>>;

/// One decoded method call, ready to run.
pub enum MethodCall {
    /// A plain method: runs on a blocking thread.
    Blocking(Box<dyn FnOnce() -> Result<Vec<u8>, Failure> + Send>),
    /// An `async fn` method: runs on the event loop.
    Async(MethodFuture),
}

/// A class of actors a worker process can host, registered by `#[ionet::actor]`.
pub struct ActorClass {
    pub name: &'static str,
    pub construct: fn(Vec<ArgBytes>) -> Result<Box<dyn Any + Send + Sync>, Failure>,
    /// Decodes a call of `method` (an error: unknown method or bad arguments).
    pub call: fn(Arc<ActorInstance>, &str, Vec<ArgBytes>) -> Result<MethodCall, Failure>,
    /// Whether a call learnt to be short may run in place on the worker's event loop.
    /// True for Rust code, whose waits go through ionet (which hands the event loop's
    /// work to another thread first); false for code that may wait in ways the runtime
    /// cannot see (Python's asyncio needs the event loop to deliver its results).
    pub in_place: bool,
}

inventory::collect!(ActorClass);

pub fn lookup_class(name: &str) -> Option<&'static ActorClass> {
    inventory::iter::<ActorClass>.into_iter().find(|class| class.name == name)
}

type State = Box<dyn Any + Send + Sync>;

fn check_type<T: 'static>(state: &State) -> Result<(), Failure> {
    if state.is::<T>() {
        Ok(())
    } else {
        Err(Failure::error(format!("this worker's actor is not a {}", std::any::type_name::<T>())))
    }
}

/// Reads the actor's state for a blocking `&self` method (from the thread running it:
/// the executor, a lane, or a runtime thread for a short call).
pub fn read_state<T: 'static>(instance: &ActorInstance) -> Result<tokio::sync::RwLockReadGuard<'_, State>, Failure> {
    let guard = match instance.try_read() {
        Ok(guard) => guard,
        Err(_) => tokio::task::block_in_place(|| instance.blocking_read()),
    };
    check_type::<T>(&guard)?;
    Ok(guard)
}

/// Locks the actor's state for a blocking `&mut self` method.
pub fn write_state<T: 'static>(instance: &ActorInstance) -> Result<tokio::sync::RwLockWriteGuard<'_, State>, Failure> {
    let guard = match instance.try_write() {
        Ok(guard) => guard,
        Err(_) => tokio::task::block_in_place(|| instance.blocking_write()),
    };
    check_type::<T>(&guard)?;
    Ok(guard)
}

/// Reads the actor's state for an async `&self` method.
pub async fn read_state_async<T: 'static>(
    instance: Arc<ActorInstance>,
) -> Result<tokio::sync::OwnedRwLockReadGuard<State>, Failure> {
    let guard = instance.read_owned().await;
    check_type::<T>(&guard)?;
    Ok(guard)
}

/// Locks the actor's state for an async `&mut self` method.
pub async fn write_state_async<T: 'static>(
    instance: Arc<ActorInstance>,
) -> Result<tokio::sync::OwnedRwLockWriteGuard<State>, Failure> {
    let guard = instance.write_owned().await;
    check_type::<T>(&guard)?;
    Ok(guard)
}

/// How an actor is created (Ray's actor options).
#[derive(Clone, Debug, PartialEq)]
pub struct ActorOptions {
    /// Resources held for the actor's life. CPUs default to 0 (as Ray: an actor is placed
    /// without holding a CPU); GPUs, memory, accelerator type and custom resources as set.
    pub resources: TaskOptions,
    /// A name others can find it by (`get_actor`), unique in its namespace.
    pub name: Option<String>,
    /// Default: the driver's namespace ("" if none).
    pub namespace: Option<String>,
    /// Outlives its creator (Ray's `lifetime="detached"`); else it dies with it.
    pub detached: bool,
    /// With a name: return the live actor of that name instead of refusing.
    pub get_if_exists: bool,
    /// Restarts after its process or node dies (-1: forever).
    pub max_restarts: i32,
    /// Retries of a call whose actor died while it ran (-1: forever).
    pub max_task_retries: i32,
    /// Calls run at once (1: one at a time, in each caller's order).
    pub max_concurrency: u32,
}

impl Default for ActorOptions {
    fn default() -> Self {
        ActorOptions {
            resources: TaskOptions { num_cpus: 0.0, ..TaskOptions::default() },
            name: None,
            namespace: None,
            detached: false,
            get_if_exists: false,
            max_restarts: 0,
            max_task_retries: 0,
            max_concurrency: 1,
        }
    }
}

impl ActorOptions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn num_cpus(mut self, cpus: f64) -> Self {
        self.resources.num_cpus = cpus;
        self
    }

    pub fn num_gpus(mut self, gpus: f64) -> Self {
        self.resources.num_gpus = gpus;
        self
    }

    pub fn memory(mut self, bytes: u64) -> Self {
        self.resources.memory = bytes;
        self
    }

    pub fn accelerator_type(mut self, model: impl Into<String>) -> Self {
        self.resources.accelerator_type = Some(model.into());
        self
    }

    pub fn resource(mut self, name: impl Into<String>, quantity: f64) -> Self {
        self.resources.resources.insert(name.into(), quantity);
        self
    }

    pub fn scheduling_strategy(mut self, strategy: SchedulingStrategy) -> Self {
        self.resources.scheduling_strategy = strategy;
        self
    }

    pub fn placement_group(mut self, group: &crate::PlacementGroup, bundle_index: u32) -> Self {
        self.resources.placement_group = Some((group.id(), bundle_index));
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Ray's `lifetime="detached"`.
    pub fn detached(mut self) -> Self {
        self.detached = true;
        self
    }

    pub fn get_if_exists(mut self, get: bool) -> Self {
        self.get_if_exists = get;
        self
    }

    pub fn max_restarts(mut self, restarts: i32) -> Self {
        self.max_restarts = restarts;
        self
    }

    pub fn max_task_retries(mut self, retries: i32) -> Self {
        self.max_task_retries = retries;
        self
    }

    pub fn max_concurrency(mut self, calls: u32) -> Self {
        self.max_concurrency = calls;
        self
    }
}

/// An untyped handle to an actor: cheap to clone, serialisable (pass it to tasks and
/// other actors). The typed handles `#[ionet::actor]` generates wrap one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActorHandle {
    id: ActorId,
    class: String,
}

/// A typed actor handle (generated by `#[ionet::actor]`).
pub trait ActorClassHandle: Sized {
    /// The registered class name.
    const CLASS: &'static str;
    fn from_handle(handle: ActorHandle) -> Self;
    fn handle(&self) -> &ActorHandle;
}

impl ActorHandle {
    pub fn id(&self) -> ActorId {
        self.id
    }

    pub fn class_name(&self) -> &str {
        &self.class
    }

    /// Submits a call of `method`; returns at once.
    pub fn call<R>(&self, method: &str, args: Vec<Arg>) -> ObjectRef<R> {
        let worker = runtime::current().unwrap_or_else(|err| panic!("{err}"));
        let return_id = ObjectId::random();
        let object = worker.new_object(return_id, ObjectState::Pending);
        let client = worker.actor_client(self);
        let call = ActorCall { method: method.into(), args, return_id, task_id: TaskId::random(), attempt: 0 };
        if let Err(mpsc::error::SendError(call)) = client.queue.send(call) {
            worker.settle_object(
                &call.return_id,
                ObjectState::Failed(Arc::new(IonetError::Internal("the actor's call queue is closed".into()))),
            );
        }
        object
    }

    /// The actor's row in the control store.
    pub fn info(&self) -> IonetResult<ActorInfo> {
        let worker = runtime::current()?;
        let info = runtime::block_on(async {
            let request = GetActorRequest { actor_id: self.id.to_vec(), wait_newer_than: -1, timeout_ms: 0 };
            actor_row(worker.gcs()?.get_actor(request).await?.into_inner().actor)
        })?;
        if let Some(client) = worker.actor_clients.get(&self.id) {
            client.learn(&info);
        }
        Ok(info)
    }
}

fn actor_row(row: Option<ActorInfo>) -> IonetResult<ActorInfo> {
    row.ok_or_else(|| IonetError::Internal("the control store answered without the actor".into()))
}

/// Creates an actor of `class` (a registered class name) with `args` for its constructor.
/// Returns as soon as the control store has it; calls wait until it runs.
pub fn create_actor(class: &str, options: ActorOptions, args: Vec<Arg>) -> IonetResult<ActorHandle> {
    let worker = runtime::current()?;
    let resources = options.resources.demand()?;
    if options.max_concurrency == 0 {
        return Err(IonetError::InvalidArgument("max_concurrency must be at least 1".into()));
    }
    runtime::block_on(async {
        // Constructor arguments are kept by value, so a restart can run it again.
        let mut constructor_args = Vec::with_capacity(args.len());
        for (index, arg) in args.iter().enumerate() {
            constructor_args.push(match arg {
                // A ref inside a constructor argument is held only while this call runs.
                Arg::Value(Ok(bytes)) | Arg::Holding(bytes, _) => bytes.clone(),
                Arg::Value(Err(why)) => {
                    return Err(IonetError::InvalidArgument(format!("argument {index} of {class}: {why}")))
                }
                Arg::Ref(reference) => worker.fetch(reference.id(), reference.owner_address(), None).await?.to_vec(),
            });
        }
        let bundle = options.resources.placement_group;
        let spec = ActorSpec {
            actor_id: ActorId::random().to_vec(),
            job_id: worker.job_id.to_vec(),
            class_name: class.to_string(),
            constructor_args,
            resources: Some((&resources).into()),
            name: options.name.clone().unwrap_or_default(),
            namespace: options.namespace.clone().unwrap_or_else(|| worker.namespace.clone()),
            detached: options.detached,
            max_restarts: options.max_restarts,
            max_task_retries: options.max_task_retries,
            max_concurrency: options.max_concurrency,
            worker_command: Some(worker.worker_command.clone()),
            owner_address: worker.address.to_string(),
            node_address: worker.node_address.clone(),
            placement_group_id: bundle.map(|(group, _)| group.to_vec()).unwrap_or_default(),
            bundle_index: bundle.map(|(_, index)| index).unwrap_or_default(),
            strategy: Some(options.resources.wire_strategy()?),
        };
        let request = CreateActorRequest { spec: Some(spec), get_if_exists: options.get_if_exists };
        let info = actor_row(worker.gcs()?.create_actor(request).await?.into_inner().actor)?;
        handle_of(info)
    })
}

fn handle_of(info: ActorInfo) -> IonetResult<ActorHandle> {
    let spec = info.spec.unwrap_or_default();
    Ok(ActorHandle { id: ActorId::from_bytes(&spec.actor_id)?, class: spec.class_name })
}

/// The live actor named `name` in `namespace` (`None`: the driver's namespace).
pub fn get_actor<H: ActorClassHandle>(name: &str, namespace: Option<&str>) -> IonetResult<H> {
    let worker = runtime::current()?;
    let namespace = namespace.map(str::to_string).unwrap_or_else(|| worker.namespace.clone());
    let info = runtime::block_on(async {
        let request = GetNamedActorRequest { name: name.to_string(), namespace };
        actor_row(worker.gcs()?.get_named_actor(request).await?.into_inner().actor)
    })?;
    let handle = handle_of(info)?;
    if handle.class != H::CLASS {
        return Err(IonetError::InvalidArgument(format!(
            "the actor named {name:?} is a {}, not a {}",
            handle.class,
            H::CLASS
        )));
    }
    Ok(H::from_handle(handle))
}

/// Kills the actor's process. `no_restart`: it is DEAD for good (its resources and name
/// are freed); else it restarts if it has restarts left.
pub fn kill(actor: &impl ActorClassHandle, no_restart: bool) -> IonetResult<()> {
    kill_handle(actor.handle(), no_restart)
}

/// Ends the actor this worker hosts for good, from inside one of its methods (Ray's
/// `exit_actor`): it is DEAD without restarts, the call running and those queued fail
/// with `ActorDied`, and this process exits. Returns only with the error that says why it
/// could not (called outside an actor, or the control store unreachable).
pub fn exit_actor() -> IonetResult<std::convert::Infallible> {
    let worker = runtime::current()?;
    let Some(hosted) = worker.hosted.get().cloned() else {
        return Err(IonetError::FailedPrecondition("exit_actor() is called from inside an actor's method".into()));
    };
    runtime::block_on(async {
        let request = KillActorRequest { actor_id: hosted.id.to_vec(), no_restart: true };
        worker.gcs()?.kill_actor(request).await?;
        IonetResult::Ok(())
    })?;
    std::process::exit(0)
}

pub fn kill_handle(actor: &ActorHandle, no_restart: bool) -> IonetResult<()> {
    let worker = runtime::current()?;
    runtime::block_on(async {
        worker.gcs()?.kill_actor(KillActorRequest { actor_id: actor.id.to_vec(), no_restart }).await?;
        Ok(())
    })
}

struct ActorCall {
    method: Arc<str>,
    args: Vec<Arg>,
    return_id: ObjectId,
    task_id: TaskId,
    attempt: u32,
}

/// This process's side of one actor: the ordered queue of its calls.
pub(crate) struct ActorClient {
    queue: mpsc::UnboundedSender<ActorCall>,
    shared: Arc<SenderShared>,
}

impl ActorClient {
    /// Where the call producing `id` runs, if it was sent and not answered yet: the
    /// actor worker's address and the call's task id.
    pub(crate) fn running_call(&self, id: &ObjectId) -> Option<(String, TaskId)> {
        let current = self.shared.current.lock().unwrap_or_else(|p| p.into_inner());
        let (address, sent) = current.as_ref()?;
        let sent = sent.lock().unwrap_or_else(|p| p.into_inner());
        let task_id = sent.calls.values().find(|(call, _)| call.return_id == *id)?.0.task_id;
        Some((address.clone(), task_id))
    }

    /// Something in this process learnt the actor's current row: a newer incarnation
    /// means every older one is gone.
    pub(crate) fn learn(&self, info: &ActorInfo) {
        self.shared.learn(info);
    }
}

impl SenderShared {
    fn learn(&self, info: &ActorInfo) {
        match ActorState::try_from(info.state).unwrap_or(ActorState::Unspecified) {
            ActorState::Alive => {
                self.broken.fetch_max(i64::from(info.incarnation) - 1, Ordering::SeqCst);
            }
            ActorState::Restarting | ActorState::Dead => {
                // The incarnation recorded is the next one (restarting) or the last (dead).
                let dead_up_to = if info.state == ActorState::Dead as i32 { 0 } else { 1 };
                self.broken.fetch_max(i64::from(info.incarnation) - dead_up_to, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// Follows the actor's row in the control store (a long poll), so that calls made after a
/// restart go to the new incarnation without first failing on the old one. Ends with the
/// process's core worker.
async fn watch_actor(shared: std::sync::Weak<SenderShared>) {
    let mut known: i64 = -1;
    loop {
        let Some(current) = shared.upgrade() else { return };
        if *current.worker.stopping.borrow() {
            return;
        }
        let request = GetActorRequest {
            actor_id: current.actor.id.to_vec(),
            wait_newer_than: known,
            timeout_ms: CONNECT_WAIT.as_millis() as u64,
        };
        let gcs = current.worker.gcs();
        drop(current);
        let reply = match gcs {
            Ok(mut gcs) => gcs.get_actor(request).await,
            Err(_) => return,
        };
        let Some(current) = shared.upgrade() else { return };
        match reply.map(|reply| reply.into_inner().actor) {
            Ok(Some(info)) => {
                current.learn(&info);
                if info.state == ActorState::Dead as i32 {
                    return;
                }
                if info.state == ActorState::Alive as i32 {
                    known = known.max(i64::from(info.incarnation));
                }
            }
            Ok(None) | Err(_) => {
                drop(current);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The connection the sender uses: a call stream to the actor's current incarnation and
/// the caller's next sequence number in it.
struct Connection {
    incarnation: u32,
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
        });
        worker.handle.spawn(send_calls(shared.clone(), calls));
        worker.handle.spawn(watch_actor(Arc::downgrade(&shared)));
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
                worker.settle_object(&call.return_id, ObjectState::Failed(error.clone()));
                continue;
            }
            // Whatever may wait goes after the calls gathered so far are on their way: an
            // argument may be the result of one of them.
            if call.args.iter().any(|arg| matches!(arg, Arg::Ref(_))) {
                flush(&connection, &mut batch);
            }
            let args = match runtime::resolve_call_args(&worker, &call.method, &call.args).await {
                Ok(args) => args,
                Err(error) => {
                    worker.settle_object(&call.return_id, ObjectState::Failed(Arc::new(error)));
                    continue;
                }
            };
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
                        worker.settle_object(&call.return_id, ObjectState::Failed(error.clone()));
                        dead = Some(error);
                        continue;
                    }
                    Err(error) => {
                        worker.settle_object(&call.return_id, ObjectState::Failed(Arc::new(error)));
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
                task_id: call.task_id.to_vec(),
                return_object_id: call.return_id.to_vec(),
                inline_threshold: worker.inline_threshold as u64,
            };
            let mut sent = current.sent.lock().unwrap_or_else(|p| p.into_inner());
            if sent.closed {
                // The stream ended meanwhile: the call goes round again, to the next incarnation.
                drop(sent);
                requeue(&shared, call);
                continue;
            }
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
        let _ = connection.batches.send(ActorCallBatch { calls });
    }
}

fn requeue(shared: &SenderShared, call: ActorCall) {
    let return_id = call.return_id;
    if let Err(mpsc::error::SendError(_)) = shared.queue.send(call) {
        let closed = IonetError::Internal("the actor's call queue is closed".into());
        shared.worker.settle_object(&return_id, ObjectState::Failed(Arc::new(closed)));
    }
}

/// Opens a call stream to the actor's worker; its reader settles the replies.
fn open_stream(shared: &Arc<SenderShared>, incarnation: u32, channel: ionet_common::rpc::AuthChannel) -> Connection {
    let (batches, outgoing) = mpsc::unbounded_channel();
    let sent = Arc::new(Mutex::new(SentCalls::default()));
    shared.worker.handle.spawn(read_replies(shared.clone(), incarnation, channel, outgoing, sent.clone()));
    Connection { incarnation, next_sequence: 0, batches, sent }
}

/// Settles each reply as it comes; when the stream ends, the calls still unanswered are
/// retried or failed.
async fn read_replies(
    shared: Arc<SenderShared>,
    incarnation: u32,
    channel: ionet_common::rpc::AuthChannel,
    outgoing: mpsc::UnboundedReceiver<ActorCallBatch>,
    sent: Arc<Mutex<SentCalls>>,
) {
    let mut client =
        CoreWorkerClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
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
                    let state = reply_state(&shared, &call.method, reply.unwrap_or_default());
                    shared.worker.settle_object(&call.return_id, state);
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
    for (_, (mut call, permit)) in unanswered {
        drop(permit);
        if never_delivered(&ended) || retries == -1 || i64::from(call.attempt) < retries {
            if !never_delivered(&ended) {
                call.attempt += 1;
            }
            requeue(&shared, call);
            continue;
        }
        if cause.is_none() {
            cause = Some(death_cause(&shared, incarnation).await);
        }
        let cause = cause.as_deref().unwrap_or_default();
        let error = IonetError::ActorDied(format!("{cause}; call {} was lost ({})", call.method, ended.message()));
        shared.worker.settle_object(&call.return_id, ObjectState::Failed(Arc::new(error)));
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
        Some(push_task_reply::Result::Failure(failure)) => ObjectState::Failed(Arc::new(IonetError::TaskFailed {
            function: format!("{}.{}", shared.actor.class, failure.function_name),
            node: runtime::hex_short(&failure.node_id),
            message: failure.message,
        })),
        None => ObjectState::Failed(Arc::new(IonetError::Internal(format!("empty reply to {method}")))),
    }
}

/// Waits until the actor runs in an incarnation newer than `broken`. `Ok(Err(error))`: it
/// is dead, and calls fail with `error`.
async fn connect(shared: &Arc<SenderShared>, broken: i64) -> IonetResult<Result<Connection, IonetError>> {
    let worker = &shared.worker;
    loop {
        let request = GetActorRequest {
            actor_id: shared.actor.id.to_vec(),
            wait_newer_than: broken,
            timeout_ms: CONNECT_WAIT.as_millis() as u64,
        };
        let info = actor_row(worker.gcs()?.get_actor(request).await?.into_inner().actor)?;
        let spec = info.spec.clone().unwrap_or_default();
        shared.max_task_retries.store(i64::from(spec.max_task_retries), Ordering::SeqCst);
        match ActorState::try_from(info.state).unwrap_or(ActorState::Unspecified) {
            ActorState::Dead => return Ok(Err(death_error(&shared.actor, &info))),
            ActorState::Alive if i64::from(info.incarnation) > broken => {
                let channel = worker.channel(&info.address)?;
                let connection = open_stream(shared, info.incarnation, channel);
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

/// Whether a failed send certainly never reached the worker (nothing ran): its cause,
/// somewhere down the error's source chain, is a refused connection. Read from the
/// error's type, not its text: a worker's own error that says "connection refused" was
/// delivered.
fn never_delivered(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_never_delivered_and_a_message_proves_nothing() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // A port nothing listens on.
            let address = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().to_string()
            };
            let token = ionet_common::auth::ClusterToken::generate();
            let channel = ionet_common::rpc::connect_lazy(&address, &token, Duration::from_secs(2)).unwrap();
            let refused = CoreWorkerClient::new(channel)
                .watch(ionet_common::rpc::proto::worker::WatchRequest {})
                .await
                .expect_err("nothing listens there");
            assert!(never_delivered(&refused), "a refused connection: {refused:?}");
        });
        // A worker that answered, whatever its words, got the call.
        assert!(!never_delivered(&tonic::Status::unavailable("tcp connect error: Connection refused")));
    }
}

/// The actor a worker process hosts.
pub(crate) struct HostedActor {
    pub(crate) id: ActorId,
    pub(crate) incarnation: u32,
    pub(crate) class: &'static ActorClass,
    pub(crate) instance: Arc<ActorInstance>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) max_concurrency: usize,
}

impl HostedActor {
    pub(crate) fn new(
        id: ActorId,
        incarnation: u32,
        class: &'static ActorClass,
        instance: Box<dyn Any + Send + Sync>,
        max_concurrency: u32,
    ) -> Self {
        let max_concurrency = max_concurrency.max(1);
        HostedActor {
            id,
            incarnation,
            class,
            instance: Arc::new(tokio::sync::RwLock::new(instance)),
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            max_concurrency: max_concurrency as usize,
        }
    }

    /// Whether each caller's calls run one at a time, in order (`max_concurrency == 1`).
    pub(crate) fn ordered(&self) -> bool {
        self.max_concurrency == 1
    }
}

/// The control store client of this process.
impl CoreWorker {
    pub(crate) fn gcs(&self) -> IonetResult<GcsClient> {
        if self.gcs_address.is_empty() {
            return Err(IonetError::FailedPrecondition(
                "this process does not know the control store's address".into(),
            ));
        }
        Ok(GcsClient::new(self.channel(&self.gcs_address)?))
    }

    pub(crate) fn actor_client(self: &Arc<Self>, actor: &ActorHandle) -> Arc<ActorClient> {
        if let Some(client) = self.actor_clients.get(&actor.id) {
            return client.clone();
        }
        self.actor_clients.entry(actor.id).or_insert_with(|| ActorClient::start(self, actor)).clone()
    }
}
