//! `kframe bench peer`: kframe against llama.cpp on the same model and machine.
//!
//! The model is written as GGUF twice (f32 and f16 weights, `kframe_model::export`), and
//! kframe runs it with f32 and with f16 weights (`--dtype f16`: f16 weights and
//! K/V cache, f32 arithmetic, as llama.cpp runs an f16 GGUF). The engines are
//! first checked to choose the same greedy tokens for the same token-id prompts,
//! then timed in alternating pairs ([`llamacpp`] runs llama.cpp's
//! own `llama-batched-bench`), each run after the machine has gone quiet. Three
//! workloads, each as llama-batched-bench defines it:
//!
//! - batch 1: a 16-token prompt then 64 generated tokens; generated / total time.
//! - batch 32: 32 such sequences at once (32 tenants for kframe); the same ratio.
//! - prefill: one 256-token prompt; prompt tokens / prompt time.
//!
//! kframe runs as `kframe serve` does by default (every isolation feature on:
//! each tenant in its own frame, norm padding, verification, policy components),
//! so its times include sampling, which llama-batched-bench leaves out. Ratios
//! are kframe / llama.cpp per pair, and the report gives their medians: batch 1
//! at the same weight precision, batch 32 and prefill each engine's best
//! precision against the other's.

pub mod llamacpp;
pub mod real_size;

use crate::serve::{model_dir, serving_engine};
use candle_core::{DType, Device};
use kframe_core::cache::KvPrecision;
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_engine::{Engine, Event, Submit, Tenant};
use kframe_model::device::DtypeChoice;
use kframe_model::export::{self, FileType};
use kframe_model::generate::SamplingParams;
use kframe_model::load::ModelDir;
use kframe_model::{ModelBundle, Variant};
use llamacpp::LlamaCpp;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PeerBenchOptions {
    /// The folder with llama.cpp's binaries.
    pub llama_cpp: PathBuf,
    /// Where the GGUF files go.
    pub work_dir: PathBuf,
    pub pairs: usize,
    pub threads: usize,
}

/// The three workloads' sizes (see the module doc).
const PROMPT: usize = 16;
const GENERATED: usize = 64;
const BATCH: usize = 32;
const PREFILL: usize = 256;
/// A prefill is short: each engine's figure is the median of this many.
const PREFILL_RUNS: usize = 3;
/// The greedy check: this many prompts, this many tokens each.
const GREEDY_PROMPTS: usize = 8;
const GREEDY_TOKENS: usize = 32;
/// The quantized files' check: this many steps of each prompt.
const QUANTIZED_STEPS: usize = 16;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Speeds {
    pub batch1_tok_s: f64,
    pub batch32_tok_s: f64,
    pub prefill256_tok_s: f64,
}

/// One alternating pair: each engine's speeds, measured back to back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pair {
    pub llamacpp_f32: Speeds,
    pub llamacpp_f16: Speeds,
    pub kframe_f32: Speeds,
    pub kframe_f16: Speeds,
    /// Whether the machine was quiet (under a tenth busy) before every run.
    pub quiet: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GreedyCheck {
    pub prompts: usize,
    pub tokens_each: usize,
    /// kframe (f32 weights) in the identity frame and in a tenant's frame chose
    /// the same tokens.
    pub kframe_identity_equals_tenant_frame: bool,
    /// llama.cpp (f32 weights) chose kframe's tokens for every prompt.
    pub llamacpp_f32_equals_kframe: bool,
    /// The same two checks with f16 weights, as prompts (of `prompts`) on which
    /// the tokens agree: an f16 cache rounds a tenant's rotated rows, and the two
    /// engines round their arithmetic differently, so a near-tie may flip.
    pub kframe_f16_tenant_frame_prompts_equal: usize,
    pub llamacpp_f16_prompts_equal: usize,
    /// Where llama.cpp (f32) first chose otherwise, if it did.
    pub first_difference: Option<Difference>,
    /// The same check on Q8_0 and Q4_K_M files of the model.
    pub quantized: Vec<QuantizedGreedy>,
}

