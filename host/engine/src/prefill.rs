//! Prefilling a shared prefix: once, in the model's own frame, sealed, charged
//! to no tenant; again on demand after eviction.

use crate::api::{EngineError, PrefixInfo};
use crate::metrics::Metrics;
use crate::prefixes::{PrefixSlot, PREFIX_ENTRY};
use crate::state::State;
use kframe_core::cache::{KvCache, SharedPrefix};
use kframe_core::layout::Layout;
use kframe_core::rotation::Frame;
use kframe_policy::Entry;
use std::sync::Arc;
use std::time::Instant;

impl State {
    /// The longest registered prefix that the prompt starts with and goes beyond.
    pub(crate) fn prefix_for(&self, prompt: &[u32]) -> Option<Arc<SharedPrefix>> {
        self.prefixes
            .iter()
            .filter_map(|p| p.shared.as_ref())
            .filter(|p| p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|p| p.tokens.len())
            .cloned()
    }

    /// Prefills again an evicted prefix that `prompt` starts with (and that covers
    /// more than `reuse` tokens), if there is room; otherwise the request prefills
    /// those tokens itself.
    pub(crate) fn reload_prefix_for(&mut self, prompt: &[u32], reuse: usize) {
        let dormant = self
            .prefixes
            .iter()
            .filter(|p| p.shared.is_none() && p.tokens.len() > reuse)
            .filter(|p| p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|p| p.tokens.len())
            .map(|p| p.tokens.clone());
        if let Some(tokens) = dormant {
            if let Err(e) = self.register_prefix(tokens) {
                tracing::debug!("an evicted shared prefix stays evicted: {e}");
            }
        }
    }

    pub(crate) fn register_prefix(&mut self, tokens: Vec<u32>) -> Result<PrefixInfo, EngineError> {
        let cfg = self.gen.model.config();
        let mut h = blake3::Hasher::new_derive_key("kframe shared prefix v1");
        for n in [cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim] {
            h.update(&(n as u64).to_le_bytes());
        }
        for t in &tokens {
            h.update(&t.to_le_bytes());
        }
        let id = *h.finalize().as_bytes();
        let slot = self.prefixes.iter().position(|p| p.id == id);
        let info = |p: &PrefixSlot| PrefixInfo {
            id: blake3::Hash::from(p.id).to_hex().to_string(),
            tokens: p.tokens.len(),
            bytes: p.bytes,
        };
        if let Some(p) = slot.map(|i| &self.prefixes[i]).filter(|p| p.shared.is_some()) {
            return Ok(info(p));
        }
        self.validate(&tokens)?;
        // Room first: a prefix that does not fit is not prefilled for nothing.
        let plain = Layout::plain(self.shape.layers);
        let bytes = KvCache::bytes_for(self.shape, &plain, self.store_dtype(), tokens.len()) as u64;
        if self.ledger.used + bytes > self.cfg.kv_budget && !self.make_room(bytes) {
            return Err(EngineError::OverBudget { needed: bytes, budget: self.cfg.kv_budget });
        }
        let mut cache = self.gen.model.new_cache(self.cfg.precision);
        let t0 = Instant::now();
        cache
            .seal_with(self.tag_key.clone(), &Frame::Identity)
            .map_err(kframe_model::Error::from)
            .and_then(|()| self.gen.model.forward(&tokens, &mut cache, &Frame::Identity, self.cfg.variant))
            .and_then(|_| Ok(cache.shrink_to_fit()?))
            .map_err(|e| EngineError::Model(e.to_string()))?;
        Metrics::add(&self.metrics.compute_micros, t0.elapsed().as_micros() as u64);
        debug_assert_eq!(bytes, cache.allocated_bytes() as u64);
        // Shared prefixes are the operator's: charged to no tenant (entry tenant 0).
        self.ledger.used += bytes;
        self.now += 1;
        let shared = Some(Arc::new(SharedPrefix { id, tokens: tokens.clone(), cache }));
        let index = match slot {
            Some(i) => {
                self.prefixes[i].shared = shared;
                i
            }
            None => {
                let entry = PREFIX_ENTRY + self.prefixes.len() as u64;
                self.prefixes.push(PrefixSlot { entry, id, tokens, shared, bytes, pinned: false });
                self.prefixes.len() - 1
            }
        };
        let p = &mut self.prefixes[index];
        p.bytes = bytes;
        p.pinned = false;
        let entry =
            Entry { id: p.entry, tenant: 0, bytes, tokens: p.tokens.len() as u32, pinned: false, inserted: self.now };
        self.policies.on_insert(entry);
        let out = info(&self.prefixes[index]);
        self.publish();
        Ok(out)
    }

    /// Tells the eviction policy which prefixes are in use now: referenced by a
    /// running sequence or a session's cache besides the registry.
    pub(crate) fn refresh_prefix_pins(&mut self) {
        for p in &mut self.prefixes {
            let Some(shared) = &p.shared else { continue };
            let pinned = Arc::strong_count(shared) > 1;
            if pinned != p.pinned {
                p.pinned = pinned;
                self.policies.on_pin(p.entry, pinned);
            }
        }
    }
}
