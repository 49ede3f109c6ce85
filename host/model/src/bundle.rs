//! A model with what it takes to read and write text: its tokenizer and its
//! end-of-sequence ids.

use crate::error::{Error, Result};
use crate::load::ModelDir;
use crate::qwen2::Qwen2;
use crate::weights::Quantization;
use candle_core::{DType, Device};
use tokenizers::Tokenizer;

/// A loaded model and its tokenizer: what generation and serving run on.
pub struct ModelBundle {
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
}

impl ModelBundle {
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(dir, dtype, device, None)
    }

    /// [`Self::load`], with a safetensors model's matrices quantized as they load.
    pub fn load_quantized(
        dir: &ModelDir,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        Ok(Self {
            model: dir.load_model_quantized(dtype, device, quantize)?,
            tokenizer: dir.load_tokenizer()?,
            eos_token_ids: dir.eos_token_ids.clone(),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let enc = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        decode(&self.tokenizer, tokens)
    }
}

pub(crate) fn decode(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<String> {
    tokenizer.decode(tokens, true).map_err(|e| Error::Tokenizer(e.to_string()))
}
