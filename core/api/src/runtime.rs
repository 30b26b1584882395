//! The core worker: the part of every ionet process (driver or worker) that owns
//! objects, submits tasks over leases, and serves `CoreWorker` RPCs.
//!
//! Ownership: the process that creates an object (`put`, or the return of a task it
//! submits) owns it: its entry lives in `objects` with a count of local handles (task
//! arguments included), and it answers other processes' `GetObject` for it. At zero
//! handles the entry is removed.
//!
//! Submission (the hot path; the control store is never on it):
//! 1. `submit_task` creates the return object (PENDING) and spawns the task's driver
//!    future, returning the `ObjectRef` at once.
//! 2. Arguments that are refs are resolved first (a task starts only once its argument
//!    objects exist): from this process's table, or from their owner.
//! 3. A lease for the task's resource shape is taken from the shape's pool: an idle one
//!    is reused; otherwise up to `MAX_PENDING_LEASE_REQUESTS` requests go to the local
//!    node daemon, following spillbacks to other nodes.
//! 4. The task is pushed straight to the leased worker; the reply carries the value.
//!    A transport failure means the worker died: the lease is returned as failed and
//!    the task retried up to `max_retries`, then fails as worker-crashed.
//! 5. Leases idle for `LEASE_LINGER` with nobody waiting go back to their daemon, or at
//!    once when a daemon with requests waiting asks (`ReturnIdleLeases`).
//!
//! A worker whose task waits in `get`/`wait` tells its daemon (`crate::blocked`), which
//! lends the lease's CPUs to the tasks it waits for. Tasks carry their depth in the tree
//! of tasks (`context::child_depth`); lease requests carry it so daemons serve the
//! deepest first.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::auth::ClusterToken;
use ionet_common::rpc::proto::node::{
    request_worker_lease_reply::Outcome, RequestWorkerLeaseRequest, ReturnWorkerLeaseRequest,
    SchedulingStrategy as WireStrategy, WorkerCommand,
};
use ionet_common::rpc::proto::worker::{
    get_object_reply, push_task_reply, task_arg, task_failure, GetObjectRequest, NumberedReply, PushTaskReply,
    PushTaskRequest, ReplyBatch, StoredObject, TaskArg, TaskBatch,
};
use ionet_common::rpc::{self, AuthChannel, CoreWorkerClient, NodeManagerClient};
use ionet_common::{IonetError, IonetResult, JobId, NodeId, ObjectId, ResourceSet, TaskId};
use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tonic::Status;

use crate::object_ref::{Arg, ObjectRef};
use crate::object_store::Bytes;
use crate::options::TaskOptions;

/// Calls recently shorter than this (in microseconds) may run in place on the runtime.
const INLINE_LIMIT_MICROS: u64 = 50;
/// How long a thread about to wait for an object polls first.
const SPIN_BUDGET: Duration = Duration::from_micros(200);

/// Runtime threads of a driver or worker process (default 1).
pub const RUNTIME_THREADS_ENV: &str = "IONET_RUNTIME_THREADS";

/// Work for the executor thread.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// At most this many lease requests in flight per resource shape (Ray's default too).
const MAX_PENDING_LEASE_REQUESTS: usize = 10;
/// The executor thread's stack.
const EXECUTOR_STACK_BYTES: usize = 64 << 20;

/// Work one lease may have queued on its worker, in microseconds of run time.
const PIPELINE_BUDGET_MICROS: u64 = 2_000;
/// Tasks one lease may have in flight at most.
const MAX_PIPELINE: usize = 32;
/// A task waiting this long for a worker (then twice as long, and so on) logs why.
const LONG_LEASE_WAIT: Duration = Duration::from_secs(10);
/// An idle lease is kept this long for the next task of its shape.
const LEASE_LINGER: Duration = Duration::from_millis(300);
/// Values up to this size travel inline and live in their owner's memory.
pub(crate) const DEFAULT_INLINE_THRESHOLD: usize = 100 * 1024;

/// Where an object's value is.
#[derive(Clone)]
pub(crate) enum ObjectState {
    Pending,
    Inline(Arc<Vec<u8>>),
    Stored(StoredObject),
    Failed(Arc<IonetError>),
}

pub(crate) struct ObjectEntry {
    pub(crate) state: watch::Sender<ObjectState>,
    references: AtomicUsize,
    /// Refs written inside the value: alive as long as it is (held, never read).
    _holding: Vec<ObjectRef<()>>,
}

