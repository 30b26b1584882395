//! The cluster view: every node the scheduler knows, plus ordered indexes over the alive ones.
//!
//! Invariants (checked by the proptests in `tests`):
//! - a node is in the indexes iff its state is `Alive`; draining and dead nodes stay in the
//!   view (so `Wait` vs `Infeasible` and `ionet status` can see them) but are never chosen;
//! - every index key is derived from the node's current `available` and `price`: any change
//!   to them removes the old keys first, then inserts the new ones;
//! - `available` never exceeds `total` and never goes negative (changes that would are
//!   refused with an error and change nothing).
//!
//! Index layout. Alive nodes are keyed three times, by `(utilisation, node id)`, by
//! `(price per GPU-hour, utilisation, node id)` and by `(price per TFLOP-hour, utilisation,
//! node id)`, in `BTreeSet`s (so iteration order is
//! deterministic), and each key is filed in three places: the set of all alive nodes, the
//! set of its free-GPU bucket (free whole GPUs 0, 1, 2-3, 4-7, 8-15, 16+), and the same two
//! under its accelerator model. A demand for `g` GPUs of model `m` only looks at `m`'s buckets
//! from `bucket(g)` up (every node there has at least `floor(g)`'s bucket of free GPUs),
//! takes the first node of each bucket's order that truly fits, and keeps the best: the
//! answer is the global best because each bucket is sorted by the same key. A bucket's scan
//! stops as soon as its keys cannot beat the best found so far. Nodes with no free GPU at
//! all (CPU-only nodes, fully used GPU nodes) are in no bucket, so GPU demands never wade
//! through them; buckets are visited from the top down, as high buckets hold the emptiest
//! nodes and so a good bound early.

use std::collections::{BTreeMap, BTreeSet};

use ionet_common::resources::{MicroUsd, GPU, SCALE};
use ionet_common::{NodeId, Quantity, ResourceSet};

use crate::demand::Demand;
use crate::error::{SchedulerError, SchedulerResult};
use crate::node::{NodeState, NodeView};

/// Free-GPU buckets: 0 (< 1 free), 1, 2-3, 4-7, 8-15, 16+.
pub(crate) const BUCKETS: usize = 6;

/// The default utilisation above which the hybrid policy stops preferring the local node.
pub const DEFAULT_HYBRID_THRESHOLD: f64 = 0.5;

pub(crate) type Slot = u32;
type UtilKey = (u32, NodeId, Slot);
type PriceKey = (MicroUsd, u32, NodeId, Slot);

pub(crate) fn gpu_bucket(gpus: Quantity) -> usize {
    let whole = gpus.units().max(0) / SCALE;
    if whole == 0 {
        0
    } else {
        (1 + whole.ilog2() as usize).min(BUCKETS - 1)
    }
}

#[derive(Clone, Debug, Default)]
struct Ordered {
    by_util: BTreeSet<UtilKey>,
    by_price: BTreeSet<PriceKey>,
    /// Keyed by price per TFLOP-hour ([`MicroUsd::MAX`] for unknown speed).
    by_per_tflop: BTreeSet<PriceKey>,
}

impl Ordered {
    fn insert(&mut self, key: &IndexKey, id: NodeId, slot: Slot) {
        self.by_util.insert((key.util, id, slot));
        self.by_price.insert((key.price, key.util, id, slot));
        self.by_per_tflop.insert((key.per_tflop, key.util, id, slot));
    }
    fn remove(&mut self, key: &IndexKey, id: NodeId, slot: Slot) {
        self.by_util.remove(&(key.util, id, slot));
        self.by_price.remove(&(key.price, key.util, id, slot));
        self.by_per_tflop.remove(&(key.per_tflop, key.util, id, slot));
    }
}

#[derive(Clone, Debug, Default)]
struct Tier {
    all: Ordered,
    buckets: [Ordered; BUCKETS],
}

impl Tier {
    fn insert(&mut self, key: &IndexKey, id: NodeId, slot: Slot) {
        self.all.insert(key, id, slot);
        if let Some(bucket) = key.bucket {
            self.buckets[bucket].insert(key, id, slot);
        }
    }
    fn remove(&mut self, key: &IndexKey, id: NodeId, slot: Slot) {
        self.all.remove(key, id, slot);
        if let Some(bucket) = key.bucket {
            self.buckets[bucket].remove(key, id, slot);
        }
    }
    fn is_empty(&self) -> bool {
        self.all.by_util.is_empty()
    }
}

