//! Least recently used: evicts the entries whose last hit (or insertion) is oldest.
use kframe_policy_sdk::{register_eviction, EntryTable, EvictionPolicy};

#[derive(Default)]
struct Lru(EntryTable);

impl EvictionPolicy for Lru {
    fn table(&mut self) -> &mut EntryTable {
        &mut self.0
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        self.0.lowest_first(bytes_needed, |t| t.last_used)
    }
}

register_eviction!(Lru);
