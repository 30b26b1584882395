//! ionet-scheduler: where work runs. Pure placement logic, no I/O, no async.
//!
//! The control store (`ionet-gcs`) and every node daemon keep a [`ClusterView`]: one
//! [`NodeView`] per node (total and available [`ionet_common::ResourceSet`]s, its GPUs and their
//! model, labels such as `region`, the provider's price per GPU-hour, and whether it is
//! alive, draining or dead), fed from registrations and heartbeats through
//! [`ClusterView::upsert_node`], [`ClusterView::update_available`] and
//! [`ClusterView::set_state`]. The view indexes alive nodes by accelerator model, by free-GPU
//! bucket, by utilisation and by price, so one decision at 10,000 nodes takes microseconds.
//!
//! Decisions are functions of that view:
//!
//! - [`ClusterView::schedule`] takes a [`Demand`] (resources plus accelerator, GPU-memory and
//!   [`LabelSelector`] constraints) and a [`SchedulingStrategy`] (hybrid `Default`, `Spread`,
//!   `NodeAffinity`, `Cost`) and answers a [`Decision`]: `Place(node)`, `Wait` (retryable: an
//!   alive node could take it when free) or `Infeasible` (no alive node ever could).
//!   The caller applies a placement with [`ClusterView::allocate`] and undoes it with
//!   [`ClusterView::release`], so decisions in a burst see each other.
//! - [`solve_placement_group`] places a group's bundles (PACK, SPREAD, STRICT_PACK,
//!   STRICT_SPREAD) without over-committing any node; [`ClusterView::reserve_bundles`]
//!   takes them all or nothing.
//! - [`GpuAllocator`] runs on each node daemon: it turns a granted `GPU` amount into device
//!   ids for `CUDA_VISIBLE_DEVICES`, whole GPUs exclusive, fractions packed best fit.
//! - [`quote()`] answers `ionet quote`: the cheapest nodes with free GPUs of a model, the
//!   hourly and total price in micro-USD, and the saving against the on-demand list prices
//!   in `data/gpu-list-prices.toml` ([`PriceTable`]).
//!
//! Everything is deterministic: the same view and request give the same answer (ordered
//! maps and explicit tie-breaks by node id; no hash-map iteration, no clock, no randomness).
//! Input the scheduler refuses (a malformed selector, an update making `available` exceed
//! `total`) is a [`SchedulerError`]; "no room" is never an error but a decision. The
//! guarantees are listed in this crate's `README.md`.

pub mod cluster;
pub mod demand;
pub mod error;
pub mod gpu;
pub mod labels;
pub mod node;
pub mod placement_group;
pub mod policy;
pub mod quote;

pub use cluster::{ClusterView, DEFAULT_HYBRID_THRESHOLD};
pub use demand::Demand;
pub use error::{SchedulerError, SchedulerResult};
pub use gpu::{GpuAllocator, GpuAssignment};
pub use labels::LabelSelector;
pub use node::{Gpu, NodeState, NodeView};
pub use placement_group::{
    solve_placement_group, solve_placement_group_ordered, NodeOrder, PlacementDecision, PlacementStrategy,
};
pub use policy::{Decision, SchedulingStrategy};
pub use quote::{quote, ListPrice, PriceTable, Quote, QuotePlacement, QuoteRank, QuoteRefusal, QuoteRequest};

#[cfg(test)]
mod testing;
