//! Task events on the wire (`Gcs/AddTaskEvents`): a batch of one job's events, column
//! by column ([`TaskEventBatch`]), written by [`BatchBuilder`] and read by
//! [`TaskEventBatch::check`] and [`TaskEventBatch::event`].
//!
//! Columns cost what a task's event says and little more: packed numbers, the task ids
//! one after another, each distinct text (a function's name, a worker's address, a
//! waiting reason) and id (a node's, an actor's) once per batch, named by index. Reading a batch allocates
//! nothing per event.

use std::collections::HashMap;

use crate::ids::{ActorId, NodeId, TaskId};
use crate::rpc::proto::gcs::{TaskEventBatch, TaskState};

/// One event, as its recorder sees it (texts empty: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Event<'a> {
    /// [`TaskId::LEN`] bytes.
    pub task_id: &'a [u8],
    pub state: TaskState,
    pub time_us: u64,
    pub attempt: u32,
    pub submitted_us: u64,
    pub started_us: u64,
    pub run_us: u64,
    pub name: &'a str,
    pub reason: &'a str,
    pub node_id: &'a [u8],
    pub worker_address: &'a str,
    pub error: &'a str,
    /// An actor task's actor (empty: a normal task).
    pub actor_id: &'a [u8],
}

/// One event of a checked batch: numbers, and its texts as references into the batch
/// ([`TaskEventBatch::text`], [`TaskEventBatch::id`]; 0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEvent<'a> {
    pub task_id: &'a [u8],
    pub state: TaskState,
    pub time_us: u64,
    pub attempt: u32,
    pub submitted_us: u64,
    pub started_us: u64,
    pub run_us: u64,
    pub name: u32,
    pub reason: u32,
    pub node: u32,
    pub worker_address: u32,
    pub error: u32,
    pub actor: u32,
}

/// Builds one batch of one job's events.
pub struct BatchBuilder {
    batch: TaskEventBatch,
    texts: HashMap<String, u32, ahash::RandomState>,
    ids: HashMap<Vec<u8>, u32, ahash::RandomState>,
    /// Each text column's last reference (a stream of one function's tasks names the
    /// same texts event after event: compared, not hashed).
    last: [u32; 4],
    /// Each id column's last reference, likewise.
    last_id: [u32; 2],
}

/// The text columns, as [`BatchBuilder::text`] remembers their last reference.
const NAME: usize = 0;
const REASON: usize = 1;
const WORKER_ADDRESS: usize = 2;
const ERROR: usize = 3;
/// The id columns, likewise.
const NODE: usize = 0;
const ACTOR: usize = 1;

/// The reference (index plus one; 0 for an empty value) of `value` in `table`, the value
/// added if it is new; `last` is its column's last reference, compared before hashing.
fn intern<Q>(
    table: &mut Vec<Q::Owned>,
    index: &mut HashMap<Q::Owned, u32, ahash::RandomState>,
    last: &mut u32,
    value: &Q,
) -> u32
where
    Q: ?Sized + ToOwned + Eq + std::hash::Hash + AsRef<[u8]>,
    Q::Owned: std::borrow::Borrow<Q> + Eq + std::hash::Hash,
{
    if value.as_ref().is_empty() {
        return 0;
    }
    if *last > 0 && std::borrow::Borrow::<Q>::borrow(&table[*last as usize - 1]) == value {
        return *last;
    }
    let at = match index.get(value) {
        Some(&at) => at,
        None => {
            table.push(value.to_owned());
            let at = table.len() as u32;
            index.insert(value.to_owned(), at);
            at
        }
    };
    *last = at;
    at
}

