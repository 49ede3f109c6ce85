//! kframe serves one shared Qwen2 model to many tenants and keeps each tenant's
//! attention cache in a private frame: a secret orthonormal rotation of K and V.
//!
//! # Layout
//!
//! - [`keys`]: the master secret and per-tenant key material (blake3).
//! - [`rotation`]: Haar-random rotations derived from a tenant key; the [`rotation::Frame`]
//!   a sequence's cache lives in; an LRU keyring.
//! - [`pad`]: norm-equalizing padding of chosen layers; its calibration.
//! - [`cache`]: one sequence's cache of rotated K and V; the matched-key round trip.
//! - [`model`]: the Qwen2 forward pass with rotated attention; loading Hugging Face
//!   directories ([`model::load`]); config parsing; random-weight models for tests.
//! - [`generate`]: prefill, decode and sampling for one sequence.
//! - [`engine`]: the multi-tenant scheduler: sessions, batched decode across
//!   tenants, the memory budget and the policies that keep it.
//! - [`device`]: CPU / CUDA / Metal selection.
//! - [`bench`]: the benchmarks behind `kframe bench`.
//! - [`cli`]: the command line.
//!
//! Data flows one way: tokens -> model (rotating K and V into the frame) -> cache ->
//! logits -> sampler -> text.

pub mod bench;
pub mod cache;
pub mod cli;
pub mod corpus;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod integrity;
pub mod keys;
pub mod model;
pub mod pad;
pub mod plugin;
pub mod rotation;
pub mod server;

pub use error::{Error, Result};
