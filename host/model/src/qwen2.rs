//! kframe's Qwen2 forward pass, with each sequence's K and V rotated into its
//! frame between RoPE and the cache write.
//!
//! The structure follows candle-transformers' `qwen2.rs` (and reuses candle-nn's
//! layers) so that with the identity frame the logits match it; attention differs
//! in three ways: the cache is written rotated, GQA groups query heads per kv head
//! instead of copying K and V (`repeat_kv`), and the cache is preallocated instead of
//! concatenated every step.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fused;
use crate::kernels::{self, Form};
use crate::kquants;
use crate::weights::{Matrix, Safetensors, TensorSource};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use kframe_core::cache::{CacheShape, KvCache, KvPrecision};
use kframe_core::rotation::{Frame, RotationShape};
use rayon::prelude::*;
use std::sync::Arc;

/// Where attention applies a tenant's rotation. Both give the same tokens; they
/// differ in cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Variant {
    /// Rotate the queries and un-rotate the output: O(heads * d^2) a step.
    #[default]
    ProbeTime,
    /// Un-rotate the whole cache for a standard kernel: O(context * d^2) a step.
    DecodeTime,
}

/// One sequence's part in a forward pass: the tokens it feeds (a prompt, a prompt
/// chunk or one decode token) after what its own cache holds, in its own frame,
/// and where to record the plaintext K and V it writes, if anywhere.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub frame: &'a Frame,
    pub trace: Option<&'a mut Trace>,
}

impl<'a> Chunk<'a> {
    pub fn new(tokens: &'a [u32], cache: &'a mut KvCache, frame: &'a Frame) -> Self {
        Self { tokens, cache, frame, trace: None }
    }

    /// The same chunk, recording each layer's plaintext K and V into `trace`.
    pub fn traced(self, trace: &'a mut Trace) -> Self {
        Self { trace: Some(trace), ..self }
    }
}

/// What a batched step gives back.
pub struct Stepped {
    /// f32 logits of each sequence's last token, (batch, vocab); a failed
    /// sequence's row means nothing.
    pub logits: Tensor,
    /// Per sequence, why its own work failed (its cache is then in doubt: some
    /// layers hold the step's rows, its length does not count them).
    pub failed: Vec<Option<Error>>,
}

