//! kframe-registry: who the tenants are. Tenants, the keyed hashes of their api
//! keys, their key epochs, the operator's policy components and registered
//! prefixes, behind one [`Store`] trait with two backends:
//!
//! - [`EmbeddedStore`]: a redb file under the data directory, the default (one
//!   machine, nothing to install);
//! - [`PostgresStore`]: one PostgreSQL database shared by every replica
//!   (`--registry postgres://...`), changes announced with `NOTIFY`.
//!
//! [`Registry`] sits in front of a store with an in-memory mirror: lookups (every
//! request authenticates) never touch the store, so a replica keeps serving its
//! known tenants while the database is away. Writes go to the store first and
//! reach the mirror through [`Registry::sync`], the same path that brings in
//! other replicas' changes, as a list of [`Change`]s the server applies to its
//! engine.
//!
//! # Api keys
//!
//! An api key is `kf_<tenant id>_<64 hex>`: 32 random bytes shown once, after
//! the tenant's public id, so that a router can send a tenant to the same
//! replica before anyone authenticates. The registry keeps only
//! `blake3::keyed_hash(K, secret)` with K derived from the master secret, so the
//! database alone lets nobody authenticate, and a leaked database with another
//! deployment's master secret matches nothing. Keys issued before the id was in
//! them (`kf-<64 hex>`) keep working.
//!
//! # Frames
//!
//! A tenant's frames are derived from its `key_id`, 128 random bits drawn when it
//! is created, never from its name: a name deleted and created again is another
//! tenant, with other frames. Its numeric id is never reused either. Tenants
//! created before key ids existed keep their name as key id, the derivation
//! input they were created with (new key ids start with `t:`, which no name holds).

mod embedded;
mod postgres;
mod store;

pub use embedded::{EmbeddedStore, DATABASE_FILE};
pub use postgres::{PostgresStore, CHANNEL};
use store::now_unix;
pub use store::{hex, Delta, Listening, NewTenant, PolicyRecord, RegistryError, Store, TenantRecord};

use kframe_core::keys::MasterSecret;
use rand::TryRngCore;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

const API_KEY_CONTEXT: &str = "kframe api key hash v1";

/// What a sync found changed, for the server to apply to its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created(TenantRecord),
    /// The tenant moved on from `before.epoch` to `after.epoch` (by one or more).
    Rekeyed {
        before: TenantRecord,
        after: TenantRecord,
    },
    Deleted(TenantRecord),
    /// The component for a policy kind (its WIT world name) is now this, or none.
    Policy {
        kind: String,
        now: Option<PolicyRecord>,
    },
    Prefix(String),
}

/// A write's result and every change the sync after it brought in (its own and
/// any other writer's since the last sync).
#[derive(Debug)]
pub struct Synced<T> {
    pub value: T,
    pub changes: Vec<Change>,
}

#[derive(Default)]
struct Mirror {
    version: u64,
    by_name: HashMap<String, TenantRecord>,
    /// key hash -> tenant name
    by_key: HashMap<[u8; 32], String>,
    /// numeric id -> tenant name
    by_id: HashMap<u64, String>,
    policies: BTreeMap<String, PolicyRecord>,
    prefixes: Vec<String>,
}

impl Mirror {
    fn remove(&mut self, id: u64) -> Option<TenantRecord> {
        let name = self.by_id.remove(&id)?;
        let record = self.by_name.remove(&name)?;
        if let Some(hash) = decode_hash(&record.key_hash) {
            self.by_key.remove(&hash);
        }
        Some(record)
    }

    fn insert(&mut self, record: TenantRecord) {
        if let Some(hash) = decode_hash(&record.key_hash) {
            self.by_key.insert(hash, record.name.clone());
        }
        self.by_id.insert(record.id, record.name.clone());
        self.by_name.insert(record.name.clone(), record);
    }

