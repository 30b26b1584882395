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
//! told to the head with the next batch (listings show the count). A batch that cannot
//! reach the head (it is restarting, or failing over) is kept and sent first once it
//! answers again, tried once a period for up to [`KEEP_UNSENT_FOR`] (later batches wait
//! behind it, bounded by the buffer); a batch the head refuses, or one kept past that, is
//! dropped the same way: events never hold a task up.
//!
//! Bounded in rate too: a process records the events of at most [`RATE`] new tasks a
//! second (`IONET_TASK_EVENTS_PER_SECOND`); a task past it is not recorded at all, from
//! its submission to its end (so no row is left half told), and counted as dropped. A
//! flood of tiny tasks (a quarter of a million a second) would otherwise spend a good
//! part of the machine on rows the head forgets within a fraction of a second (it keeps
//! 50,000 an account); work of tasks that last milliseconds or more is never near it.
//!
//! `IONET_TASK_EVENTS=0` in a process's environment turns its recording off (nothing is
//! recorded, nothing sent): the baseline the events' cost is measured against.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ionet_common::auth::Bearer;
use ionet_common::rpc::proto::gcs::{AddTaskEventsRequest, TaskState};
use ionet_common::rpc::{self, GcsClient};
use ionet_common::task_event_batch::{BatchBuilder, Event};
use ionet_common::TaskId;

/// The most events waiting to be sent.
pub(crate) const CAPACITY: usize = 100_000;
/// The most events one batch carries: small enough that encoding one holds a runtime
/// thread for well under a millisecond.
const MAX_BATCH: usize = 2_000;
/// How long events gather before they go.
const PERIOD: Duration = Duration::from_secs(1);
/// How long a batch that could not reach the head is kept (tried once a period) before
/// it is dropped: the time a head takes to come back or a standby to take over, with room.
const KEEP_UNSENT_FOR: Duration = Duration::from_secs(60);
/// The variable that turns recording off (`0`, `false`, `off`).
pub const TASK_EVENTS_ENV: &str = "IONET_TASK_EVENTS";
/// The most new tasks a second whose events a process records, unless
/// [`RATE_ENV`] says otherwise.
pub(crate) const RATE: u64 = 10_000;
/// The variable that sets that rate (a whole number, at most [`MAX_RATE`]).
pub const RATE_ENV: &str = "IONET_TASK_EVENTS_PER_SECOND";
/// The most a rate may be (what a count in [`TaskEvents::admitted`] holds).
const MAX_RATE: u64 = (1 << COUNT_BITS) - 1;
const COUNT_BITS: u32 = 24;

/// A task as its events know it: its id, and whether they are recorded (decided once, at
/// its submission: [`TaskEvents::admit`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tracked {
    pub(crate) task_id: TaskId,
    recorded: bool,
}

impl Tracked {
    /// A task whose events are not recorded.
    #[cfg(test)]
    pub(crate) fn unrecorded(task_id: TaskId) -> Self {
        Self { task_id, recorded: false }
    }

    pub(crate) fn recorded(&self) -> bool {
        self.recorded
    }
}

/// Where a task runs: a node and a worker. One per lease (and one for this process),
/// shared by the events of every task run there.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) node_id: Vec<u8>,
    pub(crate) worker_address: String,
}

/// A task's name as its events carry it: a function's (not copied), or one made once and
/// shared (an actor's `Class.method`, a task's `name` option).
#[derive(Clone, Debug)]
pub(crate) enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Name::Static(name) => name,
            Name::Shared(name) => name,
        }
    }
}

impl From<&'static str> for Name {
    fn from(name: &'static str) -> Self {
        Name::Static(name)
    }
}

impl From<Arc<str>> for Name {
    fn from(name: Arc<str>) -> Self {
        Name::Shared(name)
    }
}

