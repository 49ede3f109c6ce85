//! Per-tenant rotations of K and V (DESIGN.md section 3).
//!
//! For each (layer, kv head) a tenant has two Haar-random orthonormal d x d matrices:
//! R rotates K and S rotates V. They are derived deterministically from the tenant's
//! key material (ChaCha20 seeded by a keyed hash, a Gaussian matrix, QR with the sign
//! fix), cached in an LRU, and zeroized when dropped.
//!
//! Vectors are rows throughout, so "k' = R k" is written `k' = k R^T` on a
//! (kv heads, tokens, d) tensor. Attention calls the few methods of
//! [`LayerRotation`]; nothing else in the forward pass knows about keys.

use crate::keys::{MasterSecret, TenantKey, Which};
use candle_core::{DType, Device, Result, Tensor};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use zeroize::Zeroize;

/// A Haar-random orthonormal d x d matrix, row-major, from a 32-byte seed.
///
/// QR of a Gaussian matrix gives Q with a distribution that depends on the sign
/// convention of the decomposition; multiplying each column of Q by the sign of the
/// matching diagonal entry of R makes it exactly Haar (Mezzadri 2007).
pub fn haar_orthonormal(seed: &[u8; 32], d: usize) -> Vec<f64> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut g = DMatrix::<f64>::from_fn(d, d, |_, _| StandardNormal.sample(&mut rng));
    let qr = g.clone().qr();
    let (mut q, mut r) = qr.unpack();
    for j in 0..d {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    let mut out = Vec::with_capacity(d * d);
    for i in 0..d {
        for j in 0..d {
            out.push(q[(i, j)]);
        }
    }
    for m in [&mut g, &mut q, &mut r] {
        m.as_mut_slice().zeroize();
    }
    out
}

/// The four products attention needs, for every kv head of one layer, stacked as
/// (kv heads, d, d) tensors.
struct Mats {
    r: Tensor,
    r_t: Tensor,
    s: Tensor,
    s_t: Tensor,
}

impl Mats {
    fn new(r: &[f64], s: &[f64], shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Self> {
        let r = Tensor::from_slice(r, shape, device)?.to_dtype(dtype)?;
        let s = Tensor::from_slice(s, shape, device)?.to_dtype(dtype)?;
        Ok(Self { r_t: r.transpose(1, 2)?.contiguous()?, s_t: s.transpose(1, 2)?.contiguous()?, r, s })
    }

    fn zeroize(&self) {
        for t in [&self.r, &self.r_t, &self.s, &self.s_t] {
            let _ = t.zero_set();
        }
    }
}

/// One layer's rotations for one tenant.
pub struct LayerRotation {
    /// In the model's compute dtype, for attention.
    compute: Mats,
    /// In f64, for writes and recovery when the cache keeps exact rotated values.
    exact: Option<Mats>,
}

impl LayerRotation {
    fn mats(&self, dtype: DType) -> &Mats {
        match &self.exact {
            Some(exact) if dtype == DType::F64 => exact,
            _ => &self.compute,
        }
    }

    /// k' = R k and v' = S v for (kv, t, d) plaintext, computed and returned in `store`.
    pub fn rotate_kv(&self, k: &Tensor, v: &Tensor, store: DType) -> Result<(Tensor, Tensor)> {
        let m = self.mats(store);
        let k = k.to_dtype(store)?.matmul(&m.r_t)?;
        let v = v.to_dtype(store)?.matmul(&m.s_t)?;
        Ok((k, v))
    }

    /// Probe-time: q' = R q for (kv, g*t, d) queries grouped by their kv head.
    pub fn rotate_q(&self, q: &Tensor) -> Result<Tensor> {
        q.matmul(&self.compute.r_t)
    }

    /// Probe-time: o = S^T o' for (kv, g*t, d) attention outputs.
    pub fn unrotate_out(&self, o: &Tensor) -> Result<Tensor> {
        o.matmul(&self.compute.s)
    }

    /// Decode-time and recovery: k = R^T k', v = S^T v' for (kv, L, d), in the
    /// dtype of the input (f64 for an exact cache).
    pub fn unrotate_kv(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.mats(k.dtype());
        Ok((k.matmul(&m.r)?, v.matmul(&m.s)?))
    }

