//! The population every experiment of `kframe eval` runs on: one model, tenant
//! keys from a seeded master secret, a public prefix all tenants share
//! (`shared-plain`, prefilled once), and each tenant's private records and question.
//!
//! A tenant's cache is built the way serving builds it: the shared prefix by
//! reference, the tenant's own rows rotated into its frame, every block sealed and
//! verified at every layer, rotated values kept exactly (so the matched-key round
//! trip can be checked bit for bit).

use crate::error::{Error, Result};
use kframe_core::cache::{KvCache, KvPrecision, SharedPrefix};
use kframe_core::integrity::{Findings, TagKey};
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::corpus::{self, Corpus};
use kframe_model::qwen2::{Chunk, Trace};
use kframe_model::ModelBundle;
use kframe_model::Variant;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use std::sync::Arc;

/// Tokens generated past the answer, so that batched decoding runs a few steps
/// and "identical output" means more than one token.
const EXTRA_TOKENS: usize = 3;

/// One tenant's private material.
pub struct Case {
    pub tenant: String,
    /// Its private records, after the shared prefix.
    pub context: Vec<u32>,
    pub question: Vec<u32>,
    /// The secret the question asks for, as tokens.
    pub answer: Vec<u32>,
    /// Every secret in its records (the asked one among them), as text.
    pub secrets: Vec<String>,
}

pub struct Lab<'g> {
    pub gen: &'g ModelBundle,
    pub model_name: String,
    pub seed: u64,
    pub variant: Variant,
    pub ring: Keyring,
    pub tag_key: Arc<TagKey>,
    pub prefix: Arc<SharedPrefix>,
    pub cases: Vec<Case>,
}

/// The four-digit secrets in a text.
fn secrets_in(text: &str) -> Vec<String> {
    text.split_whitespace()
        .filter(|w| w.len() == 4 && w.bytes().all(|b| b.is_ascii_digit()))
        .map(String::from)
        .collect()
}

impl<'g> Lab<'g> {
    /// `tenants` tenants with `records` records each; the public prefix is filler
    /// text of at least 2 * head_dim tokens (enough known pairs for the Procrustes
    /// sweep under `rotate-copy`).
    pub fn new(gen: &'g ModelBundle, model_name: &str, tenants: usize, records: usize, seed: u64) -> Result<Self> {
        if tenants < 2 {
            return Err(Error::Eval("it needs at least 2 tenants (a wrong key is a neighbour's)".into()));
        }
        let model = &gen.model;
        let master = MasterSecret::from_bytes(blake3::derive_key("kframe eval master secret v1", &seed.to_le_bytes()));
        let tag_key = Arc::new(TagKey::derive(&master));
        let ring = Keyring::builder(master, model.rotation_shape())
            .dtype(model.dtype())
            .precision(KvPrecision::Exact)
            .device(model.device().clone())
            .capacity(64)
            .build();

        let d = model.config().head_dim;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let filler: Vec<&str> = kframe_model::corpus::filler_sentences().collect();
        let mut text = String::new();
        let mut tokens = Vec::new();
        while tokens.len() < 2 * d {
            text += filler.choose(&mut rng).expect("filler is not empty");
            text.push(' ');
            tokens = gen.encode(text.trim_end())?;
        }
        let mut cache = model.new_cache(KvPrecision::Native);
        cache.seal_with(tag_key.clone(), &Frame::Identity)?;
        model.forward(&tokens, &mut cache, &Frame::Identity, Variant::ProbeTime)?;
        let id = *blake3::hash(&tokens.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()).as_bytes();
        let prefix = Arc::new(SharedPrefix { id, tokens, cache });

        let mut corpus = Corpus::new(seed);
        let mut cases = Vec::with_capacity(tenants);
        for i in 0..tenants {
            let item = corpus.recall_item(records.max(1));
            // A leading space joins the records to the prefix as running text.
            let context = gen.encode(&format!(" {}", item.context))?;
            let question = gen.encode(&item.question)?;
            let answer = gen.encode(&item.answer)?;
            let needed = prefix.tokens.len() + context.len() + question.len() + answer.len() + EXTRA_TOKENS;
            if needed > model.config().max_position_embeddings {
                return Err(Error::Model(kframe_model::Error::ContextTooLong {
                    needed,
                    max: model.config().max_position_embeddings,
                }));
            }
            cases.push(Case {
                tenant: format!("tenant-{i}"),
                context,
                question,
                answer,
                secrets: secrets_in(&item.context),
            });
        }
        let variant = Variant::ProbeTime;
        Ok(Self { gen, model_name: model_name.to_owned(), seed, variant, ring, tag_key, prefix, cases })
    }

    pub fn tenants(&self) -> usize {
        self.cases.len()
    }

    pub fn frame(&self, i: usize) -> Result<Frame> {
        Ok(self.ring.frame(&self.cases[i].tenant, 0)?)
    }

    /// Lets [`Self::padded_frame`] pad every layer with these settings.
    pub fn with_padding(mut self, padding: kframe_core::layout::Padding) -> Self {
        self.ring = self.ring.with_padding(padding);
        self
    }

