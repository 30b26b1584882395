//! Scheduling policies: from (cluster view, demand, strategy, local node) to a decision.

use std::fmt;

use ionet_common::resources::{CPU, GPU, MEMORY};
use ionet_common::NodeId;
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterView, Order};
use crate::demand::Demand;
use crate::node::NodeState;

/// How to choose among the nodes that can take a demand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulingStrategy {
    /// Hybrid: the local node while its utilisation is below the view's threshold
    /// ([`ClusterView::with_hybrid_threshold`], 0.5 by default), else the least utilised
    /// feasible node.
    Default,
    /// The nodes that fit now taken in turn (round robin by node id, as Ray's), local or
    /// not: what uses nothing while it runs (an actor) still goes round the nodes.
    Spread,
    /// That node. Hard: wait for it (or infeasible if it can never fit or is gone). Soft:
    /// that node if it has room now, else as `Default`.
    NodeAffinity { node_id: NodeId, soft: bool },
    /// The cheapest feasible node by price per GPU-hour; ties by utilisation, then node id.
    Cost,
    /// The cheapest feasible node by price per TFLOP-hour: its price per GPU-hour over its
    /// GPUs' FP32 TFLOPS as the head measured them (published figures for simulated ones),
    /// so a slower GPU that is cheaper for the work it does comes first; nodes of unknown
    /// speed last; ties by utilisation, then node id.
    CostPerTflop,
}

/// The answer for one demand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Run it there.
    Place(NodeId),
    /// No node has room now, but some alive node could take it when free: retry later.
    Wait { reason: String },
    /// No alive node can ever take it: final until the cluster changes.
    Infeasible { reason: String },
}

impl Decision {
    pub fn node(&self) -> Option<NodeId> {
        match self {
            Decision::Place(node) => Some(*node),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Place(node) => write!(f, "place on node {}", node.short()),
            Decision::Wait { reason } => write!(f, "wait: {reason}"),
            Decision::Infeasible { reason } => write!(f, "infeasible: {reason}"),
        }
    }
}

impl ClusterView {
    /// Decides where `demand` runs. `local_node` is the node asking (the hybrid policy's
    /// preference); `None` when the control store decides.
    pub fn schedule(&self, demand: &Demand, strategy: &SchedulingStrategy, local_node: Option<&NodeId>) -> Decision {
        match strategy {
            SchedulingStrategy::Default => self.schedule_hybrid(demand, local_node),
            SchedulingStrategy::Spread => match self.spread_pick(demand) {
                Some(slot) => Decision::Place(self.entry(slot).view.node_id),
                None => self.diagnose(demand),
            },
            SchedulingStrategy::Cost => self.place_or_diagnose(demand, Order::Cheapest),
            // A demand for no GPU has no TFLOPS to pay for: the cheapest node.
            SchedulingStrategy::CostPerTflop if demand.gpus().is_zero() => {
                self.place_or_diagnose(demand, Order::Cheapest)
            }
            SchedulingStrategy::CostPerTflop => self.place_or_diagnose(demand, Order::CheapestPerTflop),
            SchedulingStrategy::NodeAffinity { node_id, soft } => {
                self.schedule_affinity(demand, node_id, *soft, local_node)
            }
        }
    }

    fn schedule_hybrid(&self, demand: &Demand, local_node: Option<&NodeId>) -> Decision {
        if let Some(slot) = local_node.and_then(|id| self.slot_of(id)) {
            let local = &self.entry(slot).view;
            if self.utilisation_of(slot) < self.hybrid_threshold_ppm() && demand.fits_now(local) {
                return Decision::Place(local.node_id);
            }
        }
        self.place_or_diagnose(demand, Order::LeastUtilised)
    }

