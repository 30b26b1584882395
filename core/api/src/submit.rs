//! Submitting a task: its spec, the future that resolves its arguments, takes a slot
//! on a lease of its shape (`crate::lease_pool`), pushes it and settles its return
//! object, retrying per its options; and the run of a task its submitter took to run
//! itself while waiting (`crate::inline`) is told apart by the task's `claimed` flag.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::rpc::proto::worker::{
    push_task_reply, task_arg, task_failure, PushTaskRequest, StoredObject, TaskArg,
};
use ionet_common::{IonetError, IonetResult, ObjectId, TaskId};
use tokio::sync::Notify;

use crate::lineage::Recipe;
use crate::object_ref::{Arg, ObjectRef};
use crate::options::TaskOptions;
use crate::runtime::{current_or_panic, CoreWorker, ObjectEntry, ObjectState};
use ionet_common::rpc::proto::gcs::TaskState;

pub(crate) struct TaskSpec {
    pub(crate) task_id: TaskId,
    /// The task as its events know it (whether they are recorded).
    pub(crate) events: crate::task_events::Tracked,
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
    /// Re-runs spent making its lost value again (`reconstruct`), against `max_retries`.
    reconstructions: AtomicU32,
    /// Held while its value is being made again: one re-run for many readers.
    rebuilding: tokio::sync::Mutex<()>,
}

impl TaskSpec {
    /// Whether its arguments can be read now, without waiting for another task.
    pub(crate) fn args_ready(&self, worker: &CoreWorker) -> bool {
        args_ready(worker, &self.args)
    }
}

/// Whether every ref among `args` is ready in this process (a task's or a call's).
pub(crate) fn args_ready(worker: &CoreWorker, args: &[Arg]) -> bool {
    args.iter().all(|arg| match arg {
        Arg::Ref(reference) => worker.is_ready_here(&reference.id()),
        _ => true,
    })
}

/// A spec for tests of what keeps specs: `arg_bytes` of inline argument, for `entry`.
#[cfg(test)]
pub(crate) fn spec_for_test(return_id: ObjectId, entry: Arc<ObjectEntry>, arg_bytes: usize) -> Arc<TaskSpec> {
    let task_id = TaskId::random();
    Arc::new(TaskSpec {
        task_id,
        events: crate::task_events::Tracked::unrecorded(task_id),
        function: "test",
        profile: 0,
        options: TaskOptions::default(),
        args: vec![Arg::Value(Ok(vec![0; arg_bytes]))],
        return_id,
        entry,
        depth: 1,
        claimed: AtomicBool::new(false),
        taken: Notify::new(),
        reconstructions: AtomicU32::new(0),
        rebuilding: tokio::sync::Mutex::new(()),
    })
}

/// `IONET_MAX_PENDING_TASKS`: most tasks a driver has submitted and not yet seen settle
/// before `remote()` waits ([`DEFAULT_MAX_PENDING_TASKS`] unless set).
pub const MAX_PENDING_TASKS_ENV: &str = "IONET_MAX_PENDING_TASKS";
pub const DEFAULT_MAX_PENDING_TASKS: usize = 100_000;

/// The tasks a process has submitted that have not settled. A driver's `remote()` waits
/// while `limit` are pending (backpressure: a driver queuing a million tasks holds a
/// bounded number in flight, and its memory with them). Workers never wait here (a task
/// submitting children while holding its lease's CPUs could wait on its own siblings),
/// nor does a thread of the async runtime.
pub(crate) struct Pending {
    /// Tasks pending; read and changed without the lock on the submit path.
    count: AtomicUsize,
    /// Threads waiting for room: a settling task takes the lock to wake one only then.
    waiting: AtomicUsize,
    lock: Mutex<()>,
    settled: std::sync::Condvar,
    limit: usize,
}

