//! kframe-entries: the cache entries an eviction policy tracks, kept once for both
//! sides of the policy boundary.
//!
//! The host keeps its own table of live entries (the source of truth for checking
//! a policy's victims, for the native fallback and for replaying state into a
//! fresh policy instance); a policy component keeps the same table, fed by the
//! host's events, to choose victims from. Both use [`EntryTable`].
//!
//! # Dependencies
//!
//! None, so that it builds into the host and into wasm32-wasip2 components alike.

use std::collections::{BTreeMap, BTreeSet};

/// A cache entry (a session's cache, or a shared prefix) as policies see it: ids,
/// sizes and logical times, never content. The fields are those of the WIT
/// `entry` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub tenant: u64,
    pub bytes: u64,
    pub tokens: u32,
    /// Pinned entries are in use and must not be chosen.
    pub pinned: bool,
    /// Logical time of insertion.
    pub inserted: u64,
}

/// An entry with what use it has seen.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub entry: Entry,
    pub hits: u64,
    pub last_used: u64,
}

/// The live entries, their hits, last use and pin state.
#[derive(Debug, Default)]
pub struct EntryTable {
    entries: BTreeMap<u64, Tracked>,
}

impl EntryTable {
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

    pub fn resize(&mut self, id: u64, bytes: u64, tokens: u32) {
        if let Some(t) = self.entries.get_mut(&id) {
            t.entry.bytes = bytes;
            t.entry.tokens = tokens;
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    pub fn get(&self, id: u64) -> Option<&Tracked> {
        self.entries.get(&id)
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

    /// Unpinned entries in ascending order of `score` (ties by id), taken until
    /// they free `bytes_needed`.
    pub fn lowest_first<K: Ord>(&self, bytes_needed: u64, score: impl Fn(&Tracked) -> K) -> Vec<u64> {
        let mut candidates: Vec<&Tracked> = self.entries.values().filter(|t| !t.entry.pinned).collect();
        candidates.sort_by_key(|t| (score(t), t.entry.id));
        take_until(candidates.into_iter(), bytes_needed)
    }

    /// Least recently used first: the native eviction choice.
    pub fn lru_victims(&self, bytes_needed: u64) -> Vec<u64> {
        self.lowest_first(bytes_needed, |t| t.last_used)
    }

    /// [`Self::lru_victims`] among `tenant`'s entries only.
    pub fn lru_victims_of(&self, tenant: u64, bytes_needed: u64) -> Vec<u64> {
        let mut order: Vec<&Tracked> =
            self.entries.values().filter(|t| !t.entry.pinned && t.entry.tenant == tenant).collect();
        order.sort_by_key(|t| (t.last_used, t.entry.id));
        take_until(order.into_iter(), bytes_needed)
    }

    /// Checks a policy's victims: live, unpinned, distinct ids that free the bytes
    /// asked for (or every unpinned byte there is, when that is less).
    pub fn validate_victims(&self, ids: &[u64], bytes_needed: u64) -> Result<(), String> {
        if ids.len() > self.entries.len() {
            return Err(format!("{} victims named, {} entries exist", ids.len(), self.entries.len()));
        }
        let mut seen = BTreeSet::new();
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
}

/// Ids from `ordered` until their bytes reach `bytes_needed`.
pub fn take_until<'a>(ordered: impl Iterator<Item = &'a Tracked>, bytes_needed: u64) -> Vec<u64> {
    let mut freed = 0;
    let mut out = Vec::new();
    for t in ordered {
        if freed >= bytes_needed {
            break;
        }
        freed += t.entry.bytes;
        out.push(t.entry.id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, bytes: u64, inserted: u64) -> Entry {
        Entry { id, tenant: 1, bytes, tokens: 1, pinned: false, inserted }
    }

    #[test]
    fn least_recently_used_unpinned_entries_are_taken_until_they_free_enough() {
        let mut t = EntryTable::default();
        for (id, at) in [(1, 5), (2, 1), (3, 3)] {
            t.insert(entry(id, 10, at));
        }
        t.hit(2, 9);
        t.pin(3, true);
        assert_eq!(t.lru_victims(10), vec![1]);
        assert_eq!(t.lru_victims(15), vec![1, 2]);
        assert_eq!(t.lru_victims(100), vec![1, 2], "a pinned entry is never a victim");
        t.insert(Entry { tenant: 2, ..entry(4, 10, 0) });
        assert_eq!(t.lru_victims_of(2, 100), vec![4], "only the tenant's own");
    }

    #[test]
    fn victims_must_be_live_unpinned_distinct_and_free_what_was_asked() {
        let mut t = EntryTable::default();
        t.insert(entry(1, 10, 0));
        t.insert(entry(2, 10, 0));
        t.pin(2, true);
        assert!(t.validate_victims(&[1], 10).is_ok());
        assert!(t.validate_victims(&[1], 50).is_ok(), "all that is unpinned is enough");
        assert!(t.validate_victims(&[9], 1).unwrap_err().contains("unknown"));
        assert!(t.validate_victims(&[2], 1).unwrap_err().contains("pinned"));
        assert!(t.validate_victims(&[], 5).unwrap_err().contains("frees 0"));
    }
}