impl ObjectEntry {
    pub(crate) fn add_reference(&self) {
        self.references.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether that was the last reference.
    pub(crate) fn remove_reference(&self) -> bool {
        self.references.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Briefly polls, yielding the CPU, while the object is pending (at most until
    /// `deadline`): a small task's reply comes within tens of microseconds, and a parked
    /// thread takes about as long again to be woken (longer on a virtual machine, whose
    /// idle CPU must be roused first). Past the budget the caller parks as usual.
    pub(crate) fn spin_while_pending(&self, deadline: Option<Instant>) {
        let budget = Instant::now() + SPIN_BUDGET;
        let until = deadline.map_or(budget, |deadline| deadline.min(budget));
        while !self.is_settled() && Instant::now() < until {
            std::thread::yield_now();
        }
    }

    /// Whether the object has its outcome (a value, or a failure such as a cancel).
    pub(crate) fn is_settled(&self) -> bool {
        !matches!(*self.state.borrow(), ObjectState::Pending)
    }

    /// Gives a pending object its outcome (one already settled keeps its own); whether
    /// this call settled it.
    pub(crate) fn settle(&self, state: ObjectState) -> bool {
        self.state.send_if_modified(|current| {
            let pending = matches!(current, ObjectState::Pending);
            if pending {
                *current = state;
            }
            pending
        })
    }
}

/// Rebuilds an error for another reader (errors are not `Clone`: `Io` holds an io::Error).
pub(crate) fn copy_error(error: &IonetError) -> IonetError {
    match error {
        IonetError::InvalidArgument(m) => IonetError::InvalidArgument(m.clone()),
        IonetError::NotFound(m) => IonetError::NotFound(m.clone()),
        IonetError::AlreadyExists(m) => IonetError::AlreadyExists(m.clone()),
        IonetError::Unauthenticated(m) => IonetError::Unauthenticated(m.clone()),
        IonetError::FailedPrecondition(m) => IonetError::FailedPrecondition(m.clone()),
        IonetError::ResourceExhausted(m) => IonetError::ResourceExhausted(m.clone()),
        IonetError::Unavailable(m) => IonetError::Unavailable(m.clone()),
        IonetError::Timeout(m) => IonetError::Timeout(m.clone()),
        IonetError::Config(m) => IonetError::Config(m.clone()),
        IonetError::Io(err) => IonetError::Internal(err.to_string()),
        IonetError::Internal(m) => IonetError::Internal(m.clone()),
        IonetError::TaskFailed { function, node, message } => {
            IonetError::TaskFailed { function: function.clone(), node: node.clone(), message: message.clone() }
        }
        IonetError::WorkerCrashed { function, attempts, reason } => {
            IonetError::WorkerCrashed { function: function.clone(), attempts: *attempts, reason: reason.clone() }
        }
        IonetError::ObjectLost(m) => IonetError::ObjectLost(m.clone()),
        IonetError::Infeasible(m) => IonetError::Infeasible(m.clone()),
        IonetError::ActorDied(m) => IonetError::ActorDied(m.clone()),
        IonetError::Cancelled(m) => IonetError::Cancelled(m.clone()),
    }
}

/// A worker leased for one resource shape, and the task stream to it.
pub(crate) struct Lease {
    lease_id: Vec<u8>,
    node_address: String,
    /// The leased worker's own address (for cancels).
    worker_address: String,
    tasks: TaskStream,
    /// Tasks pushed and not answered yet, and the sum of their expected run times in
    /// microseconds (both changed under the pool's `leases` lock).
    in_flight: AtomicUsize,
    queued_micros: AtomicU64,
    /// When `in_flight` last fell to zero.
    idle_since: Mutex<Instant>,
    /// Set once the lease is on its way back to its daemon.
    returned: AtomicBool,
    /// Set when a forced cancel of one of its tasks killed the worker.
    killed_by_cancel: AtomicBool,
    /// Tasks given a slot on it (counted only in pools with `max_calls`).
    started: AtomicU32,
}

struct ShapePool {
    request: RequestWorkerLeaseRequest,
    /// Every lease held for the shape, busy or idle.
    leases: Mutex<Vec<Arc<Lease>>>,
    notify: Notify,
    requesting: AtomicUsize,
    waiting: AtomicUsize,
    infeasible: Mutex<Option<String>>,
    /// How long each function's tasks of this shape run, in microseconds (a moving
    /// average per function, keyed by `TaskSpec::profile`).
    run_micros: Mutex<HashMap<u64, u64>>,
    /// For a task in any bundle of a group: the bundle the next lease request asks.
    next_bundle: AtomicUsize,
    /// Calls one worker may run before it is replaced (0: no limit); such a pool holds
    /// one function's tasks only.
    max_calls: u32,
}

impl ShapePool {
    /// How long a task of `profile` is expected to run: the whole pipeline budget while
    /// unknown, so that a function's first tasks never queue behind others.
    fn estimate(&self, profile: u64) -> u64 {
        let known = self.run_micros.lock().unwrap_or_else(|p| p.into_inner()).get(&profile).copied();
        known.unwrap_or(PIPELINE_BUDGET_MICROS).max(1)
    }

    fn observe(&self, profile: u64, run_micros: u64) {
        let mut known = self.run_micros.lock().unwrap_or_else(|p| p.into_inner());
        let average = known.entry(profile).or_insert(run_micros);
        *average = (*average * 7 + run_micros) / 8;
    }
}

pub(crate) struct CoreWorker {
    pub(crate) address: Arc<str>,
    pub(crate) node_id: NodeId,
    pub(crate) node_address: String,
    pub(crate) job_id: JobId,
    pub(crate) token: ClusterToken,
    pub(crate) gpu_ids: Vec<u32>,
    pub(crate) is_worker: bool,
    pub(crate) gcs_address: String,
    pub(crate) objects: DashMap<ObjectId, Arc<ObjectEntry>>,
    pools: DashMap<String, Arc<ShapePool>>,
    pub(crate) worker_command: WorkerCommand,
    /// The driver's namespace (named actors are found in it by default).
    pub(crate) namespace: String,
    /// Identifies this process to the actors it calls (their per-caller call order).
    pub(crate) caller_id: ObjectId,
    pub(crate) actor_clients: DashMap<ionet_common::ActorId, Arc<crate::actor::ActorClient>>,
    /// The actor this worker process hosts, once created.
    pub(crate) hosted: OnceLock<Arc<crate::actor::HostedActor>>,
    /// The thread that runs this worker's tasks and its ordered actor's calls, one at a
    /// time in the order given (started on first use).
    executor: OnceLock<std::sync::mpsc::Sender<Job>>,
    /// Jobs queued on the executor and not finished.
    executor_pending: Arc<AtomicUsize>,
    /// Held while a job runs (on the executor, or in place): one at a time.
    running: Arc<Mutex<()>>,
    /// Recent run time of each function or method run here, in microseconds (a moving
    /// average).
    run_times: DashMap<String, u64>,
    /// Set when the process leaves the cluster: `Watch` streams end.
    pub(crate) stopping: watch::Sender<bool>,
    channels: DashMap<String, AuthChannel>,
    /// The lease each pushed task (by return object) runs on, until it answers.
    running_tasks: DashMap<ObjectId, (Arc<ShapePool>, Arc<Lease>, TaskId)>,
    /// Tasks and calls running here whose caller cancelled them (`CancelTask`), and
    /// whether there are any (read before locking, on every call's end).
    pub(crate) cancelled: Mutex<std::collections::HashSet<TaskId>>,
    pub(crate) any_cancelled: AtomicBool,
    /// The tasks each running task or call here submitted (by return object), so that
    /// a recursive cancel reaches them; forgotten when the call ends.
    pub(crate) children: DashMap<TaskId, Vec<ObjectId>>,
    /// Tasks submitted here that this process may run itself while it waits for them,
    /// until started (`crate::inline`), and those it is running so (for cancels).
    pub(crate) stealable: DashMap<ObjectId, Arc<TaskSpec>>,
    pub(crate) inline_running: DashMap<ObjectId, TaskId>,
    /// Streams this process produces items for, by id (`crate::generator::send_item`).
    pub(crate) outgoing_streams: DashMap<ObjectId, Arc<crate::generator::Outgoing>>,
    pub(crate) inline_threshold: usize,
    pub(crate) handle: tokio::runtime::Handle,
    /// The node's shared-memory store, mapped directly.
    pub(crate) store: Option<ionet_object_store::StoreClient>,
    /// Reports waits for objects to the node daemon (worker processes only).
    pub(crate) blocked: OnceLock<Arc<crate::blocked::BlockedReporter>>,
    /// Streams of generator tasks this process consumes, by id (`crate::generator`).
    pub(crate) generators: DashMap<ObjectId, Arc<crate::generator::GeneratorState>>,
}

static TOKIO: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static CURRENT: RwLock<Option<Arc<CoreWorker>>> = RwLock::new(None);

/// The process's async runtime (created on first use, lives as long as the process).
pub(crate) fn tokio_runtime() -> &'static tokio::runtime::Runtime {
    TOKIO.get_or_init(|| {
        // One runtime thread by default, as Ray's core worker has one event loop: it only
        // moves messages (user code runs on user threads and the executor), and a second
        // thread mostly wakes up to find nothing to steal, which costs every call a
        // context switch or two. `IONET_RUNTIME_THREADS` sets another count.
        let threads = std::env::var(RUNTIME_THREADS_ENV).ok().and_then(|text| text.parse::<usize>().ok());
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads.unwrap_or(1).max(1));
        builder
            .thread_name("ionet")
            .enable_all()
            .build()
            .expect("the ionet runtime cannot start: the OS refused threads")
    })
}

pub(crate) fn install(worker: Arc<CoreWorker>) {
    *CURRENT.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(worker);
}

pub(crate) fn uninstall() -> Option<Arc<CoreWorker>> {
    CURRENT.write().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
}

pub(crate) fn current() -> IonetResult<Arc<CoreWorker>> {
    CURRENT
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .ok_or_else(|| IonetError::FailedPrecondition("ionet is not initialised: call ionet::init() first".into()))
}

fn current_or_panic() -> Arc<CoreWorker> {
    current().unwrap_or_else(|err| panic!("{err}"))
}

/// Runs `future` to completion from synchronous code (user threads, task threads).
/// From a runtime thread (a short call running in place that waits after all), the
/// runtime first moves its other work to another thread.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio_runtime().handle().block_on(future))
}

