//! Caches for the corrective layer's tests: sealed for their owner, verifying every
//! layer, on a tiny random model (2 layers, 2 kv heads), and pairs of them whose
//! bytes were changed without sealing.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kframe_core::cache::{KvCache, KvPrecision};
use kframe_core::integrity::TagKey;
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::{synth, Qwen2, Variant};
use std::sync::Arc;

/// A model, a keyring, the server's tag key and a 70-token prompt: blocks at
/// positions 0..32, 32..64 and 64..70.
pub struct Setup {
    pub model: Qwen2,
    pub ring: Keyring,
    pub key: Arc<TagKey>,
    pub prompt: Vec<u32>,
}

pub fn setup() -> Setup {
    setup_in(DType::F32)
}

/// [`setup`] with the model's weights in `dtype` (on the CPU, f16 and bf16 also
/// store the cache in it).
pub fn setup_in(dtype: DType) -> Setup {
    let cfg = synth::tiny_config();
    let weights = synth::random_weights(&cfg, 3, DType::F32, &Device::Cpu).expect("random weights");
    let model = Qwen2::new(&cfg, VarBuilder::from_tensors(weights, dtype, &Device::Cpu)).expect("the model");
    let master = MasterSecret::from_bytes([9; 32]);
    let key = Arc::new(TagKey::derive(&master));
    let ring = Keyring::builder(master, model.rotation_shape()).dtype(model.dtype()).capacity(8).build();
    let prompt = (0..70u32).map(|i| (i * 37 + 11) % 500).collect();
    Setup { model, ring, key, prompt }
}

/// A sealed cache holding the prompt, prefilled in `frame`, verifying every layer.
pub fn prefilled(s: &Setup, frame: &Frame) -> KvCache {
    let mut c = s.model.new_cache(KvPrecision::Native);
    c.seal_with(s.key.clone(), frame).expect("sealing an empty cache");
    c.set_verify(vec![true, true]);
    s.model.forward(&s.prompt, &mut c, frame, Variant::ProbeTime).expect("the prefill");
    let f = c.take_findings();
    // The prefill's own rows are not checked as they are written; the rows
    // already there are (none, for a new cache).
    assert!(f.events.is_empty() && f.blocks_verified == 0, "{f:?}");
    c
}

/// Two caches holding the prompt in `frame`, with row `row` of layer 1's K changed
/// without sealing, to 100 in the first and -7 in the second.
pub fn tampered_pair(s: &Setup, frame: &Frame, row: usize) -> (KvCache, KvCache) {
    let (mut a, mut b) = (prefilled(s, frame), prefilled(s, frame));
    a.overwrite_row(1, row, 100.0);
    b.overwrite_row(1, row, -7.0);
    (a, b)
}

/// One decode step of token 7: the logits.
pub fn step(s: &Setup, c: &mut KvCache, frame: &Frame) -> Vec<f32> {
    s.model.forward(&[7], c, frame, Variant::ProbeTime).expect("the step").to_vec1().expect("f32 logits")
}

/// How far a batched step's logits may lie from the same sequence's alone: the
/// rounding of two f32 passes in a tenant frame (see `kframe_model::rounding`).
pub fn rounding_bound(s: &Setup, logits: &[f32]) -> f64 {
    use kframe_model::rounding::{Reductions, F32_UNIT};
    let cfg = s.model.config();
    let chain = Reductions::forward_pass(cfg, s.prompt.len() + 1).then(Reductions::rotated_layers(cfg, cfg.head_dim));
    chain.bound_between(F32_UNIT, logits.iter().fold(0f32, |m, x| m.max(x.abs())) as f64)
}
