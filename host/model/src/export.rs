//! A model directory written as one GGUF file that llama.cpp loads: llama.cpp's
//! tensor names and metadata keys ([`crate::gguf`]), the matrices in f32, f16,
//! Q8_0 or the Q4_K_M mix, norms and biases in f32 (as llama.cpp's own converter
//! keeps them), and the tokenizer as a gpt2-style BPE.

use crate::error::{Error, Result};
use crate::gguf::{tensor_names, CALIBRATION_KEY, EOS_KEY};
use crate::load::ModelDir;
use crate::weights::{Quantization, Role};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The weight types a written file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    F32,
    F16,
    /// Every matrix in Q8_0.
    Q8_0,
    /// llama.cpp's Q4_K_M mix ([`Quantization::Q4K`]).
    Q4KM,
}

impl FileType {
    /// `general.file_type`: llama.cpp's LLAMA_FTYPE_ALL_F32, _MOSTLY_F16,
    /// _MOSTLY_Q8_0 and _MOSTLY_Q4_K_M.
    fn number(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q8_0 => 7,
            FileType::Q4KM => 15,
        }
    }

    /// The GGML type of a 2-D weight of `role` with rows `inner` long.
    fn ggml_type(self, role: Role, inner: usize, layers: usize) -> GgmlDType {
        let quantized = |q: Quantization| q.ggml_type(role, inner, layers).unwrap_or(GgmlDType::F16);
        match self {
            FileType::F32 => GgmlDType::F32,
            FileType::F16 => GgmlDType::F16,
            FileType::Q8_0 => quantized(Quantization::Q8_0),
            FileType::Q4KM => quantized(Quantization::Q4K),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4KM => "q4_k_m",
        }
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;

/// The tokenizer's vocabulary in id order, each token's GGUF type, and its BPE
/// merges as `"left right"` strings.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    /// `tokenizer.ggml.pre`.
    pre: &'static str,
}

/// The alternatives of Qwen2's split pattern that set it apart from GPT-2's:
/// letters with one leading non-letter, and digits one at a time.
const QWEN2_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|";

fn vocab(dir: &ModelDir, vocab_size: usize) -> Result<Vocab> {
    let tokenizer = dir.load_tokenizer()?;
    let tokenizer_error = |e: String| Error::Tokenizer(format!("GGUF export: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).map_err(|e| tokenizer_error(e.to_string()))?)
            .map_err(|e| tokenizer_error(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(tokenizer_error(format!("needs a BPE tokenizer, not {}", model["type"])));
    }
    let by_id = tokenizer.get_vocab(true);
    // The config's vocabulary can be padded past the tokenizer's: those rows get
    // placeholder names, as llama.cpp's converter gives them.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (piece, id) in by_id {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(piece);
        }
    }
    let special: std::collections::HashSet<u64> = json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["special"].as_bool() == Some(true))
        .filter_map(|t| t["id"].as_u64())
        .collect();
    let types = (0..vocab_size)
        .map(|id| if special.contains(&(id as u64)) || tokens[id].is_none() { TOKEN_CONTROL } else { TOKEN_NORMAL })
        .collect();
    let tokens = tokens.into_iter().enumerate().map(|(id, t)| t.unwrap_or_else(|| format!("[PAD{id}]"))).collect();
    // tokenizers writes merges as ["a", "b"] pairs (older files: "a b" strings).
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                Ok(format!("{} {}", pair[0].as_str().unwrap_or_default(), pair[1].as_str().unwrap_or_default()))
            }
            other => Err(tokenizer_error(format!("unreadable BPE merge {other}"))),
        })
        .collect::<Result<_>>()?;
    let qwen2 = split_patterns(&json["pre_tokenizer"]).iter().any(|p| p.contains(QWEN2_SPLIT));
    let pre = if qwen2 { "qwen2" } else { "gpt-2" };
    Ok(Vocab { tokens, types, merges, pre })
}

/// Every regex a pre-tokenizer (or a sequence of them) splits on.
fn split_patterns(pre: &serde_json::Value) -> Vec<String> {
    match pre {
        serde_json::Value::Object(map) => {
            let own = map.get("pattern").and_then(|p| p["Regex"].as_str()).map(str::to_owned);
            let nested = map.get("pretokenizers").into_iter().flat_map(|list| list.as_array().into_iter().flatten());
            own.into_iter().chain(nested.flat_map(split_patterns)).collect()
        }
        _ => Vec::new(),
    }
}