/// The keys a node was indexed under, kept so that they can be removed exactly.
#[derive(Clone, Debug)]
struct IndexKey {
    util: u32,
    price: MicroUsd,
    per_tflop: MicroUsd,
    /// `None` for a node with no free GPU at all: no GPU demand can go there.
    bucket: Option<usize>,
    accelerator: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) view: NodeView,
    key: Option<IndexKey>,
}

/// In which order the indexed search ranks feasible nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Lowest utilisation, then node id.
    LeastUtilised,
    /// Lowest price per GPU-hour, then utilisation, then node id.
    Cheapest,
    /// Lowest price per TFLOP-hour (unknown speed last), then utilisation, then node id.
    CheapestPerTflop,
}

/// Every node the scheduler knows; see the module docs for the index.
#[derive(Clone, Debug)]
pub struct ClusterView {
    slots: Vec<Option<Entry>>,
    free_slots: Vec<Slot>,
    ids: BTreeMap<NodeId, Slot>,
    everyone: Tier,
    by_accelerator: BTreeMap<String, Tier>,
    hybrid_threshold_ppm: u32,
    /// The node the last SPREAD placement went to: the next starts after it (round robin
    /// over the nodes that fit, as Ray's). Shared by the clones of a view, and carried to
    /// the view that replaces it ([`ClusterView::continue_spread_of`]).
    spread_last: std::sync::Arc<std::sync::Mutex<Option<NodeId>>>,
}

