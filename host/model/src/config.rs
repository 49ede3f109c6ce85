//! A tolerant reading of a Hugging Face Qwen2 `config.json`.
//!
//! candle-transformers' `qwen2::Config` rejects what current transformers writes
//! (`sliding_window: null`, `rope_parameters` instead of `rope_theta`, optional fields
//! left out), so kframe parses its own struct and converts to candle's for the
//! reference model.

use crate::error::{Error, Result};
use candle_nn::Activation;
use serde::Deserialize;
use std::path::Path;

/// The model shape and numerics kframe needs; every field resolved, none optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub hidden_act: Activation,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// config.json as written by any transformers version: everything optional that
/// some version leaves out.
#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<Activation>,
    eos_token_id: Option<TokenIds>,
}

/// `eos_token_id` is an integer in some configs and a list in others.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Malformed { path: path.to_owned(), reason: e.to_string() })?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let malformed = |reason: String| Error::Malformed { path: path.to_owned(), reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        // Architecture first: a Llama or BERT config should say "wrong model", not
        // "missing field".
        let model_type = value.get("model_type").and_then(|v| v.as_str());
        let archs: Vec<&str> = value
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
            .unwrap_or_default();
        let is_qwen2 = model_type == Some("qwen2") || archs.iter().any(|a| a.starts_with("Qwen2For"));
        if (model_type.is_some() || !archs.is_empty()) && !is_qwen2 {
            let found = model_type.map(str::to_owned).unwrap_or_else(|| archs.join(","));
            return Err(Error::WrongArchitecture { path: path.to_owned(), found });
        }
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        let _ = (&raw.architectures, &raw.model_type);
        raw.resolve().map_err(malformed)
    }

    /// candle-transformers' config for the same model, used by the reference tests
    /// and benchmarks.
    pub fn to_candle(&self) -> candle_transformers::models::qwen2::Config {
        candle_transformers::models::qwen2::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.max_position_embeddings,
            max_window_layers: self.num_hidden_layers,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: self.hidden_act,
        }
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Serialises in the shape transformers itself writes, so a directory kframe
    /// writes loads anywhere.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "sliding_window": null,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        })
    }
}

impl RawConfig {
    fn resolve(self) -> std::result::Result<Config, String> {
        if self.use_sliding_window {
            return Err("use_sliding_window: true is not supported".into());
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(format!("rope_scaling {scaling} is not supported"));
            }
        }
        let rope = self.rope_parameters;
        if let Some(kind) = rope.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                return Err(format!("rope_type {kind:?} is not supported"));
            }
        }
        let rope_theta = self.rope_theta.or_else(|| rope.and_then(|r| r.rope_theta)).unwrap_or(10_000.0);
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if !self.hidden_size.is_multiple_of(heads) {
            return Err(format!("hidden_size {} is not divisible by {heads} heads", self.hidden_size));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim * heads != self.hidden_size {
            // Qwen2 projects back to hidden_size from heads * head_dim; candle's
            // reference assumes they are equal too.
            return Err(format!("head_dim {head_dim} x {heads} heads != hidden_size {}", self.hidden_size));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even for RoPE"));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return Err("vocab_size and num_hidden_layers must be positive".into());
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(32_768),
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            hidden_act: self.hidden_act.unwrap_or(Activation::Silu),
            eos_token_ids: self.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN25_05B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936 }"#;

    #[test]
    fn parses_the_qwen25_release_config() {
        let c = Config::from_json(QWEN25_05B, Path::new("config.json")).unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads, c.rope_theta), (64, 2, 1e6));
        assert_eq!(c.eos_token_ids, vec![151645]);
    }

    #[test]
    fn parses_what_current_transformers_writes() {
        let text = r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "sliding_window": null, "dtype": "float32",
            "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
            "eos_token_id": [1, 2]}"#;
        let c = Config::from_json(text, Path::new("config.json")).unwrap();
        assert_eq!((c.rope_theta, c.head_dim, c.max_position_embeddings), (50000.0, 128, 32768));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn rejects_another_architecture_by_name() {
        let text = r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#;
        let err = Config::from_json(text, Path::new("config.json")).unwrap_err();
        assert!(matches!(err, Error::WrongArchitecture { .. }), "{err}");
        assert!(err.to_string().contains("llama"));
    }

    #[test]
    fn malformed_json_and_missing_fields_are_clear_errors() {
        let err = Config::from_json("{not json", Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("x/config.json"), "{err}");
        let err = Config::from_json(r#"{"model_type":"qwen2"}"#, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
