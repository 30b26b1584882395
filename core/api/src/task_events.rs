//! The owner's side of the state API: this process records what it sees of the tasks it
//! submits (waiting for arguments, waiting for a lease and for what, running on which
//! node and worker, finished, failed with what), and sends the events to the head in
//! batches, off the task path (`Gcs/AddTaskEvents`, once a second or when a batch is
//! full; and at shutdown).
//!
//! A task's events that have not been sent yet are merged into one (its latest state,
//! carrying when it was submitted and started, where it ran, why it waited): a task that
//! is submitted, runs and finishes within one batch costs one event to send and to apply.
//!
//! Bounded: at most [`CAPACITY`] events wait here; past it the oldest go, counted and
//! told to the head with the next batch (listings show the count). A batch the head does
//! not take is dropped the same way: events never hold a task up.
//!
//! `IONET_TASK_EVENTS=0` in a process's environment turns its recording off (nothing is
//! recorded, nothing sent): the baseline the events' cost is measured against.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::rpc::proto::gcs::{AddTaskEventsRequest, TaskEvent, TaskState};
use ionet_common::rpc::{self, GcsClient};
use ionet_common::TaskId;

/// The most events waiting to be sent.
pub(crate) const CAPACITY: usize = 100_000;
/// The most events one batch carries: small enough that encoding one holds a runtime
/// thread for well under a millisecond.
const MAX_BATCH: usize = 2_000;
/// How long events gather before they go.
const PERIOD: Duration = Duration::from_secs(1);
/// The variable that turns recording off (`0`, `false`, `off`).
pub const TASK_EVENTS_ENV: &str = "IONET_TASK_EVENTS";

/// Events waiting to be sent, oldest first; a task's one event stands for all its
/// events since the last batch.
#[derive(Default)]
struct Pending {
    events: VecDeque<(TaskId, TaskEvent)>,
    /// The sequence number of `events[0]` (one per event ever queued).
    base: u64,
    /// Each waiting task's event, by sequence number (the ids are this process's own:
    /// a fast hash).
    index: rustc_hash::FxHashMap<TaskId, u64>,
}

impl Pending {
    fn len(&self) -> usize {
        self.events.len()
    }

    /// Takes up to `count` of the oldest events.
    fn take(&mut self, count: usize) -> Vec<TaskEvent> {
        let count = count.min(self.events.len());
        let mut taken = Vec::with_capacity(count);
        for (offset, (task_id, mut event)) in self.events.drain(..count).enumerate() {
            if self.index.get(&task_id) == Some(&(self.base + offset as u64)) {
                self.index.remove(&task_id);
            }
            event.task_id = task_id.to_vec();
            taken.push(event);
        }
        self.base += count as u64;
        taken
    }
}

/// `new` merged into `old`, a later event of the same task that has not been sent.
fn merge(old: &mut TaskEvent, new: TaskEvent) {
    if old.submitted_us == 0 {
        old.submitted_us = old.time_us;
    }
    if old.state == TaskState::Running as i32 && old.started_us == 0 {
        old.started_us = old.time_us;
    }
    match TaskState::try_from(new.state) {
        Ok(TaskState::Running) => old.started_us = new.time_us,
        // Waiting again (a retry): the earlier run is not this one's start.
        Ok(TaskState::PendingArgsAvail | TaskState::PendingNodeAssignment) => old.started_us = 0,
        _ => {}
    }
    old.state = new.state;
    old.time_us = new.time_us;
    old.attempt = old.attempt.max(new.attempt);
    if !new.name.is_empty() {
        old.name = new.name;
    }
    old.reason = new.reason;
    if !new.node_id.is_empty() {
        old.node_id = new.node_id;
        old.worker_address = new.worker_address;
    }
    old.error = new.error;
    old.run_us = new.run_us;
}

