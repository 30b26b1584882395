//! What a node offers: detected CPUs, memory and GPUs, overridden by what the
//! operator declares on the command line.

use std::collections::BTreeMap;

use ionet_common::resources::{self, MicroUsd, Quantity, ResourceSet};
use ionet_common::rpc::proto::common::{GpuInfo, NodeInfo, ResourceQuantities};
use ionet_common::{IonetError, IonetResult};

use crate::gpu;

/// Operator declarations; `None` means "detect".
#[derive(Clone, Debug, Default)]
pub struct Declared {
    pub num_cpus: Option<Quantity>,
    pub num_gpus: Option<u32>,
    pub gpu_type: Option<String>,
    pub gpu_memory_bytes: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub custom: ResourceSet,
    pub labels: BTreeMap<String, String>,
    pub price_per_gpu_hour: MicroUsd,
    pub price_per_cpu_hour: MicroUsd,
    pub wallet: String,
    pub power_watts: u64,
    pub electricity_price_per_kwh: MicroUsd,
}

/// The resources and identity a node registers with.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub total: ResourceSet,
    pub gpus: Vec<GpuInfo>,
    pub accelerator_type: String,
    pub labels: BTreeMap<String, String>,
    pub price_per_gpu_hour: MicroUsd,
    pub price_per_cpu_hour: MicroUsd,
    pub wallet: String,
    pub power_watts: u64,
    pub electricity_price_per_kwh: MicroUsd,
}

impl NodeSpec {
    /// Detects what the operator did not declare.
    pub fn build(declared: Declared) -> IonetResult<Self> {
        if declared.num_gpus.is_none() && declared.gpu_type.is_some() {
            return Err(IonetError::InvalidArgument("--gpu-type needs --num-gpus".into()));
        }
        let cpus = match declared.num_cpus {
            Some(cpus) => cpus,
            None => Quantity::whole(std::thread::available_parallelism().map(|n| n.get() as i64).unwrap_or(1)),
        };
        let memory = declared.memory_bytes.or_else(detect_memory_bytes).unwrap_or(0);
        let gpus = match declared.num_gpus {
            Some(count) => declared_gpus(count, declared.gpu_type.as_deref(), declared.gpu_memory_bytes)?,
            None => match gpu::detect() {
                Ok(gpus) => gpus,
                Err(reason) => {
                    tracing::info!(%reason, "no GPUs detected; declare them with --num-gpus and --gpu-type");
                    Vec::new()
                }
            },
        };
        let accelerator_type = gpus.first().map(|gpu| gpu.model.clone()).unwrap_or_default();
        let mut total = ResourceSet::new().with(resources::CPU, cpus).with(
            resources::MEMORY,
            Quantity::from_units(memory.saturating_mul(resources::SCALE as u64).min(i64::MAX as u64) as i64),
        );
        if !gpus.is_empty() {
            let gpu_memory: u64 = gpus.iter().map(|gpu| gpu.memory_bytes).sum();
            total.set(resources::GPU, Quantity::whole(gpus.len() as i64));
            total
                .set(resources::GPU_MEMORY, Quantity::from_units((gpu_memory as i64).saturating_mul(resources::SCALE)));
            total.set(format!("{}{accelerator_type}", resources::ACCELERATOR_PREFIX), Quantity::whole(1));
            // The model family too ("A100" for "A100-80GB"), as Ray's accelerator constants name it.
            if let Some((family, _)) = accelerator_type.split_once('-').filter(|(family, _)| !family.is_empty()) {
                total.set(format!("{}{family}", resources::ACCELERATOR_PREFIX), Quantity::whole(1));
            }
        }
        for (name, quantity) in declared.custom.iter() {
            if [resources::CPU, resources::GPU, resources::MEMORY, resources::GPU_MEMORY].contains(&name) {
                return Err(IonetError::InvalidArgument(format!(
                    "--resources may not set {name}: use its own flag (--num-cpus, --num-gpus, --memory, --gpu-memory)"
                )));
            }
            total.set(name, quantity);
        }
        Ok(Self {
            total,
            gpus,
            accelerator_type,
            labels: declared.labels,
            price_per_gpu_hour: declared.price_per_gpu_hour,
            price_per_cpu_hour: declared.price_per_cpu_hour,
            wallet: declared.wallet,
            power_watts: declared.power_watts,
            electricity_price_per_kwh: declared.electricity_price_per_kwh,
        })
    }

