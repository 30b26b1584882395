//! Tasks as the head last heard of them: the latest state of each task, built from the
//! events drivers and workers report for the tasks they own (`Gcs/AddTaskEvents`), for
//! the state API (`Gcs/ListTasks`: `ionet list tasks`, `ionet summary tasks`, `ionet
//! timeline`).
//!
//! Rows are keyed by job and task, so a job's events touch its own rows only. Bounded per
//! account ([`MAX_TASKS_PER_ACCOUNT`]) and in all ([`MAX_TASKS`]): past a bound the
//! account's (or the largest account's) oldest row goes, counted for that account; texts
//! are cut to a bound ([`MAX_TEXT`]), so one tenant's flood costs the others nothing.
//! Events a sender dropped are counted for its account too. When a job ends, its tasks
//! still open end as failed. A head with storage writes the rows that changed there once
//! a second ([`persist`], `Table::Tasks`, rows gone from memory deleted with them) and
//! reads them back when it starts ([`TaskTable::restore`]), so a restarted head, or one
//! whose cluster has stopped, still shows the past; the counters start again from zero.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::rpc::proto::gcs::{StoredTaskRow, TaskEventBatch, TaskRow, TaskState};
use ionet_common::task_event_batch::BatchEvent;
use ionet_common::{JobId, TaskId};
use prost::Message;
use tokio::sync::watch;

use crate::storage::{GcsStorage, StorageWrite, Table};

/// The most tasks the head keeps, and the most of one account's.
pub const MAX_TASKS: usize = 100_000;
pub const MAX_TASKS_PER_ACCOUNT: usize = 50_000;
/// The most events one report may carry (what one sender's batch holds).
pub const MAX_EVENTS_PER_REPORT: usize = 10_000;
/// The most dropped events one report may claim (ten senders' full buffers).
pub const MAX_DROPPED_PER_REPORT: u64 = 1_000_000;
/// The longest error kept (bytes); names, reasons and addresses are cut to 256.
pub const MAX_TEXT: usize = 8 * 1024;
const MAX_SHORT_TEXT: usize = 256;

/// A listing: matching rows (oldest first within an account, at most the limit), how
/// many matched, and what was lost of the accounts the caller sees.
pub struct Listing {
    pub rows: Vec<TaskRow>,
    pub total: u64,
    pub dropped_events: u64,
    pub forgotten_tasks: u64,
}

/// One account's rows, oldest first, its losses, and what it has reported since the
/// head started (counters for the metrics: they only grow).
#[derive(Default)]
struct Account {
    order: VecDeque<Key>,
    dropped_events: u64,
    forgotten_tasks: u64,
    events: u64,
    finished: u64,
    failed: u64,
}

/// One account's tasks in numbers (for `/metrics`): rows kept by state, and counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountCounts {
    pub account: String,
    /// Rows kept, by state (indexed by [`TaskState`] as `i32`).
    pub by_state: [u64; 6],
    /// Events taken, events its senders dropped, rows forgotten to make room.
    pub events: u64,
    pub dropped_events: u64,
    pub forgotten_tasks: u64,
    /// Tasks that ended, since the head started.
    pub finished: u64,
    pub failed: u64,
}

/// A task as the head keeps it: numbers, and texts shared with the other rows of the
/// report that brought them (a report names each distinct text once). The listing's
/// [`TaskRow`] is made only when it is listed.
#[derive(Clone, PartialEq)]
struct Row {
    account: Arc<str>,
    state: TaskState,
    attempt: u32,
    name: Option<Arc<str>>,
    reason: Option<Arc<str>>,
    node_id: Option<Arc<[u8]>>,
    worker_address: Option<Arc<str>>,
    error: Option<Arc<str>>,
    /// An actor task's actor.
    actor_id: Option<Arc<[u8]>>,
    submitted_us: u64,
    started_us: u64,
    ended_us: u64,
}

