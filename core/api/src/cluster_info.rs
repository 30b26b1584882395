//! What the public API reports about the cluster, in domain types rather than wire
//! messages: a [`Node`] of [`nodes`](crate::nodes), a [`PlacementGroupInfo`] of
//! [`placement_group_info`](crate::placement_group_info). Converting a wire row checks it
//! once (ids of the right length, resources that parse), so a caller never meets raw
//! bytes or an enum stored as a number.

use std::collections::BTreeMap;

use ionet_common::resources::{MicroUsd, ResourceSet};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState as WireNodeState};
use ionet_common::rpc::proto::gcs::{GetPlacementGroupReply, PlacementGroupState as WireGroupState};
use ionet_common::{IonetError, IonetResult, NodeId, PlacementGroupId};

use crate::placement_group::PlacementStrategy;

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Alive,
    /// Finishing its work; takes no new leases.
    Draining,
    Dead,
}

/// A GPU a node declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
}

/// One node as the control store records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub node_id: NodeId,
    /// The node daemon's address (host:port).
    pub address: String,
    pub hostname: String,
    pub state: NodeState,
    pub is_head: bool,
    pub total: ResourceSet,
    /// As of its last heartbeat.
    pub available: ResourceSet,
    pub gpus: Vec<Gpu>,
    pub accelerator_type: String,
    pub labels: BTreeMap<String, String>,
    /// What its provider asks per GPU-hour and per CPU-hour.
    pub price_per_gpu_hour: MicroUsd,
    pub price_per_cpu_hour: MicroUsd,
    /// Why it died (empty while alive).
    pub death_cause: String,
    pub pid: u32,
}

impl Node {
    pub fn is_alive(&self) -> bool {
        self.state == NodeState::Alive
    }
}

impl TryFrom<NodeInfo> for Node {
    type Error = IonetError;

    fn try_from(info: NodeInfo) -> IonetResult<Self> {
        let state = match WireNodeState::try_from(info.state) {
            Ok(WireNodeState::Alive) => NodeState::Alive,
            Ok(WireNodeState::Draining) => NodeState::Draining,
            Ok(WireNodeState::Dead) => NodeState::Dead,
            _ => return Err(IonetError::Internal(format!("node row with unknown state {}", info.state))),
        };
        Ok(Node {
            node_id: NodeId::from_bytes(&info.node_id)?,
            state,
            is_head: info.is_head,
            total: info.total.unwrap_or_default().to_set()?,
            available: info.available.unwrap_or_default().to_set()?,
            gpus: info
                .gpus
                .into_iter()
                .map(|gpu| Gpu { index: gpu.index, model: gpu.model, memory_bytes: gpu.memory_bytes })
                .collect(),
            accelerator_type: info.accelerator_type,
            labels: info.labels.into_iter().collect(),
            price_per_gpu_hour: info.price_per_gpu_hour_micros,
            price_per_cpu_hour: info.price_per_cpu_hour_micros,
            death_cause: info.death_cause,
            pid: info.pid,
            address: info.address,
            hostname: info.hostname,
        })
    }
}

/// Where a placement group is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementGroupState {
    /// Waiting for room (see `pending_reason`).
    Pending,
    /// Every bundle reserved.
    Created,
    Removed,
}

/// One placement group as the control store records it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacementGroupInfo {
    pub id: PlacementGroupId,
    pub name: String,
    pub state: PlacementGroupState,
    pub strategy: PlacementStrategy,
    /// The bundles as created.
    pub bundles: Vec<ResourceSet>,
    /// Once created: the node of each bundle, in bundle order (empty before).
    pub bundle_nodes: Vec<NodeId>,
    /// Why it is still pending (the solver's or a node's answer).
    pub pending_reason: String,
}

impl TryFrom<GetPlacementGroupReply> for PlacementGroupInfo {
    type Error = IonetError;

    fn try_from(reply: GetPlacementGroupReply) -> IonetResult<Self> {
        use ionet_common::rpc::proto::gcs::PlacementStrategy as Wire;
        let state = match WireGroupState::try_from(reply.state) {
            Ok(WireGroupState::Created) => PlacementGroupState::Created,
            Ok(WireGroupState::Removed) => PlacementGroupState::Removed,
            _ => PlacementGroupState::Pending,
        };
        let strategy = match Wire::try_from(reply.strategy) {
            Ok(Wire::Spread) => PlacementStrategy::Spread,
            Ok(Wire::StrictPack) => PlacementStrategy::StrictPack,
            Ok(Wire::StrictSpread) => PlacementStrategy::StrictSpread,
            _ => PlacementStrategy::Pack,
        };
        Ok(PlacementGroupInfo {
            id: PlacementGroupId::from_bytes(&reply.placement_group_id)?,
            name: reply.name,
            state,
            strategy,
            bundles: reply.bundles.iter().map(|bundle| bundle.to_set()).collect::<IonetResult<_>>()?,
            bundle_nodes: reply.bundle_node_ids.iter().map(|id| NodeId::from_bytes(id)).collect::<IonetResult<_>>()?,
            pending_reason: reply.pending_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ionet_common::rpc::proto::common::ResourceQuantities;
    use ionet_common::Quantity;

    #[test]
    fn a_node_row_reads_as_domain_values() {
        let total = ResourceSet::new().with("CPU", Quantity::whole(8)).with("GPU", Quantity::whole(2));
        let node_id = NodeId::random();
        let info = NodeInfo {
            node_id: node_id.to_vec(),
            address: "10.0.0.2:4000".into(),
            state: WireNodeState::Draining as i32,
            total: Some(ResourceQuantities::from_set(&total)),
            price_per_gpu_hour_micros: 1_500_000,
            labels: [("region".to_string(), "eu".to_string())].into_iter().collect(),
            ..Default::default()
        };
        let node = Node::try_from(info).unwrap();
        assert_eq!((node.node_id, node.state, node.total.clone()), (node_id, NodeState::Draining, total));
        assert!(!node.is_alive());
        assert_eq!(node.price_per_gpu_hour, 1_500_000);
        assert_eq!(node.labels["region"], "eu");
        let short = NodeInfo { node_id: vec![1, 2], state: WireNodeState::Alive as i32, ..Default::default() };
        assert!(Node::try_from(short).is_err(), "a malformed id is refused, not passed on");
        let unknown = NodeInfo { node_id: node_id.to_vec(), state: 99, ..Default::default() };
        assert!(Node::try_from(unknown).is_err());
    }
}