    fn schedule_affinity(
        &self,
        demand: &Demand,
        node_id: &NodeId,
        soft: bool,
        local_node: Option<&NodeId>,
    ) -> Decision {
        let node = self.node(node_id);
        if node.is_some_and(|node| demand.fits_now(node)) {
            return Decision::Place(*node_id);
        }
        if soft {
            return self.schedule_hybrid(demand, local_node);
        }
        let short = node_id.short();
        match node {
            None => Decision::Infeasible {
                reason: format!("{demand} is pinned to node {short}, which is not in the cluster"),
            },
            Some(node) if node.state != NodeState::Alive => Decision::Infeasible {
                reason: format!(
                    "{demand} is pinned to node {short}, which is {}",
                    match node.state {
                        NodeState::Draining => "draining",
                        _ => "dead",
                    }
                ),
            },
            Some(node) if !demand.fits_when_idle(node) => Decision::Infeasible {
                reason: format!(
                    "{demand} is pinned to node {short}, which can never fit it: it has {} in total",
                    describe_node(node)
                ),
            },
            Some(node) => Decision::Wait {
                reason: format!("{demand} is pinned to node {short}, which has only {} free now", node.available),
            },
        }
    }

    fn place_or_diagnose(&self, demand: &Demand, order: Order) -> Decision {
        match self.best_feasible(demand, order, None) {
            Some(slot) => Decision::Place(self.entry(slot).view.node_id),
            None => self.diagnose(demand),
        }
    }

    /// Why nothing can take `demand` now: `Wait` if an alive node could when idle.
    pub(crate) fn diagnose(&self, demand: &Demand) -> Decision {
        let could_fit =
            self.alive_nodes_of(demand.accelerator_type.as_deref()).find(|node| demand.fits_when_idle(node));
        if let Some(node) = could_fit {
            return Decision::Wait {
                reason: format!(
                    "no node has room for {demand} now; node {} (among others, perhaps) could take it when free",
                    node.node_id.short()
                ),
            };
        }
        Decision::Infeasible {
            reason: format!("no alive node can ever fit {demand}; {}", self.largest_nodes_summary()),
        }
    }

    /// "the largest alive nodes have ...": up to three distinct shapes, biggest first.
    pub(crate) fn largest_nodes_summary(&self) -> String {
        let mut shapes: Vec<String> = Vec::new();
        let mut nodes: Vec<_> = self.alive_nodes_by_utilisation().collect();
        if nodes.is_empty() {
            return "the cluster has no alive nodes".to_string();
        }
        nodes.sort_by(|a, b| {
            let size = |n: &crate::NodeView| (n.total.get(GPU), n.total.get(CPU), n.total.get(MEMORY));
            size(b).cmp(&size(a)).then(a.node_id.cmp(&b.node_id))
        });
        for node in nodes {
            let shape = describe_node(node);
            if !shapes.contains(&shape) {
                shapes.push(shape);
            }
            if shapes.len() == 3 {
                break;
            }
        }
        format!("the largest alive nodes have {}", shapes.join("; "))
    }
}

