//! The runtime context a task reads: its task, node and job ids and its GPUs.

use std::cell::RefCell;

use ionet_common::{ActorId, JobId, NodeId, TaskId};

thread_local! {
    /// The guest actor (of a shared process) whose blocking call runs on this thread.
    static CURRENT_GUEST: std::cell::Cell<Option<(ActorId, u32)>> = const { std::cell::Cell::new(None) };
    static CURRENT_TASK: RefCell<Option<TaskId>> = const { RefCell::new(None) };
    /// The running task's depth in its tree of tasks (0 outside a task: a driver, an actor).
    static CURRENT_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

tokio::task_local! {
    /// The guest actor whose async method this task runs.
    static ASYNC_GUEST: (ActorId, u32);
}

/// Runs `call` as a call of guest actor `guest` (the one it names on this thread, then
/// whichever did before).
pub(crate) fn with_guest<R>(guest: Option<(ActorId, u32)>, call: impl FnOnce() -> R) -> R {
    if guest.is_none() {
        return call();
    }
    let outer = CURRENT_GUEST.with(|current| current.replace(guest));
    let result = call();
    CURRENT_GUEST.with(|current| current.set(outer));
    result
}

/// `method` as an async method of guest actor `guest`.
pub(crate) fn in_guest(
    guest: Option<(ActorId, u32)>,
    method: crate::actor::MethodFuture,
) -> crate::actor::MethodFuture {
    match guest {
        Some(guest) => Box::pin(ASYNC_GUEST.scope(guest, method)),
        None => method,
    }
}

/// The guest actor (of a shared process) whose call runs here, if any.
pub(crate) fn current_guest() -> Option<(ActorId, u32)> {
    CURRENT_GUEST.with(std::cell::Cell::get).or_else(|| ASYNC_GUEST.try_with(|guest| *guest).ok())
}

pub(crate) fn set_current_task(task: Option<TaskId>, depth: u32) {
    CURRENT_TASK.with(|current| *current.borrow_mut() = task);
    CURRENT_DEPTH.with(|current| current.set(depth));
}

/// The task running on this thread and its depth, to restore after running another.
pub(crate) fn current_task_and_depth() -> (Option<TaskId>, u32) {
    (CURRENT_TASK.with(|current| *current.borrow()), CURRENT_DEPTH.with(|current| current.get()))
}

/// The task or actor call running on this thread, if any (cheaper than
/// [`get_runtime_context`] when that is all a caller needs).
pub fn current_task_id() -> Option<TaskId> {
    CURRENT_TASK.with(|current| *current.borrow())
}

/// The depth of the tasks the calling thread submits: one below the task it runs.
pub(crate) fn child_depth() -> u32 {
    CURRENT_DEPTH.with(|current| current.get()).saturating_add(1)
}

/// What a language binding does when a call it runs is cancelled (e.g. interrupt a
/// coroutine), called on a runtime thread with the call's task id.
pub type CancelHook = Box<dyn Fn(TaskId) + Send + Sync>;

static CANCEL_HOOK: std::sync::OnceLock<CancelHook> = std::sync::OnceLock::new();

/// Sets this process's [`CancelHook`] (once; later calls are ignored).
pub fn set_cancel_hook(hook: CancelHook) {
    let _ = CANCEL_HOOK.set(hook);
}

/// The caller of the task or actor call running on this thread cancelled it (Ray's
/// `get_runtime_context().is_canceled()`): a long call may poll this and stop early.
pub fn is_canceled() -> bool {
    let Some(task) = CURRENT_TASK.with(|current| *current.borrow()) else { return false };
    let Ok(runtime) = crate::runtime::current() else { return false };
    runtime.any_cancelled.load(std::sync::atomic::Ordering::SeqCst)
        && runtime.cancelled.lock().unwrap_or_else(|p| p.into_inner()).contains(&task)
}

/// A cancel for `task` arrived: marks it, tells the binding running it and, with
/// `recursive`, cancels the tasks it submitted.
pub(crate) fn cancelled(runtime: &std::sync::Arc<crate::runtime::CoreWorker>, task: TaskId, recursive: bool) {
    runtime.cancelled.lock().unwrap_or_else(|p| p.into_inner()).insert(task);
    runtime.any_cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
    if recursive {
        runtime.cancel_children(task);
    }
    if let Some(hook) = CANCEL_HOOK.get() {
        hook(task);
    }
}

/// The call of `task` ended: forget its cancel, if any.
pub(crate) fn call_ended(runtime: &crate::runtime::CoreWorker, task: TaskId) {
    if !runtime.children.is_empty() {
        runtime.children.remove(&task);
    }
    if runtime.any_cancelled.load(std::sync::atomic::Ordering::SeqCst) {
        let mut cancelled = runtime.cancelled.lock().unwrap_or_else(|p| p.into_inner());
        cancelled.remove(&task);
        if cancelled.is_empty() {
            runtime.any_cancelled.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// What the running process and task know about themselves.
#[derive(Clone, Debug)]
pub struct RuntimeContext {
    pub job_id: JobId,
    pub node_id: NodeId,
    /// The task being executed by this thread, if any.
    pub task_id: Option<TaskId>,
    /// GPU ids granted to this worker (`CUDA_VISIBLE_DEVICES` holds the same).
    pub gpu_ids: Vec<u32>,
    pub is_worker: bool,
    /// The actor this worker hosts, if any.
    pub actor_id: Option<ionet_common::ActorId>,
    /// How many times the hosted actor was restarted (0: its first life).
    pub actor_incarnation: u32,
    /// This worker process's id (as its node daemon knows it); `None` in a driver.
    pub worker_id: Option<String>,
    pub namespace: String,
}

/// The context of the calling thread.
pub fn get_runtime_context() -> ionet_common::IonetResult<RuntimeContext> {
    let runtime = crate::runtime::current()?;
    let guest = current_guest();
    Ok(RuntimeContext {
        job_id: runtime.job_id,
        node_id: runtime.node_id,
        task_id: CURRENT_TASK.with(|current| *current.borrow()),
        gpu_ids: runtime.gpu_ids.clone(),
        is_worker: runtime.is_worker,
        actor_id: guest.map(|(id, _)| id).or_else(|| runtime.hosted.get().map(|hosted| hosted.id)),
        actor_incarnation: guest
            .map(|(_, incarnation)| incarnation)
            .unwrap_or_else(|| runtime.hosted.get().map_or(0, |hosted| hosted.incarnation)),
        worker_id: runtime.worker_id.map(|id| id.hex()),
        namespace: runtime.namespace.clone(),
    })
}

/// GPU ids granted to this worker, as Ray's `get_gpu_ids`.
pub fn get_gpu_ids() -> Vec<u32> {
    crate::runtime::current().map(|runtime| runtime.gpu_ids.clone()).unwrap_or_default()
}
