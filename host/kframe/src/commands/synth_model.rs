//! `kframe synth-model`: a random-weight Qwen2 written as a model directory.

use crate::args::{Preset, SynthArgs};
use kframe_model::synth;

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let cfg = match args.preset {
        Preset::Tiny => synth::tiny_config(),
        Preset::Qwen25_3bLayers => synth::qwen25_3b_layer_config(args.layers, 32_768),
    };
    synth::write_model_dir(&args.out, &cfg, args.seed)?;
    eprintln!("wrote a random-weight Qwen2 model to {}", args.out.display());
    Ok(())
}
