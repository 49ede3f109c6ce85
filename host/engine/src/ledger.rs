//! The byte ledger: cache bytes allocated in all and per tenant.

use std::collections::HashMap;

/// Cache bytes the engine holds.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Allocated cache bytes: checked-in sessions, running sequences, shared prefixes.
    pub(crate) used: u64,
    /// Of `used`, the bytes running sequences hold (what eviction cannot free).
    pub(crate) in_flight: u64,
    /// Per tenant id: its sessions and running sequences (prefixes are the
    /// operator's and charged to no tenant).
    pub(crate) tenant_bytes: HashMap<u64, u64>,
}

impl Ledger {
    /// Adjusts the ledger by `delta` bytes for `tenant`.
    pub(crate) fn charge(&mut self, tenant: u64, delta: i64) {
        self.used = (self.used as i64 + delta) as u64;
        let t = self.tenant_bytes.entry(tenant).or_default();
        *t = (*t as i64 + delta) as u64;
        if *t == 0 {
            self.tenant_bytes.remove(&tenant);
        }
    }
}