/// Greedy tokens of kframe and llama.cpp on one quantized GGUF file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizedGreedy {
    pub file_type: FileType,
    pub steps: usize,
    pub kframe_identity_equals_tenant_frame: bool,
    /// Prompts (of the check's) on which llama.cpp chose kframe's tokens.
    pub llamacpp_prompts_equal: usize,
    /// Where they first differ, with kframe's top-two margin there: quantized
    /// activations round differently in the two engines, so a near-tie may flip.
    pub first_difference: Option<Difference>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    pub prompt: usize,
    pub step: usize,
    pub kframe: u32,
    pub llamacpp: u32,
    /// kframe's top logit minus its second at that step: a near-tie (well under
    /// 1e-3 here) is rounding, a wide margin is a disagreement about the model.
    pub kframe_margin: f32,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerReport {
    pub model: String,
    pub machine: String,
    pub threads: usize,
    pub batch1_over_llamacpp_f32: f64,
    pub batch1_over_llamacpp_f16: f64,
    pub batch32_over_llamacpp_best: f64,
    pub prefill256_over_llamacpp: f64,
    pub same_greedy_tokens: bool,
    pub greedy: GreedyCheck,
    /// Medians over the pairs, tokens per second.
    pub median: MedianSpeeds,
    pub pairs: Vec<Pair>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MedianSpeeds {
    pub llamacpp_f32: Speeds,
    pub llamacpp_f16: Speeds,
    pub kframe_f32: Speeds,
    pub kframe_f16: Speeds,
}

const MASTER: [u8; 32] = [0x70; 32];

pub fn peer(opts: &PeerBenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<PeerReport> {
    let llama = LlamaCpp::new(&opts.llama_cpp, opts.threads)?;
    let (dir, model_name, _guard) = model_dir()?;
    std::fs::create_dir_all(&opts.work_dir)?;
    let f32_file = opts.work_dir.join("kframe-f32.gguf");
    let f16_file = opts.work_dir.join("kframe-f16.gguf");
    progress(&format!("writing {} and {}", f32_file.display(), f16_file.display()));
    export::write(&dir, FileType::F32, &f32_file)?;
    export::write(&dir, FileType::F16, &f16_file)?;

    let token = prompt_token(dir.config.vocab_size);
    let prompts: Vec<Vec<u32>> =
        (0..GREEDY_PROMPTS).map(|p| (0..PROMPT).map(|i| token(p * 101 + i)).collect()).collect();
    progress("greedy tokens: kframe (identity and tenant frames; f32, f16) and llama.cpp (f32, f16)");
    let kframe_greedy = |dir: &ModelDir, dtype: DType| -> anyhow::Result<(Tokens, Tokens, Vec<Vec<f32>>)> {
        let bundle = ModelBundle::load(dir, dtype, &Device::Cpu)?;
        let ring = Keyring::builder(MasterSecret::from_bytes(MASTER), bundle.model.rotation_shape())
            .dtype(bundle.model.dtype())
            .build();
        let tenant_frame = ring.frame("peer-bench", 0)?;
        let (identity, margins) = greedy(&bundle, &prompts, &Frame::Identity, GREEDY_TOKENS)?;
        let (framed, _) = greedy(&bundle, &prompts, &tenant_frame, GREEDY_TOKENS)?;
        Ok((identity, framed, margins))
    };
    let (identity, framed, margins) = kframe_greedy(&dir, DType::F32)?;
    let (identity16, framed16, _) = kframe_greedy(&dir, DType::F16)?;
    let llama_f32 = llama.greedy(&f32_file, &prompts, GREEDY_TOKENS)?;
    let llama_f16 = llama.greedy(&f16_file, &prompts, GREEDY_TOKENS)?;
    let agree = |a: &Tokens, b: &Tokens| a.iter().zip(b).filter(|(a, b)| a == b).count();
    let greedy = GreedyCheck {
        prompts: prompts.len(),
        tokens_each: GREEDY_TOKENS,
        kframe_identity_equals_tenant_frame: identity == framed,
        llamacpp_f32_equals_kframe: llama_f32 == identity,
        kframe_f16_tenant_frame_prompts_equal: agree(&identity16, &framed16),
        llamacpp_f16_prompts_equal: agree(&llama_f16, &identity16),
        first_difference: first_difference(&identity, &llama_f32, &margins),
        quantized: Vec::new(),
    };
    // The same file, quantized, read by both engines: the first QUANTIZED_STEPS
    // tokens of each prompt.
    let mut greedy = greedy;
    for file_type in [FileType::Q8_0, FileType::Q4KM] {
        let file = opts.work_dir.join(format!("kframe-{}.gguf", file_type.name()));
        export::write(&dir, file_type, &file)?;
        let (ours, framed, margins) = kframe_greedy(&ModelDir::open(&file)?, DType::F32)?;
        let cut = |t: &Tokens| t.iter().map(|p| p[..QUANTIZED_STEPS].to_vec()).collect::<Tokens>();
        let (ours, framed) = (cut(&ours), cut(&framed));
        let theirs = cut(&llama.greedy(&file, &prompts, QUANTIZED_STEPS)?);
        greedy.quantized.push(QuantizedGreedy {
            file_type,
            steps: QUANTIZED_STEPS,
            kframe_identity_equals_tenant_frame: ours == framed,
            llamacpp_prompts_equal: agree(&ours, &theirs),
            first_difference: first_difference(&ours, &theirs, &margins),
        });
    }

    let (engine32, _) = serving_engine(&dir, DType::F32)?;
    let (engine16, _) = serving_engine(&dir, DType::F16)?;
    let kframe_prompts = full_length_prompts(&engine32, token)?;
    // One unmeasured round first, as llama-batched-bench warms up before it times.
    kframe_speeds(&engine32, &kframe_prompts, token)?;
    kframe_speeds(&engine16, &kframe_prompts, token)?;
    let kframe_runs = |quiet: &mut bool| -> anyhow::Result<(Speeds, Speeds)> {
        *quiet &= wait_for_quiet();
        let f32 = kframe_speeds(&engine32, &kframe_prompts, token)?;
        *quiet &= wait_for_quiet();
        let f16 = kframe_speeds(&engine16, &kframe_prompts, token)?;
        Ok((f32, f16))
    };
    let mut pairs = Vec::with_capacity(opts.pairs);
    for i in 0..opts.pairs {
        progress(&format!("pair {} of {}", i + 1, opts.pairs));
        let mut quiet = true;
        let llama_runs = |quiet: &mut bool| -> anyhow::Result<(Speeds, Speeds)> {
            *quiet &= wait_for_quiet();
            let f32 = llama_speeds(&llama, &f32_file)?;
            *quiet &= wait_for_quiet();
            let f16 = llama_speeds(&llama, &f16_file)?;
            Ok((f32, f16))
        };
        // Alternate which engine goes first, so that drift within a pair favours
        // neither.
        let ((llamacpp_f32, llamacpp_f16), (kframe_f32, kframe_f16)) = if i % 2 == 0 {
            let llama = llama_runs(&mut quiet)?;
            (llama, kframe_runs(&mut quiet)?)
        } else {
            let kframe = kframe_runs(&mut quiet)?;
            (llama_runs(&mut quiet)?, kframe)
        };
        pairs.push(Pair { llamacpp_f32, llamacpp_f16, kframe_f32, kframe_f16, quiet });
    }
    let ratio = |f: &dyn Fn(&Pair) -> f64| median(pairs.iter().map(f).collect());
    let best = |a: &Speeds, b: &Speeds, f: fn(&Speeds) -> f64| f(a).max(f(b));
    let speeds = |f: &dyn Fn(&Pair) -> Speeds| Speeds {
        batch1_tok_s: median(pairs.iter().map(|p| f(p).batch1_tok_s).collect()),
        batch32_tok_s: median(pairs.iter().map(|p| f(p).batch32_tok_s).collect()),
        prefill256_tok_s: median(pairs.iter().map(|p| f(p).prefill256_tok_s).collect()),
    };
    Ok(PeerReport {
        model: model_name,
        machine: kframe_model::device::machine(),
        threads: opts.threads,
        batch1_over_llamacpp_f32: ratio(&|p| p.kframe_f32.batch1_tok_s / p.llamacpp_f32.batch1_tok_s),
        batch1_over_llamacpp_f16: ratio(&|p| p.kframe_f16.batch1_tok_s / p.llamacpp_f16.batch1_tok_s),
        batch32_over_llamacpp_best: ratio(&|p| {
            let f = |s: &Speeds| s.batch32_tok_s;
            best(&p.kframe_f32, &p.kframe_f16, f) / best(&p.llamacpp_f32, &p.llamacpp_f16, f)
        }),
        prefill256_over_llamacpp: ratio(&|p| {
            let f = |s: &Speeds| s.prefill256_tok_s;
            best(&p.kframe_f32, &p.kframe_f16, f) / best(&p.llamacpp_f32, &p.llamacpp_f16, f)
        }),
        same_greedy_tokens: greedy.kframe_identity_equals_tenant_frame && greedy.llamacpp_f32_equals_kframe,
        greedy,
        median: MedianSpeeds {
            llamacpp_f32: speeds(&|p| p.llamacpp_f32),
            llamacpp_f16: speeds(&|p| p.llamacpp_f16),
            kframe_f32: speeds(&|p| p.kframe_f32),
            kframe_f16: speeds(&|p| p.kframe_f16),
        },
        pairs,
    })
}

/// kframe's side of the benchmark alone, `rounds` times after one unmeasured
/// round: the same engine (with `dtype` weights), prompts and workloads as
/// [`peer`], with no llama.cpp
/// (for profiling kframe, and for machines without a llama.cpp build).
pub fn kframe_alone(rounds: usize, dtype: DtypeChoice, mut progress: impl FnMut(&str)) -> anyhow::Result<Vec<Speeds>> {
    let (dir, _, _guard) = model_dir()?;
    let token = prompt_token(dir.config.vocab_size);
    let (engine, _) = serving_engine(&dir, kframe_model::device::dtype(dtype, &Device::Cpu))?;
    let prompts = full_length_prompts(&engine, token)?;
    kframe_speeds(&engine, &prompts, token)?;
    (0..rounds)
        .map(|i| {
            progress(&format!("round {} of {rounds}", i + 1));
            kframe_speeds(&engine, &prompts, token)
        })
        .collect()
}

/// The i-th token of the benchmark's prompts: spread over the vocabulary, never
/// id 0.
fn prompt_token(vocab_size: usize) -> impl Fn(usize) -> u32 + Copy {
    let vocab = vocab_size as u32;
    move |i| (i as u32).wrapping_mul(7919).wrapping_add(13) % (vocab - 1) + 1
}

type Tokens = Vec<Vec<u32>>;

/// kframe's greedy continuation of each prompt in `frame`, and the top-two logit
/// margin of each step. End-of-sequence tokens are never chosen, as llama.cpp's
/// `ignore_eos` masks them (its end-of-generation set for this vocabulary is
/// kframe's, `<|endoftext|>` and `<|im_end|>`).
fn greedy(
    bundle: &ModelBundle,
    prompts: &[Vec<u32>],
    frame: &Frame,
    steps: usize,
) -> anyhow::Result<(Tokens, Vec<Vec<f32>>)> {
    let model = &bundle.model;
    let mut tokens = Vec::with_capacity(prompts.len());
    let mut margins = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut cache = model.new_cache(KvPrecision::Native);
        let mut logits = model.forward(p, &mut cache, frame, Variant::ProbeTime)?;
        let (mut out, mut gaps) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
        while out.len() < steps {
            let mut row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            for &eos in &bundle.eos_token_ids {
                row[eos as usize] = f32::NEG_INFINITY;
            }
            let next = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
            let second = row.iter().enumerate().filter(|&(i, _)| i != next).map(|(_, v)| *v).fold(f32::MIN, f32::max);
            gaps.push(row[next] - second);
            out.push(next as u32);
            logits = model.forward(&[next as u32], &mut cache, frame, Variant::ProbeTime)?;
        }
        tokens.push(out);
        margins.push(gaps);
    }
    Ok((tokens, margins))
}

fn first_difference(kframe: &[Vec<u32>], llama: &[Vec<u32>], margins: &[Vec<f32>]) -> Option<Difference> {
    kframe.iter().zip(llama).enumerate().find_map(|(prompt, (k, l))| {
        let step = k.iter().zip(l).position(|(a, b)| a != b).or((k.len() != l.len()).then(|| k.len().min(l.len())))?;
        Some(Difference {
            prompt,
            step,
            kframe: k.get(step).copied().unwrap_or(u32::MAX),
            llamacpp: l.get(step).copied().unwrap_or(u32::MAX),
            kframe_margin: margins[prompt].get(step).copied().unwrap_or(f32::NAN),
        })
    })
}

fn llama_speeds(llama: &LlamaCpp, model: &std::path::Path) -> anyhow::Result<Speeds> {
    let rows = llama.batched_bench(model, PROMPT, GENERATED, &[1, BATCH])?;
    let row = |pl: usize| rows.iter().find(|r| r.pl == pl).ok_or_else(|| anyhow::anyhow!("no row for {pl} sequences"));
    let prefill = llama.batched_bench(model, PREFILL, 1, &[1; PREFILL_RUNS])?;
    Ok(Speeds {
        batch1_tok_s: row(1)?.generated_per_s(),
        batch32_tok_s: row(BATCH)?.generated_per_s(),
        prefill256_tok_s: median(prefill.iter().map(|r| r.prompt_per_s()).collect()),
    })
}

/// One prompt per tenant that the model continues for all [`GENERATED`] tokens
/// before an end of sequence, so that kframe's batch keeps its size for as many
/// steps as llama-batched-bench's (which never stops early).
fn full_length_prompts(engine: &Engine, token: impl Fn(usize) -> u32) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut prompts = Vec::with_capacity(BATCH);
    let mut candidate = 0;
    while prompts.len() < BATCH {
        anyhow::ensure!(candidate < 50 * BATCH, "the model ends almost every prompt early");
        let prompt: Vec<u32> = (0..PROMPT).map(|i| token(candidate * 31 + i)).collect();
        candidate += 1;
        let (generated, _) = run(engine, 0, &prompt, GENERATED)?;
        if generated == GENERATED {
            prompts.push(prompt);
        }
    }
    Ok(prompts)
}