impl Pending {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            lock: Mutex::new(()),
            settled: std::sync::Condvar::new(),
            limit: limit.max(1),
        }
    }

    /// The limit from the environment, or the default (a value that is no count is said
    /// in the log, not taken silently).
    pub(crate) fn from_env() -> Self {
        let limit = match std::env::var(MAX_PENDING_TASKS_ENV) {
            Ok(text) => match text.trim().parse::<usize>() {
                Ok(limit) if limit > 0 => limit,
                _ => {
                    tracing::warn!(
                        value = %text,
                        "{MAX_PENDING_TASKS_ENV} takes a count of tasks above 0: {DEFAULT_MAX_PENDING_TASKS} is used"
                    );
                    DEFAULT_MAX_PENDING_TASKS
                }
            },
            Err(_) => DEFAULT_MAX_PENDING_TASKS,
        };
        Self::new(limit)
    }

    /// Counts one more task; first, when `may_wait`, waits while `limit` are pending.
    fn admit(&self, may_wait: bool) {
        if !may_wait {
            self.count.fetch_add(1, Ordering::SeqCst);
            return;
        }
        loop {
            let count = self.count.load(Ordering::SeqCst);
            if count < self.limit {
                if self.count.compare_exchange_weak(count, count + 1, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    return;
                }
                continue;
            }
            self.wait_for_room();
        }
    }

    /// Waits until fewer than `limit` are pending (a settling task wakes it; said in the
    /// log after 30 s).
    fn wait_for_room(&self) {
        let mut guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Counted as waiting before the count is read again: a task settling after that
        // read sees the waiter and wakes it under the lock.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut warned = false;
        while self.count.load(Ordering::SeqCst) >= self.limit {
            let (next, waited) = self
                .settled
                .wait_timeout(guard, Duration::from_secs(30))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            guard = next;
            if waited.timed_out() && !warned && self.count.load(Ordering::SeqCst) >= self.limit {
                warned = true;
                tracing::warn!(
                    limit = self.limit,
                    "remote() has waited 30 s for one of the {} tasks this driver has pending to finish; \
                     raise {MAX_PENDING_TASKS_ENV} if they wait on something the driver does next",
                    self.limit
                );
            }
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn settle(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.settled.notify_one();
        }
    }

    /// How many are pending now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A pending task's place in [`Pending`], given back when dropped (its future ends,
/// panics or is dropped).
struct PendingTask(Arc<CoreWorker>);

impl Drop for PendingTask {
    fn drop(&mut self) {
        self.0.pending.settle();
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
    // A driver's user thread waits here while too many of its tasks are pending.
    let may_wait = !worker.is_worker && tokio::runtime::Handle::try_current().is_err();
    worker.pending.admit(may_wait);
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
    let task_id = TaskId::random();
    let spec = Arc::new(TaskSpec {
        task_id,
        events: worker.task_events.admit(task_id),
        function,
        profile,
        options,
        args,
        return_id,
        entry,
        depth,
        claimed: AtomicBool::new(false),
        taken: Notify::new(),
        reconstructions: AtomicU32::new(0),
        rebuilding: tokio::sync::Mutex::new(()),
    });
    // Its first event before anyone may run it (a run here records its own).
    let name = || -> crate::task_events::Name {
        match &spec.options.name {
            Some(name) => Arc::<str>::from(name.as_str()).into(),
            None => spec.function.into(),
        }
    };
    let args_ready = spec.args_ready(&worker);
    if args_ready {
        worker.task_events.record(spec.events, TaskState::PendingNodeAssignment, |event| {
            event.name = Some(name());
            event.reason = Some(waiting_reason(&spec.options));
        });
    } else {
        worker.task_events.record(spec.events, TaskState::PendingArgsAvail, |event| {
            event.name = Some(name());
            event.reason = Some(waiting_for_arguments());
        });
    }
    if stealable {
        worker.stealable.insert(return_id, spec.clone());
    }
    // The task's place among the pending, given back when its future ends however it
    // ends; the worker it holds is the one the future runs with.
    let counted = PendingTask(worker.clone());
    worker.handle.spawn(async move {
        let runner = &counted.0;
        match execute(runner, &spec, args_ready).await {
            Ok(None) => {} // run by this process while it waited: settled (and recorded) there
            Ok(Some(state)) => {
                let stored = matches!(state, ObjectState::Stored(_));
                spec.entry.settle(state);
                // A value in a node's store can be lost with the node: its recipe is kept
                // while the object is owned (forgetting the object forgets it).
                if stored && runner.objects.get(&return_id).is_some() {
                    let stored_size = |id: &ObjectId| match runner.objects.get(id).map(|entry| entry.state()) {
                        Some(ObjectState::Stored(stored)) => stored.size as usize,
                        _ => 0,
                    };
                    runner.lineage.keep(spec.clone(), stored_size);
                    if runner.objects.get(&return_id).is_none() {
                        runner.lineage.forget(&return_id);
                    }
                }
            }
            Err(error) => {
                runner
                    .task_events
                    .record(spec.events, TaskState::Failed, |event| event.error = Some(error.to_string()));
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
                ObjectState::Failed(error) => return Err(ionet_common::rpc::status::copy_of(&error)),
                ObjectState::Pending => unreachable!("resolve waits past pending"),
            },
        };
        args.push(TaskArg { value: Some(value) });
    }
    Ok(args)
}

/// Makes object `id` again after its stored value `lost` could not be read (`why`): its
/// task runs again (its own lost arguments first), within its `max_retries`. Fails with
/// `ObjectLost` saying why when it cannot: a put or an actor's return has no recipe, a
/// recipe dropped for the lineage budget, retries spent.
pub(crate) fn reconstruct(
    worker: &Arc<CoreWorker>,
    id: ObjectId,
    lost: StoredObject,
    why: String,
) -> futures::future::BoxFuture<'_, IonetResult<()>> {
    Box::pin(async move {
        let Some(entry) = worker.objects.get(&id) else {
            return Err(IonetError::ObjectLost(format!("object {} was freed by its owner (this process)", id.short())));
        };
        worker.lineage.mark_lost(&lost.node_id);
        let spec = match worker.lineage.recipe(&id) {
            Some(Recipe::Kept(spec)) => spec,
            Some(Recipe::Dropped) => {
                return Err(IonetError::ObjectLost(format!(
                    "object {} was lost ({why}) and cannot be reconstructed: its lineage was dropped to keep this \
                     process's lineage under {} bytes",
                    id.short(),
                    worker.lineage.budget()
                )))
            }
            None => {
                return Err(IonetError::ObjectLost(format!(
                    "object {} was lost ({why}) and cannot be reconstructed: it was put (or returned by an actor), \
                     not computed by a task that can run again",
                    id.short()
                )))
            }
        };
        let _rebuilding = spec.rebuilding.lock().await;
        match entry.state() {
            ObjectState::Stored(now) if now == lost => {}
            _ => return Ok(()), // made again meanwhile, by another reader
        }
        let spent = spec.reconstructions.load(Ordering::SeqCst);
        if spent >= spec.options.max_retries {
            return Err(IonetError::ObjectLost(format!(
                "object {} was lost ({why}) and cannot be reconstructed from its lineage: its task {} allows {} \
                 retries (max_retries) and {spent} were spent",
                id.short(),
                spec.function,
                spec.options.max_retries
            )));
        }
        // Its arguments lost with the same node are made again first.
        for arg in &spec.args {
            let Arg::Ref(reference) = arg else { continue };
            let Some(argument) = worker.objects.get(&reference.id()) else { continue };
            if let ObjectState::Stored(stored) = argument.state() {
                if worker.lineage.is_lost(&stored.node_id) {
                    let because = format!("its node {} is lost", crate::runtime::hex_short(&stored.node_id));
                    reconstruct(worker, reference.id(), stored, because).await?;
                }
            }
        }
        // Counted once it runs again (a failed rebuild of an argument spends none of its).
        spec.reconstructions.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(object = %id.short(), task = %spec.task_id.short(), function = spec.function, %why, "reconstructing a lost object from its lineage");
        if !entry.reset_lost(&lost) {
            return Ok(());
        }
        spec.claimed.store(false, Ordering::SeqCst);
        match execute(worker, &spec, false).await {
            Ok(Some(state)) => {
                entry.settle(state);
            }
            Ok(None) => {}
            Err(error) => {
                entry.settle(ObjectState::Failed(Arc::new(error)));
            }
        }
        Ok(())
    })
}

/// Why a task with `options` waits for a lease (what it asks for).
fn waiting_reason(options: &TaskOptions) -> Arc<str> {
    /// What a task asks for (the parts of its options its demand is made of).
    type Asks = (f64, f64, u64, Option<String>, std::collections::BTreeMap<String, f64>);
    thread_local! {
        /// The last asks this thread described, and its text: a stream of tasks of one
        /// shape formats it once, and compares its options only.
        static LAST: std::cell::RefCell<Option<(Asks, Arc<str>)>> = const { std::cell::RefCell::new(None) };
    }
    let same = |asks: &Asks| {
        asks.0 == options.num_cpus
            && asks.1 == options.num_gpus
            && asks.2 == options.memory
            && asks.3 == options.accelerator_type
            && asks.4 == options.resources
    };
    LAST.with(|last| {
        if let Some((asks, text)) = last.borrow().as_ref() {
            if same(asks) {
                return text.clone();
            }
        }
        let text: Arc<str> = match (options.demand(), &options.accelerator_type) {
            (Ok(demand), Some(model)) => format!("waiting for a worker lease of {demand} on a {model} node").into(),
            (Ok(demand), None) => format!("waiting for a worker lease of {demand}").into(),
            (Err(_), _) => "waiting for a worker lease".into(),
        };
        let asks = (
            options.num_cpus,
            options.num_gpus,
            options.memory,
            options.accelerator_type.clone(),
            options.resources.clone(),
        );
        *last.borrow_mut() = Some((asks, text.clone()));
        text
    })
}

/// Why a task waits before it asks for a lease.
pub(crate) fn waiting_for_arguments() -> Arc<str> {
    thread_local! {
        static TEXT: Arc<str> = "waiting for its arguments (objects other tasks make)".into();
    }
    TEXT.with(Arc::clone)
}

/// Pushes the task to a leased worker (retrying per its options) and gives its outcome;
/// `None` when this process ran it itself meanwhile (see `crate::inline`).
async fn execute(worker: &Arc<CoreWorker>, spec: &TaskSpec, told_waiting: bool) -> IonetResult<Option<ObjectState>> {
    let demand = spec.options.demand()?;
    let max_calls = (spec.options.max_calls > 0).then_some((spec.function, spec.options.max_calls));
    let pool = worker.pool(&demand, &spec.options, max_calls)?;
    let mut attempt = 0u32;
    let mut claimed = false;
    // Leases found dead before a push, in a row: a few are free, then each costs an attempt.
    let mut dead_before_push = 0u32;
    // Whether the state API heard it waits for a lease (its submission said so when its
    // arguments were ready then).
    let mut told_waiting = told_waiting;
    loop {
        let args = resolve_args(worker, spec).await?;
        if !told_waiting {
            worker.task_events.record(spec.events, TaskState::PendingNodeAssignment, |event| {
                event.attempt = attempt;
                event.reason = Some(waiting_reason(&spec.options));
            });
            told_waiting = true;
        }
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
        if lease.tasks.has_ended() {
            // Its worker died before this task was sent: it never ran, no attempt spent
            // (unless workers keep dying so, which counts as failing).
            worker.running_tasks.remove(&spec.return_id);
            worker.release(&pool, &lease, estimate);
            worker.return_failed_lease(&pool, &lease);
            dead_before_push += 1;
            if dead_before_push > 3 {
                if attempt >= spec.options.max_retries {
                    return Err(IonetError::WorkerCrashed {
                        function: spec.function.to_string(),
                        attempts: attempt + 1,
                        reason: "every worker leased for it had died before it could be sent".into(),
                    });
                }
                attempt += 1;
            }
            continue;
        }
        dead_before_push = 0;
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
        worker.task_events.record(spec.events, TaskState::Running, |event| {
            event.attempt = attempt;
            event.place = Some(lease.place.clone());
        });
        let pushed = lease.tasks.push(request).await;
        worker.running_tasks.remove(&spec.return_id);
        if spec.entry.is_settled() {
            // Cancelled meanwhile: its answer no longer matters.
            match pushed {
                Ok(reply) => {
                    worker.borrows.settle_reply(spec.return_id, &reply, &spec.args, &lease.worker_address);
                    worker.borrows.forget_container(&spec.return_id);
                    worker.release(&pool, &lease, estimate)
                }
                Err(_) => worker.return_lease(&pool, &lease, true).await,
            }
            return Err(IonetError::Cancelled(format!("task {} was cancelled", spec.task_id.short())));
        }
        match pushed {
            Ok(reply) => {
                pool.observe(spec.profile, reply.run_micros);
                // Refs inside the value: held while the value is (given back at once if the
                // value was dropped meanwhile); refs the worker kept: lent to it.
                worker.borrows.settle_reply(spec.return_id, &reply, &spec.args, &lease.worker_address);
                if worker.objects.get(&spec.return_id).is_none() {
                    worker.borrows.forget_container(&spec.return_id);
                }
                worker.release(&pool, &lease, estimate);
                worker.retire_if_spent(&pool, &lease).await;
                if !matches!(reply.result, Some(push_task_reply::Result::Failure(_)) | None) {
                    // Where it ran went with its RUNNING event.
                    worker.task_events.record(spec.events, TaskState::Finished, |event| {
                        event.attempt = attempt;
                        event.run_us = reply.run_micros;
                    });
                }
                match reply.result {
                    Some(push_task_reply::Result::Inline(bytes)) => {
                        return Ok(Some(ObjectState::Inline(Arc::new(bytes))))
                    }
                    Some(push_task_reply::Result::Stored(stored)) => return Ok(Some(ObjectState::Stored(stored))),
                    Some(push_task_reply::Result::Failure(failure)) => {
                        let retryable = failure.kind != task_failure::Kind::FinalError as i32;
                        if spec.options.retry_exceptions && retryable && attempt < spec.options.max_retries {
                            attempt += 1;
                            told_waiting = false;
                            continue;
                        }
                        return Err(crate::task::task_failed(failure.function_name.clone(), failure));
                    }
                    None => {
                        return Err(IonetError::Internal(format!("worker sent an empty reply for {}", spec.function)))
                    }
                }
            }
            Err(status) => {
                worker.return_failed_lease(&pool, &lease);
                if lease.killed_by_cancel.load(Ordering::SeqCst) {
                    continue; // another task's forced cancel killed the worker: not this one's fault
                }
                if attempt < spec.options.max_retries {
                    attempt += 1;
                    told_waiting = false;
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

#[cfg(test)]
mod pending_tests {
    use super::*;

    /// A driver's thread waits at the limit and goes on as soon as one settles; a
    /// worker's (`may_wait` false) never waits.
    #[test]
    fn remote_waits_at_the_limit_and_goes_on_when_one_settles() {
        let pending = Arc::new(Pending::new(2));
        pending.admit(true);
        pending.admit(true);
        pending.admit(false);
        assert_eq!(pending.count(), 3, "a worker is never held back");
        let admitted = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (pending, admitted) = (pending.clone(), admitted.clone());
            std::thread::spawn(move || {
                pending.admit(true);
                admitted.store(true, Ordering::SeqCst);
            })
        };
        // Still at the limit after one settles (3 → 2): it waits on.
        pending.settle();
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        while std::time::Instant::now() < deadline {
            assert!(!admitted.load(Ordering::SeqCst), "admitted with 2 of 2 pending");
            std::thread::sleep(Duration::from_millis(10));
        }
        pending.settle();
        waiter.join().unwrap();
        assert!(admitted.load(Ordering::SeqCst));
        assert_eq!(pending.count(), 2);
    }
}