impl Default for ClusterView {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterView {
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            free_slots: Vec::new(),
            ids: BTreeMap::new(),
            everyone: Tier::default(),
            by_accelerator: BTreeMap::new(),
            hybrid_threshold_ppm: (DEFAULT_HYBRID_THRESHOLD * 1e6) as u32,
            spread_last: Default::default(),
        }
    }

    /// This view spreads on from where `previous` got to (a refreshed view keeps going
    /// round the nodes rather than starting at the first again).
    pub fn continue_spread_of(&mut self, previous: &ClusterView) {
        self.spread_last = previous.spread_last.clone();
    }

    /// The node the next SPREAD placement of `demand` goes to: the nodes it fits now, in
    /// id order, taken in turn (a placement that uses nothing, as an actor's, still
    /// moves on; utilisation alone would send every such one to the same node).
    pub(crate) fn spread_pick(&self, demand: &Demand) -> Option<Slot> {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut last = self.spread_last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The nodes after the last one, then from the first round to it: no copy, and a
        // walk only as far as the first that fits.
        let (after, before) = match *last {
            Some(node) => (self.ids.range((Excluded(node), Unbounded)), Some(self.ids.range(..=node))),
            None => (self.ids.range::<NodeId, _>(..), None),
        };
        let (node, slot) =
            after.chain(before.into_iter().flatten()).find(|(_, slot)| demand.fits_now(&self.entry(**slot).view))?;
        *last = Some(*node);
        Some(*slot)
    }

    /// Sets the hybrid policy's utilisation threshold (clamped to 0..=1).
    pub fn with_hybrid_threshold(mut self, threshold: f64) -> Self {
        self.hybrid_threshold_ppm = (threshold.clamp(0.0, 1.0) * 1e6).round() as u32;
        self
    }

    pub fn hybrid_threshold(&self) -> f64 {
        self.hybrid_threshold_ppm as f64 / 1e6
    }

    pub(crate) fn hybrid_threshold_ppm(&self) -> u32 {
        self.hybrid_threshold_ppm
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Nodes taking new work.
    pub fn alive_count(&self) -> usize {
        self.everyone.all.by_util.len()
    }

    pub fn node(&self, node_id: &NodeId) -> Option<&NodeView> {
        self.ids.get(node_id).map(|slot| &self.entry(*slot).view)
    }

    /// Every node, in node-id order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeView> + '_ {
        self.ids.values().map(|slot| &self.entry(*slot).view)
    }

    /// Alive nodes from least to most utilised (ties by node id).
    pub fn alive_nodes_by_utilisation(&self) -> impl DoubleEndedIterator<Item = &NodeView> + '_ {
        self.everyone.all.by_util.iter().map(|(_, _, slot)| &self.entry(*slot).view)
    }

    /// Alive nodes of one accelerator model (all alive nodes for `None`), least utilised first.
    pub(crate) fn alive_nodes_of(&self, accelerator: Option<&str>) -> Box<dyn Iterator<Item = &NodeView> + '_> {
        let tier = match accelerator {
            None => &self.everyone,
            Some(model) => match self.by_accelerator.get(model) {
                Some(tier) => tier,
                None => return Box::new(std::iter::empty()),
            },
        };
        Box::new(tier.all.by_util.iter().map(|(_, _, slot)| &self.entry(*slot).view))
    }

    pub(crate) fn entry(&self, slot: Slot) -> &Entry {
        self.slots[slot as usize].as_ref().expect("index and id map only hold live slots")
    }

    /// Adds a node or replaces what is known about it.
    pub fn upsert_node(&mut self, view: NodeView) -> SchedulerResult<()> {
        if !view.total.contains(&view.available) {
            return Err(SchedulerError::InvalidNode {
                node: view.node_id,
                reason: format!("available {} exceeds total {}", view.available, view.total),
            });
        }
        let slot = match self.ids.get(&view.node_id).copied() {
            Some(slot) => {
                self.unindex(slot);
                slot
            }
            None => {
                let slot = self.free_slots.pop().unwrap_or_else(|| {
                    self.slots.push(None);
                    (self.slots.len() - 1) as Slot
                });
                self.ids.insert(view.node_id, slot);
                slot
            }
        };
        self.slots[slot as usize] = Some(Entry { view, key: None });
        self.index(slot);
        Ok(())
    }

    /// Forgets a node entirely, handing back what was known.
    pub fn remove_node(&mut self, node_id: &NodeId) -> Option<NodeView> {
        let slot = self.ids.remove(node_id)?;
        self.unindex(slot);
        self.free_slots.push(slot);
        self.slots[slot as usize].take().map(|entry| entry.view)
    }

    /// Replaces a node's available resources (e.g. from a heartbeat).
    pub fn update_available(&mut self, node_id: &NodeId, available: ResourceSet) -> SchedulerResult<()> {
        self.modify(node_id, |view| {
            if !view.total.contains(&available) {
                return Err(format!("available {available} exceeds total {}", view.total));
            }
            view.available = available;
            Ok(())
        })
    }

    /// Marks a node alive, draining or dead.
    pub fn set_state(&mut self, node_id: &NodeId, state: NodeState) -> SchedulerResult<()> {
        self.modify(node_id, |view| {
            view.state = state;
            Ok(())
        })
    }

    /// Changes the price a node asks per GPU-hour.
    pub fn set_price(&mut self, node_id: &NodeId, price: MicroUsd) -> SchedulerResult<()> {
        self.modify(node_id, |view| {
            view.price_per_gpu_hour = price;
            Ok(())
        })
    }

    /// Takes `resources` from a node's available set; refuses (changing nothing) if short.
    pub fn allocate(&mut self, node_id: &NodeId, resources: &ResourceSet) -> SchedulerResult<()> {
        self.modify(node_id, |view| {
            view.available
                .try_subtract(resources)
                .map_err(|_| format!("cannot take {resources}: only {} available", view.available))
        })
    }

    /// Returns `resources` to a node; refuses (changing nothing) if that would exceed total.
    pub fn release(&mut self, node_id: &NodeId, resources: &ResourceSet) -> SchedulerResult<()> {
        self.modify(node_id, |view| {
            let mut after = view.available.clone();
            after.add(resources);
            if !view.total.contains(&after) {
                return Err(format!("returning {resources} would make available {after} exceed total {}", view.total));
            }
            view.available = after;
            Ok(())
        })
    }

    /// Takes every bundle's resources from its node, all or nothing.
    pub fn reserve_bundles(&mut self, bundles: &[ResourceSet], nodes: &[NodeId]) -> SchedulerResult<()> {
        if bundles.len() != nodes.len() {
            return Err(SchedulerError::InvalidRequest(format!("{} bundles but {} nodes", bundles.len(), nodes.len())));
        }
        for (index, (bundle, node)) in bundles.iter().zip(nodes).enumerate() {
            let bundle = crate::demand::split_accelerator(bundle.clone()).0;
            if let Err(err) = self.allocate(node, &bundle) {
                for (bundle, node) in bundles[..index].iter().zip(nodes) {
                    let bundle = crate::demand::split_accelerator(bundle.clone()).0;
                    self.release(node, &bundle).expect("returning what was just taken fits");
                }
                return Err(err);
            }
        }
        Ok(())
    }

    fn modify(
        &mut self,
        node_id: &NodeId,
        change: impl FnOnce(&mut NodeView) -> Result<(), String>,
    ) -> SchedulerResult<()> {
        let slot = *self.ids.get(node_id).ok_or(SchedulerError::UnknownNode(*node_id))?;
        self.unindex(slot);
        let entry = self.slots[slot as usize].as_mut().expect("live slot");
        let result = change(&mut entry.view).map_err(|reason| SchedulerError::Accounting { node: *node_id, reason });
        self.index(slot);
        result
    }

    fn index(&mut self, slot: Slot) {
        let entry = self.slots[slot as usize].as_mut().expect("live slot");
        debug_assert!(entry.key.is_none());
        if entry.view.state != NodeState::Alive {
            return;
        }
        let key = IndexKey {
            util: entry.view.utilisation_ppm(),
            price: entry.view.price_per_gpu_hour,
            per_tflop: entry.view.price_per_tflop_hour().unwrap_or(MicroUsd::MAX),
            bucket: {
                let free = entry.view.available.get(GPU);
                (!free.is_zero()).then(|| gpu_bucket(free))
            },
            accelerator: entry.view.accelerator().map(str::to_string),
        };
        let id = entry.view.node_id;
        self.everyone.insert(&key, id, slot);
        if let Some(model) = &key.accelerator {
            self.by_accelerator.entry(model.clone()).or_default().insert(&key, id, slot);
        }
        entry.key = Some(key);
    }

    fn unindex(&mut self, slot: Slot) {
        let entry = self.slots[slot as usize].as_mut().expect("live slot");
        let Some(key) = entry.key.take() else {
            return;
        };
        let id = entry.view.node_id;
        self.everyone.remove(&key, id, slot);
        if let Some(model) = &key.accelerator {
            if let Some(tier) = self.by_accelerator.get_mut(model) {
                tier.remove(&key, id, slot);
                if tier.is_empty() {
                    self.by_accelerator.remove(model);
                }
            }
        }
    }

    pub(crate) fn utilisation_of(&self, slot: Slot) -> u32 {
        self.entry(slot).key.as_ref().map_or(u32::MAX, |key| key.util)
    }

    pub(crate) fn slot_of(&self, node_id: &NodeId) -> Option<Slot> {
        self.ids.get(node_id).copied()
    }

    /// The best alive node that can take `demand` now, by `order`, skipping `exclude`.
    pub(crate) fn best_feasible(&self, demand: &Demand, order: Order, exclude: Option<Slot>) -> Option<Slot> {
        let tier = match &demand.accelerator_type {
            Some(model) => self.by_accelerator.get(model)?,
            None => &self.everyone,
        };
        let gpus = demand.gpus();
        let sets: &[Ordered] =
            if gpus.is_zero() { std::slice::from_ref(&tier.all) } else { &tier.buckets[gpu_bucket(gpus)..] };
        let fits = |slot: Slot| Some(slot) != exclude && demand.fits_now(&self.entry(slot).view);
        match order {
            Order::LeastUtilised => {
                let mut best: Option<UtilKey> = None;
                for set in sets.iter().rev() {
                    for key in &set.by_util {
                        if best.is_some_and(|best| *key >= best) {
                            break;
                        }
                        if fits(key.2) {
                            best = Some(*key);
                            break;
                        }
                    }
                }
                best.map(|key| key.2)
            }
            Order::Cheapest | Order::CheapestPerTflop => {
                let mut best: Option<PriceKey> = None;
                for set in sets.iter().rev() {
                    let keys = if order == Order::Cheapest { &set.by_price } else { &set.by_per_tflop };
                    for key in keys {
                        if best.is_some_and(|best| *key >= best) {
                            break;
                        }
                        if fits(key.3) {
                            best = Some(*key);
                            break;
                        }
                    }
                }
                best.map(|key| key.3)
            }
        }
    }
}