impl Row {
    fn new(account: Arc<str>, submitted_us: u64) -> Self {
        Self {
            account,
            state: TaskState::Unspecified,
            attempt: 0,
            name: None,
            reason: None,
            node_id: None,
            worker_address: None,
            error: None,
            actor_id: None,
            submitted_us,
            started_us: 0,
            ended_us: 0,
        }
    }

    /// The row as the state API lists it.
    fn listed(&self, key: &Key) -> TaskRow {
        let text = |text: &Option<Arc<str>>| text.as_deref().unwrap_or_default().to_owned();
        TaskRow {
            task_id: key[JobId::LEN..].to_vec(),
            job_id: key[..JobId::LEN].to_vec(),
            name: text(&self.name),
            state: self.state as i32,
            attempt: self.attempt,
            node_id: self.node_id.as_deref().unwrap_or_default().to_vec(),
            worker_address: text(&self.worker_address),
            error: text(&self.error),
            reason: text(&self.reason),
            submitted_us: self.submitted_us,
            started_us: self.started_us,
            ended_us: self.ended_us,
            actor_id: self.actor_id.as_deref().unwrap_or_default().to_vec(),
        }
    }

    /// A listed row read back (from storage), as `account`'s.
    fn from_listed(row: TaskRow, account: Arc<str>) -> Self {
        let text = |text: String| (!text.is_empty()).then(|| Arc::<str>::from(text));
        Self {
            account,
            state: TaskState::try_from(row.state).unwrap_or(TaskState::Unspecified),
            attempt: row.attempt,
            name: text(cut(row.name, MAX_SHORT_TEXT)),
            reason: text(cut(row.reason, MAX_SHORT_TEXT)),
            node_id: (!row.node_id.is_empty()).then(|| Arc::from(row.node_id)),
            worker_address: text(cut(row.worker_address, MAX_SHORT_TEXT)),
            error: text(cut(row.error, MAX_TEXT)),
            actor_id: (!row.actor_id.is_empty()).then(|| Arc::from(row.actor_id)),
            submitted_us: row.submitted_us,
            started_us: row.started_us,
            ended_us: row.ended_us,
        }
    }
}

/// One event of a report, its texts as the rows keep them.
struct Update {
    state: TaskState,
    time_us: u64,
    attempt: u32,
    submitted_us: u64,
    started_us: u64,
    run_us: u64,
    name: Option<Arc<str>>,
    reason: Option<Arc<str>>,
    node_id: Option<Arc<[u8]>>,
    worker_address: Option<Arc<str>>,
    error: Option<Arc<str>>,
    actor_id: Option<Arc<[u8]>>,
}

/// A report's texts and ids, each made once (a text cut to its bound) when an event
/// first names it.
struct Texts<'a> {
    batch: &'a TaskEventBatch,
    short: Vec<Option<Arc<str>>>,
    long: Vec<Option<Arc<str>>>,
    ids: Vec<Option<Arc<[u8]>>>,
}

impl<'a> Texts<'a> {
    fn new(batch: &'a TaskEventBatch) -> Self {
        Self {
            batch,
            short: vec![None; batch.texts.len()],
            long: vec![None; batch.texts.len()],
            ids: vec![None; batch.ids.len()],
        }
    }

    fn text(&mut self, reference: u32, long: bool) -> Option<Arc<str>> {
        let at = reference.checked_sub(1)? as usize;
        let (made, limit) = if long { (&mut self.long, MAX_TEXT) } else { (&mut self.short, MAX_SHORT_TEXT) };
        let slot = made.get_mut(at)?;
        if slot.is_none() {
            let text = self.batch.texts.get(at)?;
            *slot = Some(Arc::from(cut_str(text, limit)));
        }
        slot.clone()
    }

    fn id(&mut self, reference: u32) -> Option<Arc<[u8]>> {
        let at = reference.checked_sub(1)? as usize;
        let slot = self.ids.get_mut(at)?;
        if slot.is_none() {
            *slot = Some(Arc::from(self.batch.ids.get(at)?.as_slice()));
        }
        slot.clone()
    }

