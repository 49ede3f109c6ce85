//! The depth-gated corrective layer (DESIGN.md section 5).
//!
//! Every block of [`BLOCK`] cache rows carries, per (layer, kv head), a seal: a
//! blake3 keyed tag over (tenant, epoch, layer, head, first position, rows, K
//! bytes, V bytes), computed when the rows are written. At the layers the
//! depth-gate policy selects, attention first recomputes the tags of every block it
//! is about to read and compares them with the seals, in the frame of the reader
//! (its tenant and current epoch), before the step writes its own rows (a write
//! seals its block again, so that block's older rows are checked first). A block
//! that fails is masked out of attention, reported once as an [`IsolationEvent`],
//! and never attended to: writing into it or sealing it again keeps it failed.
//!
//! The tag key is derived from the master secret and never leaves the server, so
//! a block cannot be re-sealed by anyone who can only read or write cache memory.
//! The seal also records whom it was written for, which lets a failure say why
//! (another tenant's block, an old epoch, changed bytes); the decision itself
//! rests on the tag alone.

use crate::keys::MasterSecret;
use crate::rotation::Frame;
use candle_core::{DType, Result, Tensor};
use zeroize::Zeroizing;

/// Rows per sealed block: small enough that re-sealing the last block on every
/// decode step is cheap, large enough that seals stay ~1% of the K/V bytes.
pub const BLOCK: usize = 32;

const TAG_CONTEXT: &str = "kframe cache block tag v1";
const OWNER_CONTEXT: &str = "kframe cache block owner v1";

/// The server's key for block tags. Zeroized when dropped.
pub struct TagKey(Zeroizing<[u8; 32]>);

impl TagKey {
    pub fn derive(master: &MasterSecret) -> Self {
        Self(master.derive(TAG_CONTEXT))
    }
}

/// Whose frame rows were written in: a tenant and its key epoch, or the model's
/// own frame (shared prefixes, reference runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub tenant: String,
    pub epoch: u64,
}

impl Owner {
    pub fn of(frame: &Frame) -> Self {
        match frame {
            Frame::Identity => Self::model(),
            Frame::Tenant(r) => Self { tenant: r.tenant().to_owned(), epoch: r.epoch() },
        }
    }

    pub fn model() -> Self {
        Self { tenant: String::new(), epoch: 0 }
    }

    fn fingerprint(&self) -> u64 {
        let h = blake3::derive_key(OWNER_CONTEXT, self.tenant.as_bytes());
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
    }

    pub fn describe(&self) -> String {
        if self.tenant.is_empty() {
            "the model's frame".into()
        } else {
            format!("tenant {:?} epoch {}", self.tenant, self.epoch)
        }
    }
}

/// One block's seal for one (layer, kv head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    tag: [u8; 32],
    /// Whom the block was sealed for (a fingerprint of the tenant) and in which
    /// epoch: diagnostics only, the tag decides.
    tenant: u64,
    epoch: u64,
}

/// Why a block failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Sealed for another tenant: a block moved between caches.
    ForeignTenant,
    /// Sealed for this tenant in an older key epoch: a block that outlived a re-key.
    StaleEpoch,
    /// The bytes (or positions) are not what was sealed.
    Tampered,
    /// Rows with no seal at all.
    Unsealed,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::ForeignTenant => "block sealed for another tenant",
            Reason::StaleEpoch => "block sealed in an older key epoch",
            Reason::Tampered => "block bytes differ from their seal",
            Reason::Unsealed => "block has no seal",
        })
    }
}

/// A block that failed verification and was masked out of attention.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IsolationEvent {
    /// The reader: the tenant whose attention would have read the block.
    pub tenant: String,
    pub epoch: u64,
    pub layer: usize,
    pub head: usize,
    /// Context positions start..end of the block.
    pub positions: (usize, usize),
    pub reason: Reason,
}

/// What verification found in one cache since it was last asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// (layer, kv head) blocks whose tags were recomputed and compared.
    pub blocks_verified: u64,
    /// Blocks masked out of attention (each masked read counts).
    pub blocks_masked: u64,
    /// Newly failed blocks (each block is reported once per cache).
    pub events: Vec<IsolationEvent>,
    /// Rows written unpadded because their norm exceeded the calibrated c.
    pub pad_overflow: u64,
}

