//! A synthetic heterogeneous cluster shared by the benches.

use ionet_common::resources::{CPU, GPU, MEMORY};
use ionet_common::{NodeId, Quantity, ResourceSet};
use ionet_scheduler::{ClusterView, NodeView};

pub const MODELS: [&str; 10] =
    ["H100", "A100-80GB", "A100-40GB", "L40S", "A10G", "RTX4090", "RTX3090", "V100", "T4", "L4"];

/// Each model's published FP32 TFLOPS in thousandths (what a passed check ranks by).
const TFLOPS_MILLI: [u64; 10] = [67_000, 19_500, 19_500, 91_600, 31_200, 82_600, 35_600, 15_700, 8_100, 30_300];

/// A small deterministic generator, so every run benches the same cluster.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

pub fn id(n: u32) -> NodeId {
    let mut bytes = [0u8; NodeId::LEN];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[4..8].copy_from_slice(&n.wrapping_mul(2654435761).to_be_bytes());
    NodeId::from_array(bytes)
}

/// `count` nodes: one in eight CPU-only, the rest 1, 2, 4 or 8 GPUs of one of 10 models,
/// 8-64 CPUs, prices by model, regions eu/us/ap, and random load.
pub fn cluster(count: u32, gpus_per_node: Option<u32>) -> ClusterView {
    let mut rng = Lcg(count as u64);
    let mut view = ClusterView::new();
    for n in 0..count {
        let cpus = [8, 16, 32, 64][rng.next(4) as usize];
        let total = ResourceSet::new().with(CPU, Quantity::whole(cpus)).with(MEMORY, Quantity::whole(256 << 30));
        let mut node = NodeView::new(id(n), total);
        let gpu_count = gpus_per_node.unwrap_or([0, 1, 2, 4, 8, 8, 8, 4][rng.next(8) as usize]);
        if gpu_count > 0 {
            let model = rng.next(MODELS.len() as u64) as usize;
            node = node
                .with_gpus(MODELS[model], gpu_count, 24 << 30)
                .with_price(200_000 + 150_000 * (10 - model as u64) + rng.next(50) * 10_000);
            node.gpu_tflops_milli = TFLOPS_MILLI[model];
        }
        node = node.with_label("region", ["eu", "us", "ap"][rng.next(3) as usize]);
        // Random load: take some CPUs and GPUs.
        let used_gpus = if gpu_count > 0 { rng.next(gpu_count as u64 + 1) as i64 } else { 0 };
        let used = ResourceSet::new()
            .with(CPU, Quantity::whole(rng.next(cpus as u64 / 2) as i64))
            .with(GPU, Quantity::whole(used_gpus));
        node.available.try_subtract(&used).unwrap();
        view.upsert_node(node).unwrap();
    }
    view
}