    fn apply(&mut self, delta: Delta) -> Vec<Change> {
        let mut changes = Vec::new();
        let deleted: Vec<u64> = if delta.complete {
            let present: HashSet<u64> = delta.tenants.iter().map(|t| t.id).collect();
            self.by_id.keys().filter(|id| !present.contains(id)).copied().collect()
        } else {
            delta.deleted
        };
        for id in deleted {
            if let Some(record) = self.remove(id) {
                changes.push(Change::Deleted(record));
            }
        }
        for record in delta.tenants {
            match self.by_name.get(&record.name).cloned() {
                Some(old) if old.id == record.id => {
                    if record.epoch > old.epoch {
                        changes.push(Change::Rekeyed { before: old, after: record.clone() });
                        self.insert(record);
                    }
                }
                Some(old) => {
                    // The name was deleted and created again: another tenant.
                    self.remove(old.id);
                    changes.push(Change::Deleted(old));
                    changes.push(Change::Created(record.clone()));
                    self.insert(record);
                }
                None => {
                    changes.push(Change::Created(record.clone()));
                    self.insert(record);
                }
            }
        }
        if delta.complete {
            let present: HashSet<&String> = delta.policies.iter().map(|(k, _)| k).collect();
            let gone: Vec<String> = self.policies.keys().filter(|k| !present.contains(k)).cloned().collect();
            for kind in gone {
                self.policies.remove(&kind);
                changes.push(Change::Policy { kind, now: None });
            }
        }
        for (kind, now) in delta.policies {
            if self.policies.get(&kind) == now.as_ref() {
                continue;
            }
            match &now {
                Some(p) => self.policies.insert(kind.clone(), p.clone()),
                None => self.policies.remove(&kind),
            };
            changes.push(Change::Policy { kind, now });
        }
        for text in delta.prefixes {
            if !self.prefixes.contains(&text) {
                self.prefixes.push(text.clone());
                changes.push(Change::Prefix(text));
            }
        }
        self.version = self.version.max(delta.version);
        changes
    }
}

/// A store with an in-memory mirror in front. One per server.
pub struct Registry {
    store: Box<dyn Store>,
    hash_key: Zeroizing<[u8; 32]>,
    mirror: RwLock<Mirror>,
    /// One sync at a time, so that changes are found, and applied, once and in order.
    syncing: tokio::sync::Mutex<()>,
}

impl Registry {
    /// The registry in `store`, loaded whole into the mirror.
    pub async fn open(store: Box<dyn Store>, master: &MasterSecret) -> Result<Self, RegistryError> {
        let delta = store.changes(None).await?;
        let registry = Self {
            store,
            hash_key: master.derive(API_KEY_CONTEXT),
            mirror: RwLock::default(),
            syncing: tokio::sync::Mutex::new(()),
        };
        registry.mirror.write().expect("registry lock").apply(delta);
        Ok(registry)
    }

    /// The embedded registry in `DATA_DIR/kframe.redb`.
    pub async fn open_embedded(data_dir: &Path, master: &MasterSecret) -> Result<Self, RegistryError> {
        Self::open(Box::new(EmbeddedStore::open(data_dir)?), master).await
    }

