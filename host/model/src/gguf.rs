//! GGUF, the single-file model format llama.cpp writes and reads: reading a Qwen2
//! GGUF to serve it, and writing a model directory as one.
//!
//! A file holds metadata (`general.architecture`, `qwen2.*` shapes,
//! `tokenizer.ggml.*`) and tensors under llama.cpp's names (`blk.N.attn_q.weight`),
//! each F32, F16, BF16 or a block-quantized type (Q8_0, Q4_K, Q6_K, ...). The file is
//! memory-mapped; each tensor is copied out of the map once, as it loads, so peak
//! memory is the model's size, not twice it. Quantized matrices stay quantized and
//! multiply through candle's quantized kernels; K and V are still computed,
//! rotated, padded and verified in f32, whatever the weights are.
//!
//! kframe keeps its own additions in `kframe.*` keys (the norm-pad calibration,
//! written by [`crate::export`]), which llama.cpp ignores.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{self, Matrix, TensorSource};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// The metadata key under which [`crate::export`] stores the norm-pad calibration (the
/// JSON of a model directory's `kframe-pad.json`).
pub const CALIBRATION_KEY: &str = "kframe.pad_calibration";

/// The metadata key for end-of-sequence ids past the one GGUF has a key for
/// (the embedded model stops at `<|im_end|>` and at `<|endoftext|>`).
pub const EOS_KEY: &str = "kframe.eos_token_ids";

/// The llama.cpp name of a Hugging Face tensor name, for every tensor llama.cpp's
/// Qwen2 graph reads; `None` for a name it has no place for.
pub fn llama_cpp_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let name = match tensor {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}"))
}

/// Every Hugging Face tensor of a Qwen2 model with `layers` layers, paired with its
/// llama.cpp name. A tied output head is left out: llama.cpp, like kframe, then
/// reuses `token_embd.weight`.
pub fn tensor_names(layers: usize, tied: bool) -> Vec<(String, String)> {
    const PER_LAYER: [&str; 12] = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    let mut hf = vec!["model.embed_tokens.weight".to_owned(), "model.norm.weight".to_owned()];
    if !tied {
        hf.push("lm_head.weight".into());
    }
    hf.extend((0..layers).flat_map(|l| PER_LAYER.iter().map(move |t| format!("model.layers.{l}.{t}"))));
    hf.into_iter()
        .map(|name| {
            let gguf = llama_cpp_name(&name).expect("every listed name has a llama.cpp name");
            (name, gguf)
        })
        .collect()
}

/// An open GGUF file: its parsed header and its bytes, mapped.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.content.tensor_infos.len()).finish()
    }
}

/// Whether `path` starts with GGUF's magic bytes.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

impl GgufFile {
    /// Opens `path` and checks what serving needs before any tensor is read: the
    /// header parses, the architecture is Qwen2, every tensor lies inside the file,
    /// and the shapes the config implies are there.
    pub fn open(path: &Path) -> Result<Self> {
        let malformed = |reason: String| Error::Malformed { path: path.to_owned(), reason };
        let mut file = std::fs::File::open(path).map_err(|e| malformed(e.to_string()))?;
        let content = Content::read(&mut std::io::BufReader::new(&mut file)).map_err(|e| {
            malformed(format!("not a readable GGUF header (truncated, or an unknown tensor type): {e}"))
        })?;
        // SAFETY: mapped read-only; kframe never writes the file while serving, and
        // a file truncated underneath a mapping is outside what any mmap-based
        // loader can defend against (the size check below covers files that were
        // truncated before they were opened).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| malformed(e.to_string()))?;
        let gguf = Self { path: path.to_owned(), content, map };
        let arch = gguf.string("general.architecture").unwrap_or_else(|| "unstated".into());
        if arch != "qwen2" {
            return Err(Error::WrongArchitecture { path: path.to_owned(), found: arch });
        }
        for (name, info) in &gguf.content.tensor_infos {
            gguf.bytes(name, info)?;
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn malformed(&self, reason: String) -> Error {
        Error::Malformed { path: self.path.clone(), reason }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.value(key)?.to_string().ok().cloned()
    }

    fn number(&self, key: &str) -> Result<usize> {
        let v = self.value(key).ok_or_else(|| self.malformed(format!("no metadata key {key}")))?;
        let n = v.to_u32().map(u64::from).or_else(|_| v.to_u64()).map_err(|e| self.malformed(format!("{key}: {e}")))?;
        Ok(n as usize)
    }

    /// An f32 value read back as the shortest decimal that rounds to it
    /// (`1e-6`, not `9.99999997e-7`): what the config it was written from said.
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => {
                let x = v.to_f32().map_err(|e| self.malformed(format!("{key}: {e}")))?;
                Ok(Some(x.to_string().parse().expect("an f32's decimal parses as f64")))
            }
        }
    }

