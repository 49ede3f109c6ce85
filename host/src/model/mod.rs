//! kframe's Qwen2 forward pass, with each sequence's K and V rotated into its
//! frame between RoPE and the cache write.
//!
//! The structure follows candle-transformers' `qwen2.rs` (and reuses candle-nn's
//! layers) so that with the identity frame the logits match it; attention differs
//! in three ways: the cache is written rotated, GQA groups query heads per kv head
//! instead of copying K and V (`repeat_kv`), and the cache is preallocated instead of
//! concatenated every step.

pub mod config;
pub mod load;
pub mod synth;

pub use config::Config;

use crate::cache::{CacheShape, KvCache, KvPrecision};
use crate::error::{Error, Result};
use crate::rotation::{Frame, RotationShape};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use rayon::prelude::*;

/// Where attention applies a tenant's rotation (DESIGN.md section 3). Both give
/// the same tokens; they differ in cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum Variant {
    /// Rotate the queries and un-rotate the output: O(heads * d^2) a step.
    #[default]
    ProbeTime,
    /// Un-rotate the whole cache for a standard kernel: O(context * d^2) a step.
    DecodeTime,
}

/// One sequence's part in a batched decode step: its next token, its own cache and
/// its own frame.
pub struct BatchSeq<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub frame: &'a Frame,
}

/// The plaintext K and V each layer wrote in one forward pass, as (kv, t, d):
/// for round-trip checks and the eval harness, never stored by serving.
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
    fn new(cfg: &Config, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let d = cfg.head_dim;
        let inv_freq: Vec<f32> =
            (0..d).step_by(2).map(|i| 1f32 / cfg.rope_theta.powf(i as f64 / d as f64) as f32).collect();
        let n = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), device)?;
        let t = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// x: (1, heads, t, d) -> same, rotated for positions pos..pos+t.
    fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: candle_nn::Activation,
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// Everything one layer's attention needs besides its input (one sequence).
struct Step<'a> {
    rope: &'a Rope,
    seq: SeqStep<'a>,
}

/// One sequence's part of a step at any layer: where its new rows go, the causal
/// mask over them (prefill of more than one token), its frame.
struct SeqStep<'a> {
    pos: usize,
    mask: Option<&'a Tensor>,
    frame: &'a Frame,
    variant: Variant,
}