    pub fn has_padding(&self) -> bool {
        self.ring.padding().is_some()
    }

    /// Tenant `i`'s frame, with every layer norm-padded or none (padding needs
    /// [`Self::with_padding`]).
    pub fn frame_padded(&self, i: usize, padded: bool) -> Result<Frame> {
        let layout = self.ring.layout(vec![padded; self.layers()]);
        Ok(self.ring.padded_frame(&self.cases[i].tenant, 0, &layout)?)
    }

    pub fn head_dim(&self) -> usize {
        self.gen.model.config().head_dim
    }

    pub fn layers(&self) -> usize {
        self.gen.model.config().num_hidden_layers
    }

    pub fn kv_heads(&self) -> usize {
        self.gen.model.config().num_key_value_heads
    }

    /// Tokens each answer run generates.
    pub fn gen_tokens(&self, i: usize) -> usize {
        self.cases[i].answer.len() + EXTRA_TOKENS
    }

    /// A cache after the shared prefix, sealed for `frame` and verified at every layer.
    pub fn empty_cache(&self, frame: &Frame) -> Result<KvCache> {
        let layout = frame.layout().cloned().unwrap_or_else(|| kframe_core::layout::Layout::plain(self.layers()));
        let mut cache = KvCache::after_prefix(self.prefix.clone(), KvPrecision::Exact).with_layout(layout)?;
        cache.seal_with(self.tag_key.clone(), frame)?;
        cache.set_verify(vec![true; self.layers()]);
        Ok(cache)
    }

    /// Tenant `i`'s private records written into `frame` after the shared prefix;
    /// `trace` receives their plaintext K and V.
    pub fn private_cache(&self, i: usize, frame: &Frame, trace: Option<&mut Trace>) -> Result<KvCache> {
        let mut cache = self.empty_cache(frame)?;
        self.gen.model.forward_traced(&self.cases[i].context, &mut cache, frame, self.variant, trace)?;
        Ok(cache)
    }

    /// Greedy answers for a batch: each asks `question` over its cache in `frame`
    /// (prefilled one by one), then all decode together, one batched step per token.
    /// Returns the tokens and what the caches' verification found.
    pub fn answer_batch(&self, runs: &mut [Run<'_>]) -> Result<(Vec<Vec<u32>>, Findings)> {
        let model = &self.gen.model;
        let mut out: Vec<Vec<u32>> = Vec::with_capacity(runs.len());
        for run in runs.iter_mut() {
            let logits = model.forward(run.question, &mut run.cache, run.frame, self.variant)?;
            out.push(vec![argmax(&logits)?]);
        }
        let steps = runs.iter().map(|r| r.tokens).max().unwrap_or(0);
        for _ in 1..steps {
            let live: Vec<usize> = (0..runs.len()).filter(|&i| out[i].len() < runs[i].tokens).collect();
            let mut seqs: Vec<Chunk> = Vec::with_capacity(live.len());
            for (i, run) in runs.iter_mut().enumerate() {
                if live.contains(&i) {
                    let token = out[i].last().expect("one token at least");
                    seqs.push(Chunk::new(std::slice::from_ref(token), &mut run.cache, run.frame));
                }
            }
            let logits = model.forward_batch(&mut seqs, self.variant)?;
            for (row, &i) in live.iter().enumerate() {
                out[i].push(argmax(&logits.get(row)?)?);
            }
        }
        let mut findings = Findings::default();
        for run in runs.iter_mut() {
            let f = run.cache.take_findings();
            findings.blocks_verified += f.blocks_verified;
            findings.blocks_masked += f.blocks_masked;
            findings.events.extend(f.events);
            findings.pad_overflow += f.pad_overflow;
        }
        Ok((out, findings))
    }

    /// Whether `tokens` begin with tenant `i`'s secret.
    pub fn recalls(&self, i: usize, tokens: &[u32]) -> bool {
        tokens.starts_with(&self.cases[i].answer)
    }

    /// Fresh secrets that no tenant holds (membership's absent candidates).
    pub fn absent_secrets(&self, n: usize, rng: &mut impl rand::Rng) -> Vec<String> {
        let held: std::collections::HashSet<&str> =
            self.cases.iter().flat_map(|c| c.secrets.iter().map(String::as_str)).collect();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let s = corpus::secret(rng);
            if !held.contains(s.as_str()) && !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }
}

/// One sequence of an answer batch.
pub struct Run<'a> {
    pub cache: KvCache,
    pub frame: &'a Frame,
    pub question: &'a [u32],
    pub tokens: usize,
}

/// (kv, n, d) in any dtype and device -> per kv head, n rows of f32.
pub fn rows_of(t: &candle_core::Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
    let t = t.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?;
    (0..t.dim(0)?).map(|h| Ok(t.get(h)?.to_vec2::<f32>()?)).collect()
}

fn argmax(logits: &candle_core::Tensor) -> Result<u32> {
    Ok(logits.argmax(0)?.to_scalar::<u32>()?)
}
