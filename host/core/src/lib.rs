//! kframe-core: the rotated attention cache, and nothing that computes what goes
//! into it.
//!
//! A tenant's K and V live in a private frame: a secret orthonormal rotation per
//! (layer, kv head), derived from the tenant's key. Rotation is an isometry, so the
//! right key gives exact attention; the cache never holds a tenant's plaintext.
//!
//! # Layout
//!
//! - [`keys`]: the master secret and per-tenant key material (blake3).
//! - [`layout`]: which layers a cache pads (norm-equalizing pads) or leaves
//!   unrotated, the pad PRF, and the stored norm calibration it pads to.
//! - [`rotation`]: Haar-random rotations derived from a key; the [`rotation::Frame`]
//!   a sequence's cache lives in; an LRU keyring of derived frames.
//! - [`integrity`]: the block seals of the corrective layer: keyed tags, who a block
//!   belongs to, why one fails.
//! - [`cache`]: one sequence's store of rotated K and V, sealed and verified per
//!   block; the matched-key round trip and re-key.
//!
//! # Dependencies
//!
//! candle-core for tensors and a few small crates (blake3, ChaCha20, nalgebra's QR);
//! nothing of kframe's. Modules point one way: keys <- layout <- rotation <-
//! integrity <- cache.

pub mod cache;
pub mod error;
pub mod integrity;
pub mod keys;
pub mod layout;
pub mod rotation;

pub use error::{Error, Result};
