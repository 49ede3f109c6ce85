//! `kframe bench serve`: what sharing one model between many tenants costs and
//! saves, as ratios measured in one run.
//!
//! - Shared prefill: bringing 1000 tenants' contexts to hold a 256-token public
//!   prefix by prefilling it for each of them, against prefilling it once and
//!   attaching it (`shared-plain`) or rotating a copy into each frame
//!   (`rotate-copy`). Frames are derived beforehand in every arm, and each arm is
//!   also timed through the tenant's first own token.
//! - The engine runs as `kframe serve` does by default: layer 0 norm-padded
//!   (m = 32), every layer verified by the corrective layer.
//! - Batching: aggregate decode tok/s through the engine with 32 concurrent
//!   tenants against one (64 tokens a request after a 16-token prompt; the
//!   median of five back-to-back pairs).
//! - Residency: process memory per resident session beyond its K/V (the slope
//!   over the second half of a few thousand sessions), and the tenants with 256
//!   private tokens that fit in 24 GiB at that rate.
//! - Policy cost: the share of serving time spent inside Wasm policy components.
//! - Corrective layer: a batched decode step of 32 tenants with 256 tokens each,
//!   every layer's reads verified, against the same step unverified.

use candle_core::{DType, Device};
use kframe_core::cache::{KvCache, KvPrecision, SharedPrefix};
use kframe_core::integrity::TagKey;
use kframe_core::keys::MasterSecret;
use kframe_core::layout::{Layout, Padding, DEFAULT_EXTRA};
use kframe_core::rotation::{Frame, Keyring};
use kframe_engine::{Engine, EngineConfig, Event, Submit, Tenant};
use kframe_model::device::DtypeChoice;
use kframe_model::generate::SamplingParams;
use kframe_model::load::ModelDir;
use kframe_model::qwen2::Chunk;
use kframe_model::ModelBundle;
use kframe_model::{synth, Qwen2, Variant};
use kframe_policy::{fallback, Limits, ModelShape, PluginRuntime, PolicyKind, PolicySet};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    pub tenants: usize,
    pub prefix_tokens: usize,
    /// Sessions created to measure per-session memory.
    pub resident_sample: usize,
    /// The weights' dtype (on the CPU f16 and bf16 also store K and V in it).
    pub dtype: DtypeChoice,
}

