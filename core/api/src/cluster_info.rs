//! What the public API reports about the cluster, in domain types rather than wire
//! messages: a [`Node`] of [`nodes`](crate::nodes), a [`PlacementGroupInfo`] of
//! [`placement_group_info`](crate::placement_group_info), an [`ActorInfo`] of
//! [`ActorHandle::info`](crate::ActorHandle::info). Converting a wire row checks it
//! once (ids of the right length, resources that parse), so a caller never meets raw
//! bytes or an enum stored as a number.

use std::collections::BTreeMap;

use ionet_common::resources::{MicroUsd, ResourceSet};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState as WireNodeState};
use ionet_common::rpc::proto::gcs::{ActorInfo as WireActorInfo, ActorState as WireActorState};
use ionet_common::rpc::proto::gcs::{GetPlacementGroupReply, PlacementGroupState as WireGroupState};
use ionet_common::{ActorId, IonetError, IonetResult, NodeId, PlacementGroupId};

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

/// How a group's bundles are laid over nodes (Ray's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlacementStrategy {
    /// As few nodes as possible (best effort).
    #[default]
    Pack,
    /// Over as many nodes as possible (best effort).
    Spread,
    /// All bundles on one node.
    StrictPack,
    /// Every bundle on a different node.
    StrictSpread,
}

/// A handle to a placement group in the control store (cheap to clone). What it does
/// (wait, ready, remove, ...) is in `placement_group`; the type lives here, with the other
/// domain types, so that options can name it without depending on the I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementGroup {
    pub(crate) id: PlacementGroupId,
    pub(crate) bundle_count: usize,
}

impl PlacementGroup {
    pub fn id(&self) -> PlacementGroupId {
        self.id
    }

    pub fn bundle_count(&self) -> usize {
        self.bundle_count
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

/// Where an actor is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorState {
    /// Waiting for a worker (room, or its placement group).
    PendingCreation,
    Alive,
    /// Its worker died; a new incarnation is being placed.
    Restarting,
    Dead,
}

/// One actor as the control store records it.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorInfo {
    pub id: ActorId,
    pub class_name: String,
    /// Empty: unnamed.
    pub name: String,
    pub namespace: String,
    pub state: ActorState,
    /// 0 for the first creation, +1 per restart.
    pub incarnation: u32,
    pub restarts: u32,
    /// Its node while alive.
    pub node_id: Option<NodeId>,
    /// Its worker's address while alive.
    pub address: String,
    pub gpu_ids: Vec<u32>,
    /// Why it is dead, or why its last incarnation ended.
    pub death_cause: String,
}

impl TryFrom<WireActorInfo> for ActorInfo {
    type Error = IonetError;

    fn try_from(info: WireActorInfo) -> IonetResult<Self> {
        let spec = info.spec.unwrap_or_default();
        let state = match WireActorState::try_from(info.state) {
            Ok(WireActorState::PendingCreation) => ActorState::PendingCreation,
            Ok(WireActorState::Alive) => ActorState::Alive,
            Ok(WireActorState::Restarting) => ActorState::Restarting,
            Ok(WireActorState::Dead) => ActorState::Dead,
            _ => return Err(IonetError::Internal(format!("actor row with unknown state {}", info.state))),
        };
        Ok(ActorInfo {
            id: ActorId::from_bytes(&spec.actor_id)?,
            class_name: spec.class_name,
            name: spec.name,
            namespace: spec.namespace,
            state,
            incarnation: info.incarnation,
            restarts: info.restarts,
            node_id: (!info.node_id.is_empty()).then(|| NodeId::from_bytes(&info.node_id)).transpose()?,
            address: info.address,
            gpu_ids: info.gpu_ids,
            death_cause: info.death_cause,
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
