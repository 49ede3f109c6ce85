//! One sequence's attention cache: rotated K and V for every layer.
//!
//! Vectors are written already rotated into the sequence's frame (see
//! [`crate::rotation`]); the plaintext never lands here. Buffers are preallocated
//! and grown by doubling, so a decode step writes one row instead of copying the
//! whole cache. Every buffer is zeroed before it is released.
//!
//! Precision: in `Native` mode rotated values are kept in the model's dtype. In
//! `Exact` mode they are kept in f64, which makes the matched-key round trip
//! `R^T (R k)` give back an f16/bf16 (and in practice f32) `k` bit for bit, at the
//! cost of 8 bytes per element and a cast to the compute dtype when attention reads.
//!
//! Integrity: once [`KvCache::seal_with`] gives it the server's tag key, every
//! block of rows is sealed as it is written, and at the layers set by
//! [`KvCache::set_verify`] attention verifies what it reads (see
//! [`crate::integrity`]).

use crate::integrity::{self, BlockAt, Findings, IsolationEvent, Owner, Seal, TagKey, BLOCK};
pub use crate::layout::KvPrecision;
use crate::layout::Layout;
use crate::rotation::Frame;
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashSet;
use std::sync::Arc;

/// The shape of a model's cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_len: usize,
}

struct LayerKv {
    /// (kv heads, capacity, d), in the storage dtype.
    k: Tensor,
    v: Tensor,
}

/// A public prefix (a system prompt, a shared document), prefilled once in the
/// model's own frame and referenced by every sequence that starts with it
/// (`shared-plain`): its rows are stored once, and no
/// tenant's key ever touches them, so they expose no known pairs of any key.
pub struct SharedPrefix {
    /// blake3 of the model's identity and the token ids.
    pub id: [u8; 32],
    pub tokens: Vec<u32>,
    /// The prefix's K and V in the identity frame.
    pub cache: KvCache,
}

pub struct KvCache {
    shape: CacheShape,
    /// The dtype of the plaintext K and V the model computes.
    plain: DType,
    /// The dtype rotated values are stored in.
    store: DType,
    device: Device,
    layers: Vec<Option<LayerKv>>,
    /// Which layers hold padded rows (fixed while the cache holds rows).
    layout: Layout,
    /// Rows this cache holds itself (after the shared prefix, if any).
    len: usize,
    /// A plaintext prefix this sequence attends over before its own rows.
    shared: Option<Arc<SharedPrefix>>,
    integrity: Integrity,
}

/// A cache's seals and what verification has found in it.
#[derive(Default)]
struct Integrity {
    /// The server's tag key and whom the rows are sealed for; None: not sealed.
    sealer: Option<(Arc<TagKey>, Owner)>,
    /// Per layer, per own block, per kv head (index block * kv_heads + head).
    seals: Vec<Vec<Seal>>,
    /// Layers whose reads are verified.
    verify: Vec<bool>,
    findings: Findings,
    /// (layer, head, first position) of blocks already reported.
    reported: HashSet<(usize, usize, usize)>,
}

impl KvCache {
    pub fn new(shape: CacheShape, plain: DType, precision: KvPrecision, device: &Device) -> Self {
        let store = match precision {
            KvPrecision::Native => plain,
            KvPrecision::Exact => DType::F64,
        };
        Self {
            shape,
            plain,
            store,
            device: device.clone(),
            layers: (0..shape.layers).map(|_| None).collect(),
            layout: Layout::plain(shape.layers),
            len: 0,
            shared: None,
            integrity: Integrity { seals: vec![Vec::new(); shape.layers], ..Integrity::default() },
        }
    }

