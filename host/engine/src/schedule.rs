//! Scheduling: which sequences run in the next step, with which tokens. The
//! scheduler decides and touches no tensor; [`crate::execute`] runs what it chose.

use crate::state::State;
use std::collections::{BTreeMap, VecDeque};

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
    /// Up to `max_batch` sequences with work, taken from the tenants in turn (each
    /// tenant's in the order they were admitted; the first tenant moves on every
    /// step), so that one tenant's many requests cannot crowd out another's few. A
    /// sequence with prompt left feeds its next chunk (`prefill_chunk` prompt tokens
    /// per step over all sequences, shared in the same turns, so that a long prompt
    /// does not stall everyone else's decoding), the others their decode token.
    /// Returned in the order of the running sequences.
    pub(crate) fn schedule(&mut self) -> Vec<Work> {
        let mut queues: BTreeMap<u64, VecDeque<usize>> = BTreeMap::new();
        for (i, seq) in self.active.iter().enumerate() {
            if !seq.unfilled.is_empty() || seq.next.is_some() {
                queues.entry(seq.tenant.id).or_default().push_back(i);
            }
        }
        let mut tenants: Vec<u64> = queues.keys().copied().collect();
        if !tenants.is_empty() {
            let first = (self.turn % tenants.len() as u64) as usize;
            tenants.rotate_left(first);
        }
        self.turn += 1;
        let (max, mut budget) = (self.cfg.max_batch.max(1), self.cfg.prefill_chunk.max(1));
        let mut work = Vec::new();
        while work.len() < max && queues.values().any(|q| !q.is_empty()) {
            for t in &tenants {
                let Some(i) = queues.get_mut(t).and_then(VecDeque::pop_front) else { continue };
                let seq = &mut self.active[i];
                if !seq.unfilled.is_empty() {
                    let n = seq.unfilled.len().min(budget);
                    if n > 0 {
                        budget -= n;
                        work.push(Work { seq: i, tokens: seq.unfilled.drain(..n).collect(), prompt: true });
                    }
                } else if let Some(token) = seq.next {
                    work.push(Work { seq: i, tokens: vec![token], prompt: false });
                }
                if work.len() == max {
                    break;
                }
            }
        }
        work.sort_by_key(|w| w.seq);
        work
    }
}