/// What an event says besides its state (each part optional).
#[derive(Default)]
pub(crate) struct Update {
    pub(crate) attempt: u32,
    /// On a task's first event.
    pub(crate) name: Option<Name>,
    /// An actor task's actor (on its first event).
    pub(crate) actor_id: Option<Arc<[u8]>>,
    /// While it waits: why.
    pub(crate) reason: Option<Arc<str>>,
    /// Running and after.
    pub(crate) place: Option<Arc<Place>>,
    pub(crate) error: Option<String>,
    /// Ended after running: how long it ran on its worker.
    pub(crate) run_us: u64,
}

/// A task's events since the last batch, as one: its latest state, and what the earlier
/// ones said that the latest does not.
struct Entry {
    task_id: TaskId,
    state: TaskState,
    time_us: u64,
    submitted_us: u64,
    started_us: u64,
    update: Update,
}

impl Entry {
    /// `new` (of `state` at `time_us`), a later event of the same task, merged in.
    fn merge(&mut self, state: TaskState, time_us: u64, new: Update) {
        if self.submitted_us == 0 {
            self.submitted_us = self.time_us;
        }
        if self.state == TaskState::Running && self.started_us == 0 {
            self.started_us = self.time_us;
        }
        match state {
            TaskState::Running => self.started_us = time_us,
            // Waiting again (a retry): the earlier run is not this one's start.
            TaskState::PendingArgsAvail | TaskState::PendingNodeAssignment => self.started_us = 0,
            _ => {}
        }
        self.state = state;
        self.time_us = time_us;
        let old = &mut self.update;
        old.attempt = old.attempt.max(new.attempt);
        if new.name.is_some() {
            old.name = new.name;
        }
        if new.actor_id.is_some() {
            old.actor_id = new.actor_id;
        }
        old.reason = new.reason;
        if new.place.is_some() {
            old.place = new.place;
        }
        old.error = new.error;
        old.run_us = new.run_us;
    }

    fn event(&self) -> Event<'_> {
        let update = &self.update;
        Event {
            task_id: self.task_id.as_bytes(),
            state: self.state,
            time_us: self.time_us,
            attempt: update.attempt,
            submitted_us: self.submitted_us,
            started_us: self.started_us,
            run_us: update.run_us,
            name: update.name.as_deref().unwrap_or_default(),
            reason: update.reason.as_deref().unwrap_or_default(),
            node_id: update.place.as_ref().map_or(&[][..], |place| &place.node_id[..]),
            worker_address: update.place.as_ref().map_or("", |place| &place.worker_address[..]),
            error: update.error.as_deref().unwrap_or_default(),
            actor_id: update.actor_id.as_deref().unwrap_or_default(),
        }
    }
}

/// Events waiting to be sent, oldest first; a task's one entry stands for all its
/// events since the last batch.
#[derive(Default)]
struct Pending {
    entries: VecDeque<Entry>,
    /// The sequence number of `entries[0]` (one per entry ever queued).
    base: u64,
    /// Each waiting task's entry, by sequence number (the ids are this process's own:
    /// a fast hash).
    index: rustc_hash::FxHashMap<TaskId, u64>,
}