fn kframe_speeds(engine: &Engine, prompts: &[Vec<u32>], token: impl Fn(usize) -> u32) -> anyhow::Result<Speeds> {
    // A short warm-up first, as llama-batched-bench decodes a warm-up batch just
    // before it times: after the quiet wait the weights have left the caches and
    // the compute threads sleep (the first request after a second idle ran about
    // a third slower than the next).
    run(engine, 1, &prompts[0], PROMPT)?;
    let start = Instant::now();
    let (one, _) = run(engine, 1, &prompts[0], GENERATED)?;
    let batch1 = one as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let streams: Vec<_> = prompts.iter().enumerate().map(|(t, p)| submit(engine, t as u64 + 1, p, GENERATED)).collect();
    let mut generated = 0;
    for s in streams {
        generated += drain(s)?.0;
    }
    let batch32 = generated as f64 / start.elapsed().as_secs_f64();
    // Without a session or a registered shared prefix, a repeated prompt is
    // prefilled anew each time.
    let long: Vec<u32> = (0..PREFILL).map(|i| token(1_000_000 + i * 17)).collect();
    let mut prefill = Vec::with_capacity(PREFILL_RUNS);
    for _ in 0..PREFILL_RUNS {
        let (_, prompt_s) = run(engine, BATCH as u64 + 1, &long, 1)?;
        prefill.push(PREFILL as f64 / prompt_s);
    }
    Ok(Speeds { batch1_tok_s: batch1, batch32_tok_s: batch32, prefill256_tok_s: median(prefill) })
}