/// The last counted handle of `id` is gone: the owner forgets it (unless a handle was
/// revived meanwhile) and frees its stored copies.
pub(crate) fn forget_object(id: &ObjectId) {
    if let Ok(worker) = current() {
        if let Some((_, entry)) = worker.objects.remove_if(id, |_, entry| entry.references.load(Ordering::Acquire) == 0)
        {
            if let ObjectState::Stored(stored) = &*entry.state.borrow() {
                worker.free_stored(stored.clone());
            }
        }
    }
}

/// A ref arriving in a process: counted again in its owner, borrowed elsewhere.
pub(crate) fn revive_reference<T>(id: ObjectId, owner: &str) -> ObjectRef<T> {
    if let Ok(worker) = current() {
        if *worker.address == *owner {
            if let Some(entry) = worker.objects.get(&id) {
                entry.add_reference();
                return ObjectRef::counted(id, worker.address.clone(), entry.clone());
            }
            return ObjectRef::borrowed(id, worker.address.clone());
        }
    }
    ObjectRef::borrowed(id, owner.into())
}

impl CoreWorker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        address: String,
        node_id: NodeId,
        node_address: String,
        job_id: JobId,
        token: ClusterToken,
        gpu_ids: Vec<u32>,
        is_worker: bool,
        gcs_address: String,
        worker_command: WorkerCommand,
        namespace: String,
        inline_threshold: usize,
        store_dir: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            address: address.into(),
            node_id,
            node_address,
            job_id,
            token,
            gpu_ids,
            is_worker,
            gcs_address,
            objects: DashMap::new(),
            pools: DashMap::new(),
            worker_command,
            namespace,
            caller_id: ObjectId::random(),
            actor_clients: DashMap::new(),
            hosted: OnceLock::new(),
            executor: OnceLock::new(),
            executor_pending: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(Mutex::new(())),
            run_times: DashMap::new(),
            stopping: watch::channel(false).0,
            channels: DashMap::new(),
            running_tasks: DashMap::new(),
            children: DashMap::new(),
            stealable: DashMap::new(),
            inline_running: DashMap::new(),
            outgoing_streams: DashMap::new(),
            cancelled: Mutex::new(std::collections::HashSet::new()),
            any_cancelled: AtomicBool::new(false),
            inline_threshold,
            handle: tokio_runtime().handle().clone(),
            store: (!store_dir.is_empty()).then(|| ionet_object_store::StoreClient::open(store_dir).ok()).flatten(),
            blocked: OnceLock::new(),
            generators: DashMap::new(),
        })
    }

    /// The calling thread is about to wait for objects: in a worker, its daemon lends the
    /// lease's CPUs to other tasks until the guard drops.
    pub(crate) fn waiting_for_objects(&self) -> Option<crate::blocked::BlockedGuard> {
        self.blocked.get().map(|reporter| reporter.enter())
    }

    /// [`block_on`] for a wait for objects (see [`CoreWorker::waiting_for_objects`]).
    pub(crate) fn block_on_objects<F: std::future::Future>(&self, future: F) -> F::Output {
        let _blocked = self.waiting_for_objects();
        block_on(future)
    }

    /// A channel to `address`, opened once and shared.
    pub(crate) fn channel(&self, address: &str) -> IonetResult<AuthChannel> {
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        // A lazy channel spawns its connection task: it needs the runtime, even when
        // called from a user thread.
        let _entered = self.handle.enter();
        let channel = rpc::connect_lazy(address, &self.token, Duration::from_secs(5))?;
        self.channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Runs `job` (a call of `function`) after every job given before it, one at a time.
    ///
    /// User code runs on the executor thread, off the runtime's threads, so it may block
    /// (or call `get`) as long as it likes. A call of a function that recently ran in
    /// under `INLINE_LIMIT` runs in place instead when nothing is queued: waking the
    /// executor and then the runtime again for the reply costs more than such a call.
    pub(crate) fn run_in_order(&self, function: Option<&str>, job: Job) {
        let short = function
            .and_then(|function| self.run_times.get(function).map(|micros| *micros < INLINE_LIMIT_MICROS))
            .unwrap_or(false);
        if short && self.executor_pending.load(Ordering::SeqCst) == 0 {
            if let Ok(_running) = self.running.try_lock() {
                job();
                return;
            }
        }
        let executor = self.executor.get_or_init(|| {
            let (jobs, queued) = std::sync::mpsc::channel::<Job>();
            let (handle, pending, running) = (self.handle.clone(), self.executor_pending.clone(), self.running.clone());
            std::thread::Builder::new()
                .name("ionet-executor".into())
                // Room for tasks run inside the tasks waiting for them (`crate::inline`).
                .stack_size(EXECUTOR_STACK_BYTES)
                .spawn(move || {
                    let _runtime = handle.enter(); // for user code that spawns or needs a handle
                    crate::inline::mark_executor_thread();
                    while let Ok(job) = queued.recv() {
                        let turn = running.lock().unwrap_or_else(|p| p.into_inner());
                        job();
                        drop(turn);
                        pending.fetch_sub(1, Ordering::SeqCst);
                    }
                })
                .expect("the OS refused the executor thread");
            jobs
        });
        self.executor_pending.fetch_add(1, Ordering::SeqCst);
        if executor.send(job).is_err() {
            self.executor_pending.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("the executor thread is gone: a job was dropped");
        }
    }

    /// Notes how long a call of `function` ran.
    pub(crate) fn record_run(&self, function: &str, micros: u64) {
        match self.run_times.get_mut(function) {
            Some(mut average) => *average = (*average * 3 + micros) / 4,
            None => {
                self.run_times.insert(function.to_string(), micros);
            }
        }
    }

    /// Fails the pending object `id` (owned here) with `Cancelled` and stops its task:
    /// `force` kills the worker running it, else that worker is told, and with
    /// `recursive` it cancels the tasks the cancelled one submitted in turn. An object
    /// already produced is left alone.
    pub(crate) fn cancel_owned(&self, id: &ObjectId, force: bool, recursive: bool) -> IonetResult<()> {
        let Some(entry) = self.objects.get(id).map(|entry| entry.clone()) else {
            return Err(IonetError::InvalidArgument(format!(
                "object {} is not owned by this process: only its owner can cancel it",
                id.short()
            )));
        };
        if entry.is_settled() {
            return Ok(());
        }
        entry.settle(ObjectState::Failed(Arc::new(IonetError::Cancelled(format!(
            "object {} was cancelled by its owner",
            id.short()
        )))));
        if force {
            self.kill_running_task(id);
        } else {
            self.notify_cancelled(id, recursive);
        }
        Ok(())
    }

    /// Cancels the pending tasks that `task` (running here) submitted, and theirs.
    pub(crate) fn cancel_children(&self, task: TaskId) {
        let Some((_, children)) = self.children.remove(&task) else { return };
        for child in children {
            // A child already finished, or whose every handle was dropped, is past cancelling.
            let _ = self.cancel_owned(&child, false, true);
        }
    }

    /// Tells the worker running the task or actor call producing `id` (if any is) that
    /// it was cancelled. Best effort: a call that already ended is past cancelling.
    pub(crate) fn notify_cancelled(&self, id: &ObjectId, recursive: bool) {
        if let Some(task_id) = self.inline_running.get(id).map(|entry| *entry) {
            // Running here, inside the task that waits for it.
            let worker = current_or_panic();
            self.handle.spawn_blocking(move || crate::context::cancelled(&worker, task_id, recursive));
            return;
        }
        let target = self
            .running_tasks
            .get(id)
            .map(|entry| (entry.1.worker_address.clone(), entry.2))
            .or_else(|| self.actor_clients.iter().find_map(|client| client.running_call(id)));
        let Some((address, task_id)) = target else { return };
        let Ok(channel) = self.channel(&address) else { return };
        self.handle.spawn(async move {
            let request = ionet_common::rpc::proto::worker::CancelTaskRequest { task_id: task_id.to_vec(), recursive };
            if let Err(status) = CoreWorkerClient::new(channel).cancel_task(request).await {
                tracing::debug!(error = %status.message(), "the cancel did not reach the worker");
            }
        });
    }

    /// Cancels the task producing `id` if it is running: its lease goes back as failed,
    /// so the node daemon kills the worker. Tasks queued behind it on that worker are
    /// pushed again without spending an attempt.
    pub(crate) fn kill_running_task(&self, id: &ObjectId) {
        if let Some((_, (pool, lease, _))) = self.running_tasks.remove(id) {
            lease.killed_by_cancel.store(true, Ordering::SeqCst);
            let worker = current_or_panic();
            self.handle.spawn(async move { worker.return_lease(&pool, &lease, true).await });
        }
    }

    /// A new owned object in `state`, with one handle.
    pub(crate) fn new_object<T>(&self, id: ObjectId, state: ObjectState) -> ObjectRef<T> {
        self.new_object_holding(id, state, Vec::new())
    }

    /// A new owned object whose value has the refs `holding` inside.
    pub(crate) fn new_object_holding<T>(
        &self,
        id: ObjectId,
        state: ObjectState,
        holding: Vec<ObjectRef<()>>,
    ) -> ObjectRef<T> {
        let (sender, _) = watch::channel(state);
        let entry = Arc::new(ObjectEntry { state: sender, references: AtomicUsize::new(1), _holding: holding });
        self.objects.insert(id, entry.clone());
        ObjectRef::counted(id, self.address.clone(), entry)
    }

    /// Gives a pending object its outcome (one already settled, say cancelled, keeps its own).
    pub(crate) fn settle_object(&self, id: &ObjectId, state: ObjectState) {
        if let Some(entry) = self.objects.get(id) {
            entry.settle(state);
        }
        // Else every handle was dropped before the task finished: nobody wants the value.
    }

    /// Whether this process owns the object and it is no longer pending (no waiting).
    pub(crate) fn is_ready_here(&self, id: &ObjectId) -> bool {
        self.objects.get(id).is_some_and(|entry| entry.is_settled())
    }

    /// Waits until the object is no longer pending, here or at its owner.
    pub(crate) async fn resolve(
        &self,
        id: ObjectId,
        owner: &str,
        deadline: Option<Instant>,
    ) -> IonetResult<ObjectState> {
        let entry = self.objects.get(&id).map(|entry| entry.clone());
        if let Some(entry) = entry {
            let mut receiver = entry.state.subscribe();
            let ready = receiver.wait_for(|state| !matches!(state, ObjectState::Pending));
            let state = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), ready)
                    .await
                    .map_err(|_| IonetError::Timeout(format!("object {} not ready in time", id.short())))?,
                None => ready.await,
            }
            .map_err(|_| IonetError::ObjectLost(format!("object {} was freed", id.short())))?
            .clone();
            return Ok(state);
        }
        if owner == &*self.address {
            return Err(IonetError::ObjectLost(format!("object {} was freed by its owner (this process)", id.short())));
        }
        let mut client = CoreWorkerClient::new(self.channel(owner)?);
        loop {
            let wait_ms = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
                None => 10_000,
            };
            let reply = client
                .get_object(GetObjectRequest { object_id: id.to_vec(), timeout_ms: wait_ms })
                .await
                .map_err(|status| {
                    IonetError::ObjectLost(format!(
                        "owner {owner} of object {} is unreachable: {}",
                        id.short(),
                        status.message()
                    ))
                })?
                .into_inner();
            match reply.result {
                Some(get_object_reply::Result::Inline(bytes)) => return Ok(ObjectState::Inline(Arc::new(bytes))),
                Some(get_object_reply::Result::Stored(stored)) => return Ok(ObjectState::Stored(stored)),
                Some(get_object_reply::Result::Failure(failure)) => {
                    return Ok(ObjectState::Failed(Arc::new(IonetError::TaskFailed {
                        function: failure.function_name,
                        node: hex_short(&failure.node_id),
                        message: failure.message,
                    })))
                }
                Some(get_object_reply::Result::Unknown(why)) => return Err(IonetError::ObjectLost(why)),
                Some(get_object_reply::Result::Pending(_)) | None => {
                    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(IonetError::Timeout(format!("object {} not ready in time", id.short())));
                    }
                }
            }
        }
    }

    /// The value's bytes, wherever it is.
    pub(crate) async fn fetch(&self, id: ObjectId, owner: &str, deadline: Option<Instant>) -> IonetResult<Bytes> {
        match self.resolve(id, owner, deadline).await? {
            ObjectState::Inline(bytes) => Ok(Bytes::Owned(bytes)),
            ObjectState::Failed(error) => Err(copy_error(&error)),
            ObjectState::Stored(stored) => self.read_stored(&stored).await,
            ObjectState::Pending => unreachable!("resolve waits past pending"),
        }
    }

    fn pool(
        &self,
        demand: &ResourceSet,
        wire: WireStrategy,
        bundle: Option<(ionet_common::PlacementGroupId, u32)>,
        max_calls: Option<(&str, u32)>,
    ) -> Arc<ShapePool> {
        let key = format!("{demand}|{wire:?}|{bundle:?}|{max_calls:?}");
        if let Some(pool) = self.pools.get(&key) {
            return pool.clone();
        }
        let pool = Arc::new(ShapePool {
            request: RequestWorkerLeaseRequest {
                job_id: self.job_id.to_vec(),
                resources: Some(demand.into()),
                strategy: Some(wire),
                worker_command: Some(self.worker_command.clone()),
                no_spillback: false,
                placement_group_id: bundle.map(|(group, _)| group.to_vec()).unwrap_or_default(),
                bundle_index: bundle.map(|(_, index)| index).unwrap_or_default(),
                holder_address: self.address.to_string(),
                depth: 1,
            },
            leases: Mutex::new(Vec::new()),
            notify: Notify::new(),
            requesting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            infeasible: Mutex::new(None),
            run_micros: Mutex::new(HashMap::new()),
            next_bundle: AtomicUsize::new(0),
            max_calls: max_calls.map_or(0, |(_, calls)| calls),
        });
        self.pools.entry(key).or_insert(pool).clone()
    }

    /// A slot on one of the shape's leases (the least busy with room), asking the
    /// cluster for more leases while tasks wait. `None`: the task was taken meanwhile by
    /// the process that submitted it, to run itself (`crate::inline`); `unclaimed` says
    /// it still may be (a retry was claimed by its first attempt).
    async fn acquire(
        self: &Arc<Self>,
        pool: &Arc<ShapePool>,
        estimate: u64,
        spec: &TaskSpec,
        unclaimed: bool,
    ) -> IonetResult<Option<Arc<Lease>>> {
        let depth = spec.depth;
        pool.waiting.fetch_add(1, Ordering::SeqCst);
        let since = tokio::time::Instant::now();
        let mut next_report = since + LONG_LEASE_WAIT;
        let result = loop {
            let notified = pool.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let taken = spec.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if unclaimed && spec.claimed.load(Ordering::SeqCst) {
                break Ok(None); // nobody else needs a lease asked for it
            }
            if let Some(lease) = take_slot(pool, estimate) {
                break Ok(Some(lease));
            }
            if let Some(reason) = pool.infeasible.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                break Err(IonetError::Infeasible(reason));
            }
            let waiting = pool.waiting.load(Ordering::SeqCst);
            if pool.requesting.load(Ordering::SeqCst) < waiting.min(MAX_PENDING_LEASE_REQUESTS) {
                pool.requesting.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(request_lease(self.clone(), pool.clone(), depth));
            }
            let report = tokio::time::sleep_until(next_report);
            tokio::select! {
                _ = notified => {}
                _ = taken => {}
                _ = report => {
                    next_report += next_report.duration_since(since);
                    let leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
                    let busy: Vec<usize> = leases.iter().map(|lease| lease.in_flight.load(Ordering::SeqCst)).collect();
                    tracing::warn!(
                        task = %spec.task_id.short(),
                        function = spec.function,
                        waited = ?since.elapsed(),
                        waiting = pool.waiting.load(Ordering::SeqCst),
                        requesting = pool.requesting.load(Ordering::SeqCst),
                        calls_per_lease = ?busy,
                        "a task is waiting long for a worker"
                    );
                }
            }
        };
        if pool.waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last waiter has heard the verdict; later tasks ask the cluster again.
            pool.infeasible.lock().unwrap_or_else(|p| p.into_inner()).take();
        } else if matches!(result, Ok(Some(_))) {
            // Room may be left for the next waiter (a deeper pipeline, a fresh lease).
            pool.notify.notify_one();
        }
        result
    }

    /// A task on `lease` (expected to run `estimate`) has answered.
    fn release(&self, pool: &ShapePool, lease: &Lease, estimate: u64) {
        {
            let _leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
            lease.queued_micros.fetch_sub(estimate, Ordering::SeqCst);
            if lease.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                *lease.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
        }
        pool.notify.notify_one();
    }

    /// A lease of a pool with `max_calls` that has run its last call goes back with its
    /// worker discarded: the daemon ends the process and starts a fresh one when asked.
    async fn retire_if_spent(&self, pool: &ShapePool, lease: &Lease) {
        if pool.max_calls > 0
            && lease.started.load(Ordering::SeqCst) >= pool.max_calls
            && lease.in_flight.load(Ordering::SeqCst) == 0
        {
            self.return_lease(pool, lease, true).await;
        }
    }

    /// A fresh lease joins its pool.
    fn add_lease(&self, pool: &ShapePool, lease: Lease) {
        pool.leases.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::new(lease));
        pool.notify.notify_one();
    }

    /// Gives a lease back to its daemon (once, whoever asks first).
    async fn return_lease(&self, pool: &ShapePool, lease: &Lease, worker_failed: bool) {
        if lease.returned.swap(true, Ordering::SeqCst) {
            return;
        }
        pool.leases.lock().unwrap_or_else(|p| p.into_inner()).retain(|held| !std::ptr::eq(&**held, lease));
        self.send_lease_back(lease, worker_failed).await;
    }

    async fn send_lease_back(&self, lease: &Lease, worker_failed: bool) {
        if let Ok(channel) = self.channel(&lease.node_address) {
            let mut node = NodeManagerClient::new(channel);
            let request = ReturnWorkerLeaseRequest { lease_id: lease.lease_id.clone(), worker_failed };
            if let Err(status) = node.return_worker_lease(request).await {
                // The daemon also ends a lease whose worker died; a lost return is logged, not fatal.
                tracing::debug!(error = %status.message(), "returning a lease failed");
            }
        }
    }

    /// Returns leases idle for `linger` whose shape nobody waits for (`everything`: all
    /// leases, busy or not). They leave their pool under its lock, so no task takes a slot
    /// on one being given back. Returns how many went back.
    pub(crate) async fn return_idle_leases(&self, everything: bool, linger: Duration) -> usize {
        let mut doomed = Vec::new();
        for pool in self.pools.iter() {
            if !everything && pool.waiting.load(Ordering::SeqCst) > 0 {
                continue;
            }
            let mut leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            leases.retain(|lease| {
                let idle = lease.in_flight.load(Ordering::SeqCst) == 0
                    && now.duration_since(*lease.idle_since.lock().unwrap_or_else(|p| p.into_inner())) >= linger;
                let leaving = (everything || idle) && !lease.returned.swap(true, Ordering::SeqCst);
                if leaving {
                    // A worker that ran calls with `max_calls` is not handed to anyone else.
                    let discard = pool.max_calls > 0 && lease.started.load(Ordering::SeqCst) > 0;
                    doomed.push((lease.clone(), discard));
                }
                !leaving
            });
        }
        let returned = doomed.len();
        for (lease, discard) in doomed {
            self.send_lease_back(&lease, discard).await;
        }
        returned
    }
}

