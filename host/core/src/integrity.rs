//! The depth-gated corrective layer: block seals.
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
}
