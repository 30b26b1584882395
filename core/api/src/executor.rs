//! The executor: the one thread that runs this process's tasks and its ordered actor's
//! calls, one at a time, in the order they were given. A process hosting several actors
//! (a shared process) gives each ordered one an executor of its own
//! ([`Executor::beside`]), which shares what it learnt of run times.
//!
//! User code runs here, off the runtime's threads, so it may block (or call `get`) as long
//! as it likes. Invariants (unit-tested below):
//! - jobs run one at a time, in the order given, whether on the thread or in place;
//! - a call of a function that recently ran in under [`INLINE_LIMIT_MICROS`] runs in
//!   place, on the caller's thread, but only when nothing is queued and nothing runs
//!   (waking the executor and then the runtime again for the reply costs more than such a
//!   call); otherwise it queues behind the others;
//! - run times are a moving average per function (¾ old, ¼ new).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use dashmap::DashMap;

/// Work for the executor thread.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Calls recently shorter than this (in microseconds) may run in place.
pub(crate) const INLINE_LIMIT_MICROS: u64 = 50;

/// The executor thread's stack: room for tasks run inside the tasks waiting for them
/// (`crate::inline`).
const EXECUTOR_STACK_BYTES: usize = 64 << 20;
/// The stack of an executor beside the process's own (an actor's in a shared process).
const GUEST_STACK_BYTES: usize = 8 << 20;

pub(crate) struct Executor {
    /// The runtime user code may reach from the executor thread (to spawn, or for a handle).
    handle: tokio::runtime::Handle,
    /// Run first on the executor thread (marks it for the work-first waits).
    on_start: fn(),
    /// The queue into the thread, started on first use.
    jobs: OnceLock<mpsc::Sender<Job>>,
    /// Jobs queued and not finished.
    pending: Arc<AtomicUsize>,
    /// Held while a job runs (on the executor, or in place): one at a time.
    running: Arc<Mutex<()>>,
    /// Recent run time of each function run here, in microseconds (shared by the
    /// executors of one process).
    run_times: Arc<DashMap<String, u64>>,
    /// The thread's stack size.
    stack_bytes: usize,
}

impl Executor {
    pub(crate) fn new(handle: tokio::runtime::Handle, on_start: fn()) -> Self {
        Self {
            handle,
            on_start,
            jobs: OnceLock::new(),
            pending: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(Mutex::new(())),
            run_times: Arc::new(DashMap::new()),
            stack_bytes: EXECUTOR_STACK_BYTES,
        }
    }

    /// Another executor of the same process (an actor's own, in a shared process): its
    /// own thread and order, the run times shared, a smaller stack (nothing runs inline
    /// in a process hosting actors).
    pub(crate) fn beside(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            on_start: self.on_start,
            jobs: OnceLock::new(),
            pending: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(Mutex::new(())),
            run_times: self.run_times.clone(),
            stack_bytes: GUEST_STACK_BYTES,
        }
    }

    /// Runs `job` (a call of `function`) after every job given before it.
    pub(crate) fn run_in_order(&self, function: Option<&str>, job: Job) {
        if function.is_some_and(|function| self.is_short(function)) && self.pending.load(Ordering::SeqCst) == 0 {
            if let Ok(_running) = self.running.try_lock() {
                job();
                return;
            }
        }
        let jobs = self.jobs.get_or_init(|| self.start());
        self.pending.fetch_add(1, Ordering::SeqCst);
        if jobs.send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
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

    fn is_short(&self, function: &str) -> bool {
        self.run_times.get(function).is_some_and(|micros| *micros < INLINE_LIMIT_MICROS)
    }

    fn start(&self) -> mpsc::Sender<Job> {
        let (jobs, queued) = mpsc::channel::<Job>();
        let (handle, pending, running, on_start) =
            (self.handle.clone(), self.pending.clone(), self.running.clone(), self.on_start);
        std::thread::Builder::new()
            .name("ionet-executor".into())
            .stack_size(self.stack_bytes)
            .spawn(move || {
                let _runtime = handle.enter();
                on_start();
                while let Ok(job) = queued.recv() {
                    let turn = running.lock().unwrap_or_else(|p| p.into_inner());
                    job();
                    drop(turn);
                    pending.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .expect("the OS refused the executor thread");
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn executor() -> (tokio::runtime::Runtime, Executor) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let executor = Executor::new(runtime.handle().clone(), || {});
        (runtime, executor)
    }

    #[test]
    fn jobs_run_one_at_a_time_in_the_order_given() {
        let (_runtime, executor) = executor();
        let (done, finished) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        for index in 0..50 {
            let (log, done) = (log.clone(), done.clone());
            // Alternate a short function (which may run in place) with unknown ones.
            let function = if index % 2 == 0 { Some("short") } else { None };
            executor.record_run("short", 1);
            executor.run_in_order(
                function,
                Box::new(move || {
                    log.lock().unwrap().push(index);
                    done.send(()).unwrap();
                }),
            );
        }
        for _ in 0..50 {
            finished.recv_timeout(Duration::from_secs(30)).expect("every job runs");
        }
        assert_eq!(*log.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn only_a_short_call_with_nothing_queued_runs_in_place() {
        let (_runtime, executor) = executor();
        let caller = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let run = |function: Option<&str>| {
            let (ran_on, (done, finished)) = (ran_on.clone(), mpsc::channel());
            executor.run_in_order(
                function,
                Box::new(move || {
                    ran_on.lock().unwrap().push(std::thread::current().id());
                    done.send(()).unwrap();
                }),
            );
            finished.recv_timeout(Duration::from_secs(30)).expect("the job runs");
            // The executor counts the job finished just after it returns.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while executor.pending.load(Ordering::SeqCst) > 0 {
                assert!(std::time::Instant::now() < deadline, "the executor never finished its job");
                std::thread::yield_now();
            }
        };
        run(Some("unknown"));
        executor.record_run("fast", 10);
        run(Some("fast"));
        executor.record_run("slow", 10_000);
        run(Some("slow"));
        let ran_on = ran_on.lock().unwrap();
        assert_ne!(ran_on[0], caller, "an unknown function runs on the executor");
        assert_eq!(ran_on[1], caller, "a short call with nothing queued runs in place");
        assert_ne!(ran_on[2], caller, "a long call runs on the executor");
    }

    #[test]
    fn run_times_are_a_moving_average() {
        let (_runtime, executor) = executor();
        executor.record_run("f", 100);
        assert!(!executor.is_short("f"));
        for _ in 0..20 {
            executor.record_run("f", 4);
        }
        assert!(executor.is_short("f"), "the average follows the recent runs down");
        executor.record_run("f", 10_000);
        assert!(!executor.is_short("f"), "one long run lifts it past the limit");
    }
}
