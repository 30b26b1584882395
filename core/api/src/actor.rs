//! Actors from Rust: creating them, calling them, and hosting one in a worker.
//!
//! `#[ionet::actor]` on an `impl` block registers the type as an [`ActorClass`] and
//! generates a typed handle (`CounterHandle` for `Counter`) whose methods submit calls.
//!
//! Caller side: `crate::actor_client` (one ordered call queue per actor a process calls,
//! with its retry and delivery rules).
//!
//! Worker side: a worker hosts one actor of its own ([`HostedActor`]), or, as a shared
//! process (`ActorOptions::share_process`), several actors of its job ("guests"), each
//! with its own executor thread and ended alone (`EndActor`). With `max_concurrency == 1`
//! each caller's calls run one at a time in sequence order; with more, up to
//! `max_concurrency` calls run at once on blocking threads (`&self` methods share a read
//! lock, `&mut self` methods take the write lock).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use ionet_common::rpc::proto::gcs::{
    ActorInfo, ActorSpec, ActorState, CreateActorRequest, GetActorRequest, GetNamedActorRequest, KillActorRequest,
};
use ionet_common::rpc::GcsClient;
use ionet_common::{ActorId, IonetError, IonetResult, ObjectId};
use serde::{Deserialize, Serialize};

pub(crate) use crate::actor_client::ActorClient;
use tokio::sync::Semaphore;

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
    /// What the state API calls the class (a Python class's name, where the registered
    /// class is Python's generic one); `None`: the registered class's name.
    pub class_label: Option<String>,
    /// May live in a worker process shared with other such actors of the job (one per
    /// runtime environment and strategy, placed as an actor of no resources; no process
    /// start of its own: many light actors are created fast). Only for an actor of no
    /// resources, outside placement groups, not `Spread`. Such an actor shares its
    /// process's fate: a crash (or `std::process::exit`) of one ends all of them (each
    /// restarts per its `max_restarts`), and a kill ends it between calls: a call
    /// running then finishes on its thread, its result dropped.
    pub share_process: bool,
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
            class_label: None,
            share_process: false,
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

    /// See [`ActorOptions::share_process`].
    pub fn share_process(mut self, share: bool) -> Self {
        self.share_process = share;
        self
    }
}

/// An untyped handle to an actor: cheap to clone, serialisable (pass it to tasks and
/// other actors). The typed handles `#[ionet::actor]` generates wrap one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActorHandle {
    pub(crate) id: ActorId,
    pub(crate) class: String,
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
        worker.actor_client(self).submit(method, args, return_id);
        object
    }

    /// The actor's row in the control store.
    pub fn info(&self) -> IonetResult<crate::ActorInfo> {
        self.row()?.try_into()
    }

    /// The control store's row of the actor as it travels (for language bindings that
    /// read fields of their own from its spec).
    #[doc(hidden)]
    pub fn row(&self) -> IonetResult<ActorInfo> {
        let worker = runtime::current()?;
        let info = runtime::block_on(async {
            let request = GetActorRequest { actor_id: self.id.to_vec(), wait_newer_than: -1, timeout_ms: 0 };
            actor_row(
                worker.call_head(request, |mut gcs, request| async move { gcs.get_actor(request).await }).await?.actor,
            )
        })?;
        if let Some(client) = worker.actor_clients.get(&self.id) {
            client.learn(&info);
        }
        Ok(info)
    }
}

