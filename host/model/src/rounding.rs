//! How far two evaluations of the same arithmetic may differ by rounding alone:
//! kframe against candle or Hugging Face, f32 against an f64 run, a batch against
//! a sequence alone, a tenant's frame against the identity.
//!
//! A matmul's summation order depends on the machine (gemm sizes its blocks from
//! the CPU's caches), on the thread count and on the batch shape, so a bound
//! measured on one machine says nothing about another. The bounds here follow
//! from a model of rounding that holds for every order:
//!
//! - **Rounding errors as random variables.** Every rounding in floating point
//!   perturbs its result by a factor (1 + delta), |delta| <= u (the unit roundoff,
//!   2^-24 for f32). The probabilistic model of Higham and Mary (SIAM J. Sci.
//!   Comput. 41(5), 2019) treats the deltas as independent and mean-zero, which is
//!   what makes the error of a long sum grow like sqrt(k) rather than k, in any
//!   summation order.
//! - **One reduction.** A sum of k terms computed in any order and blocking then has
//!   an error of standard deviation at most u sqrt(k / 3) P, where P bounds the
//!   partial sums.
//! - **A chain of reductions.** The errors of successive reductions are independent
//!   too, and each is carried on by the layers after it at no more than its size
//!   relative to the output (RMSNorm rescales a row, a residual add keeps its
//!   error, a projection passes a relative error on at the size of its output), so
//!   the variances add: a forward pass's logits have an error of standard
//!   deviation at most u sqrt(K / 3) S, with K the total number of terms summed on
//!   the way from the embedding to a logit ([`Reductions::forward_pass`] lists
//!   them) and S the scale of the logits, their largest magnitude: for terms of
//!   both signs, as in every product here, partial sums stay at the size of the
//!   result.
//! - **The bound** is [`LAMBDA`] standard deviations. An f32 pass lies within
//!   [`Reductions::bound`] of the exact result, and two f32 passes, in whatever
//!   orders, within twice that of each other.
//! - **Rotations.** A product with an orthonormal matrix has partial sums bounded by
//!   the row's norm (Cauchy-Schwarz), so there P is the norm of the row
//!   ([`round_trip`]).
//!
//! A real bug is of another order: on the test model a RoPE position off by one, a
//! dropped bias or query heads reading the wrong kv head moves the logits by
//! thousands of bounds (the mutation test of the candle comparison), while the
//! rounding measured between kframe, candle and an f64 run stays below a tenth of
//! one.

use crate::config::Config;

/// The unit roundoff of f32: half the distance from 1 to the next f32.
pub const F32_UNIT: f64 = f32::EPSILON as f64 / 2.0;

/// The unit roundoff of f16 (11 significant bits).
pub const F16_UNIT: f64 = 1.0 / 2048.0;

/// The unit roundoff of bf16 (8 significant bits).
pub const BF16_UNIT: f64 = 1.0 / 256.0;

/// Standard deviations of rounding error a comparison allows (see the module
/// docs): 6 leaves a chance below 2e-9 per element compared, so even the 10^5
/// logits of a long comparison stay inside it on any machine.
pub const LAMBDA: f64 = 6.0;

/// A chain of reductions whose rounding errors add up: the number of terms its
/// reductions sum, over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Reductions {
    terms: f64,
}

impl Reductions {
    /// One reduction of `k` terms (k = 1: a single rounding, as an add or a cast).
    pub fn of(k: usize) -> Self {
        Self { terms: k.max(1) as f64 }
    }

    /// This chain followed by `next`.
    pub fn then(self, next: Self) -> Self {
        Self { terms: self.terms + next.terms }
    }

    /// This chain `n` times over.
    pub fn times(self, n: usize) -> Self {
        Self { terms: self.terms * n as f64 }
    }

    /// The reductions between the embedding and a logit of a Qwen2 forward pass
    /// with `context` tokens attended to. Per layer: RMSNorm's sum of squares and
    /// the q/k/v projections (hidden terms each), the scores (head_dim), the
    /// softmax's sum and the weighted sum of values (context each), the output
    /// projection (heads x head_dim), RMSNorm, gate and up (hidden), down
    /// (intermediate), two residual adds. Then the final norm and the vocabulary
    /// projection (hidden each).
    pub fn forward_pass(cfg: &Config, context: usize) -> Self {
        Self::layer(cfg, context).times(cfg.num_hidden_layers).then(Self::of(cfg.hidden_size).times(2))
    }

    /// The reductions up to the K and V rows that layer `layer` writes: the layers
    /// before it, then its RMSNorm and its k or v projection (hidden terms each).
    pub fn to_kv_rows(cfg: &Config, layer: usize, context: usize) -> Self {
        Self::layer(cfg, context).times(layer).then(Self::of(cfg.hidden_size).times(2))
    }

    /// The roundings of K and V into half precision that a forward pass on the
    /// CPU with f16 or bf16 weights adds to the f32 chain (see `Qwen2::new`): one
    /// each per layer.
    pub fn kv_roundings(cfg: &Config) -> Self {
        Self::of(1).times(2 * cfg.num_hidden_layers)
    }

