//! First in, first out: evicts the entries inserted earliest, however often they
//! are used, except that it never evicts an entry inserted less than `grace`
//! ticks ago while older ones remain (default 0). About as small as a kframe
//! eviction policy gets: the SDK keeps the entry table, this file ranks it.
use kframe_policy_sdk::{config_number, register_eviction, take_until, EntryTable, EvictionPolicy};

#[derive(Default)]
struct Fifo {
    table: EntryTable,
    grace: u64,
}

impl EvictionPolicy for Fifo {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.grace = config_number(config, "grace", 0)?;
        Ok(())
    }

    fn table(&mut self) -> &mut EntryTable {
        &mut self.table
    }

    fn victims(&mut self, bytes_needed: u64, now: u64) -> Vec<u64> {
        let mut order: Vec<_> = self.table.iter().filter(|t| !t.entry.pinned).collect();
        // Entries still in their grace period sort after all others.
        order.sort_by_key(|t| (now.saturating_sub(t.entry.inserted) < self.grace, t.entry.inserted, t.entry.id));
        take_until(order.into_iter(), bytes_needed)
    }
}

register_eviction!(Fifo);