impl Pending {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes up to `count` of the oldest entries (all of them at once when they are
    /// fewer: no copy).
    fn take(&mut self, count: usize) -> VecDeque<Entry> {
        if self.entries.len() <= count {
            self.base += self.entries.len() as u64;
            self.index.clear();
            return std::mem::take(&mut self.entries);
        }
        let taken: VecDeque<Entry> = self.entries.drain(..count).collect();
        for (offset, entry) in taken.iter().enumerate() {
            if self.index.get(&entry.task_id) == Some(&(self.base + offset as u64)) {
                self.index.remove(&entry.task_id);
            }
        }
        self.base += count as u64;
        taken
    }
}

struct Shared {
    job_id: Vec<u8>,
    buffer: Mutex<Pending>,
    dropped: AtomicU64,
    wake: Arc<tokio::sync::Notify>,
    /// Held while a batch is taken and sent: batches reach the head in order.
    sending: tokio::sync::Mutex<Sender>,
    gcs_address: String,
    credential: Bearer,
}

/// This process's recorder of its tasks' events.
pub(crate) struct TaskEvents {
    shared: Arc<Shared>,
    /// This process as a place tasks run (those it runs itself).
    here: Arc<Place>,
    /// False: `IONET_TASK_EVENTS` turned recording off.
    enabled: bool,
    /// The most new tasks a second recorded.
    rate: u64,
    /// The second new tasks were last admitted in (the high bits) and how many were
    /// (the low [`COUNT_BITS`]).
    admitted: AtomicU64,
}

impl TaskEvents {
    /// Starts the sender on `handle`, for `job_id`'s tasks, to the head at `gcs_address`;
    /// `here` is this process.
    pub(crate) fn start(
        handle: &tokio::runtime::Handle,
        gcs_address: String,
        credential: Bearer,
        job_id: Vec<u8>,
        here: Place,
    ) -> Self {
        let shared = Arc::new(Shared {
            job_id,
            buffer: Mutex::new(Pending::default()),
            dropped: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            sending: tokio::sync::Mutex::new(Sender::default()),
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
                send_all(&shared, false).await;
            }
        });
        let enabled = !matches!(
            std::env::var(TASK_EVENTS_ENV).map(|value| value.trim().to_ascii_lowercase()).as_deref(),
            Ok("0" | "false" | "off" | "no")
        );
        let rate = std::env::var(RATE_ENV).ok().and_then(|value| value.trim().parse::<u64>().ok()).unwrap_or(RATE);
        Self { shared, here: Arc::new(here), enabled, rate: rate.min(MAX_RATE), admitted: AtomicU64::new(0) }
    }

    /// Whether the events of task `task_id`, submitted now, are recorded: at most
    /// [`RATE`] new tasks' a second are (the others are counted as dropped).
    pub(crate) fn admit(&self, task_id: TaskId) -> Tracked {
        let recorded = self.enabled && self.admit_in(ionet_common::clock::now_us() / 1_000_000);
        Tracked { task_id, recorded }
    }

