//! Folding a step's results back: each sequence's findings recorded, its context
//! advanced, its next token sampled and streamed; finished sequences checked in to
//! their sessions (or dropped, zeroed) and their callers told.

use crate::api::{EngineError, Event};
use crate::metrics::Metrics;
use crate::schedule::Work;
use crate::state::{Finish, Seq, State};
use candle_core::Tensor;
use kframe_model::generate::FinishReason;
use kframe_model::qwen2::Stepped;
use kframe_model::ModelBundle;
use kframe_policy::Entry;
use rayon::prelude::*;

impl Seq {
    /// Samples this sequence's next token from its logits and streams it.
    /// Returns how it finished, if it did.
    pub(crate) fn sample(
        &mut self,
        logits: &Tensor,
        gen: &ModelBundle,
        metrics: &Metrics,
        max_len: usize,
    ) -> Option<Finish> {
        if self.text.tokens().len() >= self.max_tokens {
            return Some(Finish::Done(FinishReason::Length));
        }
        let next = match self.sampler.sample(logits) {
            Ok(t) => t,
            Err(e) => return Some(Finish::Failed(EngineError::Model(e.to_string()))),
        };
        if gen.eos_token_ids.contains(&next) {
            return Some(Finish::Done(FinishReason::Stop));
        }
        let piece = match self.text.push(&gen.tokenizer, next) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return Some(Finish::Failed(EngineError::Model(e.to_string()))),
        };
        Metrics::add(&metrics.tokens_generated, 1);
        let _ = self.tx.send(Event::Token { id: next, text: piece });
        if self.text.tokens().len() >= self.max_tokens || self.cache.len() >= max_len {
            return Some(Finish::Done(FinishReason::Length));
        }
        self.next = Some(next);
        None
    }
}

