//! The model crate's errors, with the context a user needs to fix the problem
//! (which file, which tensor, which limit).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model directory {dir}: missing {file}")]
    MissingFile { dir: PathBuf, file: &'static str },

    #[error("{path}: malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },

    #[error("{path}: not a Qwen2 model ({found}); kframe serves the Qwen2 architecture (Qwen2.5 family)")]
    WrongArchitecture { path: PathBuf, found: String },

    #[error("unsupported model setting: {0}")]
    Unsupported(String),

    #[error("loading weights from {dir}: {source}")]
    Weights { dir: PathBuf, source: candle_core::Error },

    #[error("the prompt is empty")]
    EmptyPrompt,

    #[error("token id {id} is outside the model's vocabulary (vocab_size {vocab_size})")]
    UnknownToken { id: u32, vocab_size: usize },

    #[error("context of {needed} tokens exceeds max_position_embeddings {max}")]
    ContextTooLong { needed: usize, max: usize },

    #[error("device {0} is not available: {1}")]
    Device(String, String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(transparent)]
    Core(#[from] kframe_core::Error),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
