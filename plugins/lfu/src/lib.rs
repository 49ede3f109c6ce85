//! Least frequently used: evicts the entries with the fewest hits, the least
//! recently used first among equals.
use kframe_policy_sdk::{register_eviction, EntryTable, EvictionPolicy};

#[derive(Default)]
struct Lfu(EntryTable);

impl EvictionPolicy for Lfu {
    fn table(&mut self) -> &mut EntryTable {
        &mut self.0
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        self.0.lowest_first(bytes_needed, |t| (t.hits, t.last_used))
    }
}

register_eviction!(Lfu);
