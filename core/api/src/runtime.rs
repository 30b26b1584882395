//! The core worker: the part of every ionet process (driver or worker) that owns
//! objects, submits tasks over leases, and serves `CoreWorker` RPCs.
//!
//! Ownership: the process that creates an object (`put`, or the return of a task it
//! submits) owns it: its entry lives in `objects` (`crate::owner`) with a count of local
//! handles (task arguments included), and it answers other processes' `GetObject` for
//! it. At zero handles the entry is removed. User code runs on `crate::executor`; peers
//! are reached through `crate::channels`.
//!
//! The parts around it: `crate::submit` (a task's spec and the future that runs it),
//! `crate::lease_pool` (leases held per shape, requests for more), `crate::slots` (which
//! lease a task joins, run-time estimates: pure), `crate::task_stream` (the stream to a
//! leased worker), `crate::inline` (work-first waits), `crate::actor` (actor calls),
//! `crate::service` (the RPCs this process serves).
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::rpc::proto::worker::{get_object_reply, GetObjectRequest, StoredObject};
use ionet_common::rpc::{self, AuthChannel, CoreWorkerClient};
use ionet_common::{IonetError, IonetResult, JobId, NodeId, ObjectId, TaskId, WorkerId};

use tokio::sync::watch;

use crate::channels::Channels;
use crate::executor::Executor;
pub(crate) use crate::executor::Job;
use crate::lease_pool::{Lease, ShapePool, LEASE_LINGER};
use crate::object_ref::ObjectRef;
use crate::object_store::Bytes;
use crate::owner::{KeepAlive, OwnedObjects};
pub(crate) use crate::owner::{ObjectEntry, ObjectState};
pub(crate) use crate::submit::{resolve_call_args, submit_task, TaskSpec};
pub(crate) use crate::task_stream::{read_reply_batches, TaskStream};

/// Runtime threads of a driver or worker process (default 1).
pub const RUNTIME_THREADS_ENV: &str = "IONET_RUNTIME_THREADS";

/// How many times one read makes a lost value again before it gives up.
const MAX_REBUILDS_PER_READ: usize = 8;

/// Values up to this size travel inline and live in their owner's memory.
pub(crate) const DEFAULT_INLINE_THRESHOLD: usize = 100 * 1024;

pub(crate) struct CoreWorker {
    pub(crate) address: Arc<str>,
    pub(crate) node_id: NodeId,
    pub(crate) node_address: String,
    pub(crate) job_id: JobId,
    /// What this process presents on every call: its job's credential (a driver's and
    /// every worker of the job hold the same, nothing broader).
    pub(crate) credential: Bearer,
    /// The head's public key: this process's server accepts credentials it signed...
    pub(crate) head_key: ionet_common::credential::Verifier,
    /// ...for jobs of this account (the job's own), and the head's own calls.
    pub(crate) account: Arc<str>,
    pub(crate) gpu_ids: Vec<u32>,
    pub(crate) is_worker: bool,
    /// This worker process's id (`None` in a driver).
    pub(crate) worker_id: Option<WorkerId>,
    pub(crate) gcs_address: String,
    pub(crate) objects: OwnedObjects,
    pub(crate) pools: DashMap<String, Arc<ShapePool>>,
    /// Told when a lease joins a pool: the upkeep, idle while none is held, wakes.
    pub(crate) leased: Arc<tokio::sync::Notify>,
    /// The runtime environment this worker was started inside (a task's or actor's own,
    /// [`ionet_common::worker_env::RUNTIME_ENV`]): what it starts inherits it.
    pub(crate) runtime_env: Option<ionet_common::rpc::proto::common::RuntimeEnv>,
    /// The driver's namespace (named actors are found in it by default).
    pub(crate) namespace: String,
    /// Identifies this process to the actors it calls (their per-caller call order).
    pub(crate) caller_id: ObjectId,
    pub(crate) actor_clients: DashMap<ionet_common::ActorId, Arc<crate::actor::ActorClient>>,
    /// The rows of the actors this process follows, on one stream to the head.
    pub(crate) actor_rows: crate::actor_rows::ActorRows,
    /// The class names actors this process learnt of are shown by, where it is not their
    /// registered one (a Python class's): their calls are listed under it.
    pub(crate) actor_classes: DashMap<ionet_common::ActorId, Arc<str>>,
    /// Refs inside the constructor arguments of actors this process created, held while
    /// the actor lives: its constructor runs again on every restart.
    pub(crate) actor_args: DashMap<ionet_common::ActorId, Vec<crate::object_ref::ObjectRef<()>>>,
    /// The actor this worker process hosts, once created.
    pub(crate) hosted: OnceLock<Arc<crate::actor::HostedActor>>,
    /// The actors this worker hosts as a shared process (none while `hosted` is set).
    pub(crate) guests: DashMap<ionet_common::ActorId, Arc<crate::actor::HostedActor>>,
    /// Guests whose constructor runs now, by id: (incarnation, its construction).
    pub(crate) constructing: DashMap<ionet_common::ActorId, (u32, Arc<crate::actor::Construction>)>,
    /// The thread that runs this worker's tasks and its ordered actor's calls.
    executor: Executor,
    /// Set when the process leaves the cluster: `Watch` streams end.
    pub(crate) stopping: watch::Sender<bool>,
    channels: Channels,
    /// The lease each pushed task (by return object) runs on, until it answers.
    pub(crate) running_tasks: DashMap<ObjectId, (Arc<ShapePool>, Arc<Lease>, TaskId)>,
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
    /// The holder's word on this process's leases, for the head's metering.
    pub(crate) held: crate::held::HeldLeases,
    /// What this process sees of the tasks it submits, for the head's state API.
    pub(crate) task_events: crate::task_events::TaskEvents,
    /// How this process's stored task returns were made, to make them again if lost.
    pub(crate) lineage: crate::lineage::Lineage,
    /// Objects lent to this process by the workers that own them, and lent by it.
    pub(crate) borrows: crate::borrows::Borrows,
    /// Tasks submitted here and not settled (a driver's `remote()` waits past a bound).
    pub(crate) pending: crate::submit::Pending,
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

pub(crate) fn current_or_panic() -> Arc<CoreWorker> {
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
        if let Some(state) = worker.objects.forget(id) {
            worker.lineage.forget(id);
            worker.borrows.forget_container(id);
            if let ObjectState::Stored(stored) = state {
                worker.free_stored(stored);
            }
        }
    }
}