    /// Admits one more new task in `second`, if fewer than the rate were.
    fn admit_in(&self, second: u64) -> bool {
        if self.rate == 0 {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut current = self.admitted.load(Ordering::Relaxed);
        loop {
            let (window, count) = (current >> COUNT_BITS, current & MAX_RATE);
            // A later second starts afresh; an earlier one (a thread that read the clock
            // before another moved the window on, or a clock stepped back) counts against
            // the current one.
            let next = if second & (u64::MAX >> COUNT_BITS) > window {
                (second << COUNT_BITS) | 1
            } else if count < self.rate {
                current + 1
            } else {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match self.admitted.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// This process, as where a task it runs itself runs.
    pub(crate) fn here(&self) -> Arc<Place> {
        self.here.clone()
    }

    /// Records that `task` is now in `state` (if its events are recorded); `fill` adds
    /// what the state says.
    pub(crate) fn record(&self, task: Tracked, state: TaskState, fill: impl FnOnce(&mut Update)) {
        if !task.recorded {
            return;
        }
        let task_id = task.task_id;
        let time_us = ionet_common::clock::now_us();
        let mut update = Update::default();
        fill(&mut update);
        let full = {
            let mut guard = self.shared.buffer.lock().unwrap_or_else(|p| p.into_inner());
            let pending = &mut *guard;
            if pending.len() >= CAPACITY && !pending.index.contains_key(&task_id) {
                pending.take(1);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            let seq = pending.base + pending.len() as u64;
            match pending.index.entry(task_id) {
                std::collections::hash_map::Entry::Occupied(waiting) => {
                    let at = waiting.get().checked_sub(pending.base);
                    if let Some(entry) = at.and_then(|at| pending.entries.get_mut(at as usize)) {
                        entry.merge(state, time_us, update);
                        return;
                    }
                    // Not waiting any more (taken): a new entry.
                    *waiting.into_mut() = seq;
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(seq);
                }
            }
            pending.entries.push_back(Entry { task_id, state, time_us, submitted_us: 0, started_us: 0, update });
            pending.len() >= MAX_BATCH
        };
        if full {
            self.shared.wake.notify_one();
        }
    }

    /// Sends every event recorded so far (a driver's last, before it leaves), waiting up
    /// to `timeout`: a batch the head did not answer is tried again meanwhile.
    pub(crate) async fn flush(&self, timeout: Duration) {
        // A send of its own: a timeout here never cuts a batch off mid-way (lost uncounted).
        let shared = self.shared.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let sending = tokio::spawn(async move {
            while !send_all(&shared, true).await && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(PERIOD / 4).await;
            }
        });
        let _ = tokio::time::timeout(timeout, sending).await;
    }
}

/// The sending side: the connection to the head, and the batch that could not reach it.
#[derive(Default)]
struct Sender {
    client: Option<GcsClient>,
    unsent: Option<Unsent>,
}

/// A batch that could not reach the head: sent first next time.
struct Unsent {
    request: AddTaskEventsRequest,
    /// Its events (its own count of dropped ones aside).
    events: u64,
    /// When its first send failed (`None`: not sent yet), and when to try it again.
    failed_at: Option<Instant>,
    retry_at: Instant,
}

impl Unsent {
    /// What it carries, counted as dropped when it is.
    fn lost(&self) -> u64 {
        self.events + self.request.dropped
    }
}

/// Whether a failed send may succeed later: the head could not be reached (not a
/// refusal, which says the same again, nor a call cut off after the head may have taken
/// it, which sent again would count twice).
fn may_pass(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
}

/// Sends the batch kept from before (once its time to try again came, or at once when
/// `eager`: a flush), then takes and sends what waits, in batches, in order. Whether
/// nothing is left kept.
async fn send_all(shared: &Shared, eager: bool) -> bool {
    let mut sender = shared.sending.lock().await;
    let sender = &mut *sender;
    loop {
        let mut unsent = match sender.unsent.take() {
            // Not yet: later batches wait behind it (in the buffer, bounded).
            Some(unsent) if !eager && Instant::now() < unsent.retry_at => {
                sender.unsent = Some(unsent);
                return false;
            }
            Some(unsent) => unsent,
            None => {
                let entries = shared.buffer.lock().unwrap_or_else(|p| p.into_inner()).take(MAX_BATCH);
                let dropped = shared.dropped.swap(0, Ordering::Relaxed);
                if entries.is_empty() && dropped == 0 {
                    return true;
                }
                let mut batch = BatchBuilder::new(&shared.job_id);
                for entry in &entries {
                    batch.push(&entry.event());
                }
                let request = AddTaskEventsRequest { events: Some(batch.finish()), dropped };
                Unsent { request, events: entries.len() as u64, failed_at: None, retry_at: Instant::now() }
            }
        };
        if sender.client.is_none() {
            sender.client = rpc::gcs_client(&shared.gcs_address, &shared.credential).await.ok();
        }
        let sent = match sender.client.as_mut() {
            Some(gcs) => gcs.add_task_events(unsent.request.clone()).await.map(|_| ()),
            None => Err(tonic::Status::unavailable("the head is not reachable")),
        };
        let Err(status) = sent else { continue };
        sender.client = None;
        let now = Instant::now();
        let failed_at = *unsent.failed_at.get_or_insert(now);
        if may_pass(&status) && now.duration_since(failed_at) < KEEP_UNSENT_FOR {
            tracing::debug!(error = %status.message(), events = unsent.events, "task events kept: the head did not answer");
            unsent.retry_at = now + PERIOD;
            sender.unsent = Some(unsent);
            return false;
        }
        tracing::debug!(error = %status.message(), events = unsent.events, "task events dropped: the head did not take them");
        shared.dropped.fetch_add(unsent.lost(), Ordering::Relaxed);
        return true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        Place { node_id: vec![7; 28], worker_address: "127.0.0.1:9".into() }
    }

    /// A recorder whose head never answers (nothing listens on port 1: every send fails).
    fn unheard() -> TaskEvents {
        let credential = Bearer::new("ionet1.test").unwrap();
        TaskEvents::start(&tokio::runtime::Handle::current(), "127.0.0.1:1".into(), credential, vec![1; 4], place())
    }

    /// A million tasks' events with the head unreachable: at most [`CAPACITY`] wait, the
    /// rest are dropped and counted, none is lost uncounted.
    #[tokio::test]
    async fn a_million_events_stay_bounded_and_every_drop_is_counted() {
        let events = unheard();
        assert!(events.enabled);
        const TASKS: u64 = 1_000_000;
        for n in 0..TASKS {
            let mut id = [0u8; TaskId::LEN];
            id[..8].copy_from_slice(&n.to_le_bytes());
            let task = Tracked { task_id: TaskId::from_bytes(&id).unwrap(), recorded: true };
            events.record(task, TaskState::Running, |event| event.name = Some("step".into()));
            if n % 100_000 == 0 {
                let waiting = events.shared.buffer.lock().unwrap().len();
                assert_eq!(events.shared.buffer.lock().unwrap().index.len(), waiting, "one index entry an event");
                assert!(waiting <= CAPACITY, "{waiting} events wait after {n}");
            }
        }
        events.flush(Duration::from_secs(1)).await;
        // No batch in flight while the sender's lock is held: each event is in one place.
        let sender = events.shared.sending.lock().await;
        let kept = sender.unsent.as_ref().map_or(0, Unsent::lost);
        let kept_events = sender.unsent.as_ref().map_or(0, |unsent| unsent.events);
        assert!(kept_events <= MAX_BATCH as u64, "one batch at most is kept to be sent again");
        let buffered = events.shared.buffer.lock().unwrap().len() as u64;
        assert!(buffered <= CAPACITY as u64);
        // The kept batch's events, and the drops it tells of.
        let waiting = buffered + kept;
        let dropped = events.shared.dropped.load(Ordering::Relaxed);
        assert_eq!(waiting + dropped, TASKS, "every event is waiting (or kept) or counted as dropped");
        assert!(dropped + kept - kept_events >= TASKS - (CAPACITY + MAX_BATCH) as u64);
    }

    /// A head on `listener`, its tables and signing key in `dir` (a second one started
    /// there carries on from the first).
    async fn head_in(dir: &std::path::Path, listener: tokio::net::TcpListener) -> ionet_gcs::GcsServer {
        let mut options = ionet_gcs::GcsServerOptions::new(ionet_common::config::ClusterConfig::default());
        options.storage = ionet_gcs::storage::StorageLocation::File(dir.join("gcs.redb"));
        options.signing_key_path = Some(dir.join("signing.key"));
        ionet_gcs::GcsServer::start(options, listener).await.unwrap()
    }

    /// A batch sent while the head is away (restarting) is kept and reaches the head once
    /// it is back, ahead of later ones: the rows of tasks that ran meanwhile are listed,
    /// and nothing is counted as dropped.
    #[tokio::test]
    async fn a_batch_the_head_missed_while_away_reaches_it_once_back() {
        use ionet_common::rpc::proto::common::WorkerCommand;
        use ionet_common::rpc::proto::gcs::{AddJobRequest, ListTasksRequest};
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let head = head_in(dir.path(), listener).await;
        let admin = head.admin_credential(Duration::from_secs(600));
        let mut gcs = rpc::gcs_client(&address.to_string(), &admin).await.unwrap();
        let worker_command = Some(WorkerCommand { argv: vec!["/bin/true".into()], ..Default::default() });
        let job = gcs.add_job(AddJobRequest { worker_command, ..Default::default() }).await.unwrap().into_inner();
        let (job_id, credential) = (job.job.unwrap().job_id, Bearer::new(&job.job_credential).unwrap());
        let events =
            TaskEvents::start(&tokio::runtime::Handle::current(), address.to_string(), credential, job_id, place());
        let task = |byte: u8| Tracked { task_id: TaskId::from_bytes(&[byte; TaskId::LEN]).unwrap(), recorded: true };
        events.record(task(1), TaskState::Finished, |event| event.name = Some("before".into()));
        events.flush(Duration::from_secs(30)).await;
        head.shutdown().await;

        // The head is away: the batch is kept, not dropped.
        events.record(task(2), TaskState::Finished, |event| event.name = Some("while away".into()));
        events.flush(Duration::from_secs(1)).await;
        assert!(events.shared.sending.lock().await.unsent.is_some(), "the batch is kept");
        assert_eq!(events.shared.dropped.load(Ordering::Relaxed), 0);
        events.record(task(3), TaskState::Finished, |event| event.name = Some("after".into()));

        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let head = head_in(dir.path(), listener).await;
        events.flush(Duration::from_secs(30)).await;
        let mut gcs = rpc::gcs_client(&address.to_string(), &admin).await.unwrap();
        let listed = gcs.list_tasks(ListTasksRequest::default()).await.unwrap().into_inner();
        let mut names: Vec<&str> = listed.tasks.iter().map(|row| row.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["after", "before", "while away"]);
        assert_eq!(listed.dropped_events, 0, "nothing was lost");
        assert!(events.shared.sending.lock().await.unsent.is_none());
        head.shutdown().await;
    }

    /// A task's events not sent yet become one, which says all the head needs.
    #[tokio::test]
    async fn a_tasks_unsent_events_are_merged_into_one() {
        let events = unheard();
        let tracked = |byte: u8| Tracked { task_id: TaskId::from_bytes(&[byte; TaskId::LEN]).unwrap(), recorded: true };
        let (first, second) = (tracked(1), tracked(2));
        events.record(first, TaskState::PendingNodeAssignment, |event| {
            event.name = Some("train".into());
            event.reason = Some("waiting for a lease of {GPU: 1}".into());
        });
        events.record(second, TaskState::PendingArgsAvail, |event| event.name = Some("eval".into()));
        let worker = Arc::new(Place { node_id: vec![9], worker_address: "10.0.0.1:7000".into() });
        events.record(first, TaskState::Running, |event| event.place = Some(worker.clone()));
        events.record(first, TaskState::Finished, |event| event.run_us = 40);
        let taken = events.shared.buffer.lock().unwrap().take(10);
        let (train, eval) = (taken[0].event(), taken[1].event());
        assert_eq!(taken.len(), 2);
        assert_eq!((train.task_id, train.state), (first.task_id.as_bytes(), TaskState::Finished));
        assert_eq!(
            (train.name, train.node_id, train.worker_address, train.run_us),
            ("train", &[9u8][..], "10.0.0.1:7000", 40)
        );
        assert!(train.submitted_us > 0 && train.started_us >= train.submitted_us && train.time_us >= train.started_us);
        assert!(train.reason.is_empty(), "a task that ran waits for nothing");
        assert_eq!((eval.name, eval.state), ("eval", TaskState::PendingArgsAvail));
        // Once sent, a task's next event starts a new one.
        events.record(second, TaskState::Running, |_| {});
        let next = events.shared.buffer.lock().unwrap().take(10);
        assert_eq!((next.len(), next[0].state, next[0].submitted_us), (1, TaskState::Running, 0));
    }

    /// At most the rate of new tasks a second are recorded; the rest are counted as
    /// dropped, and their events (all of them) are not recorded.
    #[tokio::test]
    async fn past_the_rate_a_new_tasks_events_are_not_recorded_and_counted() {
        let mut events = unheard();
        events.rate = 3;
        let admitted: Vec<bool> = (0..5).map(|_| events.admit_in(100)).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        assert_eq!(events.shared.dropped.load(Ordering::Relaxed), 2);
        assert!(events.admit_in(101), "a new second admits again");
        assert!(events.admit_in(100), "a late reader of the clock counts against the current second");
        assert!(events.admit_in(101) && !events.admit_in(101) && !events.admit_in(100));
        let refused = Tracked { task_id: TaskId::random(), recorded: false };
        events.record(refused, TaskState::Running, |_| {});
        events.record(refused, TaskState::Finished, |_| {});
        assert_eq!(events.shared.buffer.lock().unwrap().len(), 0, "nothing of a task not admitted");
        events.rate = 0;
        assert!(!events.admit_in(102), "a rate of 0 records nothing");
        assert_eq!(events.shared.dropped.load(Ordering::Relaxed), 5);
    }
}
