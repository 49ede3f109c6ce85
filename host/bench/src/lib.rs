//! kframe-bench: the benchmarks behind `kframe bench`, each a ratio measured
//! within one run.
//!
//! # Layout
//!
//! - This file: `kframe bench rotation`, what a tenant's rotation costs a decode
//!   step, and `kframe bench plugins`, what a policy component's decision costs.
//! - [`serve`]: the serving engine (shared prefill, batched decode, memory per
//!   tenant, policy share). [`http`]: the server over loopback, in a child process.
//!   [`peer`]: kframe against llama.cpp on the same model and machine.
//!
//! # Dependencies
//!
//! Every kframe crate but eval and the binary: a leaf.
//!
//! # The rotation bench
//!
//! The model has the layer shape of Qwen2.5-3B (random weights, fewer layers, a
//! smaller vocabulary): rotation costs O(heads * d^2) per layer against
//! O(hidden * intermediate) for the layer, so only the real shape gives the real
//! ratio. Variants are timed in interleaved rounds and compared by their medians,
//! so drift on a noisy machine hits every variant alike. `--preset qwen25-3b`
//! times the whole shape instead (36 layers, the Q4_K_M or Q8_0 GGUF file the
//! peer bench writes): quantized weights make a step cheaper, so rotation's share
//! is larger there than in the f32 slice.

pub mod http;
pub mod peer;
pub mod residency;
pub mod serve;

pub use http::{http, HttpBenchOptions, HttpReport};
pub use peer::real_size::{real_size, RealSizeOptions, RealSizeReport};
pub use peer::{peer, PeerBenchOptions, PeerReport};
pub use residency::{residency, ResidencyOptions, ResidencyReport};
pub use serve::{serve, ServeBenchOptions, ServeReport};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2::ModelForCausalLM;
use kframe_core::cache::{KvCache, KvPrecision};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::error::Result;
use kframe_model::load::ModelDir;
use kframe_model::{synth, Qwen2, Variant};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct RotationBenchOptions {
    pub model: RotationModel,
    /// Where the layer slice runs (the whole shape runs on the CPU).
    pub device: Device,
    pub rounds: usize,
    pub contexts: Vec<usize>,
}

/// The model the rotation bench decodes with.
#[derive(Debug, Clone)]
pub enum RotationModel {
    /// `layers` layers of Qwen2.5-3B's shape in f32, random weights, a smaller
    /// vocabulary; also compared with candle-transformers' qwen2.
    LayerSlice { layers: usize, vocab_size: usize },
    /// Qwen2.5-3B's whole shape from the peer bench's GGUF file (written into
    /// `work_dir` if missing), K and V in f16 as `kframe serve` keeps them.
    Qwen25_3b { work_dir: std::path::PathBuf, tokenizer: std::path::PathBuf, quant: kframe_model::export::FileType },
}

