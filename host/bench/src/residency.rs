//! `kframe bench serve --preset qwen25-3b`: how many tenants Qwen2.5-3B's whole
//! shape holds resident, each with 256 rows of its own in its own frame, beside
//! the Q4_K_M weights; and what a tenant's frame costs at that depth.
//!
//! - Keys at real depth: 36 layers x 2 kv heads x (R, S), 144 Haar matrices a
//!   tenant. Derivation time per tenant (p50, p99) and the bytes it holds.
//! - Admission with a cold keyring: tenants the keyring does not hold, one at a
//!   time, time to first token (p50, p99), against the same tenants again with
//!   their frames still derived.
//! - Residency: a 256-token public prefix is prefilled once, and `tenants`
//!   tenants are admitted behind it with `rotate-copy` (each gets its own copy of
//!   the prefix's rows, rotated into its frame: 256 private rows, no prefill of
//!   its own) and one token of their own, each keeping a session. The engine's
//!   cache bytes, the keyring's bytes and the process's resident memory are then
//!   read, and the tenants that fit in 24 GiB at those rates are stated.
//!
//! The engine runs as `kframe serve` does by default (norm padding on layer 0,
//! every layer verified), with a cache budget large enough for the tenants.

use crate::peer::real_size::prepare_model;
use crate::serve::{drain, resident_bytes, resident_in_24gib, MEMORY_BUDGET};
use candle_core::{DType, Device};
use kframe_core::keys::{MasterSecret, TenantKey};
use kframe_core::layout::{Layout, Padding, DEFAULT_EXTRA};
use kframe_core::rotation::TenantRotation;
use kframe_engine::{Engine, EngineConfig, PrefixMode, Submit, Tenant, TenantLimits};
use kframe_model::export::FileType;
use kframe_model::generate::SamplingParams;
use kframe_model::load::ModelDir;
use kframe_model::ModelBundle;
use kframe_policy::{Limits, PluginRuntime, PolicyKind, PolicySet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ResidencyOptions {
    pub work_dir: PathBuf,
    pub tokenizer: PathBuf,
    pub tenants: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ResidencyReport {
    pub model: String,
    pub weights: String,
    pub machine: String,
    pub layers: usize,
    /// 36 x 2 x 2 on Qwen2.5-3B.
    pub matrices_per_tenant: usize,
    pub keyring_bytes_per_tenant: u64,
    pub derive_p50_ms: f64,
    pub derive_p99_ms: f64,
    /// A new tenant's time to first token (its frame derived at admission), and
    /// the same tenant's next request with the frame still held.
    pub cold_admission_p50_ms: f64,
    pub cold_admission_p99_ms: f64,
    pub warm_admission_p50_ms: f64,
    pub warm_admission_p99_ms: f64,
    pub prefix_tokens: usize,
    /// Tenants admitted and still holding their sessions at the end.
    pub tenants_admitted: usize,
    pub admit_seconds: f64,
    pub evictions: u64,
    pub cache_bytes: u64,
    pub kv_bytes_per_tenant: u64,
    pub keyring_bytes_held: u64,
    pub process_rss_bytes: u64,
    /// The engine and its model right after loading, and before the resident
    /// tenants (after the first requests: candle's quantized kernels repack the
    /// weights on first use, and the prefix is held).
    pub loaded_bytes: u64,
    pub fixed_bytes: u64,
    /// Resident memory per tenant beyond its K/V (sessions, tables).
    pub overhead_bytes_per_tenant: f64,
    /// Tenants with 256 private tokens that fit in 24 GiB beside the weights, and
    /// the keyring's share of the 24 GiB at that count.
    pub resident_tenants: u64,
    pub keyring_share: f64,
}

const PREFIX: usize = 256;
const MASTER: [u8; 32] = [0x3b; 32];

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

pub fn residency(opts: &ResidencyOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ResidencyReport> {
    let file = prepare_model(&opts.work_dir, &opts.tokenizer, FileType::Q4KM, &mut progress)?;
    let dir = ModelDir::open(&file)?;
    let cfg = dir.config.clone();
    let vocab = cfg.vocab_size as u32;
    let token = move |i: usize| (i as u32).wrapping_mul(7919).wrapping_add(13) % (vocab - 1) + 1;

    progress("deriving frames: 20 tenants at real depth");
    let bundle = ModelBundle::load(&dir, DType::F16, &Device::Cpu)?;
    let padding =
        Padding { extra: DEFAULT_EXTRA, calibration: kframe_model::calibrate::calibration_for(&dir, &bundle)? };
    let shape = bundle.model.rotation_shape();
    let mut padded = vec![false; cfg.num_hidden_layers];
    padded[0] = true;
    let layout = Layout::new(padded, DEFAULT_EXTRA);
    let master = MasterSecret::from_bytes(MASTER);
    let mut derive_ms = Vec::new();
    let mut keyring_bytes_per_tenant = 0;
    for t in 0..20 {
        let key = TenantKey::derive(&master, &format!("derive-{t}"), 0);
        let start = Instant::now();
        let rot =
            TenantRotation::derive(&key, shape, bundle.model.dtype(), false, &Device::Cpu, &layout, Some(&padding))?;
        derive_ms.push(start.elapsed().as_secs_f64() * 1e3);
        keyring_bytes_per_tenant = rot.bytes() as u64;
    }
    let weights = dir.weights_format(DType::F16, None);
    drop(bundle);

    progress("loading the engine");
    let before = resident_bytes();
    let policies = Arc::new(PolicySet::new(PluginRuntime::new(Limits::default(), None)?));
    for (kind, name) in [(PolicyKind::Admission, "capacity"), (PolicyKind::Eviction, "lru")] {
        if let Ok(bytes) = std::fs::read(kframe_policy::shipped(name)) {
            policies.swap(kind, name, &bytes, "")?;
        }
    }
    let engine_bundle = ModelBundle::load(&dir, DType::F16, &Device::Cpu)?;
    let config = EngineConfig {
        padding: Some(padding),
        prefix_mode: PrefixMode::RotateCopy,
        kv_budget: MEMORY_BUDGET,
        tenant_limits: TenantLimits { cache_bytes: Some(MEMORY_BUDGET), ..TenantLimits::default() },
        ..EngineConfig::default()
    };
    let engine = Engine::start(engine_bundle, master, policies, config);
    let loaded_bytes = resident_bytes().saturating_sub(before);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    progress(&format!("prefilling the {PREFIX}-token public prefix once"));
    let prefix: Vec<u32> = (0..PREFIX).map(|i| token(500_000 + i)).collect();
    rt.block_on(engine.register_prefix(prefix.clone()))?;

    let submit = |id: u64, name: &str, own: u32| {
        let tenant = Tenant { id, key_id: name.to_owned(), epoch: 0, tier: 0 };
        let mut prompt = prefix.clone();
        prompt.push(own);
        let params = SamplingParams { max_tokens: 1, ..Default::default() };
        engine.submit(Submit { tenant, session: Some("resident".into()), prompt, params })
    };
    progress("admission with a cold keyring: 20 new tenants one at a time, then again warm");
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for t in 0..20u64 {
        let start = Instant::now();
        drain(submit(1_000_000 + t, &format!("cold-{t}"), token(t as usize)))?;
        cold.push(start.elapsed().as_secs_f64() * 1e3);
    }
    for t in 0..20u64 {
        let start = Instant::now();
        drain(submit(1_000_000 + t, &format!("cold-{t}"), token(t as usize + 7)))?;
        warm.push(start.elapsed().as_secs_f64() * 1e3);
    }

    progress(&format!("admitting {} tenants with {PREFIX} rotated rows each", opts.tenants));
    let start = Instant::now();
    let before_tenants = (resident_bytes(), engine.metrics().cache_bytes);
    // What the engine holds before the resident tenants, theirs left out: the
    // model (with what candle's quantized kernels repack on first use), the
    // prefix, less the cold tenants' K/V and frames.
    let cold_frames = 20 * keyring_bytes_per_tenant;
    let fixed_bytes = before_tenants.0.saturating_sub(before + before_tenants.1 + cold_frames);
    for wave in (0..opts.tenants).collect::<Vec<_>>().chunks(32) {
        let streams: Vec<_> =
            wave.iter().map(|&t| submit(t as u64 + 1, &format!("resident-{t}"), token(1000 + t))).collect();
        for s in streams {
            drain(s)?;
        }
    }
    let admit_seconds = start.elapsed().as_secs_f64();
    let m = engine.metrics();
    let admitted = m.cache_bytes_by_tenant.keys().filter(|&&id| (1..=opts.tenants as u64).contains(&id)).count();
    let process_rss_bytes = resident_bytes();
    let kv_added = m.cache_bytes.saturating_sub(before_tenants.1);
    let kv_bytes_per_tenant = kv_added / opts.tenants.max(1) as u64;
    // Beyond the K/V and the keyring filling to its budget: session tables.
    let keyring_held = m.keyring_bytes;
    let keyring_added = keyring_held.saturating_sub(cold_frames) as f64;
    let rss_added = process_rss_bytes.saturating_sub(before_tenants.0) as f64;
    let overhead = ((rss_added - kv_added as f64 - keyring_added) / opts.tenants.max(1) as f64).max(0.0);
    let (resident, keyring) = resident_in_24gib(fixed_bytes, kv_bytes_per_tenant, overhead, keyring_bytes_per_tenant);
    engine.shutdown();
    Ok(ResidencyReport {
        model: format!("random-weight Qwen2.5-3B shape ({})", file.display()),
        weights,
        machine: kframe_model::device::machine(),
        layers: cfg.num_hidden_layers,
        matrices_per_tenant: cfg.num_hidden_layers * cfg.num_key_value_heads * 2,
        keyring_bytes_per_tenant,
        derive_p50_ms: percentile(derive_ms.clone(), 0.5),
        derive_p99_ms: percentile(derive_ms, 0.99),
        cold_admission_p50_ms: percentile(cold.clone(), 0.5),
        cold_admission_p99_ms: percentile(cold, 0.99),
        warm_admission_p50_ms: percentile(warm.clone(), 0.5),
        warm_admission_p99_ms: percentile(warm, 0.99),
        prefix_tokens: PREFIX,
        tenants_admitted: admitted,
        admit_seconds,
        evictions: m.evictions,
        cache_bytes: m.cache_bytes,
        kv_bytes_per_tenant,
        keyring_bytes_held: keyring_held,
        process_rss_bytes,
        loaded_bytes,
        fixed_bytes,
        overhead_bytes_per_tenant: overhead,
        resident_tenants: resident,
        keyring_share: keyring as f64 / MEMORY_BUDGET as f64,
    })
}

impl ResidencyReport {
    pub fn to_text(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        format!(
            "model: {}\nweights: {}\nmachine: {}\n\nkeys: {} matrices a tenant ({} layers), {:.1} MB; derived in {:.0} ms \
             p50, {:.0} ms p99\nadmission, cold keyring: {:.0} ms p50, {:.0} ms p99 (warm: {:.0} / {:.0} ms)\n\
             resident: {} tenants admitted behind a {}-token prefix in {:.0} s, {} evictions; K/V {:.2} GB ({:.1} MB a \
             tenant), keyring {:.2} GB, process {:.2} GB (engine and model: {:.2} GB loaded, {:.2} GB before the resident \
             tenants)\n\
             tenants with 256 private tokens in 24 GiB: {} (keyring share {:.1}%)\n",
            self.model,
            self.weights,
            self.machine,
            self.matrices_per_tenant,
            self.layers,
            self.keyring_bytes_per_tenant as f64 / 1e6,
            self.derive_p50_ms,
            self.derive_p99_ms,
            self.cold_admission_p50_ms,
            self.cold_admission_p99_ms,
            self.warm_admission_p50_ms,
            self.warm_admission_p99_ms,
            self.tenants_admitted,
            self.prefix_tokens,
            self.admit_seconds,
            self.evictions,
            gb(self.cache_bytes),
            self.kv_bytes_per_tenant as f64 / 1e6,
            gb(self.keyring_bytes_held),
            gb(self.process_rss_bytes),
            gb(self.loaded_bytes),
            gb(self.fixed_bytes),
            self.resident_tenants,
            self.keyring_share * 100.0
        )
    }
}