/// The plaintext K and V each layer wrote in one forward pass, as (kv, t, d): for
/// round-trip checks, calibration and the eval harness, never stored by serving.
#[derive(Default)]
pub struct Trace {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

struct Rope {
    /// (max_position_embeddings, head_dim / 2)
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The angles are computed in f64 and rounded once to `dtype`: in f32, pos x
    /// freq carries an error of about pos * 2^-24 radians (2e-3 at position 32k),
    /// and an f64 run of the model (the tests' reference) gets tables as exact as
    /// its arithmetic. The inverse frequencies are f32 values, as Hugging Face
    /// transformers and candle compute them.
    fn new(cfg: &Config, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let d = cfg.head_dim;
        let inv_freq: Vec<f64> =
            (0..d).step_by(2).map(|i| (1f32 / cfg.rope_theta.powf(i as f64 / d as f64) as f32) as f64).collect();
        let n = cfg.max_position_embeddings;
        let angles: Vec<f64> = (0..n).flat_map(|p| inv_freq.iter().map(move |f| p as f64 * f)).collect();
        let table = |f: fn(f64) -> f64| {
            Tensor::from_vec(angles.iter().map(|&a| f(a)).collect::<Vec<_>>(), (n, d / 2), device)?.to_dtype(dtype)
        };
        Ok(Self { cos: table(f64::cos)?, sin: table(f64::sin)? })
    }
}

/// A layer's weight projection and its bias (in the compute dtype).
struct Proj {
    weight: ProjWeight,
    bias: Option<Tensor>,
    inner: usize,
    outer: usize,
}

enum ProjWeight {
    /// Dense, stored as W^T (in, out). gemm wants a column-major destination, so
    /// for x W^T with W stored row-major (candle-nn's `Linear`) it repacks the
    /// whole of W on every call with more than one row; stored transposed, W is
    /// read in place. On the embedded model's projections a 32-row batch took
    /// 35-50% less time on three of four shapes and the same on the fourth (one
    /// row: the same).
    Dense { w_t: Tensor },
    /// GGML blocks, W as stored (out, in): the activations are quantized to 8
    /// bits and summed block by block, as llama.cpp does ([`quantized_product`]).
    Quantized(QMatMul),
}

/// `x W^T` for f32 x (rows, in) and GGML blocks W: kframe's K-quant kernels
/// where they take it (Q4_K and Q6_K on an AVX2 CPU, read in place, see
/// [`crate::kquants`]), else candle's quantized matmul.
fn quantized_product(q: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    if let QMatMul::QTensor(w) = q {
        if let Some(y) = kquants::product(x, w)? {
            return Ok(y);
        }
    }
    q.forward(x)
}

impl Proj {
    /// The projection `prefix.weight` (out, in) and, if `bias`, `prefix.bias`.
    fn load(
        inner: usize,
        outer: usize,
        bias: bool,
        prefix: &str,
        src: &dyn TensorSource,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let weight = match src.matrix(&format!("{prefix}.weight"), (outer, inner))? {
            Matrix::Dense(w) => ProjWeight::Dense { w_t: w.t()?.contiguous()? },
            Matrix::Quantized(q) => ProjWeight::Quantized(QMatMul::from_arc(q)?),
        };
        let bias = if bias { Some(src.vector(&format!("{prefix}.bias"), outer, dtype)?) } else { None };
        Ok(Self { weight, bias, inner, outer })
    }
}

impl Module for Proj {
    /// x: (..., in) -> (..., out).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (inner, outer) = (self.inner, self.outer);
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / inner;
        let x = x.reshape((rows, inner))?;
        let y = match &self.weight {
            ProjWeight::Dense { w_t } => match kernels::product(&x, w_t, Form::Cols)? {
                Some(y) => y,
                // Half-precision weights with f32 activations always take the
                // kernels; the widening here only keeps any other case correct.
                None => x.matmul(&w_t.to_dtype(x.dtype())?)?,
            },
            ProjWeight::Quantized(q) => quantized_product(q, &x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        *dims.last_mut().expect("a projection's input has a feature dimension") = outer;
        y.reshape(dims)
    }
}

/// RMSNorm: candle-nn's fused kernel for f32, f16 and bf16; for f64 (which that
/// kernel does not take) the same formula in tensor ops, so that the model runs
/// in f64 as a reference for its own rounding error.
struct Norm {
    fused: candle_nn::RmsNorm,
    weight: Tensor,
    eps: f64,
}

impl Norm {
    /// The norm `prefix.weight`, in `dtype`.
    fn new(size: usize, eps: f64, prefix: &str, src: &dyn TensorSource, dtype: DType) -> candle_core::Result<Self> {
        let weight = src.vector(&format!("{prefix}.weight"), size, dtype)?;
        Ok(Self { fused: candle_nn::RmsNorm::new(weight.clone(), eps), weight, eps })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() != DType::F64 {
            return self.fused.forward(x);
        }
        let mean_square = (x.sqr()?.sum_keepdim(candle_core::D::Minus1)? / x.dim(candle_core::D::Minus1)? as f64)?;
        x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight)
    }
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The plaintext K and V's dtype.
    kv: DType,
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    act: candle_nn::Activation,
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
}

/// One sequence's part of a step at any layer: where its new rows go, the causal
/// mask over them (prefill of more than one token), its frame.
struct SeqStep<'a> {
    pos: usize,
    mask: Option<&'a Tensor>,
    frame: &'a Frame,
    variant: Variant,
}

/// The token embedding: a dense table, or GGML blocks from which only the rows
/// asked for are dequantized.
enum Embed {
    Dense(Embedding),
    Quantized(Arc<QTensor>),
}

impl Embed {
    /// ids (tokens, 1) -> (tokens, 1, hidden).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embed::Dense(e) => e.forward(ids),
            Embed::Quantized(q) => q.embedding(ids),
        }
    }
}

/// The vocabulary projection, dense (vocab, hidden) or quantized.
enum Head {
    Dense(Tensor),
    Quantized(QMatMul),
}

pub struct Qwen2 {
    cfg: Config,
    embed_tokens: Embed,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Head,
    rope: Rope,
    /// What activations, norms, RoPE and attention compute in.
    dtype: DType,
    /// What dense weight matrices are held in (quantized ones keep their blocks).
    weights: DType,
    /// The plaintext K and V's dtype: what a native-precision cache stores.
    kv: DType,
    device: Device,
}