    /// The same empty cache, for rows written in a frame of `layout` (see
    /// [`crate::layout`]). Refused once rows are written: their width is fixed.
    pub fn with_layout(mut self, layout: Layout) -> Result<Self> {
        if self.layers.iter().any(Option::is_some) {
            candle_core::bail!("the layout of a cache that holds rows cannot change")
        }
        self.layout = layout;
        Ok(self)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The width of `layer`'s rows.
    fn width(&self, layer: usize) -> usize {
        self.layout.width(layer, self.shape.head_dim)
    }

    /// An empty cache whose sequence continues after a shared plaintext prefix.
    pub fn after_prefix(prefix: Arc<SharedPrefix>, precision: KvPrecision) -> Self {
        let c = &prefix.cache;
        let mut cache = Self::new(c.shape, c.plain, precision, &c.device);
        cache.shared = Some(prefix);
        cache
    }

    /// `rotate-copy`: a cache holding the prefix's rows rotated into `frame`, as if
    /// the tenant had prefilled the prefix itself (without running the model).
    pub fn rotated_copy(prefix: &SharedPrefix, frame: &Frame, precision: KvPrecision) -> Result<Self> {
        let c = &prefix.cache;
        let layout = frame.layout().cloned().unwrap_or_else(|| Layout::plain(c.shape.layers));
        let mut cache = Self::new(c.shape, c.plain, precision, &c.device).with_layout(layout)?;
        for layer in 0..c.shape.layers {
            let (k, v) = c.stored_rows(layer, c.len)?;
            let (k, v) = (k.to_dtype(c.plain)?.contiguous()?, v.to_dtype(c.plain)?.contiguous()?);
            let (k, v) = match frame.layer(layer) {
                None => (k, v),
                Some(r) => {
                    let (k, v, overflow) = r.rotate_kv(&k, &v, cache.store, 0)?;
                    cache.note_overflow(overflow);
                    (k, v)
                }
            };
            cache.write_rows(layer, 0, &k, &v)?;
        }
        cache.len = c.len;
        Ok(cache)
    }

    /// Tokens in context: the shared prefix's, then this cache's own.
    pub fn len(&self) -> usize {
        self.offset() + self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of the shared prefix this cache continues (0 without one).
    pub fn offset(&self) -> usize {
        self.shared.as_ref().map_or(0, |p| p.cache.len)
    }

    pub fn shared_prefix(&self) -> Option<&Arc<SharedPrefix>> {
        self.shared.as_ref()
    }

    /// The shared prefix's plaintext K and V of `layer`, (kv, prefix, d) in the
    /// plaintext dtype.
    pub fn shared_rows(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(p) = &self.shared else { return Ok(None) };
        let (k, v) = p.cache.stored_rows(layer, p.cache.len)?;
        Ok(Some((k.to_dtype(self.plain)?, v.to_dtype(self.plain)?)))
    }

    pub fn store_dtype(&self) -> DType {
        self.store
    }

    pub fn plain_dtype(&self) -> DType {
        self.plain
    }

    /// Bytes of cached K and V actually in use.
    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.shape, &self.layout, self.store, self.len)
    }