    /// One decoder layer's chain (see [`Self::forward_pass`]).
    fn layer(cfg: &Config, context: usize) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        [h, h, d, context, context, cfg.num_attention_heads * d, 1, h, h, cfg.intermediate_size, 1]
            .into_iter()
            .fold(Self::default(), |acc, k| acc.then(Self::of(k)))
    }

    /// What a tenant's frame adds to each layer of a forward pass: rotating K and
    /// V into the frame, the queries too (probe-time) or K and V back
    /// (decode-time), and the output back: four products of `width` terms (the
    /// row width, head_dim plus any pad), each rounded into storage once.
    pub fn rotated_layers(cfg: &Config, width: usize) -> Self {
        Self::of(width).then(Self::of(1)).times(4 * cfg.num_hidden_layers)
    }

    /// The rounding a result of this chain may carry, in precision `unit`, at
    /// `scale` (the size of the partial sums: the logits' largest magnitude for a
    /// forward pass, the row's norm for a rotation).
    pub fn bound(&self, unit: f64, scale: f64) -> f64 {
        LAMBDA * unit * (self.terms / 3.0).sqrt() * scale
    }

    /// The bound on the difference of two evaluations of this chain, each in
    /// precision `unit`, whatever their orders: twice [`Self::bound`].
    pub fn bound_between(&self, unit: f64, scale: f64) -> f64 {
        2.0 * self.bound(unit, scale)
    }
}

/// Bounds on independent rounding errors (say, an f32 chain and the f16
/// roundings within it) combined: each is [`LAMBDA`] standard deviations, and
/// the variances of independent errors add.
pub fn in_quadrature(bounds: impl IntoIterator<Item = f64>) -> f64 {
    bounds.into_iter().map(|b| b * b).sum::<f64>().sqrt()
}

/// Per element, relative to the row's norm: the rounding of `products` products
/// with rounded orthonormal matrices of width `width` in precision `unit`, each
/// result rounded into storage, as in the matched-key round trip `R^T (R k)`
/// (2 products) or a re-key and its recovery (4). A product's partial sums never
/// exceed |k| (a row of an orthonormal matrix has norm 1); a later product spreads
/// an earlier one's error over the row without growing it; the matrix's own
/// rounding and the storage rounding add one rounding each.
pub fn round_trip(width: usize, products: usize, unit: f64) -> f64 {
    Reductions::of(width).then(Reductions::of(1).times(2)).times(products).bound(unit, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The bound's claim at its smallest scale: one dot product summed in the
    /// orders gemm may pick (forward, backward, pairwise, in blocks of SIMD-width
    /// lanes) stays within `Reductions::of(k).bound` of the f64 sum.
    #[test]
    fn one_dot_product_in_any_summation_order_is_within_the_reduction_bound() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        for k in [16usize, 128, 1024, 11008] {
            let mut worst = 0f64;
            for _ in 0..50 {
                let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1f32..1f32)).collect();
                let y: Vec<f32> = (0..k).map(|_| rng.random_range(-1f32..1f32)).collect();
                let terms: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a * b).collect();
                let exact: f64 = terms.iter().map(|&t| t as f64).sum();
                let forward = terms.iter().fold(0f32, |s, t| s + t);
                let backward = terms.iter().rev().fold(0f32, |s, t| s + t);
                let lanes = |w: usize| {
                    let mut acc = vec![0f32; w];
                    for (i, t) in terms.iter().enumerate() {
                        acc[i % w] += t;
                    }
                    acc.iter().fold(0f32, |s, t| s + t)
                };
                // P of the model: the largest partial sum, here in f64.
                let scale = (terms.iter())
                    .scan(0f64, |s, &t| {
                        *s += t as f64;
                        Some(s.abs())
                    })
                    .fold(0f64, f64::max);
                for got in [forward, backward, pairwise(&terms), lanes(8), lanes(16)] {
                    worst = worst.max((got as f64 - exact).abs() / Reductions::of(k).bound(F32_UNIT, scale));
                }
            }
            assert!(worst <= 1.0, "k = {k}: error {worst:.3} x the bound");
        }
    }

    fn pairwise(t: &[f32]) -> f32 {
        match t.len() {
            0 => 0.0,
            1 => t[0],
            n => pairwise(&t[..n / 2]) + pairwise(&t[n / 2..]),
        }
    }

    #[test]
    fn a_forward_pass_chain_counts_every_reduction_once_per_layer() {
        let cfg = crate::synth::tiny_config();
        let one = Reductions::forward_pass(&Config { num_hidden_layers: 1, ..cfg.clone() }, 16);
        let two = Reductions::forward_pass(&cfg, 16);
        let tail = Reductions::of(cfg.hidden_size).times(2);
        let layer = one.terms - tail.terms;
        assert_eq!(two.terms - tail.terms, 2.0 * layer);
        assert!(Reductions::forward_pass(&cfg, 64).terms > two.terms, "longer contexts sum more");
    }
}