/// A ref arriving in a process: counted again in its owner, borrowed elsewhere (sharing
/// the object's local count there, `crate::borrows`).
pub(crate) fn revive_reference<T>(id: ObjectId, owner: &str) -> ObjectRef<T> {
    if let Ok(worker) = current() {
        if *worker.address == *owner {
            if let Some(entry) = worker.objects.revive(&id) {
                return ObjectRef::counted(id, worker.address.clone(), entry);
            }
            return ObjectRef::borrowed(id, worker.address.clone(), None);
        }
        // One copy of the owner's address, shared by the handle and the call's record.
        let owner: Arc<str> = owner.into();
        let borrow = worker.borrows.holder(id, &owner);
        return ObjectRef::borrowed(id, owner, Some(borrow));
    }
    ObjectRef::borrowed(id, owner.into(), None)
}

impl CoreWorker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        address: String,
        node_id: NodeId,
        node_address: String,
        job_id: JobId,
        credential: Bearer,
        head_key: ionet_common::credential::Verifier,
        account: &str,
        gpu_ids: Vec<u32>,
        worker_id: Option<WorkerId>,
        gcs_address: String,
        namespace: String,
        inline_threshold: usize,
        store_dir: &str,
    ) -> Arc<Self> {
        let here = crate::task_events::Place { node_id: node_id.to_vec(), worker_address: address.clone() };
        Arc::new(Self {
            address: address.into(),
            node_id,
            node_address,
            job_id,
            credential: credential.clone(),
            head_key,
            account: account.into(),
            gpu_ids,
            is_worker: worker_id.is_some(),
            worker_id,
            gcs_address: gcs_address.clone(),
            objects: OwnedObjects::default(),
            pools: DashMap::new(),
            leased: Arc::new(tokio::sync::Notify::new()),
            runtime_env: inherited_runtime_env(worker_id.is_some()),
            namespace,
            caller_id: ObjectId::random(),
            actor_clients: DashMap::new(),
            actor_rows: Default::default(),
            actor_classes: DashMap::new(),
            actor_args: DashMap::new(),
            hosted: OnceLock::new(),
            guests: DashMap::new(),
            constructing: DashMap::new(),
            executor: Executor::new(tokio_runtime().handle().clone(), crate::inline::mark_executor_thread),
            stopping: watch::channel(false).0,
            channels: Channels::new(credential.clone(), tokio_runtime().handle().clone()),
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
            held: crate::held::HeldLeases::start(
                tokio_runtime().handle(),
                gcs_address.clone(),
                credential.clone(),
                job_id,
            ),
            task_events: crate::task_events::TaskEvents::start(
                tokio_runtime().handle(),
                gcs_address.clone(),
                credential.clone(),
                job_id.to_vec(),
                here,
            ),
            lineage: crate::lineage::Lineage::default(),
            borrows: crate::borrows::Borrows::default(),
            pending: crate::submit::Pending::from_env(),
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
        self.channels.get(address)
    }

    /// Runs `job` (a call of `function`) after every job given before it, one at a time
    /// (see [`Executor`]).
    pub(crate) fn run_in_order(&self, function: Option<&str>, job: Job) {
        self.executor.run_in_order(function, job)
    }

    /// An executor of a guest actor: its own thread and order.
    pub(crate) fn executor_beside(&self) -> Executor {
        self.executor.beside()
    }

    /// The actor `id` this process hosts (its own, or a guest), if any.
    pub(crate) fn hosted_actor(&self, id: &ionet_common::ActorId) -> Option<Arc<crate::actor::HostedActor>> {
        match self.hosted.get() {
            Some(hosted) => (hosted.id == *id).then(|| hosted.clone()),
            None => self.guests.get(id).map(|guest| guest.clone()),
        }
    }

    /// Whether this process hosts an actor (its own, or guests).
    pub(crate) fn hosts_actors(&self) -> bool {
        self.hosted.get().is_some() || !self.guests.is_empty()
    }

    /// Notes how long a call of `function` ran.
    pub(crate) fn record_run(&self, function: &str, micros: u64) {
        self.executor.record_run(function, micros)
    }

    /// Fails the pending object `id` (owned here) with `Cancelled` and stops its task:
    /// `force` kills the worker running it, else that worker is told, and with
    /// `recursive` it cancels the tasks the cancelled one submitted in turn. An object
    /// already produced is left alone.
    pub(crate) fn cancel_owned(self: &Arc<Self>, id: &ObjectId, force: bool, recursive: bool) -> IonetResult<()> {
        let Some(entry) = self.objects.get(id) else {
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
    pub(crate) fn cancel_children(self: &Arc<Self>, task: TaskId) {
        let Some((_, children)) = self.children.remove(&task) else { return };
        for child in children {
            // A child already finished, or whose every handle was dropped, is past cancelling.
            let _ = self.cancel_owned(&child, false, true);
        }
    }

    /// Tells the worker running the task or actor call producing `id` (if any is) that
    /// it was cancelled. Best effort: a call that already ended is past cancelling.
    pub(crate) fn notify_cancelled(self: &Arc<Self>, id: &ObjectId, recursive: bool) {
        if let Some(task_id) = self.inline_running.get(id).map(|entry| *entry) {
            // Running here, inside the task that waits for it.
            let worker = self.clone();
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
    pub(crate) fn kill_running_task(self: &Arc<Self>, id: &ObjectId) {
        if let Some((_, (pool, lease, _))) = self.running_tasks.remove(id) {
            lease.killed_by_cancel.store(true, Ordering::SeqCst);
            let worker = self.clone();
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
        let holding = (!holding.is_empty()).then(|| Box::new(holding) as KeepAlive);
        let entry = self.objects.insert(id, state, holding);
        ObjectRef::counted(id, self.address.clone(), entry)
    }

    /// Gives a pending object its outcome (one already settled, say cancelled, keeps its own).
    pub(crate) fn settle_object(&self, id: &ObjectId, state: ObjectState) {
        // An object whose every handle was dropped before the task finished is gone.
        self.objects.settle(id, state);
    }

    /// Whether this process owns the object and it is no longer pending (no waiting).
    pub(crate) fn is_ready_here(&self, id: &ObjectId) -> bool {
        self.objects.is_ready(id)
    }

    /// Waits until the object is no longer pending, here or at its owner.
    pub(crate) async fn resolve(
        &self,
        id: ObjectId,
        owner: &str,
        deadline: Option<Instant>,
    ) -> IonetResult<ObjectState> {
        if let Some(entry) = self.objects.get(&id) {
            return entry.wait(&id, deadline).await;
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
                .map_err(|status| match status.code() {
                    // The owner's process is gone (its port refuses): nobody holds the
                    // object's location or lineage any more.
                    tonic::Code::Unavailable => IonetError::OwnerDied(format!(
                        "owner {owner} of object {} is unreachable: {}",
                        id.short(),
                        status.message()
                    )),
                    _ => IonetError::ObjectLost(format!(
                        "owner {owner} of object {} could not say where it is: {}",
                        id.short(),
                        status.message()
                    )),
                })?
                .into_inner();
            match reply.result {
                Some(get_object_reply::Result::Inline(bytes)) => return Ok(ObjectState::Inline(Arc::new(bytes))),
                Some(get_object_reply::Result::Stored(stored)) => return Ok(ObjectState::Stored(stored)),
                Some(get_object_reply::Result::Error(detail)) => {
                    let error = rpc::status::error_of(detail).unwrap_or_else(|| {
                        IonetError::Internal(format!("object {} failed in an unknown way", id.short()))
                    });
                    return Ok(ObjectState::Failed(Arc::new(error)));
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
            ObjectState::Failed(error) => Err(ionet_common::rpc::status::copy_of(&error)),
            ObjectState::Stored(stored) => self.read_owned_or_rebuild(id, owner, stored, deadline).await,
            ObjectState::Pending => unreachable!("resolve waits past pending"),
        }
    }

    /// Reads a stored value; one this process owns that cannot be read (lost with its
    /// node) is made again from its lineage and read then.
    async fn read_owned_or_rebuild(
        &self,
        id: ObjectId,
        owner: &str,
        mut stored: StoredObject,
        deadline: Option<Instant>,
    ) -> IonetResult<Bytes> {
        // Each round re-runs its task (within its retries); a value lost again and again
        // (not for its node) is given up on after a few.
        for _ in 0..MAX_REBUILDS_PER_READ {
            let why = match self.read_stored(&stored).await {
                Err(IonetError::ObjectLost(why)) if self.objects.get(&id).is_some() => why,
                read => return read,
            };
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(IonetError::Timeout(format!("object {} was lost and not rebuilt in time", id.short())));
            }
            crate::submit::reconstruct(&current()?, id, stored, why).await?;
            stored = match self.resolve(id, owner, deadline).await? {
                ObjectState::Stored(stored) => stored,
                ObjectState::Inline(bytes) => return Ok(Bytes::Owned(bytes)),
                ObjectState::Failed(error) => return Err(ionet_common::rpc::status::copy_of(&error)),
                ObjectState::Pending => unreachable!("resolve waits past pending"),
            };
        }
        Err(IonetError::ObjectLost(format!(
            "object {} was rebuilt {MAX_REBUILDS_PER_READ} times and could still not be read",
            id.short()
        )))
    }
}

pub(crate) fn hex_short(bytes: &[u8]) -> String {
    let mut text =
        ionet_common::ids::NodeId::from_bytes(bytes).map(|id| id.short()).unwrap_or_else(|_| "unknown".into());
    text.truncate(8);
    text
}

/// How often the upkeep looks again while no lease is held (whether the worker is gone).
const UPKEEP_IDLE_CHECK: Duration = Duration::from_secs(10);

/// Background upkeep of a core worker: returns idle leases. While it holds none it
/// sleeps until one is added (a thousand idle actors' processes do not each wake ten
/// times a second for nothing).
pub(crate) async fn upkeep(worker: std::sync::Weak<CoreWorker>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(current) = worker.upgrade() else { return };
        let leased = current.leased.clone();
        let notified = leased.notified();
        tokio::pin!(notified);
        // Listening before looking: a lease added in between still wakes it.
        notified.as_mut().enable();
        if !current.holds_leases() {
            drop(current);
            let _ = tokio::time::timeout(UPKEEP_IDLE_CHECK, notified).await;
            continue;
        }
        current.return_idle_leases(false, LEASE_LINGER).await;
    }
}

/// The runtime environment a worker was started inside, if any (a driver: none).
fn inherited_runtime_env(is_worker: bool) -> Option<ionet_common::rpc::proto::common::RuntimeEnv> {
    let json = std::env::var(ionet_common::worker_env::RUNTIME_ENV).ok().filter(|_| is_worker)?;
    let parsed = serde_json::from_str(&json)
        .map_err(|err| IonetError::InvalidArgument(err.to_string()))
        .and_then(|value| ionet_common::jobs::task_runtime_env(&value));
    match parsed {
        Ok(runtime_env) => Some(runtime_env),
        Err(err) => {
            tracing::warn!("this worker's runtime environment does not parse ({err}): its tasks start in the job's");
            None
        }
    }
}