fn submit(engine: &Engine, tenant: u64, prompt: &[u32], max_tokens: usize) -> kframe_engine::Stream {
    let tenant = Tenant { id: tenant, key_id: format!("peer-{tenant}"), epoch: 0, tier: 0 };
    let params = SamplingParams { max_tokens, ..Default::default() };
    engine.submit(Submit { tenant, session: None, prompt: prompt.to_vec(), params })
}

/// One request to its end: the tokens generated and the seconds until its first.
fn run(engine: &Engine, tenant: u64, prompt: &[u32], max_tokens: usize) -> anyhow::Result<(usize, f64)> {
    drain(submit(engine, tenant, prompt, max_tokens))
}

/// Reads a stream to its end: tokens generated, and seconds until the first
/// (the prompt's prefill).
fn drain(mut stream: kframe_engine::Stream) -> anyhow::Result<(usize, f64)> {
    let start = Instant::now();
    let (mut tokens, mut first) = (0, None);
    while let Some(ev) = stream.next_blocking() {
        match ev {
            Event::Token { .. } => {
                tokens += 1;
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            }
            Event::Text(_) | Event::Started { .. } => {}
            Event::Done { .. } => break,
            Event::Failed(e) => anyhow::bail!("bench request failed: {e}"),
        }
    }
    Ok((tokens, first.unwrap_or_else(|| start.elapsed().as_secs_f64())))
}

