//! `kframe bench peer --preset qwen25-3b --quant q4_k_m|q8_0`: kframe against
//! llama.cpp on Qwen2.5-3B's whole shape (36 layers, random weights, Qwen's own
//! tokenizer), both engines reading the same quantized GGUF file.
//!
//! The model is written once into the work folder and reused: the safetensors
//! directory (`kframe synth-model --preset qwen25-3b`), its pad calibration, and
//! the GGUF file at the asked quantization. The greedy check runs 8 token-id
//! prompts for 16 steps on both engines (and kframe in a tenant's frame); then
//! alternating pairs time batch 1, 8 and 32 tenants (each a 16-token prompt and
//! 64 generated tokens) and a 256-token prefill. kframe runs as `kframe serve`
//! does by default: each tenant in its own frame, norm padding, verification.

use super::llamacpp::LlamaCpp;
use super::{drain, greedy, median, prompt_token, run, submit, wait_for_quiet, PREFILL, PROMPT};
use crate::serve::serving_engine;
use candle_core::{DType, Device};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_engine::Engine;
use kframe_model::export::{self, FileType};
use kframe_model::load::ModelDir;
use kframe_model::{synth, ModelBundle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct RealSizeOptions {
    pub llama_cpp: PathBuf,
    /// Where the model directory and GGUF files are written (and found again).
    pub work_dir: PathBuf,
    /// A folder with Qwen's tokenizer.json (scripts/qwen-tokenizer.sh): llama.cpp
    /// needs a tokenizer with merges, which the byte-level stand-in lacks.
    pub tokenizer: PathBuf,
    pub quant: FileType,
    pub pairs: usize,
    pub threads: usize,
}

/// Tokens generated per sequence, and the batch sizes timed.
const GENERATED: usize = 64;
const BATCHES: [usize; 3] = [1, 8, 32];
const GREEDY_PROMPTS: usize = 8;
const GREEDY_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RealSizeSpeeds {
    pub batch1_tok_s: f64,
    pub batch8_tok_s: f64,
    pub batch32_tok_s: f64,
    pub prefill256_tok_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RealSizePair {
    pub llamacpp: RealSizeSpeeds,
    pub kframe: RealSizeSpeeds,
    pub quiet: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RealSizeReport {
    pub model: String,
    /// The GGUF file type both engines read, and its matrices' formats.
    pub quant: FileType,
    pub weights: String,
    pub file_bytes: u64,
    pub machine: String,
    pub threads: usize,
    /// kframe / llama.cpp, medians over the pairs: the same file, so the same
    /// precision, at every batch size.
    pub batch1_over_llamacpp: f64,
    pub batch8_over_llamacpp: f64,
    pub batch32_over_llamacpp: f64,
    /// The embedded-model report's names for the same figures: there is one
    /// precision here, so "best" is it.
    pub batch32_over_llamacpp_best: f64,
    pub prefill256_over_llamacpp: f64,
    /// kframe in a tenant's frame chose the identity frame's tokens, and
    /// llama.cpp chose kframe's, on every prompt.
    pub same_greedy_tokens: bool,
    pub kframe_identity_equals_tenant_frame: bool,
    pub llamacpp_prompts_equal: usize,
    pub greedy_prompts: usize,
    pub greedy_tokens_each: usize,
    /// kframe's peak resident memory while loading the model, and its resident
    /// memory once loaded, in bytes (from /proc/self/status).
    pub kframe_load_peak_rss: u64,
    pub kframe_loaded_rss: u64,
    pub kframe_load_s: f64,
    pub median_llamacpp: RealSizeSpeeds,
    pub median_kframe: RealSizeSpeeds,
    pub pairs: Vec<RealSizePair>,
}

/// Writes what is missing of the Qwen2.5-3B-shape model in `work_dir`: the
/// safetensors directory (with Qwen's tokenizer from `tokenizer`), its pad
/// calibration, and the GGUF file of `quant`; the GGUF file's path.
pub fn prepare_model(
    work_dir: &Path,
    tokenizer: &Path,
    quant: FileType,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(work_dir)?;
    let dir = work_dir.join("qwen25-3b");
    if !dir.join("model.safetensors").is_file() {
        anyhow::ensure!(
            tokenizer.join("tokenizer.json").is_file(),
            "no Qwen tokenizer in {}: run scripts/qwen-tokenizer.sh",
            tokenizer.display()
        );
        progress(&format!("writing the random-weight Qwen2.5-3B shape to {} (6.2 GB)", dir.display()));
        synth::write_model_dir_with(&dir, &synth::qwen25_3b_config(), 0, DType::BF16, Some(tokenizer))?;
    }
    let calibration = dir.join(kframe_core::layout::CALIBRATION_FILE);
    if !calibration.is_file() {
        progress("measuring its pad calibration (the documents through 36 layers: minutes)");
        let model = ModelDir::open(&dir)?;
        let bundle = ModelBundle::load(&model, DType::F16, &Device::Cpu)?;
        let measured = kframe_model::calibrate::measure(&model, &bundle, kframe_core::layout::DEFAULT_MARGIN)?;
        std::fs::write(&calibration, serde_json::to_string_pretty(&measured)?)?;
    }
    let file = work_dir.join(format!("qwen25-3b-{}.gguf", quant.name()));
    if !file.is_file() {
        progress(&format!("writing {}", file.display()));
        let partial = file.with_extension("gguf.partial");
        export::write(&ModelDir::open(&dir)?, quant, &partial)?;
        std::fs::rename(&partial, &file)?;
    }
    Ok(file)
}

/// VmHWM and VmRSS of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name));
        line.and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

pub fn real_size(opts: &RealSizeOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<RealSizeReport> {
    let llama = LlamaCpp::new(&opts.llama_cpp, opts.threads)?;
    let file = prepare_model(&opts.work_dir, &opts.tokenizer, opts.quant, &mut progress)?;
    let model_dir = ModelDir::open(&file)?;
    let token = prompt_token(model_dir.config.vocab_size);

    progress("loading the GGUF file into kframe's engine");
    let start = Instant::now();
    let (engine, _) = serving_engine(&model_dir, DType::F16)?;
    let kframe_load_s = start.elapsed().as_secs_f64();
    let (kframe_load_peak_rss, kframe_loaded_rss) = memory();

    progress("greedy tokens: kframe (identity and tenant frames) and llama.cpp, on the same file");
    let prompts: Vec<Vec<u32>> =
        (0..GREEDY_PROMPTS).map(|p| (0..PROMPT).map(|i| token(p * 101 + i)).collect()).collect();
    let (identity, framed) = {
        let bundle = ModelBundle::load(&model_dir, DType::F16, &Device::Cpu)?;
        let ring = Keyring::builder(MasterSecret::from_bytes([0x71; 32]), bundle.model.rotation_shape())
            .dtype(bundle.model.dtype())
            .build();
        let frame = ring.frame("peer-bench", 0)?;
        let run = |frame: &Frame| greedy(&bundle, &prompts, frame, GREEDY_TOKENS).map(|(tokens, _)| tokens);
        (run(&Frame::Identity)?, run(&frame)?)
    };
    let llama_tokens = llama.greedy(&file, &prompts, GREEDY_TOKENS)?;
    let llamacpp_prompts_equal = llama_tokens.iter().zip(&identity).filter(|(a, b)| a == b).count();

    let kframe_prompts: Vec<Vec<u32>> =
        (0..*BATCHES.iter().max().unwrap()).map(|s| (0..PROMPT).map(|i| token(s * 31 + i)).collect()).collect();
    // One unmeasured round of the smallest workload: the weights paged in.
    run(&engine, 1, &kframe_prompts[0], 4)?;
    let mut pairs = Vec::with_capacity(opts.pairs);
    for i in 0..opts.pairs {
        progress(&format!("pair {} of {}", i + 1, opts.pairs));
        let mut quiet = true;
        let llama_run = |quiet: &mut bool| {
            *quiet &= wait_for_quiet();
            llama_speeds(&llama, &file)
        };
        let kframe_run = |quiet: &mut bool| {
            *quiet &= wait_for_quiet();
            kframe_speeds(&engine, &kframe_prompts, token)
        };
        let (llamacpp, kframe) = if i % 2 == 0 {
            let l = llama_run(&mut quiet)?;
            (l, kframe_run(&mut quiet)?)
        } else {
            let k = kframe_run(&mut quiet)?;
            (llama_run(&mut quiet)?, k)
        };
        pairs.push(RealSizePair { llamacpp, kframe, quiet });
    }
    let ratio = |f: fn(&RealSizeSpeeds) -> f64| median(pairs.iter().map(|p| f(&p.kframe) / f(&p.llamacpp)).collect());
    let medians = |side: fn(&RealSizePair) -> RealSizeSpeeds| {
        let m = |f: fn(&RealSizeSpeeds) -> f64| median(pairs.iter().map(|p| f(&side(p))).collect());
        RealSizeSpeeds {
            batch1_tok_s: m(|s| s.batch1_tok_s),
            batch8_tok_s: m(|s| s.batch8_tok_s),
            batch32_tok_s: m(|s| s.batch32_tok_s),
            prefill256_tok_s: m(|s| s.prefill256_tok_s),
        }
    };
    let batch32 = ratio(|s| s.batch32_tok_s);
    Ok(RealSizeReport {
        model: format!("random-weight Qwen2.5-3B shape ({})", file.display()),
        quant: opts.quant,
        weights: model_dir.weights_format(DType::F16, None),
        file_bytes: std::fs::metadata(&file)?.len(),
        machine: kframe_model::device::machine(),
        threads: opts.threads,
        batch1_over_llamacpp: ratio(|s| s.batch1_tok_s),
        batch8_over_llamacpp: ratio(|s| s.batch8_tok_s),
        batch32_over_llamacpp: batch32,
        batch32_over_llamacpp_best: batch32,
        prefill256_over_llamacpp: ratio(|s| s.prefill256_tok_s),
        same_greedy_tokens: identity == framed && llamacpp_prompts_equal == prompts.len(),
        kframe_identity_equals_tenant_frame: identity == framed,
        llamacpp_prompts_equal,
        greedy_prompts: prompts.len(),
        greedy_tokens_each: GREEDY_TOKENS,
        kframe_load_peak_rss,
        kframe_loaded_rss,
        kframe_load_s,
        median_llamacpp: medians(|p| p.llamacpp),
        median_kframe: medians(|p| p.kframe),
        pairs,
    })
}

fn llama_speeds(llama: &LlamaCpp, file: &Path) -> anyhow::Result<RealSizeSpeeds> {
    let rows = llama.batched_bench(file, PROMPT, GENERATED, &BATCHES)?;
    let at = |pl: usize| rows.iter().find(|r| r.pl == pl).map(|r| r.generated_per_s()).unwrap_or(f64::NAN);
    let prefill = llama.batched_bench(file, PREFILL, 1, &[1])?;
    Ok(RealSizeSpeeds {
        batch1_tok_s: at(1),
        batch8_tok_s: at(8),
        batch32_tok_s: at(32),
        prefill256_tok_s: prefill[0].prompt_per_s(),
    })
}

/// `n` tenants at once, each its own prompt and [`GENERATED`] tokens: generated
/// tokens over the wall time. A sequence that ends early is counted as it ran.
fn batch(engine: &Engine, prompts: &[Vec<u32>], n: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let streams: Vec<_> = (0..n).map(|t| submit(engine, 100 + t as u64, &prompts[t], GENERATED)).collect();
    let mut generated = 0;
    for s in streams {
        generated += drain(s)?.0;
    }
    Ok(generated as f64 / start.elapsed().as_secs_f64())
}

fn kframe_speeds(
    engine: &Engine,
    prompts: &[Vec<u32>],
    token: impl Fn(usize) -> u32,
) -> anyhow::Result<RealSizeSpeeds> {
    let long: Vec<u32> = (0..PREFILL).map(|i| token(1_000_000 + i * 17)).collect();
    let (_, prompt_s) = run(engine, 99, &long, 1)?;
    Ok(RealSizeSpeeds {
        batch1_tok_s: batch(engine, prompts, 1)?,
        batch8_tok_s: batch(engine, prompts, 8)?,
        batch32_tok_s: batch(engine, prompts, 32)?,
        prefill256_tok_s: PREFILL as f64 / prompt_s,
    })
}

impl RealSizeReport {
    pub fn to_text(&self) -> String {
        let (l, k) = (&self.median_llamacpp, &self.median_kframe);
        let row = |name: &str, f: fn(&RealSizeSpeeds) -> f64, ratio: f64| {
            format!("{name:<26} {:>10.2} {:>10.2}  {ratio:.2}\n", f(l), f(k))
        };
        let mut s = format!(
            "model: {}\nweights: {} ({}, {:.2} GB)\nmachine: {}, {} threads\nkframe load: {:.1} s, peak RSS {:.2} GB, \
             resident {:.2} GB\n\n",
            self.model,
            self.quant.name(),
            self.weights,
            self.file_bytes as f64 / 1e9,
            self.machine,
            self.threads,
            self.kframe_load_s,
            self.kframe_load_peak_rss as f64 / 1e9,
            self.kframe_loaded_rss as f64 / 1e9
        );
        s += &format!("{:<26} {:>10} {:>10}  kframe / llama.cpp\n", "tokens/s (median)", "llama.cpp", "kframe");
        s += &row("batch 1, 16 + 64", |x| x.batch1_tok_s, self.batch1_over_llamacpp);
        s += &row("8 tenants, 16 + 64 each", |x| x.batch8_tok_s, self.batch8_over_llamacpp);
        s += &row("32 tenants, 16 + 64 each", |x| x.batch32_tok_s, self.batch32_over_llamacpp);
        s += &row("prefill, 256 tokens", |x| x.prefill256_tok_s, self.prefill256_over_llamacpp);
        s += &format!(
            "\nsame greedy tokens: {} (tenant frame = identity: {}; llama.cpp = kframe on {} of {} prompts x {} \
             tokens)\npairs: {} ({} quiet)\n",
            self.same_greedy_tokens,
            self.kframe_identity_equals_tenant_frame,
            self.llamacpp_prompts_equal,
            self.greedy_prompts,
            self.greedy_tokens_each,
            self.pairs.len(),
            self.pairs.iter().filter(|p| p.quiet).count()
        );
        s
    }
}
