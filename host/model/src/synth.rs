//! Random-weight Qwen2 models, written as real Hugging Face directories.
//!
//! Tests need a model whose shape they control, and the rotation benchmark needs the
//! layer shape of Qwen2.5-3B; neither needs trained weights. The weights are
//! seeded (ChaCha20), so a directory written twice is identical.

use crate::config::Config;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::Activation;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;
use std::path::Path;

/// The token id of `<|endoftext|>` in [`byte_level_tokenizer_json`].
pub const EOS_ID: u32 = 256;

/// A small model for tests: head_dim 128 (as Qwen2.5-3B), grouped-query attention,
/// untied lm_head.
pub fn tiny_config() -> Config {
    Config {
        vocab_size: 512,
        hidden_size: 512,
        intermediate_size: 1024,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 128,
        max_position_embeddings: 1024,
        tie_word_embeddings: false,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        hidden_act: Activation::Silu,
        eos_token_ids: vec![EOS_ID],
    }
}

/// The per-layer shape of Qwen2.5-3B (hidden 2048, 16 query heads, 2 kv heads,
/// head_dim 128, intermediate 11008) with fewer layers and a smaller vocabulary:
/// rotation's cost is per layer, so its ratio to the layer's cost is what matters.
pub fn qwen25_3b_layer_config(layers: usize, vocab_size: usize) -> Config {
    Config {
        vocab_size,
        hidden_size: 2048,
        intermediate_size: 11008,
        num_hidden_layers: layers,
        num_attention_heads: 16,
        num_key_value_heads: 2,
        head_dim: 128,
        max_position_embeddings: 32_768,
        tie_word_embeddings: true,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        hidden_act: Activation::Silu,
        eos_token_ids: vec![EOS_ID],
    }
}

/// Qwen2.5-3B's whole config: 36 layers of [`qwen25_3b_layer_config`], its
/// 151,936-token vocabulary, tied embeddings, a 32k context.
pub fn qwen25_3b_config() -> Config {
    qwen25_3b_layer_config(36, 151_936)
}

/// Seeded random weights under Hugging Face names. Linear weights have std
/// 1/sqrt(fan_in) so activations stay O(1) through the layers.
pub fn random_weights(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut out = HashMap::new();
    let mut add = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let normal = Normal::new(mean, std).expect("std is positive");
        let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        out.insert(name, Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?);
        Ok(())
    };
    let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add("model.embed_tokens.weight".into(), &[cfg.vocab_size, h], 0.0, 1.0)?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.1)?;
        add(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0, 0.1)?;
        add(format!("{p}.self_attn.q_proj.weight"), &[qd, h], 0.0, inv(h))?;
        add(format!("{p}.self_attn.q_proj.bias"), &[qd], 0.0, 0.1)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kvd, h], 0.0, inv(h))?;
        add(format!("{p}.self_attn.k_proj.bias"), &[kvd], 0.0, 0.1)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kvd, h], 0.0, inv(h))?;
        add(format!("{p}.self_attn.v_proj.bias"), &[kvd], 0.0, 0.1)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, qd], 0.0, inv(qd))?;
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.0, inv(h))?;
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.0, inv(h))?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.0, inv(i))?;
    }
    add("model.norm.weight".into(), &[h], 1.0, 0.1)?;
    if !cfg.tie_word_embeddings {
        // Larger than 1/sqrt(h): peaked logits keep greedy decoding away from ties.
        add("lm_head.weight".into(), &[cfg.vocab_size, h], 0.0, 4.0 * inv(h))?;
    }
    Ok(out)
}

/// GPT-2's byte-to-unicode map, which byte-level BPE uses so every byte is a
/// printable character.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("valid")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("valid")
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer with no merges: ids 0..256 are the bytes,
/// 256 is `<|endoftext|>`, the rest pad the vocabulary to `vocab_size`.
pub fn byte_level_tokenizer_json(vocab_size: usize) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (id, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), id.into());
    }
    vocab.insert("<|endoftext|>".into(), EOS_ID.into());
    for id in (EOS_ID as usize + 1)..vocab_size {
        vocab.insert(format!("<|extra_{id}|>"), id.into());
    }
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": EOS_ID, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes config.json, model.safetensors (f32), tokenizer.json and
/// generation_config.json for a random model of shape `cfg`.
pub fn write_model_dir(dir: &Path, cfg: &Config, seed: u64) -> Result<()> {
    write_model_dir_with(dir, cfg, seed, DType::F32, None)
}

/// [`write_model_dir`] with the weights stored in `dtype` (a real-size model in
/// bf16, as the Qwen2.5 releases store it, needs half the disk and memory of f32),
/// and optionally a real tokenizer: `tokenizer` is a folder with a tokenizer.json
/// (and a tokenizer_config.json, whose chat template is kept). Its vocabulary must
/// fit the config's; `<|endoftext|>` and `<|im_end|>` become the end-of-sequence ids.
pub fn write_model_dir_with(dir: &Path, cfg: &Config, seed: u64, dtype: DType, tokenizer: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json values serialise");
    let mut cfg = cfg.clone();
    match tokenizer {
        None => std::fs::write(dir.join("tokenizer.json"), json(&byte_level_tokenizer_json(cfg.vocab_size)))?,
        Some(from) => {
            let file = from.join("tokenizer.json");
            let loaded = tokenizers::Tokenizer::from_file(&file)
                .map_err(|e| Error::Malformed { path: file.clone(), reason: e.to_string() })?;
            let size = loaded.get_vocab_size(true);
            if size > cfg.vocab_size {
                let reason = format!("{size} tokens do not fit a vocabulary of {}", cfg.vocab_size);
                return Err(Error::Malformed { path: file, reason });
            }
            cfg.eos_token_ids = ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| loaded.token_to_id(t)).collect();
            std::fs::copy(&file, dir.join("tokenizer.json"))?;
            let config = from.join("tokenizer_config.json");
            if config.is_file() {
                std::fs::copy(&config, dir.join("tokenizer_config.json"))?;
            }
        }
    }
    let mut config = cfg.to_json();
    config["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    std::fs::write(dir.join("config.json"), json(&config))?;
    std::fs::write(dir.join("generation_config.json"), json(&serde_json::json!({"eos_token_id": cfg.eos_token_ids})))?;
    let weights = random_weights(&cfg, seed, dtype, &Device::Cpu)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(())
}
