//! Scheduling: which sequences run in the next step, with which tokens. The
//! scheduler decides and touches no tensor; [`crate::execute`] runs what it chose.

use crate::state::State;

/// One sequence's share of a step.
pub(crate) struct Work {
    /// Its index in the engine's running sequences.
    pub(crate) seq: usize,
    /// The tokens it feeds: a prompt chunk, or its decode token.
    pub(crate) tokens: Vec<u32>,
    /// Whether they are prompt tokens.
    pub(crate) prompt: bool,
}

impl State {
    /// Every sequence with work, up to `max_batch` of them, oldest first: a
    /// sequence with prompt left feeds its next chunk (`prefill_chunk` prompt tokens
    /// per step over all sequences, so that a long prompt does not stall everyone
    /// else's decoding), the others their decode token. In the order of the
    /// running sequences.
    pub(crate) fn schedule(&mut self) -> Vec<Work> {
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut work = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if work.len() >= self.cfg.max_batch.max(1) {
                break;
            }
            if !seq.unfilled.is_empty() {
                let n = seq.unfilled.len().min(budget);
                if n > 0 {
                    budget -= n;
                    work.push(Work { seq: i, tokens: seq.unfilled.drain(..n).collect(), prompt: true });
                }
            } else if let Some(token) = seq.next {
                work.push(Work { seq: i, tokens: vec![token], prompt: false });
            }
        }
        work
    }
}
