//! Placement-group solving: where each bundle of a group goes, all or nothing.
//!
//! The solver is a pure function of the cluster view. It copies the free amounts of the
//! resources the bundles name into a dense table (one row per alive node, least utilised
//! first, rows filled lazily as nodes are visited), places bundles greedily against that
//! table, and so never puts more on a node than it has free across all the group's
//! bundles. If the group does not fit now it solves again against the nodes' totals, to tell
//! `Wait` (it would fit an idle cluster) from `Infeasible`.
//!
//! - `StrictPack`: every bundle on one node, the most utilised node that holds their sum
//!   (best fit, keeping emptier nodes whole for bigger work).
//! - `Pack`: one node if any holds them all; else biggest bundles first, each onto a node
//!   the group already uses if it fits, else onto the least utilised node that holds it.
//! - `StrictSpread`: every bundle on a different node; biggest bundles first, each onto the
//!   next unused node (least utilised first) that holds it.
//! - `Spread`: bundles in order onto distinct nodes while any unused node holds them, then
//!   round-robin over the nodes already used.
//!
//! With [`NodeOrder::Cheapest`] (a tenant's `cheapest_first`) the nodes are visited by
//! their price per GPU-hour, cheapest first (least utilised first among equal prices), for
//! a group that asks for GPUs: `StrictPack` takes the cheapest node that holds it all;
//! `Pack` fills the cheapest nodes first, each before the next is opened (so two cheap
//! nodes are preferred to one dear node that would hold it all); the spreads open the
//! cheapest nodes first. The topology a strict strategy promises comes first; the price
//! decides among the placements that keep it. A node that names no price (an operator's
//! own, or a laptop's declared GPUs) counts as free, so it comes first, as in quotes.
//!
//! The greedy passes are best effort: for `Pack`, `Spread` and `StrictSpread` an exact
//! search might find a placement where they report `Wait` or `Infeasible`.

use std::fmt;

use ionet_common::resources::{CPU, GPU, GPU_MEMORY, MEMORY};
use ionet_common::{NodeId, ResourceSet};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterView;
use crate::demand::split_accelerator;
use crate::node::NodeView;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlacementStrategy {
    Pack,
    Spread,
    StrictPack,
    StrictSpread,
}

impl fmt::Display for PlacementStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementStrategy::Pack => "PACK",
            PlacementStrategy::Spread => "SPREAD",
            PlacementStrategy::StrictPack => "STRICT_PACK",
            PlacementStrategy::StrictSpread => "STRICT_SPREAD",
        })
    }
}

/// Which nodes the solver tries first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeOrder {
    /// Least utilised first (`StrictPack`: the most utilised that fits, best fit).
    #[default]
    Utilisation,
    /// Cheapest per GPU-hour first, for a group that asks for GPUs.
    Cheapest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementDecision {
    /// The node of each bundle, in bundle order.
    Placed(Vec<NodeId>),
    /// It does not fit now but would fit the alive nodes when idle.
    Wait { reason: String },
    /// It does not fit the alive nodes even when idle.
    Infeasible { reason: String },
}

/// Decides where each bundle goes. Bundles may carry an `accelerator_type:<model>` entry,
/// which constrains the node rather than consuming anything.
pub fn solve_placement_group(
    view: &ClusterView,
    bundles: &[ResourceSet],
    strategy: PlacementStrategy,
) -> PlacementDecision {
    solve_placement_group_ordered(view, bundles, strategy, NodeOrder::Utilisation)
}

