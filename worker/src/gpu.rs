//! GPU detection through the CUDA driver, loaded at run time.
//!
//! cudarc is built with `dynamic-loading`, so the binary has no link-time CUDA
//! dependency and runs on machines without it. Its loader panics when `libcuda` is
//! absent, so we first ask whether the library can be opened at all, and fall back
//! to "no GPUs" with one log line. Operators may declare GPUs instead
//! (`--num-gpus 4 --gpu-type A100-80GB`), which is also how tests simulate them.

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
        gpus.push(GpuInfo { index: ordinal as u32, model: normalise_model(&model), memory_bytes: memory as u64 });
    }
    Ok(gpus)
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
