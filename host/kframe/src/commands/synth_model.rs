//! `kframe synth-model`: a random-weight Qwen2 written as a model directory.

use crate::args::{Preset, SynthArgs};
use candle_core::DType;
use kframe_model::synth;

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let (cfg, dtype) = match args.preset {
        Preset::Tiny => (synth::tiny_config(), DType::F32),
        Preset::Qwen25_3bLayers => (synth::qwen25_3b_layer_config(args.layers, 32_768), DType::F32),
        Preset::Qwen25_3b => (synth::qwen25_3b_config(), DType::BF16),
    };
    synth::write_model_dir_with(&args.out, &cfg, args.seed, dtype, args.tokenizer.as_deref())?;
    eprintln!("wrote a random-weight Qwen2 model to {}", args.out.display());
    Ok(())
}
