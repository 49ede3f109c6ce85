//! The model a command names with `--model`, `--device`, `--dtype` and `--quantize`.

use crate::args::ModelArgs;
use kframe_model::device;
use kframe_model::load::ModelDir;
use kframe_model::ModelBundle;

/// The model `--model`, `--device`, `--dtype` and `--quantize` name: its
/// directory (or GGUF file), the loaded model with its tokenizer, and its
/// weights' formats for reports.
pub fn load(args: &ModelArgs) -> anyhow::Result<(ModelDir, ModelBundle)> {
    let device = device::select(args.device.into())?;
    let dtype = device::dtype(args.dtype.into(), &device);
    let dir = ModelDir::open_or_embedded(args.model.as_deref())?;
    let quantize = args.quantize.map(Into::into);
    let bundle = ModelBundle::load_quantized(&dir, dtype, &device, quantize)?;
    tracing::info!(
        model = %dir.model_id(),
        weights = %dir.weights_format(dtype, quantize),
        kv = ?bundle.model.kv_dtype(),
        peak_rss_mb = peak_rss_bytes() / 1_000_000,
        "model loaded"
    );
    Ok((dir, bundle))
}

/// The process's peak resident memory so far (VmHWM), in bytes; 0 where
/// /proc/self/status is not there.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok());
    kb.unwrap_or(0u64) * 1024
}
