//! The owner table: the objects this process owns, each with its outcome and a count of
//! the local handles that keep it alive.
//!
//! Invariants (unit-tested below):
//! - an object's outcome is set once: the first `settle` of a pending object wins (a
//!   cancel that comes first is not overwritten by the late reply), later ones are no-ops;
//! - an entry leaves the table only through [`OwnedObjects::forget`], and only while its
//!   count is zero: a handle revived meanwhile ([`OwnedObjects::revive`]) keeps it;
//! - a wait on an entry ends with its outcome or, at its deadline, with `Timeout` (the
//!   waiter holds the entry, so it cannot vanish underneath).
//!
//! The table knows nothing of tasks, leases or the network: it depends only on the
//! vocabulary crate, so the parts above it (submission, actor calls, services) share it
//! through the core worker without it depending on any of them.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::rpc::proto::worker::StoredObject;
use ionet_common::{IonetError, IonetResult, ObjectId};
use tokio::sync::watch;

/// How long a thread about to wait for an object polls first.
const SPIN_BUDGET: Duration = Duration::from_micros(200);

/// Where an object's value is.
#[derive(Clone, Debug)]
pub(crate) enum ObjectState {
    Pending,
    Inline(Arc<Vec<u8>>),
    Stored(StoredObject),
    Failed(Arc<IonetError>),
}

impl ObjectState {
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self, ObjectState::Pending)
    }
}

/// Whatever the value holds that must live as long as it does (the refs written inside
/// it): kept, never read.
pub(crate) type KeepAlive = Box<dyn Any + Send + Sync>;

pub(crate) struct ObjectEntry {
    state: std::sync::Mutex<ObjectState>,
    /// What waiters watch, made by the first (most objects are read once settled, or
    /// never: a watch channel each was 424 of a million tasks' bytes apiece). Kept equal
    /// to `state` under its lock.
    watchers: std::sync::OnceLock<watch::Sender<ObjectState>>,
    references: AtomicUsize,
    _holding: Option<KeepAlive>,
}

impl ObjectEntry {
    /// A new entry in `state` with one handle.
    fn new(state: ObjectState, holding: Option<KeepAlive>) -> Self {
        Self {
            state: std::sync::Mutex::new(state),
            watchers: std::sync::OnceLock::new(),
            references: AtomicUsize::new(1),
            _holding: holding,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ObjectState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves the state to `next` (the caller holds its lock), telling any waiters.
    fn set(&self, current: &mut ObjectState, next: ObjectState) {
        if let Some(watchers) = self.watchers.get() {
            watchers.send_replace(next.clone());
        }
        *current = next;
    }

    pub(crate) fn add_reference(&self) {
        self.references.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether that was the last reference.
    pub(crate) fn remove_reference(&self) -> bool {
        self.references.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// The outcome so far (`Pending` until settled).
    pub(crate) fn state(&self) -> ObjectState {
        self.lock().clone()
    }

    /// A receiver that sees the outcome when it comes (for streams that wait on it).
    pub(crate) fn subscribe(&self) -> watch::Receiver<ObjectState> {
        // Under the lock: a channel made now starts from the current state, and a state
        // moved later reaches it.
        let current = self.lock();
        self.watchers.get_or_init(|| watch::channel(current.clone()).0).subscribe()
    }

    /// Briefly polls, yielding the CPU, while the object is pending (at most until
    /// `deadline`): a small task's reply comes within tens of microseconds, and a parked
    /// thread takes about as long again to be woken (longer on a virtual machine, whose
    /// idle CPU must be roused first). Past the budget the caller parks as usual.
    pub(crate) fn spin_while_pending(&self, deadline: Option<Instant>) {
        let budget = Instant::now() + SPIN_BUDGET;
        let until = deadline.map_or(budget, |deadline| deadline.min(budget));
        while !self.is_settled() && Instant::now() < until {
            std::thread::yield_now();
        }
    }

    /// Whether the object has its outcome (a value, or a failure such as a cancel).
    pub(crate) fn is_settled(&self) -> bool {
        !self.lock().is_pending()
    }

    /// Gives a pending object its outcome (one already settled keeps its own); whether
    /// this call settled it.
    pub(crate) fn settle(&self, state: ObjectState) -> bool {
        let mut current = self.lock();
        let pending = current.is_pending();
        if pending {
            self.set(&mut current, state);
        }
        pending
    }

    /// Puts an object whose stored value `lost` could not be read back to pending, for
    /// its task to run again; whether it did (not when its state moved on meanwhile).
    pub(crate) fn reset_lost(&self, lost: &StoredObject) -> bool {
        let mut current = self.lock();
        let reset = matches!(&*current, ObjectState::Stored(stored) if stored == lost);
        if reset {
            self.set(&mut current, ObjectState::Pending);
        }
        reset
    }

    /// Waits for the outcome, at most until `deadline`.
    pub(crate) async fn wait(&self, id: &ObjectId, deadline: Option<Instant>) -> IonetResult<ObjectState> {
        {
            let current = self.lock();
            if !current.is_pending() {
                return Ok(current.clone());
            }
        }
        let mut receiver = self.subscribe();
        let ready = receiver.wait_for(|state| !state.is_pending());
        let state = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), ready)
                .await
                .map_err(|_| IonetError::Timeout(format!("object {} not ready in time", id.short())))?,
            None => ready.await,
        }
        .map_err(|_| IonetError::ObjectLost(format!("object {} was freed", id.short())))?
        .clone();
        Ok(state)
    }
}

/// The objects this process owns.
#[derive(Default)]
pub(crate) struct OwnedObjects {
    entries: DashMap<ObjectId, Arc<ObjectEntry>>,
}

impl OwnedObjects {
    /// Records a new object in `state` with one handle (the caller's), keeping `holding`
    /// alive with it.
    pub(crate) fn insert(&self, id: ObjectId, state: ObjectState, holding: Option<KeepAlive>) -> Arc<ObjectEntry> {
        let entry = Arc::new(ObjectEntry::new(state, holding));
        self.entries.insert(id, entry.clone());
        entry
    }