pub struct Qwen2 {
    cfg: Config,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Qwen2 {
    /// Builds the model from Hugging Face tensor names (`model.layers.N...`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let vm = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, h, vm.pp("embed_tokens"))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let vl = vm.pp("layers").pp(i);
            let va = vl.pp("self_attn");
            let vp = vl.pp("mlp");
            let attn = Attention {
                q_proj: candle_nn::linear(h, cfg.num_attention_heads * d, va.pp("q_proj"))?,
                k_proj: candle_nn::linear(h, cfg.num_key_value_heads * d, va.pp("k_proj"))?,
                v_proj: candle_nn::linear(h, cfg.num_key_value_heads * d, va.pp("v_proj"))?,
                o_proj: candle_nn::linear_no_bias(cfg.num_attention_heads * d, h, va.pp("o_proj"))?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, vp.pp("gate_proj"))?,
                up_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, vp.pp("up_proj"))?,
                down_proj: candle_nn::linear_no_bias(cfg.intermediate_size, h, vp.pp("down_proj"))?,
                act: cfg.hidden_act,
            };
            layers.push(Layer {
                attn,
                mlp,
                input_layernorm: candle_nn::rms_norm(h, cfg.rms_norm_eps, vl.pp("input_layernorm"))?,
                post_attention_layernorm: candle_nn::rms_norm(h, cfg.rms_norm_eps, vl.pp("post_attention_layernorm"))?,
            });
        }
        let norm = candle_nn::rms_norm(h, cfg.rms_norm_eps, vm.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(h, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let rope = Rope::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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
        KvCache::new(shape, self.dtype, precision, &self.device)
    }

    /// Runs `tokens` after what `cache` holds, in `frame`; returns the f32 logits of
    /// the last position, shape (vocab).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, frame: &Frame, variant: Variant) -> Result<Tensor> {
        self.forward_traced(tokens, cache, frame, variant, None)
    }

    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        frame: &Frame,
        variant: Variant,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        self.check_input(tokens, cache.len())?;
        let pos = cache.len();
        let t = tokens.len();
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?; // (1, t)
        let mask = if t > 1 { Some(causal_mask(t, pos, self.dtype, &self.device)?) } else { None };
        let step = Step { rope: &self.rope, seq: SeqStep { pos, mask: mask.as_ref(), frame, variant } };
        let mut xs = self.embed_tokens.forward(&ids)?; // (1, t, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, i, &step, cache, trace.as_deref_mut())?;
        }
        cache.set_len(pos + t);
        let last = xs.narrow(1, t - 1, 1)?.apply(&self.norm)?; // (1, 1, hidden)
        Ok(last.apply(&self.lm_head)?.flatten_all()?.to_dtype(DType::F32)?)
    }

    /// One decode step for many sequences at once, each after what its own cache
    /// holds and in its own frame: the weight matmuls run batched, rotation and
    /// attention per sequence over its own cache (which may have its own layout).
    /// Returns f32 logits, (batch, vocab). A sequence's logits do not depend on who
    /// else is in the batch.
    pub fn decode_batch(&self, seqs: &mut [BatchSeq<'_>], variant: Variant) -> Result<Tensor> {
        for s in seqs.iter() {
            self.check_input(&[s.token], s.cache.len())?;
        }
        let b = seqs.len();
        if b == 0 {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        let tokens: Vec<u32> = seqs.iter().map(|s| s.token).collect();
        let positions: Vec<u32> = seqs.iter().map(|s| s.cache.len() as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let rope = BatchRope {
            cos: self.rope.cos.index_select(&positions, 0)?.unsqueeze(1)?, // (b, 1, d/2)
            sin: self.rope.sin.index_select(&positions, 0)?.unsqueeze(1)?,
        };
        let mut xs = self.embed_tokens.forward(&Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(1)?)?; // (b, 1, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward_with(&xs, |h| layer.attn.forward_batch(h, i, &rope, seqs, variant))?;
        }
        for s in seqs.iter_mut() {
            let len = s.cache.len() + 1;
            s.cache.set_len(len);
        }
        Ok(xs.apply(&self.norm)?.apply(&self.lm_head)?.squeeze(1)?.to_dtype(DType::F32)?)
    }

    fn check_input(&self, tokens: &[u32], cached: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let vocab_size = self.cfg.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::UnknownToken { id, vocab_size });
        }
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

/// Per-sequence RoPE tables for a batched decode step, (batch, 1, d / 2).
struct BatchRope {
    cos: Tensor,
    sin: Tensor,
}

impl Layer {
    fn forward(
        &self,
        xs: &Tensor,
        index: usize,
        step: &Step,
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        self.forward_with(xs, |h| self.attn.forward(h, index, step, cache, trace))
    }

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
    fn forward(
        &self,
        xs: &Tensor,
        index: usize,
        step: &Step,
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?; // b == 1: one sequence
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q_proj.forward(xs)?.reshape((b, t, h, d))?.transpose(1, 2)?; // (1, h, t, d)
        let k = self.k_proj.forward(xs)?.reshape((b, t, kv, d))?.transpose(1, 2)?; // (1, kv, t, d)
        let v = self.v_proj.forward(xs)?.reshape((b, t, kv, d))?.transpose(1, 2)?;
        let q = step.rope.apply(&q, step.seq.pos)?.squeeze(0)?; // (h, t, d)
        let k = step.rope.apply(&k, step.seq.pos)?.squeeze(0)?; // (kv, t, d)
        let v = v.squeeze(0)?.contiguous()?; // (kv, t, d)
        if let Some(trace) = trace {
            trace.k.push(k.clone());
            trace.v.push(v.clone());
        }
        // Query heads grouped by their kv head: (kv, g * t, d). Head i uses kv head
        // i / g, as repeat_kv lays them out.
        let q = q.reshape((kv, (h / kv) * t, d))?;
        let out = self.attend_seq(index, &q, &k, &v, &step.seq, cache)?; // (kv, g * t, d)
        let out = out.reshape((h, t, d))?.transpose(0, 1)?.reshape((b, t, h * d))?;
        Ok(self.o_proj.forward(&out)?)
    }

    /// One decode token for each of `seqs` (xs: (b, 1, hidden)). The projections
    /// and RoPE run batched; each sequence then attends over its own cache in its
    /// own frame, the sequences spread over the compute threads (their work,
    /// verification included, is independent and most of a small model's step).
    ///
    /// The rotations run per sequence, not as one batched matmul: each sequence has
    /// its own matrices, so a batched product is b matrix-vector products anyway,
    /// and stacking b matrices for it costs a copy of them every step (on a 2-core
    /// CPU, stacking 32 128 x 128 matrices took 1.4 ms against 2.8 us for one
    /// product). Per sequence, a batch may also mix layouts of different widths.
    fn forward_batch(
        &self,
        xs: &Tensor,
        index: usize,
        rope: &BatchRope,
        seqs: &mut [BatchSeq<'_>],
        variant: Variant,
    ) -> Result<Tensor> {
        let (b, _, _) = xs.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let g = h / kv;
        let heads = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            x.reshape((b, 1, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?, h)?; // (b, h, 1, d)
        let k = heads(self.k_proj.forward(xs)?, kv)?; // (b, kv, 1, d)
        let v = heads(self.v_proj.forward(xs)?, kv)?.reshape((b * kv, 1, d))?;
        let q = candle_nn::rotary_emb::rope(&q, &rope.cos, &rope.sin)?.reshape((b * kv, g, d))?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.cos, &rope.sin)?.reshape((b * kv, 1, d))?;
        let outs = (seqs.par_iter_mut().enumerate())
            .map(|(j, s)| {
                let rows = |x: &Tensor| x.narrow(0, j * kv, kv);
                let seq = SeqStep { pos: s.cache.len(), mask: None, frame: s.frame, variant };
                self.attend_seq(index, &rows(&q)?, &rows(&k)?, &rows(&v)?, &seq, s.cache)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::cat(&outs, 0)?; // (b * kv, g, d)
        Ok(self.o_proj.forward(&out.reshape((b, 1, h * d))?)?)
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
        let failed = cache.verify(index, seq.frame, seq.pos.saturating_sub(cache.offset()), t)?;
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
        let (keys, values) = cache.rotated(index, len - cache.offset())?; // (kv, own, w), storage dtype
        let (keys, values) = (keys.to_dtype(q.dtype())?, values.to_dtype(q.dtype())?);
        let shared = cache.shared_rows(index)?;
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