/// Takes a slot for a task expected to run `estimate` on the pool's least busy lease with
/// room: an idle one, or one whose queued work stays within the pipeline budget. Short
/// tasks thus queue several deep on a worker (its next task is there when one ends),
/// while a long or unknown task waits for an idle worker (or a new lease) rather than
/// behind another, and nothing queues behind it.
fn take_slot(pool: &ShapePool, estimate: u64) -> Option<Arc<Lease>> {
    let leases = pool.leases.lock().unwrap_or_else(|p| p.into_inner());
    let lease = leases
        .iter()
        .filter(|lease| {
            let in_flight = lease.in_flight.load(Ordering::SeqCst);
            let spent = pool.max_calls > 0 && lease.started.load(Ordering::SeqCst) >= pool.max_calls;
            !spent
                && (in_flight == 0
                    || (in_flight < MAX_PIPELINE
                        && lease.queued_micros.load(Ordering::SeqCst) + estimate <= PIPELINE_BUDGET_MICROS))
        })
        .min_by_key(|lease| lease.in_flight.load(Ordering::SeqCst))?;
    if pool.max_calls > 0 {
        lease.started.fetch_add(1, Ordering::SeqCst);
    }
    lease.in_flight.fetch_add(1, Ordering::SeqCst);
    lease.queued_micros.fetch_add(estimate, Ordering::SeqCst);
    Some(lease.clone())
}