struct Shared {
    job_id: Vec<u8>,
    buffer: Mutex<Pending>,
    dropped: AtomicU64,
    wake: Arc<tokio::sync::Notify>,
    /// Held while a batch is taken and sent: batches reach the head in order.
    sending: tokio::sync::Mutex<Option<GcsClient>>,
    gcs_address: String,
    credential: Bearer,
}

/// This process's recorder of its tasks' events.
pub(crate) struct TaskEvents {
    shared: Arc<Shared>,
    /// False: `IONET_TASK_EVENTS` turned recording off.
    enabled: bool,
}

impl TaskEvents {
    /// Starts the sender on `handle`, for `job_id`'s tasks, to the head at `gcs_address`.
    pub(crate) fn start(
        handle: &tokio::runtime::Handle,
        gcs_address: String,
        credential: Bearer,
        job_id: Vec<u8>,
    ) -> Self {
        let shared = Arc::new(Shared {
            job_id,
            buffer: Mutex::new(Pending::default()),
            dropped: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            sending: tokio::sync::Mutex::new(None),
            gcs_address,
            credential,
        });
        // The sender ends with the recorder (a driver's next `init` makes another).
        let weak = Arc::downgrade(&shared);
        let wake = shared.wake.clone();
        handle.spawn(async move {
            loop {
                let _ = tokio::time::timeout(PERIOD, wake.notified()).await;
                let Some(shared) = weak.upgrade() else { return };
                send_all(&shared).await;
            }
        });
        let enabled = !matches!(
            std::env::var(TASK_EVENTS_ENV).map(|value| value.trim().to_ascii_lowercase()).as_deref(),
            Ok("0" | "false" | "off" | "no")
        );
        Self { shared, enabled }
    }

