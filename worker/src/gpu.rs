//! GPU detection through the CUDA driver, loaded at run time.
//!
//! cudarc is built with `dynamic-loading`, so the binary has no link-time CUDA
//! dependency and runs on machines without it. Its loader panics when `libcuda` is
//! absent, so we first ask whether the library can be opened at all, and fall back
//! to "no GPUs" with one log line. Operators may declare GPUs instead
//! (`--num-gpus 4 --gpu-type A100-80GB`), which is also how tests simulate them.
//!
//! What each GPU is doing (utilisation, memory in use) comes from NVML (`libnvidia-ml`,
//! also loaded at run time, through `nvml-wrapper`), matched to this node's GPUs (CUDA
//! ordinals, which workers' `CUDA_VISIBLE_DEVICES` name) by PCI bus id: the two
//! libraries may number the same GPUs differently. Without a driver there is no
//! [`GpuMonitor`] and the node shows each GPU's leased share only.

use ionet_common::rpc::proto::common::GpuInfo;

const GIB: u64 = 1 << 30;

/// GPUs found on this machine by the CUDA driver, or why none were.
pub fn detect() -> Result<Vec<GpuInfo>, String> {
    // SAFETY: only tries to open the shared library; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda) on this machine".into());
    }
    use cudarc::driver::result;
    result::init().map_err(|err| format!("CUDA driver failed to initialise: {err:?}"))?;
    let count = result::device::get_count().map_err(|err| format!("CUDA device count failed: {err:?}"))?;
    let mut gpus = Vec::with_capacity(count.max(0) as usize);
    for ordinal in 0..count {
        let device = result::device::get(ordinal).map_err(|err| format!("CUDA device {ordinal}: {err:?}"))?;
        let model = result::device::get_name(device).map_err(|err| format!("CUDA device {ordinal} name: {err:?}"))?;
        // SAFETY: `device` is a valid handle returned by the driver just above.
        let memory = unsafe { result::device::total_mem(device) }
            .map_err(|err| format!("CUDA device {ordinal} memory: {err:?}"))?;
        gpus.push(GpuInfo {
            index: ordinal as u32,
            model: normalise_model(&model),
            memory_bytes: memory as u64,
            simulated: false,
        });
    }
    Ok(gpus)
}

/// One GPU's use as its hardware reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuUse {
    /// This node's index of it (its CUDA ordinal).
    pub index: u32,
    /// The share of the last sample period a kernel ran (0 to 1).
    pub utilisation: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// Reads this node's GPUs' use through NVML.
pub struct GpuMonitor {
    nvml: nvml_wrapper::Nvml,
    /// Each GPU's index here and its PCI bus id (NVML's name for it).
    devices: Vec<(u32, String)>,
}