pub(crate) fn hex_short(bytes: &[u8]) -> String {
    let mut text =
        ionet_common::ids::NodeId::from_bytes(bytes).map(|id| id.short()).unwrap_or_else(|_| "unknown".into());
    text.truncate(8);
    text
}

/// Asks the local daemon for a lease, following spillbacks; puts it in the pool.
async fn request_lease(worker: Arc<CoreWorker>, pool: Arc<ShapePool>, depth: u32) {
    let mut address = worker.node_address.clone();
    let mut request = pool.request.clone();
    request.depth = depth;
    let mut failures = 0u32;
    let outcome = loop {
        // A bundle's lease is asked of the node holding the bundle, once the group is placed.
        if !request.placement_group_id.is_empty() {
            match bundle_address(&worker, &mut request, &pool.next_bundle).await {
                Ok(bundle_node) => {
                    address = bundle_node;
                    request.no_spillback = true;
                }
                Err(reason) => break Err(reason),
            }
        }
        let channel = match worker.channel(&address) {
            Ok(channel) => channel,
            Err(err) => break Err(err.to_string()),
        };
        match NodeManagerClient::new(channel).request_worker_lease(request.clone()).await {
            Ok(reply) => match reply.into_inner().outcome {
                Some(Outcome::Granted(granted)) => break Ok((granted, address)),
                Some(Outcome::Spillback(spillback)) => {
                    address = spillback.node_address;
                    request.no_spillback = true;
                }
                Some(Outcome::Infeasible(reason)) => break Err(reason),
                None => break Err("the node daemon answered a lease request with nothing".into()),
            },
            Err(status) => {
                failures += 1;
                tracing::warn!(node = %address, error = %status.message(), "lease request failed; retrying");
                if status.code() == tonic::Code::InvalidArgument || failures > 50 {
                    break Err(format!("lease requests to {address} keep failing: {}", status.message()));
                }
                // Back to our own node, which knows the cluster afresh.
                address = worker.node_address.clone();
                request.no_spillback = false;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    pool.requesting.fetch_sub(1, Ordering::SeqCst);
    match outcome.and_then(|(granted, node_address)| {
        let channel = worker.channel(&granted.worker_address).map_err(|err| err.to_string())?;
        Ok(Lease {
            lease_id: granted.lease_id,
            node_address,
            worker_address: granted.worker_address.clone(),
            tasks: TaskStream::open(&worker.handle, channel),
            in_flight: AtomicUsize::new(0),
            queued_micros: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            returned: AtomicBool::new(false),
            killed_by_cancel: AtomicBool::new(false),
            started: AtomicU32::new(0),
        })
    }) {
        Ok(lease) => worker.add_lease(&pool, lease),
        Err(reason) => {
            tracing::warn!(%reason, "lease request refused");
            *pool.infeasible.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            pool.notify.notify_waiters();
        }
    }
}

/// The address of the node holding the request's bundle, waiting while the group is pending.
/// For a request naming any bundle (`ANY_BUNDLE`), the bundle is chosen here, in turn
/// (`rotation`), and written into the request.
async fn bundle_address(
    worker: &CoreWorker,
    request: &mut RequestWorkerLeaseRequest,
    rotation: &AtomicUsize,
) -> Result<String, String> {
    let group =
        ionet_common::PlacementGroupId::from_bytes(&request.placement_group_id).map_err(|err| err.to_string())?;
    let mut failures = 0u32;
    loop {
        use ionet_common::rpc::proto::gcs::PlacementGroupState;
        match crate::placement_group::get_group(worker, &group).await {
            Ok(reply) => match PlacementGroupState::try_from(reply.state).unwrap_or(PlacementGroupState::Pending) {
                PlacementGroupState::Created => {
                    if request.bundle_index == crate::options::ANY_BUNDLE && !reply.bundle_node_addresses.is_empty() {
                        let turn = rotation.fetch_add(1, Ordering::Relaxed) % reply.bundle_node_addresses.len();
                        request.bundle_index = turn as u32;
                    }
                    return reply.bundle_node_addresses.get(request.bundle_index as usize).cloned().ok_or_else(|| {
                        format!(
                            "placement group {} has no bundle {} ({} bundles)",
                            group.short(),
                            request.bundle_index,
                            reply.bundle_node_addresses.len()
                        )
                    });
                }
                PlacementGroupState::Removed => return Err(format!("placement group {} was removed", group.short())),
                PlacementGroupState::Pending => {}
            },
            Err(IonetError::NotFound(message)) => return Err(message),
            Err(err) => {
                failures += 1;
                if failures > 50 {
                    return Err(format!("cannot read placement group {}: {err}", group.short()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) struct TaskSpec {
    pub(crate) task_id: TaskId,
    pub(crate) function: &'static str,
    /// What the task's run time is learnt under: its function (for Python, the Python
    /// function the generic task runs).
    profile: u64,
    options: TaskOptions,
    pub(crate) args: Vec<Arg>,
    pub(crate) return_id: ObjectId,
    /// The return object's entry (held by the caller's handle too).
    pub(crate) entry: Arc<ObjectEntry>,
    /// Its depth in the tree of tasks (1: submitted by a driver).
    pub(crate) depth: u32,
    /// Taken by whoever starts it first: its pushing future, once a lease came, or this
    /// process running it itself while it waits for it (`crate::inline`).
    pub(crate) claimed: AtomicBool,
    /// Told when this process took it to run itself: its pushing future stops waiting for
    /// a lease at once (else every such task would still cost a lease, and a worker).
    pub(crate) taken: Notify,
}

impl TaskSpec {
    /// Whether its arguments can be read now, without waiting for another task.
    pub(crate) fn args_ready(&self, worker: &CoreWorker) -> bool {
        self.args.iter().all(|arg| match arg {
            Arg::Ref(reference) => worker.is_ready_here(&reference.id()),
            _ => true,
        })
    }
}

/// `f::remote(..)`: creates the return object and starts the task.
pub(crate) fn submit_task<R>(
    function: &'static str,
    profile_key: &[u8],
    options: TaskOptions,
    args: Vec<Arg>,
) -> ObjectRef<R> {
    let worker = current_or_panic();
    let profile = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (function, profile_key).hash(&mut hasher);
        hasher.finish()
    };
    let return_id = ObjectId::random();
    let object = worker.new_object(return_id, ObjectState::Pending);
    let entry = object.entry.clone().expect("a new object is counted");
    let depth = crate::context::child_depth();
    if let Some(parent) = crate::context::current_task_id() {
        worker.children.entry(parent).or_default().push(return_id);
    }
    let stealable = crate::inline::eligible(&worker, &options);
    let spec = Arc::new(TaskSpec {
        task_id: TaskId::random(),
        function,
        profile,
        options,
        args,
        return_id,
        entry,
        depth,
        claimed: AtomicBool::new(false),
        taken: Notify::new(),
    });
    if stealable {
        worker.stealable.insert(return_id, spec.clone());
    }
    let runner = worker.clone();
    worker.handle.spawn(async move {
        match execute(&runner, &spec).await {
            Ok(None) => {} // run by this process while it waited: settled there
            Ok(Some(state)) => {
                spec.entry.settle(state);
            }
            Err(error) => {
                spec.entry.settle(ObjectState::Failed(Arc::new(error)));
            }
        }
        if stealable {
            runner.stealable.remove(&return_id);
        }
        drop(spec); // releases the argument refs held while the task was pending
    });
    object
}

async fn resolve_args(worker: &CoreWorker, spec: &TaskSpec) -> IonetResult<Vec<TaskArg>> {
    resolve_call_args(worker, spec.function, &spec.args).await
}

/// The arguments of a call as they travel: values inline, refs resolved to their value or
/// its location (waiting until the objects exist).
pub(crate) async fn resolve_call_args(
    worker: &CoreWorker,
    function: &str,
    call_args: &[Arg],
) -> IonetResult<Vec<TaskArg>> {
    let mut args = Vec::with_capacity(call_args.len());
    for (index, arg) in call_args.iter().enumerate() {
        let value = match arg {
            Arg::Value(Ok(bytes)) | Arg::Holding(bytes, _) => task_arg::Value::Inline(bytes.clone()),
            Arg::Value(Err(why)) => {
                return Err(IonetError::InvalidArgument(format!("argument {index} of {function}: {why}")))
            }
            Arg::Ref(reference) => match worker.resolve(reference.id(), reference.owner_address(), None).await? {
                ObjectState::Inline(bytes) => task_arg::Value::Inline(bytes.to_vec()),
                ObjectState::Stored(stored) => task_arg::Value::Stored(stored),
                ObjectState::Failed(error) => return Err(copy_error(&error)),
                ObjectState::Pending => unreachable!("resolve waits past pending"),
            },
        };
        args.push(TaskArg { value: Some(value) });
    }
    Ok(args)
}

/// Pushes the task to a leased worker (retrying per its options) and gives its outcome;
/// `None` when this process ran it itself meanwhile (see `crate::inline`).
async fn execute(worker: &Arc<CoreWorker>, spec: &TaskSpec) -> IonetResult<Option<ObjectState>> {
    let demand = spec.options.demand()?;
    let max_calls = (spec.options.max_calls > 0).then_some((spec.function, spec.options.max_calls));
    let strategy = spec.options.wire_strategy()?;
    let pool = worker.pool(&demand, strategy, spec.options.placement_group, max_calls);
    let mut attempt = 0u32;
    let mut claimed = false;
    loop {
        let args = resolve_args(worker, spec).await?;
        let estimate = pool.estimate(spec.profile);
        let Some(lease) = worker.acquire(&pool, estimate, spec, !claimed).await? else {
            return Ok(None); // run by this process while it waited: settled there
        };
        // Known before the settled check, so a forced cancel either finds the lease or is
        // seen by the check.
        worker.running_tasks.insert(spec.return_id, (pool.clone(), lease.clone(), spec.task_id));
        if spec.entry.is_settled() {
            // Cancelled while it waited: it never runs.
            worker.running_tasks.remove(&spec.return_id);
            worker.release(&pool, &lease, estimate);
            return Err(IonetError::Cancelled(format!("task {} was cancelled", spec.task_id.short())));
        }
        if !claimed {
            if spec.claimed.swap(true, Ordering::SeqCst) {
                // Its caller ran it itself while waiting for it; the lease serves others.
                worker.running_tasks.remove(&spec.return_id);
                worker.release(&pool, &lease, estimate);
                return Ok(None);
            }
            claimed = true;
        }
        let request = PushTaskRequest {
            task_id: spec.task_id.to_vec(),
            job_id: worker.job_id.to_vec(),
            function_name: spec.function.to_string(),
            args,
            attempt,
            return_object_id: spec.return_id.to_vec(),
            inline_threshold: worker.inline_threshold as u64,
            sequence: 0,
            depth: spec.depth,
        };
        let pushed = lease.tasks.push(request).await;
        worker.running_tasks.remove(&spec.return_id);
        if spec.entry.is_settled() {
            // Cancelled meanwhile: its answer no longer matters.
            match pushed {
                Ok(_) => worker.release(&pool, &lease, estimate),
                Err(_) => worker.return_lease(&pool, &lease, true).await,
            }
            return Err(IonetError::Cancelled(format!("task {} was cancelled", spec.task_id.short())));
        }
        match pushed {
            Ok(reply) => {
                pool.observe(spec.profile, reply.run_micros);
                worker.release(&pool, &lease, estimate);
                worker.retire_if_spent(&pool, &lease).await;
                match reply.result {
                    Some(push_task_reply::Result::Inline(bytes)) => {
                        return Ok(Some(ObjectState::Inline(Arc::new(bytes))))
                    }
                    Some(push_task_reply::Result::Stored(stored)) => return Ok(Some(ObjectState::Stored(stored))),
                    Some(push_task_reply::Result::Failure(failure)) => {
                        let retryable = failure.kind != task_failure::Kind::FinalError as i32;
                        if spec.options.retry_exceptions && retryable && attempt < spec.options.max_retries {
                            attempt += 1;
                            continue;
                        }
                        return Err(IonetError::TaskFailed {
                            function: failure.function_name,
                            node: hex_short(&failure.node_id),
                            message: failure.message,
                        });
                    }
                    None => {
                        return Err(IonetError::Internal(format!("worker sent an empty reply for {}", spec.function)))
                    }
                }
            }
            Err(status) => {
                worker.return_lease(&pool, &lease, true).await;
                if lease.killed_by_cancel.load(Ordering::SeqCst) {
                    continue; // another task's forced cancel killed the worker: not this one's fault
                }
                if attempt < spec.options.max_retries {
                    attempt += 1;
                    tracing::warn!(task = %spec.task_id.short(), function = spec.function, attempt, error = %status.message(), "worker failed; retrying the task");
                    continue;
                }
                return Err(IonetError::WorkerCrashed {
                    function: spec.function.to_string(),
                    attempts: attempt + 1,
                    reason: status.message().to_string(),
                });
            }
        }
    }
}

/// The task stream of one lease: tasks go out numbered, each push waits for the reply with
/// its number. When the stream ends, every push still waiting gets the stream's error.
pub(crate) struct TaskStream {
    outgoing: mpsc::UnboundedSender<PushTaskRequest>,
    waiting: Arc<Mutex<WaitingPushes>>,
    next: AtomicU64,
}

#[derive(Default)]
struct WaitingPushes {
    replies: HashMap<u64, oneshot::Sender<Result<PushTaskReply, Status>>>,
    /// Why the stream ended, once it has.
    ended: Option<Status>,
}

/// Tasks sent in one message at most.
const MAX_TASK_BATCH: usize = 256;

impl TaskStream {
    fn open(handle: &tokio::runtime::Handle, channel: AuthChannel) -> TaskStream {
        let (outgoing, queued) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(WaitingPushes::default()));
        handle.spawn(read_task_replies(channel, queued, waiting.clone()));
        TaskStream { outgoing, waiting, next: AtomicU64::new(0) }
    }

    async fn push(&self, mut request: PushTaskRequest) -> Result<PushTaskReply, Status> {
        request.sequence = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, replied) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(status) = &waiting.ended {
                return Err(status.clone());
            }
            waiting.replies.insert(request.sequence, reply);
        }
        if self.outgoing.send(request).is_err() {
            return Err(Status::unavailable("the lease's task stream is closed"));
        }
        replied.await.unwrap_or_else(|_| Err(Status::unavailable("the lease's task stream was dropped")))
    }
}

async fn read_task_replies(
    channel: AuthChannel,
    queued: mpsc::UnboundedReceiver<PushTaskRequest>,
    waiting: Arc<Mutex<WaitingPushes>>,
) {
    let mut client =
        CoreWorkerClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let batches = futures::stream::unfold(queued, |mut queued| async move {
        let mut tasks = vec![queued.recv().await?];
        while tasks.len() < MAX_TASK_BATCH {
            match queued.try_recv() {
                Ok(task) => tasks.push(task),
                Err(_) => break,
            }
        }
        Some((TaskBatch { tasks }, queued))
    });
    let ended = match client.tasks(batches).await {
        Err(status) => status,
        Ok(response) => {
            let ended_by_worker = "the worker ended the lease's task stream";
            read_reply_batches(response.into_inner(), ended_by_worker, |replies| {
                let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                for NumberedReply { sequence, reply } in replies {
                    if let Some(sender) = waiting.replies.remove(&sequence) {
                        let _ = sender.send(Ok(reply.unwrap_or_default()));
                    }
                }
            })
            .await
        }
    };
    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    for (_, sender) in waiting.replies.drain() {
        let _ = sender.send(Err(ended.clone()));
    }
    waiting.ended = Some(ended);
}

/// Reads a stream of reply batches to its end, handing each batch to `each`; returns why
/// it ended (`ended_by_peer` when the other side closed it).
pub(crate) async fn read_reply_batches(
    mut replies: tonic::Streaming<ReplyBatch>,
    ended_by_peer: &str,
    mut each: impl FnMut(Vec<NumberedReply>),
) -> Status {
    loop {
        match replies.message().await {
            Ok(Some(batch)) => each(batch.replies),
            Ok(None) => return Status::unavailable(ended_by_peer),
            Err(status) => return status,
        }
    }
}

/// Background upkeep of a core worker: returns idle leases.
pub(crate) async fn upkeep(worker: std::sync::Weak<CoreWorker>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticker.tick().await;
        let Some(worker) = worker.upgrade() else { return };
        worker.return_idle_leases(false, LEASE_LINGER).await;
    }
}