pub(crate) fn actor_row(row: Option<ActorInfo>) -> IonetResult<ActorInfo> {
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
    if options.share_process && (!resources.is_empty() || options.resources.placement_group.is_some()) {
        return Err(IonetError::InvalidArgument(format!(
            "actor {class} cannot share a process: it holds {} (a shared process holds no resources, \
             outside placement groups)",
            if resources.is_empty() { "a placement-group bundle".to_string() } else { resources.to_string() }
        )));
    }
    runtime::block_on(async {
        // Constructor arguments are kept by value, so a restart can run it again; the refs
        // inside them are held here while the actor lives (each incarnation reads them).
        let mut constructor_args = Vec::with_capacity(args.len());
        let mut inside = Vec::new();
        for (index, arg) in args.iter().enumerate() {
            constructor_args.push(match arg {
                Arg::Value(Ok(bytes)) => bytes.clone(),
                Arg::Holding(bytes, refs) => {
                    inside.extend(refs.iter().cloned());
                    bytes.clone()
                }
                Arg::Value(Err(why)) => {
                    return Err(IonetError::InvalidArgument(format!("argument {index} of {class}: {why}")))
                }
                Arg::Ref(reference) => worker.fetch(reference.id(), reference.owner_address(), None).await?.to_vec(),
            });
        }
        let bundle = options.resources.placement_group;
        let actor_id = ActorId::random().to_vec();
        let spec = ActorSpec {
            actor_id: actor_id.clone(),
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
            owner_address: worker.address.to_string(),
            node_address: worker.node_address.clone(),
            placement_group_id: bundle.map(|(group, _)| group.to_vec()).unwrap_or_default(),
            bundle_index: bundle.map(|(_, index)| index).unwrap_or_default(),
            strategy: Some(options.resources.wire_strategy()?),
            runtime_env: worker.runtime_env_of(&options.resources)?,
            display_class: options.class_label.clone().unwrap_or_default(),
            share_process: options.share_process,
            owner_actor_id: crate::context::current_guest().map(|(id, _)| id.to_vec()).unwrap_or_default(),
        };
        let request = CreateActorRequest { spec: Some(spec), get_if_exists: options.get_if_exists };
        // Asked again while the head restarts: it answers a create it already took with
        // the same row.
        let info = actor_row(
            worker.call_head(request, |mut gcs, request| async move { gcs.create_actor(request).await }).await?.actor,
        )?;
        let handle = handle_of(&worker, info)?;
        // Only for the actor this call made (`get_if_exists` may answer another's).
        if !inside.is_empty() && handle.id.as_bytes() == actor_id.as_slice() {
            if let dashmap::mapref::entry::Entry::Vacant(entry) = worker.actor_args.entry(handle.id) {
                entry.insert(inside);
                worker.handle.spawn(release_args_when_dead(Arc::downgrade(&worker), handle.id));
            }
        }
        Ok(handle)
    })
}

/// Whether the control store says actor `id` is DEAD (or forgot it), asked once: waiting
/// up to `wait` for it to die; `None` when it cannot answer now (a head restarting).
async fn actor_is_gone(worker: &std::sync::Weak<CoreWorker>, id: ActorId, wait: Duration) -> Option<bool> {
    let mut gcs = worker.upgrade()?.gcs().ok()?;
    // Waits for an incarnation no actor reaches: answers when it is DEAD, or at the timeout.
    let request =
        GetActorRequest { actor_id: id.to_vec(), wait_newer_than: i64::MAX, timeout_ms: wait.as_millis() as u64 };
    match gcs.get_actor(request).await {
        Ok(reply) => Some(reply.into_inner().actor.is_none_or(|info| info.state == ActorState::Dead as i32)),
        Err(status) if status.code() == tonic::Code::NotFound => Some(true),
        Err(_) => None,
    }
}

/// Holds the refs inside actor `id`'s constructor arguments until the control store says
/// it is dead (or forgot it), then lets them go. Ends with the process. Follows the
/// actor's row as the process does (asking by `GetActor` after a quiet half minute with
/// no stream open), or by long polls when the head will not follow it.
async fn release_args_when_dead(worker: std::sync::Weak<CoreWorker>, id: ActorId) {
    let Some(current) = worker.upgrade() else { return };
    let mut row = current.actor_rows.follow(&current, id);
    drop(current);
    let mut following = true;
    loop {
        if worker.upgrade().is_none_or(|current| *current.stopping.borrow()) {
            return;
        }
        let gone = if following {
            let seen = match &*row.borrow_and_update() {
                crate::actor_rows::Followed::Row(info) => Some(info.state == ActorState::Dead as i32),
                crate::actor_rows::Followed::Refused => None,
                crate::actor_rows::Followed::Unknown => Some(false),
            };
            match seen {
                Some(true) => Some(true),
                None => {
                    following = false;
                    continue;
                }
                Some(false) => match tokio::time::timeout(Duration::from_secs(30), row.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => {
                        following = false;
                        continue;
                    }
                    // Quiet with the stream open: nothing happened (a forgotten actor's
                    // follow ends refused). With none open, a look.
                    Err(_) if worker.upgrade().is_some_and(|current| current.actor_rows.is_open()) => continue,
                    Err(_) => actor_is_gone(&worker, id, Duration::ZERO).await,
                },
            }
        } else {
            let gone = actor_is_gone(&worker, id, Duration::from_secs(30)).await;
            if gone.is_none() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            gone
        };
        if gone == Some(true) {
            if let Some(current) = worker.upgrade() {
                current.actor_args.remove(&id);
            }
            return;
        }
    }
}

