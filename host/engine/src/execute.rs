//! Execution: one forward pass over what the scheduler chose, every sequence in its
//! own cache and frame.

use crate::metrics::Metrics;
use crate::schedule::Work;
use crate::state::State;
use kframe_model::qwen2::{Chunk, Stepped};
use std::time::Instant;

impl State {
    /// Runs `work` (in the order of the running sequences) through the model as one
    /// batched step.
    pub(crate) fn execute(&mut self, work: &[Work]) -> kframe_model::Result<Stepped> {
        let t0 = Instant::now();
        let mut chunks: Vec<Chunk> = Vec::with_capacity(work.len());
        let mut feeds = work.iter().peekable();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if let Some(w) = feeds.next_if(|w| w.seq == i) {
                chunks.push(Chunk::new(&w.tokens, &mut seq.cache, &seq.frame));
            }
        }
        let out = self.gen.model.forward_chunks(&mut chunks, self.cfg.variant);
        drop(chunks);
        Metrics::add(&self.metrics.compute_micros, t0.elapsed().as_micros() as u64);
        let decoded = work.iter().filter(|w| !w.prompt).count();
        if decoded > 0 {
            Metrics::add(&self.metrics.decode_steps, 1);
            Metrics::set(&self.metrics.batch_size, decoded as u64);
        }
        out
    }
}
