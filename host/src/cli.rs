//! The `kframe` command line.

use crate::bench::{self, RotationBenchOptions};
use crate::cache::KvPrecision;
use crate::device::{self, DeviceArg, DtypeArg};
use crate::generate::{Generator, SamplingParams};
use crate::keys::{self, MasterSecret};
use crate::model::load::ModelDir;
use crate::model::{synth, Variant};
use crate::rotation::{Frame, Keyring};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kframe", version, about = "One shared Qwen2 model, a private attention frame per tenant")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate a completion for one prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Measure costs; ratios are taken within one run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a random-weight Qwen2 model directory (config.json, model.safetensors,
    /// tokenizer.json) for tests and benchmarks.
    SynthModel(SynthArgs),
}

#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face style Qwen2 directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t)]
    pub dtype: DtypeArg,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Run in this tenant's private frame; without it, in the identity frame.
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
    #[arg(long, value_enum, default_value_t)]
    pub variant: Variant,
    #[arg(long, value_enum, default_value_t)]
    pub kv_precision: KvPrecision,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the master secret lives [default: $KFRAME_DATA_DIR or ~/.local/share/kframe].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Decode tok/s: identity vs probe-time vs decode-time rotation, and kframe vs
    /// candle-transformers' qwen2, on the Qwen2.5-3B layer shape.
    Rotation {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 512, 4 heads / 2 kv heads, head_dim 128, vocab 512.
    Tiny,
    /// The layer shape of Qwen2.5-3B with `--layers` layers and a 32k vocabulary.
    Qwen25_3bLayers,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Rotation { json, layers, rounds }) => {
            let opts = RotationBenchOptions { layers, rounds, ..Default::default() };
            let report = bench::rotation(&opts, |msg| eprintln!("bench: {msg}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::SynthModel(args) => {
            let cfg = match args.preset {
                Preset::Tiny => synth::tiny_config(),
                Preset::Qwen25_3bLayers => synth::qwen25_3b_layer_config(args.layers, 32_768),
            };
            synth::write_model_dir(&args.out, &cfg, args.seed)?;
            eprintln!("wrote a random-weight Qwen2 model to {}", args.out.display());
            Ok(())
        }
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let device = device::select(args.model.device)?;
    let dtype = device::dtype(args.model.dtype, &device);
    let dir = ModelDir::open(&args.model.model)?;
    let generator = Generator::load(&dir, dtype, &device)?;
    let frame = match &args.tenant {
        None => Frame::Identity,
        Some(tenant) => {
            let data_dir = args.data_dir.clone().unwrap_or_else(keys::default_data_dir);
            let master = MasterSecret::load_or_create(&data_dir)?;
            let exact = args.kv_precision == KvPrecision::Exact;
            let ring = Keyring::new(master, generator.model.rotation_shape(), dtype, exact, device.clone(), 1);
            ring.frame(tenant, args.epoch)?
        }
    };
    let prompt = generator.encode(&args.prompt)?;
    let params = SamplingParams { max_tokens: args.max_tokens, temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let mut out = std::io::stdout().lock();
    let result = generator.generate(&prompt, &frame, args.variant, args.kv_precision, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    tracing::info!(
        frame = frame.describe(),
        prompt_tokens = result.prompt_tokens,
        completion_tokens = result.tokens.len(),
        finish = ?result.finish,
        "done"
    );
    Ok(())
}