impl Default for RotationBenchOptions {
    fn default() -> Self {
        Self {
            model: RotationModel::LayerSlice { layers: 2, vocab_size: 32_768 },
            device: Device::Cpu,
            rounds: 30,
            contexts: vec![512, 4096],
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ContextTimes {
    pub context: usize,
    pub identity_tok_s: f64,
    pub probe_tok_s: f64,
    pub decode_tok_s: f64,
    pub probe_over_identity: f64,
    pub decode_over_identity: f64,
    pub decode_over_probe: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RotationReport {
    pub model: String,
    pub machine: String,
    /// Where the model ran (candle's name for the device).
    pub device: String,
    pub rounds: usize,
    pub contexts: Vec<ContextTimes>,
    /// The same measurement on the embedded model (empty in builds without one).
    pub embedded_model: Vec<ContextTimes>,
    pub probe_over_identity_ctx512: Option<f64>,
    pub probe_over_identity_ctx4096: Option<f64>,
    pub decode_over_probe_ctx4096: Option<f64>,
    /// kframe (identity) and candle-transformers' qwen2 at context 512, on the
    /// layer slice only: candle-transformers' qwen2 reads no GGUF.
    pub kframe_tok_s: Option<f64>,
    pub candle_tok_s: Option<f64>,
    pub kframe_over_candle: Option<f64>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

const TOKEN: [u32; 1] = [42];

/// Every order of the three variants.
const ORDERS: [[usize; 3]; 6] = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]];

/// Decode-step throughput in the identity frame and in a tenant frame with each
/// variant, the cache holding `ctx` tokens, over interleaved rounds.
fn time_variants(model: &Qwen2, tenant: &Frame, ctx: usize, rounds: usize) -> Result<ContextTimes> {
    let runs: [(&Frame, Variant); 3] =
        [(&Frame::Identity, Variant::ProbeTime), (tenant, Variant::ProbeTime), (tenant, Variant::DecodeTime)];
    let mut caches: Vec<KvCache> = runs.iter().map(|_| model.new_cache(KvPrecision::Native)).collect();
    for cache in &mut caches {
        cache.fill_random(ctx)?;
    }
    let mut times = vec![Vec::new(); runs.len()];
    for round in 0..rounds + 2 {
        // Cycle through every order, so each variant runs after each other one
        // equally often: decode-time's step is the heaviest, and whatever it
        // leaves behind (freed memory, cold caches) should not fall on one of the
        // other two more than on the other.
        let order = ORDERS[round % ORDERS.len()];
        for i in order {
            let (frame, variant) = runs[i];
            let cache = &mut caches[i];
            let dt = time(|| model.forward(&TOKEN, cache, frame, variant))?;
            cache.truncate(ctx)?;
            if round >= 2 {
                times[i].push(dt); // the first two rounds warm caches and allocators
            }
        }
    }
    let [id, probe, decode] = [0, 1, 2].map(|i| 1.0 / median(times[i].clone()));
    Ok(ContextTimes {
        context: ctx,
        identity_tok_s: id,
        probe_tok_s: probe,
        decode_tok_s: decode,
        probe_over_identity: probe / id,
        decode_over_identity: decode / id,
        decode_over_probe: decode / probe,
    })
}

pub fn rotation(opts: &RotationBenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<RotationReport> {
    match &opts.model {
        RotationModel::LayerSlice { layers, vocab_size } => Ok(layer_slice(opts, *layers, *vocab_size, progress)?),
        RotationModel::Qwen25_3b { work_dir, tokenizer, quant } => {
            let file = peer::real_size::prepare_model(work_dir, tokenizer, *quant, &mut progress)?;
            progress("loading the model");
            let dir = ModelDir::open(&file)?;
            let model = dir.load_model(DType::F16, &Device::Cpu)?;
            let contexts = time_contexts(&model, opts, &mut progress)?;
            let cfg = model.config();
            Ok(RotationReport::new(
                format!(
                    "random Qwen2 with Qwen2.5-3B's whole shape: {}, weights {}, K/V f16",
                    shape(cfg),
                    dir.weights_format(DType::F16, None)
                ),
                &Device::Cpu,
                opts.rounds,
                contexts,
                Vec::new(),
                None,
            ))
        }
    }
}

/// A model's shape in words, for the report.
fn shape(cfg: &kframe_model::Config) -> String {
    format!(
        "{} layers, hidden {}, {} heads / {} kv heads, head_dim {}, intermediate {}, vocab {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size
    )
}

/// [`time_variants`] at each of the options' contexts, in one tenant's frame.
fn time_contexts(
    model: &Qwen2,
    opts: &RotationBenchOptions,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<ContextTimes>> {
    let ring = Keyring::builder(MasterSecret::random(), model.rotation_shape())
        .device(model.device().clone())
        .capacity(4)
        .build();
    let tenant = ring.frame("bench-tenant", 0)?;
    let mut contexts = Vec::new();
    for &ctx in &opts.contexts {
        progress(&format!("decode at context {ctx}"));
        contexts.push(time_variants(model, &tenant, ctx, opts.rounds)?);
    }
    Ok(contexts)
}

fn layer_slice(
    opts: &RotationBenchOptions,
    layers: usize,
    vocab_size: usize,
    mut progress: impl FnMut(&str),
) -> Result<RotationReport> {
    let device = opts.device.clone();
    let cfg = synth::qwen25_3b_layer_config(layers, vocab_size);
    progress("building random Qwen2.5-3B-shaped weights");
    let weights = synth::random_weights(&cfg, 1, DType::F32, &device)?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &device);
    let model = Qwen2::new(&cfg, vb.clone())?;
    let contexts = time_contexts(&model, opts, &mut progress)?;

    // The same ratios on the embedded model, whose layers are far smaller than
    // Qwen2.5-3B's while d is the same: the worst case for rotation's share.
    let mut embedded_contexts = Vec::new();
    if let Ok(dir) = ModelDir::embedded() {
        progress("the embedded model");
        let embedded = dir.load_model(DType::F32, &device)?;
        let ring = Keyring::builder(MasterSecret::random(), embedded.rotation_shape())
            .device(device.clone())
            .capacity(4)
            .build();
        let embedded_tenant = ring.frame("bench-tenant", 0)?;
        for ctx in [512, 1000].into_iter().filter(|&c| c < embedded.config().max_position_embeddings) {
            embedded_contexts.push(time_variants(&embedded, &embedded_tenant, ctx, opts.rounds)?);
        }
    }

    // kframe (identity) against candle-transformers' qwen2 on the same weights,
    // both decoding after the same 512-token prefill, steps interleaved.
    progress("prefill 512 tokens in kframe and in candle-transformers qwen2");
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919) % cfg.vocab_size as u32).collect();
    let mut reference = ModelForCausalLM::new(&cfg.to_candle(), vb)?;
    let mut cache = model.new_cache(KvPrecision::Native);
    model.forward(&prompt, &mut cache, &Frame::Identity, Variant::ProbeTime)?;
    reference.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, 0)?;
    progress("decode steps, kframe vs candle");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for step in 0..opts.rounds + 2 {
        let pos = prompt.len() + step;
        let t_ours = time(|| model.forward(&TOKEN, &mut cache, &Frame::Identity, Variant::ProbeTime))?;
        let ids = Tensor::new(&TOKEN, &device)?.unsqueeze(0)?;
        let t_theirs = time(|| Ok(reference.forward(&ids, pos)?))?;
        if step >= 2 {
            ours.push(t_ours);
            theirs.push(t_theirs);
        }
    }
    Ok(RotationReport::new(
        format!("random Qwen2 with Qwen2.5-3B layer shape: {}, f32", shape(&cfg)),
        &device,
        opts.rounds,
        contexts,
        embedded_contexts,
        Some((1.0 / median(ours), 1.0 / median(theirs))),
    ))
}

impl RotationReport {
    /// `versus_candle`: kframe's and candle-transformers' tok/s.
    fn new(
        model: String,
        device: &Device,
        rounds: usize,
        contexts: Vec<ContextTimes>,
        embedded_model: Vec<ContextTimes>,
        versus_candle: Option<(f64, f64)>,
    ) -> Self {
        let at = |ctx: usize, f: fn(&ContextTimes) -> f64| contexts.iter().find(|c| c.context == ctx).map(f);
        RotationReport {
            model,
            machine: kframe_model::device::machine(),
            device: format!("{device:?}"),
            rounds,
            probe_over_identity_ctx512: at(512, |c| c.probe_over_identity),
            probe_over_identity_ctx4096: at(4096, |c| c.probe_over_identity),
            decode_over_probe_ctx4096: at(4096, |c| c.decode_over_probe),
            contexts,
            embedded_model,
            kframe_tok_s: versus_candle.map(|v| v.0),
            candle_tok_s: versus_candle.map(|v| v.1),
            kframe_over_candle: versus_candle.map(|(ours, theirs)| ours / theirs),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = format!(
            "model: {}\nmachine: {}\ndevice: {}\nrounds: {} (medians)\n\n",
            self.model, self.machine, self.device, self.rounds
        );
        s += "context  identity tok/s  probe-time tok/s  decode-time tok/s  probe/identity  decode/identity\n";
        let row = |c: &ContextTimes| {
            format!(
                "{:>7}  {:>14.2}  {:>16.2}  {:>17.2}  {:>14.3}  {:>15.3}\n",
                c.context,
                c.identity_tok_s,
                c.probe_tok_s,
                c.decode_tok_s,
                c.probe_over_identity,
                c.decode_over_identity
            )
        };
        s.extend(self.contexts.iter().map(row));
        if !self.embedded_model.is_empty() {
            s += "\nembedded model:\n";
        }
        s.extend(self.embedded_model.iter().map(row));
        if let (Some(ours), Some(theirs), Some(ratio)) = (self.kframe_tok_s, self.candle_tok_s, self.kframe_over_candle)
        {
            s += &format!(
                "\nkframe (identity) {ours:.2} tok/s vs candle-transformers qwen2 {theirs:.2} tok/s at context 512: kframe/candle = {ratio:.3}\n"
            );
        }
        s
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginReport {
    pub machine: String,
    pub entries: usize,
    pub samples: usize,
    /// One `victims` call through the lru component, 1000 live entries.
    pub eviction_1000_us_median: f64,
    /// One `decide` call through the capacity component.
    pub admission_us_median: f64,
    /// The native LRU fallback over the same entries, for scale.
    pub native_eviction_1000_us_median: f64,
}

/// Median microseconds of `samples` runs of `f`.
fn median_us(samples: usize, mut f: impl FnMut()) -> f64 {
    let times = (0..samples)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median(times)
}

pub fn plugins() -> anyhow::Result<PluginReport> {
    use kframe_policy::{shipped, Entry, Limits, Load, PluginRuntime, PolicyKind, PolicySet, Request};
    let set = PolicySet::new(PluginRuntime::new(Limits::default(), None)?);
    for (kind, name) in [(PolicyKind::Eviction, "lru"), (PolicyKind::Admission, "capacity")] {
        let path = shipped(name);
        let bytes = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}; run scripts/build-plugins.sh", path.display()))?;
        set.swap(kind, name, &bytes, "")?;
    }
    let entries = 1000;
    let mut mirror = kframe_entries::EntryTable::default();
    for id in 0..entries as u64 {
        let entry = Entry { id, tenant: id % 37, bytes: 4096 + id, tokens: 64, pinned: false, inserted: id };
        set.on_insert(entry);
        mirror.insert(entry.into());
    }
    let samples = 300;
    let mut now = entries as u64;
    let eviction = median_us(samples, || {
        now += 1;
        let d = set.victims(3 * 4096, now);
        assert!(matches!(d.by, kframe_policy::DecidedBy::Plugin(_)), "{:?}", d.by);
    });
    let native = median_us(samples, || {
        std::hint::black_box(mirror.lru_victims(3 * 4096));
    });
    let load = Load { active_sequences: 10, queued: 0, queue_limit: 64, cache_bytes: 1 << 20, cache_budget: 1 << 30 };
    let req = Request {
        tenant: 1,
        tier: 0,
        prompt_tokens: 100,
        max_tokens: 100,
        bytes_needed: 1 << 16,
        now: 1,
        tenant_running: 0,
        tenant_queued: 0,
    };
    let admission = median_us(samples, || {
        std::hint::black_box(set.admit(&req, &load));
    });
    Ok(PluginReport {
        machine: kframe_model::device::machine(),
        entries,
        samples,
        eviction_1000_us_median: eviction,
        admission_us_median: admission,
        native_eviction_1000_us_median: native,
    })
}

impl PluginReport {
    pub fn to_text(&self) -> String {
        format!(
            "machine: {}\nmedians of {} calls\neviction decision over {} entries (lru component): {:.1} us\n\
             native LRU over the same entries: {:.1} us\nadmission decision (capacity component): {:.1} us\n",
            self.machine,
            self.samples,
            self.entries,
            self.eviction_1000_us_median,
            self.native_eviction_1000_us_median,
            self.admission_us_median
        )
    }
}