impl Default for ServeBenchOptions {
    fn default() -> Self {
        Self { tenants: 1000, prefix_tokens: 256, resident_sample: 2000, dtype: DtypeChoice::Auto }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeReport {
    pub model: String,
    pub machine: String,
    /// The weights' dtype, and the K/V cache's.
    pub weights: String,
    pub kv_cache: String,
    pub tenants: usize,
    pub prefix_tokens: usize,
    pub prefill_independent_seconds: f64,
    pub prefill_shared_seconds: f64,
    pub prefill_rotate_copy_seconds: f64,
    /// Independent prefills / shared-plain attach (including its one prefill).
    pub prefill_shared_speedup: f64,
    pub prefill_rotate_copy_speedup: f64,
    /// The same two ratios with each tenant's first own token included.
    pub first_token_shared_speedup: f64,
    pub first_token_rotate_copy_speedup: f64,
    pub batch1_tok_s: f64,
    pub batch32_tok_s: f64,
    pub batch32_over_batch1: f64,
    /// K/V bytes of one tenant with 256 private tokens.
    pub kv_bytes_per_tenant: u64,
    /// Resident memory per session beyond its K/V (0 when below what the
    /// process's resident set resolves).
    pub overhead_bytes_per_tenant: f64,
    /// The raw measurement: resident-set growth and K/V bytes per session.
    pub rss_bytes_per_session: f64,
    pub kv_bytes_per_session: f64,
    /// The keyring's fixed cost at its byte budget (or at the resident tenants,
    /// if they need less).
    pub keyring_bytes: u64,
    /// What the serving engine holds before any tenant: its model, mostly.
    pub fixed_bytes: u64,
    /// Tenants with 256 private tokens each that fit in 24 GiB beside the fixed
    /// bytes and the keyring.
    pub resident_tenants: u64,
    /// Seconds inside policy components / serving seconds, in the batch-32 run
    /// with the shipped capacity and lru components (None if they are not built).
    pub plugin_time_share: Option<f64>,
    /// Extra decode time with every layer's reads verified, as a fraction.
    pub verify_all_overhead: f64,
}

const MASTER: [u8; 32] = [0x5e; 32];

/// The embedded model when this build has one, else a random-weight tiny Qwen2
/// (written to a temporary directory, which the returned guard keeps alive).
pub(super) fn model_dir() -> kframe_model::Result<(ModelDir, String, Option<tempfile::TempDir>)> {
    if let Ok(dir) = ModelDir::embedded() {
        return Ok((dir, kframe_model::load::EMBEDDED_MODEL_NAME.into(), None));
    }
    let tmp = tempfile::tempdir()?;
    let cfg = synth::tiny_config();
    synth::write_model_dir(tmp.path(), &cfg, 1)?;
    let name = format!(
        "random-weight Qwen2, hidden {}, {} layers, {} kv heads, head_dim {} (no embedded model in this build)",
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    );
    Ok((ModelDir::open(tmp.path())?, name, Some(tmp)))
}

/// Pairs of 1-tenant and 32-tenant decode runs.
const DECODE_PAIRS: usize = 5;

pub fn serve(opts: &ServeBenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ServeReport> {
    let (dir, model_name, _guard) = model_dir()?;
    let dtype = kframe_model::device::dtype(opts.dtype, &Device::Cpu);
    let gen = ModelBundle::load(&dir, dtype, &Device::Cpu)?;
    let model = &gen.model;
    let vocab = model.config().vocab_size as u32;
    let token = |i: usize| (i as u32 * 7919 + 13) % (vocab - 1) + 1;
    let prefix: Vec<u32> = (0..opts.prefix_tokens).map(token).collect();

    progress(&format!("deriving {} tenant frames", opts.tenants));
    let ring = Keyring::builder(MasterSecret::from_bytes(MASTER), model.rotation_shape())
        .dtype(model.dtype())
        .capacity(opts.tenants)
        .build();
    let frames: Vec<Frame> =
        (0..opts.tenants).map(|t| ring.frame(&format!("bench-{t}"), 0)).collect::<Result<_, _>>()?;
    let own = [token(100_000)];

    // Each arm: the tenant's context holds the prefix; then (second timer) its first own token.
    let arm = |admit: &dyn Fn(&Frame) -> kframe_model::Result<KvCache>| -> kframe_model::Result<(f64, f64)> {
        let start = Instant::now();
        let mut caches = Vec::with_capacity(frames.len());
        for f in &frames {
            caches.push(admit(f)?);
        }
        let admitted = start.elapsed().as_secs_f64();
        for (cache, f) in caches.iter_mut().zip(&frames) {
            model.forward(&own, cache, f, Variant::ProbeTime)?;
        }
        Ok((admitted, start.elapsed().as_secs_f64()))
    };
    progress(&format!("{} independent prefills of {} tokens", opts.tenants, opts.prefix_tokens));
    let (independent, independent_first) = arm(&|f| {
        let mut c = model.new_cache(KvPrecision::Native);
        model.forward(&prefix, &mut c, f, Variant::ProbeTime)?;
        Ok(c)
    })?;
    let shared_once = Instant::now();
    let mut plain = model.new_cache(KvPrecision::Native);
    model.forward(&prefix, &mut plain, &Frame::Identity, Variant::ProbeTime)?;
    plain.shrink_to_fit()?;
    let shared = Arc::new(SharedPrefix { id: [0; 32], tokens: prefix.clone(), cache: plain });
    let once = shared_once.elapsed().as_secs_f64();
    progress("shared-plain and rotate-copy admissions");
    let (plain_s, plain_first) = arm(&|_| Ok(KvCache::after_prefix(shared.clone(), KvPrecision::Native)))?;
    let (copy_s, copy_first) = arm(&|f| Ok(KvCache::rotated_copy(&shared, f, KvPrecision::Native)?))?;
    drop(frames);

    progress("decode through the engine: 1 and 32 concurrent tenants");
    // What the serving engine holds before any tenant (its model above all).
    let before_engine = resident_bytes();
    let (engine, plugins_loaded) = serving_engine(&dir, dtype)?;
    let fixed_bytes = resident_bytes().saturating_sub(before_engine);
    // `n` tenants at once, `rounds` requests each, one after another: tok/s and the
    // share of that time inside policy components.
    let decode = |n: usize, rounds: usize| -> anyhow::Result<(f64, f64)> {
        let before = engine.metrics().plugin_seconds;
        let start = Instant::now();
        let mut tokens = 0usize;
        for _ in 0..rounds {
            let streams: Vec<_> = (0..n)
                .map(|t| {
                    let prompt: Vec<u32> = (0..16).map(|i| token(t * 31 + i)).collect();
                    let tenant = Tenant { id: t as u64 + 1, key_id: format!("bench-{t}"), epoch: 0, tier: 0 };
                    let params = SamplingParams { max_tokens: 64, ..Default::default() };
                    engine.submit(Submit { tenant, session: None, prompt, params })
                })
                .collect();
            for s in streams {
                tokens += drain(s)?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((tokens as f64 / secs, (engine.metrics().plugin_seconds - before) / secs))
    };
    // Warm-up with all 32: both arms then serve tenants whose frames the keyring
    // already holds (deriving a frame is admission work, not decode). Each pair
    // runs the arms back to back (one tenant's four requests take about as long as
    // 32 tenants' one), so a pair's ratio sees one state of the machine; the
    // median pair is reported.
    decode(32, 1)?;
    let mut pairs = Vec::with_capacity(DECODE_PAIRS);
    for _ in 0..DECODE_PAIRS {
        let (one, _) = decode(1, 4)?;
        let (many, share) = decode(32, 1)?;
        pairs.push((many / one, one, many, share));
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (batch32_over_batch1, batch1, batch32, plugin_share) = pairs[pairs.len() / 2];

    progress("corrective layer: 32 tenants' decode steps verified and unverified");
    let verify_all_overhead = corrective_overhead(model, 32, 256, 8)?;

    progress(&format!("memory of {} resident sessions", opts.resident_sample));
    // Memory is read at half and at all of the sample: the slope leaves out fixed
    // costs, such as the keyring filling up to its capacity in the first half.
    let session = |t: usize| -> anyhow::Result<()> {
        let prompt: Vec<u32> = (0..16).map(|i| token(t * 17 + i)).collect();
        let tenant = Tenant { id: 10_000 + t as u64, key_id: format!("resident-{t}"), epoch: 0, tier: 0 };
        let params = SamplingParams { max_tokens: 1, ..Default::default() };
        let mut s = engine.submit(Submit { tenant, session: Some("s".into()), prompt, params });
        while let Some(ev) = s.next_blocking() {
            if let Event::Failed(e) = ev {
                anyhow::bail!("resident session failed: {e}");
            }
        }
        Ok(())
    };
    let half = opts.resident_sample / 2;
    for t in 0..half {
        session(t)?;
    }
    let at_half = (resident_bytes(), engine.metrics());
    for t in half..2 * half {
        session(t)?;
    }
    let at_end = engine.metrics();
    let kv_added = at_end.cache_bytes - at_half.1.cache_bytes;
    // The keyring grows with the sessions' tenants until its budget: a cost
    // counted once, below, not per session.
    let keyring_added = at_end.keyring_bytes.saturating_sub(at_half.1.keyring_bytes);
    let rss_added = resident_bytes().saturating_sub(at_half.0);
    let overhead = (rss_added as f64 - kv_added as f64 - keyring_added as f64).max(0.0) / half.max(1) as f64;
    let cache_shape = model.new_cache(KvPrecision::Native).shape();
    let layers = cache_shape.layers;
    // The layers the fallback depth gate pads, as the engine above laid them out.
    let (kv_heads, head_dim) = (cache_shape.kv_heads as u32, cache_shape.head_dim as u32);
    let gates = fallback::gates(&ModelShape { layers: layers as u32, kv_heads, head_dim });
    let layout = Layout::new(gates.iter().map(|g| g.pad).collect(), DEFAULT_EXTRA);
    let kv_per_tenant = KvCache::bytes_for(cache_shape, &layout, model.kv_dtype(), 256) as u64;
    // The keyring keeps up to `keyring_capacity` tenants' rotations derived: a fixed
    // cost (R^T and S, w x w, per layer and kv head, f32), not a per-tenant one.
    let shape = model.rotation_shape();
    let per_tenant: usize = (0..layers).map(|l| shape.kv_heads * 2 * layout.width(l, shape.head_dim).pow(2) * 4).sum();
    let (resident, keyring_bytes) = resident_in_24gib(fixed_bytes, kv_per_tenant, overhead, per_tenant as u64);

    Ok(ServeReport {
        model: model_name,
        machine: kframe_model::device::machine(),
        weights: format!("{:?}", model.weights_dtype()).to_lowercase(),
        kv_cache: format!("{:?}", model.kv_dtype()).to_lowercase(),
        tenants: opts.tenants,
        prefix_tokens: opts.prefix_tokens,
        prefill_independent_seconds: independent,
        prefill_shared_seconds: once + plain_s,
        prefill_rotate_copy_seconds: once + copy_s,
        prefill_shared_speedup: independent / (once + plain_s),
        prefill_rotate_copy_speedup: independent / (once + copy_s),
        first_token_shared_speedup: independent_first / (once + plain_first),
        first_token_rotate_copy_speedup: independent_first / (once + copy_first),
        batch1_tok_s: batch1,
        batch32_tok_s: batch32,
        batch32_over_batch1,
        kv_bytes_per_tenant: kv_per_tenant,
        overhead_bytes_per_tenant: overhead,
        rss_bytes_per_session: rss_added as f64 / half.max(1) as f64,
        kv_bytes_per_session: kv_added as f64 / half.max(1) as f64,
        keyring_bytes,
        fixed_bytes,
        resident_tenants: resident,
        plugin_time_share: plugins_loaded.then_some(plugin_share),
        verify_all_overhead,
    })
}

/// Decode time for `seqs` tenants of `context` tokens each with every layer's
/// reads verified, over the same steps with none, minus one. The two modes
/// alternate step by step, so that both see the same machine.
fn corrective_overhead(model: &Qwen2, seqs: usize, context: usize, steps: usize) -> anyhow::Result<f64> {
    let master = MasterSecret::from_bytes(MASTER);
    let key = Arc::new(TagKey::derive(&master));
    let ring = Keyring::builder(master, model.rotation_shape()).capacity(seqs).build();
    let frames: Vec<Frame> = (0..seqs).map(|t| ring.frame(&format!("verify-{t}"), 0)).collect::<Result<_, _>>()?;
    let mut caches = Vec::with_capacity(seqs);
    for f in &frames {
        let mut c = model.new_cache(KvPrecision::Native);
        c.reserve(context + 2 * steps + 1)?;
        c.fill_random(context)?;
        c.seal_with(key.clone(), f)?;
        caches.push(c);
    }
    let layers = model.config().num_hidden_layers;
    let mut step = |verify: bool| -> anyhow::Result<f64> {
        for c in caches.iter_mut() {
            c.set_verify(vec![verify; layers]);
        }
        let mut batch: Vec<Chunk> =
            caches.iter_mut().zip(&frames).map(|(cache, frame)| Chunk::new(&[1], cache, frame)).collect();
        let start = Instant::now();
        model.forward_batch(&mut batch, Variant::ProbeTime)?;
        Ok(start.elapsed().as_secs_f64())
    };
    step(false)?; // warm-up
    let (mut on, mut off) = (0.0, 0.0);
    for _ in 0..steps {
        off += step(false)?;
        on += step(true)?;
    }
    Ok(on / off - 1.0)
}

/// This process's resident set, from /proc (0 where there is none).
/// The budget residency is stated against.
pub(crate) const MEMORY_BUDGET: u64 = 24 << 30;

/// Tenants holding `kv_per_tenant` bytes of K/V and `overhead` bytes of engine
/// state each that fit in [`MEMORY_BUDGET`] beside `fixed` bytes (the model and
/// the engine before any tenant) and the keyring, which holds `keyring_per_tenant`
/// bytes of rotations for each tenant it keeps, up to its budget; and the keyring's
/// bytes at that count.
pub(crate) fn resident_in_24gib(fixed: u64, kv_per_tenant: u64, overhead: f64, keyring_per_tenant: u64) -> (u64, u64) {
    let per_tenant = kv_per_tenant as f64 + overhead;
    let fit = |keyring: u64| (MEMORY_BUDGET.saturating_sub(fixed + keyring) as f64 / per_tenant) as u64;
    let budget = EngineConfig::default().keyring_bytes as u64;
    // The keyring at its budget, unless that many tenants do not fit anyway.
    let keyring = budget.min(fit(0).saturating_mul(keyring_per_tenant));
    (fit(keyring), keyring)
}

pub(crate) fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    pages * 4096
}

impl ServeReport {
    pub fn to_text(&self) -> String {
        let share = self.plugin_time_share.map_or("n/a (plugins not built)".into(), |s| format!("{:.4}%", s * 100.0));
        format!(
            "model: {}\nmachine: {}\nweights {}, K/V cache {}\n\
             shared prefill, {} tenants x {}-token prefix:\n  \
             independent {:.2} s, shared-plain {:.4} s ({:.0}x), rotate-copy {:.3} s ({:.1}x)\n  \
             through each tenant's first own token: shared-plain {:.1}x, rotate-copy {:.1}x\n\
             decode through the engine: 1 tenant {:.1} tok/s, 32 tenants {:.1} tok/s ({:.2}x)\n\
             residency: {} K/V bytes per 256-token tenant, {:.0} bytes overhead per session \
             (resident set +{:.0} B for +{:.0} B of K/V per session), keyring {} MiB, {} tenants in 24 GiB\n\
             time in policy components: {}\n\
             corrective layer, every layer verified: +{:.1}% decode time (32 tenants x 256 tokens)",
            self.model,
            self.machine,
            self.weights,
            self.kv_cache,
            self.tenants,
            self.prefix_tokens,
            self.prefill_independent_seconds,
            self.prefill_shared_seconds,
            self.prefill_shared_speedup,
            self.prefill_rotate_copy_seconds,
            self.prefill_rotate_copy_speedup,
            self.first_token_shared_speedup,
            self.first_token_rotate_copy_speedup,
            self.batch1_tok_s,
            self.batch32_tok_s,
            self.batch32_over_batch1,
            self.kv_bytes_per_tenant,
            self.overhead_bytes_per_tenant,
            self.rss_bytes_per_session,
            self.kv_bytes_per_session,
            self.keyring_bytes >> 20,
            self.resident_tenants,
            share,
            self.verify_all_overhead * 100.0,
        )
    }
}

/// An engine as `kframe serve` runs by default: the shipped capacity and lru
/// components (when built; the second value says whether they were), norm padding
/// (m = 32) on the layers the fallback depth gate pads, every layer verified.
pub(crate) fn serving_engine(dir: &ModelDir, dtype: DType) -> anyhow::Result<(Engine, bool)> {
    let policies = Arc::new(PolicySet::new(PluginRuntime::new(Limits::default(), None)?));
    let plugins = [(PolicyKind::Admission, "capacity"), (PolicyKind::Eviction, "lru")];
    let mut plugins_loaded = true;
    for (kind, name) in plugins {
        match std::fs::read(kframe_policy::shipped(name)) {
            Ok(bytes) => policies.swap(kind, name, &bytes, "")?,
            Err(_) => plugins_loaded = false,
        }
    }
    let bundle = ModelBundle::load(dir, dtype, &Device::Cpu)?;
    let padding =
        Padding { extra: DEFAULT_EXTRA, calibration: kframe_model::calibrate::calibration_for(dir, &bundle)? };
    let config = EngineConfig { padding: Some(padding), ..EngineConfig::default() };
    Ok((Engine::start(bundle, MasterSecret::from_bytes(MASTER), policies, config), plugins_loaded))
}

/// Reads one request's event stream to its end; the tokens it generated.
pub(crate) fn drain(mut stream: kframe_engine::Stream) -> anyhow::Result<usize> {
    use kframe_engine::Event;
    let mut tokens = 0;
    while let Some(ev) = stream.next_blocking() {
        match ev {
            Event::Token { .. } => tokens += 1,
            Event::Text(_) | Event::Started { .. } => {}
            Event::Done { .. } => break,
            Event::Failed(e) => anyhow::bail!("bench request failed: {e}"),
        }
    }
    Ok(tokens)
}