/// Waits (60 s at most) until the machine's CPUs are under a tenth busy over a
/// second; whether they were.
fn wait_for_quiet() -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Some(busy) = busy_fraction(Duration::from_secs(1)) else { return true };
        if busy < 0.10 {
            return true;
        }
    }
    false
}

/// The share of CPU time spent busy across all CPUs over `window`, from
/// /proc/stat (None where there is none).
fn busy_fraction(window: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((fields.iter().sum(), idle))
    }
    let (total0, idle0) = sample()?;
    std::thread::sleep(window);
    let (total1, idle1) = sample()?;
    let total = total1.saturating_sub(total0).max(1);
    Some(1.0 - idle1.saturating_sub(idle0) as f64 / total as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl PeerReport {
    pub fn to_text(&self) -> String {
        let m = &self.median;
        let row = |name: &str, f: &dyn Fn(&Speeds) -> f64, ratio: String| {
            format!(
                "{name:<34} {:>10.0} {:>10.0} {:>10.0} {:>10.0}  {ratio}\n",
                f(&m.llamacpp_f32),
                f(&m.llamacpp_f16),
                f(&m.kframe_f32),
                f(&m.kframe_f16)
            )
        };
        let mut s = format!("model: {}\nmachine: {}, {} threads\n\n", self.model, self.machine, self.threads);
        s += &format!(
            "{:<34} {:>10} {:>10} {:>10} {:>10}  kframe / llama.cpp\n",
            "tokens/s (median of pairs)", "llama f32", "llama f16", "kframe f32", "kframe f16"
        );
        s += &row(
            "batch 1, 16 + 64 generated",
            &|x| x.batch1_tok_s,
            format!("{:.2} (f32), {:.2} (f16)", self.batch1_over_llamacpp_f32, self.batch1_over_llamacpp_f16),
        );
        s += &row(
            "32 sequences, generated / total",
            &|x| x.batch32_tok_s,
            format!("{:.2} (best / best)", self.batch32_over_llamacpp_best),
        );
        s += &row(
            "prefill, 256 tokens",
            &|x| x.prefill256_tok_s,
            format!("{:.2} (best / best)", self.prefill256_over_llamacpp),
        );
        s += &format!(
            "\nsame greedy tokens (f32): {} ({} prompts x {} tokens); with f16 weights a tenant's frame agrees with \
             the identity on {} prompts, llama.cpp with kframe on {}\npairs: {} ({} quiet)\n",
            self.same_greedy_tokens,
            self.greedy.prompts,
            self.greedy.tokens_each,
            self.greedy.kframe_f16_tenant_frame_prompts_equal,
            self.greedy.llamacpp_f16_prompts_equal,
            self.pairs.len(),
            self.pairs.iter().filter(|p| p.quiet).count()
        );
        for q in &self.greedy.quantized {
            s += &format!(
                "{}: llama.cpp chose kframe's first {} tokens on {} of {} prompts; tenant frame = identity: {}\n",
                q.file_type.name(),
                q.steps,
                q.llamacpp_prompts_equal,
                self.greedy.prompts,
                q.kframe_identity_equals_tenant_frame
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn busy_fraction_is_a_share() {
        if let Some(b) = busy_fraction(Duration::from_millis(50)) {
            assert!((0.0..=1.0).contains(&b), "{b}");
        }
    }
}
