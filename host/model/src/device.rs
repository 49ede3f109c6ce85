//! Choosing the compute device and dtype, and sizing the compute thread pool. CPU
//! needs no feature; `cuda` and `metal` are cargo features passed through to candle.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if built with it and a GPU is present, else Metal likewise, else CPU.
    #[default]
    Auto,
    Cpu,
    Metal,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// f16 on CPU (weights and K/V cache; f32 arithmetic), bf16 on CUDA, f16 on Metal.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

pub fn select(arg: DeviceChoice) -> Result<Device> {
    let unavailable = |name: &str, why: String| Error::Device(name.into(), why);
    match arg {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !cfg!(feature = "cuda") => {
            Err(unavailable("cuda", "kframe was built without the `cuda` feature".into()))
        }
        DeviceChoice::Metal if !cfg!(feature = "metal") => {
            Err(unavailable("metal", "kframe was built without the `metal` feature".into()))
        }
        DeviceChoice::Cuda => Device::new_cuda(0).map_err(|e| unavailable("cuda", e.to_string())),
        DeviceChoice::Metal => Device::new_metal(0).map_err(|e| unavailable("metal", e.to_string())),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if cfg!(feature = "metal") {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

pub fn dtype(arg: DtypeChoice, device: &Device) -> DType {
    match arg {
        DtypeChoice::F32 => DType::F32,
        DtypeChoice::F16 => DType::F16,
        DtypeChoice::Bf16 => DType::BF16,
        // On the CPU f16 holds the weights and the K/V cache and the arithmetic
        // stays f32 (`Qwen2::new`); the README's peer benchmark gives the figures
        // this default was chosen from.
        DtypeChoice::Auto => match device {
            Device::Cpu => DType::F16,
            Device::Cuda(_) => DType::BF16,
            Device::Metal(_) => DType::F16,
        },
    }
}

/// Fixes the size of the compute thread pool once, before any thread starts.
///
/// candle-core (0.11, Linux) sizes each CPU matmul's parallelism from
/// `RAYON_NUM_THREADS` and, when it is unset, counts physical cores by reading
/// `/proc/cpuinfo` again on every matmul: about half of a small model's decode
/// step went there. Setting the variable to that count (candle's fallback; it
/// prefers a `CANDLE_CPU_MASK` or the fast cores of a hybrid CPU, which an operator
/// can express with `RAYON_NUM_THREADS` directly) drops the per-call read. An
/// operator's own `RAYON_NUM_THREADS` is kept.
pub fn pin_compute_threads() {
    let set = std::env::var("RAYON_NUM_THREADS").ok().and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n > 0);
    if !set {
        std::env::set_var("RAYON_NUM_THREADS", num_cpus::get_physical().max(1).to_string());
    }
}

/// A one-line description of this machine (CPU model, cores, OS), for the reports
/// of benches and evaluations.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores, {}", std::env::consts::OS)
}