    /// The compute-dtype matrices as (kv, d, d): R (for K) and S (for V). For the
    /// eval harness's readout measurements.
    pub fn matrices(&self) -> (&Tensor, &Tensor) {
        (&self.compute.r, &self.compute.s)
    }
}

impl Drop for LayerRotation {
    fn drop(&mut self) {
        self.compute.zeroize();
        if let Some(exact) = &self.exact {
            exact.zeroize();
        }
    }
}

/// The rotations of a batch of sequences at one layer, stacked as (batch * kv, d, d)
/// in the compute dtype, so that one batched matmul puts every sequence's vectors in
/// its own frame. A sequence in the identity frame gets the identity matrix, which
/// leaves its vectors bit for bit unchanged.
pub struct BatchRotation {
    r_t: Tensor,
    s: Tensor,
    s_t: Tensor,
}

impl BatchRotation {
    pub fn new(
        frames: &[&Frame],
        layer: usize,
        kv_heads: usize,
        d: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // The identity stands in for frames without a rotation; built only when needed.
        let eye = match frames.iter().any(|f| f.layer(layer).is_none()) {
            true => Some(Tensor::eye(d, dtype, device)?.unsqueeze(0)?.repeat((kv_heads, 1, 1))?),
            false => None,
        };
        let pick = |f: fn(&Mats) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = frames
                .iter()
                .map(|frame| match frame.layer(layer) {
                    Some(l) => f(&l.compute),
                    None => eye.as_ref().expect("built above for identity frames"),
                })
                .collect();
            Tensor::cat(&parts, 0)
        };
        Ok(Self { r_t: pick(|m| &m.r_t)?, s: pick(|m| &m.s)?, s_t: pick(|m| &m.s_t)? })
    }

    /// k' = R k (and, probe-time, q' = R q) for (batch * kv, n, d) rows.
    pub fn rotate_k(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.r_t)
    }

    /// v' = S v for (batch * kv, n, d) rows.
    pub fn rotate_v(&self, v: &Tensor) -> Result<Tensor> {
        v.matmul(&self.s_t)
    }

    /// Probe-time: o = S^T o' for (batch * kv, n, d) attention outputs.
    pub fn unrotate_out(&self, o: &Tensor) -> Result<Tensor> {
        o.matmul(&self.s)
    }
}

/// The shape of the rotations a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// All of one tenant's rotations for one epoch.
pub struct TenantRotation {
    tenant: String,
    epoch: u64,
    layers: Vec<LayerRotation>,
}

impl TenantRotation {
    /// Derives every (layer, kv head) matrix. `exact` also keeps f64 copies, for
    /// caches that store rotated values in f64 to make recovery bit-exact.
    pub fn derive(key: &TenantKey, shape: RotationShape, dtype: DType, exact: bool, device: &Device) -> Result<Self> {
        let RotationShape { layers, kv_heads, head_dim: d } = shape;
        let mut out = Vec::with_capacity(layers);
        for layer in 0..layers {
            let mut r = Vec::with_capacity(kv_heads * d * d);
            let mut s = Vec::with_capacity(kv_heads * d * d);
            for head in 0..kv_heads {
                r.extend(haar_orthonormal(&key.matrix_seed(layer, head, Which::K), d));
                s.extend(haar_orthonormal(&key.matrix_seed(layer, head, Which::V), d));
            }
            let dims = (kv_heads, d, d);
            let compute = Mats::new(&r, &s, dims, dtype, device)?;
            let exact = if exact { Some(Mats::new(&r, &s, dims, DType::F64, device)?) } else { None };
            r.zeroize();
            s.zeroize();
            out.push(LayerRotation { compute, exact });
        }
        Ok(Self { tenant: key.tenant().to_owned(), epoch: key.epoch(), layers: out })
    }