    /// Every id that ends generation: `tokenizer.ggml.eos_token_id`, the end of
    /// turn and end of message ids llama.cpp also stops at, and any further ones
    /// the writer kept in `kframe.eos_token_ids`.
    fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
                .into_iter()
                .filter_map(|k| self.value(k)?.to_u32().ok())
                .collect();
        let more = self.value(EOS_KEY).and_then(|v| v.to_vec().ok()).into_iter().flatten();
        ids.extend(more.filter_map(|v| v.to_u32().ok()));
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }

    /// A tensor's bytes inside the map, or an error that names the tensor when
    /// the file ends before it does.
    fn bytes(&self, name: &str, info: &TensorInfo) -> Result<&[u8]> {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(
                self.malformed(format!("tensor {name}: {elems} values is no whole number of blocks of {block}"))
            );
        }
        let size = elems / block * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        let end = start.checked_add(size as u64).filter(|&end| end <= self.map.len() as u64);
        match end {
            Some(end) => Ok(&self.map[start as usize..end as usize]),
            None => Err(self.malformed(format!(
                "truncated: tensor {name} needs bytes {start}..{} and the file has {}",
                start as u128 + size as u128,
                self.map.len()
            ))),
        }
    }

    /// Lets the kernel drop the mapped pages of a tensor once it has been copied
    /// out, so that a loaded model holds its size in memory once, not twice
    /// (mapped pages count in the resident set until they are dropped).
    fn release(&self, bytes: &[u8]) {
        let offset = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
        // SAFETY: the map is a read-only, private mapping of a file: a dropped
        // page reads back from the file, unchanged, if it is touched again.
        let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len()) };
    }

    fn info(&self, gguf_name: &str) -> Result<&TensorInfo> {
        self.content.tensor_infos.get(gguf_name).ok_or_else(|| self.malformed(format!("no tensor {gguf_name}")))
    }

    /// The model's shape from the `qwen2.*` metadata, read through the same
    /// parser (and checks) as a config.json. The vocabulary size is the
    /// embedding's row count; the head is tied unless the file has `output.weight`.
    pub fn config(&self) -> Result<Config> {
        let k = |key: &str| format!("qwen2.{key}");
        let optional = |key: &str| self.value(key).map(|_| self.number(key)).transpose();
        let embedding = self.info("token_embd.weight")?;
        let (vocab_size, _) = embedding.shape.dims2().map_err(|e| self.malformed(format!("token_embd.weight: {e}")))?;
        let json = serde_json::json!({
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": self.number(&k("embedding_length"))?,
            "intermediate_size": self.number(&k("feed_forward_length"))?,
            "num_hidden_layers": self.number(&k("block_count"))?,
            "num_attention_heads": self.number(&k("attention.head_count"))?,
            "num_key_value_heads": optional(&k("attention.head_count_kv"))?,
            "head_dim": optional(&k("attention.key_length"))?,
            "max_position_embeddings": self.number(&k("context_length"))?,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "rope_theta": self.float(&k("rope.freq_base"))?,
            "rms_norm_eps": self.float(&k("attention.layer_norm_rms_epsilon"))?,
            "eos_token_id": self.eos_token_ids(),
        });
        Config::from_json(&json.to_string(), &self.path)
    }

    /// The tokenizer from `tokenizer.ggml.*`: a gpt2 byte-level BPE with its tokens,
    /// merges and special tokens, and the pre-tokenizer `tokenizer.ggml.pre` names.
    ///
    /// `qwen2` is Qwen2.5's own split (one digit a piece, NFC); `gpt-2` (and
    /// `default`) is GPT-2's split with no prefix space, as llama.cpp applies it.
    /// Any other pre-tokenizer is refused: tokens that silently differ from the
    /// ones the model was trained on would be a wrong answer, not an error.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let pre = self.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let model = self.string("tokenizer.ggml.model").unwrap_or_else(|| "unstated".into());
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "{}: tokenizer.ggml.model is {model:?}; kframe reads gpt2 byte-level BPE tokenizers (Qwen2's)",
                self.path.display()
            )));
        }
        let mut tokenizer =
            Tokenizer::from_gguf(&self.content).map_err(|e| self.malformed(format!("tokenizer.ggml.*: {e}")))?;
        match pre.as_str() {
            "qwen2" => {}
            // candle's default pipeline adds a prefix space, which llama.cpp's
            // gpt-2 split does not.
            "gpt-2" | "default" => {
                tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(
                    false, true, true,
                )));
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tokenizer.ggml.pre {other:?}; kframe reads the qwen2 and gpt-2 pre-tokenizers",
                    self.path.display()
                )))
            }
        }
        Ok(tokenizer)
    }

    /// `tokenizer.chat_template`, when the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.string("tokenizer.chat_template")
    }

    /// The stored norm-pad calibration (JSON), when the file was written with one.
    pub fn calibration_json(&self) -> Option<String> {
        self.string(CALIBRATION_KEY)
    }

    /// The file's tensors, read by Hugging Face name, with the model's own
    /// compute dtype for norms and biases.
    pub fn source(&self, dtype: DType, device: &Device) -> Source<'_> {
        Source { file: self, dtype, device: device.clone() }
    }

    /// The format of each distinct matrix type in the file, most common first
    /// (`q4_k`, `q6_k`, ...), for reports.
    pub fn matrix_formats(&self) -> Vec<String> {
        let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
        for info in self.content.tensor_infos.values().filter(|i| i.shape.rank() == 2) {
            *counts.entry(weights::ggml_name(info.ggml_dtype)).or_default() += 1;
        }
        let mut formats: Vec<_> = counts.into_iter().collect();
        formats.sort_by_key(|&(name, n)| (std::cmp::Reverse(n), name));
        formats.into_iter().map(|(name, _)| name.to_owned()).collect()
    }
}