fn describe_node(node: &crate::NodeView) -> String {
    let mut text = node.total.to_string();
    if let Some(model) = node.accelerator() {
        text.push_str(&format!(" ({model}"));
        if let Some(bytes) = node.min_gpu_memory_bytes() {
            text.push_str(&format!(", {} GiB per GPU", bytes >> 30));
        }
        text.push(')');
    }
    if !node.labels.is_empty() {
        let labels: Vec<String> = node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        text.push_str(&format!(" [{}]", labels.join(", ")));
    }
    if node.reliability_bps < ionet_common::reliability::FULL {
        text.push_str(&format!(" reliability {}", ionet_common::reliability::format(node.reliability_bps)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::LabelSelector;

    fn place(view: &mut ClusterView, demand: &Demand, strategy: &SchedulingStrategy, local: Option<&NodeId>) -> NodeId {
        let decision = view.schedule(demand, strategy, local);
        let node = decision.node().unwrap_or_else(|| panic!("expected a placement, got {decision}"));
        view.allocate(&node, &demand.resources).unwrap();
        node
    }

    #[test]
    fn hybrid_prefers_local_until_threshold_then_least_utilised() {
        let mut view = view(vec![cpu_node(1, 4), cpu_node(2, 4), cpu_node(3, 4)]);
        let demand = Demand::new(cpus(1));
        let local = id(2);
        // Local at 0% and 25% utilisation: stays local.
        assert_eq!(place(&mut view, &demand, &SchedulingStrategy::Default, Some(&local)), local);
        assert_eq!(place(&mut view, &demand, &SchedulingStrategy::Default, Some(&local)), local);
        // Local at 50%: not below the threshold, so the least utilised (ties by id) node 1.
        assert_eq!(place(&mut view, &demand, &SchedulingStrategy::Default, Some(&local)), id(1));
        assert_eq!(place(&mut view, &demand, &SchedulingStrategy::Default, Some(&local)), id(3));
        // A higher threshold keeps more on the local node.
        let relaxed = view.clone().with_hybrid_threshold(0.9);
        assert_eq!(relaxed.schedule(&demand, &SchedulingStrategy::Default, Some(&local)), Decision::Place(local));
        // Without a local node: least utilised.
        assert_eq!(view.schedule(&demand, &SchedulingStrategy::Default, None), Decision::Place(id(1)));
    }

    #[test]
    fn a_minimum_reliability_passes_over_nodes_that_score_below_it_under_every_strategy() {
        let mut flaky = gpu_node(1, 8, "A100-80GB", 4, 50);
        flaky.reliability_bps = 7_000;
        let view = view(vec![flaky, gpu_node(2, 8, "A100-80GB", 4, 300)]);
        let demand = Demand::new(gpus(0, "1")).with_min_reliability_bps(9_000);
        for strategy in [SchedulingStrategy::Cost, SchedulingStrategy::Default, SchedulingStrategy::Spread] {
            assert_eq!(view.schedule(&demand, &strategy, Some(&id(1))), Decision::Place(id(2)), "{strategy:?}");
        }
        assert_eq!(view.schedule(&Demand::new(gpus(0, "1")), &SchedulingStrategy::Cost, None), Decision::Place(id(1)));
        let only_flaky = crate::testing::view(vec![view.node(&id(1)).unwrap().clone()]);
        let decision = only_flaky.schedule(&demand, &SchedulingStrategy::Cost, None);
        assert!(
            matches!(&decision, Decision::Infeasible { reason } if reason.contains("on nodes of reliability >= 0.90")),
            "{decision}"
        );
    }

    #[test]
    fn spread_goes_round_the_nodes_even_for_what_uses_nothing() {
        let view = view(vec![cpu_node(1, 4), cpu_node(2, 4), cpu_node(3, 4)]);
        let nothing = Demand::new(ionet_common::ResourceSet::new());
        let chosen: Vec<NodeId> =
            (0..4).map(|_| view.schedule(&nothing, &SchedulingStrategy::Spread, None).node().unwrap()).collect();
        assert_eq!(chosen, vec![id(1), id(2), id(3), id(1)]);
        // A view that replaces it (a refresh) goes on from there.
        let mut refreshed = crate::testing::view(vec![cpu_node(1, 4), cpu_node(2, 4), cpu_node(3, 4)]);
        assert_eq!(refreshed.schedule(&nothing, &SchedulingStrategy::Spread, None).node(), Some(id(1)), "a new view");
        let mut refreshed_again = crate::testing::view(vec![cpu_node(1, 4), cpu_node(2, 4), cpu_node(3, 4)]);
        refreshed_again.continue_spread_of(&view);
        refreshed = refreshed_again;
        assert_eq!(refreshed.schedule(&nothing, &SchedulingStrategy::Spread, None).node(), Some(id(2)));
    }

    #[test]
    fn spread_goes_round_the_nodes() {
        let mut view = view(vec![cpu_node(1, 4), cpu_node(2, 4), cpu_node(3, 4)]);
        let demand = Demand::new(cpus(1));
        let chosen: Vec<NodeId> =
            (0..6).map(|_| place(&mut view, &demand, &SchedulingStrategy::Spread, Some(&id(1)))).collect();
        assert_eq!(chosen, vec![id(1), id(2), id(3), id(1), id(2), id(3)]);
    }

    #[test]
    fn cost_picks_the_cheapest_then_least_utilised_then_lowest_id() {
        let mut view = view(vec![
            gpu_node(1, 32, "A100-80GB", 8, 190),
            gpu_node(2, 32, "RTX4090", 2, 40),
            gpu_node(3, 32, "RTX4090", 2, 40),
            gpu_node(4, 32, "H100", 8, 250),
        ]);
        let demand = Demand::new(gpus(1, "1"));
        let cost = SchedulingStrategy::Cost;
        assert_eq!(place(&mut view, &demand, &cost, None), id(2));
        assert_eq!(place(&mut view, &demand, &cost, None), id(3), "same price, less utilised");
        assert_eq!(place(&mut view, &demand, &cost, None), id(2));
        assert_eq!(place(&mut view, &demand, &cost, None), id(3));
        assert_eq!(place(&mut view, &demand, &cost, None), id(1), "4090s are full");
        let h100 = Demand::new(gpus(1, "1")).with_accelerator_type("H100");
        assert_eq!(view.schedule(&h100, &cost, None), Decision::Place(id(4)));
        let big_memory = Demand::new(gpus(1, "1")).with_min_gpu_memory_per_gpu(40 * GIB);
        assert_eq!(view.schedule(&big_memory, &cost, None), Decision::Place(id(1)));
        // A price change re-ranks the nodes.
        view.set_price(&id(4), 100 * 10_000).unwrap();
        assert_eq!(view.schedule(&big_memory, &cost, None), Decision::Place(id(4)));
    }

    #[test]
    fn node_affinity_hard_and_soft() {
        let mut view = view(vec![cpu_node(1, 4), cpu_node(2, 2)]);
        let demand = Demand::new(cpus(2));
        let hard = SchedulingStrategy::NodeAffinity { node_id: id(2), soft: false };
        let soft = SchedulingStrategy::NodeAffinity { node_id: id(2), soft: true };
        assert_eq!(view.schedule(&demand, &hard, None), Decision::Place(id(2)));
        view.allocate(&id(2), &cpus(1)).unwrap();
        assert!(matches!(view.schedule(&demand, &hard, None), Decision::Wait { .. }));
        assert_eq!(view.schedule(&demand, &soft, None), Decision::Place(id(1)));
        let too_big = Demand::new(cpus(3));
        let Decision::Infeasible { reason } = view.schedule(&too_big, &hard, None) else {
            panic!("a node that can never fit is infeasible for hard affinity");
        };
        assert!(reason.contains("can never fit"), "{reason}");
        view.set_state(&id(2), NodeState::Draining).unwrap();
        let Decision::Infeasible { reason } = view.schedule(&demand, &hard, None) else {
            panic!("draining node");
        };
        assert!(reason.contains("draining"), "{reason}");
        let gone = SchedulingStrategy::NodeAffinity { node_id: id(9), soft: false };
        assert!(matches!(view.schedule(&demand, &gone, None), Decision::Infeasible { .. }));
        let gone_soft = SchedulingStrategy::NodeAffinity { node_id: id(9), soft: true };
        assert_eq!(view.schedule(&demand, &gone_soft, None), Decision::Place(id(1)));
    }

    #[test]
    fn wait_when_busy_infeasible_when_never() {
        let mut view = view(vec![gpu_node(1, 16, "A100-80GB", 4, 190), cpu_node(2, 8)]);
        let four = Demand::new(gpus(1, "4"));
        for strategy in [SchedulingStrategy::Default, SchedulingStrategy::Spread, SchedulingStrategy::Cost] {
            assert_eq!(view.schedule(&four, &strategy, None), Decision::Place(id(1)));
        }
        view.allocate(&id(1), &gpus(0, "1")).unwrap();
        for strategy in [SchedulingStrategy::Default, SchedulingStrategy::Spread, SchedulingStrategy::Cost] {
            let decision = view.schedule(&four, &strategy, None);
            let Decision::Wait { reason } = decision else { panic!("{decision}") };
            assert!(reason.contains("no node has room"), "{reason}");
        }
        let eight = Demand::new(gpus(1, "8"));
        let Decision::Infeasible { reason } = view.schedule(&eight, &SchedulingStrategy::Default, None) else {
            panic!("8 GPUs never fit");
        };
        assert!(reason.contains("GPU: 8"), "names the demand: {reason}");
        assert!(reason.contains("the largest alive nodes have {CPU: 16, GPU: 4"), "{reason}");
        assert!(reason.contains("A100-80GB"), "{reason}");
        // Wrong model: infeasible. A dead node does not count.
        let h100 = Demand::new(gpus(1, "1")).with_accelerator_type("H100");
        assert!(matches!(view.schedule(&h100, &SchedulingStrategy::Default, None), Decision::Infeasible { .. }));
        view.set_state(&id(1), NodeState::Dead).unwrap();
        assert!(matches!(view.schedule(&four, &SchedulingStrategy::Default, None), Decision::Infeasible { .. }));
        view.set_state(&id(1), NodeState::Alive).unwrap();
        assert!(matches!(view.schedule(&four, &SchedulingStrategy::Default, None), Decision::Wait { .. }));
        let empty = ClusterView::new();
        let Decision::Infeasible { reason } = empty.schedule(&four, &SchedulingStrategy::Default, None) else {
            panic!()
        };
        assert!(reason.contains("no alive nodes"), "{reason}");
    }

    #[test]
    fn draining_and_dead_nodes_are_never_chosen() {
        let mut view = view(vec![cpu_node(1, 4), cpu_node(2, 64)]);
        view.set_state(&id(2), NodeState::Draining).unwrap();
        let demand = Demand::new(cpus(1));
        for strategy in [SchedulingStrategy::Default, SchedulingStrategy::Spread, SchedulingStrategy::Cost] {
            assert_eq!(view.schedule(&demand, &strategy, Some(&id(2))), Decision::Place(id(1)));
        }
        assert_eq!(view.alive_count(), 1);
        assert_eq!(view.len(), 2);
        assert!(view.remove_node(&id(2)).is_some());
        assert_eq!(view.len(), 1);
    }

    #[test]
    fn label_selectors_and_accelerator_resources_constrain() {
        let view = view(vec![
            gpu_node(1, 8, "RTX4090", 1, 40).with_label("region", "us").with_label("provider", "x"),
            gpu_node(2, 8, "RTX4090", 1, 50).with_label("region", "eu").with_label("provider", "y"),
            gpu_node(3, 8, "RTX4090", 1, 60).with_label("region", "ap"),
        ]);
        let cost = SchedulingStrategy::Cost;
        let decide = |selectors: &[&str]| {
            let demand = Demand::new(gpus(1, "1")).with_label_selectors(selectors).unwrap();
            view.schedule(&demand, &cost, None).node()
        };
        assert_eq!(decide(&[]), Some(id(1)));
        assert_eq!(decide(&["provider != x"]), Some(id(2)));
        assert_eq!(decide(&["region in (eu, ap)"]), Some(id(2)));
        assert_eq!(decide(&["region not in (us, eu)"]), Some(id(3)));
        assert_eq!(decide(&["region = ap", "provider != y"]), Some(id(3)));
        assert_eq!(decide(&["region = mars"]), None);
        assert!(Demand::new(cpus(1)).with_label_selectors(["region ~ eu"]).is_err());
        // `accelerator_type:<model>` in the resources is a constraint, not consumed.
        let demand = Demand::new(gpus(1, "0.5").with("accelerator_type:RTX4090", q("0.001")));
        assert_eq!(demand.accelerator_type.as_deref(), Some("RTX4090"));
        assert_eq!(demand.resources, gpus(1, "0.5"));
    }

    #[test]
    fn updates_keep_the_index_in_step() {
        let mut view = view(vec![cpu_node(1, 4), cpu_node(2, 4)]);
        let demand = Demand::new(cpus(3));
        view.update_available(&id(1), cpus(2)).unwrap();
        assert_eq!(view.schedule(&demand, &SchedulingStrategy::Spread, None), Decision::Place(id(2)));
        assert!(view.update_available(&id(1), cpus(5)).is_err(), "more than total");
        assert!(view.allocate(&id(1), &cpus(3)).is_err(), "only 2 free");
        assert!(view.release(&id(2), &cpus(1)).is_err(), "more than total");
        assert!(matches!(view.allocate(&id(7), &cpus(1)), Err(crate::SchedulerError::UnknownNode(_))));
        view.upsert_node(cpu_node(1, 16)).unwrap();
        assert_eq!(view.schedule(&Demand::new(cpus(8)), &SchedulingStrategy::Spread, None), Decision::Place(id(1)));
        let mut bad = cpu_node(3, 4);
        bad.available = cpus(8);
        assert!(view.upsert_node(bad).is_err());
        let _ = LabelSelector::parse("a = b").unwrap();
    }
}
