//! Tasks as the head last heard of them: the latest state of each task, built from the
//! events drivers and workers report for the tasks they own (`Gcs/AddTaskEvents`), for
//! the state API (`Gcs/ListTasks`: `ionet list tasks`, `ionet summary tasks`, `ionet
//! timeline`).
//!
//! Bounded: at most [`MAX_TASKS`] rows; past it the oldest row goes (counted, and shown
//! beside every listing), as do events senders dropped when their own buffer was full.
//! Kept in memory only for now: a restarted head starts empty.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ionet_common::rpc::proto::gcs::{TaskEvent, TaskRow, TaskState};

/// The most tasks the head keeps.
pub const MAX_TASKS: usize = 100_000;

/// A listing: matching rows (oldest first, at most the limit), how many matched, and what
/// was lost.
pub struct Listing {
    pub rows: Vec<TaskRow>,
    pub total: u64,
    pub dropped_events: u64,
    pub forgotten_tasks: u64,
}

#[derive(Default)]
struct Inner {
    /// By task id: the row and its job's account (who may read it).
    rows: HashMap<Vec<u8>, (TaskRow, String)>,
    /// Task ids, first heard first.
    order: VecDeque<Vec<u8>>,
    dropped_events: u64,
    forgotten_tasks: u64,
}

pub struct TaskTable {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl TaskTable {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// Applies `events` of `account`'s tasks (in the order they happened), and counts the
    /// `dropped` ones their sender lost.
    pub fn add(&self, account: &str, events: Vec<TaskEvent>, dropped: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.dropped_events += dropped;
        for event in events {
            if !inner.rows.contains_key(&event.task_id) {
                while inner.rows.len() >= self.capacity {
                    let Some(oldest) = inner.order.pop_front() else { break };
                    if inner.rows.remove(&oldest).is_some() {
                        inner.forgotten_tasks += 1;
                    }
                }
                let row = TaskRow {
                    task_id: event.task_id.clone(),
                    job_id: event.job_id.clone(),
                    submitted_us: event.time_us,
                    ..Default::default()
                };
                inner.order.push_back(event.task_id.clone());
                inner.rows.insert(event.task_id.clone(), (row, account.to_string()));
            }
            let Some((row, _)) = inner.rows.get_mut(&event.task_id) else { continue };
            apply(row, event);
        }
    }

    /// The rows `sees` lets the caller read (by their account) that match the filters.
    pub fn list(
        &self,
        sees: impl Fn(&str) -> bool,
        job_id: &[u8],
        state: TaskState,
        name: &str,
        limit: usize,
    ) -> Listing {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::new();
        let mut total = 0u64;
        for id in &inner.order {
            let Some((row, account)) = inner.rows.get(id) else { continue };
            let matches = sees(account)
                && (job_id.is_empty() || row.job_id == job_id)
                && (state == TaskState::Unspecified || row.state == state as i32)
                && (name.is_empty() || row.name == name);
            if matches {
                total += 1;
                if rows.len() < limit {
                    rows.push(row.clone());
                }
            }
        }
        Listing { rows, total, dropped_events: inner.dropped_events, forgotten_tasks: inner.forgotten_tasks }
    }
}

/// `event` applied to `row`: the state and what it says of where, when and why.
fn apply(row: &mut TaskRow, event: TaskEvent) {
    if !event.name.is_empty() {
        row.name = event.name;
    }
    // An ended task stays ended (a late word from a path that lost the race to run it,
    // say); its owner records an end only once it retries no more.
    let terminal = |state: i32| state == TaskState::Finished as i32 || state == TaskState::Failed as i32;
    if terminal(row.state) && !terminal(event.state) {
        return;
    }
    row.state = event.state;
    row.attempt = row.attempt.max(event.attempt);
    match TaskState::try_from(event.state).unwrap_or(TaskState::Unspecified) {
        TaskState::PendingArgsAvail | TaskState::PendingNodeAssignment => {
            row.reason = event.reason;
        }
        TaskState::Running => {
            row.reason.clear();
            row.node_id = event.node_id;
            row.worker_address = event.worker_address;
            row.started_us = event.time_us;
        }
        TaskState::Finished | TaskState::Failed => {
            row.reason.clear();
            row.error = event.error;
            if !event.node_id.is_empty() {
                row.node_id = event.node_id;
                row.worker_address = event.worker_address;
            }
            row.ended_us = event.time_us;
            // The worker's own measure of the run, when it ran.
            if event.run_us > 0 {
                row.started_us = event.time_us.saturating_sub(event.run_us);
            }
        }
        TaskState::Unspecified => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(task: u8, state: TaskState, time_us: u64) -> TaskEvent {
        TaskEvent { task_id: vec![task], job_id: vec![1], state: state as i32, time_us, ..Default::default() }
    }

    #[test]
    fn rows_follow_their_events_and_stay_bounded() {
        let table = TaskTable::new(2);
        let mut first = event(1, TaskState::PendingNodeAssignment, 10);
        first.name = "train".into();
        first.reason = "waiting for a lease of {GPU: 1}".into();
        table.add("acme", vec![first], 3);
        let waiting = table.list(|_| true, &[], TaskState::Unspecified, "", 10);
        assert_eq!(waiting.rows[0].reason, "waiting for a lease of {GPU: 1}");
        let mut done = event(1, TaskState::Finished, 100);
        done.run_us = 40;
        done.node_id = vec![9];
        table.add("acme", vec![event(1, TaskState::Running, 50), done], 0);
        let row = &table.list(|_| true, &[], TaskState::Finished, "train", 10).rows[0];
        assert_eq!((row.started_us, row.ended_us, row.node_id.clone()), (60, 100, vec![9]));
        assert!(row.reason.is_empty());
        table.add("acme", vec![event(1, TaskState::PendingNodeAssignment, 120)], 0);
        assert_eq!(table.list(|_| true, &[], TaskState::Finished, "", 10).total, 1, "an ended task stays ended");
        // Another account's rows are not shown; past the bound the oldest goes, counted.
        table.add("rival", vec![event(2, TaskState::Running, 5), event(3, TaskState::Running, 6)], 0);
        let acme = table.list(|account| account == "acme", &[], TaskState::Unspecified, "", 10);
        assert_eq!((acme.total, acme.dropped_events, acme.forgotten_tasks), (0, 3, 1));
        let all = table.list(|_| true, &[], TaskState::Unspecified, "", 1);
        assert_eq!((all.rows.len(), all.total), (1, 2), "the limit cuts, the total counts");
    }
}
