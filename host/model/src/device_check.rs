//! `kframe check-device`: the engine's rotation and batching guarantees, run on
//! the device it is to serve from.
//!
//! The test suite proves these on the CPU. Another device (a GPU) computes with
//! its own kernels, in its own summation order, so before serving from it an
//! operator runs the same guarantees there:
//!
//! - **frames**: a tenant's frame (probe-time and decode-time rotation) chooses
//!   the identity frame's greedy tokens;
//! - **batch**: sequences in six frames, stepping together, choose the tokens each
//!   chooses alone;
//! - **exact round trip**: an exact-mode cache (f64) gives back each layer's
//!   plaintext f16 K and V bit for bit;
//! - **wrong key**: another tenant's frame recovers noise from that cache.
//!
//! Greedy tokens are compared only while the top-two logit margin is wider than
//! twice the rounding bound of [`crate::rounding`]: below it, two correct
//! computations may choose differently, and the sequences part from there.

use crate::qwen2::{Chunk, Trace};
use crate::rounding::{Reductions, F32_UNIT};
use crate::{Config, Qwen2, Result, Variant};
use candle_core::{DType, Tensor};
use kframe_core::cache::{KvCache, KvPrecision, RoundTrip};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};

/// Decode steps after each prompt.
const STEPS: usize = 16;
const TENANTS: [&str; 5] = ["ana", "ben", "cy", "dee", "eli"];

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceCheckReport {
    pub device: String,
    pub checks: Vec<Check>,
    pub passed: bool,
}

impl DeviceCheckReport {
    pub fn to_text(&self) -> String {
        let mut s = format!("device: {}\n", self.device);
        for c in &self.checks {
            s += &format!("{} {}: {}\n", if c.passed { "PASS" } else { "FAIL" }, c.name, c.detail);
        }
        s
    }
}

/// Runs every check. `model` decodes in f32 (the token checks' bound is f32's);
/// `exact` is the same model with f16 K and V, for the exact-mode round trip.
pub fn run(model: &Qwen2, exact: &Qwen2) -> Result<DeviceCheckReport> {
    let (round_trip, wrong_key) = exact_cache(exact)?;
    let checks = vec![frames(model)?, batch(model)?, round_trip, wrong_key];
    let passed = checks.iter().all(|c| c.passed);
    Ok(DeviceCheckReport { device: format!("{:?}", model.device()), checks, passed })
}

/// Token-id prompts of 3 to 23 tokens, one per frame.
fn prompts(cfg: &Config) -> Vec<Vec<u32>> {
    let vocab = cfg.vocab_size as u32 - 1;
    (0..=TENANTS.len() as u32)
        .map(|i| (0..3 + 4 * i).map(|j| (17 * i + 5 * j) % vocab.min(250) + 1).collect())
        .collect()
}

fn keyring(model: &Qwen2, precision: KvPrecision) -> Keyring {
    Keyring::builder(MasterSecret::from_bytes([2; 32]), model.rotation_shape())
        .device(model.device().clone())
        .precision(precision)
        .capacity(TENANTS.len() + 1)
        .build()
}

fn frames_of(ring: &Keyring) -> Result<Vec<Frame>> {
    let mut frames = vec![Frame::Identity];
    for t in TENANTS {
        frames.push(ring.frame(t, 0)?);
    }
    Ok(frames)
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(0)?.to_scalar::<u32>()?)
}

/// Twice the rounding bound between two f32 computations of these logits that
/// differ in frame or batch: greedy tokens are compared only above it.
fn clear_margin(cfg: &Config, context: usize, logits: &Tensor) -> Result<(f64, f64)> {
    let mut v = logits.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let scale = v.iter().fold(0f64, |m, x| m.max(x.abs()));
    v.sort_by(|a, b| b.total_cmp(a));
    let chain = Reductions::forward_pass(cfg, context).then(Reductions::rotated_layers(cfg, cfg.head_dim));
    Ok((v[0] - v[1], 2.0 * chain.bound_between(F32_UNIT, scale)))
}

/// Greedy decoding of `prompt`: the tokens, and how many of them were chosen by
/// a margin clear of rounding (the ones a comparison may rely on).
fn greedy(model: &Qwen2, prompt: &[u32], frame: &Frame, variant: Variant) -> Result<(Vec<u32>, usize)> {
    let mut cache = model.new_cache(KvPrecision::Native);
    let mut logits = model.forward(prompt, &mut cache, frame, variant)?;
    let (mut tokens, mut clear) = (Vec::new(), None);
    for step in 0..=STEPS {
        let (margin, bound) = clear_margin(model.config(), prompt.len() + step, &logits)?;
        if clear.is_none() && margin <= bound {
            clear = Some(step);
        }
        tokens.push(argmax(&logits)?);
        if step < STEPS {
            logits = model.forward(&tokens[step..=step], &mut cache, frame, variant)?;
        }
    }
    Ok((tokens, clear.unwrap_or(STEPS + 1)))
}

fn frames(model: &Qwen2) -> Result<Check> {
    let ring = keyring(model, KvPrecision::Native);
    let frames = frames_of(&ring)?;
    let (mut compared, mut differ) = (0, Vec::new());
    for (i, prompt) in prompts(model.config()).iter().enumerate().take(4) {
        let (plain, clear) = greedy(model, prompt, &Frame::Identity, Variant::ProbeTime)?;
        for variant in [Variant::ProbeTime, Variant::DecodeTime] {
            let (rotated, _) = greedy(model, prompt, &frames[1 + i], variant)?;
            compared += clear;
            if rotated[..clear] != plain[..clear] {
                differ.push(format!("prompt {i} {variant:?}: {:?} vs {:?}", &rotated[..clear], &plain[..clear]));
            }
        }
    }
    Ok(Check {
        name: "frames",
        passed: differ.is_empty() && compared > 0,
        detail: if differ.is_empty() {
            format!("{compared} greedy tokens with clear margins equal in tenant frames (probe- and decode-time) and the identity frame")
        } else {
            differ.join("; ")
        },
    })
}

