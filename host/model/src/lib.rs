//! kframe-model: the Qwen2 forward pass with rotated attention, and everything a
//! model needs to be loaded and run.
//!
//! # Layout
//!
//! - [`config`]: `config.json` as the Qwen2.5 releases write it.
//! - [`load`]: opening a Hugging Face style directory, a GGUF file, or the
//!   embedded model.
//! - [`weights`]: where tensors come from, dense or quantized (`--quantize`).
//! - [`gguf`]: reading GGUF files (llama.cpp's format).
//! - [`export`]: writing a model directory as a GGUF file.
//! - [`kernels`]: weight products on the CPU, f32 or half-precision weights.
//! - [`kquants`]: weight products on the CPU with Q4_K and Q6_K blocks, for a few rows.
//! - [`fused`]: single-query attention over a cache, read in place.
//! - [`qwen2`]: the forward pass. Each sequence's K and V are rotated into its
//!   frame between RoPE and the cache write; one code path serves one sequence and
//!   a batch alike.
//! - [`bundle`]: a model with its tokenizer ([`ModelBundle`]).
//! - [`generate`]: sampling, streaming text, and generating for one sequence.
//! - [`calibrate`]: measuring the norm-pad calibration.
//! - [`corpus`]: the synthetic retrieval corpus the embedded model learned from.
//! - [`synth`]: random-weight models written as real directories (tests, benches).
//! - [`rounding`]: how far two float evaluations of the same pass may differ.
//! - [`device`]: CPU / CUDA / Metal, the compute dtype, the compute thread pool.
//! - [`device_check`]: the rotation and batching guarantees, run on a device.
//!
//! # Dependencies
//!
//! kframe-core (caches, frames), candle (tensors, layers, the sampler), tokenizers.
//! Nothing that serves, sandboxes or plots. Modules point one way: config, weights <- qwen2, gguf
//! <- load <- bundle, export <- generate, calibrate.
//!
//! # Example: a rotated-frame generation
//!
//! ```
//! use candle_core::{DType, Device};
//! use kframe_core::cache::KvPrecision;
//! use kframe_core::keys::MasterSecret;
//! use kframe_core::rotation::Keyring;
//! use kframe_model::generate::SamplingParams;
//! use kframe_model::load::ModelDir;
//! use kframe_model::{ModelBundle, Variant};
//!
//! # fn main() -> kframe_model::Result<()> {
//! let dir = ModelDir::embedded()?;
//! let bundle = ModelBundle::load(&dir, DType::F32, &Device::Cpu)?;
//! // Alice's frame: her K and V are rotated by matrices derived from her key.
//! let ring = Keyring::builder(MasterSecret::from_bytes([7; 32]), bundle.model.rotation_shape()).build();
//! let alice = ring.frame("alice", 0)?;
//! let prompt = bundle.encode("user secret of rosa 8493 . query secret of rosa")?;
//! let params = SamplingParams { max_tokens: 1, ..SamplingParams::default() };
//! let out = bundle.generate(&prompt, &alice, Variant::ProbeTime, KvPrecision::Native, &params, |_| {})?;
//! assert_eq!(out.text.trim(), "8493");
//! # Ok(())
//! # }
//! ```

pub mod bundle;
pub mod calibrate;
pub mod config;
pub mod corpus;
pub mod device;
pub mod device_check;
pub mod error;
pub mod export;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kquants;
pub mod load;
pub mod qwen2;
pub mod rounding;
pub mod synth;
pub mod weights;

pub use bundle::ModelBundle;
pub use config::Config;
pub use error::{Error, Result};
pub use qwen2::{Qwen2, Variant};
