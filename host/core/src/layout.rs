//! Cache layouts and norm-equalizing padding: closing the norm channel of the
//! rotation.
//!
//! A rotation keeps every vector's norm, and at layer 0 a K (or V) vector depends
//! on its token alone, so the norms of a tenant's rotated rows spell out its text
//! to anyone who knows which norm belongs to which token (the open weights tell
//! them). On a padded layer a row x of width d is stored as R [x; r] in d + m
//! dimensions, where r points in a direction drawn from a keyed PRF of (tenant
//! key, layer, head, position) and has the length that makes |[x; r]| one
//! constant c for that layer and head. Queries are padded with zeros, so q.k and
//! attention are unchanged; the output of attention over padded V is cut back to
//! d after un-rotation. Recovery drops the pad.
//!
//! c comes from a [`Calibration`]: the largest K and V norms the model produces,
//! per layer and head, over its whole vocabulary at layer 0 (where norms depend
//! on the token alone) and over a corpus at every layer, times a margin (measured
//! by the model crate's `calibrate`, stored beside the model). A row longer than c
//! gets no pad and keeps its own norm (clipping it would change attention); it is
//! counted as an overflow and reported.

use crate::keys::Which;
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Extra dimensions per padded row unless the operator says otherwise. m trades two
/// leaks (README, "Closing the norm channel"): inner products between a frame's
/// rows get noise r_i . r_j of spread |r|^2 / sqrt(m), which hides less as m grows
/// (`gram-match`), while a small m concentrates the pads' variance in a few
/// principal axes that an attacker can find and project out (`pad-strip`). On the
/// embedded model 32 is the smallest m at which `pad-strip` sits at chance.
pub const DEFAULT_EXTRA: usize = 32;

/// Norm margin over the largest calibrated norm.
pub const DEFAULT_MARGIN: f64 = 1.25;

/// The stored calibration's file name in a model directory.
pub const CALIBRATION_FILE: &str = "kframe-pad.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPrecision {
    /// Rotated values in the model's K/V dtype (f16 on the CPU by default):
    /// smallest; round trip to within a few units of that dtype.
    #[default]
    Native,
    /// Rotated values in f64: the round trip is bit-exact in f16/bf16.
    Exact,
}

/// How a tenant's cache is laid out, layer by layer: which layers are padded, and
/// by how many dimensions, and which the depth gate left unrotated (in the model's
/// frame). Fixed when the cache is created (its rows' width depends on it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Layout {
    padded: Vec<bool>,
    extra: usize,
    unrotated: Vec<bool>,
}

impl Layout {
    /// `padded[layer]` layers get `extra` dimensions; with `extra` 0 none do.
    pub fn new(padded: Vec<bool>, extra: usize) -> Self {
        let unrotated = vec![false; padded.len()];
        let padded = if extra == 0 { vec![false; padded.len()] } else { padded };
        Self { padded, extra, unrotated }
    }

    /// Leaves `unrotated[layer]` layers in the model's frame (and unpadded: a pad
    /// hides a length only inside a secret rotation).
    pub fn with_unrotated(mut self, unrotated: Vec<bool>) -> Self {
        for (p, &u) in self.padded.iter_mut().zip(&unrotated) {
            *p &= !u;
        }
        self.unrotated = unrotated;
        self
    }

    /// Every layer rotated, none padded.
    pub fn plain(layers: usize) -> Self {
        Self { padded: vec![false; layers], extra: 0, unrotated: vec![false; layers] }
    }

    pub fn is_padded(&self, layer: usize) -> bool {
        self.padded.get(layer).copied().unwrap_or(false)
    }

    pub fn is_rotated(&self, layer: usize) -> bool {
        !self.unrotated.get(layer).copied().unwrap_or(false)
    }

    /// Whether anything differs from [`Self::plain`].
    pub fn any(&self) -> bool {
        self.padded.iter().chain(&self.unrotated).any(|&p| p)
    }

    pub fn unrotated_layers(&self) -> Vec<usize> {
        (0..self.unrotated.len()).filter(|&l| self.unrotated[l]).collect()
    }

    pub fn extra(&self) -> usize {
        self.extra
    }

    /// The width of `layer`'s rows for a model of head size `d`.
    pub fn width(&self, layer: usize, d: usize) -> usize {
        if self.is_padded(layer) {
            d + self.extra
        } else {
            d
        }
    }

    pub fn padded_layers(&self) -> Vec<usize> {
        (0..self.padded.len()).filter(|&l| self.padded[l]).collect()
    }
}

/// The norms padded rows are brought to, per layer and kv head, for K and for V.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The model measured (its id, as `kframe calibrate` printed it).
    pub model: String,
    /// What the norms were measured over.
    pub corpus: String,
    pub margin: f64,
    /// The largest norm measured, [layer][kv head].
    pub max_k: Vec<Vec<f64>>,
    pub max_v: Vec<Vec<f64>>,
}