    fn update(&mut self, event: &BatchEvent<'_>) -> Update {
        Update {
            state: event.state,
            time_us: event.time_us,
            attempt: event.attempt,
            submitted_us: event.submitted_us,
            started_us: event.started_us,
            run_us: event.run_us,
            name: self.text(event.name, false),
            reason: self.text(event.reason, false),
            node_id: self.id(event.node),
            worker_address: self.text(event.worker_address, false),
            error: self.text(event.error, true),
            actor_id: self.id(event.actor),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// By job id and task id.
    rows: HashMap<Key, Row, ahash::RandomState>,
    accounts: HashMap<Arc<str>, Account, ahash::RandomState>,
    /// With storage: the rows changed, and those forgotten, since the last write.
    persistent: bool,
    changed: HashSet<Key, ahash::RandomState>,
    forgotten: HashSet<Key, ahash::RandomState>,
    /// The rows storage holds (at most the table's rows): only those are deleted.
    stored: HashSet<Key, ahash::RandomState>,
}

impl Inner {
    fn touched(&mut self, key: &Key) {
        if self.persistent {
            self.forgotten.remove(key);
            self.changed.insert(*key);
        }
    }

    fn forgot(&mut self, key: &Key) {
        if self.persistent {
            self.changed.remove(key);
            if self.stored.remove(key) {
                self.forgotten.insert(*key);
            }
        }
    }
}

pub struct TaskTable {
    capacity: usize,
    per_account: usize,
    inner: Mutex<Inner>,
}

impl Account {
    fn count_end(&mut self, state: TaskState) {
        if state == TaskState::Finished {
            self.finished += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// A row's key: its job's id then its task's (fixed size: no allocation per row).
type Key = [u8; JobId::LEN + TaskId::LEN];

/// The key of a task of a job; `None` for ids of the wrong length.
fn key(job_id: &[u8], task_id: &[u8]) -> Option<Key> {
    if job_id.len() != JobId::LEN || task_id.len() != TaskId::LEN {
        return None;
    }
    let mut key = [0u8; JobId::LEN + TaskId::LEN];
    key[..JobId::LEN].copy_from_slice(job_id);
    key[JobId::LEN..].copy_from_slice(task_id);
    Some(key)
}

/// A task state as Ray names it (`RUNNING`, `PENDING_NODE_ASSIGNMENT`, …).
pub fn state_name(state: i32) -> &'static str {
    match TaskState::try_from(state) {
        Ok(TaskState::Unspecified) | Err(_) => "UNSPECIFIED",
        Ok(known) => known.as_str_name(),
    }
}

fn is_terminal(state: TaskState) -> bool {
    matches!(state, TaskState::Finished | TaskState::Failed)
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn cut(mut text: String, limit: usize) -> String {
    let kept = cut_str(&text, limit).len();
    text.truncate(kept);
    text
}

fn cut_str(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl TaskTable {
    pub fn new(capacity: usize, per_account: usize) -> Self {
        Self { capacity: capacity.max(1), per_account: per_account.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// Applies the events of `batch` (of `account`'s tasks, in the order they happened),
    /// and counts the `dropped` ones their sender lost. A batch that does not hold
    /// together ([`TaskEventBatch::check`]) is refused whole, saying why.
    pub fn add(&self, account: &Arc<str>, batch: &TaskEventBatch, dropped: u64) -> Result<(), String> {
        let count = batch.check()?;
        if count > 0 && batch.job_id.len() != JobId::LEN {
            return Err(format!("{} is no job id", hex::encode(&batch.job_id)));
        }
        let mut texts = Texts::new(batch);
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let mut key: Key = [0; JobId::LEN + TaskId::LEN];
        if count > 0 {
            key[..JobId::LEN].copy_from_slice(&batch.job_id);
        }
        let (mut finished, mut failed, mut new_rows) = (0u64, 0u64, Vec::new());
        for at in 0..count {
            let event = batch.event(at);
            key[JobId::LEN..].copy_from_slice(event.task_id);
            let update = texts.update(&event);
            let (row, new) = match inner.rows.entry(key) {
                std::collections::hash_map::Entry::Occupied(row) => (row.into_mut(), false),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    // An event its owner merged earlier ones into says when it began.
                    let submitted_us = if update.submitted_us > 0 { update.submitted_us } else { update.time_us };
                    (slot.insert(Row::new(account.clone(), submitted_us)), true)
                }
            };
            let was_open = !is_terminal(row.state);
            let before = (inner.persistent && !new).then(|| row.clone());
            // Only the head records creation tasks (a report naming one is refused).
            apply(row, update, TaskId::names_an_actor_creation(event.task_id));
            let changed = new || before.as_ref() != Some(&*row);
            if was_open && is_terminal(row.state) {
                match row.state {
                    TaskState::Finished => finished += 1,
                    _ => failed += 1,
                }
            }
            if new {
                new_rows.push(key);
            }
            if changed {
                inner.touched(&key);
            }
        }
        let own = inner.accounts.entry(account.clone()).or_default();
        own.dropped_events = own.dropped_events.saturating_add(dropped);
        own.events = own.events.saturating_add(count as u64);
        own.finished += finished;
        own.failed += failed;
        own.order.extend(new_rows);
        // Within the bounds again (a report's new rows may have gone past them).
        self.make_room(inner, account);
        Ok(())
    }

    /// Forgets rows until the table is within its bounds: `account`'s own oldest while
    /// it holds more than its share, then the largest account's oldest while the table
    /// holds more than its capacity.
    fn make_room(&self, inner: &mut Inner, account: &Arc<str>) {
        while inner.accounts.get(account).is_some_and(|own| own.order.len() > self.per_account) {
            Self::forget_oldest(inner, account);
        }
        while inner.rows.len() > self.capacity {
            let Some(largest) =
                inner.accounts.iter().max_by_key(|(_, rows)| rows.order.len()).map(|(name, _)| name.clone())
            else {
                return;
            };
            if !Self::forget_oldest(inner, &largest) {
                return;
            }
        }
    }

    /// Forgets `account`'s oldest row (false: it has none).
    fn forget_oldest(inner: &mut Inner, account: &Arc<str>) -> bool {
        let Some(rows) = inner.accounts.get_mut(account) else { return false };
        let Some(oldest) = rows.order.pop_front() else { return false };
        if inner.rows.remove(&oldest).is_some() {
            rows.forgotten_tasks += 1;
            inner.forgot(&oldest);
        }
        true
    }

    /// Ends `job_id`'s tasks still open (its driver ended): failed, saying so.
    pub fn end_job(&self, job_id: &[u8], time_us: u64) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let mut ended = Vec::new();
        let error: Arc<str> = "the job ended before the task did".into();
        for (key, row) in inner.rows.iter_mut() {
            if key[..JobId::LEN] == *job_id && !is_terminal(row.state) {
                row.state = TaskState::Failed;
                row.error = Some(error.clone());
                row.reason = None;
                row.ended_us = time_us;
                inner.accounts.entry(row.account.clone()).or_default().count_end(row.state);
                ended.push(*key);
            }
        }
        for key in ended {
            inner.touched(&key);
        }
    }

    /// Takes the rows `stored` holds (oldest first by when they were submitted), within
    /// the bounds, and from then on notes every change for [`persist`].
    pub fn restore(&self, mut stored: Vec<StoredTaskRow>) -> usize {
        stored.sort_by_key(|stored| stored.row.as_ref().map_or(0, |row| row.submitted_us));
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        // From now on changes are noted: a row restoring forgets to make room goes from
        // storage too, at the next write.
        inner.persistent = true;
        let mut taken = 0;
        for StoredTaskRow { account, row } in stored {
            let Some(row) = row else { continue };
            let account: Arc<str> = account.into();
            let Some(key) = key(&row.job_id, &row.task_id) else { continue };
            if inner.rows.contains_key(&key) {
                continue;
            }
            inner.accounts.entry(account.clone()).or_default().order.push_back(key);
            inner.stored.insert(key);
            inner.rows.insert(key, Row::from_listed(row, account.clone()));
            self.make_room(inner, &account);
            taken += 1;
        }
        taken
    }

    /// Up to [`MAX_WRITES`] of the rows changed and forgotten since the last call, as
    /// storage writes (deletes first); the rest wait for the next call.
    fn take_writes(&self) -> Vec<StorageWrite> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let mut writes = Vec::new();
        let forgotten: Vec<Key> = inner.forgotten.iter().take(MAX_WRITES).copied().collect();
        for key in forgotten {
            inner.forgotten.remove(&key);
            writes.push(StorageWrite::Delete { table: Table::Tasks, key: key.to_vec() });
        }
        let changed: Vec<Key> = inner.changed.iter().take(MAX_WRITES - writes.len()).copied().collect();
        for key in changed {
            inner.changed.remove(&key);
            if let Some(row) = inner.rows.get(&key) {
                let stored = StoredTaskRow { account: row.account.to_string(), row: Some(row.listed(&key)) };
                writes.push(StorageWrite::Put {
                    table: Table::Tasks,
                    key: key.to_vec(),
                    value: stored.encode_to_vec(),
                });
                inner.stored.insert(key);
            }
        }
        writes
    }

    /// Whether rows wait to be written.
    fn has_writes(&self) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        !inner.changed.is_empty() || !inner.forgotten.is_empty()
    }

    /// Writes that could not be made, noted again for the next try.
    fn retry(&self, writes: Vec<StorageWrite>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for write in writes {
            match write {
                StorageWrite::Put { key, .. } => {
                    if let Ok(key) = Key::try_from(key.as_slice()) {
                        if !inner.forgotten.contains(&key) {
                            inner.changed.insert(key);
                        }
                    }
                }
                StorageWrite::Delete { key, .. } => {
                    if let Ok(key) = Key::try_from(key.as_slice()) {
                        if !inner.changed.contains(&key) {
                            inner.forgotten.insert(key);
                        }
                    }
                }
            }
        }
    }

    /// Rows kept by job and state (indexed by [`TaskState`] as `i32`), of the accounts
    /// `sees` lets the caller read.
    pub fn job_counts(&self, sees: impl Fn(&str) -> bool) -> HashMap<Vec<u8>, [u64; 6]> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: HashMap<Vec<u8>, [u64; 6]> = HashMap::new();
        for (key, row) in &inner.rows {
            if !sees(&row.account) {
                continue;
            }
            if let Some(slot) = counts.entry(key[..JobId::LEN].to_vec()).or_default().get_mut(row.state as usize) {
                *slot += 1;
            }
        }
        counts
    }

    /// Each account's numbers that `sees` lets the caller read, by account name.
    pub fn counts(&self, sees: impl Fn(&str) -> bool) -> Vec<AccountCounts> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: Vec<AccountCounts> = inner
            .accounts
            .iter()
            .filter(|(account, _)| sees(account))
            .map(|(account, own)| {
                let mut by_state = [0u64; 6];
                for key in &own.order {
                    if let Some(slot) = inner.rows.get(key).and_then(|row| by_state.get_mut(row.state as usize)) {
                        *slot += 1;
                    }
                }
                AccountCounts {
                    account: account.to_string(),
                    by_state,
                    events: own.events,
                    dropped_events: own.dropped_events,
                    forgotten_tasks: own.forgotten_tasks,
                    finished: own.finished,
                    failed: own.failed,
                }
            })
            .collect();
        counts.sort_by(|a, b| a.account.cmp(&b.account));
        counts
    }

    /// The rows of the accounts `sees` lets the caller read that match the filters.
    pub fn list(
        &self,
        sees: impl Fn(&str) -> bool,
        job_id: &[u8],
        state: TaskState,
        name: &str,
        limit: usize,
    ) -> Listing {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut listing = Listing { rows: Vec::new(), total: 0, dropped_events: 0, forgotten_tasks: 0 };
        for (account, rows) in &inner.accounts {
            if !sees(account) {
                continue;
            }
            listing.dropped_events = listing.dropped_events.saturating_add(rows.dropped_events);
            listing.forgotten_tasks = listing.forgotten_tasks.saturating_add(rows.forgotten_tasks);
            for key in &rows.order {
                let Some(row) = inner.rows.get(key) else { continue };
                let matches = (job_id.is_empty() || key[..JobId::LEN] == *job_id)
                    && (state == TaskState::Unspecified || row.state == state)
                    && (name.is_empty() || row.name.as_deref().is_some_and(|own| own.eq_ignore_ascii_case(name)));
                if matches {
                    listing.total += 1;
                    if listing.rows.len() < limit {
                        listing.rows.push(row.listed(key));
                    }
                }
            }
        }
        listing
    }
}

/// How often the rows that changed are written to storage.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// The most rows one storage write carries (a flood is written over several).
const MAX_WRITES: usize = 1_000;

/// Reads the rows `storage` holds into `table` (what an earlier run of the head kept).
pub async fn load(table: &TaskTable, storage: Arc<dyn GcsStorage>) -> crate::error::GcsResult<usize> {
    let entries = crate::state::blocking(move || storage.scan_prefix(Table::Tasks, b"")).await?;
    let mut stored = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        match StoredTaskRow::decode(value.as_slice()) {
            Ok(row) => stored.push(row),
            Err(err) => {
                tracing::warn!(key = %hex::encode(&key), error = %err, "a stored task row is unreadable; skipped")
            }
        }
    }
    Ok(table.restore(stored))
}

/// Writes `table`'s changed rows to `storage` once a second, in writes of at most
/// [`MAX_WRITES`] rows, and all of them once more when `stopped` turns true (sent once no
/// call can change a row any more). A failed write is tried again with the next.
pub async fn persist(table: Arc<TaskTable>, storage: Arc<dyn GcsStorage>, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(PERSIST_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = stopped.wait_for(|stop| *stop) => true,
        };
        while table.has_writes() {
            let writes = table.take_writes();
            let (storage, batch) = (storage.clone(), writes.clone());
            if let Err(err) = crate::state::blocking(move || storage.write_all(&batch)).await {
                tracing::warn!(error = %err, rows = writes.len(), "could not write task rows; trying again");
                table.retry(writes);
                break;
            }
        }
        if last {
            return;
        }
    }
}

