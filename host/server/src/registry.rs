//! The durable tenant registry: tenants, their hashed api keys and key epochs, the
//! operator's policy components and registered prefixes, in one redb file under
//! the data directory.
//!
//! Every change is one committed (fsynced) write transaction before the caller
//! hears of it, so a restart or a kill -9 loses no tenant and no epoch. Lookups
//! go to an in-memory mirror loaded at open; the database is only written.
//!
//! An api key is 32 random bytes shown once, as `kf-<64 hex>`. The registry keeps
//! only `blake3::keyed_hash(K, key)` with K derived from the master secret, so the
//! database alone lets nobody authenticate, and a leaked database with another
//! server's master secret matches nothing.
//!
//! A tenant's frames are derived from its `key_id`, 128 random bits drawn when it
//! is created, never from its name: a name deleted and created again is another
//! tenant, with other frames, and whatever the old one left behind (a swapped-out
//! page, a core dump) stays unreadable to it. Its numeric id, from a counter that
//! only grows, is never reused either. Tenants created before key ids existed keep
//! the frames they have: their key id is their name, the derivation input they
//! were created with (key ids of new tenants start with `t:`, which no name holds).

use kframe_core::keys::MasterSecret;
use kframe_engine::Tenant;
use kframe_policy::PolicyKind;
use rand::TryRngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use zeroize::Zeroizing;

/// name -> JSON [`TenantRecord`]
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// counter name -> value
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// policy kind -> JSON [`PolicyRecord`]
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
/// prefix text, in registration order: index -> text
const PREFIXES: TableDefinition<u64, &str> = TableDefinition::new("prefixes");

pub const DATABASE_FILE: &str = "kframe.redb";
const API_KEY_CONTEXT: &str = "kframe api key hash v1";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("tenant `{0}` already exists")]
    Exists(String),
    #[error("no tenant `{0}`")]
    NotFound(String),
    #[error("invalid tenant name `{0}`: use 1 to 64 of A-Z a-z 0-9 _ . -, other than `.` and `..`")]
    InvalidName(String),
    #[error("tenant database {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
}

/// What the registry stores for a tenant. The api key itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: u64,
    pub name: String,
    pub epoch: u64,
    pub tier: u8,
    /// Hex of the keyed hash of the tenant's api key.
    pub key_hash: String,
    pub created_unix: u64,
    /// What the tenant's frames are derived from (see the module docs). Empty in
    /// records written before key ids existed; `Registry::open` fills it in.
    #[serde(default)]
    pub key_id: String,
}

impl TenantRecord {
    pub fn tenant(&self) -> Tenant {
        Tenant { id: self.id, key_id: self.key_id.clone(), epoch: self.epoch, tier: self.tier }
    }
}

/// A new tenant's frame identity: `t:` and 128 random bits in hex.
fn new_key_id() -> String {
    format!("t:{}", &random_token("")[..32])
}

/// An operator's policy component, kept so that a restart runs the same policies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub name: String,
    pub config: String,
    pub wasm: Vec<u8>,
}

#[derive(Default)]
struct Mirror {
    by_name: HashMap<String, TenantRecord>,
    /// key hash -> tenant name
    by_key: HashMap<[u8; 32], String>,
    /// numeric id -> tenant name
    by_id: HashMap<u64, String>,
}

pub struct Registry {
    db: Database,
    path: PathBuf,
    hash_key: Zeroizing<[u8; 32]>,
    mirror: RwLock<Mirror>,
}

