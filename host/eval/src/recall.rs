//! `kframe eval recall`: can a tenant's content be recalled from its cache?
//!
//! Each of N tenants stores K records (names and 4-digit secrets) in a cache
//! written in its own frame, then asks for one secret. The same question is asked
//! four ways: with the tenant's own key (matched), in the identity frame (the
//! unrotated reference), with the next tenant's key over this tenant's cache
//! (wrong key), and with no context at all (the chance baseline). A recall counts
//! when the greedy answer is the secret, all four digits.

use crate::error::{Error, Result};
use kframe_core::cache::KvPrecision;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::corpus::{Corpus, RecallItem};
use kframe_model::generate::SamplingParams;
use kframe_model::ModelBundle;
use kframe_model::Variant;

#[derive(Debug, Clone)]
pub struct RecallOptions {
    pub tenants: usize,
    pub records: usize,
    pub seed: u64,
    pub variant: Variant,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecallReport {
    pub model: String,
    pub machine: String,
    pub seed: u64,
    pub tenants: usize,
    pub records: usize,
    pub variant: Variant,
    pub matched: usize,
    pub identity: usize,
    pub wrong_key: usize,
    pub no_context: usize,
    pub matched_recall: f64,
    pub identity_recall: f64,
    pub wrong_key_recall: f64,
    pub wrong_key_upper95: f64,
    pub no_context_recall: f64,
}

struct Prompt {
    /// Tokens of the records, a prefix of `full`.
    context: usize,
    full: Vec<u32>,
    answer: String,
    answer_tokens: usize,
}

fn tokenize(gen: &ModelBundle, item: &RecallItem) -> Result<Prompt> {
    let context = gen.encode(&item.context)?;
    let full = gen.encode(&format!("{}{}", item.context, item.question))?;
    if !full.starts_with(&context) {
        return Err(Error::Eval("the context's tokens are not a prefix of the prompt's".into()));
    }
    let answer_tokens = gen.encode(&item.answer)?.len();
    Ok(Prompt { context: context.len(), full, answer: item.answer.trim().to_owned(), answer_tokens })
}

/// Prefills `prefill` in `writer`'s frame, then asks `ask` in `reader`'s frame and
/// checks the greedy answer.
fn ask(
    gen: &ModelBundle,
    prompt: &Prompt,
    prefill: &[u32],
    ask: &[u32],
    writer: &Frame,
    reader: &Frame,
    variant: Variant,
) -> Result<bool> {
    let mut cache = gen.model.new_cache(KvPrecision::Native);
    if !prefill.is_empty() {
        gen.model.forward(prefill, &mut cache, writer, variant)?;
    }
    let params = SamplingParams { max_tokens: prompt.answer_tokens, ..SamplingParams::default() };
    let out = gen.complete(&mut cache, ask, reader, variant, &params, |_| {})?;
    Ok(out.text.trim() == prompt.answer)
}

pub fn recall(
    gen: &ModelBundle,
    ring: &Keyring,
    opts: &RecallOptions,
    mut progress: impl FnMut(usize),
) -> Result<RecallReport> {
    if opts.tenants < 2 {
        return Err(Error::Eval("eval recall needs at least 2 tenants (wrong key = a neighbour's)".into()));
    }
    let mut corpus = Corpus::new(opts.seed);
    let items: Vec<RecallItem> = (0..opts.tenants).map(|_| corpus.recall_item(opts.records.max(1))).collect();
    let frames: Vec<Frame> =
        (0..opts.tenants).map(|i| ring.frame(&format!("tenant-{i}"), 0)).collect::<std::result::Result<_, _>>()?;
    let (mut matched, mut identity, mut wrong_key, mut no_context) = (0, 0, 0, 0);
    for (i, item) in items.iter().enumerate() {
        let p = tokenize(gen, item)?;
        let (ctx, question) = p.full.split_at(p.context);
        let own = &frames[i];
        let neighbour = &frames[(i + 1) % frames.len()];
        let v = opts.variant;
        matched += ask(gen, &p, ctx, question, own, own, v)? as usize;
        identity += ask(gen, &p, ctx, question, &Frame::Identity, &Frame::Identity, v)? as usize;
        wrong_key += ask(gen, &p, ctx, question, own, neighbour, v)? as usize;
        // The question alone, without the records (it starts with a space; the
        // model has seen such text mid-document, which is where it would sit).
        no_context += ask(gen, &p, &[], question, &Frame::Identity, &Frame::Identity, v)? as usize;
        progress(i + 1);
    }
    let n = opts.tenants as f64;
    Ok(RecallReport {
        model: String::new(),
        machine: kframe_model::device::machine(),
        seed: opts.seed,
        tenants: opts.tenants,
        records: opts.records,
        variant: opts.variant,
        matched,
        identity,
        wrong_key,
        no_context,
        matched_recall: matched as f64 / n,
        identity_recall: identity as f64 / n,
        wrong_key_recall: wrong_key as f64 / n,
        wrong_key_upper95: crate::stats::upper95(wrong_key, opts.tenants),
        no_context_recall: no_context as f64 / n,
    })
}

impl RecallReport {
    pub fn to_text(&self) -> String {
        let row = |name: &str, hits: usize| {
            format!("{name:<34} {hits:>5} / {:<5} {:>7.3}\n", self.tenants, hits as f64 / self.tenants as f64)
        };
        let mut s = format!(
            "model: {}\nmachine: {}\n{} tenants, {} records each, seed {}, {:?}\n\n",
            self.model, self.machine, self.tenants, self.records, self.seed, self.variant
        );
        s += &row("matched key", self.matched);
        s += &row("identity frame (unrotated)", self.identity);
        s += &row("wrong key (neighbour's)", self.wrong_key);
        s += &row("no context (chance baseline)", self.no_context);
        s += &format!("\nwrong-key recall 95% upper bound: {:.4}\n", self.wrong_key_upper95);
        s
    }
}