impl Qwen2 {
    /// Builds the model from Hugging Face tensor names (`model.layers.N...`), its
    /// weights in `vb`'s dtype.
    ///
    /// On the CPU, f16 and bf16 are storage formats only: the weight matrices are
    /// held in them (half the bytes a step reads), while activations, norms, RoPE,
    /// attention and the rotations compute in f32 ([`crate::kernels`] widens each
    /// weight as it loads it), and K and V are rounded once to the weights' dtype
    /// before they are rotated and cached, as llama.cpp keeps an f16 cache. On a
    /// GPU the whole pass runs in the dtype asked for.
    pub fn new(cfg: &Config, vb: VarBuilder<'static>) -> candle_core::Result<Self> {
        Self::from_source(cfg, &Safetensors { vb, quantize: None, layers: cfg.num_hidden_layers })
    }

    /// Builds the model from any [`TensorSource`]: dense safetensors, quantized as
    /// they load, or a GGUF file's tensors in their own formats. `src.dtype()` is
    /// the dtype asked for: dense matrices' and the K/V cache's (on a GPU, the
    /// compute dtype too).
    pub fn from_source(cfg: &Config, src: &dyn TensorSource) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let weights = src.dtype();
        let dtype = match weights {
            DType::F16 | DType::BF16 if src.device().is_cpu() => DType::F32,
            other => other,
        };
        let (embed_tokens, tied_head) = match src.matrix("model.embed_tokens.weight", (cfg.vocab_size, h))? {
            Matrix::Dense(w) => (Embed::Dense(Embedding::new(w.clone(), h)), Head::Dense(w)),
            Matrix::Quantized(q) => (Embed::Quantized(q.clone()), Head::Quantized(QMatMul::from_arc(q)?)),
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            let (heads, kv_heads, inter) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size);
            let proj = |inner, outer, bias, name: &str| Proj::load(inner, outer, bias, &p(name), src, dtype);
            let attn = Attention {
                q_proj: proj(h, heads * d, true, "self_attn.q_proj")?,
                k_proj: proj(h, kv_heads * d, true, "self_attn.k_proj")?,
                v_proj: proj(h, kv_heads * d, true, "self_attn.v_proj")?,
                o_proj: proj(heads * d, h, false, "self_attn.o_proj")?,
                heads,
                kv_heads,
                head_dim: d,
                kv: weights,
            };
            let mlp = Mlp {
                gate_proj: proj(h, inter, false, "mlp.gate_proj")?,
                up_proj: proj(h, inter, false, "mlp.up_proj")?,
                down_proj: proj(inter, h, false, "mlp.down_proj")?,
                act: cfg.hidden_act,
            };
            let eps = cfg.rms_norm_eps;
            layers.push(Layer {
                attn,
                mlp,
                input_layernorm: Norm::new(h, eps, &p("input_layernorm"), src, dtype)?,
                post_attention_layernorm: Norm::new(h, eps, &p("post_attention_layernorm"), src, dtype)?,
            });
        }
        let norm = Norm::new(h, cfg.rms_norm_eps, "model.norm", src, dtype)?;
        let lm_head = match cfg.tie_word_embeddings {
            true => tied_head,
            false => match src.matrix("lm_head.weight", (cfg.vocab_size, h))? {
                Matrix::Dense(w) => Head::Dense(w),
                Matrix::Quantized(q) => Head::Quantized(QMatMul::from_arc(q)?),
            },
        };
        let rope = Rope::new(cfg, dtype, src.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            weights,
            kv: weights,
            device: src.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The compute dtype: activations, attention, the rotations' matrices.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the weights were asked for in (f16 or bf16 on a CPU whose compute
    /// dtype is f32, else the compute dtype): a safetensors model's dense matrices
    /// are held in it; a GGUF file's matrices, and quantized ones, keep their own
    /// formats (`ModelDir::weights_format` names them).
    pub fn weights_dtype(&self) -> DType {
        self.weights
    }

    /// The dtype of the plaintext K and V, which a native-precision cache stores.
    pub fn kv_dtype(&self) -> DType {
        self.kv
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn rotation_shape(&self) -> RotationShape {
        RotationShape {
            layers: self.cfg.num_hidden_layers,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// An empty cache for one sequence of this model.
    pub fn new_cache(&self, precision: KvPrecision) -> KvCache {
        let shape = CacheShape {
            layers: self.cfg.num_hidden_layers,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            max_len: self.cfg.max_position_embeddings,
        };
        KvCache::new(shape, self.kv_dtype(), precision, &self.device)
    }

    /// Runs `tokens` after what `cache` holds, in `frame`; returns the f32 logits of
    /// the last position, shape (vocab). A batch of one: see [`Self::forward_chunks`].
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, frame: &Frame, variant: Variant) -> Result<Tensor> {
        self.forward_traced(tokens, cache, frame, variant, None)
    }

    /// [`Self::forward`], recording each layer's plaintext K and V into `trace`.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        frame: &Frame,
        variant: Variant,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let chunk = Chunk { tokens, cache, frame, trace };
        Ok(self.forward_batch(&mut [chunk], variant)?.get(0)?)
    }

    /// [`Self::forward_chunks`] for callers that treat any sequence's failure as the
    /// step's: f32 logits (batch, vocab), or the first failure.
    pub fn forward_batch(&self, seqs: &mut [Chunk<'_>], variant: Variant) -> Result<Tensor> {
        let step = self.forward_chunks(seqs, variant)?;
        match step.failed.into_iter().flatten().next() {
            Some(e) => Err(e),
            None => Ok(step.logits),
        }
    }

    /// The forward pass: one step for one or many sequences, each feeding its own
    /// tokens (a prompt, a prompt chunk or one decode token) after what its own
    /// cache holds, in its own frame. The weight matmuls run over all their tokens
    /// together; rotation, padding, verification and attention run per sequence
    /// over its own cache (which may have its own layout). This is the only path:
    /// a single sequence is a batch of one.
    /// Returns f32 logits of each sequence's last token, (batch, vocab), and the
    /// sequences whose own work failed. A sequence's logits do not depend on who
    /// else is in the batch, and neither does its failure: the others go on.
    pub fn forward_chunks(&self, seqs: &mut [Chunk<'_>], variant: Variant) -> Result<Stepped> {
        for s in seqs.iter() {
            self.check_input(s.tokens, s.cache.len())?;
        }
        if seqs.is_empty() {
            let logits = Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?;
            return Ok(Stepped { logits, failed: Vec::new() });
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let positions: Vec<u32> =
            seqs.iter().flat_map(|s| (s.cache.len()..s.cache.len() + s.tokens.len()).map(|p| p as u32)).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let step = BatchStep {
            cos: self.rope.cos.index_select(&positions, 0)?.unsqueeze(1)?,
            sin: self.rope.sin.index_select(&positions, 0)?.unsqueeze(1)?,
            masks: (seqs.iter())
                .map(|s| {
                    let t = s.tokens.len();
                    (t > 1).then(|| causal_mask(t, s.cache.len(), self.dtype, &self.device)).transpose()
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            variant,
        };
        let ids = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(1)?;
        let mut xs = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?; // (tokens, 1, hidden)
        let mut failed: Vec<Option<Error>> = seqs.iter().map(|_| None).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward_with(&xs, |h| layer.attn.forward_chunks(h, i, &step, seqs, &mut failed))?;
        }
        let mut last = Vec::with_capacity(seqs.len());
        let mut end = 0;
        for (s, failed) in seqs.iter_mut().zip(&failed) {
            end += s.tokens.len();
            last.push(end as u32 - 1);
            if failed.is_none() {
                let len = s.cache.len() + s.tokens.len();
                s.cache.set_len(len);
            }
        }
        let last = xs.squeeze(1)?.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        Ok(Stepped { logits: self.vocab_logits(&last.apply(&self.norm)?)?, failed })
    }

    /// f32 logits (b, vocab) of b final hidden states (b, hidden).
    ///
    /// On the CPU a batch is projected as W x^T, (vocab, b), then transposed on
    /// the host: gemm wants a column-major destination, so x W^T would repack the
    /// whole vocabulary matrix on every step, while W x^T reads it in place (b = 32
    /// on the embedded model: 3.4 ms against 2.2 - 2.9 ms, and 0.15 ms for the
    /// transpose). The transpose is a tiled loop here because candle's strided copy
    /// (`t().contiguous()`, kept as the fallback) took 1.7 ms for the same matrix.
    fn vocab_logits(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, _) = xs.dims2()?;
        let weight = match &self.lm_head {
            Head::Dense(w) => w,
            Head::Quantized(q) => return Ok(quantized_product(q, &xs.to_dtype(DType::F32)?)?),
        };
        if let Some(logits) = kernels::product(xs, weight, Form::Rows)? {
            return Ok(logits);
        }
        if b == 1 || !self.device.is_cpu() || weight.dtype() != DType::F32 {
            return Ok(xs.matmul(&weight.to_dtype(xs.dtype())?.t()?)?.to_dtype(DType::F32)?);
        }
        let lt = weight.matmul(&xs.t()?)?; // (vocab, b), contiguous
        let vocab = lt.dim(0)?;
        let (storage, layout) = lt.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
            drop(storage);
            return Ok(lt.t()?.contiguous()?);
        };
        let flat = &cpu.as_slice::<f32>()?[from..to];
        let mut out = vec![0f32; vocab * b];
        // In tiles of 64 vocabulary rows, so each tile's reads stay in L1.
        for v0 in (0..vocab).step_by(64) {
            let v1 = (v0 + 64).min(vocab);
            let tile = &flat[v0 * b..v1 * b];
            for (i, row) in out.chunks_exact_mut(vocab).enumerate() {
                for (o, col) in row[v0..v1].iter_mut().zip(tile.chunks_exact(b)) {
                    *o = col[i];
                }
            }
        }
        drop(storage);
        Ok(Tensor::from_vec(out, (b, vocab), &self.device)?)
    }

    /// Layer 0's K and V of each token on its own, (kv, tokens, d) each, in the
    /// plaintext K/V dtype: the embedding, the input norm and the K and V
    /// projections, nothing after. A row's norm at layer 0 depends on its token
    /// alone (RoPE rotates pairs of K's coordinates and keeps the norm; V has no
    /// RoPE), so calibration sweeps a whole vocabulary through this (seconds)
    /// rather than through the whole model (on Qwen2.5-3B, most of an hour).
    pub fn first_layer_kv(&self, tokens: &[u32]) -> Result<(Tensor, Tensor)> {
        // Each token stands alone here: only the ids are checked, not a context.
        self.check_ids(tokens)?;
        let layer = &self.layers[0];
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(1)?;
        let xs = self.embed_tokens.forward(&ids)?.to_dtype(self.dtype)?; // (t, 1, hidden)
        let h = layer.input_layernorm.forward(&xs)?;
        let (kv, d, t) = (layer.attn.kv_heads, layer.attn.head_dim, tokens.len());
        let heads = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((t, kv, d))?.transpose(0, 1)?.contiguous()?.to_dtype(self.kv)
        };
        Ok((heads(layer.attn.k_proj.forward(&h)?)?, heads(layer.attn.v_proj.forward(&h)?)?))
    }

    /// Every id in the vocabulary.
    fn check_ids(&self, tokens: &[u32]) -> Result<()> {
        let vocab_size = self.cfg.vocab_size;
        match tokens.iter().find(|&&id| id as usize >= vocab_size) {
            Some(&id) => Err(Error::UnknownToken { id, vocab_size }),
            None => Ok(()),
        }
    }

    /// Whether `tokens` may run after `cached` tokens of context: not empty, every
    /// id in the vocabulary, the whole within the context window. The forward pass
    /// checks this, and the engine's admission asks it of every prompt before any
    /// work is done for it.
    pub fn check_input(&self, tokens: &[u32], cached: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        self.check_ids(tokens)?;
        let needed = cached + tokens.len();
        if needed > self.cfg.max_position_embeddings {
            return Err(Error::ContextTooLong { needed, max: self.cfg.max_position_embeddings });
        }
        Ok(())
    }
}

/// (t, pos + t): 0 where query i (at position pos + i) may see key j, -inf after.
fn causal_mask(t: usize, pos: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let len = pos + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..len).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, len), device)?.to_dtype(dtype)
}

