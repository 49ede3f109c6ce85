//! `readout`: what a wrong key reads from a real vector. Writer b stores
//! k' = R_b k; reader a un-rotates it with its own key, R_a^T k' = R_a^T R_b k. For
//! P sampled off-diagonal (a, b) pairs, each with a real K row and a (layer, head),
//! this measures the cosine between k and that readout: with independent Haar
//! keys it is the cosine to a random direction, mean 0 and standard deviation
//! 1/sqrt(d). The highest-cosine pairs are written down before any of them is run,
//! for the behavioural spot-check.

use super::lab::{rows_of, Lab};
use super::stats;
use crate::error::Result;
use candle_core::{Device, Tensor};
use kframe_model::qwen2::Trace;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};

/// The pairs the spot-check runs: the highest-cosine distinct pairs, the maximum first.
pub const SPOT_CHECK_PAIRS: usize = 100;

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ReadoutPair {
    pub reader: usize,
    pub writer: usize,
    pub layer: usize,
    pub head: usize,
    pub cos: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadoutReport {
    pub pairs: usize,
    pub head_dim: usize,
    pub layers: Vec<usize>,
    pub mean: f64,
    pub std: f64,
    /// std * sqrt(d): 1 at the concentration scale.
    pub std_ratio: f64,
    pub max_cos: f64,
    pub max_pair: ReadoutPair,
    /// Kolmogorov-Smirnov statistic and p-value against N(0, 1/d).
    pub ks: f64,
    pub ks_p: f64,
    /// The same against the exact law of a cosine to a random direction.
    pub ks_exact: f64,
    pub ks_exact_p: f64,
    /// Distinct (reader, writer) pairs among the samples. Samples of one pair
    /// share a key pair (and real K rows share directions), so they are not
    /// independent; the KS test over one sample per distinct pair is.
    pub distinct_pairs: usize,
    pub ks_distinct: f64,
    pub ks_distinct_p: f64,
}

/// The layers sampled: first, last and two between (all of a small model's).
pub fn layers(n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = [0, n / 3, 2 * n / 3, n - 1].into_iter().collect();
    out.dedup();
    out
}

/// Rows per (layer, kv head), each as f32.
type RowPool = BTreeMap<(usize, usize), Vec<Vec<f32>>>;

/// Real K rows to read out, per (layer, head): the shared prefix's and a few
/// tenants' private rows, as f32 row-major.
fn pool(lab: &Lab) -> Result<RowPool> {
    let mut pool = RowPool::new();
    let mut add = |layer: usize, k: &Tensor| -> Result<()> {
        for (head, rows) in rows_of(k)?.into_iter().enumerate() {
            pool.entry((layer, head)).or_default().extend(rows);
        }
        Ok(())
    };
    let prefix = &lab.prefix.cache;
    for layer in 0..lab.layers() {
        add(layer, &prefix.stored_rows(layer, prefix.len())?.0)?;
    }
    for i in 0..lab.tenants().min(32) {
        let mut trace = Trace::default();
        lab.gen.model.forward_traced(
            &lab.cases[i].context,
            &mut lab.gen.model.new_cache(Default::default()),
            &kframe_core::rotation::Frame::Identity,
            lab.variant,
            Some(&mut trace),
        )?;
        for (layer, k) in trace.k.iter().enumerate() {
            add(layer, k)?;
        }
    }
    Ok(pool)
}

/// R of tenant `t` at (layer, head), (d, d) in the compute dtype.
fn rotation(lab: &Lab, t: usize, layer: usize, head: usize) -> Result<Tensor> {
    let frame = lab.frame(t)?;
    let r = frame.layer(layer).expect("a tenant frame rotates every layer").matrices()?.0;
    Ok(r.get(head)?.to_dtype(candle_core::DType::F32)?)
}

struct Sample {
    reader: usize,
    writer: usize,
    layer: usize,
    head: usize,
    row: usize,
}

/// The report, every cosine (for the histogram), and the pre-registered
/// spot-check pairs.
pub fn run(
    lab: &Lab,
    pairs: usize,
    mut progress: impl FnMut(usize),
) -> Result<(ReadoutReport, Vec<f64>, Vec<ReadoutPair>)> {
    let t = lab.tenants();
    let d = lab.head_dim();
    let layers = layers(lab.layers());
    let pool = pool(lab)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(lab.seed ^ 0x7ead);
    let samples: Vec<Sample> = (0..pairs)
        .map(|_| {
            let reader = rng.random_range(0..t);
            let writer = (reader + rng.random_range(1..t)) % t;
            let layer = layers[rng.random_range(0..layers.len())];
            let head = rng.random_range(0..lab.kv_heads());
            let row = rng.random_range(0..pool[&(layer, head)].len());
            Sample { reader, writer, layer, head, row }
        })
        .collect();

    // Pass 1, by writer: k' = R_b k. Pass 2, by reader: R_a^T k'.
    let group = |by: fn(&Sample) -> usize| {
        let mut g: BTreeMap<(usize, usize, usize), Vec<usize>> = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            g.entry((by(s), s.layer, s.head)).or_default().push(i);
        }
        g
    };
    let mut written = vec![0f32; pairs * d];
    let by_writer = group(|s| s.writer);
    let mut done_tenants = 0;
    let mut last = usize::MAX;
    for ((writer, layer, head), idx) in &by_writer {
        let rows: Vec<f32> = idx.iter().flat_map(|&i| pool[&(*layer, *head)][samples[i].row].iter().copied()).collect();
        let x = Tensor::from_vec(rows, (idx.len(), d), &Device::Cpu)?;
        let r = rotation(lab, *writer, *layer, *head)?.to_device(&Device::Cpu)?;
        let y = x.matmul(&r.t()?)?.to_vec2::<f32>()?;
        for (&i, row) in idx.iter().zip(y) {
            written[i * d..(i + 1) * d].copy_from_slice(&row);
        }
        if *writer != last {
            last = *writer;
            done_tenants += 1;
            progress(done_tenants);
        }
    }
    let mut cos = vec![0f64; pairs];
    for ((reader, layer, head), idx) in &group(|s| s.reader) {
        let rows: Vec<f32> = idx.iter().flat_map(|&i| written[i * d..(i + 1) * d].iter().copied()).collect();
        let y = Tensor::from_vec(rows, (idx.len(), d), &Device::Cpu)?;
        let r = rotation(lab, *reader, *layer, *head)?.to_device(&Device::Cpu)?;
        let z = y.matmul(&r)?.to_vec2::<f32>()?;
        for (&i, read) in idx.iter().zip(z) {
            cos[i] = stats::cosine(&pool[&(*layer, *head)][samples[i].row], &read);
        }
    }
    progress(t);

    let n = pairs as f64;
    let mean = cos.iter().sum::<f64>() / n;
    let std = (cos.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    let mut order: Vec<usize> = (0..pairs).collect();
    order.sort_by(|&a, &b| cos[b].total_cmp(&cos[a]));
    let pair_of = |i: usize| {
        let s = &samples[i];
        ReadoutPair { reader: s.reader, writer: s.writer, layer: s.layer, head: s.head, cos: cos[i] }
    };
    let mut seen = HashSet::new();
    let top: Vec<ReadoutPair> = order
        .iter()
        .filter(|&&i| seen.insert((samples[i].reader, samples[i].writer)))
        .take(SPOT_CHECK_PAIRS)
        .map(|&i| pair_of(i))
        .collect();
    let mut sorted = cos.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let (ks, ks_p) = stats::ks(&sorted, stats::normal_cdf(d));
    let (ks_exact, ks_exact_p) = stats::ks(&sorted, stats::sphere_cdf(d));
    let mut first = HashSet::new();
    let mut distinct: Vec<f64> =
        (0..pairs).filter(|&i| first.insert((samples[i].reader, samples[i].writer))).map(|i| cos[i]).collect();
    distinct.sort_by(|a, b| a.total_cmp(b));
    let (ks_distinct, ks_distinct_p) = stats::ks(&distinct, stats::normal_cdf(d));
    let report = ReadoutReport {
        pairs,
        head_dim: d,
        layers,
        mean,
        std,
        std_ratio: std * (d as f64).sqrt(),
        max_cos: cos[order[0]],
        max_pair: pair_of(order[0]),
        ks,
        ks_p,
        ks_exact,
        ks_exact_p,
        distinct_pairs: distinct.len(),
        ks_distinct,
        ks_distinct_p,
    };
    Ok((report, cos, top))
}