impl BatchBuilder {
    pub fn new(job_id: &[u8]) -> Self {
        Self {
            batch: TaskEventBatch { job_id: job_id.to_vec(), ..Default::default() },
            texts: HashMap::default(),
            ids: HashMap::default(),
            last: [0; 4],
            last_id: [0; 2],
        }
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.batch.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The reference of `text` in `column`, the text added if it is new.
    fn text(&mut self, column: usize, text: &str) -> u32 {
        intern(&mut self.batch.texts, &mut self.texts, &mut self.last[column], text)
    }

    /// The reference of `id` in `column`, the id added if it is new.
    fn id(&mut self, column: usize, id: &[u8]) -> u32 {
        intern(&mut self.batch.ids, &mut self.ids, &mut self.last_id[column], id)
    }

    /// Adds `event` (its task id must be [`TaskId::LEN`] bytes for the head to take the
    /// batch).
    pub fn push(&mut self, event: &Event<'_>) {
        let (name, reason, node, worker_address, error, actor) = (
            self.text(NAME, event.name),
            self.text(REASON, event.reason),
            self.id(NODE, event.node_id),
            self.text(WORKER_ADDRESS, event.worker_address),
            self.text(ERROR, event.error),
            self.id(ACTOR, event.actor_id),
        );
        let batch = &mut self.batch;
        batch.task_ids.extend_from_slice(event.task_id);
        batch.states.push(event.state as i32);
        batch.times_us.push(event.time_us);
        batch.attempts.push(event.attempt);
        batch.submitted_us.push(event.submitted_us);
        batch.started_us.push(event.started_us);
        batch.run_us.push(event.run_us);
        batch.names.push(name);
        batch.reasons.push(reason);
        batch.nodes.push(node);
        batch.worker_addresses.push(worker_address);
        batch.errors.push(error);
        batch.actors.push(actor);
    }

    /// The batch, its all-zero columns left out.
    pub fn finish(self) -> TaskEventBatch {
        fn drop_zeros<T: Default + PartialEq>(column: &mut Vec<T>) {
            if column.iter().all(|value| *value == T::default()) {
                *column = Vec::new();
            }
        }
        let mut batch = self.batch;
        drop_zeros(&mut batch.attempts);
        drop_zeros(&mut batch.submitted_us);
        drop_zeros(&mut batch.started_us);
        drop_zeros(&mut batch.run_us);
        drop_zeros(&mut batch.names);
        drop_zeros(&mut batch.reasons);
        drop_zeros(&mut batch.nodes);
        drop_zeros(&mut batch.worker_addresses);
        drop_zeros(&mut batch.errors);
        drop_zeros(&mut batch.actors);
        batch
    }
}

/// A task's type as Ray's state API names it: `ACTOR_CREATION_TASK` for the task that
/// creates its actor ([`TaskId::actor_creation`]), `ACTOR_TASK` for another naming an
/// actor (a row's or an event's actor id), else `NORMAL_TASK`.
pub fn task_type(task_id: &[u8], actor_id: &[u8]) -> &'static str {
    if actor_id.is_empty() {
        "NORMAL_TASK"
    } else if TaskId::is_actor_creation(task_id, actor_id) {
        "ACTOR_CREATION_TASK"
    } else {
        "ACTOR_TASK"
    }
}

impl TaskEventBatch {
    /// How many events it carries, once every column agrees on it, each reference names a
    /// text or id it carries (an id of the length its column's kind has) and each state is
    /// known (not `UNSPECIFIED`); else what is wrong.
    pub fn check(&self) -> Result<usize, String> {
        if self.task_ids.len() % TaskId::LEN != 0 {
            return Err(format!(
                "task ids come in {} bytes each; {} bytes is no whole number of them",
                TaskId::LEN,
                self.task_ids.len()
            ));
        }
        let count = self.task_ids.len() / TaskId::LEN;
        let lengths = [
            ("states", self.states.len()),
            ("times_us", self.times_us.len()),
            ("attempts", self.attempts.len()),
            ("submitted_us", self.submitted_us.len()),
            ("started_us", self.started_us.len()),
            ("run_us", self.run_us.len()),
            ("names", self.names.len()),
            ("reasons", self.reasons.len()),
            ("nodes", self.nodes.len()),
            ("worker_addresses", self.worker_addresses.len()),
            ("errors", self.errors.len()),
            ("actors", self.actors.len()),
        ];
        for (column, length) in lengths {
            let required = matches!(column, "states" | "times_us");
            if length != count && (required || length != 0) {
                return Err(format!("{count} events, but the column {column} holds {length}"));
            }
        }
        if let Some(bad) = self
            .states
            .iter()
            .find(|&&state| !matches!(TaskState::try_from(state), Ok(s) if s != TaskState::Unspecified))
        {
            return Err(format!("{bad} is no task state"));
        }
        let texts = self.texts.len() as u32;
        for (column, references) in [
            ("names", &self.names),
            ("reasons", &self.reasons),
            ("worker_addresses", &self.worker_addresses),
            ("errors", &self.errors),
        ] {
            if let Some(bad) = references.iter().find(|&&at| at > texts) {
                return Err(format!("the column {column} names text {bad}, but the batch holds {texts}"));
            }
        }
        let ids = self.ids.len() as u32;
        for (column, references, length) in
            [("nodes", &self.nodes, NodeId::LEN), ("actors", &self.actors, ActorId::LEN)]
        {
            if let Some(bad) = references.iter().find(|&&at| at > ids) {
                return Err(format!("the column {column} names id {bad}, but the batch holds {ids}"));
            }
            if let Some(bad) = references.iter().filter_map(|&at| self.id(at)).find(|id| id.len() != length) {
                return Err(format!("the column {column} names an id of {} bytes, not {length}", bad.len()));
            }
        }
        if let Some(bad) = self.ids.iter().find(|id| id.len() > NodeId::LEN.max(ActorId::LEN)) {
            return Err(format!("an id of {} bytes is no node's or actor's", bad.len()));
        }
        Ok(count)
    }

