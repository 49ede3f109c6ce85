//! kframe-testkit: what kframe's tests share, so that no test file rebuilds it.
//!
//! # Layout
//!
//! - [`TinyModel`]: a seeded random-weight Qwen2 of the test shape, written as a
//!   real Hugging Face directory and loaded from it.
//! - [`sealed`]: sealed, verified caches on that model, and pairs of them with
//!   bytes changed behind the seals (kframe-core's `tamper` hooks).
//! - [`postgres`]: a throwaway PostgreSQL server for the shared registry's tests.
//! - The functions at the top level: differences, scales and greedy margins of
//!   logits, measured against the rounding bounds of `kframe_model::rounding`.
//!
//! # Dependencies
//!
//! kframe-core (with `tamper`) and kframe-model; only ever a dev-dependency.

use candle_core::{DType, Device, Tensor};
use kframe_model::load::ModelDir;
use kframe_model::{Config, ModelBundle, Qwen2};
use tempfile::TempDir;

pub mod postgres;
pub mod sealed;

/// A random-weight Qwen2 written as a real model directory (config.json,
/// model.safetensors, tokenizer.json), which lives as long as this value.
pub struct TinyModel {
    pub dir: ModelDir,
    _tmp: TempDir,
}

impl TinyModel {
    /// The test shape (`synth::tiny_config`) with weights from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_config(&kframe_model::synth::tiny_config(), seed)
    }

    pub fn with_config(cfg: &Config, seed: u64) -> Self {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        kframe_model::synth::write_model_dir(tmp.path(), cfg, seed).expect("writing the model directory");
        let dir = ModelDir::open(tmp.path()).expect("the written directory opens");
        Self { dir, _tmp: tmp }
    }

    pub fn path(&self) -> &std::path::Path {
        self._tmp.path()
    }

    /// The model in f32 on the CPU.
    pub fn load(&self) -> Qwen2 {
        self.dir.load_model(DType::F32, &Device::Cpu).expect("the model loads")
    }

    /// The model and its tokenizer, in f32 on the CPU.
    pub fn bundle(&self) -> ModelBundle {
        ModelBundle::load(&self.dir, DType::F32, &Device::Cpu).expect("the model loads")
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// The largest magnitude in `t`: the scale S of a forward pass's logits.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

pub fn argmax(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

/// The gap between the largest and the second largest logit.
pub fn top2_margin(logits: &Tensor) -> f64 {
    let mut v = logits.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

/// Greedy tokens that two computations of the same logits agree on only where
/// the top two logits are further apart than both may err: a test's prompts are
/// chosen so that every step has such a margin, and this checks it, so that a
/// machine that rounds differently cannot flip a token.
pub fn assert_clear_margins(steps: &[Tensor], tolerance: f64, what: &str) {
    for (step, logits) in steps.iter().enumerate() {
        let margin = top2_margin(logits);
        assert!(
            margin > 2.0 * tolerance,
            "{what}: step {step}'s top-two margin {margin:e} is within twice the rounding bound {tolerance:e}: \
             a greedy token there may differ by rounding alone; choose another prompt"
        );
    }
}

/// A prefill of `prompt` and `decode` greedy steps after it: every token chosen
/// (decode + 1) and the logits it was chosen from.
pub fn greedy(
    model: &Qwen2,
    cache: &mut kframe_core::cache::KvCache,
    frame: &kframe_core::rotation::Frame,
    variant: kframe_model::Variant,
    prompt: &[u32],
    decode: usize,
) -> (Vec<u32>, Vec<Tensor>) {
    let mut logits = vec![model.forward(prompt, cache, frame, variant).unwrap()];
    let mut tokens = vec![argmax(&logits[0])];
    for _ in 0..decode {
        let next = model.forward(&[*tokens.last().unwrap()], cache, frame, variant).unwrap();
        tokens.push(argmax(&next));
        logits.push(next);
    }
    (tokens, logits)
}

/// The rounding bound between two f32 runs of `cfg` over up to `context` tokens,
/// one of them (or both) in a tenant frame of rows `width` wide, at the scale of
/// `logits`.
pub fn frame_tolerance(cfg: &Config, context: usize, width: usize, logits: &Tensor) -> f64 {
    use kframe_model::rounding::{Reductions, F32_UNIT};
    let chain = Reductions::forward_pass(cfg, context).then(Reductions::rotated_layers(cfg, width));
    chain.bound_between(F32_UNIT, max_abs(logits))
}

/// [`frame_tolerance`] at the largest scale of several steps.
pub fn widest_tolerance(cfg: &Config, context: usize, width: usize, steps: &[Tensor]) -> f64 {
    steps.iter().map(|l| frame_tolerance(cfg, context, width, l)).fold(0f64, f64::max)
}
