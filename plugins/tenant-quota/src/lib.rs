//! Per-tenant byte quota, then LRU inside a tenant: victims come from whichever
//! tenant is furthest over its quota (`quota=BYTES`, default 64 MiB), its least
//! recently used entry first, so no tenant holds more than its share while
//! others wait.
use kframe_policy_sdk::{config_number, register_eviction, EntryTable, EvictionPolicy, Tracked};
use std::collections::BTreeMap;

struct TenantQuota {
    table: EntryTable,
    quota: u64,
}

impl Default for TenantQuota {
    fn default() -> Self {
        Self { table: EntryTable::default(), quota: 64 << 20 }
    }
}

impl EvictionPolicy for TenantQuota {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.quota = config_number(config, "quota", 64 << 20)?;
        Ok(())
    }
    fn table(&mut self) -> &mut EntryTable {
        &mut self.table
    }
    fn victims(&mut self, bytes_needed: u64, _now: u64) -> Vec<u64> {
        let mut held: BTreeMap<u64, u64> = BTreeMap::new();
        let mut lru: BTreeMap<u64, Vec<&Tracked>> = BTreeMap::new();
        for t in self.table.iter() {
            *held.entry(t.entry.tenant).or_default() += t.entry.bytes;
            if !t.entry.pinned {
                lru.entry(t.entry.tenant).or_default().push(t);
            }
        }
        for list in lru.values_mut() {
            // Least recent last, so pop() takes it.
            list.sort_by_key(|t| std::cmp::Reverse((t.last_used, t.entry.id)));
        }
        let (mut freed, mut out) = (0, Vec::new());
        while freed < bytes_needed {
            // The tenant most over quota (or, when none is, holding the most).
            let Some(tenant) = lru
                .iter()
                .filter(|(_, l)| !l.is_empty())
                .max_by_key(|(tenant, _)| (held[*tenant] as i128 - self.quota as i128, std::cmp::Reverse(**tenant)))
                .map(|(tenant, _)| *tenant)
            else {
                break;
            };
            let t = lru.get_mut(&tenant).and_then(Vec::pop).expect("non-empty");
            freed += t.entry.bytes;
            *held.get_mut(&tenant).expect("counted") -= t.entry.bytes;
            out.push(t.entry.id);
        }
        out
    }
}

register_eviction!(TenantQuota);