/// What one request's attention checked, for its response and the isolation
/// report: the layers verified, the layers the depth-gate left unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IsolationReport {
    pub checked_layers: Vec<usize>,
    pub unchecked_layers: Vec<usize>,
    pub blocks_verified: u64,
    pub blocks_masked: u64,
    pub events: usize,
    /// Layers whose rows are norm-padded (see [`crate::pad`]).
    pub padded_layers: Vec<usize>,
    /// Layers the depth gate left in the model's frame: their rows are plaintext.
    pub unrotated_layers: Vec<usize>,
    /// Rows left unpadded there because their norm exceeded the calibration.
    pub pad_overflow: u64,
}

impl IsolationReport {
    pub fn new(verify: &[bool]) -> Self {
        let (checked, unchecked): (Vec<usize>, Vec<usize>) = (0..verify.len()).partition(|&l| verify[l]);
        Self { checked_layers: checked, unchecked_layers: unchecked, ..Self::default() }
    }

    /// The report of a cache of `layout`: its padded and unrotated layers.
    pub fn laid_out(mut self, layout: &crate::pad::Layout) -> Self {
        self.padded_layers = layout.padded_layers();
        self.unrotated_layers = layout.unrotated_layers();
        self
    }

    pub fn add(&mut self, f: &Findings) {
        self.blocks_verified += f.blocks_verified;
        self.blocks_masked += f.blocks_masked;
        self.events += f.events.len();
        self.pad_overflow += f.pad_overflow;
    }
}

/// Where a block sits: layer, kv head, first context position, rows.
#[derive(Debug, Clone, Copy)]
pub struct BlockAt {
    pub layer: usize,
    pub head: usize,
    pub start: usize,
    pub rows: usize,
}