impl Registry {
    /// Opens (or creates) `DATA_DIR/kframe.redb` and loads every tenant.
    pub fn open(data_dir: &Path, master: &MasterSecret) -> Result<Self, RegistryError> {
        let path = data_dir.join(DATABASE_FILE);
        let storage = |e: &dyn std::fmt::Display| RegistryError::Storage { path: path.clone(), reason: e.to_string() };
        std::fs::create_dir_all(data_dir).map_err(|e| storage(&e))?;
        let db = Database::create(&path).map_err(|e| storage(&e))?;
        // Create the tables, so that reads never meet a missing one.
        let tx = db.begin_write().map_err(|e| storage(&e))?;
        {
            tx.open_table(TENANTS).map_err(|e| storage(&e))?;
            tx.open_table(COUNTERS).map_err(|e| storage(&e))?;
            tx.open_table(POLICIES).map_err(|e| storage(&e))?;
            tx.open_table(PREFIXES).map_err(|e| storage(&e))?;
        }
        tx.commit().map_err(|e| storage(&e))?;
        let registry = Self { db, path, hash_key: master.derive(API_KEY_CONTEXT), mirror: RwLock::default() };
        registry.load()?;
        Ok(registry)
    }

    fn storage(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Storage { path: self.path.clone(), reason: e.to_string() }
    }