    /// Records that task `task_id` is now in `state`; `fill` adds what the state says.
    pub(crate) fn record(&self, task_id: TaskId, state: TaskState, fill: impl FnOnce(&mut TaskEvent)) {
        if !self.enabled {
            return;
        }
        // The job's id goes on when the batch is sent.
        let mut event = TaskEvent { state: state as i32, time_us: ionet_common::clock::now_us(), ..Default::default() };
        fill(&mut event);
        let full = {
            let mut guard = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let pending = &mut *guard;
            if let Some(at) = pending.index.get(&task_id).and_then(|seq| seq.checked_sub(pending.base)) {
                if let Some((_, waiting)) = pending.events.get_mut(at as usize) {
                    merge(waiting, event);
                    return;
                }
            }
            if pending.len() >= CAPACITY {
                pending.take(1);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            let seq = pending.base + pending.len() as u64;
            pending.events.push_back((task_id, event));
            pending.index.insert(task_id, seq);
            pending.len() >= MAX_BATCH
        };
        if full {
            self.shared.wake.notify_one();
        }
    }

    /// Sends every event recorded so far (a driver's last, before it leaves), waiting up
    /// to `timeout`.
    pub(crate) async fn flush(&self, timeout: Duration) {
        // A send of its own: a timeout here never cuts a batch off mid-way (lost uncounted).
        let shared = self.shared.clone();
        let sending = tokio::spawn(async move { send_all(&shared).await });
        let _ = tokio::time::timeout(timeout, sending).await;
    }
}

/// Takes and sends what waits, in batches, in order.
async fn send_all(shared: &Shared) {
    let mut client = shared.sending.lock().await;
    loop {
        let mut events = shared.buffer.lock().unwrap_or_else(|p| p.into_inner()).take(MAX_BATCH);
        for event in &mut events {
            event.job_id = shared.job_id.clone();
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if events.is_empty() && dropped == 0 {
            return;
        }
        let count = events.len() as u64;
        if client.is_none() {
            *client = rpc::gcs_client(&shared.gcs_address, &shared.credential).await.ok();
        }
        let sent = match client.as_mut() {
            Some(gcs) => gcs.add_task_events(AddTaskEventsRequest { events, dropped }).await.map(|_| ()),
            None => Err(tonic::Status::unavailable("the head is not reachable")),
        };
        if let Err(status) = sent {
            tracing::debug!(error = %status.message(), events = count, "task events dropped: the head did not take them");
            shared.dropped.fetch_add(count + dropped, Ordering::Relaxed);
            *client = None;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million tasks' events with the head unreachable: at most [`CAPACITY`] wait, the
    /// rest are dropped and counted, none is lost uncounted.
    #[tokio::test]
    async fn a_million_events_stay_bounded_and_every_drop_is_counted() {
        let credential = Bearer::new("ionet1.test").unwrap();
        // Nothing listens on port 1: every send fails.
        let events =
            TaskEvents::start(&tokio::runtime::Handle::current(), "127.0.0.1:1".into(), credential, vec![1; 4]);
        assert!(events.enabled);
        const TASKS: u64 = 1_000_000;
        for n in 0..TASKS {
            let mut id = [0u8; TaskId::LEN];
            id[..8].copy_from_slice(&n.to_le_bytes());
            events.record(TaskId::from_bytes(&id).unwrap(), TaskState::Running, |event| event.name = "step".into());
            if n % 100_000 == 0 {
                let waiting = events.shared.buffer.lock().unwrap().len();
                assert_eq!(events.shared.buffer.lock().unwrap().index.len(), waiting, "one index entry an event");
                assert!(waiting <= CAPACITY, "{waiting} events wait after {n}");
            }
        }
        events.flush(Duration::from_secs(30)).await;
        // No batch in flight while the sender's lock is held: each event is in one place.
        let _no_send = events.shared.sending.lock().await;
        let waiting = events.shared.buffer.lock().unwrap().len() as u64;
        let dropped = events.shared.dropped.load(Ordering::Relaxed);
        assert!(waiting <= CAPACITY as u64);
        assert_eq!(waiting + dropped, TASKS, "every event is waiting or counted as dropped");
        assert!(dropped >= TASKS - CAPACITY as u64);
    }

    /// A task's events not sent yet become one, which says all the head needs.
    #[tokio::test]
    async fn a_tasks_unsent_events_are_merged_into_one() {
        let credential = Bearer::new("ionet1.test").unwrap();
        let events =
            TaskEvents::start(&tokio::runtime::Handle::current(), "127.0.0.1:1".into(), credential, vec![1; 4]);
        let (first, second) =
            (TaskId::from_bytes(&[1; TaskId::LEN]).unwrap(), TaskId::from_bytes(&[2; TaskId::LEN]).unwrap());
        events.record(first, TaskState::PendingNodeAssignment, |event| {
            event.name = "train".into();
            event.reason = "waiting for a lease of {GPU: 1}".into();
        });
        events.record(second, TaskState::PendingArgsAvail, |event| event.name = "eval".into());
        events.record(first, TaskState::Running, |event| {
            event.node_id = vec![9];
            event.worker_address = "10.0.0.1:7000".into();
        });
        events.record(first, TaskState::Finished, |event| event.run_us = 40);
        let taken = events.shared.buffer.lock().unwrap().take(10);
        let (train, eval) = (&taken[0], &taken[1]);
        assert_eq!(taken.len(), 2);
        assert_eq!((train.task_id.as_slice(), train.state), (&first.to_vec()[..], TaskState::Finished as i32));
        assert_eq!((train.name.as_str(), train.node_id.as_slice(), train.run_us), ("train", &[9u8][..], 40));
        assert!(train.submitted_us > 0 && train.started_us >= train.submitted_us && train.time_us >= train.started_us);
        assert!(train.reason.is_empty(), "a task that ran waits for nothing");
        assert_eq!((eval.name.as_str(), eval.state), ("eval", TaskState::PendingArgsAvail as i32));
        // Once sent, a task's next event starts a new one.
        events.record(second, TaskState::Running, |_| {});
        let next = events.shared.buffer.lock().unwrap().take(10);
        assert_eq!((next.len(), next[0].state, next[0].submitted_us), (1, TaskState::Running as i32, 0));
    }
}
