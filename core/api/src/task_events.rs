//! The owner's side of the state API: this process records what it sees of the tasks it
//! submits (waiting for arguments, waiting for a lease and for what, running on which
//! node and worker, finished, failed with what), and sends the events to the head in
//! batches, off the task path (`Gcs/AddTaskEvents`, once a second or when a batch is
//! full; and at shutdown).
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
/// The most events one batch carries.
const MAX_BATCH: usize = 10_000;
/// How long events gather before they go.
const PERIOD: Duration = Duration::from_secs(1);
/// The variable that turns recording off (`0`, `false`, `off`).
pub const TASK_EVENTS_ENV: &str = "IONET_TASK_EVENTS";

struct Shared {
    job_id: Vec<u8>,
    buffer: Mutex<VecDeque<TaskEvent>>,
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
            buffer: Mutex::new(VecDeque::new()),
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
        let mut event = TaskEvent {
            task_id: task_id.to_vec(),
            job_id: self.shared.job_id.clone(),
            state: state as i32,
            time_us: ionet_common::clock::now_us(),
            ..Default::default()
        };
        fill(&mut event);
        let full = {
            let mut buffer = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            if buffer.len() >= CAPACITY {
                buffer.pop_front();
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            buffer.push_back(event);
            buffer.len() >= MAX_BATCH
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
        let events: Vec<TaskEvent> = {
            let mut buffer = shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let cut = buffer.len().min(MAX_BATCH);
            buffer.drain(..cut).collect()
        };
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
}
