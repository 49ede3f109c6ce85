//! Segmented LRU: an entry hit at least once moves from the probationary segment
//! to the protected one, which holds at most `protected` percent of the cached
//! bytes (default 80); the protected segment's least recent entries overflow back
//! to probation. Victims come from probation first, each segment in LRU order.
use kframe_policy_sdk::{config_number, register_eviction, take_until, EntryTable, EvictionPolicy, Tracked};

struct Slru {
    table: EntryTable,
    protected_percent: u64,
}

impl Default for Slru {
    fn default() -> Self {
        Self { table: EntryTable::default(), protected_percent: 80 }
    }
}

impl EvictionPolicy for Slru {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.protected_percent = config_number(config, "protected", 80)?.min(100);
        Ok(())
    }
    fn table(&mut self) -> &mut EntryTable {
        &mut self.table
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        let total: u64 = self.table.iter().map(|t| t.entry.bytes).sum();
        let cap = total * self.protected_percent / 100;
        // Protected: re-used entries, most recent first, up to the cap.
        let mut reused: Vec<&Tracked> = self.table.iter().filter(|t| t.hits > 0).collect();
        reused.sort_by_key(|t| std::cmp::Reverse((t.last_used, t.entry.id)));
        let mut held = 0;
        let mut protected = std::collections::BTreeSet::new();
        for t in reused {
            if held + t.entry.bytes > cap {
                break;
            }
            held += t.entry.bytes;
            protected.insert(t.entry.id);
        }
        let mut order: Vec<&Tracked> = self.table.iter().filter(|t| !t.entry.pinned).collect();
        order.sort_by_key(|t| (protected.contains(&t.entry.id), t.last_used, t.entry.id));
        take_until(order.into_iter(), bytes_needed)
    }
}

register_eviction!(Slru);