fn batch(model: &Qwen2) -> Result<Check> {
    let ring = keyring(model, KvPrecision::Native);
    let frames = frames_of(&ring)?;
    let prompts = prompts(model.config());
    let alone: Vec<(Vec<u32>, usize)> =
        frames.iter().zip(&prompts).map(|(f, p)| greedy(model, p, f, Variant::ProbeTime)).collect::<Result<_>>()?;
    let mut caches: Vec<KvCache> = Vec::new();
    let mut together: Vec<Vec<u32>> = Vec::new();
    for (frame, prompt) in frames.iter().zip(&prompts) {
        let mut cache = model.new_cache(KvPrecision::Native);
        together.push(vec![argmax(&model.forward(prompt, &mut cache, frame, Variant::ProbeTime)?)?]);
        caches.push(cache);
    }
    for _ in 0..STEPS {
        let next: Vec<u32> = together.iter().map(|t| *t.last().unwrap()).collect();
        let mut seqs: Vec<Chunk> = caches
            .iter_mut()
            .zip(&frames)
            .zip(&next)
            .map(|((cache, frame), token)| Chunk::new(std::slice::from_ref(token), cache, frame))
            .collect();
        let logits = model.forward_batch(&mut seqs, Variant::ProbeTime)?;
        for (i, t) in together.iter_mut().enumerate() {
            t.push(argmax(&logits.get(i)?)?);
        }
    }
    let mut compared = 0;
    let mut differ = Vec::new();
    for (i, ((solo, clear), batched)) in alone.iter().zip(&together).enumerate() {
        compared += clear;
        if solo[..*clear] != batched[..*clear] {
            differ.push(format!("sequence {i}: {:?} batched vs {:?} alone", &batched[..*clear], &solo[..*clear]));
        }
    }
    Ok(Check {
        name: "batch",
        passed: differ.is_empty() && compared > 0,
        detail: if differ.is_empty() {
            format!("{} sequences in {} frames stepping together: {compared} greedy tokens with clear margins equal their solo runs", frames.len(), frames.len())
        } else {
            differ.join("; ")
        },
    })
}

/// The plaintext K and V of `prompt` and `STEPS` greedy tokens in `frame`'s
/// exact cache, and the cache.
fn traced(model: &Qwen2, frame: &Frame, prompt: &[u32]) -> Result<(KvCache, Vec<Tensor>, Vec<Tensor>)> {
    let mut cache = model.new_cache(KvPrecision::Exact);
    let layers = model.config().num_hidden_layers;
    let (mut ks, mut vs) = (vec![Vec::new(); layers], vec![Vec::new(); layers]);
    let mut tokens = prompt.to_vec();
    for _ in 0..STEPS {
        let mut trace = Trace::default();
        let logits = model.forward_traced(&tokens, &mut cache, frame, Variant::ProbeTime, Some(&mut trace))?;
        for l in 0..layers {
            ks[l].push(trace.k[l].clone());
            vs[l].push(trace.v[l].clone());
        }
        tokens = vec![argmax(&logits)?];
    }
    let cat = |parts: Vec<Vec<Tensor>>| {
        parts.into_iter().map(|p| Tensor::cat(&p, 1)).collect::<candle_core::Result<Vec<_>>>()
    };
    Ok((cache, cat(ks)?, cat(vs)?))
}

/// Every layer's K and V recovered from `cache` with `frame`, against the plaintext.
fn recover(cache: &KvCache, frame: &Frame, k: &[Tensor], v: &[Tensor]) -> Result<RoundTrip> {
    let mut total: Option<RoundTrip> = None;
    for layer in 0..k.len() {
        let (rk, rv) = cache.recover(layer, frame)?;
        let rt = RoundTrip::compare(&k[layer], &rk)?.merge(RoundTrip::compare(&v[layer], &rv)?);
        total = Some(total.map_or(rt, |t| t.merge(rt)));
    }
    Ok(total.expect("a model has layers"))
}

/// The exact round trip and the wrong-key read of one exact cache.
fn exact_cache(exact: &Qwen2) -> Result<(Check, Check)> {
    let ring = keyring(exact, KvPrecision::Exact);
    let frames = frames_of(&ring)?;
    let prompt = &prompts(exact.config())[3];
    let (cache, k, v) = traced(exact, &frames[1], prompt)?;
    let own = recover(&cache, &frames[1], &k, &v)?;
    let other = recover(&cache, &frames[2], &k, &v)?;
    let scale = k.iter().chain(&v).map(max_abs).collect::<Result<Vec<f64>>>()?.into_iter().fold(0f64, f64::max);
    let round_trip = Check {
        name: "exact round trip",
        passed: own.is_bit_exact() && own.elements > 0,
        detail: format!(
            "{} of {} {:?} K/V elements over {} layers recovered bit for bit from an exact cache",
            own.bit_exact,
            own.elements,
            exact.kv_dtype(),
            k.len()
        ),
    };
    // A wrong frame rotates each row by an unrelated orthonormal matrix: its error
    // is of the rows' own size, not of rounding's.
    let wrong = Check {
        name: "wrong key",
        passed: other.max_abs_err >= 0.1 * scale,
        detail: format!(
            "another tenant's frame recovers {} of {} elements bit for bit, largest error {:.3} against rows up to {:.3}",
            other.bit_exact, other.elements, other.max_abs_err, scale
        ),
    };
    Ok((round_trip, wrong))
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}