/// [`solve_placement_group`], trying nodes in `order`.
pub fn solve_placement_group_ordered(
    view: &ClusterView,
    bundles: &[ResourceSet],
    strategy: PlacementStrategy,
    order: NodeOrder,
) -> PlacementDecision {
    if bundles.is_empty() {
        return PlacementDecision::Infeasible { reason: "a placement group needs at least one bundle".to_string() };
    }
    let problem = Problem::new(view, bundles, order);
    if problem.nodes.is_empty() {
        return PlacementDecision::Infeasible {
            reason: format!("{strategy} placement group of {} bundles: the cluster has no alive nodes", bundles.len()),
        };
    }
    if let Some(placement) = problem.solve(strategy, Capacity::Available) {
        return PlacementDecision::Placed(placement.into_iter().map(|node| problem.nodes[node].node_id).collect());
    }
    if problem.solve(strategy, Capacity::Total).is_some() {
        return PlacementDecision::Wait {
            reason: format!(
                "{strategy} placement group of {} bundles does not fit the free resources now; \
                 it would fit when busy nodes free up",
                bundles.len()
            ),
        };
    }
    PlacementDecision::Infeasible { reason: problem.explain_infeasible(view, strategy) }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capacity {
    Available,
    Total,
}

struct Problem<'a> {
    /// The resource names the bundles consume, biggest-first order: GPU, CPU, memories, rest.
    names: Vec<String>,
    /// `needs[b * k + j]`: units of `names[j]` bundle `b` needs.
    needs: Vec<i64>,
    accelerators: Vec<Option<String>>,
    bundles: Vec<ResourceSet>,
    /// Alive nodes, least utilised first (or cheapest first: `order`).
    nodes: Vec<&'a NodeView>,
    order: NodeOrder,
}

/// Remaining capacity per node, loaded from the view the first time a node is looked at.
struct Table<'p, 'a> {
    problem: &'p Problem<'a>,
    capacity: Capacity,
    cells: Vec<i64>,
    loaded: Vec<bool>,
}

impl Table<'_, '_> {
    fn row(&mut self, node: usize) -> &mut [i64] {
        let k = self.problem.names.len();
        if !self.loaded[node] {
            let view = self.problem.nodes[node];
            let set = match self.capacity {
                Capacity::Available => &view.available,
                Capacity::Total => &view.total,
            };
            for (j, name) in self.problem.names.iter().enumerate() {
                self.cells[node * k + j] = set.get(name).units();
            }
            self.loaded[node] = true;
        }
        &mut self.cells[node * k..(node + 1) * k]
    }

    fn fits(&mut self, node: usize, need: &[i64], accelerator: Option<&str>) -> bool {
        if accelerator.is_some_and(|model| self.problem.nodes[node].accelerator() != Some(model)) {
            return false;
        }
        let row = self.row(node);
        row.iter().zip(need).all(|(have, need)| have >= need)
    }

    fn take(&mut self, node: usize, need: &[i64]) {
        let row = self.row(node);
        for (have, need) in row.iter_mut().zip(need) {
            *have -= need;
        }
    }
}

impl<'a> Problem<'a> {
    fn new(view: &'a ClusterView, bundles: &[ResourceSet], mut order: NodeOrder) -> Self {
        let mut accelerators = Vec::with_capacity(bundles.len());
        let mut consumed = Vec::with_capacity(bundles.len());
        for bundle in bundles {
            let (resources, accelerator) = split_accelerator(bundle.clone());
            consumed.push(resources);
            accelerators.push(accelerator);
        }
        let mut names: Vec<String> = Vec::new();
        for bundle in &consumed {
            for (name, _) in bundle.iter() {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
        let rank = |name: &str| match name {
            GPU => 0,
            CPU => 1,
            GPU_MEMORY => 2,
            MEMORY => 3,
            _ => 4,
        };
        names.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
        let needs = consumed.iter().flat_map(|bundle| names.iter().map(|name| bundle.get(name).units())).collect();
        // If every bundle wants the same model only that model's nodes are candidates.
        let common = accelerators
            .first()
            .cloned()
            .flatten()
            .filter(|first| accelerators.iter().all(|a| a.as_deref() == Some(first.as_str())));
        let mut nodes: Vec<&NodeView> = view.alive_nodes_of(common.as_deref()).collect();
        if !names.iter().any(|name| name == GPU) {
            order = NodeOrder::Utilisation; // Prices are per GPU-hour: nothing to compare.
        }
        if order == NodeOrder::Cheapest {
            // Stable: among equal prices, least utilised first still.
            nodes.sort_by_key(|node| node.price_per_gpu_hour);
        }
        Self { names, needs, accelerators, bundles: consumed, nodes, order }
    }

    fn need(&self, bundle: usize) -> &[i64] {
        let k = self.names.len();
        &self.needs[bundle * k..(bundle + 1) * k]
    }

    fn table(&self, capacity: Capacity) -> Table<'_, 'a> {
        let k = self.names.len();
        Table { problem: self, capacity, cells: vec![0; self.nodes.len() * k], loaded: vec![false; self.nodes.len()] }
    }

    /// Bundle indices, biggest first (by GPU, then CPU, ...), ties in bundle order.
    fn biggest_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.bundles.len()).collect();
        order.sort_by(|a, b| self.need(*b).cmp(self.need(*a)).then(a.cmp(b)));
        order
    }

