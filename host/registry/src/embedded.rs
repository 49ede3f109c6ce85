//! The default store: one redb file under the data directory, for one machine
//! with nothing to install.
//!
//! Every write is one committed (fsynced) write transaction before the caller
//! hears of it, so a restart or a kill -9 loses no tenant and no epoch. Beside
//! the data it keeps a log, version -> what that version changed, so that
//! [`Store::changes`] reads only what is new.

use crate::store::{hex, Delta, NewTenant, PolicyRecord, RegistryError, Store, TenantRecord};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// name -> JSON [`TenantRecord`]
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
/// counter name -> value
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// policy kind -> JSON [`PolicyRecord`]
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
/// prefix text, in registration order: index -> text
const PREFIXES: TableDefinition<u64, &str> = TableDefinition::new("prefixes");
/// version -> what it changed: `t:<name>`, `d:<id>`, `p:<kind>` or `x:<prefix index>`
const LOG: TableDefinition<u64, &str> = TableDefinition::new("log");

pub const DATABASE_FILE: &str = "kframe.redb";

pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) `DATA_DIR/kframe.redb`.
    pub fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        let path = data_dir.join(DATABASE_FILE);
        let storage = |e: &dyn std::fmt::Display| RegistryError::Storage {
            store: path.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(data_dir).map_err(|e| storage(&e))?;
        let db = Database::create(&path).map_err(|e| storage(&e))?;
        let store = Self { db, path };
        // Create the tables, so that reads never meet a missing one.
        let tx = store.write()?;
        {
            tx.open_table(TENANTS).map_err(|e| store.storage(e))?;
            tx.open_table(COUNTERS).map_err(|e| store.storage(e))?;
            tx.open_table(POLICIES).map_err(|e| store.storage(e))?;
            tx.open_table(PREFIXES).map_err(|e| store.storage(e))?;
            tx.open_table(LOG).map_err(|e| store.storage(e))?;
        }
        tx.commit().map_err(|e| store.storage(e))?;
        store.give_old_tenants_key_ids()?;
        Ok(store)
    }

    fn storage(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Storage { store: self.path.display().to_string(), reason: e.to_string() }
    }

    fn write(&self) -> Result<redb::WriteTransaction, RegistryError> {
        self.db.begin_write().map_err(|e| self.storage(e))
    }

    /// Tenants created before key ids existed keep the frames they have: their key
    /// id is their name, the derivation input they were created with.
    fn give_old_tenants_key_ids(&self) -> Result<(), RegistryError> {
        let old: Vec<TenantRecord> = self.tenants()?.into_iter().filter(|t| t.key_id.is_empty()).collect();
        if old.is_empty() {
            return Ok(());
        }
        let tx = self.write()?;
        for mut record in old.iter().cloned() {
            record.key_id = record.name.clone();
            self.put(&tx, &record)?;
        }
        tx.commit().map_err(|e| self.storage(e))?;
        tracing::info!(tenants = old.len(), "registry migrated: existing tenants keep their frames");
        Ok(())
    }

    fn tenants(&self) -> Result<Vec<TenantRecord>, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.storage(e))? {
            let (_, value) = row.map_err(|e| self.storage(e))?;
            out.push(serde_json::from_slice(value.value()).map_err(|e| self.storage(e))?);
        }
        Ok(out)
    }

    fn put(&self, tx: &redb::WriteTransaction, record: &TenantRecord) -> Result<(), RegistryError> {
        let mut tenants = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let json = serde_json::to_vec(record).expect("a tenant record serializes");
        tenants.insert(record.name.as_str(), json.as_slice()).map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn get(&self, tx: &redb::WriteTransaction, name: &str) -> Result<Option<TenantRecord>, RegistryError> {
        let tenants = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let found = tenants.get(name).map_err(|e| self.storage(e))?;
        found.map(|v| serde_json::from_slice(v.value()).map_err(|e| self.storage(e))).transpose()
    }

    /// Takes the next version inside `tx` and logs what it changed.
    fn bump(&self, tx: &redb::WriteTransaction, entry: &str) -> Result<u64, RegistryError> {
        let mut counters = tx.open_table(COUNTERS).map_err(|e| self.storage(e))?;
        let version = counters.get("version").map_err(|e| self.storage(e))?.map_or(0, |v| v.value()) + 1;
        counters.insert("version", version).map_err(|e| self.storage(e))?;
        tx.open_table(LOG).map_err(|e| self.storage(e))?.insert(version, entry).map_err(|e| self.storage(e))?;
        Ok(version)
    }

    fn read_version(&self, tx: &redb::ReadTransaction) -> Result<u64, RegistryError> {
        let counters = tx.open_table(COUNTERS).map_err(|e| self.storage(e))?;
        Ok(counters.get("version").map_err(|e| self.storage(e))?.map_or(0, |v| v.value()))
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }

    async fn version(&self) -> Result<u64, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        self.read_version(&tx)
    }

    async fn changes(&self, since: Option<u64>) -> Result<Delta, RegistryError> {
        let tx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let version = self.read_version(&tx)?;
        let tenants = tx.open_table(TENANTS).map_err(|e| self.storage(e))?;
        let policies = tx.open_table(POLICIES).map_err(|e| self.storage(e))?;
        let prefixes = tx.open_table(PREFIXES).map_err(|e| self.storage(e))?;
        let tenant = |value: &[u8]| serde_json::from_slice::<TenantRecord>(value).map_err(|e| self.storage(e));
        let policy = |kind: &str| -> Result<Option<PolicyRecord>, RegistryError> {
            let found = policies.get(kind).map_err(|e| self.storage(e))?;
            found.map(|v| serde_json::from_slice(v.value()).map_err(|e| self.storage(e))).transpose()
        };
        let mut delta = Delta { version, ..Delta::default() };
        let Some(since) = since.filter(|&s| s <= version) else {
            delta.complete = true;
            for row in tenants.iter().map_err(|e| self.storage(e))? {
                delta.tenants.push(tenant(row.map_err(|e| self.storage(e))?.1.value())?);
            }
            for row in policies.iter().map_err(|e| self.storage(e))? {
                let (kind, _) = row.map_err(|e| self.storage(e))?;
                delta.policies.push((kind.value().to_owned(), policy(kind.value())?));
            }
            for row in prefixes.iter().map_err(|e| self.storage(e))? {
                delta.prefixes.push(row.map_err(|e| self.storage(e))?.1.value().to_owned());
            }
            return Ok(delta);
        };
        let log = tx.open_table(LOG).map_err(|e| self.storage(e))?;
        let (mut names, mut kinds) = (BTreeSet::new(), BTreeSet::new());
        for row in log.range(since + 1..).map_err(|e| self.storage(e))? {
            let (_, entry) = row.map_err(|e| self.storage(e))?;
            let entry = entry.value();
            let bad = || self.storage(format!("unreadable log entry `{entry}`"));
            match entry.split_once(':').ok_or_else(bad)? {
                ("t", name) => {
                    names.insert(name.to_owned());
                }
                ("d", id) => delta.deleted.push(id.parse().map_err(|_| bad())?),
                ("p", kind) => {
                    kinds.insert(kind.to_owned());
                }
                ("x", index) => {
                    let index: u64 = index.parse().map_err(|_| bad())?;
                    if let Some(text) = prefixes.get(index).map_err(|e| self.storage(e))? {
                        delta.prefixes.push(text.value().to_owned());
                    }
                }
                _ => return Err(bad()),
            }
        }
        for name in names {
            // Gone again since: its delete is in the log too.
            if let Some(v) = tenants.get(name.as_str()).map_err(|e| self.storage(e))? {
                delta.tenants.push(tenant(v.value())?);
            }
        }
        for kind in kinds {
            let now = policy(&kind)?;
            delta.policies.push((kind, now));
        }
        Ok(delta)
    }

    async fn create(&self, new: NewTenant) -> Result<TenantRecord, RegistryError> {
        let tx = self.write()?;
        if self.get(&tx, &new.name)?.is_some() {
            return Err(RegistryError::Exists(new.name));
        }
        let id = {
            let mut counters = tx.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            let id = counters.get("next_tenant_id").map_err(|e| self.storage(e))?.map_or(1, |v| v.value());
            counters.insert("next_tenant_id", id + 1).map_err(|e| self.storage(e))?;
            id
        };
        let record = TenantRecord {
            id,
            name: new.name,
            epoch: 0,
            tier: new.tier,
            key_hash: hex(&new.key_hash),
            created_unix: new.created_unix,
            key_id: new.key_id,
        };
        self.put(&tx, &record)?;
        self.bump(&tx, &format!("t:{}", record.name))?;
        tx.commit().map_err(|e| self.storage(e))?;
        Ok(record)
    }

    async fn delete(&self, name: &str) -> Result<TenantRecord, RegistryError> {
        let tx = self.write()?;
        let record = self.get(&tx, name)?.ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        tx.open_table(TENANTS).map_err(|e| self.storage(e))?.remove(name).map_err(|e| self.storage(e))?;
        self.bump(&tx, &format!("d:{}", record.id))?;
        tx.commit().map_err(|e| self.storage(e))?;
        Ok(record)
    }

    async fn bump_epoch(&self, name: &str) -> Result<TenantRecord, RegistryError> {
        let tx = self.write()?;
        let before = self.get(&tx, name)?.ok_or_else(|| RegistryError::NotFound(name.to_owned()))?;
        let after = TenantRecord { epoch: before.epoch + 1, ..before };
        self.put(&tx, &after)?;
        self.bump(&tx, &format!("t:{name}"))?;
        tx.commit().map_err(|e| self.storage(e))?;
        Ok(after)
    }

    async fn set_policy(&self, kind: &str, policy: Option<&PolicyRecord>) -> Result<(), RegistryError> {
        let tx = self.write()?;
        {
            let mut table = tx.open_table(POLICIES).map_err(|e| self.storage(e))?;
            match policy {
                Some(p) => {
                    let json = serde_json::to_vec(p).expect("a policy record serializes");
                    table.insert(kind, json.as_slice()).map_err(|e| self.storage(e))?;
                }
                None => {
                    table.remove(kind).map_err(|e| self.storage(e))?;
                }
            }
        }
        self.bump(&tx, &format!("p:{kind}"))?;
        tx.commit().map_err(|e| self.storage(e))
    }

    async fn add_prefix(&self, text: &str) -> Result<(), RegistryError> {
        let tx = self.write()?;
        let next = {
            let mut table = tx.open_table(PREFIXES).map_err(|e| self.storage(e))?;
            for row in table.iter().map_err(|e| self.storage(e))? {
                if row.map_err(|e| self.storage(e))?.1.value() == text {
                    return Ok(());
                }
            }
            let next = table.last().map_err(|e| self.storage(e))?.map_or(0, |(k, _)| k.value() + 1);
            table.insert(next, text).map_err(|e| self.storage(e))?;
            next
        };
        self.bump(&tx, &format!("x:{next}"))?;
        tx.commit().map_err(|e| self.storage(e))
    }
}

#[cfg(test)]
impl EmbeddedStore {
    /// Writes `record` as an older kframe did: without its key id.
    pub(crate) fn put_as_written_before_key_ids(&self, record: &TenantRecord) {
        let mut json = serde_json::to_value(record).unwrap();
        json.as_object_mut().unwrap().remove("key_id");
        let tx = self.db.begin_write().unwrap();
        tx.open_table(TENANTS)
            .unwrap()
            .insert(record.name.as_str(), serde_json::to_vec(&json).unwrap().as_slice())
            .unwrap();
        tx.open_table(COUNTERS).unwrap().insert("next_tenant_id", record.id + 1).unwrap();
        tx.commit().unwrap();
    }
}