    /// `postgres://...` opens the shared registry there (this replica's connections
    /// named `replica`); anything else is refused.
    pub async fn open_url(url: &str, replica: &str, master: &MasterSecret) -> Result<Self, RegistryError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(RegistryError::Config(format!(
                "registry `{}`: kframe's shared registry is PostgreSQL, postgres://user:password@host:port/database",
                redact(url)
            )));
        }
        Self::open(Box::new(PostgresStore::connect(url, replica).await?), master).await
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The store's version as of the last sync.
    pub fn version(&self) -> u64 {
        self.mirror.read().expect("registry lock").version
    }

    /// The store's version now (a round trip to it).
    pub async fn store_version(&self) -> Result<u64, RegistryError> {
        self.store.version().await
    }

    /// Starts the store's notifications, if it has any (see [`Store::listen`]).
    pub fn listen(&self, retry: std::time::Duration) -> Option<Arc<Listening>> {
        let listening = Arc::new(Listening::default());
        *listening.retry.lock().expect("retry lock") = retry;
        self.store.listen(listening.clone()).then_some(listening)
    }

    /// Brings the mirror up to the store's version and says what changed.
    pub async fn sync(&self) -> Result<Vec<Change>, RegistryError> {
        let _one = self.syncing.lock().await;
        let since = self.version();
        let delta = self.store.changes(Some(since)).await?;
        Ok(self.mirror.write().expect("registry lock").apply(delta))
    }

    async fn synced<T>(&self, value: T) -> Result<Synced<T>, RegistryError> {
        let changes = match self.sync().await {
            Ok(changes) => changes,
            // The write committed; the next sync brings it in.
            Err(e) => {
                tracing::warn!("registry sync after a write: {e}");
                Vec::new()
            }
        };
        Ok(Synced { value, changes })
    }

    fn hash(&self, secret: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.hash_key, secret.as_bytes()).as_bytes()
    }

    /// Creates a tenant and returns it with its api key, which is never shown again.
    pub async fn create(
        &self,
        name: &str,
        tier: u8,
    ) -> Result<Synced<(TenantRecord, Zeroizing<String>)>, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_owned()));
        }
        let secret = random_hex();
        let new = NewTenant {
            name: name.to_owned(),
            tier,
            key_hash: self.hash(&secret),
            key_id: format!("t:{}", &random_hex()[..32]),
            created_unix: now_unix(),
        };
        let record = self.store.create(new).await?;
        let key = Zeroizing::new(format!("kf_{}_{}", record.id, secret.as_str()));
        self.synced((record, key)).await
    }

    /// The tenant an api key belongs to. The lookup is by keyed hash, so its
    /// timing depends on the hash, not on how much of a key matched.
    pub fn authenticate(&self, api_key: &str) -> Option<TenantRecord> {
        let (claimed, hash) = match api_key.strip_prefix("kf_").and_then(|rest| rest.split_once('_')) {
            Some((id, secret)) => (Some(id.parse::<u64>().ok()?), self.hash(secret)),
            // Issued before keys carried the tenant id: the whole key was hashed.
            None => (None, self.hash(api_key)),
        };
        let mirror = self.mirror.read().expect("registry lock");
        let record = mirror.by_key.get(&hash).and_then(|name| mirror.by_name.get(name))?;
        // The id a router hashed on must be the tenant's own.
        claimed.is_none_or(|id| id == record.id).then(|| record.clone())
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
    pub async fn delete(&self, name: &str) -> Result<Synced<TenantRecord>, RegistryError> {
        let record = self.store.delete(name).await?;
        self.synced(record).await
    }

    /// Moves the tenant to its next key epoch; returns it as it is now.
    pub async fn bump_epoch(&self, name: &str) -> Result<Synced<TenantRecord>, RegistryError> {
        let after = self.store.bump_epoch(name).await?;
        self.synced(after).await
    }

    /// Records (or with `None`, forgets) the operator's component for a policy
    /// kind, by its WIT world name.
    pub async fn set_policy(&self, kind: &str, policy: Option<&PolicyRecord>) -> Result<Synced<()>, RegistryError> {
        self.store.set_policy(kind, policy).await?;
        self.synced(()).await
    }

    /// The operator's components, by policy kind (WIT world name).
    pub fn policies(&self) -> Vec<(String, PolicyRecord)> {
        let mirror = self.mirror.read().expect("registry lock");
        mirror.policies.iter().map(|(k, p)| (k.clone(), p.clone())).collect()
    }

    /// Remembers a registered shared prefix (its text), once.
    pub async fn add_prefix(&self, text: &str) -> Result<Synced<()>, RegistryError> {
        self.store.add_prefix(text).await?;
        self.synced(()).await
    }

    pub fn prefixes(&self) -> Vec<String> {
        self.mirror.read().expect("registry lock").prefixes.clone()
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

/// 256 fresh random bits as 64 hex digits.
fn random_hex() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.try_fill_bytes(bytes.as_mut()).expect("the operating system's random source failed");
    Zeroizing::new(hex(bytes.as_ref()))
}

/// A fresh random token: `prefix` then 64 hex digits (256 bits).
pub fn random_token(prefix: &str) -> Zeroizing<String> {
    Zeroizing::new(format!("{prefix}{}", random_hex().as_str()))
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

/// A registry url with its password blanked, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_written_before_key_ids_and_key_ids_in_keys_keeps_its_frames_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterSecret::from_bytes([3; 32]);
        // A key as older kframes issued them: its whole text was hashed.
        let old_key = format!("kf-{}", "ab".repeat(32));
        let hash = blake3::keyed_hash(&master.derive(API_KEY_CONTEXT), old_key.as_bytes());
        let record = TenantRecord {
            id: 1,
            name: "dave".into(),
            epoch: 2,
            tier: 0,
            key_hash: hex(hash.as_bytes()),
            created_unix: 0,
            key_id: String::new(),
        };
        EmbeddedStore::open(dir.path()).unwrap().put_as_written_before_key_ids(&record);
        let r = Registry::open_embedded(dir.path(), &master).await.unwrap();
        let found = r.authenticate(&old_key).expect("an old key still authenticates");
        assert_eq!((found.id, found.epoch, found.key_id.as_str()), (1, 2, "dave"), "the frames it was created with");
        let (next, _) = r.create("erin", 0).await.unwrap().value;
        assert_eq!(next.id, 2, "the id counter carried on");
        drop(r);
        let r = Registry::open_embedded(dir.path(), &master).await.unwrap();
        assert_eq!(r.get("dave").unwrap().key_id, "dave", "written back");
    }
}
