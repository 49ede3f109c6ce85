//! Per-tenant rotations of K and V.
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
use crate::layout::{KvPrecision, LayerPad, Layout, Padding};
use candle_core::{DType, Device, Result, Tensor};
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
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

/// One layer's matrices for every kv head, stacked as (kv heads, d, d): R^T
/// (rotates K and, cut to its first d rows, queries) and S (un-rotates attention
/// outputs and, read transposed, rotates V).
///
/// Only these two are stored, each in the layout in which a decode step reads it
/// without a repacking copy. A decode step then reads two matrices per layer,
/// each twice in quick succession (the second read hits the cache); with R, R^T,
/// S and S^T stored it read three, and for 32 tenants the extra matrix was about
/// 5 MB of memory traffic per step on the embedded model. The keyring holds half
/// as much per tenant.
struct Mats {
    r_t: Tensor,
    s: Tensor,
}

impl Mats {
    fn new(r: &[f64], s: &[f64], shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Self> {
        let r = Tensor::from_slice(r, shape, device)?.to_dtype(dtype)?;
        let s = Tensor::from_slice(s, shape, device)?.to_dtype(dtype)?;
        let r_t = r.transpose(1, 2)?.contiguous()?;
        let _ = r.zero_set();
        Ok(Self { r_t, s })
    }

    /// R as a transposed view of R^T.
    fn r(&self) -> Result<Tensor> {
        self.r_t.transpose(1, 2)
    }

    /// S^T as a transposed view of S.
    fn s_t(&self) -> Result<Tensor> {
        self.s.transpose(1, 2)
    }

    fn zeroize(&self) {
        for t in [&self.r_t, &self.s] {
            let _ = t.zero_set();
        }
    }
}

/// One layer's rotations for one tenant. On a padded layer (see [`crate::layout`])
/// the matrices are (d + m) x (d + m) and rows are padded before they are rotated.
pub struct LayerRotation {
    /// In the model's compute dtype, for attention.
    compute: Mats,
    /// In f64, for writes and recovery when the cache keeps exact rotated values.
    exact: Option<Mats>,
    /// The plaintext width d.
    d: usize,
    pad: Option<LayerPad>,
}

impl LayerRotation {
    fn mats(&self, dtype: DType) -> &Mats {
        match &self.exact {
            Some(exact) if dtype == DType::F64 => exact,
            _ => &self.compute,
        }
    }

    /// [k; r] and [v; r'] for (kv, t, d) plaintext rows at context positions
    /// pos.., in their dtype, and the number of rows too long to pad; the rows
    /// unchanged on an unpadded layer.
    fn pad_kv(&self, k: &Tensor, v: &Tensor, pos: usize) -> Result<(Tensor, Tensor, u64)> {
        match &self.pad {
            None => Ok((k.clone(), v.clone(), 0)),
            Some(p) => {
                let (k, a) = p.pad(k, pos, Which::K)?;
                let (v, b) = p.pad(v, pos, Which::V)?;
                Ok((k, v, a + b))
            }
        }
    }

    /// k' = R [k; r] and v' = S [v; r'] for (kv, t, d) plaintext at context
    /// positions pos.., returned in `store`; also the rows too long to pad. An
    /// f64 store is computed in f64; any other in the compute dtype, then rounded
    /// once to `store` (f16 or bf16 rows of an f32 model are rotated in f32).
    pub fn rotate_kv(&self, k: &Tensor, v: &Tensor, store: DType, pos: usize) -> Result<(Tensor, Tensor, u64)> {
        let m = self.mats(store);
        let work = m.r_t.dtype();
        let (k, v, overflow) = self.pad_kv(&k.to_dtype(work)?, &v.to_dtype(work)?, pos)?;
        Ok((k.matmul(&m.r_t)?.to_dtype(store)?, v.matmul(&m.s_t()?)?.to_dtype(store)?, overflow))
    }

    /// Probe-time: q' = R [q; 0] for (kv, g*t, d) queries grouped by their kv head:
    /// q times the first d rows of R^T, so the zeros are never built.
    pub fn rotate_q(&self, q: &Tensor) -> Result<Tensor> {
        q.matmul(&self.compute.r_t.narrow(1, 0, self.d)?)
    }

    /// Probe-time: o = S^T o' for (kv, g*t, width) attention outputs, cut to d.
    pub fn unrotate_out(&self, o: &Tensor) -> Result<Tensor> {
        o.matmul(&self.compute.s)?.narrow(2, 0, self.d)
    }

    /// Decode-time and recovery: k = R^T k', v = S^T v' for (kv, L, width), pads
    /// dropped: in f64 for f64 rows (an exact cache), else in the compute dtype.
    pub fn unrotate_kv(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.unrotate_kv_padded(k, v)?;
        Ok((k.narrow(2, 0, self.d)?, v.narrow(2, 0, self.d)?))
    }

