//! What norm padding costs, measured in one run: memory from the cache layouts,
//! decode speed as the ratio of two timed batches on the same model.

use super::lab::Lab;
use crate::error::Result;
use kframe_core::cache::{KvCache, KvPrecision};
use kframe_core::layout::Layout;
use kframe_core::rotation::Frame;
use kframe_model::qwen2::Chunk;
use std::time::Instant;

/// Sequences in each timed decode batch, and steps per timing.
const BATCH: usize = 8;
const STEPS: usize = 48;
/// Timings per side, alternated; the fastest of each is kept (noise only slows).
const ROUNDS: usize = 5;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PadCost {
    /// Extra dimensions m per padded row.
    pub extra: usize,
    pub head_dim: usize,
    /// (d + m) / d: a padded layer's bytes over an unpadded one's.
    pub layer_memory_ratio: f64,
    /// Whole-cache bytes over an unpadded cache's, padding layer 0 only (the
    /// default depth gate) and every layer (`pad-all`).
    pub cache_memory_ratio_layer0: f64,
    pub cache_memory_ratio_all: f64,
    /// Aggregate decode tokens/s of a batch of tenants, every layer padded vs none.
    pub batch: usize,
    pub decode_tok_s_unpadded: f64,
    pub decode_tok_s_padded: f64,
    /// padded / unpadded.
    pub decode_ratio: f64,
    /// Rows of the padded attack runs left unpadded (norm over the calibration).
    pub overflow: u64,
}

/// Measures what padding costs on `lab`'s model; `overflow` is the padded attack
/// runs' count of rows too long to pad.
pub(super) fn measure(lab: &Lab, overflow: u64) -> Result<PadCost> {
    let d = lab.head_dim();
    let layers = lab.layers();
    let extra = lab.ring.padding().map_or(0, |p| p.extra);
    let shape = lab.gen.model.new_cache(KvPrecision::Native).shape();
    let store = lab.gen.model.kv_dtype();
    let bytes = |layout: &Layout| KvCache::bytes_for(shape, layout, store, 256) as f64;
    let mut layer0 = vec![false; layers];
    layer0[0] = true;
    let unpadded = bytes(&Layout::plain(layers));
    let batch = BATCH.min(lab.tenants());
    let plain: Vec<Frame> = (0..batch).map(|i| lab.frame(i)).collect::<Result<_>>()?;
    let padded: Vec<Frame> = (0..batch).map(|i| lab.frame_padded(i, true)).collect::<Result<_>>()?;
    let (mut best_plain, mut best_padded) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..ROUNDS {
        best_plain = best_plain.min(time_decode(lab, &plain)?);
        best_padded = best_padded.min(time_decode(lab, &padded)?);
    }
    let tokens = (batch * STEPS) as f64;
    let (plain_rate, padded_rate) = (tokens / best_plain, tokens / best_padded);
    Ok(PadCost {
        extra,
        head_dim: d,
        layer_memory_ratio: (d + extra) as f64 / d as f64,
        cache_memory_ratio_layer0: bytes(&Layout::new(layer0, extra)) / unpadded,
        cache_memory_ratio_all: bytes(&Layout::new(vec![true; layers], extra)) / unpadded,
        batch,
        decode_tok_s_unpadded: plain_rate,
        decode_tok_s_padded: padded_rate,
        decode_ratio: padded_rate / plain_rate,
        overflow,
    })
}

/// Seconds for `STEPS` batched decode steps of the tenants of `frames`, each over
/// its private records (prefilled untimed), in the serving precision.
fn time_decode(lab: &Lab, frames: &[Frame]) -> Result<f64> {
    let model = &lab.gen.model;
    let mut caches = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let layout = frame.layout().cloned().unwrap_or_else(|| Layout::plain(lab.layers()));
        let mut cache = KvCache::after_prefix(lab.prefix.clone(), KvPrecision::Native).with_layout(layout)?;
        model.forward(&lab.cases[i].context, &mut cache, frame, lab.variant)?;
        caches.push(cache);
    }
    let started = Instant::now();
    for step in 0..STEPS {
        let token = [(step % 100) as u32 + 10];
        let mut seqs: Vec<Chunk> =
            caches.iter_mut().zip(frames).map(|(cache, frame)| Chunk::new(&token, cache, frame)).collect();
        model.forward_batch(&mut seqs, lab.variant)?;
    }
    Ok(started.elapsed().as_secs_f64())
}
