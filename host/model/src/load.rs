//! Opening a model: a Hugging Face style directory (config.json,
//! model.safetensors or the shards listed in model.safetensors.index.json,
//! tokenizer.json and, when present, generation_config.json and
//! tokenizer_config.json), or a single GGUF file ([`crate::gguf`]). Every missing
//! or malformed file is an error that names it.

use crate::config::{Config, TokenIds};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::qwen2::Qwen2;
use crate::weights::{Quantization, Safetensors, TensorSource};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// A model on disk (a directory or a GGUF file) or compiled in, its config read
/// and every file it needs found; the weights load with [`ModelDir::load_model`].
pub struct ModelDir {
    /// The directory or GGUF file, or `<embedded>` for the model compiled into kframe.
    pub path: PathBuf,
    pub config: Config,
    pub weights: Weights,
    /// tokenizer.json; `None` for a GGUF file, whose metadata holds the tokenizer.
    tokenizer: Option<Bytes>,
    /// End-of-sequence ids from generation_config.json, else from config.json.
    pub eos_token_ids: Vec<u32>,
    /// The Jinja chat template of tokenizer_config.json, when it has one.
    pub chat_template: Option<String>,
    /// The stored norm-pad calibration ([`kframe_core::layout::CALIBRATION_FILE`]), if any.
    pad_calibration: Option<Bytes>,
}

