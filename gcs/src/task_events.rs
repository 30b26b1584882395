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

use ionet_common::rpc::proto::gcs::{StoredTaskRow, TaskEvent, TaskRow, TaskState};
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

#[derive(Default)]
struct Inner {
    /// By job id and task id: the row and its account.
    rows: HashMap<Key, (TaskRow, Arc<str>), ahash::RandomState>,
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
    fn count_end(&mut self, state: i32) {
        if state == TaskState::Finished as i32 {
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

fn is_terminal(state: i32) -> bool {
    state == TaskState::Finished as i32 || state == TaskState::Failed as i32
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn cut(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl TaskTable {
    pub fn new(capacity: usize, per_account: usize) -> Self {
        Self { capacity: capacity.max(1), per_account: per_account.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// Applies `events` of `account`'s tasks (in the order they happened), and counts the
    /// `dropped` ones their sender lost. Events of unknown states are skipped.
    pub fn add(&self, account: &Arc<str>, events: Vec<TaskEvent>, dropped: u64) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let own = inner.accounts.entry(account.clone()).or_default();
        own.dropped_events = own.dropped_events.saturating_add(dropped);
        own.events = own.events.saturating_add(events.len() as u64);
        for mut event in events {
            if TaskState::try_from(event.state).is_err() || event.state == TaskState::Unspecified as i32 {
                continue;
            }
            let Some(key) = key(&event.job_id, &event.task_id) else { continue };
            if !inner.rows.contains_key(&key) {
                self.make_room(inner, account);
                let row = TaskRow {
                    task_id: std::mem::take(&mut event.task_id),
                    job_id: std::mem::take(&mut event.job_id),
                    // An event its owner merged earlier ones into says when it began.
                    submitted_us: if event.submitted_us > 0 { event.submitted_us } else { event.time_us },
                    ..Default::default()
                };
                inner.accounts.entry(account.clone()).or_default().order.push_back(key);
                inner.rows.insert(key, (row, account.clone()));
            }
            let Some((row, _)) = inner.rows.get_mut(&key) else { continue };
            let was_open = !is_terminal(row.state);
            let before = inner.persistent.then(|| row.clone());
            apply(row, event);
            let changed = before.as_ref() != Some(&*row);
            if was_open && is_terminal(row.state) {
                let ended = row.state;
                inner.accounts.entry(account.clone()).or_default().count_end(ended);
            }
            if changed {
                inner.touched(&key);
            }
        }
    }

    /// Frees a row for `account`: its own oldest when it holds its share, else the
    /// largest account's oldest when the table is full.
    fn make_room(&self, inner: &mut Inner, account: &Arc<str>) {
        let own = inner.accounts.get(account).map_or(0, |own| own.order.len());
        let victim = if own >= self.per_account {
            Some(account.clone())
        } else if inner.rows.len() >= self.capacity {
            inner.accounts.iter().max_by_key(|(_, rows)| rows.order.len()).map(|(name, _)| name.clone())
        } else {
            None
        };
        let Some(victim) = victim else { return };
        let Some(rows) = inner.accounts.get_mut(&victim) else { return };
        if let Some(oldest) = rows.order.pop_front() {
            if inner.rows.remove(&oldest).is_some() {
                rows.forgotten_tasks += 1;
                inner.forgot(&oldest);
            }
        }
    }

    /// Ends `job_id`'s tasks still open (its driver ended): failed, saying so.
    pub fn end_job(&self, job_id: &[u8], time_us: u64) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let mut ended = Vec::new();
        for (key, (row, account)) in inner.rows.iter_mut() {
            if row.job_id == job_id && !is_terminal(row.state) {
                row.state = TaskState::Failed as i32;
                row.error = "the job ended before the task did".into();
                row.reason.clear();
                row.ended_us = time_us;
                inner.accounts.entry(account.clone()).or_default().count_end(row.state);
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
            self.make_room(inner, &account);
            inner.accounts.entry(account.clone()).or_default().order.push_back(key);
            inner.stored.insert(key);
            inner.rows.insert(key, (row, account));
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
            if let Some((row, account)) = inner.rows.get(&key) {
                let stored = StoredTaskRow { account: account.to_string(), row: Some(row.clone()) };
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
        for (row, account) in inner.rows.values() {
            if !sees(account) {
                continue;
            }
            let Ok(at) = usize::try_from(row.state) else { continue };
            if let Some(slot) = counts.entry(row.job_id.clone()).or_default().get_mut(at) {
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
                    if let Some((row, _)) = inner.rows.get(key) {
                        if let Some(slot) = usize::try_from(row.state).ok().and_then(|at| by_state.get_mut(at)) {
                            *slot += 1;
                        }
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
                let Some((row, _)) = inner.rows.get(key) else { continue };
                let matches = (job_id.is_empty() || row.job_id == job_id)
                    && (state == TaskState::Unspecified || row.state == state as i32)
                    && (name.is_empty() || row.name.eq_ignore_ascii_case(name));
                if matches {
                    listing.total += 1;
                    if listing.rows.len() < limit {
                        listing.rows.push(row.clone());
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
/// task stays ended (a late word from a path that lost the race to run it); its owner
/// records an end only once it retries no more.
fn apply(row: &mut TaskRow, event: TaskEvent) {
    if !event.name.is_empty() {
        row.name = cut(event.name, MAX_SHORT_TEXT);
    }
    if is_terminal(row.state) && !is_terminal(event.state) {
        return;
    }
    row.state = event.state;
    row.attempt = row.attempt.max(event.attempt);
    match TaskState::try_from(event.state).unwrap_or(TaskState::Unspecified) {
        TaskState::PendingArgsAvail | TaskState::PendingNodeAssignment => {
            row.reason = cut(event.reason, MAX_SHORT_TEXT);
        }
        TaskState::Running => {
            row.reason.clear();
            row.node_id = event.node_id;
            row.worker_address = cut(event.worker_address, MAX_SHORT_TEXT);
            row.started_us = event.time_us;
        }
        TaskState::Finished | TaskState::Failed => {
            row.reason.clear();
            row.error = cut(event.error, MAX_TEXT);
            if !event.node_id.is_empty() {
                row.node_id = event.node_id;
                row.worker_address = cut(event.worker_address, MAX_SHORT_TEXT);
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

    fn job(n: u8) -> Vec<u8> {
        vec![0, 0, 0, n]
    }

    fn event(task: u8, state: TaskState, time_us: u64) -> TaskEvent {
        TaskEvent {
            task_id: vec![task; TaskId::LEN],
            job_id: job(1),
            state: state as i32,
            time_us,
            ..Default::default()
        }
    }

    #[test]
    fn rows_follow_their_events_and_stay_bounded_per_account() {
        let (acme, rival): (Arc<str>, Arc<str>) = ("acme".into(), "rival".into());
        let table = TaskTable::new(3, 2);
        let mut first = event(1, TaskState::PendingNodeAssignment, 10);
        first.name = "train".into();
        first.reason = "waiting for a lease of {GPU: 1}".into();
        table.add(&acme, vec![first], 3);
        let waiting = table.list(|_| true, &[], TaskState::Unspecified, "", 10);
        assert_eq!(waiting.rows[0].reason, "waiting for a lease of {GPU: 1}");
        let mut done = event(1, TaskState::Finished, 100);
        done.run_us = 40;
        done.node_id = vec![9];
        done.error = "x".repeat(MAX_TEXT * 2);
        table.add(&acme, vec![event(1, TaskState::Running, 50), done], 0);
        let row = &table.list(|_| true, &[], TaskState::Finished, "TRAIN", 10).rows[0];
        assert_eq!((row.started_us, row.ended_us, row.node_id.clone()), (60, 100, vec![9]));
        assert!(row.reason.is_empty() && row.error.len() == MAX_TEXT, "texts are cut");
        table.add(&acme, vec![event(1, TaskState::PendingNodeAssignment, 120)], 0);
        assert_eq!(table.list(|_| true, &[], TaskState::Finished, "", 10).total, 1, "an ended task stays ended");

        // The same task id in another job is another row; a flood of one account goes from
        // its own rows; the losses are the account's own.
        let mut elsewhere = event(1, TaskState::Running, 5);
        elsewhere.job_id = job(2);
        table.add(&rival, vec![elsewhere, event(2, TaskState::Running, 6), event(3, TaskState::Running, 7)], 0);
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
    fn storage_gets_rows_that_changed_and_deletes_only_what_it_holds() {
        let acme: Arc<str> = "acme".into();
        let table = TaskTable::new(10, 2);
        table.restore(Vec::new());
        let puts = |writes: &[StorageWrite]| writes.iter().filter(|w| matches!(w, StorageWrite::Put { .. })).count();
        let deletes = |writes: &[StorageWrite]| writes.len() - puts(writes);
        table.add(&acme, vec![event(1, TaskState::Running, 10)], 0);
        assert_eq!(puts(&table.take_writes()), 1);
        // The same word again changes nothing: nothing to write.
        table.add(&acme, vec![event(1, TaskState::Running, 10)], 0);
        assert!(table.take_writes().is_empty());
        // Rows forgotten to make room go from storage only if storage had them.
        table.add(&acme, vec![event(2, TaskState::Running, 20), event(3, TaskState::Running, 30)], 0);
        let writes = table.take_writes();
        assert_eq!((puts(&writes), deletes(&writes)), (2, 1), "row 1, written, goes");
        let flood: Vec<TaskEvent> = (4..9).map(|task| event(task, TaskState::Running, 40)).collect();
        table.add(&acme, flood, 0);
        let writes = table.take_writes();
        assert_eq!((puts(&writes), deletes(&writes)), (2, 2), "rows 2 and 3 go; rows 4 to 6 were never written");
    }
}