    fn load(&self) -> Result<(), RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let mut mirror = Mirror::default();
        let mut migrated = Vec::new();
        for row in table.iter().map_err(|e| self.storage(e))? {
            let (_, value) = row.map_err(|e| self.storage(e))?;
            let mut record: TenantRecord = serde_json::from_slice(value.value()).map_err(|e| self.storage(e))?;
            if record.key_id.is_empty() {
                // Created before key ids: keep the frames it has.
                record.key_id = record.name.clone();
                migrated.push(record.clone());
            }
            let hash = decode_hash(&record.key_hash).ok_or_else(|| self.storage("a tenant's key hash is not hex"))?;
            mirror.by_key.insert(hash, record.name.clone());
            mirror.by_id.insert(record.id, record.name.clone());
            mirror.by_name.insert(record.name.clone(), record);
        }
        drop((table, tx));
        if !migrated.is_empty() {
            let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
            for record in &migrated {
                self.put(&tx, record)?;
            }
            tx.commit().map_err(|e| self.storage(e))?;
            tracing::info!(tenants = migrated.len(), "registry migrated: existing tenants keep their frames");
        }
        *self.mirror.write().expect("registry lock") = mirror;
        Ok(())
    }

    fn hash(&self, api_key: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.hash_key, api_key.as_bytes()).as_bytes()
    }

    /// Creates a tenant and returns it with its api key, which is never shown again.
    pub fn create(&self, name: &str, tier: u8) -> Result<(TenantRecord, Zeroizing<String>), RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_owned()));
        }
        let mut mirror = self.mirror.write().expect("registry lock");
        if mirror.by_name.contains_key(name) {
            return Err(RegistryError::Exists(name.to_owned()));
        }
        let api_key = new_api_key();
        let hash = self.hash(&api_key);
        let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
        let record = {
            let mut counters = tx.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            let id = counters.get("next_tenant_id").map_err(|e| self.storage(e))?.map(|v| v.value()).unwrap_or(1);
            counters.insert("next_tenant_id", id + 1).map_err(|e| self.storage(e))?;
            let record = TenantRecord {
                id,
                name: name.to_owned(),
                epoch: 0,
                tier,
                key_hash: hex(&hash),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                key_id: new_key_id(),
            };
            self.put(&tx, &record)?;
            record
        };
        tx.commit().map_err(|e| self.storage(e))?;
        mirror.by_key.insert(hash, name.to_owned());
        mirror.by_id.insert(record.id, name.to_owned());
        mirror.by_name.insert(name.to_owned(), record.clone());
        Ok((record, api_key))
    }

    fn put(&self, tx: &redb::WriteTransaction, record: &TenantRecord) -> Result<(), RegistryError> {
        let mut tenants = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let json = serde_json::to_vec(record).expect("a tenant record serializes");
        tenants.insert(record.name.as_str(), json.as_slice()).map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// The tenant an api key belongs to. The lookup is by keyed hash, so its
    /// timing depends on the hash, not on how much of a key matched.
    pub fn authenticate(&self, api_key: &str) -> Option<TenantRecord> {
        let hash = self.hash(api_key);
        let mirror = self.mirror.read().expect("registry lock");
        mirror.by_key.get(&hash).and_then(|name| mirror.by_name.get(name)).cloned()
    }

    pub fn get(&self, name: &str) -> Option<TenantRecord> {
        self.mirror.read().expect("registry lock").by_name.get(name).cloned()
    }

    /// The tenant with numeric id `id`, as it is now: None once it is deleted (ids
    /// are never reused, so a name created again is not found under the old id).
    pub fn get_by_id(&self, id: u64) -> Option<TenantRecord> {
        let mirror = self.mirror.read().expect("registry lock");
        mirror.by_id.get(&id).and_then(|name| mirror.by_name.get(name)).cloned()
    }

    pub fn list(&self) -> Vec<TenantRecord> {
        let mut all: Vec<_> = self.mirror.read().expect("registry lock").by_name.values().cloned().collect();
        all.sort_by_key(|t| t.id);
        all
    }

    pub fn len(&self) -> usize {
        self.mirror.read().expect("registry lock").by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the tenant and its api key for good.
    pub fn delete(&self, name: &str) -> Result<TenantRecord, RegistryError> {
        let mut mirror = self.mirror.write().expect("registry lock");
        let record = mirror.by_name.get(name).cloned().ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
        tx.open_table(TENANTS).map_err(|e| self.storage(e))?.remove(name).map_err(|e| self.storage(e))?;
        tx.commit().map_err(|e| self.storage(e))?;
        mirror.by_name.remove(name);
        mirror.by_key.retain(|_, n| n != name);
        mirror.by_id.remove(&record.id);
        Ok(record)
    }

    /// Moves the tenant to its next key epoch; returns (before, after).
    pub fn bump_epoch(&self, name: &str) -> Result<(TenantRecord, TenantRecord), RegistryError> {
        let mut mirror = self.mirror.write().expect("registry lock");
        let before = mirror.by_name.get(name).cloned().ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let after = TenantRecord { epoch: before.epoch + 1, ..before.clone() };
        let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
        self.put(&tx, &after)?;
        tx.commit().map_err(|e| self.storage(e))?;
        mirror.by_name.insert(name.to_owned(), after.clone());
        Ok((before, after))
    }

    /// Records (or with `None`, forgets) the operator's component for `kind`.
    pub fn set_policy(&self, kind: PolicyKind, policy: Option<&PolicyRecord>) -> Result<(), RegistryError> {
        let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
        {
            let mut table = tx.open_table(POLICIES).map_err(|e| self.storage(e))?;
            let key = kind.world();
            match policy {
                Some(p) => {
                    let json = serde_json::to_vec(p).expect("a policy record serializes");
                    table.insert(key, json.as_slice()).map_err(|e| self.storage(e))?;
                }
                None => {
                    table.remove(key).map_err(|e| self.storage(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.storage(e))
    }

    pub fn policies(&self) -> Result<Vec<(PolicyKind, PolicyRecord)>, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = tx.open_table(POLICIES).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for kind in PolicyKind::ALL {
            if let Some(v) = table.get(kind.world()).map_err(|e| self.storage(e))? {
                out.push((kind, serde_json::from_slice(v.value()).map_err(|e| self.storage(e))?));
            }
        }
        Ok(out)
    }

    /// Remembers a registered shared prefix (its text), once.
    pub fn add_prefix(&self, text: &str) -> Result<(), RegistryError> {
        if self.prefixes()?.iter().any(|p| p == text) {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.storage(e))?;
        {
            let mut table = tx.open_table(PREFIXES).map_err(|e| self.storage(e))?;
            let next = table.last().map_err(|e| self.storage(e))?.map_or(0, |(k, _)| k.value() + 1);
            table.insert(next, text).map_err(|e| self.storage(e))?;
        }
        tx.commit().map_err(|e| self.storage(e))
    }

    pub fn prefixes(&self) -> Result<Vec<String>, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = tx.open_table(PREFIXES).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.storage(e))? {
            let (_, v) = row.map_err(|e| self.storage(e))?;
            out.push(v.value().to_owned());
        }
        Ok(out)
    }
}

/// 1 to 64 of A-Z a-z 0-9 _ . -, and not `.` or `..`: a name a URL path carries
/// unchanged (clients normalise dot segments away).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && name != "."
        && name != ".."
}

/// A fresh random token: `prefix` then 64 hex digits (256 bits).
pub fn random_token(prefix: &str) -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.try_fill_bytes(bytes.as_mut()).expect("the operating system's random source failed");
    Zeroizing::new(format!("{prefix}{}", hex(bytes.as_ref())))
}