impl State {
    /// Ends the sequences whose callers went away (dropping a stream cancels).
    pub(crate) fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].tx.is_closed() {
                let seq = self.active.swap_remove(i);
                self.finish(seq, Finish::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// Folds a step's outcome back into its sequences: findings, contexts, the
    /// next token of every sequence that has logits, and the finished ones.
    pub(crate) fn update(&mut self, work: Vec<Work>, out: kframe_model::Result<Stepped>) {
        // Which row of the logits each sequence samples from: decoders, and
        // prefillers whose prompt is now all in.
        let mut rows: Vec<Option<usize>> = vec![None; self.active.len()];
        let mut finished: Vec<(usize, Finish)> = Vec::new();
        let fed: Vec<usize> = work.iter().map(|w| w.seq).collect();
        for (row, Work { seq: i, tokens, prompt }) in work.into_iter().enumerate() {
            let seq = &mut self.active[i];
            record_findings(&self.metrics, seq);
            // This sequence's own work failed; the others in the step go on.
            if let Some(e) = out.as_ref().ok().and_then(|o| o.failed[row].as_ref()) {
                finished.push((i, Finish::Failed(EngineError::Model(e.to_string()))));
                continue;
            }
            if prompt {
                Metrics::add(&self.metrics.prompt_tokens_prefilled, tokens.len() as u64);
                seq.context.extend_from_slice(&tokens);
                if !seq.unfilled.is_empty() || out.is_err() {
                    continue;
                }
                let ttft = seq.started.elapsed();
                Metrics::add(&self.metrics.ttft_micros_sum, ttft.as_micros() as u64);
                Metrics::add(&self.metrics.ttft_count, 1);
            } else {
                seq.context.push(seq.next.take().expect("decoding sequences have a token"));
            }
            rows[i] = Some(row);
        }
        // Sampling and detokenizing are per sequence: spread over the compute threads.
        let (gen, metrics, max_len) = (&self.gen, &*self.metrics, self.shape.max_len);
        finished.extend(match &out {
            // The step as a whole failed: every sequence in it fails (its cache may
            // hold part of the step).
            Err(e) => fed.into_iter().map(|i| (i, Finish::Failed(EngineError::Model(e.to_string())))).collect(),
            Ok(step) => (self.active.par_iter_mut().zip(rows).enumerate())
                .filter_map(|(i, (seq, row))| {
                    let outcome = match step.logits.get(row?) {
                        Ok(l) => seq.sample(&l, gen, metrics, max_len),
                        Err(e) => Some(Finish::Failed(EngineError::Model(e.to_string()))),
                    };
                    outcome.map(|f| (i, f))
                })
                .collect::<Vec<_>>(),
        });
        self.finish_all(finished);
    }

    /// Ends the sequences at these indices of `active`.
    pub(crate) fn finish_all(&mut self, mut finished: Vec<(usize, Finish)>) {
        // Highest index first, so swap_remove leaves the others' indices valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, f) in finished {
            let seq = self.active.swap_remove(i);
            self.finish(seq, f);
        }
    }

    /// Ends a sequence: its cache goes back to its session (or is dropped, and
    /// zeroed), the ledger and metrics are updated, then the caller hears.
    pub(crate) fn finish(&mut self, mut seq: Seq, how: Finish) {
        self.now += 1;
        seq.usage.completion_tokens = seq.text.tokens().len();
        let tail = match &how {
            Finish::Done(_) => seq.text.finish(&self.gen.tokenizer).ok().flatten(),
            _ => None,
        };
        self.ledger.in_flight -= seq.reserved;
        let tenant = seq.tenant.id;
        let keep = !matches!(how, Finish::Failed(_)) && !seq.discard_session;
        match (seq.session, keep) {
            (Some(key), true) => {
                // Give back the room reserved for tokens never generated.
                let _ = seq.cache.shrink_to_fit();
                let bytes = seq.cache.allocated_bytes() as u64;
                self.ledger.charge(tenant, bytes as i64 - seq.reserved as i64);
                let tokens = seq.context.len() as u32;
                let (entry, new) =
                    self.sessions.checkin(key, tenant, seq.tenant.epoch, std::mem::take(&mut seq.context), seq.cache);
                if new {
                    self.policies.on_insert(Entry {
                        id: entry,
                        tenant,
                        bytes,
                        tokens,
                        pinned: false,
                        inserted: self.now,
                    });
                } else {
                    self.policies.on_resize(entry, bytes, tokens);
                    self.policies.on_pin(entry, false);
                    self.policies.on_hit(entry, self.now);
                }
            }
            _ => {
                self.ledger.charge(tenant, -(seq.reserved as i64));
                if let Some(entry) = seq.entry {
                    // A failed run leaves the session's cache in doubt: drop it.
                    self.sessions.remove(entry);
                    self.policies.on_remove(entry);
                }
                // Dropping `seq.cache` zeroes it.
            }
        }
        self.publish();
        match how {
            Finish::Done(finish) => {
                if let Some(rest) = tail {
                    // Text held back for an incomplete character, flushed as is.
                    let _ = seq.tx.send(Event::Text(rest));
                }
                Metrics::add(&self.metrics.requests_finished, 1);
                let _ = seq.tx.send(Event::Done { finish, usage: seq.usage, isolation: seq.isolation });
            }
            Finish::Failed(e) => {
                Metrics::add(&self.metrics.requests_failed, 1);
                let _ = seq.tx.send(Event::Failed(e));
            }
            Finish::Cancelled => {}
        }
    }
}

/// Tokens `cached` shares with the start of `prompt`, leaving at least one prompt
/// token to run (its logits start the generation).
/// Moves what the corrective layer found in a sequence's cache during the last
/// forward pass into its report and the engine's metrics.
fn record_findings(metrics: &Metrics, seq: &mut Seq) {
    let findings = seq.cache.take_findings();
    seq.isolation.add(&findings);
    Metrics::add(&metrics.blocks_verified, findings.blocks_verified);
    Metrics::add(&metrics.pad_overflow, findings.pad_overflow);
    metrics.record_events(findings.events);
}