/// Writes the safetensors model `dir` to `out` as a GGUF file llama.cpp loads,
/// its matrices in `file_type` (norms and biases stay f32, as llama.cpp's own
/// converter keeps them).
///
/// The pre-tokenizer is declared `qwen2` for a tokenizer that splits as Qwen2's
/// does (one digit a piece), else `gpt-2`: kframe's embedded model keeps a run of
/// digits (a 4-digit secret) as one piece, which llama.cpp's `gpt-2` split does.
pub fn write(dir: &ModelDir, file_type: FileType, out: &Path) -> Result<()> {
    let cfg = &dir.config;
    let weights_error = |source: candle_core::Error| Error::Weights { dir: dir.path.clone(), source };
    let vb = dir.var_builder(DType::F32, &Device::Cpu)?;
    let names = tensor_names(cfg.num_hidden_layers, cfg.tie_word_embeddings);
    let mut tensors = Vec::with_capacity(names.len());
    for (hf, gguf) in &names {
        let t: Tensor = vb.get_unchecked(hf).map_err(weights_error)?;
        let dtype = match t.rank() {
            2 => file_type.ggml_type(Role::of(hf), t.dim(1).map_err(weights_error)?, cfg.num_hidden_layers),
            _ => GgmlDType::F32,
        };
        tensors.push((gguf.as_str(), QTensor::quantize(&t, dtype).map_err(weights_error)?));
    }
    let vocab = vocab(dir, cfg.vocab_size)?;
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let arch = "qwen2";
    let u32v = |n: usize| Value::U32(n as u32);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(dir.model_id())),
        ("general.file_type".into(), Value::U32(file_type.number())),
        (format!("{arch}.context_length"), u32v(cfg.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden_size)),
        (format!("{arch}.block_count"), u32v(cfg.num_hidden_layers)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.intermediate_size)),
        (format!("{arch}.attention.head_count"), u32v(cfg.num_attention_heads)),
        (format!("{arch}.attention.head_count_kv"), u32v(cfg.num_key_value_heads)),
        (format!("{arch}.attention.key_length"), u32v(cfg.head_dim)),
        (format!("{arch}.attention.value_length"), u32v(cfg.head_dim)),
        (format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(vocab.pre.into())),
        ("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(vocab.types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), strings(&vocab.merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    if let Some(&eos) = dir.eos_token_ids.first() {
        metadata.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
        // Qwen2 has no BOS of its own; llama.cpp's converter points it at EOS too.
        metadata.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(eos)));
    }
    if dir.eos_token_ids.len() > 1 {
        let ids = dir.eos_token_ids.iter().map(|&id| Value::U32(id)).collect();
        metadata.push((EOS_KEY.into(), Value::Array(ids)));
    }
    if let Some(template) = &dir.chat_template {
        metadata.push(("tokenizer.chat_template".into(), Value::String(template.clone())));
    }
    if let Some(calibration) = dir.stored_calibration()? {
        let json = serde_json::to_string(&calibration).map_err(|e| Error::Unsupported(e.to_string()))?;
        metadata.push((CALIBRATION_KEY.into(), Value::String(json)));
    }
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    gguf_file::write(&mut file, &metadata, &tensors).map_err(weights_error)?;
    std::io::Write::flush(&mut file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use candle_core::quantized::GgmlDType;

    /// The embedded model written with `weights`, read back: the parsed file, the
    /// open file for its tensors, and the folder that holds it.
    fn written(weights: FileType) -> (Content, std::fs::File, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.gguf");
        write(&ModelDir::embedded().unwrap(), weights, &path).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        (Content::read(&mut f).unwrap(), f, tmp)
    }

    #[test]
    fn the_embedded_model_round_trips_through_gguf_with_llama_cpp_names_and_values() {
        let dir = ModelDir::embedded().unwrap();
        let (content, mut f, _tmp) = written(FileType::F32);
        let cfg = &dir.config;
        let md = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert_eq!(md("general.architecture").to_string().unwrap(), "qwen2");
        assert_eq!(md("qwen2.block_count").to_u32().unwrap() as usize, cfg.num_hidden_layers);
        assert_eq!(md("qwen2.attention.head_count_kv").to_u32().unwrap() as usize, cfg.num_key_value_heads);
        assert_eq!(md("tokenizer.ggml.pre").to_string().unwrap(), "gpt-2");
        let tokens = md("tokenizer.ggml.tokens").to_vec().unwrap();
        assert_eq!(tokens.len(), cfg.vocab_size);
        let tokenizer = dir.load_tokenizer().unwrap();
        for id in [0u32, 5, 300, cfg.vocab_size as u32 - 1] {
            let piece = tokenizer.id_to_token(id).unwrap();
            assert_eq!(tokens[id as usize].to_string().unwrap(), &piece, "token {id}");
        }
        let merges = md("tokenizer.ggml.merges").to_vec().unwrap();
        assert!(merges.len() > 1000 && merges[0].to_string().unwrap().contains(' '));
        // Every tensor llama.cpp's Qwen2 graph reads, in the row-major shape
        // candle reads back (GGUF stores the dimensions innermost first).
        let expected = 2 + 12 * cfg.num_hidden_layers + usize::from(!cfg.tie_word_embeddings);
        assert_eq!(content.tensor_infos.len(), expected);
        let vb = dir.var_builder(DType::F32, &Device::Cpu).unwrap();
        for (hf, gguf) in tensor_names(cfg.num_hidden_layers, cfg.tie_word_embeddings) {
            let want: Tensor = vb.get_unchecked(&hf).unwrap();
            let got = content.tensor(&mut f, &gguf, &Device::Cpu).unwrap();
            assert_eq!(got.shape(), want.shape(), "{gguf}");
            assert_eq!(got.dtype(), GgmlDType::F32, "{gguf}");
            let diff = (got.dequantize(&Device::Cpu).unwrap() - &want).unwrap().abs().unwrap();
            let max: f32 = diff.flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert_eq!(max, 0.0, "{gguf} changed in f32");
        }
        let embd = content.tensor_infos.get("token_embd.weight").unwrap();
        assert_eq!(embd.shape.dims(), &[cfg.vocab_size, cfg.hidden_size]);
    }

    #[test]
    fn an_f16_file_stores_matrices_in_f16_and_norms_and_biases_in_f32() {
        let (content, _, _tmp) = written(FileType::F16);
        assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), 1);
        let dtype = |n: &str| content.tensor_infos[n].ggml_dtype;
        assert_eq!(dtype("blk.0.attn_q.weight"), GgmlDType::F16);
        assert_eq!(dtype("token_embd.weight"), GgmlDType::F16);
        assert_eq!(dtype("blk.0.attn_q.bias"), GgmlDType::F32);
        assert_eq!(dtype("blk.1.ffn_norm.weight"), GgmlDType::F32);
        assert_eq!(dtype("output_norm.weight"), GgmlDType::F32);
    }
}
