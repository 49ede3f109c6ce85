//! Eviction: freeing idle sessions' and unused shared prefixes' cache bytes,
//! chosen by the eviction policy, until a request fits the budget, or a tenant's
//! own least recently used sessions until it fits its quota; and removing one
//! entry (evicted, deleted with its tenant, or ended by its tenant).

use crate::metrics::Metrics;
use crate::prefixes::PREFIX_ENTRY;
use crate::state::State;
use std::sync::Arc;

impl State {
    /// Evicts idle sessions until `needed` more bytes fit in the budget. False if
    /// they cannot.
    pub(crate) fn make_room(&mut self, needed: u64) -> bool {
        let budget = self.cfg.kv_budget;
        if self.ledger.used + needed <= budget {
            return true;
        }
        self.refresh_prefix_pins();
        let victims = self.policies.victims(self.ledger.used + needed - budget, self.now).value;
        for id in victims {
            self.remove_session(id, true);
        }
        self.ledger.used + needed <= budget
    }

    /// Removes an idle session: evicted for room, or deleted with its tenant.
    pub(crate) fn remove_session(&mut self, entry: u64, evicted: bool) {
        if entry >= PREFIX_ENTRY {
            // Only eviction removes a prefix, and only one nothing uses.
            let Some(p) = self.prefixes.iter_mut().find(|p| p.entry == entry) else { return };
            if let Some(shared) = p.shared.take() {
                if Arc::strong_count(&shared) > 1 {
                    p.shared = Some(shared); // in use after all: keep it
                    return;
                }
                self.ledger.used -= p.bytes;
                Metrics::add(&self.metrics.evictions, 1);
                tracing::debug!(entry, bytes = p.bytes, "shared prefix evicted");
                // Dropping `shared` zeroes the prefix's rows.
            }
            self.policies.on_remove(entry);
            return;
        }
        if let Some(s) = self.sessions.remove(entry) {
            if s.cache.is_some() {
                self.ledger.charge(s.tenant, -(s.bytes as i64));
                if evicted {
                    Metrics::add(&self.metrics.evictions, 1);
                    tracing::debug!(entry, tenant = s.tenant, bytes = s.bytes, "session evicted");
                }
            }
            // Dropping `s` zeroes its cache.
        }
        self.policies.on_remove(entry);
    }

    /// Evicts `tenant`'s own idle sessions, least recently used first, until
    /// `needed` more of its bytes fit its `quota`. False if they cannot.
    pub(crate) fn make_room_within_quota(&mut self, tenant: u64, needed: u64, quota: u64) -> bool {
        let held = |s: &Self| s.ledger.tenant_bytes.get(&tenant).copied().unwrap_or(0);
        if held(self) + needed <= quota {
            return true;
        }
        let victims = self.policies.tenant_lru_victims(tenant, held(self) + needed - quota);
        for id in victims {
            self.remove_session(id, true);
        }
        held(self) + needed <= quota
    }

    /// Ends a tenant's session by name (see `Engine::end_session`).
    pub(crate) fn end_session(&mut self, tenant: u64, name: &str) -> bool {
        let key = self.sessions.key(tenant, name);
        let running = self.active.iter_mut().find(|s| s.session == Some(key));
        let in_use = running.is_some();
        if let Some(seq) = running {
            seq.discard_session = true;
        }
        let stored = self.sessions.entry_of(&key);
        if let Some(entry) = stored {
            self.remove_session(entry, false);
        }
        self.publish();
        in_use || stored.is_some()
    }
}