    /// Writes (kv, t, d) rotated rows for context positions pos.. of `layer`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        match pos.checked_sub(self.offset()) {
            Some(row) => self.write_rows(layer, row, k, v),
            None => candle_core::bail!("position {pos} lies inside the shared prefix"),
        }
    }

    /// Writes (kv, t, d) rows at own row `pos` of `layer`, growing the buffer if needed.
    fn write_rows(&mut self, layer: usize, pos: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let needed = pos + k.dim(1)?;
        if k.dim(2)? != self.width(layer) {
            candle_core::bail!("rows of width {} written to layer {layer} of width {}", k.dim(2)?, self.width(layer))
        }
        if needed > self.capacity(layer) {
            let new_cap = needed.next_power_of_two().max(64).min(self.shape.max_len.max(needed));
            self.reallocate(layer, new_cap, pos)?;
        }
        let buf = self.layers[layer].as_ref().expect("allocated above");
        buf.k.slice_set(&k.to_dtype(self.store)?.contiguous()?, 1, pos)?;
        buf.v.slice_set(&v.to_dtype(self.store)?.contiguous()?, 1, pos)?;
        self.reseal(layer, pos, needed)
    }

    // ---- integrity: the corrective layer's seals ----

    /// From now on every written block is sealed with `key` for `frame`'s owner;
    /// the rows already here are sealed now.
    pub fn seal_with(&mut self, key: Arc<TagKey>, frame: &Frame) -> Result<()> {
        self.integrity.sealer = Some((key, Owner::of(frame)));
        for layer in 0..self.shape.layers {
            self.integrity.seals[layer].clear();
            if self.layers[layer].is_some() {
                self.reseal(layer, 0, self.len)?;
            }
        }
        Ok(())
    }

    pub fn is_sealed(&self) -> bool {
        self.integrity.sealer.is_some()
    }

    /// Which layers verify their reads from now on (one flag per layer; missing
    /// layers are not verified).
    pub fn set_verify(&mut self, verify: Vec<bool>) {
        self.integrity.verify = verify;
    }

    /// Counts rows too long to pad (see [`crate::layout`]) among those written.
    pub fn note_overflow(&mut self, rows: u64) {
        self.integrity.findings.pad_overflow += rows;
    }

    /// What verification found since the last call.
    pub fn take_findings(&mut self) -> Findings {
        std::mem::take(&mut self.integrity.findings)
    }

    /// Seals the blocks of `layer` that rows `from..to` touch (rows past `to` are
    /// not yet written).
    fn reseal(&mut self, layer: usize, from: usize, to: usize) -> Result<()> {
        let offset = self.offset();
        let Some((key, owner)) = &self.integrity.sealer else { return Ok(()) };
        if from >= to {
            return Ok(());
        }
        let buf = self.layers[layer].as_ref().expect("a written layer is allocated");
        let kv = self.shape.kv_heads;
        let seals = &mut self.integrity.seals[layer];
        for block in from / BLOCK..to.div_ceil(BLOCK) {
            let start = block * BLOCK;
            let rows = to.min(start + BLOCK) - start;
            for head in 0..kv {
                let at = BlockAt { layer, head, start: offset + start, rows };
                let seal = if self.integrity.reported.contains(&(layer, head, offset + start)) {
                    integrity::poisoned(owner)
                } else {
                    integrity::with_rows(&buf.k, head, start, rows, |k| {
                        integrity::with_rows(&buf.v, head, start, rows, |v| integrity::seal(key, owner, at, k, v))
                    })??
                };
                let i = block * kv + head;
                if i < seals.len() {
                    seals[i] = seal;
                } else {
                    debug_assert_eq!(i, seals.len(), "blocks are sealed in order");
                    seals.push(seal);
                }
            }
        }
        seals.truncate(to.div_ceil(BLOCK) * kv);
        Ok(())
    }

    /// Verifies, if `layer` is gated, every block attention is about to read (the
    /// shared prefix's and the first `own` own rows) in `reader`'s frame, before
    /// the step writes `fresh` rows after them: a write seals its block again, so
    /// changed bytes in that block must be caught first. A failed block stays
    /// failed (see [`integrity::poisoned`]). Returns an additive mask
    /// (kv, 1, prefix + own + fresh) that hides failed blocks (never the fresh
    /// rows), or None when all passed or nothing was checked.
    pub fn verify(&mut self, layer: usize, reader: &Frame, own: usize, fresh: usize) -> Result<Option<Tensor>> {
        if !self.integrity.verify.get(layer).copied().unwrap_or(false) {
            return Ok(None);
        }
        let Some((key, _)) = &self.integrity.sealer else { return Ok(None) };
        let key = key.clone();
        let reader_owner = Owner::of(reader);
        let kv = self.shape.kv_heads;
        // (head, first position, end) of every failed block, with its reason.
        let mut failed = Vec::new();
        let mut verified = 0u64;
        if let Some(prefix) = &self.shared {
            // The prefix is sealed in the model's frame by whoever prefilled it.
            let model = Owner::model();
            verified += check_blocks(&prefix.cache, layer, 0, prefix.cache.len, &key, &model, 0, &mut failed)?;
        }
        verified += check_blocks(self, layer, 0, own, &key, &reader_owner, self.offset(), &mut failed)?;
        let f = &mut self.integrity.findings;
        f.blocks_verified += verified;
        if failed.is_empty() {
            return Ok(None);
        }
        self.note_failures(layer, &reader_owner, &failed);
        let (checked, total) = (self.offset() + own, self.offset() + own + fresh);
        let mut mask = vec![0f32; kv * total];
        for &(head, start, end, _) in &failed {
            mask[head * total + start..head * total + end].fill(f32::NEG_INFINITY);
        }
        for head in 0..kv {
            if mask[head * total..head * total + checked].iter().all(|x| x.is_infinite()) {
                candle_core::bail!(
                    "every block of layer {layer} kv head {head} failed verification: nothing left to attend to"
                )
            }
        }
        let mask = Tensor::from_vec(mask, (kv, 1, total), &self.device)?;
        Ok(Some(mask.to_dtype(self.plain)?))
    }

    /// Counts failed blocks as masked and reports each once.
    fn note_failures(&mut self, layer: usize, reader: &Owner, failed: &[Failed]) {
        self.integrity.findings.blocks_masked += failed.len() as u64;
        for &(head, start, end, reason) in failed {
            if self.integrity.reported.insert((layer, head, start)) {
                let event = IsolationEvent {
                    tenant: reader.tenant.clone(),
                    epoch: reader.epoch,
                    layer,
                    head,
                    positions: (start, end),
                    reason,
                };
                tracing::warn!(
                    "isolation event: {} layer {layer} head {head} positions {start}..{end}: {reason}",
                    reader.describe()
                );
                self.integrity.findings.events.push(event);
            }
        }
    }

    fn capacity(&self, layer: usize) -> usize {
        self.layers[layer].as_ref().map_or(0, |l| l.k.dims()[1])
    }

    /// Moves `layer` into buffers of `cap` rows, keeping its first `keep` rows and
    /// zeroing the old buffers.
    fn reallocate(&mut self, layer: usize, cap: usize, keep: usize) -> Result<()> {
        let (kv_heads, width) = (self.shape.kv_heads, self.width(layer));
        let k_new = Tensor::zeros((kv_heads, cap, width), self.store, &self.device)?;
        let v_new = Tensor::zeros((kv_heads, cap, width), self.store, &self.device)?;
        if let Some(old) = self.layers[layer].take() {
            if keep > 0 {
                k_new.slice_set(&old.k.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
                v_new.slice_set(&old.v.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
            }
            old.k.zero_set()?;
            old.v.zero_set()?;
        }
        self.layers[layer] = Some(LayerKv { k: k_new, v: v_new });
        Ok(())
    }

    /// Allocates room for `tokens` tokens in every layer now, so that a sequence
    /// whose budget was reserved never allocates mid-generation.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        let tokens = tokens.min(self.shape.max_len).saturating_sub(self.offset());
        for layer in 0..self.shape.layers {
            if tokens > self.capacity(layer) {
                self.reallocate(layer, tokens, self.len)?;
            }
        }
        Ok(())
    }

    /// Frees the rows past the cached length: a session kept between requests
    /// holds only what it uses.
    pub fn shrink_to_fit(&mut self) -> Result<()> {
        for layer in 0..self.shape.layers {
            if self.capacity(layer) > self.len {
                if self.len == 0 {
                    if let Some(old) = self.layers[layer].take() {
                        old.k.zero_set()?;
                        old.v.zero_set()?;
                    }
                } else {
                    self.reallocate(layer, self.len, self.len)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes allocated for `tokens` tokens of this shape and storage dtype: what a
    /// memory budget counts.
    pub fn bytes_for(shape: CacheShape, layout: &Layout, store: DType, tokens: usize) -> usize {
        let widths: usize = (0..shape.layers).map(|l| layout.width(l, shape.head_dim)).sum();
        2 * shape.kv_heads * widths * tokens.min(shape.max_len) * store.size_in_bytes()
    }

    /// Bytes this cache holds allocated (its capacity, not just its length).
    pub fn allocated_bytes(&self) -> usize {
        let row = 2 * self.shape.kv_heads * self.store.size_in_bytes();
        (0..self.shape.layers).map(|l| row * self.width(l) * self.capacity(l)).sum()
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// The first `len` own rows of `layer` (after any shared prefix) as stored:
    /// rotated into the frame the cache was written in (plaintext for the identity
    /// frame and for layers a depth gate left unrotated), (kv, len, width) in the
    /// storage dtype.
    pub fn stored_rows(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        match &self.layers[layer] {
            Some(buf) => Ok((buf.k.narrow(1, 0, len)?, buf.v.narrow(1, 0, len)?)),
            None => candle_core::bail!("layer {layer} of the cache is empty"),
        }
    }

    /// Sets the context length after a forward pass wrote every layer.
    pub fn set_len(&mut self, len: usize) {
        self.len = len - self.offset();
    }

    /// Forgets tokens past context length `len` (their rows are zeroed): reuse of a
    /// shorter prefix, benchmarks that hold the context fixed. A shared prefix
    /// cannot be cut into.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let Some(len) = len.checked_sub(self.offset()) else {
            candle_core::bail!("cannot truncate into the shared prefix of {} tokens", self.offset())
        };
        if len >= self.len {
            return Ok(());
        }
        // The block that keeps some of its rows is sealed again below: at verified
        // layers its rows are checked first, as before a write.
        let from = len - len % BLOCK;
        if let (Some((key, owner)), true) = (self.integrity.sealer.clone(), from < len) {
            for layer in 0..self.shape.layers {
                if self.integrity.verify.get(layer).copied().unwrap_or(false) {
                    let mut failed = Vec::new();
                    let block = from / BLOCK;
                    let own = self.len.min(from + BLOCK);
                    self.integrity.findings.blocks_verified +=
                        check_blocks(self, layer, block, own, &key, &owner, self.offset(), &mut failed)?;
                    self.note_failures(layer, &owner, &failed);
                }
            }
        }
        for (layer, buf) in self.layers.iter().enumerate() {
            let Some(buf) = buf else { continue };
            let tail = self.len - len;
            let zeros = Tensor::zeros((self.shape.kv_heads, tail, self.width(layer)), self.store, &self.device)?;
            buf.k.slice_set(&zeros, 1, len)?;
            buf.v.slice_set(&zeros, 1, len)?;
        }
        self.len = len;
        // The last block now ends earlier: seal it again. Blocks past it are gone,
        // and so is what their failures said (a failed last block stays failed).
        let end = self.offset() + len;
        self.integrity.reported.retain(|&(_, _, start)| start < end);
        for layer in 0..self.shape.layers {
            self.integrity.seals[layer].truncate(from / BLOCK * self.shape.kv_heads);
            if self.layers[layer].is_some() {
                self.reseal(layer, from, len)?;
            }
        }
        Ok(())
    }

    /// The matched-key round trip: the plaintext K and V of `layer`'s own rows,
    /// recovered with the frame the cache was written in, as (kv, len, d) in the
    /// plaintext dtype.
    pub fn recover(&self, layer: usize, frame: &Frame) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.stored_rows(layer, self.len)?;
        let (k, v) = match frame.layer(layer) {
            None => (k, v),
            Some(rot) => rot.unrotate_kv_padded(&k.contiguous()?, &v.contiguous()?)?,
        };
        // Snapped with the pads still on: the round trip's error scales with the
        // whole row's norm. Then the pads are dropped.
        let (k, v) = if self.store == DType::F64 { (snap_zeros(&k)?, snap_zeros(&v)?) } else { (k, v) };
        let d = self.shape.head_dim;
        Ok((k.narrow(2, 0, d)?.to_dtype(self.plain)?, v.narrow(2, 0, d)?.to_dtype(self.plain)?))
    }

    /// Re-key without a new prefill: every row goes from `old`'s frame to `new`'s,
    /// k'' = R_new R_old^T k' (and the same with S for V), in the storage dtype.
    /// Padded rows get the new key's pads. A sealed cache is sealed again for the
    /// new epoch. Both frames must have the cache's layout.
    pub fn rekey(&mut self, old: &Frame, new: &Frame) -> Result<()> {
        let plain = Layout::plain(self.shape.layers);
        for f in [old, new] {
            if f.layout().unwrap_or(&plain) != &self.layout {
                candle_core::bail!("re-key: {} does not have the cache's layout", f.describe())
            }
        }
        if let Some((_, owner)) = &mut self.integrity.sealer {
            *owner = Owner::of(new);
        }
        for layer in 0..self.shape.layers {
            if self.layers[layer].is_none() || self.len == 0 {
                continue;
            }
            let (k, v) = self.stored_rows(layer, self.len)?;
            let (k, v) = (k.contiguous()?, v.contiguous()?);
            let (k, v) = match old.layer(layer) {
                None => (k, v),
                Some(r) => r.unrotate_kv(&k, &v)?,
            };
            let (k, v) = match new.layer(layer) {
                None => (k, v),
                Some(r) => {
                    let (k, v, overflow) = r.rotate_kv(&k, &v, self.store, self.offset())?;
                    self.note_overflow(overflow);
                    (k, v)
                }
            };
            self.write_rows(layer, 0, &k, &v)?;
        }
        Ok(())
    }

    /// Fills the cache to `len` tokens with random rotated rows: benchmarks measure
    /// decode at a long context without paying for the prefill.
    pub fn fill_random(&mut self, len: usize) -> Result<()> {
        let CacheShape { layers, kv_heads, .. } = self.shape;
        for layer in 0..layers {
            let w = self.width(layer);
            let k = Tensor::randn(0f32, 1f32, (kv_heads, len, w), &self.device)?;
            let v = Tensor::randn(0f32, 1f32, (kv_heads, len, w), &self.device)?;
            self.write_rows(layer, 0, &k, &v)?;
        }
        self.len = len;
        Ok(())
    }
}

/// A failed block: (kv head, first position, end position, why).
type Failed = (usize, usize, usize, integrity::Reason);

/// Checks the blocks of `cache`'s first `own` rows of `layer` from block `first`
/// on (at context positions from `offset`) in `reader`'s frame; appends failures,
/// returns blocks checked.
#[allow(clippy::too_many_arguments)]
fn check_blocks(
    cache: &KvCache,
    layer: usize,
    first: usize,
    own: usize,
    key: &TagKey,
    reader: &Owner,
    offset: usize,
    failed: &mut Vec<Failed>,
) -> Result<u64> {
    let Some(buf) = &cache.layers[layer] else { return Ok(0) };
    let kv = cache.shape.kv_heads;
    let mut checked = 0;
    for block in first..own.div_ceil(BLOCK) {
        let start = block * BLOCK;
        let rows = own.min(start + BLOCK) - start;
        for head in 0..kv {
            let at = BlockAt { layer, head, start: offset + start, rows };
            let seal = cache.integrity.seals[layer].get(block * kv + head);
            let outcome = integrity::with_rows(&buf.k, head, start, rows, |k| {
                integrity::with_rows(&buf.v, head, start, rows, |v| integrity::check(key, reader, at, k, v, seal))
            })??;
            if let Err(reason) = outcome {
                failed.push((head, offset + start, offset + start + rows, reason));
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// Hooks for the corrective layer's tests (feature `tamper`, which only
/// kframe-testkit enables): copy a block (bytes and seals) out of one cache into
/// another, or change bytes without sealing them, as an attacker with write access
/// to cache memory could.
#[cfg(feature = "tamper")]
impl KvCache {
    pub fn block_copy(&self, layer: usize, block: usize) -> (Tensor, Tensor, Vec<Seal>) {
        let buf = self.layers[layer].as_ref().unwrap();
        let kv = self.shape.kv_heads;
        let rows = BLOCK.min(self.len - block * BLOCK);
        let k = buf.k.narrow(1, block * BLOCK, rows).unwrap().contiguous().unwrap().copy().unwrap();
        let v = buf.v.narrow(1, block * BLOCK, rows).unwrap().contiguous().unwrap().copy().unwrap();
        (k, v, self.integrity.seals[layer][block * kv..(block + 1) * kv].to_vec())
    }

    pub fn put_block(&mut self, layer: usize, block: usize, (k, v, seals): (Tensor, Tensor, Vec<Seal>)) {
        let buf = self.layers[layer].as_ref().unwrap();
        buf.k.slice_set(&k, 1, block * BLOCK).unwrap();
        buf.v.slice_set(&v, 1, block * BLOCK).unwrap();
        let kv = self.shape.kv_heads;
        self.integrity.seals[layer][block * kv..(block + 1) * kv].copy_from_slice(&seals);
    }

    /// Sets own row `row` of `layer`'s K (every head) to `value`, leaving the seal.
    pub fn overwrite_row(&mut self, layer: usize, row: usize, value: f64) {
        let buf = self.layers[layer].as_ref().unwrap();
        let CacheShape { kv_heads, head_dim, .. } = self.shape;
        let t = (Tensor::ones((kv_heads, 1, head_dim), self.store, &self.device).unwrap() * value).unwrap();
        buf.k.slice_set(&t, 1, row).unwrap();
    }
}

/// Sets to zero the elements of f64 rows (kv, len, d) that lie within the round
/// trip's rounding error of zero.
///
/// `R^T (R k)` in f64 returns each element to within about `d * eps * |k|`, which
/// rounds back to the plaintext dtype bit for bit, except where the plaintext is
/// exactly zero: there the residue survives in bf16 and f32, whose range reaches
/// 1e-15. Elements below `4 d eps |k|` are therefore taken as zero. This is exact
/// unless a plaintext element is nonzero yet 2^-40 times smaller than its vector's
/// norm, which the f32-accumulated projections that produce K and V do not emit,
/// or is a negative zero.
fn snap_zeros(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(2)?;
    let bound = (x.sqr()?.sum_keepdim(2)?.sqrt()? * (4.0 * d as f64 * f64::EPSILON))?;
    let small = x.abs()?.broadcast_le(&bound)?;
    small.where_cond(&x.zeros_like()?, x)
}

impl Drop for KvCache {
    fn drop(&mut self) {
        for buf in self.layers.iter().flatten() {
            let _ = buf.k.zero_set();
            let _ = buf.v.zero_set();
        }
    }
}

/// How closely a recovered tensor matches the plaintext it came from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundTrip {
    pub elements: usize,
    pub bit_exact: usize,
    pub max_abs_err: f64,
}

impl RoundTrip {
    /// Compares two tensors of the same dtype element by element, bit for bit.
    pub fn compare(plain: &Tensor, recovered: &Tensor) -> Result<Self> {
        if plain.dtype() != recovered.dtype() || plain.shape() != recovered.shape() {
            candle_core::bail!(
                "round trip: {:?}{:?} vs {:?}{:?}",
                plain.dtype(),
                plain.shape(),
                recovered.dtype(),
                recovered.shape()
            );
        }
        let bits = |t: &Tensor| -> Result<Vec<u64>> {
            let t = t.flatten_all()?;
            Ok(match t.dtype() {
                DType::F16 => t.to_vec1::<half::f16>()?.into_iter().map(|x| x.to_bits() as u64).collect(),
                DType::BF16 => t.to_vec1::<half::bf16>()?.into_iter().map(|x| x.to_bits() as u64).collect(),
                DType::F32 => t.to_vec1::<f32>()?.into_iter().map(|x| x.to_bits() as u64).collect(),
                DType::F64 => t.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect(),
                other => candle_core::bail!("round trip: unsupported dtype {other:?}"),
            })
        };
        let (a, b) = (bits(plain)?, bits(recovered)?);
        let bit_exact = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        let diff = (plain.to_dtype(DType::F64)? - recovered.to_dtype(DType::F64)?)?;
        let max_abs_err = diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        Ok(Self { elements: a.len(), bit_exact, max_abs_err })
    }

    pub fn merge(self, other: Self) -> Self {
        Self {
            elements: self.elements + other.elements,
            bit_exact: self.bit_exact + other.bit_exact,
            max_abs_err: self.max_abs_err.max(other.max_abs_err),
        }
    }

    pub fn is_bit_exact(&self) -> bool {
        self.bit_exact == self.elements
    }
}