impl GpuMonitor {
    /// A monitor of `gpus` (indices are CUDA ordinals), or why there is none: no driver,
    /// no NVML, or a GPU the driver does not have (declared ones on another machine).
    pub fn open(gpus: &[GpuInfo]) -> Result<GpuMonitor, String> {
        if gpus.is_empty() {
            return Err("this node has no GPUs".into());
        }
        // SAFETY: only tries to open the shared library; no CUDA call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver library (libcuda) on this machine".into());
        }
        let nvml = nvml_wrapper::Nvml::init().map_err(|err| format!("NVML is not available: {err}"))?;
        use cudarc::driver::{result, sys::CUdevice_attribute as Attribute};
        result::init().map_err(|err| format!("CUDA driver failed to initialise: {err:?}"))?;
        let mut devices = Vec::with_capacity(gpus.len());
        for gpu in gpus {
            let ordinal = i32::try_from(gpu.index).map_err(|_| format!("GPU index {} is out of range", gpu.index))?;
            let device = result::device::get(ordinal).map_err(|err| format!("CUDA device {ordinal}: {err:?}"))?;
            let attribute = |which| {
                // SAFETY: `device` is a valid handle the driver returned just above.
                unsafe { result::device::get_attribute(device, which) }
                    .map_err(|err| format!("CUDA device {ordinal}'s PCI address: {err:?}"))
            };
            let domain = attribute(Attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?;
            let bus = attribute(Attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?;
            let slot = attribute(Attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?;
            devices.push((gpu.index, pci_bus_id(domain, bus, slot)));
        }
        Ok(GpuMonitor { nvml, devices })
    }

    /// Each GPU's use now; a GPU NVML cannot read is left out.
    pub fn read(&self) -> Vec<GpuUse> {
        let mut readings = Vec::with_capacity(self.devices.len());
        for (index, bus_id) in &self.devices {
            let Ok(device) = self.nvml.device_by_pci_bus_id(bus_id.as_str()) else { continue };
            let (Ok(rates), Ok(memory)) = (device.utilization_rates(), device.memory_info()) else { continue };
            readings.push(GpuUse {
                index: *index,
                utilisation: f64::from(rates.gpu.min(100)) / 100.0,
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
            });
        }
        readings
    }
}

/// NVML's form of a PCI address: `0000:3B:00.0` style, with an eight-digit domain.
fn pci_bus_id(domain: i32, bus: i32, slot: i32) -> String {
    format!("{domain:08X}:{bus:02X}:{slot:02X}.0")
}

/// Turns a driver name such as "NVIDIA A100-SXM4-80GB" or "NVIDIA GeForce RTX 4090"
/// into the short accelerator type used for scheduling ("A100-80GB", "RTX4090").
pub fn normalise_model(driver_name: &str) -> String {
    let name = driver_name.trim().trim_start_matches("NVIDIA").trim().trim_start_matches("GeForce").trim();
    let upper = name.to_ascii_uppercase();
    for (marker, short) in [("A100", "A100"), ("H100", "H100"), ("H200", "H200"), ("L40S", "L40S"), ("A10G", "A10G")] {
        if upper.contains(marker) {
            return match upper.split(['-', ' ']).find(|part| part.ends_with("GB")) {
                Some(size) if short == "A100" => format!("{short}-{size}"),
                _ => short.to_string(),
            };
        }
    }
    upper.replace(' ', "")
}

/// VRAM of well-known models, for declared GPUs given without `--gpu-memory`.
pub fn known_memory_bytes(model: &str) -> Option<u64> {
    let model = model.to_ascii_uppercase();
    let gib = match model.as_str() {
        "A100-80GB" | "H100" | "A100-80G" => 80,
        "A100-40GB" | "A100" => 40,
        "H200" => 141,
        "L40S" | "L40" | "A6000" | "RTXA6000" => 48,
        "RTX4090" | "RTX3090" | "A10G" | "A10" | "L4" => 24,
        "T4" | "V100" | "RTX4080" => 16,
        _ => {
            // "XYZ-32GB" carries its size in the name.
            let size = model.rsplit('-').next()?.strip_suffix("GB")?;
            return size.parse::<u64>().ok().map(|gib| gib * GIB);
        }
    };
    Some(gib * GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_become_short_types() {
        assert_eq!(normalise_model("NVIDIA A100-SXM4-80GB"), "A100-80GB");
        assert_eq!(pci_bus_id(0, 0x3b, 0), "00000000:3B:00.0");
        assert_eq!(normalise_model("NVIDIA GeForce RTX 4090"), "RTX4090");
        assert_eq!(normalise_model("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(normalise_model("Tesla T4"), "TESLAT4");
    }

    #[test]
    fn known_sizes() {
        assert_eq!(known_memory_bytes("A100-80GB"), Some(80 * GIB));
        assert_eq!(known_memory_bytes("rtx4090"), Some(24 * GIB));
        assert_eq!(known_memory_bytes("Custom-32GB"), Some(32 * GIB));
        assert_eq!(known_memory_bytes("Mystery"), None);
    }

    #[test]
    fn detection_without_a_driver_falls_back_cleanly() {
        // On machines with CUDA this returns the real GPUs; elsewhere a reason. Either way no panic.
        match detect() {
            Ok(gpus) => assert!(gpus.iter().all(|gpu| !gpu.model.is_empty())),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}

#[cfg(test)]
mod monitor_tests {
    use super::*;

    fn declared() -> Vec<GpuInfo> {
        vec![GpuInfo { index: 0, model: "A100-80GB".into(), memory_bytes: 80 * GIB, simulated: true }]
    }

    /// Runs only on a machine without a CUDA driver (every machine here): the node
    /// still starts, with no monitor, and says why.
    #[test]
    fn without_a_driver_there_is_no_monitor_and_the_reason_is_given() {
        // SAFETY: only tries to open the shared library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return;
        }
        let why = GpuMonitor::open(&declared()).err().expect("no monitor without a driver");
        assert!(why.contains("libcuda"), "{why}");
        assert!(GpuMonitor::open(&[]).err().is_some_and(|why| why.contains("no GPUs")));
    }

    /// Runs only where a GPU is: each of the node's GPUs reads its use and memory.
    #[test]
    fn with_a_gpu_each_reads_its_use_and_memory() {
        let Ok(gpus) = detect() else { return };
        if gpus.is_empty() {
            return;
        }
        let monitor = GpuMonitor::open(&gpus).expect("a monitor where the driver is");
        let readings = monitor.read();
        assert_eq!(readings.len(), gpus.len(), "{readings:?}");
        for reading in readings {
            assert!((0.0..=1.0).contains(&reading.utilisation), "{reading:?}");
            assert!(reading.memory_total_bytes > 0 && reading.memory_used_bytes <= reading.memory_total_bytes);
        }
    }
}