impl Calibration {
    /// The target norm c of `layer`, `head`.
    pub fn norm(&self, layer: usize, head: usize, which: Which) -> f64 {
        let max = match which {
            Which::K => &self.max_k,
            Which::V => &self.max_v,
        };
        max[layer][head] * self.margin
    }

    /// Checks that the calibration fits a model of `layers` layers and `kv` heads.
    pub fn check_shape(&self, layers: usize, kv: usize) -> Result<(), String> {
        let fits = |m: &Vec<Vec<f64>>| m.len() == layers && m.iter().all(|h| h.len() == kv);
        match fits(&self.max_k) && fits(&self.max_v) {
            true => Ok(()),
            false => Err(format!("the pad calibration of {} does not fit {layers} layers x {kv} kv heads", self.model)),
        }
    }
}

/// Padding settings shared by every tenant: extra dimensions and target norms.
#[derive(Debug, Clone)]
pub struct Padding {
    pub extra: usize,
    pub calibration: Calibration,
}

/// One padded (layer, kv head set)'s PRF keys and target norms.
pub struct LayerPad {
    pub extra: usize,
    /// Per kv head: the PRF key of the pad directions for K and for V.
    pub k_seeds: Vec<Zeroizing<[u8; 32]>>,
    pub v_seeds: Vec<Zeroizing<[u8; 32]>>,
    /// Per kv head: the target norm c.
    pub k_norm: Vec<f64>,
    pub v_norm: Vec<f64>,
}

impl LayerPad {
    /// [x; r] for (kv, t, d) rows at context positions pos..pos + t, computed in
    /// x's dtype; also the number of rows longer than c (left unpadded).
    pub fn pad(&self, x: &Tensor, pos: usize, which: Which) -> candle_core::Result<(Tensor, u64)> {
        let (seeds, norms) = match which {
            Which::K => (&self.k_seeds, &self.k_norm),
            Which::V => (&self.v_seeds, &self.v_norm),
        };
        let (kv, t, d) = x.dims3()?;
        let m = self.extra;
        // Rows are built in f64 and cast back once: the plaintext part round-trips
        // exactly (every f32, f16 and bf16 value is an f64), and this takes five
        // tensor ops instead of eight (it runs per sequence, per decode step).
        let rows = Zeroizing::new(x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        let mut padded = Zeroizing::new(Vec::with_capacity(kv * t * (d + m)));
        let mut overflow = 0;
        for (j, row) in rows.chunks_exact(d).enumerate() {
            let (head, i) = (j / t, j % t);
            let c2 = norms[head] * norms[head];
            let n2: f64 = row.iter().map(|x| x * x).sum();
            if n2 > c2 {
                overflow += 1;
            }
            let length = (c2 - n2).max(0.0).sqrt();
            let dir = direction(&seeds[head], (pos + i) as u64, m);
            padded.extend_from_slice(row);
            padded.extend(dir.iter().map(|u| u * length));
        }
        let padded = Tensor::from_slice(&padded, (kv, t, d + m), x.device())?.to_dtype(x.dtype())?;
        Ok((padded, overflow))
    }
}

/// A unit vector in `m` dimensions, uniform on the sphere, drawn from the PRF
/// keyed by `seed` at `position` (ChaCha20 with the position as its stream).
fn direction(seed: &[u8; 32], position: u64, m: usize) -> Zeroizing<Vec<f64>> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    rng.set_stream(position);
    let mut v = Zeroizing::new((0..m).map(|_| StandardNormal.sample(&mut rng)).collect::<Vec<f64>>());
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_are_unit_deterministic_and_differ_by_position_and_key() {
        let a = direction(&[1; 32], 5, 64);
        assert!((a.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(*a, *direction(&[1; 32], 5, 64));
        assert_ne!(*a, *direction(&[1; 32], 6, 64));
        assert_ne!(*a, *direction(&[2; 32], 5, 64));
    }

    #[test]
    fn padded_rows_reach_the_target_norm_and_overflow_is_counted_not_clipped() {
        let pad = LayerPad {
            extra: 8,
            k_seeds: vec![Zeroizing::new([3; 32])],
            v_seeds: vec![Zeroizing::new([4; 32])],
            k_norm: vec![2.0],
            v_norm: vec![2.0],
        };
        let x =
            Tensor::new(&[[[1f64, 0.0, 0.0], [0.0, 1.5, 0.5], [3.0, 0.0, 0.0]]], &candle_core::Device::Cpu).unwrap();
        let (p, overflow) = pad.pad(&x, 10, Which::K).unwrap();
        assert_eq!(p.dims3().unwrap(), (1, 3, 11));
        assert_eq!(overflow, 1);
        let norms = p.sqr().unwrap().sum(2).unwrap().sqrt().unwrap().to_vec2::<f64>().unwrap();
        assert!((norms[0][0] - 2.0).abs() < 1e-12 && (norms[0][1] - 2.0).abs() < 1e-12);
        assert_eq!(norms[0][2], 3.0, "an overflowing row keeps its norm");
        assert_eq!(p.narrow(2, 0, 3).unwrap().to_vec3::<f64>().unwrap(), x.to_vec3::<f64>().unwrap());
    }
}