    fn solve(&self, strategy: PlacementStrategy, capacity: Capacity) -> Option<Vec<usize>> {
        let mut table = self.table(capacity);
        match strategy {
            PlacementStrategy::StrictPack => self.strict_pack(&mut table),
            // Cheapest first, a pack fills the cheapest nodes before opening dearer ones
            // (one dear node that holds it all is not preferred to two cheap ones).
            PlacementStrategy::Pack if self.order == NodeOrder::Cheapest => self.pack(&mut table),
            PlacementStrategy::Pack => self.strict_pack(&mut table).or_else(|| self.pack(&mut self.table(capacity))),
            PlacementStrategy::StrictSpread => self.spread(&mut table, true),
            PlacementStrategy::Spread => self.spread(&mut table, false),
        }
    }

    fn common_accelerator(&self) -> Result<Option<&str>, ()> {
        let mut common: Option<&str> = None;
        for model in self.accelerators.iter().flatten() {
            match common {
                Some(seen) if seen != model => return Err(()),
                _ => common = Some(model),
            }
        }
        Ok(common)
    }

    fn strict_pack(&self, table: &mut Table) -> Option<Vec<usize>> {
        let accelerator = self.common_accelerator().ok()?;
        let k = self.names.len();
        let mut sum = vec![0i64; k];
        for bundle in 0..self.bundles.len() {
            for (total, need) in sum.iter_mut().zip(self.need(bundle)) {
                *total += need;
            }
        }
        // Best fit: the most utilised node that holds everything (cheapest first: the
        // most utilised of the cheapest that hold it).
        let node = match self.order {
            NodeOrder::Utilisation => (0..self.nodes.len()).rev().find(|node| table.fits(*node, &sum, accelerator))?,
            NodeOrder::Cheapest => {
                let first = (0..self.nodes.len()).find(|node| table.fits(*node, &sum, accelerator))?;
                let price = self.nodes[first].price_per_gpu_hour;
                let mut best = first;
                for node in first + 1..self.nodes.len() {
                    if self.nodes[node].price_per_gpu_hour != price {
                        break;
                    }
                    if table.fits(node, &sum, accelerator) {
                        best = node;
                    }
                }
                best
            }
        };
        Some(vec![node; self.bundles.len()])
    }

    fn pack(&self, table: &mut Table) -> Option<Vec<usize>> {
        let mut placement = vec![usize::MAX; self.bundles.len()];
        let mut opened: Vec<usize> = Vec::new();
        let mut is_open = vec![false; self.nodes.len()];
        // Nodes before this position are all open or were too small for an earlier (bigger
        // or equal) bundle, which does not mean they are too small now: so only skip opened.
        for bundle in self.biggest_first() {
            let need = self.need(bundle);
            let accelerator = self.accelerators[bundle].as_deref();
            let node = opened.iter().copied().find(|node| table.fits(*node, need, accelerator)).or_else(|| {
                let node =
                    (0..self.nodes.len()).find(|node| !is_open[*node] && table.fits(*node, need, accelerator))?;
                opened.push(node);
                is_open[node] = true;
                Some(node)
            })?;
            table.take(node, need);
            placement[bundle] = node;
        }
        Some(placement)
    }