/// A GGUF file's tensors as a [`TensorSource`]: F32, F16 and BF16 matrices come
/// back dense in their own dtype, block-quantized ones as quantized matrices.
pub struct Source<'a> {
    file: &'a GgufFile,
    dtype: DType,
    device: Device,
}

impl Source<'_> {
    fn tensor(&self, hf: &str) -> candle_core::Result<(&TensorInfo, &[u8])> {
        let gguf = llama_cpp_name(hf).ok_or_else(|| candle_core::Error::Msg(format!("no GGUF name for {hf}")))?;
        let info = self.file.info(&gguf).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let bytes = self.file.bytes(&gguf, info).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((info, bytes))
    }
}

fn dense_dtype(ggml: GgmlDType) -> Option<DType> {
    match ggml {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl TensorSource for Source<'_> {
    fn matrix(&self, name: &str, shape: (usize, usize)) -> candle_core::Result<Matrix> {
        let (info, bytes) = self.tensor(name)?;
        if info.shape.dims() != [shape.0, shape.1] {
            candle_core::bail!("{name}: the file holds {:?}, the config implies {shape:?}", info.shape.dims())
        }
        let matrix = match dense_dtype(info.ggml_dtype) {
            Some(dtype) => Matrix::Dense(Tensor::from_raw_buffer(bytes, dtype, info.shape.dims(), &self.device)?),
            None => Matrix::Quantized(Arc::new(gguf_file_tensor(info, bytes, &self.device)?)),
        };
        self.file.release(bytes);
        Ok(matrix)
    }

    fn vector(&self, name: &str, len: usize, dtype: DType) -> candle_core::Result<Tensor> {
        let (info, bytes) = self.tensor(name)?;
        if info.shape.dims() != [len] {
            candle_core::bail!("{name}: the file holds {:?}, the config implies ({len})", info.shape.dims())
        }
        let vector = gguf_file_tensor(info, bytes, &self.device)?.dequantize(&self.device)?.to_dtype(dtype);
        self.file.release(bytes);
        vector
    }

    fn contains(&self, name: &str) -> bool {
        llama_cpp_name(name).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

fn gguf_file_tensor(info: &TensorInfo, bytes: &[u8], device: &Device) -> candle_core::Result<QTensor> {
    candle_core::quantized::ggml_file::qtensor_from_ggml(info.ggml_dtype, bytes, info.shape.dims().to_vec(), device)
}