    /// The entry of `id`, if this process owns it.
    pub(crate) fn get(&self, id: &ObjectId) -> Option<Arc<ObjectEntry>> {
        self.entries.get(id).map(|entry| entry.clone())
    }

    /// Whether `id` is owned here and settled (no waiting).
    pub(crate) fn is_ready(&self, id: &ObjectId) -> bool {
        self.entries.get(id).is_some_and(|entry| entry.is_settled())
    }

    /// Gives `id` its outcome if it is still owned and pending; whether this call did.
    /// An object whose every handle was dropped is gone: nobody wants the value.
    pub(crate) fn settle(&self, id: &ObjectId, state: ObjectState) -> bool {
        self.entries.get(id).is_some_and(|entry| entry.settle(state))
    }

    /// A handle of `id` arriving back in its owner: counted again, if still owned.
    pub(crate) fn revive(&self, id: &ObjectId) -> Option<Arc<ObjectEntry>> {
        let entry = self.entries.get(id)?;
        entry.add_reference();
        Some(entry.clone())
    }

    /// The last counted handle of `id` is gone: the entry leaves the table unless a
    /// handle was revived meanwhile. Returns the removed entry's outcome (its stored
    /// copies are the caller's to free).
    pub(crate) fn forget(&self, id: &ObjectId) -> Option<ObjectState> {
        self.entries
            .remove_if(id, |_, entry| entry.references.load(Ordering::Acquire) == 0)
            .map(|(_, entry)| entry.state())
    }

    /// Each owned object with its outcome so far and its counted handles (for `ionet
    /// memory`; one pass, values shared, not copied).
    pub(crate) fn snapshot(&self) -> Vec<(ObjectId, ObjectState, usize)> {
        self.entries
            .iter()
            .map(|entry| (*entry.key(), entry.state(), entry.references.load(Ordering::Relaxed)))
            .collect()
    }

    /// How many objects are owned here.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(byte: u8) -> ObjectState {
        ObjectState::Inline(Arc::new(vec![byte]))
    }

    fn value_of(state: ObjectState) -> Vec<u8> {
        match state {
            ObjectState::Inline(bytes) => bytes.to_vec(),
            other => panic!("expected an inline value, got {other:?}"),
        }
    }