fn new_api_key() -> Zeroizing<String> {
    random_token("kf-")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Registry {
        Registry::open(dir, &MasterSecret::from_bytes([3; 32])).unwrap()
    }

    #[test]
    fn tenants_keys_and_epochs_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, key) = {
            let r = open(dir.path());
            let (alice, key) = r.create("alice", 1).unwrap();
            r.create("bob", 0).unwrap();
            r.bump_epoch("alice").unwrap();
            r.delete("bob").unwrap();
            (alice, key)
        };
        let r = open(dir.path());
        let found = r.authenticate(&key).unwrap();
        assert_eq!((found.id, found.epoch, found.tier), (alice.id, 1, 1));
        assert!(r.get("bob").is_none());
        // Ids are never reused, even after a delete.
        assert!(r.create("carol", 0).unwrap().0.id > alice.id + 1);
    }

    #[test]
    fn the_database_holds_no_api_key_and_another_master_secret_matches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let key = open(dir.path()).create("alice", 0).unwrap().1;
        let bytes = std::fs::read(dir.path().join(DATABASE_FILE)).unwrap();
        let raw = key.trim_start_matches("kf-").as_bytes();
        assert!(!bytes.windows(raw.len()).any(|w| w == raw));
        let other = Registry::open(dir.path(), &MasterSecret::from_bytes([4; 32])).unwrap();
        assert!(other.authenticate(&key).is_none());
    }

    #[test]
    fn bad_names_duplicates_and_unknown_tenants_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path());
        assert!(matches!(r.create("", 0), Err(RegistryError::InvalidName(_))));
        assert!(matches!(r.create("a b", 0), Err(RegistryError::InvalidName(_))));
        r.create("a", 0).unwrap();
        assert!(matches!(r.create("a", 0), Err(RegistryError::Exists(_))));
        assert!(matches!(r.delete("zed"), Err(RegistryError::NotFound(_))));
        assert!(r.authenticate("kf-00").is_none());
    }

    #[test]
    fn a_name_created_again_gets_a_new_key_id_and_id_and_the_old_id_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path());
        let (old, _) = r.create("carol", 0).unwrap();
        r.delete("carol").unwrap();
        let (new, _) = r.create("carol", 0).unwrap();
        assert!(old.key_id.starts_with("t:") && old.key_id.len() == 34, "{}", old.key_id);
        assert_ne!(old.key_id, new.key_id);
        assert_ne!(old.id, new.id);
        assert!(r.get_by_id(old.id).is_none());
        assert_eq!(r.get_by_id(new.id).unwrap().key_id, new.key_id);
    }

    #[test]
    fn a_tenant_written_before_key_ids_keeps_its_name_as_its_key_id_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = open(dir.path());
            let (mut record, _) = r.create("dave", 0).unwrap();
            // As an older kframe wrote it: no key id.
            record.key_id = String::new();
            let mut json: serde_json::Value = serde_json::to_value(&record).unwrap();
            json.as_object_mut().unwrap().remove("key_id");
            let tx = r.db.begin_write().unwrap();
            tx.open_table(TENANTS).unwrap().insert("dave", serde_json::to_vec(&json).unwrap().as_slice()).unwrap();
            tx.commit().unwrap();
        }
        let r = open(dir.path());
        assert_eq!(r.get("dave").unwrap().key_id, "dave", "the frames it was created with");
        drop(r);
        assert_eq!(open(dir.path()).get("dave").unwrap().key_id, "dave", "written back");
    }

    #[test]
    fn dot_names_are_refused_as_a_url_path_would_not_carry_them() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path());
        for name in [".", ".."] {
            assert!(matches!(r.create(name, 0), Err(RegistryError::InvalidName(_))), "{name}");
        }
        r.create("a.b", 0).unwrap();
    }
}