/// The handle of the actor `info` is the row of (the class it is shown by remembered).
fn handle_of(worker: &CoreWorker, info: ActorInfo) -> IonetResult<ActorHandle> {
    let spec = info.spec.unwrap_or_default();
    let id = ActorId::from_bytes(&spec.actor_id)?;
    if !spec.display_class.is_empty() {
        worker.actor_classes.insert(id, spec.display_class.as_str().into());
    }
    Ok(ActorHandle { id, class: spec.class_name })
}

/// The live actor named `name` in `namespace` (`None`: the driver's namespace).
pub fn get_actor<H: ActorClassHandle>(name: &str, namespace: Option<&str>) -> IonetResult<H> {
    let worker = runtime::current()?;
    let namespace = namespace.map(str::to_string).unwrap_or_else(|| worker.namespace.clone());
    let info = runtime::block_on(async {
        let request = GetNamedActorRequest { name: name.to_string(), namespace };
        actor_row(
            worker
                .call_head(request, |mut gcs, request| async move { gcs.get_named_actor(request).await })
                .await?
                .actor,
        )
    })?;
    let handle = handle_of(&worker, info)?;
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
/// with `ActorDied`, and this process exits (an actor sharing a process ends alone: the
/// call running unwinds, and the process goes on with its other actors). Returns only
/// with the error that says why it could not (called outside an actor, or the control
/// store unreachable).
pub fn exit_actor() -> IonetResult<std::convert::Infallible> {
    let worker = runtime::current()?;
    let (actor_id, guest) = match (crate::context::current_guest(), worker.hosted.get()) {
        (Some((id, _)), _) => (id, true),
        (None, Some(hosted)) => (hosted.id, false),
        (None, None) => {
            return Err(IonetError::FailedPrecondition("exit_actor() is called from inside an actor's method".into()))
        }
    };
    runtime::block_on(async {
        let request = KillActorRequest { actor_id: actor_id.to_vec(), no_restart: true };
        worker.task_events.flush(Duration::from_millis(300)).await;
        worker.call_head(request, |mut gcs, request| async move { gcs.kill_actor(request).await }).await?;
        IonetResult::Ok(())
    })?;
    if guest {
        // The head ended it here before answering: nothing waits for this call's reply.
        // Unwinding (without the panic hook) ends the call where it stands.
        std::panic::resume_unwind(Box::new(ActorExited));
    }
    std::process::exit(0)
}

/// A guest's constructor running: ended meanwhile (`EndActor`), it is dropped when the
/// constructor returns, and the end is answered only then (never two incarnations).
pub(crate) struct Construction {
    pub(crate) cancelled: std::sync::atomic::AtomicBool,
    pub(crate) done: tokio::sync::watch::Sender<bool>,
}

/// Marks a guest's construction on its process while it runs; gone (and its end told)
/// when dropped, after the guest is in the process's table or refused.
pub(crate) struct Constructing<'a> {
    worker: &'a CoreWorker,
    id: ActorId,
    pub(crate) state: Arc<Construction>,
}

