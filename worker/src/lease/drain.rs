//! Notice to leave: a draining node takes no new leases (requests it could spill go to
//! another node; the others are told to ask elsewhere), stops its actors' workers at once
//! (the control store restarts restartable actors on other nodes, this one being marked
//! draining), and lets its running tasks finish until the deadline the daemon keeps.

use std::sync::atomic::Ordering;

use ionet_common::resources::ResourceSet;
use ionet_common::NodeId;
use ionet_scheduler::SchedulingStrategy;

use super::Leases;

impl Leases {
    /// From now on no lease is granted here.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops the workers of the leases the control store holds (actors, outside
    /// bundles), now; returns how many.
    pub fn stop_actor_workers(&self) -> usize {
        let state = self.lock();
        let pids: Vec<u32> = state
            .leases
            .values()
            .filter(|granted| granted.holder.is_empty() && granted.bundle.is_none())
            .filter_map(|granted| state.processes.get(&granted.worker).map(|process| process.pid))
            .collect();
        drop(state);
        for pid in &pids {
            self.kill(*pid);
        }
        pids.len()
    }

    /// Leases held by drivers and workers (tasks) still running here.
    pub fn task_leases(&self) -> usize {
        self.lock().leases.values().filter(|granted| !granted.holder.is_empty()).count()
    }

    /// Another alive node that could take `demand`, preferring one with room now: never
    /// one the requester could not reach (`avoid`), and only the pinned node for a hard
    /// affinity (none when it is pinned here: its requester waits for this node to go).
    pub(super) fn elsewhere(
        &self,
        demand: &ResourceSet,
        strategy: &SchedulingStrategy,
        needs: &super::Needs,
        avoid: &[NodeId],
    ) -> Option<(NodeId, String)> {
        let pinned = match strategy {
            SchedulingStrategy::NodeAffinity { node_id, soft: false } => Some(*node_id),
            _ => None,
        };
        let state = self.lock();
        let candidates: Vec<_> = state
            .view
            .nodes()
            .filter(|node| node.node_id != self.node_id && node.state == ionet_scheduler::NodeState::Alive)
            .filter(|node| !avoid.contains(&node.node_id) && pinned.is_none_or(|pinned| pinned == node.node_id))
            .filter(|node| node.total.contains(demand) && needs.admits(node))
            .collect();
        let target = candidates
            .iter()
            .find(|node| node.available.contains(demand))
            .or_else(|| candidates.first())
            .map(|node| node.node_id)?;
        drop(state);
        self.address_of(&target).map(|address| (target, address))
    }
}
