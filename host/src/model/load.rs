//! Opening a Hugging Face style model directory: config.json, model.safetensors (or
//! shards listed in model.safetensors.index.json), tokenizer.json and, when
//! present, generation_config.json. Every missing or malformed file is an error
//! that names it.

use super::config::{Config, TokenIds};
use super::Qwen2;
use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct ModelDir {
    pub path: PathBuf,
    pub config: Config,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    /// End-of-sequence ids from generation_config.json, else from config.json.
    pub eos_token_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::HashMap<String, String>,
}

fn required(dir: &Path, file: &'static str) -> Result<PathBuf> {
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingFile { dir: dir.to_owned(), file })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let malformed = |reason: String| Error::Malformed { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| malformed(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))
}

impl ModelDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Malformed { path: dir.to_owned(), reason: "not a directory".into() });
        }
        let config = Config::from_file(&required(dir, "config.json")?)?;
        let tokenizer = required(dir, "tokenizer.json")?;
        let single = dir.join("model.safetensors");
        let weights = if single.is_file() {
            vec![single]
        } else {
            let index_path = dir.join("model.safetensors.index.json");
            if !index_path.is_file() {
                return Err(Error::MissingFile { dir: dir.to_owned(), file: "model.safetensors (or model.safetensors.index.json)" });
            }
            let index: ShardIndex = read_json(&index_path)?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(Error::Malformed { path: index_path.clone(), reason: format!("lists missing shard {shard}") });
                }
                paths.push(path);
            }
            paths
        };
        let generation = dir.join("generation_config.json");
        let from_generation = if generation.is_file() {
            read_json::<GenerationConfig>(&generation)?.eos_token_id.map(TokenIds::into_vec)
        } else {
            None
        };
        let eos_token_ids = from_generation.unwrap_or_else(|| config.eos_token_ids.clone());
        Ok(Self { path: dir.to_owned(), config, weights, tokenizer, eos_token_ids })
    }

    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_file(&self.tokenizer)
            .map_err(|e| Error::Malformed { path: self.tokenizer.clone(), reason: e.to_string() })
    }

    /// Memory-maps the safetensors files; tensors are read (and cast to `dtype`) as
    /// the model asks for them.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: the files are mapped read-only; kframe never writes them while
        // serving. A file truncated underneath us by another process is outside
        // what any mmap-based loader can defend against.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device) }
            .map_err(|source| Error::Weights { dir: self.path.clone(), source })
    }

    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<Qwen2> {
        Qwen2::new(&self.config, self.var_builder(dtype, device)?)
            .map_err(|source| Error::Weights { dir: self.path.clone(), source })
    }
}