    /// As [`Self::unrotate_kv`], pads kept: [k; r], [v; r'].
    pub fn unrotate_kv_padded(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = self.mats(k.dtype());
        let work = m.s.dtype();
        Ok((k.to_dtype(work)?.matmul(&m.r()?)?, v.to_dtype(work)?.matmul(&m.s)?))
    }

    /// The compute-dtype matrices as (kv, width, width): R (for K) and S (for V).
    /// For the eval harness's readout measurements.
    pub fn matrices(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.compute.r()?.contiguous()?, self.compute.s.clone()))
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

/// The shape of the rotations a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// All of one tenant's rotations for one epoch, in one cache layout.
pub struct TenantRotation {
    tenant: String,
    epoch: u64,
    layout: Layout,
    /// None where the layout leaves a layer unrotated.
    layers: Vec<Option<LayerRotation>>,
}

impl TenantRotation {
    /// Derives every (layer, kv head) matrix. `exact` also keeps f64 copies, for
    /// caches that store rotated values in f64 to make recovery bit-exact. The
    /// layers `layout` pads get (d + m)-wide matrices and pads at `padding`'s norms.
    pub fn derive(
        key: &TenantKey,
        shape: RotationShape,
        dtype: DType,
        exact: bool,
        device: &Device,
        layout: &Layout,
        padding: Option<&Padding>,
    ) -> Result<Self> {
        let RotationShape { layers, kv_heads, head_dim: d } = shape;
        if !layout.padded_layers().is_empty() && padding.is_none() {
            candle_core::bail!("a padded layout needs a pad calibration")
        }
        let mut out = Vec::with_capacity(layers);
        for layer in 0..layers {
            if !layout.is_rotated(layer) {
                out.push(None);
                continue;
            }
            let w = layout.width(layer, d);
            let mut r = Vec::with_capacity(kv_heads * w * w);
            let mut s = Vec::with_capacity(kv_heads * w * w);
            for head in 0..kv_heads {
                r.extend(haar_orthonormal(&key.matrix_seed(layer, head, Which::K), w));
                s.extend(haar_orthonormal(&key.matrix_seed(layer, head, Which::V), w));
            }
            let dims = (kv_heads, w, w);
            let compute = Mats::new(&r, &s, dims, dtype, device)?;
            let exact = if exact { Some(Mats::new(&r, &s, dims, DType::F64, device)?) } else { None };
            r.zeroize();
            s.zeroize();
            let pad = match padding.filter(|_| layout.is_padded(layer)) {
                None => None,
                Some(p) => {
                    let heads = 0..kv_heads;
                    Some(LayerPad {
                        extra: layout.extra(),
                        k_seeds: heads.clone().map(|h| key.pad_seed(layer, h, Which::K)).collect(),
                        v_seeds: heads.clone().map(|h| key.pad_seed(layer, h, Which::V)).collect(),
                        k_norm: heads.clone().map(|h| p.calibration.norm(layer, h, Which::K)).collect(),
                        v_norm: heads.map(|h| p.calibration.norm(layer, h, Which::V)).collect(),
                    })
                }
            };
            out.push(Some(LayerRotation { compute, exact, d, pad }));
        }
        Ok(Self { tenant: key.tenant().to_owned(), epoch: key.epoch(), layout: layout.clone(), layers: out })
    }

    /// The layer's rotation; None where the layout leaves it unrotated.
    pub fn layer(&self, layer: usize) -> Option<&LayerRotation> {
        self.layers[layer].as_ref()
    }