    #[test]
    fn the_first_outcome_wins() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        table.insert(id, ObjectState::Pending, None);
        assert!(!table.is_ready(&id));
        let cancelled = ObjectState::Failed(Arc::new(IonetError::Cancelled("by its owner".into())));
        assert!(table.settle(&id, cancelled));
        assert!(!table.settle(&id, inline(1)), "a late reply must not overwrite the cancel");
        assert!(
            matches!(table.get(&id).unwrap().state(), ObjectState::Failed(error) if matches!(*error, IonetError::Cancelled(_)))
        );
        assert!(table.is_ready(&id));
    }

    #[test]
    fn an_object_nobody_holds_is_not_settled_or_found() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        assert!(!table.settle(&id, inline(1)));
        assert!(table.get(&id).is_none());
        assert!(table.revive(&id).is_none());
        assert!(table.forget(&id).is_none());
    }

    #[test]
    fn an_entry_leaves_only_at_zero_handles() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        let entry = table.insert(id, inline(7), None);
        // Two handles: the first one's drop leaves the entry.
        entry.add_reference();
        assert!(!entry.remove_reference());
        assert_eq!(table.len(), 1);
        // The last one goes, but a handle is revived before the owner forgets it.
        assert!(entry.remove_reference());
        let revived = table.revive(&id).expect("still owned");
        assert!(table.forget(&id).is_none(), "a revived handle keeps the entry");
        assert_eq!(table.len(), 1);
        // Its drop is the last: now the entry goes, with its outcome for the caller.
        assert!(revived.remove_reference());
        assert_eq!(value_of(table.forget(&id).expect("forgotten at zero")), vec![7]);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn the_holding_lives_as_long_as_the_entry() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        let held = Arc::new(());
        let entry = table.insert(id, inline(1), Some(Box::new(held.clone())));
        assert_eq!(Arc::strong_count(&held), 2);
        assert!(entry.remove_reference());
        table.forget(&id);
        drop(entry);
        assert_eq!(Arc::strong_count(&held), 1, "the value's inner refs go with it");
    }

    #[tokio::test]
    async fn a_wait_ends_with_the_outcome_or_the_deadline() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        let entry = table.insert(id, ObjectState::Pending, None);

        let deadline = Instant::now() + Duration::from_millis(20);
        assert!(matches!(entry.wait(&id, Some(deadline)).await, Err(IonetError::Timeout(_))));

        let waiting = tokio::spawn({
            let entry = entry.clone();
            async move { entry.wait(&id, Some(Instant::now() + Duration::from_secs(30))).await }
        });
        table.settle(&id, inline(3));
        let settled = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(value_of(settled), vec![3]);
    }

    /// Only an object someone waited on while pending carries a channel for waiters (a
    /// million tasks' objects, read once settled, carried 424 bytes each for nothing); a
    /// watcher made late still sees every move, a lost value put back to pending included.
    #[tokio::test]
    async fn waiters_cost_only_the_objects_they_wait_on() {
        let table = OwnedObjects::default();
        let id = ObjectId::random();
        let entry = table.insert(id, ObjectState::Pending, None);
        entry.settle(inline(1));
        assert_eq!(value_of(entry.wait(&id, None).await.unwrap()), vec![1]);
        assert!(entry.is_settled() && entry.watchers.get().is_none(), "no waiter, no channel");

        let stored = StoredObject { object_id: id.to_vec(), size: 9, ..Default::default() };
        let pending = table.insert(ObjectId::random(), ObjectState::Pending, None);
        let mut watcher = pending.subscribe();
        assert!(pending.settle(ObjectState::Stored(stored.clone())));
        assert!(!pending.settle(inline(2)), "settled once");
        tokio::time::timeout(Duration::from_secs(30), watcher.changed()).await.unwrap().unwrap();
        assert!(matches!(&*watcher.borrow_and_update(), ObjectState::Stored(now) if *now == stored));
        // Lost: back to pending for its task to run again, and the watcher sees it.
        assert!(pending.reset_lost(&stored));
        tokio::time::timeout(Duration::from_secs(30), watcher.changed()).await.unwrap().unwrap();
        assert!(watcher.borrow_and_update().is_pending());
        // A watcher made after it settled starts from the outcome.
        pending.settle(inline(5));
        assert_eq!(value_of(pending.subscribe().borrow().clone()), vec![5]);
    }
}
