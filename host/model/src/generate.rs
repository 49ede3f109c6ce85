//! Generating text for one sequence in one frame: prefill, decode, sample, stream.
//! The multi-tenant engine builds on the same pieces (the sampler, the text stream)
//! over batched steps.

use crate::bundle::{decode, ModelBundle};
use crate::error::{Error, Result};
use crate::qwen2::Variant;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use kframe_core::cache::{KvCache, KvPrecision};
use kframe_core::rotation::Frame;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 (or anything below [`MIN_TEMPERATURE`]) means greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 64, temperature: 0.0, top_p: None, seed: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Stop,
    /// max_tokens, or the model's context window.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Turns generated tokens into text as it forms whole characters: a multi-byte
/// character split across tokens decodes as U+FFFD until its last byte arrives.
#[derive(Default)]
pub struct TextStream {
    tokens: Vec<u32>,
    /// Decoding starts at `prefix` (one token of context, so decoders that strip a
    /// leading space do so on it); text up to `read` has been emitted. Each step
    /// decodes a few tokens, not the whole list.
    prefix: usize,
    read: usize,
}

impl TextStream {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Adds a token; returns the new text, if any is complete.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        self.next_piece(tokenizer, true)
    }

    /// Whatever text is still held back (an incomplete character at the end).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        self.next_piece(tokenizer, false)
    }

    fn next_piece(&mut self, tokenizer: &Tokenizer, whole_chars_only: bool) -> Result<Option<String>> {
        let seen = decode(tokenizer, &self.tokens[self.prefix..self.read])?;
        let text = decode(tokenizer, &self.tokens[self.prefix..])?;
        let complete = !(whole_chars_only && text.ends_with('\u{FFFD}'));
        if text.len() > seen.len() && text.is_char_boundary(seen.len()) && complete {
            self.prefix = self.read;
            self.read = self.tokens.len();
            return Ok(Some(text[seen.len()..].to_owned()));
        }
        Ok(None)
    }

    pub fn into_parts(self, tokenizer: &Tokenizer) -> Result<(Vec<u32>, String)> {
        let text = decode(tokenizer, &self.tokens)?;
        Ok((self.tokens, text))
    }
}

/// Temperatures below this sample greedily. Sampling divides the logits by the
/// temperature before the softmax, and at 1e-38 a logit of 10 is past f32's range:
/// every probability turns into NaN. At 1e-3 the distribution is already the
/// argmax to within f32 for logits a tenth of a unit apart.
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// top_p below this keeps only the most likely token, as 1e-6 does: the sampler
/// works in f32, where 1e-300 is zero and would keep no token at all.
pub const MIN_TOP_P: f64 = 1e-6;

/// The sampler `params` ask for, seeded; parameters too small to work are clamped
/// as [`MIN_TEMPERATURE`] and [`MIN_TOP_P`] say.
pub fn sampler(params: &SamplingParams) -> LogitsProcessor {
    let sampling = match (params.temperature, params.top_p) {
        (t, _) if t < MIN_TEMPERATURE => Sampling::ArgMax,
        (temperature, Some(p)) if p < 1.0 => Sampling::TopP { p: p.max(MIN_TOP_P), temperature },
        (temperature, _) => Sampling::All { temperature },
    };
    LogitsProcessor::from_sampling(params.seed, sampling)
}

impl ModelBundle {
    /// Prefills `prompt` in `frame`, then decodes until an end-of-sequence token,
    /// `max_tokens` or the context window. `on_text` receives each new piece of
    /// text as soon as it forms whole characters.
    pub fn generate(
        &self,
        prompt: &[u32],
        frame: &Frame,
        variant: Variant,
        precision: KvPrecision,
        params: &SamplingParams,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let mut cache = self.model.new_cache(precision);
        self.complete(&mut cache, prompt, frame, variant, params, on_text)
    }

    /// Like [`ModelBundle::generate`], after whatever `cache` already holds: the
    /// continuation of a session, or (in the eval) a question asked over a cache
    /// that another frame wrote.
    pub fn complete(
        &self,
        cache: &mut KvCache,
        prompt: &[u32],
        frame: &Frame,
        variant: Variant,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let max_len = self.model.config().max_position_embeddings;
        if cache.len() + prompt.len() > max_len {
            return Err(Error::ContextTooLong { needed: cache.len() + prompt.len(), max: max_len });
        }
        let mut sampler = sampler(params);
        let mut logits = self.model.forward(prompt, cache, frame, variant)?;
        let mut text = TextStream::default();
        let finish = loop {
            if text.tokens().len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&logits)?;
            if self.eos_token_ids.contains(&next) {
                break FinishReason::Stop;
            }
            if let Some(piece) = text.push(&self.tokenizer, next)? {
                on_text(&piece);
            }
            if text.tokens().len() >= params.max_tokens || cache.len() >= max_len {
                break FinishReason::Length;
            }
            logits = self.model.forward(&[next], cache, frame, variant)?;
        };
        if let Some(piece) = text.finish(&self.tokenizer)? {
            on_text(&piece);
        }
        let (tokens, text) = text.into_parts(&self.tokenizer)?;
        Ok(Generation { prompt_tokens: prompt.len(), tokens, text, finish })
    }
}
