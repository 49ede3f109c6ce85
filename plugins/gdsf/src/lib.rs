//! GreedyDual-Size-Frequency (Cherkasova 1998): each entry has priority
//! H = L + frequency * cost / size, and the lowest H goes first. L, the
//! inflation value, rises to the priority of each evicted entry, so entries that
//! stop being used age out. With the default uniform cost, large entries are
//! evicted before small ones of the same frequency; `cost=tokens` weighs an entry
//! by the prefill it would take to rebuild it.
use kframe_policy_sdk::{config_pairs, register_eviction, Entry, EntryTable, EvictionPolicy};
use std::collections::BTreeMap;

#[derive(Default)]
struct Gdsf {
    table: EntryTable,
    inflation: f64,
    priority: BTreeMap<u64, f64>,
    cost_by_tokens: bool,
}

impl Gdsf {
    fn refresh(&mut self, id: u64) {
        if let Some(t) = self.table.get(id) {
            let cost = if self.cost_by_tokens { t.entry.tokens.max(1) as f64 } else { 1.0 };
            let h = self.inflation + (t.hits + 1) as f64 * cost / t.entry.bytes.max(1) as f64;
            self.priority.insert(id, h);
        }
    }
}

impl EvictionPolicy for Gdsf {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        for (k, v) in config_pairs(config) {
            match (k, v) {
                ("cost", "tokens") => self.cost_by_tokens = true,
                ("cost", "uniform") => self.cost_by_tokens = false,
                _ => return Err(format!("unknown setting {k}={v}")),
            }
        }
        Ok(())
    }
    fn table(&mut self) -> &mut EntryTable {
        &mut self.table
    }
    fn on_insert(&mut self, entry: Entry) {
        let id = entry.id;
        self.table.insert(entry.into());
        self.refresh(id);
    }
    fn on_hit(&mut self, id: u64, now: u64) {
        self.table.hit(id, now);
        self.refresh(id);
    }
    fn on_remove(&mut self, id: u64) {
        self.table.remove(id);
        self.priority.remove(&id);
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        let h = |id: u64| self.priority.get(&id).copied().unwrap_or(0.0);
        // f64 priorities are non-negative, so their bit patterns sort like them.
        let chosen = self.table.lowest_first(bytes_needed, |t| h(t.entry.id).to_bits());
        if let Some(max) = chosen.iter().map(|&id| h(id)).reduce(f64::max) {
            self.inflation = self.inflation.max(max);
        }
        chosen
    }
}

register_eviction!(Gdsf);