/// What every layer of a batched step shares.
struct BatchStep {
    /// Per-token RoPE tables, (tokens, 1, d / 2): each token is a row with its
    /// own position.
    cos: Tensor,
    sin: Tensor,
    /// Each sequence's causal mask over its new rows (None for one row).
    masks: Vec<Option<Tensor>>,
    variant: Variant,
}

impl Layer {
    /// The layer around an attention function: pre-norm, residuals, MLP.
    fn forward_with(&self, xs: &Tensor, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let residual = xs;
        let h = attend(&self.input_layernorm.forward(xs)?)?;
        let xs = (h + residual)?;
        let residual = &xs;
        let h = self.post_attention_layernorm.forward(&xs)?;
        let m = self.mlp.gate_proj.forward(&h)?.apply(&self.mlp.act)?;
        let m = (m * self.mlp.up_proj.forward(&h)?)?.apply(&self.mlp.down_proj)?;
        Ok((residual + m)?)
    }
}

impl Attention {
    /// The tokens of every sequence in `seqs`, one after another (xs: (tokens,
    /// 1, hidden)). The projections and RoPE run over all of them at once; each
    /// sequence then attends over its own cache in its own frame, the sequences
    /// spread over the compute threads (their work, verification included, is
    /// independent and most of a small model's step).
    ///
    /// The rotations run per sequence, not as one batched matmul: each sequence has
    /// its own matrices, so a batched product is b matrix-vector products anyway,
    /// and stacking b matrices for it costs a copy of them every step (on a 2-core
    /// CPU, stacking 32 128 x 128 matrices took 1.4 ms against 2.8 us for one
    /// product). Per sequence, a batch may also mix layouts of different widths.
    fn forward_chunks(
        &self,
        xs: &Tensor,
        index: usize,
        step: &BatchStep,
        seqs: &mut [Chunk<'_>],
        failed: &mut [Option<Error>],
    ) -> Result<Tensor> {
        let (n, _, _) = xs.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = h / kv;
        let heads = |x: Tensor, m: usize| -> candle_core::Result<Tensor> {
            x.reshape((n, 1, m, d))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?, h)?; // (tokens, h, 1, d)
        let k = heads(self.k_proj.forward(xs)?, kv)?;
        let v = heads(self.v_proj.forward(xs)?, kv)?;
        let q = candle_nn::rotary_emb::rope(&q, &step.cos, &step.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &step.cos, &step.sin)?;
        // The plaintext K and V in their own dtype (see `Qwen2::new`). A value
        // too small for it rounds to a signed zero; adding 0 makes every zero +0,
        // the zero an exact cache's recovery gives back, so that its round trip
        // stays bit-exact.
        let (k, v) = match self.kv == q.dtype() {
            true => (k, v),
            false => (k.to_dtype(self.kv)?.affine(1.0, 0.0)?, v.to_dtype(self.kv)?.affine(1.0, 0.0)?),
        };
        let starts: Vec<usize> = (seqs.iter())
            .scan(0, |at, s| {
                *at += s.tokens.len();
                Some(*at - s.tokens.len())
            })
            .collect();
        let outs = (seqs.par_iter_mut().zip(&step.masks).zip(&starts).zip(failed))
            .map(|(((s, mask), &start), failed)| {
                let t = s.tokens.len();
                let mut attend = || -> Result<Tensor> {
                    // A sequence's rows, heads first: (heads, t, d).
                    let rows = |x: &Tensor| x.narrow(0, start, t)?.squeeze(2)?.transpose(0, 1)?.contiguous();
                    // Query heads grouped by their kv head: (kv, g * t, d). Head i uses kv
                    // head i / g, as candle's repeat_kv lays them out.
                    let q = rows(&q)?.reshape((kv, g * t, d))?;
                    let (k, v) = (rows(&k)?, rows(&v)?);
                    if let Some(trace) = s.trace.as_deref_mut() {
                        trace.k.push(k.clone());
                        trace.v.push(v.clone());
                    }
                    let seq =
                        SeqStep { pos: s.cache.len(), mask: mask.as_ref(), frame: s.frame, variant: step.variant };
                    let out = self.attend_seq(index, &q, &k, &v, &seq, s.cache)?; // (kv, g * t, d)
                    Ok(out.reshape((h, t, d))?.transpose(0, 1)?.reshape((t, h * d))?)
                };
                if failed.is_none() {
                    match attend() {
                        Ok(out) => return Ok(out),
                        Err(e) => *failed = Some(e),
                    }
                }
                // A sequence whose own work failed (say, every block of its cache
                // failed verification) rides along on zeros; the caller fails it.
                Ok(Tensor::zeros((t, h * d), q.dtype(), q.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::cat(&outs, 0)?; // (tokens, h * d)
        Ok(self.o_proj.forward(&out.reshape((n, 1, h * d))?)?)
    }

    /// One sequence's attention at one layer after projection and RoPE: writes its
    /// K and V rows (kv, t, d) into its cache at `seq.pos`, rotated into its frame,
    /// verifies what it reads, and attends with its queries (kv, g * t, d).
    /// Returns the output (kv, g * t, d) in the model's frame.
    fn attend_seq(
        &self,
        index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seq: &SeqStep,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (kv, gt, _) = q.dims3()?;
        let t = k.dim(1)?;
        // The corrective layer: blocks that fail verification here are hidden. It
        // checks the rows already there before this step's write seals their block
        // again (a position inside a shared prefix is refused by the write).
        // The mask comes in the cache's plaintext dtype; scores are in the query's.
        let failed = match cache.verify(index, seq.frame, seq.pos.saturating_sub(cache.offset()), t)? {
            Some(mask) => Some(mask.to_dtype(q.dtype())?),
            None => None,
        };
        // The cache only ever receives rotated K and V (an exact cache's are
        // computed in f64).
        let rot = seq.frame.layer(index);
        let (k_store, v_store) = match rot {
            None => (k.clone(), v.clone()),
            Some(r) => {
                let (k, v, overflow) = r.rotate_kv(k, v, cache.store_dtype(), seq.pos)?;
                cache.note_overflow(overflow);
                (k, v)
            }
        };
        cache.write(index, seq.pos, &k_store, &v_store)?;
        let len = seq.pos + t;
        // (kv, own, w), in the storage dtype.
        let (keys, values) = cache.stored_rows(index, len - cache.offset())?;
        // A decode token with nothing masked reads the cache in place (probe-time
        // rotates the query and the output, never the cache).
        if t == 1 && failed.is_none() && (rot.is_none() || seq.variant == Variant::ProbeTime) {
            let q_own = match rot {
                Some(r) => r.rotate_q(q)?,
                None => q.clone(),
            };
            let prefix = match cache.shared_prefix() {
                Some(p) => Some(p.cache.stored_rows(index, p.cache.len())?),
                None => None,
            };
            if let Some((head, own)) =
                fused::single_query(q, &q_own, prefix.as_ref().map(|(k, v)| (k, v)), &keys, &values)?
            {
                let own = match rot {
                    Some(r) => r.unrotate_out(&own)?,
                    None => own,
                };
                return Ok(match head {
                    None => own,
                    Some(head) => (head + own)?,
                });
            }
        }
        let (keys, values) = (keys.to_dtype(q.dtype())?, values.to_dtype(q.dtype())?);
        let shared = match cache.shared_rows(index)? {
            Some((k, v)) => Some((k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)),
            None => None,
        };
        let (q_own, keys, values) = match (rot, seq.variant) {
            (None, _) => (q.clone(), keys, values),
            (Some(r), Variant::ProbeTime) => (r.rotate_q(q)?, keys, values),
            (Some(r), Variant::DecodeTime) => {
                let (k, v) = r.unrotate_kv(&keys.contiguous()?, &values.contiguous()?)?;
                (q.clone(), k, v)
            }
        };
        let mask = |scores: Tensor| {
            let scores = match seq.mask {
                None => scores,
                Some(mask) => scores.reshape((kv, gt / t, t, len))?.broadcast_add(mask)?.reshape((kv, gt, len))?,
            };
            match &failed {
                None => Ok(scores),
                Some(failed) => scores.broadcast_add(failed),
            }
        };
        let (head, own) = attend(q, &q_own, shared.as_ref(), &keys, &values, mask)?;
        let own = match (rot, seq.variant) {
            (Some(r), Variant::ProbeTime) => r.unrotate_out(&own)?,
            _ => own,
        };
        Ok(match head {
            None => own,
            Some(head) => (head + own)?,
        })
    }
}

/// Scaled dot-product attention over a shared plaintext prefix (if any), seen
/// with the plain query `q`, followed by the sequence's own rows, seen with
/// `q_own` (the query in the rows' frame: rotated, probe-time). One softmax spans
/// both. Returns the prefix's share of the output (model frame) and the own rows'
/// share (in their frame: the caller un-rotates it).
fn attend(
    q: &Tensor,
    q_own: &Tensor,
    shared: Option<&(Tensor, Tensor)>,
    keys: &Tensor,
    values: &Tensor,
    mask: impl FnOnce(Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let scale = 1f64 / (q.dim(candle_core::D::Minus1)? as f64).sqrt();
    let own = (q_own.matmul(&keys.t()?)? * scale)?;
    let scores = match shared {
        None => own,
        Some((k_p, _)) => Tensor::cat(&[(q.matmul(&k_p.t()?)? * scale)?, own], 2)?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&mask(scores)?)?;
    match shared {
        None => Ok((None, probs.matmul(values)?)),
        Some((k_p, v_p)) => {
            let p = k_p.dim(1)?;
            let n = probs.dim(2)?;
            let head = probs.narrow(2, 0, p)?.contiguous()?.matmul(v_p)?;
            let own = probs.narrow(2, p, n - p)?.contiguous()?.matmul(values)?;
            Ok((Some(head), own))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rounding::{Reductions, F32_UNIT};

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar().unwrap()
    }

    /// `fused::single_query` against [`attend`], the candle chain it replaces, on f32, f16 and bf16
    /// caches: with and without a shared prefix, one row and many, plain width and
    /// a padded one (w = d + 32), the own rows a view into a larger buffer as the
    /// cache holds them. The bound: the scores' rounding (w terms, at the size of
    /// the largest score's partial sums) carried onto the values, then the
    /// softmax's sum and the weighted sums (p + len terms each) at the values' size.
    #[test]
    fn single_query_attention_matches_the_candle_chain_on_ragged_and_padded_caches() {
        let dev = Device::Cpu;
        let (kv, g, d) = (2, 3, 64);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for &(p, len, w) in &[(0, 1, 64), (0, 37, 96), (5, 20, 96), (17, 3, 64), (9, 1, 96)] {
                let q = Tensor::randn(0f32, 0.4, (kv, g, d), &dev).unwrap();
                let q_own = Tensor::randn(0f32, 0.4, (kv, g, w), &dev).unwrap();
                let buffer =
                    |width: usize| Tensor::randn(0f32, 1.0, (kv, 64, width), &dev).unwrap().to_dtype(dtype).unwrap();
                let (kb, vb) = (buffer(w), buffer(w));
                let (keys, values) = (kb.narrow(1, 0, len).unwrap(), vb.narrow(1, 0, len).unwrap());
                let shared = (p > 0).then(|| (buffer(d).narrow(1, 0, p).unwrap(), buffer(d).narrow(1, 0, p).unwrap()));
                let (head, own) = fused::single_query(&q, &q_own, shared.as_ref().map(|(k, v)| (k, v)), &keys, &values)
                    .unwrap()
                    .unwrap();
                let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().contiguous().unwrap();
                let shared32 = shared.as_ref().map(|(k, v)| (f32s(k), f32s(v)));
                let (want_head, want_own) =
                    attend(&q, &q_own, shared32.as_ref(), &f32s(&keys), &f32s(&values), Ok).unwrap();
                let scores = (q_own.matmul(&f32s(&keys).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let partial = (q_own.abs().unwrap().matmul(&f32s(&keys).abs().unwrap().t().unwrap()).unwrap()
                    / (d as f64).sqrt())
                .unwrap();
                let vmax = max_abs(&f32s(&values)).max(shared32.as_ref().map_or(0.0, |(_, v)| max_abs(v)));
                let bound = Reductions::of(w).bound_between(F32_UNIT, max_abs(&partial).max(max_abs(&scores)) * vmax)
                    + Reductions::of(p + len).times(2).bound_between(F32_UNIT, vmax);
                let err = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
                let e_own = err(&own, &want_own);
                assert!(e_own <= bound, "{dtype:?} p {p} len {len} w {w}: own rows off by {e_own:e}, bound {bound:e}");
                match (head, want_head) {
                    (None, None) => assert_eq!(p, 0),
                    (Some(h), Some(wh)) => {
                        let e = err(&h, &wh);
                        assert!(e <= bound, "{dtype:?} p {p} len {len}: prefix share off by {e:e}, bound {bound:e}");
                    }
                    _ => panic!("{dtype:?} p {p}: one side has a prefix share and the other not"),
                }
            }
        }
    }
}