/// The block's keyed hash over k || v || tenant || tenant length || epoch ||
/// layer || head || start || rows || k length (integers u64 little-endian). Read
/// from the end, the fields are fixed-width up to the tenant, whose length comes
/// after it, so the encoding is unambiguous. The bytes come first so that blake3
/// hashes them from a chunk boundary, several chunks at once: with the fields in
/// front, a 32-row block hashed at less than half the speed.
fn tag(key: &TagKey, owner: &Owner, at: BlockAt, k: &[u8], v: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(k);
    h.update(v);
    h.update(owner.tenant.as_bytes());
    let fields = [owner.tenant.len() as u64, owner.epoch, at.layer as u64, at.head as u64, at.start as u64];
    for n in fields.into_iter().chain([at.rows as u64, k.len() as u64]) {
        h.update(&n.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

pub fn seal(key: &TagKey, owner: &Owner, at: BlockAt, k: &[u8], v: &[u8]) -> Seal {
    Seal { tag: tag(key, owner, at, k, v), tenant: owner.fingerprint(), epoch: owner.epoch }
}

/// A seal no block's bytes match: what a block that failed verification keeps
/// when rows are written into it or it is sealed again, so that writing to it
/// never turns changed bytes into sealed ones.
pub fn poisoned(owner: &Owner) -> Seal {
    Seal { tag: [0; 32], tenant: owner.fingerprint(), epoch: owner.epoch }
}

/// Checks a block against its seal in the reader's frame.
pub fn check(
    key: &TagKey,
    reader: &Owner,
    at: BlockAt,
    k: &[u8],
    v: &[u8],
    seal: Option<&Seal>,
) -> std::result::Result<(), Reason> {
    let Some(seal) = seal else { return Err(Reason::Unsealed) };
    // blake3's `Hash` compares in constant time; the tag is not secret, but the
    // comparison costs nothing.
    if blake3::Hash::from(tag(key, reader, at, k, v)) == blake3::Hash::from(seal.tag) {
        return Ok(());
    }
    Err(if seal.tenant != reader.fingerprint() {
        Reason::ForeignTenant
    } else if seal.epoch != reader.epoch {
        Reason::StaleEpoch
    } else {
        Reason::Tampered
    })
}

/// Runs `f` over the little-endian bytes of rows `start..start + rows` of head
/// `head` in a (kv heads, capacity, d) buffer: in place for a CPU tensor, through
/// a copy on other devices.
pub fn with_rows<R>(buf: &Tensor, head: usize, start: usize, rows: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    let (_, cap, d) = buf.dims3()?;
    let (storage, layout) = buf.storage_and_layout();
    if let (candle_core::Storage::Cpu(cpu), true) = (&*storage, layout.is_contiguous()) {
        let from = layout.start_offset() + (head * cap + start) * d;
        let n = rows * d;
        use candle_core::CpuStorage as S;
        let bytes: &[u8] = match cpu {
            S::F32(x) => bytemuck::cast_slice(&x[from..from + n]),
            S::F64(x) => bytemuck::cast_slice(&x[from..from + n]),
            S::F16(x) => bytemuck::cast_slice(&x[from..from + n]),
            S::BF16(x) => bytemuck::cast_slice(&x[from..from + n]),
            _ => candle_core::bail!("block tags: unsupported cache dtype {:?}", buf.dtype()),
        };
        return Ok(f(bytes));
    }
    drop(storage);
    let rows = buf.narrow(0, head, 1)?.narrow(1, start, rows)?.flatten_all()?;
    let bytes: Vec<u8> = match buf.dtype() {
        DType::F32 => bytemuck::cast_slice(&rows.to_vec1::<f32>()?).to_vec(),
        DType::F64 => bytemuck::cast_slice(&rows.to_vec1::<f64>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&rows.to_vec1::<half::f16>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&rows.to_vec1::<half::bf16>()?).to_vec(),
        other => candle_core::bail!("block tags: unsupported cache dtype {other:?}"),
    };
    Ok(f(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> TagKey {
        TagKey(Zeroizing::new([b; 32]))
    }

    fn alice(epoch: u64) -> Owner {
        Owner { tenant: "alice".into(), epoch }
    }

    const AT: BlockAt = BlockAt { layer: 1, head: 0, start: 32, rows: 2 };

    #[test]
    fn a_seal_checks_for_its_owner_and_names_what_differs_otherwise() {
        let (k, v) = ([1u8; 16], [2u8; 16]);
        let s = seal(&key(7), &alice(3), AT, &k, &v);
        assert_eq!(check(&key(7), &alice(3), AT, &k, &v, Some(&s)), Ok(()));
        let bob = Owner { tenant: "bob".into(), epoch: 3 };
        assert_eq!(check(&key(7), &bob, AT, &k, &v, Some(&s)), Err(Reason::ForeignTenant));
        assert_eq!(check(&key(7), &alice(4), AT, &k, &v, Some(&s)), Err(Reason::StaleEpoch));
        let mut k2 = k;
        k2[5] ^= 1;
        assert_eq!(check(&key(7), &alice(3), AT, &k2, &v, Some(&s)), Err(Reason::Tampered));
        let moved = BlockAt { start: 64, ..AT };
        assert_eq!(check(&key(7), &alice(3), moved, &k, &v, Some(&s)), Err(Reason::Tampered));
        let other_layer = BlockAt { layer: 0, ..AT };
        assert_eq!(check(&key(7), &alice(3), other_layer, &k, &v, Some(&s)), Err(Reason::Tampered));
        // Without the server's key a seal cannot be forged.
        let forged = seal(&key(8), &alice(3), AT, &k2, &v);
        assert_eq!(check(&key(7), &alice(3), AT, &k2, &v, Some(&forged)), Err(Reason::Tampered));
        assert_eq!(check(&key(7), &alice(3), AT, &k, &v, None), Err(Reason::Unsealed));
    }

    #[test]
    fn rows_are_read_in_place_on_the_cpu_as_their_little_endian_bytes() {
        let t = Tensor::arange(0f32, 24., &candle_core::Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        let got = with_rows(&t, 1, 1, 2, |b| b.to_vec()).unwrap();
        let want: Vec<u8> = (16..24).flat_map(|x| (x as f32).to_le_bytes()).collect();
        assert_eq!(got, want);
        let h = t.to_dtype(DType::F16).unwrap();
        let got = with_rows(&h, 0, 2, 1, |b| b.to_vec()).unwrap();
        let want: Vec<u8> = (8..12).flat_map(|x| half::f16::from_f32(x as f32).to_le_bytes()).collect();
        assert_eq!(got, want);
    }

    /// The corrective layer end to end on a random tiny Qwen2 (2 layers, 2 kv heads).
    mod attention {
        use super::super::*;
        use crate::cache::{KvCache, KvPrecision};
        use crate::keys::MasterSecret;
        use crate::model::{synth, BatchSeq, Chunk, Qwen2, Variant};
        use crate::rotation::Keyring;
        use candle_core::Device;
        use candle_nn::VarBuilder;
        use std::sync::Arc;

        struct Setup {
            model: Qwen2,
            ring: Keyring,
            key: Arc<TagKey>,
            prompt: Vec<u32>,
        }

        fn setup() -> Setup {
            let cfg = synth::tiny_config();
            let weights = synth::random_weights(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
            let model = Qwen2::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap();
            let master = MasterSecret::from_bytes([9; 32]);
            let key = Arc::new(TagKey::derive(&master));
            let ring = Keyring::new(master, model.rotation_shape(), DType::F32, false, Device::Cpu, 8);
            // 70 tokens: blocks at positions 0..32, 32..64 and 64..70.
            let prompt = (0..70u32).map(|i| (i * 37 + 11) % 500).collect();
            Setup { model, ring, key, prompt }
        }

        /// A sealed cache holding the prompt, prefilled in `frame`, verifying every layer.
        fn prefilled(s: &Setup, frame: &Frame) -> KvCache {
            let mut c = s.model.new_cache(KvPrecision::Native);
            c.seal_with(s.key.clone(), frame).unwrap();
            c.set_verify(vec![true, true]);
            s.model.forward(&s.prompt, &mut c, frame, Variant::ProbeTime).unwrap();
            let f = c.take_findings();
            // The prefill's own rows are not checked as they are written; the
            // rows already there are (none, for a new cache).
            assert!(f.events.is_empty() && f.blocks_verified == 0, "{f:?}");
            c
        }

        /// Two caches holding the prompt in `frame`, with row `row` of layer 1's K
        /// changed without sealing, to 100 in the first and -7 in the second.
        fn tampered_pair(s: &Setup, frame: &Frame, row: usize) -> (KvCache, KvCache) {
            let (mut a, mut b) = (prefilled(s, frame), prefilled(s, frame));
            a.overwrite_row(1, row, 100.0);
            b.overwrite_row(1, row, -7.0);
            (a, b)
        }

        /// How far a batched step's logits may lie from the same sequence's alone:
        /// the rounding of two f32 passes in a tenant frame (see
        /// `crate::model::rounding`).
        fn rounding_bound(s: &Setup, logits: &[f32]) -> f64 {
            use crate::model::rounding::{Reductions, F32_UNIT};
            let cfg = s.model.config();
            let chain =
                Reductions::forward_pass(cfg, s.prompt.len() + 1).then(Reductions::rotated_layers(cfg, cfg.head_dim));
            chain.bound_between(F32_UNIT, logits.iter().fold(0f32, |m, x| m.max(x.abs())) as f64)
        }

        fn step(s: &Setup, c: &mut KvCache, frame: &Frame) -> Vec<f32> {
            s.model.forward(&[7], c, frame, Variant::ProbeTime).unwrap().to_vec1().unwrap()
        }

        #[test]
        fn a_corrupted_block_is_masked_reported_once_and_never_attended_to() {
            let s = setup();
            let alice = s.ring.frame("alice", 0).unwrap();
            let clean = step(&s, &mut prefilled(&s, &alice), &alice);
            // The same block of layer 1 corrupted two different ways.
            let (mut a, mut b) = tampered_pair(&s, &alice, 40);
            let (la, lb) = (step(&s, &mut a, &alice), step(&s, &mut b, &alice));
            // Masked: the corrupted bytes never reach the output, whatever they are.
            assert_eq!(la, lb);
            assert_ne!(la, clean, "masking a block changes attention");
            let f = a.take_findings();
            assert_eq!(f.events.len(), 2, "one event per kv head: {f:?}");
            for (head, e) in f.events.iter().enumerate() {
                let want = IsolationEvent {
                    tenant: "alice".into(),
                    epoch: 0,
                    layer: 1,
                    head,
                    positions: (32, 64),
                    reason: Reason::Tampered,
                };
                assert_eq!(e, &want);
            }
            assert_eq!(f.blocks_masked, 2);
            // Masked again on the next step, but reported once.
            step(&s, &mut a, &alice);
            let f = a.take_findings();
            assert!(f.events.is_empty());
            assert_eq!(f.blocks_masked, 2);
        }

        #[test]
        fn changed_bytes_in_the_block_being_written_are_caught_before_the_write_seals_it_and_stay_masked() {
            let s = setup();
            let alice = s.ring.frame("alice", 0).unwrap();
            // Row 66 lies in the last, open block (64..70): the next step writes
            // row 70 into it and seals the block again.
            let (mut a, mut b) = tampered_pair(&s, &alice, 66);
            for step_no in 0..3 {
                assert_eq!(step(&s, &mut a, &alice), step(&s, &mut b, &alice), "step {step_no}: the bytes are masked");
                let f = a.take_findings();
                assert_eq!(f.blocks_masked, 2, "step {step_no}: one block per kv head, every step: {f:?}");
                let want: Vec<(usize, (usize, usize), Reason)> =
                    if step_no == 0 { vec![(1, (64, 70), Reason::Tampered); 2] } else { vec![] };
                let got: Vec<_> = f.events.iter().map(|e| (e.layer, e.positions, e.reason)).collect();
                assert_eq!(got, want, "step {step_no}: reported once");
            }
        }

        #[test]
        fn cutting_a_cache_back_checks_the_block_it_seals_again_and_keeps_it_failed() {
            let s = setup();
            let alice = s.ring.frame("alice", 0).unwrap();
            // Reuse of a shorter prefix: 68 of the 70 rows stay, so block 64..70 is
            // cut to 64..68 and sealed again; row 66 was changed before that.
            let (mut a, mut b) = tampered_pair(&s, &alice, 66);
            for c in [&mut a, &mut b] {
                c.truncate(68).unwrap();
            }
            let f = a.take_findings();
            let got: Vec<_> = f.events.iter().map(|e| (e.layer, e.positions, e.reason)).collect();
            assert_eq!(got, vec![(1, (64, 70), Reason::Tampered); 2], "{f:?}");
            // Still masked when decoding goes on from the shorter context.
            assert_eq!(step(&s, &mut a, &alice), step(&s, &mut b, &alice));
            let f = a.take_findings();
            assert!(f.events.is_empty() && f.blocks_masked == 2, "{f:?}");
        }

        #[test]
        fn with_verification_off_at_a_layer_its_corruption_is_read_and_the_report_says_unchecked() {
            let s = setup();
            let alice = s.ring.frame("alice", 0).unwrap();
            let (mut a, mut b) = tampered_pair(&s, &alice, 40);
            let gates = vec![true, false];
            for c in [&mut a, &mut b] {
                c.set_verify(gates.clone());
            }
            assert_ne!(step(&s, &mut a, &alice), step(&s, &mut b, &alice), "unverified, the bytes are attended to");
            let f = a.take_findings();
            assert!(f.events.is_empty());
            let mut report = IsolationReport::new(&gates);
            report.add(&f);
            assert_eq!((report.checked_layers, report.unchecked_layers), (vec![0], vec![1]));
            assert_eq!(report.blocks_verified, 3 * 2, "layer 0 only: 3 blocks x 2 kv heads");
        }

        #[test]
        fn a_block_moved_from_another_tenants_cache_is_masked_as_foreign_in_a_batch() {
            let s = setup();
            let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
            let (mut a, b, mut other) = (prefilled(&s, &alice), prefilled(&s, &bob), prefilled(&s, &bob));
            let mut solo = prefilled(&s, &bob);
            a.put_block(0, 1, b.block_copy(0, 1));
            let mut batch = [
                BatchSeq { token: 7, cache: &mut a, frame: &alice },
                BatchSeq { token: 7, cache: &mut other, frame: &bob },
            ];
            let logits = s.model.decode_batch(&mut batch, Variant::ProbeTime).unwrap();
            let f = a.take_findings();
            assert_eq!(f.events.len(), 2, "{f:?}");
            assert!(f
                .events
                .iter()
                .all(|e| e.reason == Reason::ForeignTenant && e.layer == 0 && e.positions == (32, 64)));
            // The neighbour in the batch is untouched.
            assert!(other.take_findings().events.is_empty());
            let mut alone = [BatchSeq { token: 7, cache: &mut solo, frame: &bob }];
            let solo_logits = s.model.decode_batch(&mut alone, Variant::ProbeTime).unwrap();
            let row = |l: &Tensor, i: usize| l.get(i).unwrap().to_vec1::<f32>().unwrap();
            // (Batched matmuls may round differently with another batch size.)
            let (got, alone) = (row(&logits, 1), row(&solo_logits, 0));
            let diff = got.iter().zip(&alone).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let bound = rounding_bound(&s, &alone);
            assert!(diff as f64 <= bound, "the neighbour's logits moved by {diff} (bound {bound:e})");
        }

        #[test]
        fn a_block_kept_from_before_a_rekey_is_masked_as_stale() {
            let s = setup();
            let (old, new) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("alice", 1).unwrap());
            let mut a = prefilled(&s, &old);
            let before = a.block_copy(1, 0);
            a.rekey(&old, &new).unwrap();
            step(&s, &mut a, &new);
            assert!(a.take_findings().events.is_empty(), "a re-key seals the cache for the new epoch");
            a.put_block(1, 0, before);
            step(&s, &mut a, &new);
            let f = a.take_findings();
            assert_eq!(f.events.len(), 2, "{f:?}");
            assert!(f.events.iter().all(|e| e.reason == Reason::StaleEpoch && e.layer == 1 && e.positions == (0, 32)));
            assert!(f.events.iter().all(|e| e.tenant == "alice" && e.epoch == 1));
        }

        #[test]
        fn reading_a_tenants_cache_with_another_key_flags_every_block() {
            let s = setup();
            let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
            let mut a = prefilled(&s, &alice);
            // Bob's key over Alice's cache: every block of hers is foreign to him,
            // except the row his own step writes (sealed for Alice too, since the
            // cache is hers): nothing of Alice's is left to attend to.
            let err = s.model.forward(&[7], &mut a, &bob, Variant::ProbeTime).unwrap_err();
            assert!(err.to_string().contains("failed verification"), "{err}");
        }

        /// In a batch, the sequence whose every block fails verification fails
        /// alone: its neighbour gets its solo logits and its cache moves on.
        #[test]
        fn a_sequence_with_nothing_left_to_attend_to_fails_alone_in_a_batch() {
            let s = setup();
            let (alice, bob) = (s.ring.frame("alice", 0).unwrap(), s.ring.frame("bob", 0).unwrap());
            let (mut a, mut other, mut solo) = (prefilled(&s, &alice), prefilled(&s, &bob), prefilled(&s, &bob));
            let token = [7];
            let mut batch = [
                Chunk { tokens: &token, cache: &mut a, frame: &bob },
                Chunk { tokens: &token, cache: &mut other, frame: &bob },
            ];
            let stepped = s.model.forward_chunks(&mut batch, Variant::ProbeTime).unwrap();
            let err = stepped.failed[0].as_ref().expect("bob's key over alice's cache fails");
            assert!(err.to_string().contains("failed verification"), "{err}");
            assert!(stepped.failed[1].is_none());
            assert_eq!((a.len(), other.len()), (s.prompt.len(), s.prompt.len() + 1));
            let alone = s.model.forward(&token, &mut solo, &bob, Variant::ProbeTime).unwrap();
            let (row, alone) =
                (stepped.logits.get(1).unwrap().to_vec1::<f32>().unwrap(), alone.to_vec1::<f32>().unwrap());
            let diff = row.iter().zip(&alone).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let bound = rounding_bound(&s, &alone);
            assert!(diff as f64 <= bound, "the neighbour's logits moved by {diff} (bound {bound:e})");
            // `decode_batch` reports the failure as its error.
            let mut again = [BatchSeq { token: 7, cache: &mut a, frame: &bob }];
            assert!(s.model.decode_batch(&mut again, Variant::ProbeTime).is_err());
        }
    }
}