    /// The registration record for this node, before the control store stamps times.
    pub fn to_node_info(&self, node_id: &ionet_common::NodeId, address: &str, is_head: bool) -> NodeInfo {
        NodeInfo {
            node_id: node_id.to_vec(),
            address: address.to_string(),
            hostname: hostname(),
            total: Some(ResourceQuantities::from_set(&self.total)),
            available: Some(ResourceQuantities::from_set(&self.total)),
            gpus: self.gpus.clone(),
            accelerator_type: self.accelerator_type.clone(),
            labels: self.labels.clone().into_iter().collect(),
            price_per_gpu_hour_micros: self.price_per_gpu_hour,
            price_per_cpu_hour_micros: self.price_per_cpu_hour,
            power_watts: self.power_watts,
            electricity_price_per_kwh_micros: self.electricity_price_per_kwh,
            wallet: self.wallet.clone(),
            pid: std::process::id(),
            is_head,
            ..Default::default()
        }
    }
}

fn declared_gpus(count: u32, model: Option<&str>, memory: Option<u64>) -> IonetResult<Vec<GpuInfo>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let model = model.map(str::to_string).unwrap_or_else(|| "GPU".to_string());
    let memory_bytes = memory.or_else(|| gpu::known_memory_bytes(&model)).unwrap_or(0);
    // Declared, not found through the driver: simulated (checked on the CPU, never rewarded).
    Ok((0..count).map(|index| GpuInfo { index, model: model.clone(), memory_bytes, simulated: true }).collect())
}

fn detect_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// Parses sizes such as `80GB`, `80GiB`, `512MiB`, `1024` (bytes). Decimal units are
/// powers of 1000, binary units powers of 1024; `G`/`M`/`K` alone are binary, as most
/// operators mean them for memory.
pub fn parse_size(text: &str) -> IonetResult<u64> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        IonetError::InvalidArgument(format!("size {text:?} must be a number with an optional unit (80GB, 24GiB)"))
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => return Err(IonetError::InvalidArgument(format!("size {text:?} has an unknown unit {other:?}"))),
    };
    Ok((value * multiplier as f64).round() as u64)
}

/// Parses `region=eu,provider=acme`.
pub fn parse_labels(text: &str) -> IonetResult<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|pair| !pair.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| IonetError::InvalidArgument(format!("label {pair:?} must be key=value")))?;
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(IonetError::InvalidArgument(format!("label {pair:?} has an empty key")));
        }
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_gpus_make_resources() {
        let spec = NodeSpec::build(Declared {
            num_cpus: Some(Quantity::whole(8)),
            num_gpus: Some(4),
            gpu_type: Some("A100-80GB".into()),
            memory_bytes: Some(1 << 30),
            custom: ResourceSet::from_json(r#"{"nvlink": 1}"#).unwrap(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(spec.total.get("GPU"), Quantity::whole(4));
        assert_eq!(spec.total.get("CPU"), Quantity::whole(8));
        assert_eq!(spec.total.get("accelerator_type:A100-80GB"), Quantity::whole(1));
        assert_eq!(spec.total.get("GPU_memory").units(), 4 * 80 * (1i64 << 30) * 10_000);
        assert_eq!(spec.gpus.len(), 4);
        assert_eq!(spec.total.get("nvlink"), Quantity::whole(1));
    }

    #[test]
    fn bad_declarations_are_refused() {
        let err = NodeSpec::build(Declared {
            custom: ResourceSet::new().with("GPU", Quantity::whole(1)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--num-gpus"), "{err}");
        assert!(NodeSpec::build(Declared { gpu_type: Some("A100".into()), ..Default::default() }).is_err());
    }

    #[test]
    fn sizes_and_labels_parse() {
        assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        let labels = parse_labels("region=eu, provider=acme").unwrap();
        assert_eq!(labels["region"], "eu");
        assert_eq!(labels["provider"], "acme");
        assert!(parse_labels("region").is_err());
    }
}