    /// The bytes of every matrix this tenant's rotations hold (the f64 copies of
    /// an exact keyring included).
    pub fn bytes(&self) -> usize {
        let mats = |m: &Mats| [&m.r_t, &m.s].iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>();
        let layer = |l: &LayerRotation| mats(&l.compute) + l.exact.as_ref().map_or(0, mats);
        self.layers.iter().flatten().map(layer).sum()
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// The coordinate frame a sequence's cache lives in.
#[derive(Clone)]
pub enum Frame {
    /// The model's own frame: no rotation, no padding. The baseline and the reference.
    Identity,
    /// A tenant's private frame.
    Tenant(Arc<TenantRotation>),
}

impl Frame {
    pub fn layer(&self, layer: usize) -> Option<&LayerRotation> {
        match self {
            Frame::Identity => None,
            Frame::Tenant(rot) => rot.layer(layer),
        }
    }

    /// The cache layout this frame writes; None for the identity and for a plain
    /// layout (every layer rotated, none padded).
    pub fn layout(&self) -> Option<&Layout> {
        match self {
            Frame::Identity => None,
            Frame::Tenant(rot) => Some(rot.layout()).filter(|l| l.any()),
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
    padding: Option<Arc<Padding>>,
    cache: Mutex<Derived>,
}

/// The frames a keyring keeps derived, least recently used first out, within
/// a number of frames and a number of bytes.
struct Derived {
    frames: lru::LruCache<FrameKey, Arc<TenantRotation>>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Derived {
    fn insert(&mut self, id: FrameKey, rot: Arc<TenantRotation>) {
        self.bytes += rot.bytes();
        if let Some(old) = self.frames.put(id, rot) {
            self.bytes -= old.bytes();
        }
        // The newest frame stays even when it alone is over the budget: the
        // request that derived it is about to use it.
        while self.frames.len() > 1 && (self.frames.len() > self.max_frames || self.bytes > self.max_bytes) {
            if let Some((_, old)) = self.frames.pop_lru() {
                self.bytes -= old.bytes();
            }
        }
    }

    fn remove(&mut self, id: &FrameKey) {
        if let Some(old) = self.frames.pop(id) {
            self.bytes -= old.bytes();
        }
    }
}

/// How a [`Keyring`] derives and keeps frames.
pub struct KeyringBuilder {
    master: MasterSecret,
    shape: RotationShape,
    dtype: DType,
    precision: KvPrecision,
    device: Device,
    capacity: usize,
    budget_bytes: usize,
    padding: Option<Padding>,
}

impl KeyringBuilder {
    /// The dtype of the rotations attention multiplies with: the model's.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The precision of the caches the frames write: `Exact` also keeps f64 copies
    /// of every rotation, which exact caches write and recover with.
    pub fn precision(mut self, precision: KvPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// Tenants' frames kept derived (least recently used ones are dropped).
    pub fn capacity(mut self, frames: usize) -> Self {
        self.capacity = frames;
        self
    }

    /// Bytes of derived matrices kept, whatever the frames' count: one tenant of
    /// Qwen2.5-3B holds 144 matrices of 128 x 128 (9.4 MB in f32), one of the
    /// embedded model four. Least recently used frames are dropped past it; a
    /// dropped tenant's next request derives its frame again.
    pub fn budget_bytes(mut self, bytes: usize) -> Self {
        self.budget_bytes = bytes;
        self
    }

    /// Lets [`Keyring::padded_frame`] pad layers with these settings.
    pub fn padding(mut self, padding: Padding) -> Self {
        self.padding = Some(padding);
        self
    }

    pub fn build(self) -> Keyring {
        let derived = Derived {
            frames: lru::LruCache::unbounded(),
            bytes: 0,
            max_frames: self.capacity.max(1),
            max_bytes: self.budget_bytes,
        };
        Keyring {
            master: self.master,
            shape: self.shape,
            dtype: self.dtype,
            exact: self.precision == KvPrecision::Exact,
            device: self.device,
            padding: self.padding.map(Arc::new),
            cache: Mutex::new(derived),
        }
    }
}

/// A derived frame's identity: the key's public fingerprint and the layout.
type FrameKey = ([u8; 32], Layout);

impl Keyring {
    /// A keyring for a model of `shape`: f32 rotations on the CPU, for native-precision
    /// caches, keeping 256 tenants' frames with no byte budget, no padding; the
    /// builder changes each.
    pub fn builder(master: MasterSecret, shape: RotationShape) -> KeyringBuilder {
        KeyringBuilder {
            master,
            shape,
            dtype: DType::F32,
            precision: KvPrecision::Native,
            device: Device::Cpu,
            capacity: 256,
            budget_bytes: usize::MAX,
            padding: None,
        }
    }

    /// The same keyring, padding with these settings from now on.
    pub fn with_padding(mut self, padding: Padding) -> Self {
        self.padding = Some(Arc::new(padding));
        self
    }

    pub fn padding(&self) -> Option<&Padding> {
        self.padding.as_deref()
    }

    /// A cache layout padding `padded` layers with the configured extra dimensions
    /// (none without padding settings).
    pub fn layout(&self, padded: Vec<bool>) -> Layout {
        match &self.padding {
            Some(p) => Layout::new(padded, p.extra),
            None => Layout::plain(padded.len()),
        }
    }

    /// The layout a depth gate's per-layer decisions ask for: (rotate, pad) per layer.
    pub fn gated_layout(&self, gates: &[(bool, bool)]) -> Layout {
        self.layout(gates.iter().map(|g| g.1).collect()).with_unrotated(gates.iter().map(|g| !g.0).collect())
    }

    /// Drops the cached rotations of (tenant, epoch) in every layout; they are
    /// zeroed once no sequence holds them. The next `frame` call derives them again.
    pub fn forget(&self, tenant: &str, epoch: u64) {
        let id = TenantKey::derive(&self.master, tenant, epoch).fingerprint();
        let mut cache = self.cache.lock().expect("keyring lock");
        let stale: Vec<_> = cache.frames.iter().filter(|((f, _), _)| *f == id).map(|(k, _)| k.clone()).collect();
        for k in stale {
            cache.remove(&k);
        }
    }

    /// The tenant's frame with no layer padded.
    pub fn frame(&self, tenant: &str, epoch: u64) -> Result<Frame> {
        self.padded_frame(tenant, epoch, &Layout::plain(self.shape.layers))
    }

    /// The tenant's frame for caches of `layout`.
    pub fn padded_frame(&self, tenant: &str, epoch: u64, layout: &Layout) -> Result<Frame> {
        let key = TenantKey::derive(&self.master, tenant, epoch);
        let id = (key.fingerprint(), layout.clone());
        if let Some(rot) = self.cache.lock().expect("keyring lock").frames.get(&id) {
            return Ok(Frame::Tenant(rot.clone()));
        }
        // Derive outside the lock: it takes milliseconds per layer.
        let padding = self.padding.as_deref();
        let rot = TenantRotation::derive(&key, self.shape, self.dtype, self.exact, &self.device, layout, padding)?;
        let rot = Arc::new(rot);
        self.cache.lock().expect("keyring lock").insert(id, rot.clone());
        Ok(Frame::Tenant(rot))
    }

    /// The frames kept derived, and the bytes of their matrices.
    pub fn held(&self) -> (usize, usize) {
        let cache = self.cache.lock().expect("keyring lock");
        (cache.frames.len(), cache.bytes)
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

    /// Householder QR gives Q with |Q^T Q - I| of order d eps (Higham, Accuracy
    /// and Stability of Numerical Algorithms, 19.3), and the check's own product
    /// adds at most d eps per element: d^2 eps (4e-12 at d = 128) covers both in
    /// any summation order, and a column left unnormalized or a dependent column
    /// misses it by ten orders of magnitude.
    #[test]
    fn rotations_are_orthonormal_to_rounding_in_f64() {
        let d = 128;
        let r = mat("alice", d);
        let err = (r.transpose() * &r - DMatrix::<f64>::identity(d, d)).abs().max();
        let bound = (d * d) as f64 * f64::EPSILON;
        assert!(err <= bound, "max |R^T R - I| = {err:e}, bound {bound:e}");
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
    fn a_keyring_keeps_frames_within_its_byte_budget_and_rederives_the_dropped_ones() {
        let shape = RotationShape { layers: 2, kv_heads: 2, head_dim: 16 };
        // One frame: 2 layers x 2 heads x (R, S) x 16 x 16 f32 = 8 KiB.
        let one = 2 * 2 * 2 * 16 * 16 * 4;
        let ring = Keyring::builder(MasterSecret::from_bytes([3; 32]), shape).budget_bytes(3 * one).build();
        let frames: Vec<_> = (0..5).map(|t| ring.frame(&format!("t{t}"), 0).unwrap()).collect();
        assert_eq!(ring.held(), (3, 3 * one));
        // t0 was dropped: asked again, it is derived again, the same matrices.
        let (Frame::Tenant(first), Frame::Tenant(again)) = (&frames[0], ring.frame("t0", 0).unwrap()) else {
            panic!("tenant frames expected")
        };
        assert!(!Arc::ptr_eq(first, &again));
        let (a, b) = (first.layer(1).unwrap().matrices().unwrap().0, again.layer(1).unwrap().matrices().unwrap().0);
        assert_eq!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(ring.held(), (3, 3 * one));
        ring.forget("t0", 0);
        assert_eq!(ring.held(), (2, 2 * one));
        // A budget under one frame still keeps the newest.
        let tight = Keyring::builder(MasterSecret::from_bytes([3; 32]), shape).budget_bytes(1).build();
        tight.frame("a", 0).unwrap();
        tight.frame("b", 0).unwrap();
        assert_eq!(tight.held(), (1, one));
    }

    #[test]
    fn keyring_returns_the_cached_frame_and_distinct_frames_per_epoch() {
        let shape = RotationShape { layers: 2, kv_heads: 2, head_dim: 16 };
        let ring = Keyring::builder(MasterSecret::from_bytes([3; 32]), shape).capacity(4).build();
        let (Frame::Tenant(a), Frame::Tenant(b)) = (ring.frame("a", 0).unwrap(), ring.frame("a", 0).unwrap()) else {
            panic!("tenant frames expected")
        };
        assert!(Arc::ptr_eq(&a, &b));
        let Frame::Tenant(c) = ring.frame("a", 1).unwrap() else { panic!() };
        let (a, c) = (a.layer(0).unwrap(), c.layer(0).unwrap());
        let diff = (a.matrices().unwrap().0 - c.matrices().unwrap().0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() > 0.01);
    }
}
