//! Work-first waits (on unless [`WORK_FIRST_ENV`] is `0`): a task that waits in `get` for tasks
//! it submitted, which have not started anywhere yet, runs them itself, on its own thread and lease, before it waits
//! for the rest.
//!
//! A tree of tasks (each waiting for its children) otherwise costs, per task, a lease
//! request, often a new worker process (the parent lends its CPU while it waits), and a
//! push and reply; run here, the child costs a function call. Its siblings still go out
//! to other workers as leases come, so the tree spreads over the cluster's free CPUs,
//! and the waiting task only runs what nobody took (the newest first, as work-first
//! schedulers do).
//!
//! Which waits: a `get` without a timeout (one with a deadline could be outlasted by the
//! task it would run).
//!
//! Which tasks: submitted from inside a task (not a driver or an actor, whose leases may
//! hold no CPU), not generator tasks ([`kept_apart`]), by a worker holding no GPUs, asking at most one CPU and nothing else,
//! with the default strategy, no placement group, no `max_calls`, and no retries on
//! exceptions (a retry would need a worker); their arguments already resolved. A task is
//! claimed once: by its pushing future when a lease came first (`TaskSpec::claimed`), or
//! here. Run here, it is still its own task (its id, depth, cancel and context), and a
//! cancel reaches it through `CoreWorker::inline_running`.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ionet_common::rpc::proto::worker::push_task_reply;
use ionet_common::{IonetError, ObjectId};

use crate::options::{SchedulingStrategy, TaskOptions};
use crate::runtime::{self, CoreWorker, ObjectState, TaskSpec};
use ionet_common::rpc::proto::gcs::TaskState;

/// Tasks run here inside one another at most this deep on the executor thread (each
/// level is a few frames of its large stack), and on other threads (a short Rust task
/// run in place on the event loop) far less; deeper waits wait.
const MAX_NESTING: u32 = 32;
const MAX_NESTING_ELSEWHERE: u32 = 2;

thread_local! {
    static NESTING: Cell<u32> = const { Cell::new(0) };
    static ON_EXECUTOR: Cell<bool> = const { Cell::new(false) };
    static SUBMITTING_KEPT_APART: Cell<bool> = const { Cell::new(false) };
}

/// Submits, in `submit`, tasks their submitter never runs itself: generator tasks, whose
/// consumer reads items while they run (run inside a wait for their value, one would
/// wait on its own backpressure).
pub fn kept_apart<R>(submit: impl FnOnce() -> R) -> R {
    let before = SUBMITTING_KEPT_APART.with(|flag| flag.replace(true));
    let result = submit();
    SUBMITTING_KEPT_APART.with(|flag| flag.set(before));
    result
}

/// Marks the calling thread as the executor (whose stack is sized for nesting).
pub(crate) fn mark_executor_thread() {
    ON_EXECUTOR.with(|on| on.set(true));
}

/// `IONET_WORK_FIRST=0` in the environment of the node daemons (which their workers
/// inherit) turns work-first waits off: every task then goes to a leased worker.
pub const WORK_FIRST_ENV: &str = "IONET_WORK_FIRST";

fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(WORK_FIRST_ENV).map_or(true, |value| value != "0"))
}

/// Whether a task with `options`, submitted now on this thread, may be run by its
/// submitter while it waits.
pub(crate) fn eligible(worker: &CoreWorker, options: &TaskOptions) -> bool {
    worker.is_worker
        && enabled()
        && !SUBMITTING_KEPT_APART.with(Cell::get)
        && worker.gpu_ids.is_empty()
        && !worker.hosts_actors()
        && crate::context::current_task_id().is_some()
        && options.num_cpus <= 1.0
        && options.num_gpus == 0.0
        && options.memory == 0
        && options.resources.is_empty()
        && options.accelerator_type.is_none()
        && matches!(options.scheduling_strategy, SchedulingStrategy::Default)
        && options.label_selector.is_empty()
        && options.placement_group.is_none()
        && options.max_calls == 0
        && !options.retry_exceptions
}

/// Before a wait for `ids`: runs here, newest first, those of them that are tasks this
/// process submitted and nobody has started.
pub(crate) fn run_waited_tasks(worker: &Arc<CoreWorker>, ids: impl DoubleEndedIterator<Item = ObjectId>) {
    if worker.stealable.is_empty() {
        return;
    }
    let limit = if ON_EXECUTOR.with(Cell::get) { MAX_NESTING } else { MAX_NESTING_ELSEWHERE };
    if NESTING.with(Cell::get) >= limit {
        return;
    }
    for id in ids.rev() {
        let Some(spec) = worker.stealable.get(&id).map(|entry| entry.clone()) else { continue };
        if !spec.args_ready(worker) || spec.claimed.swap(true, Ordering::SeqCst) {
            continue;
        }
        worker.stealable.remove(&id);
        spec.taken.notify_one(); // its pushing future stops waiting for a lease
        if spec.entry.is_settled() {
            // Cancelled before it started.
            worker.task_events.record(spec.events, TaskState::Failed, |event| event.error = Some("cancelled".into()));
            continue;
        }
        NESTING.with(|nesting| nesting.set(nesting.get() + 1));
        worker.inline_running.insert(id, spec.task_id);
        let here = |event: &mut crate::task_events::Update| event.place = Some(worker.task_events.here());
        worker.task_events.record(spec.events, TaskState::Running, here);
        let state = run_here(worker, &spec);
        match &state {
            ObjectState::Failed(error) => worker.task_events.record(spec.events, TaskState::Failed, |event| {
                here(event);
                event.error = Some(error.to_string());
            }),
            _ => worker.task_events.record(spec.events, TaskState::Finished, here),
        }
        worker.inline_running.remove(&id);
        NESTING.with(|nesting| nesting.set(nesting.get() - 1));
        spec.entry.settle(state);
    }
}

/// Runs the task on this thread as a worker would, and gives its outcome.
fn run_here(worker: &Arc<CoreWorker>, spec: &TaskSpec) -> ObjectState {
    let failed = |error: IonetError| ObjectState::Failed(Arc::new(error));
    let args = match runtime::block_on(runtime::resolve_call_args(worker, spec.function, &spec.args)) {
        Ok(args) => args,
        Err(error) => return failed(error),
    };
    let reply = crate::service::run_task_here(
        worker,
        spec.function,
        spec.task_id,
        spec.depth,
        spec.return_id,
        worker.inline_threshold as u64,
        args,
    );
    match reply.result {
        Some(push_task_reply::Result::Inline(bytes)) => ObjectState::Inline(Arc::new(bytes)),
        Some(push_task_reply::Result::Stored(stored)) => ObjectState::Stored(stored),
        Some(push_task_reply::Result::Failure(failure)) => {
            failed(crate::task::task_failed(failure.function_name.clone(), failure))
        }
        None => failed(IonetError::Internal(format!("{} ran here and gave no result", spec.function))),
    }
}
