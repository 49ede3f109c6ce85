//! The native policies that decide whenever a plugin cannot: admit if the cache
//! has room, evict least recently used (`kframe_entries::EntryTable::lru_victims`),
//! verify every layer.

use crate::bindings::types::{Admission, LayerGate, Load, ModelShape, Request};

/// Admit while the budget has room, queue while the queue does, else reject.
pub fn admit(req: &Request, load: &Load) -> Admission {
    if load.cache_bytes + req.bytes_needed <= load.cache_budget {
        Admission::Admit
    } else if load.queued < load.queue_limit {
        Admission::Queue
    } else {
        Admission::Reject("server at capacity".into())
    }
}

/// Verify every layer, rotation on everywhere.
pub fn gates(shape: &ModelShape) -> Vec<LayerGate> {
    (0..shape.layers).map(|l| LayerGate { verify: true, rotate: true, pad: l == 0 }).collect()
}