    /// Event `at` of a batch [`check`](Self::check) passed (`at` below its count).
    pub fn event(&self, at: usize) -> BatchEvent<'_> {
        let number = |column: &[u64]| column.get(at).copied().unwrap_or(0);
        let reference = |column: &[u32]| column.get(at).copied().unwrap_or(0);
        BatchEvent {
            task_id: &self.task_ids[at * TaskId::LEN..(at + 1) * TaskId::LEN],
            state: self
                .states
                .get(at)
                .and_then(|&state| TaskState::try_from(state).ok())
                .unwrap_or(TaskState::Unspecified),
            time_us: number(&self.times_us),
            attempt: reference(&self.attempts),
            submitted_us: number(&self.submitted_us),
            started_us: number(&self.started_us),
            run_us: number(&self.run_us),
            name: reference(&self.names),
            reason: reference(&self.reasons),
            node: reference(&self.nodes),
            worker_address: reference(&self.worker_addresses),
            error: reference(&self.errors),
            actor: reference(&self.actors),
        }
    }

    /// The text a reference names (0: none).
    pub fn text(&self, reference: u32) -> Option<&str> {
        reference.checked_sub(1).and_then(|at| self.texts.get(at as usize)).map(String::as_str)
    }

    /// The id (a node's, an actor's) a reference names (0: none).
    pub fn id(&self, reference: u32) -> Option<&[u8]> {
        reference.checked_sub(1).and_then(|at| self.ids.get(at as usize)).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_carries_each_text_once_and_reads_back_what_was_pushed() {
        let mut builder = BatchBuilder::new(&[0, 0, 0, 1]);
        for n in 0..100u8 {
            let id = [n; TaskId::LEN];
            builder.push(&Event {
                task_id: &id,
                state: TaskState::Finished,
                time_us: 1_000 + u64::from(n),
                name: if n % 2 == 0 { "step" } else { "eval" },
                node_id: &[7; 28],
                worker_address: "10.0.0.1:7000",
                error: if n == 3 { "boom" } else { "" },
                actor_id: if n % 10 == 0 { &[9; 16] } else { &[] },
                ..Default::default()
            });
        }
        let batch = builder.finish();
        assert_eq!(batch.check(), Ok(100));
        assert_eq!((batch.texts.len(), batch.ids.len()), (4, 2), "each text and id once");
        assert!(batch.attempts.is_empty() && batch.reasons.is_empty(), "columns of zeros are left out");
        let third = batch.event(3);
        assert_eq!((third.task_id, third.state, third.time_us), (&[3u8; TaskId::LEN][..], TaskState::Finished, 1_003));
        assert_eq!((batch.text(third.name), batch.text(third.error)), (Some("eval"), Some("boom")));
        assert_eq!(batch.text(batch.event(4).name), Some("step"));
        assert_eq!(
            (batch.id(third.node), batch.text(third.worker_address)),
            (Some(&[7u8; 28][..]), Some("10.0.0.1:7000"))
        );
        assert_eq!((batch.id(third.actor), batch.id(batch.event(10).actor)), (None, Some(&[9u8; 16][..])));
        assert_eq!((batch.text(batch.event(4).error), batch.text(third.reason)), (None, None));
    }

    #[test]
    fn a_malformed_batch_is_refused_saying_what_is_wrong() {
        let mut builder = BatchBuilder::new(&[0, 0, 0, 1]);
        builder.push(&Event { task_id: &[1; TaskId::LEN], state: TaskState::Running, name: "a", ..Default::default() });
        builder.push(&Event { task_id: &[2; TaskId::LEN], state: TaskState::Running, ..Default::default() });
        let good = builder.finish();
        let mut short = good.clone();
        short.task_ids.pop();
        assert!(short.check().unwrap_err().contains("no whole number"));
        let mut uneven = good.clone();
        uneven.times_us.pop();
        assert!(uneven.check().unwrap_err().contains("times_us"));
        let mut dangling = good.clone();
        dangling.names[1] = 9;
        assert!(dangling.check().unwrap_err().contains("names text 9"));
        let mut unknown = good.clone();
        unknown.states[0] = 77;
        assert!(unknown.check().unwrap_err().contains("77 is no task state"));
        unknown.states[0] = TaskState::Unspecified as i32;
        assert!(unknown.check().is_err(), "UNSPECIFIED is no state an event reports");
        let mut node = good.clone();
        node.nodes = vec![0, 1];
        assert!(node.check().unwrap_err().contains("nodes names id 1"));
        let mut actor = good;
        actor.actors = vec![1, 0];
        assert!(actor.check().unwrap_err().contains("actors names id 1"));
        actor.ids = vec![vec![5; 28]];
        assert!(actor.check().unwrap_err().contains("an id of 28 bytes, not 16"), "a node's id is no actor's");
        actor.actors = vec![0, 0];
        actor.ids = vec![vec![5; 4096]];
        assert!(actor.check().unwrap_err().contains("4096 bytes"));
    }
}
