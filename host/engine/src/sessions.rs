//! Tenants' cached conversations.
//!
//! A session is found by a lookup key that is a blake3 keyed hash of (tenant id,
//! session name) under a random per-process key: the same name under another
//! tenant is another key, so no request can hit, or time, a cache that is not its
//! own tenant's. While a request uses a session its cache is checked out (and its
//! eviction entry pinned); the tokens the cache holds travel with it, so the next
//! request reuses the longest matching prefix.

use kframe_core::cache::KvCache;
use rand::RngCore;
use std::collections::HashMap;

pub type SessionKey = [u8; 32];

pub struct Stored {
    /// The eviction policy's entry id.
    pub entry: u64,
    pub tenant: u64,
    /// The key epoch the cache is written in.
    pub epoch: u64,
    /// The tokens the cache holds, in order.
    pub tokens: Vec<u32>,
    /// `None` while a request has it checked out.
    pub cache: Option<KvCache>,
    /// Allocated bytes of the cache when it was checked in.
    pub bytes: u64,
}

/// What a request finds under its session key.
pub enum Checkout {
    /// No such session yet: it will be created when the request finishes.
    New,
    /// Another request holds it.
    Busy,
    /// The cache and the tokens it holds; the entry is now in use.
    Cached { entry: u64, epoch: u64, tokens: Vec<u32>, cache: KvCache, bytes: u64 },
}

pub struct Sessions {
    hash_key: [u8; 32],
    map: HashMap<SessionKey, Stored>,
    by_entry: HashMap<u64, SessionKey>,
    next_entry: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        let mut hash_key = [0u8; 32];
        rand::rng().fill_bytes(&mut hash_key);
        Self { hash_key, map: HashMap::new(), by_entry: HashMap::new(), next_entry: 1 }
    }
}

impl Sessions {
    pub fn key(&self, tenant: u64, name: &str) -> SessionKey {
        let mut h = blake3::Hasher::new_keyed(&self.hash_key);
        h.update(&tenant.to_le_bytes());
        h.update(name.as_bytes());
        *h.finalize().as_bytes()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn checkout(&mut self, key: &SessionKey) -> Checkout {
        match self.map.get_mut(key) {
            None => Checkout::New,
            Some(s) => match s.cache.take() {
                None => Checkout::Busy,
                Some(cache) => Checkout::Cached {
                    entry: s.entry,
                    epoch: s.epoch,
                    tokens: std::mem::take(&mut s.tokens),
                    cache,
                    bytes: s.bytes,
                },
            },
        }
    }

    /// Puts a cache (back) under `key`. Returns its entry id and whether the
    /// entry is new.
    pub fn checkin(
        &mut self,
        key: SessionKey,
        tenant: u64,
        epoch: u64,
        tokens: Vec<u32>,
        cache: KvCache,
    ) -> (u64, bool) {
        let bytes = cache.allocated_bytes() as u64;
        if let Some(s) = self.map.get_mut(&key) {
            s.epoch = epoch;
            s.tokens = tokens;
            s.cache = Some(cache);
            s.bytes = bytes;
            return (s.entry, false);
        }
        let entry = self.next_entry;
        self.next_entry += 1;
        self.map.insert(key, Stored { entry, tenant, epoch, tokens, cache: Some(cache), bytes });
        self.by_entry.insert(entry, key);
        (entry, true)
    }

    /// Removes an entry; its cache (if checked in) is zeroed as it drops.
    /// Returns the bytes it held.
    pub fn remove(&mut self, entry: u64) -> Option<Stored> {
        let key = self.by_entry.remove(&entry)?;
        self.map.remove(&key)
    }

    /// The entry id of the session under `key`, if there is one.
    pub fn entry_of(&self, key: &SessionKey) -> Option<u64> {
        self.map.get(key).map(|s| s.entry)
    }

    pub fn entries_of(&self, tenant: u64) -> Vec<u64> {
        self.map.values().filter(|s| s.tenant == tenant).map(|s| s.entry).collect()
    }

    pub fn get(&self, entry: u64) -> Option<&Stored> {
        self.by_entry.get(&entry).and_then(|k| self.map.get(k))
    }

    pub fn get_mut(&mut self, entry: u64) -> Option<&mut Stored> {
        self.by_entry.get(&entry).and_then(|k| self.map.get_mut(k))
    }
}
