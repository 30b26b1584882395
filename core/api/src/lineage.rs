//! Lineage: the specs of the tasks whose stored return objects this process owns, kept
//! while those objects are owned, so that a value lost with its node is made again by
//! re-running its task (`crate::submit::reconstruct`), recursively for lost arguments,
//! within the task's `max_retries`.
//!
//! Invariants:
//! - a spec is kept only for a task whose value went to a node's store (an inline value
//!   lives in its owner and is lost only with it) and only while its object is owned:
//!   forgetting the object forgets its lineage;
//! - the specs kept (their inline arguments and the stored values of the arguments they
//!   keep alive, counted in bytes) stay under a budget: past it the oldest are dropped
//!   (releasing those values), and a loss of their objects then says so;
//! - a kept spec holds its arguments' refs, so their objects (and lineage) live as long
//!   as anything that may need to rebuild from them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::{DashMap, DashSet};
use ionet_common::ObjectId;

use crate::object_ref::Arg;
use crate::submit::TaskSpec;

/// The lineage budget unless configured (`InitConfig::lineage_budget_bytes`).
pub const DEFAULT_LINEAGE_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// What is known of how an owned object was made.
#[derive(Clone)]
pub(crate) enum Recipe {
    /// Its task's spec: it can run again.
    Kept(Arc<TaskSpec>),
    /// Its spec was dropped to stay under the budget.
    Dropped,
}

pub(crate) struct Lineage {
    /// Each owned object's recipe, with the bytes it counts for (0 once dropped).
    recipes: DashMap<ObjectId, (Recipe, usize)>,
    /// Kept specs, oldest first (objects forgotten since are skipped, and compacted away).
    order: Mutex<VecDeque<ObjectId>>,
    bytes: AtomicUsize,
    budget: AtomicUsize,
    /// Nodes whose objects could not be read: their stored objects are lost.
    lost_nodes: DashSet<Vec<u8>>,
}

impl Default for Lineage {
    fn default() -> Self {
        Self {
            recipes: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            budget: AtomicUsize::new(DEFAULT_LINEAGE_BUDGET_BYTES),
            lost_nodes: DashSet::new(),
        }
    }
}

/// Roughly what a spec costs to keep: its inline arguments, the stored values of the
/// arguments it keeps alive, and a fixed part.
fn size_of(spec: &TaskSpec, stored_size: impl Fn(&ObjectId) -> usize) -> usize {
    let arguments: usize = spec
        .args
        .iter()
        .map(|arg| match arg {
            Arg::Value(Ok(bytes)) | Arg::Holding(bytes, _) => bytes.len(),
            Arg::Value(Err(why)) => why.len(),
            Arg::Ref(reference) => 64 + stored_size(&reference.id()),
        })
        .sum();
    arguments + 256
}

impl Lineage {
    pub(crate) fn set_budget(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Keeps `spec`, the recipe of its return object, dropping the oldest past the budget.
    /// `stored_size` gives the size of an owned argument's stored value: a kept spec holds
    /// its arguments' values too, so they count against the budget.
    pub(crate) fn keep(&self, spec: Arc<TaskSpec>, stored_size: impl Fn(&ObjectId) -> usize) {
        let id = spec.return_id;
        if self.recipes.contains_key(&id) {
            return; // kept already (a re-run)
        }
        let size = size_of(&spec, stored_size);
        self.recipes.insert(id, (Recipe::Kept(spec), size));
        // Specs dropped here are released after every lock is let go: releasing one drops
        // its argument refs, which may forget objects and so come back into this table.
        let mut dropped = Vec::new();
        {
            let mut order = self.order.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            order.push_back(id);
            let mut total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
            while total > self.budget() {
                let Some(oldest) = order.pop_front() else { break };
                if let Some(mut recipe) = self.recipes.get_mut(&oldest) {
                    let freed = std::mem::take(&mut recipe.1);
                    dropped.push(std::mem::replace(&mut recipe.0, Recipe::Dropped));
                    total = self.bytes.fetch_sub(freed, Ordering::Relaxed) - freed;
                }
            }
            if order.len() > 2 * self.recipes.len() + 1024 {
                order.retain(|id| self.recipes.get(id).is_some_and(|recipe| recipe.1 > 0));
            }
        }
        drop(dropped);
    }

    pub(crate) fn recipe(&self, id: &ObjectId) -> Option<Recipe> {
        self.recipes.get(id).map(|recipe| recipe.0.clone())
    }

    /// The object is no longer owned: nothing will rebuild it.
    pub(crate) fn forget(&self, id: &ObjectId) {
        if let Some((_, (_, size))) = self.recipes.remove(id) {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
        }
    }

    pub(crate) fn mark_lost(&self, node_id: &[u8]) {
        self.lost_nodes.insert(node_id.to_vec());
    }

    pub(crate) fn is_lost(&self, node_id: &[u8]) -> bool {
        self.lost_nodes.contains(node_id)
    }

    #[cfg(test)]
    pub(crate) fn kept_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::{ObjectState, OwnedObjects};
    use crate::submit::spec_for_test;

    fn kept(lineage: &Lineage, id: &ObjectId) -> bool {
        matches!(lineage.recipe(id), Some(Recipe::Kept(_)))
    }

    #[test]
    fn the_oldest_specs_are_dropped_past_the_budget_and_forgetting_gives_bytes_back() {
        let objects = OwnedObjects::default();
        let lineage = Lineage::default();
        lineage.set_budget(3 * (1_000 + 256));
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::random()).collect();
        for id in &ids {
            let entry = objects.insert(*id, ObjectState::Pending, None);
            lineage.keep(spec_for_test(*id, entry, 1_000), |_| 0);
        }
        assert!(matches!(lineage.recipe(&ids[0]), Some(Recipe::Dropped)), "the oldest is dropped");
        assert!(ids[1..].iter().all(|id| kept(&lineage, id)));
        assert_eq!(lineage.kept_bytes(), 3 * 1_256);
        // Kept again (a re-run): counted once.
        let entry = objects.get(&ids[3]).unwrap();
        lineage.keep(spec_for_test(ids[3], entry, 1_000), |_| 0);
        assert_eq!(lineage.kept_bytes(), 3 * 1_256);
        for id in &ids {
            lineage.forget(id);
        }
        assert_eq!(lineage.kept_bytes(), 0);
        assert!(ids.iter().all(|id| lineage.recipe(id).is_none()), "forgotten objects have no recipe");
    }
}