/// Where the weights come from.
pub enum Weights {
    /// safetensors files on disk, memory-mapped (one, or the shards of an index).
    Files(Vec<PathBuf>),
    /// The embedded model's safetensors bytes, compiled into the binary.
    #[cfg_attr(not(feature = "embedded-model"), allow(dead_code))]
    Static(&'static [u8]),
    /// A GGUF file, memory-mapped.
    Gguf(Arc<GgufFile>),
}

/// A small file's contents: read from disk, compiled in, or read out of a GGUF
/// file's metadata.
enum Bytes {
    File(PathBuf),
    #[cfg_attr(not(feature = "embedded-model"), allow(dead_code))]
    Static(&'static [u8]),
    Owned(String),
}

/// kframe's own model (embedded/, trained by train/train_tiny.py), compiled
/// in so that kframe runs with no `--model` (the default `embedded-model` feature;
/// a build without it needs `--model`).
#[cfg(feature = "embedded-model")]
mod embedded {
    macro_rules! file {
        ($name:literal) => {
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/embedded/", $name))
        };
    }
    pub const CONFIG: &[u8] = file!("config.json");
    pub const GENERATION: &[u8] = file!("generation_config.json");
    pub const TOKENIZER: &[u8] = file!("tokenizer.json");
    pub const WEIGHTS: &[u8] = file!("model.safetensors");
    pub const TOKENIZER_CONFIG: &[u8] = file!("tokenizer_config.json");
    pub const PAD_CALIBRATION: &[u8] = file!("kframe-pad.json");
}

/// How reports name the compiled-in model.
pub const EMBEDDED_MODEL_NAME: &str = "kframe-tiny (embedded)";

/// The directory the embedded model was built from, for tests that compare the two.
pub fn embedded_model_source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("embedded")
}

#[derive(serde::Deserialize)]
struct GenerationConfig {
    eos_token_id: Option<TokenIds>,
}

#[derive(serde::Deserialize)]
struct TokenizerConfig {
    chat_template: Option<ChatTemplateField>,
}

/// A template string, or (in some releases) a list of named templates.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ChatTemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(serde::Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TokenizerConfig {
    fn template(self) -> Option<String> {
        match self.chat_template? {
            ChatTemplateField::One(t) => Some(t),
            ChatTemplateField::Named(list) => {
                let mut list = list.into_iter();
                let first = list.next()?;
                Some(list.find(|t| t.name == "default").unwrap_or(first).template)
            }
        }
    }
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
    /// Opens a model directory, or a GGUF file.
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            if crate::gguf::is_gguf(dir) {
                return Self::open_gguf(dir);
            }
            return Err(Error::Malformed {
                path: dir.to_owned(),
                reason: "neither a model directory nor a GGUF file (no GGUF magic)".into(),
            });
        }
        if !dir.is_dir() {
            return Err(Error::Malformed { path: dir.to_owned(), reason: "not a directory or a file".into() });
        }
        let config = Config::from_file(&required(dir, "config.json")?)?;
        let tokenizer = required(dir, "tokenizer.json")?;
        let single = dir.join("model.safetensors");
        let weights = if single.is_file() {
            vec![single]
        } else {
            let index_path = dir.join("model.safetensors.index.json");
            if !index_path.is_file() {
                return Err(Error::MissingFile {
                    dir: dir.to_owned(),
                    file: "model.safetensors (or model.safetensors.index.json)",
                });
            }
            let index: ShardIndex = read_json(&index_path)?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(Error::Malformed {
                        path: index_path.clone(),
                        reason: format!("lists missing shard {shard}"),
                    });
                }
                paths.push(path);
            }
            paths
        };
        let weights = Weights::Files(weights);
        let generation = dir.join("generation_config.json");
        let from_generation = if generation.is_file() {
            read_json::<GenerationConfig>(&generation)?.eos_token_id.map(TokenIds::into_vec)
        } else {
            None
        };
        let eos_token_ids = from_generation.unwrap_or_else(|| config.eos_token_ids.clone());
        let tokenizer_config = dir.join("tokenizer_config.json");
        let chat_template =
            if tokenizer_config.is_file() { read_json::<TokenizerConfig>(&tokenizer_config)?.template() } else { None };
        let calibration = dir.join(kframe_core::layout::CALIBRATION_FILE);
        Ok(Self {
            path: dir.to_owned(),
            config,
            weights,
            tokenizer: Some(Bytes::File(tokenizer)),
            eos_token_ids,
            chat_template,
            pad_calibration: calibration.is_file().then_some(Bytes::File(calibration)),
        })
    }

    /// A GGUF file: the config, end-of-sequence id, chat template and stored
    /// calibration from its metadata.
    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        Ok(Self {
            path: path.to_owned(),
            eos_token_ids: config.eos_token_ids.clone(),
            chat_template: file.chat_template(),
            pad_calibration: file.calibration_json().map(Bytes::Owned),
            config,
            tokenizer: None,
            weights: Weights::Gguf(Arc::new(file)),
        })
    }

    /// The model compiled into kframe, read by the same parsers as a directory.
    #[cfg(feature = "embedded-model")]
    pub fn embedded() -> Result<Self> {
        let path = PathBuf::from("<embedded>");
        let text = |bytes: &'static [u8], file: &str| {
            std::str::from_utf8(bytes).map_err(|e| Error::Malformed { path: path.join(file), reason: e.to_string() })
        };
        let config = Config::from_json(text(embedded::CONFIG, "config.json")?, &path.join("config.json"))?;
        let generation: GenerationConfig = serde_json::from_str(text(embedded::GENERATION, "generation_config.json")?)
            .map_err(|e| Error::Malformed { path: path.join("generation_config.json"), reason: e.to_string() })?;
        let eos_token_ids =
            generation.eos_token_id.map(TokenIds::into_vec).unwrap_or_else(|| config.eos_token_ids.clone());
        let tokenizer_config: TokenizerConfig =
            serde_json::from_str(text(embedded::TOKENIZER_CONFIG, "tokenizer_config.json")?)
                .map_err(|e| Error::Malformed { path: path.join("tokenizer_config.json"), reason: e.to_string() })?;
        Ok(Self {
            chat_template: tokenizer_config.template(),
            path,
            config,
            weights: Weights::Static(embedded::WEIGHTS),
            tokenizer: Some(Bytes::Static(embedded::TOKENIZER)),
            eos_token_ids,
            pad_calibration: Some(Bytes::Static(embedded::PAD_CALIBRATION)),
        })
    }

    #[cfg(not(feature = "embedded-model"))]
    pub fn embedded() -> Result<Self> {
        Err(Error::Unsupported(
            "this build has no embedded model (cargo feature `embedded-model`); pass --model DIR".into(),
        ))
    }

    /// `--model DIR` when given, else the embedded model.
    pub fn open_or_embedded(dir: Option<&Path>) -> Result<Self> {
        match dir {
            Some(dir) => Self::open(dir),
            None => Self::embedded(),
        }
    }

    /// The name `/v1/models` gives: `kframe-tiny` for the embedded model, else the
    /// directory's name, or the GGUF file's without `.gguf`.
    pub fn model_id(&self) -> String {
        let name = match &self.weights {
            Weights::Static(_) => return "kframe-tiny".into(),
            Weights::Gguf(_) => self.path.file_stem(),
            Weights::Files(_) => self.path.file_name(),
        };
        let name = name.map(|n| n.to_string_lossy().into_owned());
        name.filter(|n| !n.is_empty()).unwrap_or_else(|| "model".into())
    }

    /// The weights' storage formats, for reports: the dtype asked for, or a GGUF
    /// file's matrix types, most common first (`q4_k+q6_k`).
    pub fn weights_format(&self, dtype: DType, quantize: Option<Quantization>) -> String {
        match (&self.weights, quantize) {
            (Weights::Gguf(file), _) => file.matrix_formats().join("+"),
            (_, Some(q)) => q.name().to_owned(),
            _ => format!("{dtype:?}").to_lowercase(),
        }
    }

    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        let (loaded, path) = match &self.tokenizer {
            None => match &self.weights {
                Weights::Gguf(file) => return file.tokenizer(),
                _ => unreachable!("only a GGUF model has no tokenizer.json"),
            },
            Some(Bytes::File(path)) => (Tokenizer::from_file(path), path.clone()),
            Some(Bytes::Static(bytes)) => (Tokenizer::from_bytes(bytes), self.path.join("tokenizer.json")),
            Some(Bytes::Owned(text)) => (text.parse::<Tokenizer>(), self.path.clone()),
        };
        loaded.map_err(|e| Error::Malformed { path, reason: e.to_string() })
    }

    /// Memory-maps the safetensors files (or reads the embedded bytes); tensors are
    /// read, and cast to `dtype`, as the model asks for them.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        // SAFETY: the files are mapped read-only; kframe never writes them while
        // serving. A file truncated underneath us by another process is outside
        // what any mmap-based loader can defend against.
        let vb = match &self.weights {
            Weights::Files(files) => unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) },
            Weights::Static(bytes) => VarBuilder::from_slice_safetensors(bytes, dtype, device),
            Weights::Gguf(_) => {
                return Err(Error::Unsupported(format!(
                    "{} is a GGUF file, not safetensors; load it with load_model",
                    self.path.display()
                )))
            }
        };
        vb.map_err(|source| Error::Weights { dir: self.path.clone(), source })
    }

    /// The norm-pad calibration stored with the model, if it has one.
    pub fn stored_calibration(&self) -> Result<Option<kframe_core::layout::Calibration>> {
        let path = self.path.join(kframe_core::layout::CALIBRATION_FILE);
        let malformed = |reason: String| Error::Malformed { path: path.clone(), reason };
        let text = match &self.pad_calibration {
            None => return Ok(None),
            Some(Bytes::File(p)) => std::fs::read_to_string(p).map_err(|e| malformed(e.to_string()))?,
            Some(Bytes::Static(b)) => String::from_utf8(b.to_vec()).map_err(|e| malformed(e.to_string()))?,
            Some(Bytes::Owned(text)) => text.clone(),
        };
        let calibration: kframe_core::layout::Calibration =
            serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        calibration.check_shape(self.config.num_hidden_layers, self.config.num_key_value_heads).map_err(malformed)?;
        Ok(Some(calibration))
    }

    /// Loads the weights, dense in `dtype` (see [`Qwen2::new`] for what f16 and
    /// bf16 mean on the CPU). A GGUF file keeps each tensor in its own format and
    /// takes `dtype` for the K/V cache.
    pub fn load_model(&self, dtype: DType, device: &Device) -> Result<Qwen2> {
        self.load_model_quantized(dtype, device, None)
    }

    /// [`Self::load_model`], with a safetensors model's matrices quantized as they
    /// load (`--quantize`).
    pub fn load_model_quantized(&self, dtype: DType, device: &Device, quantize: Option<Quantization>) -> Result<Qwen2> {
        let weights_error = |source| Error::Weights { dir: self.path.clone(), source };
        let layers = self.config.num_hidden_layers;
        match &self.weights {
            Weights::Gguf(file) => {
                if let Some(q) = quantize {
                    return Err(Error::Unsupported(format!(
                        "--quantize {} applies to safetensors models; {} keeps the formats it was written in",
                        q.name(),
                        self.path.display()
                    )));
                }
                let source: &dyn TensorSource = &file.source(dtype, device);
                Qwen2::from_source(&self.config, source).map_err(weights_error)
            }
            _ => {
                let source = Safetensors { vb: self.var_builder(dtype, device)?, quantize, layers };
                Qwen2::from_source(&self.config, &source).map_err(weights_error)
            }
        }
    }
}
