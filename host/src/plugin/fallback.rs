//! The native policies that decide whenever a plugin cannot: admit if the cache
//! has room, evict least recently used, verify every layer.

use super::{Admission, Entry, LayerGate, Load, ModelShape, Request};
use std::collections::BTreeMap;

/// A live cache entry as the host tracks it, independently of any plugin: the
/// source of truth for validating a plugin's victims, for the fallback, and for
/// rebuilding a fresh plugin instance.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub entry: Entry,
    pub hits: u64,
    pub last_used: u64,
}

#[derive(Debug, Default)]
pub struct EntryMirror {
    entries: BTreeMap<u64, Tracked>,
}

impl EntryMirror {
    pub fn insert(&mut self, entry: Entry) {
        let last_used = entry.inserted;
        self.entries.insert(entry.id, Tracked { entry, hits: 0, last_used });
    }
    pub fn hit(&mut self, id: u64, now: u64) {
        if let Some(t) = self.entries.get_mut(&id) {
            t.hits += 1;
            t.last_used = now;
        }
    }
    pub fn pin(&mut self, id: u64, pinned: bool) {
        if let Some(t) = self.entries.get_mut(&id) {
            t.entry.pinned = pinned;
        }
    }
    pub fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }
    pub fn get(&self, id: u64) -> Option<&Tracked> {
        self.entries.get(&id)
    }
    pub fn resize(&mut self, id: u64, bytes: u64, tokens: u32) {
        if let Some(t) = self.entries.get_mut(&id) {
            t.entry.bytes = bytes;
            t.entry.tokens = tokens;
        }
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Tracked> {
        self.entries.values()
    }

    /// Checks a plugin's victims: live, unpinned, distinct ids that free the bytes
    /// asked for (or every unpinned byte there is, when that is less).
    pub fn validate_victims(&self, ids: &[u64], bytes_needed: u64) -> Result<(), String> {
        if ids.len() > self.entries.len() {
            return Err(format!("{} victims named, {} entries exist", ids.len(), self.entries.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut freed = 0u64;
        for id in ids {
            let t = self.entries.get(id).ok_or_else(|| format!("unknown entry id {id}"))?;
            if t.entry.pinned {
                return Err(format!("entry {id} is pinned"));
            }
            if !seen.insert(*id) {
                return Err(format!("entry {id} named twice"));
            }
            freed += t.entry.bytes;
        }
        let available: u64 = self.entries.values().filter(|t| !t.entry.pinned).map(|t| t.entry.bytes).sum();
        let wanted = bytes_needed.min(available);
        if freed < wanted {
            return Err(format!("frees {freed} bytes, {wanted} needed"));
        }
        Ok(())
    }

    /// The native eviction choice: least recently used, unpinned, until freed.
    pub fn lru_victims(&self, bytes_needed: u64) -> Vec<u64> {
        let mut order: Vec<&Tracked> = self.entries.values().filter(|t| !t.entry.pinned).collect();
        order.sort_by_key(|t| (t.last_used, t.entry.id));
        let (mut freed, mut out) = (0, Vec::new());
        for t in order {
            if freed >= bytes_needed {
                break;
            }
            freed += t.entry.bytes;
            out.push(t.entry.id);
        }
        out
    }
}

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
