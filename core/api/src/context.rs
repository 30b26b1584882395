//! The runtime context a task reads: its task, node and job ids and its GPUs.

use std::cell::RefCell;

use ionet_common::{JobId, NodeId, TaskId};

thread_local! {
    static CURRENT_TASK: RefCell<Option<TaskId>> = const { RefCell::new(None) };
    /// The running task's depth in its tree of tasks (0 outside a task: a driver, an actor).
    static CURRENT_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

pub(crate) fn set_current_task(task: Option<TaskId>, depth: u32) {
    CURRENT_TASK.with(|current| *current.borrow_mut() = task);
    CURRENT_DEPTH.with(|current| current.set(depth));
}

/// The depth of the tasks the calling thread submits: one below the task it runs.
pub(crate) fn child_depth() -> u32 {
    CURRENT_DEPTH.with(|current| current.get()).saturating_add(1)
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
    Ok(RuntimeContext {
        job_id: runtime.job_id,
        node_id: runtime.node_id,
        task_id: CURRENT_TASK.with(|current| *current.borrow()),
        gpu_ids: runtime.gpu_ids.clone(),
        is_worker: runtime.is_worker,
        actor_id: runtime.hosted.get().map(|hosted| hosted.id),
        actor_incarnation: runtime.hosted.get().map_or(0, |hosted| hosted.incarnation),
        worker_id: std::env::var(ionet_worker::lease::WORKER_ID_ENV).ok().filter(|_| runtime.is_worker),
        namespace: runtime.namespace.clone(),
    })
}

/// GPU ids granted to this worker, as Ray's `get_gpu_ids`.
pub fn get_gpu_ids() -> Vec<u32> {
    crate::runtime::current().map(|runtime| runtime.gpu_ids.clone()).unwrap_or_default()
}