    fn spread(&self, table: &mut Table, strict: bool) -> Option<Vec<usize>> {
        let n = self.nodes.len();
        if strict && self.bundles.len() > n {
            return None;
        }
        let order: Vec<usize> = if strict { self.biggest_first() } else { (0..self.bundles.len()).collect() };
        let mut placement = vec![usize::MAX; self.bundles.len()];
        let mut used = vec![false; n];
        let mut used_list: Vec<usize> = Vec::new();
        let mut cursor = 0;
        let mut reuse_cursor = 0;
        for bundle in order {
            let need = self.need(bundle);
            let accelerator = self.accelerators[bundle].as_deref();
            let mut chosen = None;
            if used_list.len() < n {
                for step in 0..n {
                    let node = (cursor + step) % n;
                    if !used[node] && table.fits(node, need, accelerator) {
                        chosen = Some(node);
                        cursor = node + 1;
                        used[node] = true;
                        used_list.push(node);
                        break;
                    }
                }
            }
            if chosen.is_none() && !strict {
                let m = used_list.len();
                for step in 0..m {
                    let node = used_list[(reuse_cursor + step) % m];
                    if table.fits(node, need, accelerator) {
                        chosen = Some(node);
                        reuse_cursor = (reuse_cursor + step + 1) % m;
                        break;
                    }
                }
            }
            let node = chosen?;
            table.take(node, need);
            placement[bundle] = node;
        }
        Some(placement)
    }

