//! The node daemon's view of the cluster, for spillback decisions: the control store's
//! node table turned into the scheduler's model.

use ionet::rpc::proto::common::{NodeInfo, NodeState as WireState};
use ionet::{IonetResult, NodeId};
use ionet_scheduler::node::{Gpu, NodeState, NodeView};

/// The scheduler's view of one node as the control store reports it.
pub fn node_view(node: &NodeInfo) -> IonetResult<NodeView> {
    let node_id = NodeId::from_bytes(&node.node_id)?;
    let total = node.total.clone().unwrap_or_default().to_set()?;
    let mut view = NodeView::new(node_id, total);
    view.available = node.available.clone().unwrap_or_default().to_set()?;
    view.gpus = node
        .gpus
        .iter()
        .map(|gpu| Gpu { index: gpu.index, model: gpu.model.clone(), memory_bytes: gpu.memory_bytes })
        .collect();
    view.accelerator_type = (!node.accelerator_type.is_empty()).then(|| node.accelerator_type.clone());
    view.labels = node.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
    view.price_per_gpu_hour = node.price_per_gpu_hour_micros;
    view.state = match WireState::try_from(node.state).unwrap_or(WireState::Unspecified) {
        WireState::Alive => NodeState::Alive,
        WireState::Draining => NodeState::Draining,
        WireState::Dead | WireState::Unspecified => NodeState::Dead,
    };
    Ok(view)
}
