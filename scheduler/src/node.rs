//! What the scheduler knows about one node: its resources, GPUs, labels, price and state.

use std::collections::BTreeMap;

use ionet_common::resources::{MicroUsd, ACCELERATOR_PREFIX, GPU, GPU_MEMORY, SCALE};
use ionet_common::{NodeId, ResourceSet};
use serde::{Deserialize, Serialize};

/// One physical GPU of a node, as detected at start or declared by the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The CUDA device index (what goes into `CUDA_VISIBLE_DEVICES`).
    pub index: u32,
    /// Model name as in the price table, e.g. `A100-80GB`.
    pub model: String,
    pub memory_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes new work.
    Alive,
    /// Finishing its work before leaving: takes nothing new.
    Draining,
    /// Gone: takes nothing.
    Dead,
}

/// A node as the scheduler sees it. `available` is what is free now; `total` what the node
/// has when idle. Amounts of `memory` and `GPU_memory` are bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: NodeId,
    pub total: ResourceSet,
    pub available: ResourceSet,
    pub gpus: Vec<Gpu>,
    /// The node's GPU model (`A100-80GB`, `H100`, ...), if it has GPUs.
    pub accelerator_type: Option<String>,
    /// Free-form labels such as `region` and `provider`.
    pub labels: BTreeMap<String, String>,
    /// What the provider asks per GPU-hour; 0 for nodes without GPUs.
    pub price_per_gpu_hour: MicroUsd,
    pub state: NodeState,
    /// FP32 TFLOPS of one of its GPUs, in thousandths: what the head measured when its
    /// real GPUs passed their check, or its model's published figure for simulated ones;
    /// 0 when unknown.
    pub gpu_tflops_milli: u64,
    /// The head's reliability score of the node, in basis points (10 000: never failed
    /// anyone; see `ionet_common::reliability`).
    pub reliability_bps: u32,
}

/// Micro-USD per TFLOP-hour: `price_per_gpu_hour` over per-GPU TFLOPS (in thousandths);
/// `None` when the speed is unknown (0). What COST_PER_TFLOP and quotes rank by.
pub fn price_per_tflop_hour(price_per_gpu_hour: MicroUsd, gpu_tflops_milli: u64) -> Option<MicroUsd> {
    (gpu_tflops_milli > 0).then(|| (price_per_gpu_hour as u128 * 1000 / gpu_tflops_milli as u128) as MicroUsd)
}

impl NodeView {
    /// An alive node with everything available, no GPUs, labels or price.
    pub fn new(node_id: NodeId, total: ResourceSet) -> Self {
        Self {
            node_id,
            available: total.clone(),
            total,
            gpus: Vec::new(),
            accelerator_type: None,
            labels: BTreeMap::new(),
            price_per_gpu_hour: 0,
            state: NodeState::Alive,
            gpu_tflops_milli: 0,
            reliability_bps: ionet_common::reliability::FULL,
        }
    }

    /// Micro-USD per TFLOP-hour of its GPUs (price per GPU-hour over per-GPU TFLOPS), if
    /// their speed is known.
    pub fn price_per_tflop_hour(&self) -> Option<MicroUsd> {
        price_per_tflop_hour(self.price_per_gpu_hour, self.gpu_tflops_milli)
    }

    /// Adds `count` GPUs of `model` with `memory_bytes` each: sets `GPU`, `GPU_memory` and
    /// `accelerator_type:<model>` in total and available, the GPU list and the accelerator type.
    pub fn with_gpus(mut self, model: &str, count: u32, memory_bytes: u64) -> Self {
        let first = self.gpus.len() as u32;
        for index in first..first + count {
            self.gpus.push(Gpu { index, model: model.to_string(), memory_bytes });
        }
        let gpus = ionet_common::Quantity::whole(self.gpus.len() as i64);
        let memory = ionet_common::Quantity::whole(self.gpus.iter().map(|gpu| gpu.memory_bytes as i64).sum::<i64>());
        let accelerator = format!("{ACCELERATOR_PREFIX}{model}");
        for set in [&mut self.total, &mut self.available] {
            set.set(GPU, gpus);
            set.set(GPU_MEMORY, memory);
            set.set(accelerator.clone(), ionet_common::Quantity::whole(1));
        }
        self.accelerator_type = Some(model.to_string());
        self
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn with_price(mut self, price_per_gpu_hour: MicroUsd) -> Self {
        self.price_per_gpu_hour = price_per_gpu_hour;
        self
    }

    pub fn with_state(mut self, state: NodeState) -> Self {
        self.state = state;
        self
    }

    /// The accelerator model: the explicit field, else an `accelerator_type:<model>` entry
    /// of `total`, else the first GPU's model.
    pub fn accelerator(&self) -> Option<&str> {
        if let Some(model) = &self.accelerator_type {
            return Some(model);
        }
        if let Some((name, _)) = self.total.iter().find(|(name, _)| name.starts_with(ACCELERATOR_PREFIX)) {
            return Some(&name[ACCELERATOR_PREFIX.len()..]);
        }
        self.gpus.first().map(|gpu| gpu.model.as_str())
    }

    /// The memory of the node's smallest GPU in bytes, from the GPU list or else from
    /// `GPU_memory / GPU` of `total`; `None` when unknown.
    pub fn min_gpu_memory_bytes(&self) -> Option<u64> {
        if let Some(min) = self.gpus.iter().map(|gpu| gpu.memory_bytes).min() {
            return Some(min);
        }
        let gpus = self.total.get(GPU).units() / SCALE;
        let memory = self.total.get(GPU_MEMORY).units() / SCALE;
        (gpus > 0 && memory > 0).then(|| (memory / gpus) as u64)
    }

    /// Utilisation in parts per million: the highest used share over the node's resources
    /// (accelerator-type markers excepted), as Ray's hybrid policy counts it.
    pub fn utilisation_ppm(&self) -> u32 {
        let mut worst = 0u32;
        for (name, total) in self.total.iter() {
            if name.starts_with(ACCELERATOR_PREFIX) || total.units() <= 0 {
                continue;
            }
            let used = (total.units() - self.available.get(name).units()).max(0) as i128;
            let ppm = (used * 1_000_000 / total.units() as i128).min(1_000_000) as u32;
            worst = worst.max(ppm);
        }
        worst
    }
}