    fn explain_infeasible(&self, view: &ClusterView, strategy: PlacementStrategy) -> String {
        let count = self.bundles.len();
        let head = format!("{strategy} placement group of {count} bundles can never be placed");
        if strategy == PlacementStrategy::StrictSpread && count > self.nodes.len() {
            return format!("{head}: it needs {count} distinct nodes but only {} alive nodes match", self.nodes.len());
        }
        let mut table = self.table(Capacity::Total);
        for bundle in 0..count {
            let need = self.need(bundle);
            let accelerator = self.accelerators[bundle].as_deref();
            if !(0..self.nodes.len()).any(|node| table.fits(node, need, accelerator)) {
                let model = accelerator.map(|m| format!(" on {m}")).unwrap_or_default();
                return format!(
                    "{head}: bundle {bundle} {}{model} fits no alive node; {}",
                    self.bundles[bundle],
                    view.largest_nodes_summary()
                );
            }
        }
        if strategy == PlacementStrategy::StrictPack {
            let mut sum = ResourceSet::new();
            for bundle in &self.bundles {
                sum.add(bundle);
            }
            if self.common_accelerator().is_err() {
                return format!("{head}: its bundles ask for different accelerator models");
            }
            return format!(
                "{head}: together the bundles need {sum}, more than any one alive node has; {}",
                view.largest_nodes_summary()
            );
        }
        format!("{head}: together the bundles need more than the alive nodes have; {}", view.largest_nodes_summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::NodeState;

    fn four_gpu_nodes(count: u32) -> ClusterView {
        view((1..=count).map(|n| gpu_node(n, 16, "A100-80GB", 4, 190)).collect())
    }

    fn placed(decision: PlacementDecision) -> Vec<NodeId> {
        match decision {
            PlacementDecision::Placed(nodes) => nodes,
            other => panic!("expected a placement, got {other:?}"),
        }
    }

    fn distinct(nodes: &[NodeId]) -> usize {
        let mut nodes = nodes.to_vec();
        nodes.sort();
        nodes.dedup();
        nodes.len()
    }

    #[test]
    fn cheapest_first_keeps_the_strategy_and_takes_the_cheapest_gpus() {
        // Node 1 at $3.00, node 2 at $0.50, node 3 at $1.20 per GPU-hour, 4 GPUs each.
        let view = view(vec![
            gpu_node(1, 16, "A100-80GB", 4, 300),
            gpu_node(2, 16, "A100-80GB", 4, 50),
            gpu_node(3, 16, "A100-80GB", 4, 120),
        ]);
        let cheapest = |bundles: &[ResourceSet], strategy| {
            placed(solve_placement_group_ordered(&view, bundles, strategy, NodeOrder::Cheapest))
        };
        assert_eq!(cheapest(&[gpus(2, "2"), gpus(2, "2")], PlacementStrategy::StrictPack), vec![id(2); 2]);
        assert_eq!(cheapest(&vec![gpus(2, "2"); 3], PlacementStrategy::Pack), vec![id(2), id(2), id(3)]);
        assert_eq!(cheapest(&vec![gpus(2, "1"); 2], PlacementStrategy::StrictSpread), vec![id(2), id(3)]);
        assert_eq!(cheapest(&vec![gpus(2, "1"); 3], PlacementStrategy::Spread), vec![id(2), id(3), id(1)]);
        // A pack fills the cheapest node before the next, rather than taking one dear
        // node that holds it all.
        let small_cheap =
            crate::testing::view(vec![gpu_node(1, 16, "A100-80GB", 4, 120), gpu_node(2, 16, "RTX4090", 2, 35)]);
        let four = vec![gpus(1, "1"); 4];
        let packed =
            placed(solve_placement_group_ordered(&small_cheap, &four, PlacementStrategy::Pack, NodeOrder::Cheapest));
        assert_eq!(packed, vec![id(2), id(2), id(1), id(1)]);
        assert_eq!(placed(solve_placement_group(&small_cheap, &four, PlacementStrategy::Pack)), vec![id(1); 4]);
        // Among equal prices a strict pack is a best fit still: the most utilised.
        let mut equal =
            crate::testing::view(vec![gpu_node(1, 16, "A100-80GB", 4, 50), gpu_node(2, 16, "A100-80GB", 4, 50)]);
        equal.allocate(&id(1), &gpus(0, "1")).unwrap();
        let two = vec![gpus(1, "1"); 2];
        let packed =
            placed(solve_placement_group_ordered(&equal, &two, PlacementStrategy::StrictPack, NodeOrder::Cheapest));
        assert_eq!(packed, vec![id(1); 2]);
        // Without it the same strict pack goes by utilisation (the most utilised, then highest id).
        let default =
            placed(solve_placement_group(&view, &[gpus(2, "2"), gpus(2, "2")], PlacementStrategy::StrictPack));
        assert_eq!(default, vec![id(3); 2]);
        // A group asking no GPU has no price to compare: the usual order.
        let cpus = [gpus(4, "0")];
        assert_eq!(
            placed(solve_placement_group_ordered(&view, &cpus, PlacementStrategy::StrictPack, NodeOrder::Cheapest)),
            placed(solve_placement_group(&view, &cpus, PlacementStrategy::StrictPack))
        );
    }

    #[test]
    fn strict_pack_puts_everything_on_one_node() {
        let mut view = four_gpu_nodes(3);
        view.allocate(&id(2), &gpus(0, "1")).unwrap();
        let bundles = vec![gpus(2, "1"); 3];
        let nodes = placed(solve_placement_group(&view, &bundles, PlacementStrategy::StrictPack));
        assert_eq!(nodes, vec![id(2); 3], "best fit: the most utilised node that holds all");
        let four = vec![gpus(2, "1"); 4];
        assert_eq!(
            placed(solve_placement_group(&view, &four, PlacementStrategy::StrictPack)),
            vec![id(3); 4],
            "equally utilised: the scan from the most utilised end meets the highest id first"
        );
        view.allocate(&id(1), &gpus(0, "1")).unwrap();
        view.allocate(&id(3), &gpus(0, "1")).unwrap();
        assert!(matches!(
            solve_placement_group(&view, &four, PlacementStrategy::StrictPack),
            PlacementDecision::Wait { .. }
        ));
        let five = vec![gpus(2, "1"); 5];
        let PlacementDecision::Infeasible { reason } =
            solve_placement_group(&view, &five, PlacementStrategy::StrictPack)
        else {
            panic!("5 GPUs never fit one 4-GPU node")
        };
        assert!(reason.contains("more than any one alive node has"), "{reason}");
    }

    #[test]
    fn pack_uses_as_few_nodes_as_it_can() {
        let view = four_gpu_nodes(4);
        let bundles = vec![gpus(1, "1"); 6];
        let nodes = placed(solve_placement_group(&view, &bundles, PlacementStrategy::Pack));
        assert_eq!(distinct(&nodes), 2);
        let fits_one = vec![gpus(1, "1"); 3];
        assert_eq!(distinct(&placed(solve_placement_group(&view, &fits_one, PlacementStrategy::Pack))), 1);
        let too_many = vec![gpus(1, "1"); 17];
        assert!(matches!(
            solve_placement_group(&view, &too_many, PlacementStrategy::Pack),
            PlacementDecision::Infeasible { .. }
        ));
    }

    #[test]
    fn spread_uses_distinct_nodes_then_reuses() {
        let view = four_gpu_nodes(3);
        let three = vec![gpus(1, "1"); 3];
        assert_eq!(distinct(&placed(solve_placement_group(&view, &three, PlacementStrategy::Spread))), 3);
        let five = vec![gpus(1, "1"); 5];
        let nodes = placed(solve_placement_group(&view, &five, PlacementStrategy::Spread));
        assert_eq!(distinct(&nodes), 3, "best effort: reuses nodes when bundles outnumber them");
    }

    #[test]
    fn strict_spread_needs_distinct_nodes() {
        let mut view = four_gpu_nodes(3);
        let three = vec![gpus(1, "1"); 3];
        assert_eq!(distinct(&placed(solve_placement_group(&view, &three, PlacementStrategy::StrictSpread))), 3);
        let four = vec![gpus(1, "1"); 4];
        let PlacementDecision::Infeasible { reason } =
            solve_placement_group(&view, &four, PlacementStrategy::StrictSpread)
        else {
            panic!("4 distinct nodes out of 3")
        };
        assert!(reason.contains("needs 4 distinct nodes"), "{reason}");
        // One node full: waits.
        view.allocate(&id(3), &gpus(16, "4")).unwrap();
        assert!(matches!(
            solve_placement_group(&view, &three, PlacementStrategy::StrictSpread),
            PlacementDecision::Wait { .. }
        ));
        // Dead nodes do not count.
        view.set_state(&id(3), NodeState::Dead).unwrap();
        assert!(matches!(
            solve_placement_group(&view, &three, PlacementStrategy::StrictSpread),
            PlacementDecision::Infeasible { .. }
        ));
    }

    #[test]
    fn bundles_never_overcommit_a_node_and_reserve_is_atomic() {
        let mut view = view(vec![gpu_node(1, 4, "T4", 2, 30), gpu_node(2, 4, "T4", 2, 30)]);
        let bundles = vec![gpus(2, "1"), gpus(2, "1"), gpus(2, "1")];
        let nodes = placed(solve_placement_group(&view, &bundles, PlacementStrategy::Pack));
        view.reserve_bundles(&bundles, &nodes).unwrap();
        // The fourth bundle's node is the one left with room; a wrong plan is refused whole.
        let before = view.clone().node(&id(1)).unwrap().available.clone();
        let bad = vec![gpus(1, "1"), gpus(1, "1")];
        assert!(view.reserve_bundles(&bad, &[id(1), id(1)]).is_err());
        assert_eq!(view.node(&id(1)).unwrap().available, before);
    }

    #[test]
    fn accelerator_bundles_and_infeasible_reasons() {
        let view = view(vec![gpu_node(1, 8, "T4", 2, 30), gpu_node(2, 8, "H100", 8, 250)]);
        let h100 = gpus(1, "1").with("accelerator_type:H100", q("0.001"));
        let nodes = placed(solve_placement_group(&view, &vec![h100.clone(); 3], PlacementStrategy::Spread));
        assert_eq!(nodes, vec![id(2); 3]);
        let big = vec![gpus(1, "16")];
        let PlacementDecision::Infeasible { reason } = solve_placement_group(&view, &big, PlacementStrategy::Pack)
        else {
            panic!()
        };
        assert!(reason.contains("bundle 0 {CPU: 1, GPU: 16} fits no alive node"), "{reason}");
        assert!(matches!(
            solve_placement_group(&view, &[], PlacementStrategy::Pack),
            PlacementDecision::Infeasible { .. }
        ));
    }
}