    pub fn layer(&self, layer: usize) -> &LayerRotation {
        &self.layers[layer]
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The coordinate frame a sequence's cache lives in.
#[derive(Clone)]
pub enum Frame {
    /// The model's own frame: no rotation. The baseline and the reference.
    Identity,
    /// A tenant's private frame.
    Tenant(Arc<TenantRotation>),
}

impl Frame {
    pub fn layer(&self, layer: usize) -> Option<&LayerRotation> {
        match self {
            Frame::Identity => None,
            Frame::Tenant(rot) => Some(rot.layer(layer)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Frame::Identity => "identity".into(),
            Frame::Tenant(r) => format!("tenant {:?} epoch {}", r.tenant(), r.epoch()),
        }
    }
}

/// Derives tenant frames from the master secret and keeps the recently used ones.
pub struct Keyring {
    master: MasterSecret,
    shape: RotationShape,
    dtype: DType,
    exact: bool,
    device: Device,
    cache: Mutex<lru::LruCache<[u8; 32], Arc<TenantRotation>>>,
}

impl Keyring {
    pub fn new(
        master: MasterSecret,
        shape: RotationShape,
        dtype: DType,
        exact: bool,
        device: Device,
        capacity: usize,
    ) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("capacity is at least 1");
        Self { master, shape, dtype, exact, device, cache: Mutex::new(lru::LruCache::new(capacity)) }
    }

    /// Drops the cached rotations of (tenant, epoch); they are zeroed once no
    /// sequence holds them. The next `frame` call derives them again.
    pub fn forget(&self, tenant: &str, epoch: u64) {
        let id = TenantKey::derive(&self.master, tenant, epoch).fingerprint();
        self.cache.lock().expect("keyring lock").pop(&id);
    }

    pub fn frame(&self, tenant: &str, epoch: u64) -> Result<Frame> {
        let key = TenantKey::derive(&self.master, tenant, epoch);
        let id = key.fingerprint();
        if let Some(rot) = self.cache.lock().expect("keyring lock").get(&id) {
            return Ok(Frame::Tenant(rot.clone()));
        }
        // Derive outside the lock: it takes milliseconds per layer.
        let rot = Arc::new(TenantRotation::derive(&key, self.shape, self.dtype, self.exact, &self.device)?);
        self.cache.lock().expect("keyring lock").put(id, rot.clone());
        Ok(Frame::Tenant(rot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str) -> TenantKey {
        TenantKey::derive(&MasterSecret::from_bytes([9; 32]), tenant, 0)
    }

    fn mat(tenant: &str, d: usize) -> DMatrix<f64> {
        DMatrix::from_row_slice(d, d, &haar_orthonormal(&key(tenant).matrix_seed(0, 0, Which::K), d))
    }

    #[test]
    fn derivation_is_deterministic_and_differs_between_tenants() {
        assert_eq!(mat("a", 64), mat("a", 64));
        assert_ne!(mat("a", 64), mat("b", 64));
        let k = key("a");
        assert_ne!(
            haar_orthonormal(&k.matrix_seed(0, 0, Which::K), 16),
            haar_orthonormal(&k.matrix_seed(0, 0, Which::V), 16)
        );
    }

    #[test]
    fn rotations_are_orthonormal_to_1e6_in_f64() {
        let d = 128;
        let r = mat("alice", d);
        let err = (r.transpose() * &r - DMatrix::<f64>::identity(d, d)).abs().max();
        assert!(err < 1e-6, "max |R^T R - I| = {err}");
    }

    /// Two independent Haar rotations applied to the same x give vectors whose
    /// cosine is distributed like that of two random unit vectors: std 1/sqrt(d).
    #[test]
    fn cross_key_cosine_std_is_within_10_percent_of_inverse_sqrt_d() {
        let d = 128;
        let mats: Vec<DMatrix<f64>> = (0..40).map(|i| mat(&format!("t{i}"), d)).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut cosines = Vec::with_capacity(10_000);
        while cosines.len() < 10_000 {
            let a = (rand::Rng::random::<u32>(&mut rng) as usize) % mats.len();
            let b = (rand::Rng::random::<u32>(&mut rng) as usize) % mats.len();
            if a == b {
                continue;
            }
            let x = nalgebra::DVector::<f64>::from_fn(d, |_, _| StandardNormal.sample(&mut rng));
            let (ya, yb) = (&mats[a] * &x, &mats[b] * &x);
            cosines.push(ya.dot(&yb) / (ya.norm() * yb.norm()));
        }
        let n = cosines.len() as f64;
        let mean = cosines.iter().sum::<f64>() / n;
        let std = (cosines.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / n).sqrt();
        let ratio = std * (d as f64).sqrt();
        assert!((0.9..=1.1).contains(&ratio), "std * sqrt(d) = {ratio}");
    }

    #[test]
    fn keyring_returns_the_cached_frame_and_distinct_frames_per_epoch() {
        let shape = RotationShape { layers: 2, kv_heads: 2, head_dim: 16 };
        let ring = Keyring::new(MasterSecret::from_bytes([3; 32]), shape, DType::F32, false, Device::Cpu, 4);
        let (Frame::Tenant(a), Frame::Tenant(b)) = (ring.frame("a", 0).unwrap(), ring.frame("a", 0).unwrap()) else {
            panic!("tenant frames expected")
        };
        assert!(Arc::ptr_eq(&a, &b));
        let Frame::Tenant(c) = ring.frame("a", 1).unwrap() else { panic!() };
        let diff = (a.layer(0).matrices().0 - c.layer(0).matrices().0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 0.01);
    }
}