impl<'a> Constructing<'a> {
    pub(crate) fn start(worker: &'a CoreWorker, id: ActorId, incarnation: u32) -> Self {
        let state = Arc::new(Construction {
            cancelled: std::sync::atomic::AtomicBool::new(false),
            done: tokio::sync::watch::channel(false).0,
        });
        worker.constructing.insert(id, (incarnation, state.clone()));
        Constructing { worker, id, state }
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.state.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Constructing<'_> {
    fn drop(&mut self) {
        self.worker.constructing.remove_if(&self.id, |_, (_, state)| Arc::ptr_eq(state, &self.state));
        self.state.done.send_replace(true);
    }
}

/// What a guest actor's call unwinds with after `exit_actor()`.
struct ActorExited;

pub fn kill_handle(actor: &ActorHandle, no_restart: bool) -> IonetResult<()> {
    let worker = runtime::current()?;
    runtime::block_on(async {
        let request = KillActorRequest { actor_id: actor.id.to_vec(), no_restart };
        worker.call_head(request, |mut gcs, request| async move { gcs.kill_actor(request).await }).await?;
        Ok(())
    })
}

/// An actor a worker process hosts: the one of its own process, or one of those a
/// shared process hosts (a guest, `CreateActorRequest.shared`).
pub(crate) struct HostedActor {
    pub(crate) id: ActorId,
    pub(crate) incarnation: u32,
    pub(crate) class: &'static ActorClass,
    pub(crate) instance: Arc<ActorInstance>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) max_concurrency: usize,
    /// A guest's own executor for its ordered calls (`None`: the process's).
    executor: Option<crate::executor::Executor>,
    /// Set when a guest is ended (`EndActor`): it takes no more calls, its queued calls
    /// are dropped, its streams and `Watch` end.
    ended: tokio::sync::watch::Sender<bool>,
}

impl HostedActor {
    pub(crate) fn new(
        id: ActorId,
        incarnation: u32,
        class: &'static ActorClass,
        instance: Box<dyn Any + Send + Sync>,
        max_concurrency: u32,
        executor: Option<crate::executor::Executor>,
    ) -> Self {
        let max_concurrency = max_concurrency.max(1);
        HostedActor {
            id,
            incarnation,
            class,
            instance: Arc::new(tokio::sync::RwLock::new(instance)),
            permits: Arc::new(Semaphore::new(max_concurrency as usize)),
            max_concurrency: max_concurrency as usize,
            executor,
            ended: tokio::sync::watch::channel(false).0,
        }
    }

    /// Whether each caller's calls run one at a time, in order (`max_concurrency == 1`).
    pub(crate) fn ordered(&self) -> bool {
        self.max_concurrency == 1
    }

    /// Whether it is a guest of a shared process.
    pub(crate) fn is_guest(&self) -> bool {
        self.executor.is_some()
    }

    /// Runs an ordered call after those given before it: on the guest's own executor, or
    /// the process's.
    pub(crate) fn run_in_order(&self, worker: &CoreWorker, function: Option<&str>, job: crate::executor::Job) {
        match &self.executor {
            Some(executor) => executor.run_in_order(function, job),
            None => worker.run_in_order(function, job),
        }
    }

    /// Ends a guest: no more calls (lanes and async calls waiting for a permit give up).
    pub(crate) fn end(&self) {
        self.ended.send_replace(true);
        self.permits.close();
    }

    pub(crate) fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Resolves once the actor is ended (never for the actor of its own process).
    pub(crate) fn ended(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ended.subscribe()
    }
}

/// Whether a call failed because the head could not be reached: refused (`Unavailable`),
/// or its connection broke under the call (a transport error, which tonic reports as
/// `Unknown`: the head died with it).
fn head_unreachable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => status.message().contains("transport error"),
        _ => false,
    }
}

/// How long a call that needs the control store waits for a head that cannot be reached
/// (restarting, or failing over to its standby) before it fails.
pub(crate) const HEAD_RECONNECT_WAIT: Duration = Duration::from_secs(60);

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

    /// Makes a call to the control store, asking again while it cannot be reached (a head
    /// restarting) for up to [`HEAD_RECONNECT_WAIT`]; then, or on any other failure, the
    /// call's error. For calls that may be made twice (reads; writes the head takes once).
    pub(crate) async fn call_head<R: Clone, T, F, Fut>(&self, request: R, mut call: F) -> IonetResult<T>
    where
        F: FnMut(GcsClient, R) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + HEAD_RECONNECT_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            match call(self.gcs()?, request.clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if head_unreachable(&status) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(error = %status.message(), "the control store cannot be reached; asking again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    pub(crate) fn actor_client(self: &Arc<Self>, actor: &ActorHandle) -> Arc<ActorClient> {
        if let Some(client) = self.actor_clients.get(&actor.id) {
            return client.clone();
        }
        self.actor_clients.entry(actor.id).or_insert_with(|| ActorClient::start(self, actor)).clone()
    }
}