/// `event` applied to `row`: the state and what it says of where, when and why. An ended
/// task stays ended (a late word from a path that lost the race to run it; its owner
/// records an end only once it retries no more), except that a later attempt of an actor's
/// creation (`reopens`: the head's own rows, the actor restarted) begins it again.
fn apply(row: &mut Row, event: Update, reopens: bool) {
    if event.name.is_some() {
        row.name = event.name;
    }
    if event.actor_id.is_some() {
        row.actor_id = event.actor_id;
    }
    if is_terminal(row.state) && !is_terminal(event.state) {
        if !reopens || event.attempt <= row.attempt {
            return;
        }
        // Begun again: what ended the last attempt, and where it ran, is not this one's.
        row.error = None;
        row.node_id = None;
        row.worker_address = None;
        row.started_us = 0;
        row.ended_us = 0;
    }
    row.state = event.state;
    row.attempt = row.attempt.max(event.attempt);
    match event.state {
        TaskState::PendingArgsAvail | TaskState::PendingNodeAssignment => row.reason = event.reason,
        TaskState::Running => {
            row.reason = None;
            row.node_id = event.node_id;
            row.worker_address = event.worker_address;
            row.started_us = event.time_us;
        }
        TaskState::Finished | TaskState::Failed => {
            row.reason = None;
            row.error = event.error;
            if event.node_id.is_some() {
                row.node_id = event.node_id;
                row.worker_address = event.worker_address;
            }
            row.ended_us = event.time_us;
            // The worker's own measure of the run, when it ran; else when its owner saw
            // it start (an event it merged the start into).
            if event.run_us > 0 {
                row.started_us = event.time_us.saturating_sub(event.run_us);
            } else if event.started_us > 0 {
                row.started_us = event.started_us;
            }
        }
        TaskState::Unspecified => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ionet_common::task_event_batch::{BatchBuilder, Event};

    fn job(n: u8) -> Vec<u8> {
        vec![0, 0, 0, n]
    }

    fn event(task: u8, state: TaskState, time_us: u64) -> Event<'static> {
        Event { task_id: Box::leak(vec![task; TaskId::LEN].into_boxed_slice()), state, time_us, ..Default::default() }
    }

    /// A report of job `job`'s `events`.
    fn of(job_number: u8, events: &[Event<'_>]) -> TaskEventBatch {
        let mut batch = BatchBuilder::new(&job(job_number));
        for event in events {
            batch.push(event);
        }
        batch.finish()
    }

    #[test]
    fn rows_follow_their_events_and_stay_bounded_per_account() {
        let (acme, rival): (Arc<str>, Arc<str>) = ("acme".into(), "rival".into());
        let table = TaskTable::new(3, 2);
        let mut first = event(1, TaskState::PendingNodeAssignment, 10);
        first.name = "train";
        first.reason = "waiting for a lease of {GPU: 1}";
        table.add(&acme, &of(1, &[first]), 3).unwrap();
        let waiting = table.list(|_| true, &[], TaskState::Unspecified, "", 10);
        assert_eq!(waiting.rows[0].reason, "waiting for a lease of {GPU: 1}");
        let mut done = event(1, TaskState::Finished, 100);
        done.run_us = 40;
        done.node_id = &[9; 28];
        let long = "x".repeat(MAX_TEXT * 2);
        done.error = &long;
        table.add(&acme, &of(1, &[event(1, TaskState::Running, 50), done]), 0).unwrap();
        let row = &table.list(|_| true, &[], TaskState::Finished, "TRAIN", 10).rows[0];
        assert_eq!((row.started_us, row.ended_us, row.node_id.clone()), (60, 100, vec![9; 28]));
        assert!(row.reason.is_empty() && row.error.len() == MAX_TEXT, "texts are cut");
        table.add(&acme, &of(1, &[event(1, TaskState::PendingNodeAssignment, 120)]), 0).unwrap();
        assert_eq!(table.list(|_| true, &[], TaskState::Finished, "", 10).total, 1, "an ended task stays ended");

        // The same task id in another job is another row; a flood of one account goes from
        // its own rows; the losses are the account's own.
        table.add(&rival, &of(2, &[event(1, TaskState::Running, 5)]), 0).unwrap();
        table.add(&rival, &of(1, &[event(2, TaskState::Running, 6), event(3, TaskState::Running, 7)]), 0).unwrap();
        let theirs = table.list(|account| account == "rival", &[], TaskState::Unspecified, "", 10);
        assert_eq!((theirs.total, theirs.dropped_events, theirs.forgotten_tasks), (2, 0, 1));
        let ours = table.list(|account| account == "acme", &[], TaskState::Unspecified, "", 10);
        assert_eq!((ours.total, ours.dropped_events, ours.forgotten_tasks), (1, 3, 0), "acme's row stays");
        let all = table.list(|_| true, &[], TaskState::Unspecified, "", 1);
        assert_eq!((all.rows.len(), all.total), (1, 3), "the limit cuts, the total counts");

        // A job that ends ends its open tasks.
        table.end_job(&job(1), 200);
        let open = table.list(|_| true, &job(1), TaskState::Running, "", 10);
        assert_eq!(open.total, 0);
        let ended = table.list(|account| account == "rival", &job(1), TaskState::Failed, "", 10);
        assert!(ended.rows.iter().all(|row| row.error.contains("job ended")), "{:?}", ended.rows);

        // The numbers the metrics show: rows by state, and counters that only grow.
        let counts = table.counts(|_| true);
        let acme_counts = AccountCounts {
            account: "acme".into(),
            by_state: [0, 0, 0, 0, 1, 0],
            events: 4,
            dropped_events: 3,
            finished: 1,
            ..Default::default()
        };
        let rival_counts = AccountCounts {
            account: "rival".into(),
            by_state: [0, 0, 0, 0, 0, 2],
            events: 3,
            forgotten_tasks: 1,
            failed: 2,
            ..Default::default()
        };
        assert_eq!(counts, vec![acme_counts.clone(), rival_counts]);
        assert_eq!(table.counts(|account| account == "acme"), vec![acme_counts], "each sees its own");
    }

    #[test]
    fn a_later_attempt_begins_an_ended_actor_creation_again_and_nothing_else() {
        let acme: Arc<str> = "acme".into();
        let table = TaskTable::new(10, 10);
        let actor = ionet_common::ActorId::from_array([5; ionet_common::ActorId::LEN]);
        let creation = TaskId::actor_creation(&actor);
        let step = |state, time_us, attempt| Event {
            task_id: creation.as_bytes(),
            actor_id: actor.as_bytes(),
            node_id: &[9; 28],
            state,
            time_us,
            attempt,
            ..Default::default()
        };
        let mut failed = step(TaskState::Failed, 100, 0);
        failed.error = "the worker died";
        table.add(&acme, &of(1, &[step(TaskState::Running, 50, 0), failed]), 0).unwrap();
        table.add(&acme, &of(1, &[step(TaskState::PendingNodeAssignment, 110, 0)]), 0).unwrap();
        assert_eq!(table.list(|_| true, &[], TaskState::Failed, "", 10).total, 1, "the same attempt: still ended");
        let mut again = step(TaskState::PendingNodeAssignment, 120, 1);
        again.node_id = &[];
        table.add(&acme, &of(1, &[again]), 0).unwrap();
        let row = &table.list(|_| true, &[], TaskState::Unspecified, "", 10).rows[0];
        assert_eq!(
            (row.state, row.attempt, row.error.as_str(), row.node_id.len(), row.started_us, row.ended_us),
            (TaskState::PendingNodeAssignment as i32, 1, "", 0, 0, 0),
            "attempt 1 waits afresh, nowhere yet"
        );

        // Any other task stays ended, whatever attempt a later word names.
        table.add(&acme, &of(2, &[event(3, TaskState::Finished, 10)]), 0).unwrap();
        let mut late = event(3, TaskState::Running, 20);
        late.attempt = 7;
        table.add(&acme, &of(2, &[late]), 0).unwrap();
        assert_eq!(table.list(|_| true, &job(2), TaskState::Finished, "", 10).total, 1);
    }

    #[test]
    fn storage_gets_rows_that_changed_and_deletes_only_what_it_holds() {
        let acme: Arc<str> = "acme".into();
        let table = TaskTable::new(10, 2);
        table.restore(Vec::new());
        let puts = |writes: &[StorageWrite]| writes.iter().filter(|w| matches!(w, StorageWrite::Put { .. })).count();
        let deletes = |writes: &[StorageWrite]| writes.len() - puts(writes);
        table.add(&acme, &of(1, &[event(1, TaskState::Running, 10)]), 0).unwrap();
        assert_eq!(puts(&table.take_writes()), 1);
        // The same word again changes nothing: nothing to write.
        table.add(&acme, &of(1, &[event(1, TaskState::Running, 10)]), 0).unwrap();
        assert!(table.take_writes().is_empty());
        // Rows forgotten to make room go from storage only if storage had them.
        table.add(&acme, &of(1, &[event(2, TaskState::Running, 20), event(3, TaskState::Running, 30)]), 0).unwrap();
        let writes = table.take_writes();
        assert_eq!((puts(&writes), deletes(&writes)), (2, 1), "row 1, written, goes");
        let flood: Vec<Event<'_>> = (4..9).map(|task| event(task, TaskState::Running, 40)).collect();
        table.add(&acme, &of(1, &flood), 0).unwrap();
        let writes = table.take_writes();
        assert_eq!((puts(&writes), deletes(&writes)), (2, 2), "rows 2 and 3 go; rows 4 to 6 were never written");
    }
}
