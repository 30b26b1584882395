//! Builders shared by the unit tests.

use ionet_common::resources::{CPU, GPU, MEMORY};
use ionet_common::{NodeId, Quantity, ResourceSet};

use crate::cluster::ClusterView;
use crate::node::NodeView;

/// A cluster view of these nodes.
pub(crate) fn view(nodes: Vec<NodeView>) -> ClusterView {
    let mut view = ClusterView::new();
    for node in nodes {
        view.upsert_node(node).unwrap();
    }
    view
}

pub(crate) const GIB: u64 = 1 << 30;

/// A node id whose order follows `n`.
pub(crate) fn id(n: u32) -> NodeId {
    let mut bytes = [0u8; NodeId::LEN];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    NodeId::from_array(bytes)
}

pub(crate) fn q(text: &str) -> Quantity {
    text.parse().unwrap()
}

pub(crate) fn cpus(n: i64) -> ResourceSet {
    ResourceSet::new().with(CPU, Quantity::whole(n))
}

pub(crate) fn gpus(cpu: i64, gpu: &str) -> ResourceSet {
    ResourceSet::new().with(CPU, Quantity::whole(cpu)).with(GPU, q(gpu))
}

/// A node with `cpu` CPUs, 64 GiB of memory and `gpu_count` GPUs of `model`.
pub(crate) fn gpu_node(n: u32, cpu: i64, model: &str, gpu_count: u32, price_usd_cents: u64) -> NodeView {
    let total = ResourceSet::new().with(CPU, Quantity::whole(cpu)).with(MEMORY, Quantity::whole(64 * GIB as i64));
    let memory = if model.contains("80GB") || model == "H100" { 80 } else { 24 };
    let mut node = NodeView::new(id(n), total);
    if gpu_count > 0 {
        node = node.with_gpus(model, gpu_count, memory * GIB);
    }
    node.with_price(price_usd_cents * 10_000)
}

pub(crate) fn cpu_node(n: u32, cpu: i64) -> NodeView {
    NodeView::new(id(n), cpus(cpu))
}
