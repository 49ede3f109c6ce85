//! The shared store: one PostgreSQL database for every replica, through sqlx.
//!
//! The schema is in `migrations/`, embedded in the binary and applied at start
//! (sqlx takes an advisory lock, so replicas starting together apply it once).
//! Every write is one transaction: it bumps the single version row first (the
//! row lock orders writers, so versions commit in order), stamps what it changes
//! with that version, and `NOTIFY`s `kframe_registry` with it, which PostgreSQL
//! delivers only if the transaction commits.

use crate::store::{hex, now_unix, Delta, Listening, NewTenant, PolicyRecord, RegistryError, Store, TenantRecord};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The channel every write notifies, with the version it committed.
pub const CHANNEL: &str = "kframe_registry";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a request waits for a connection before the registry reports the
/// database unavailable (503) instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct PostgresStore {
    pool: PgPool,
    listen_options: PgConnectOptions,
    described: String,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and applies
    /// the migrations. `replica` names this replica's connections
    /// (`application_name`), so an operator sees who holds which.
    pub async fn connect(url: &str, replica: &str) -> Result<Self, RegistryError> {
        let options: PgConnectOptions = url.parse().map_err(|e| RegistryError::Config(format!("registry url: {e}")))?;
        let described =
            format!("postgres {}:{}/{}", options.get_host(), options.get_port(), options.get_database().unwrap_or(""));
        let unavailable =
            |e: &dyn std::fmt::Display| RegistryError::Unavailable { store: described.clone(), reason: e.to_string() };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone().application_name(&format!("kframe {replica}")))
            .await
            .map_err(|e| unavailable(&e))?;
        MIGRATOR.run(&pool).await.map_err(|e| RegistryError::Storage {
            store: described.clone(),
            reason: format!("applying the registry's migrations: {e}"),
        })?;
        let listen_options = options.application_name(&format!("kframe-listener {replica}"));
        Ok(Self { pool, listen_options, described })
    }

    fn error(&self, e: sqlx::Error) -> RegistryError {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Class 08: connection exceptions; 57P0x: the server is shutting down or starting.
            sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        };
        if unavailable {
            RegistryError::Unavailable { store: self.described.clone(), reason: e.to_string() }
        } else {
            RegistryError::Storage { store: self.described.clone(), reason: e.to_string() }
        }
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, RegistryError> {
        self.pool.begin().await.map_err(|e| self.error(e))
    }

    /// Takes the next version, holding the version row until `tx` ends, and
    /// queues the notification that announces it on commit.
    async fn bump(&self, tx: &mut Transaction<'static, Postgres>) -> Result<i64, RegistryError> {
        let version: i64 = sqlx::query_scalar("UPDATE registry_version SET version = version + 1 RETURNING version")
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| self.error(e))?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(version.to_string())
            .execute(&mut **tx)
            .await
            .map_err(|e| self.error(e))?;
        Ok(version)
    }

    async fn commit(&self, tx: Transaction<'static, Postgres>) -> Result<(), RegistryError> {
        tx.commit().await.map_err(|e| self.error(e))
    }

    fn tenant(&self, row: &PgRow) -> Result<TenantRecord, RegistryError> {
        let get_i64 = |c: &str| row.try_get::<i64, _>(c).map_err(|e| self.error(e));
        Ok(TenantRecord {
            id: get_i64("id")? as u64,
            name: row.try_get("name").map_err(|e| self.error(e))?,
            epoch: get_i64("epoch")? as u64,
            tier: row.try_get::<i16, _>("tier").map_err(|e| self.error(e))? as u8,
            key_hash: hex(&row.try_get::<Vec<u8>, _>("key_hash").map_err(|e| self.error(e))?),
            created_unix: get_i64("created_unix")? as u64,
            key_id: row.try_get("key_id").map_err(|e| self.error(e))?,
        })
    }

    fn policy(&self, row: &PgRow) -> Result<(String, Option<PolicyRecord>), RegistryError> {
        let kind: String = row.try_get("kind").map_err(|e| self.error(e))?;
        let wasm: Option<Vec<u8>> = row.try_get("wasm").map_err(|e| self.error(e))?;
        let record = match wasm {
            None => None,
            Some(wasm) => Some(PolicyRecord {
                name: row.try_get::<Option<String>, _>("name").map_err(|e| self.error(e))?.unwrap_or_default(),
                config: row.try_get::<Option<String>, _>("config").map_err(|e| self.error(e))?.unwrap_or_default(),
                wasm,
            }),
        };
        Ok((kind, record))
    }

    async fn record_epoch(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        record: &TenantRecord,
    ) -> Result<(), RegistryError> {
        sqlx::query("INSERT INTO key_epochs (tenant_id, epoch, since_unix) VALUES ($1, $2, $3)")
            .bind(record.id as i64)
            .bind(record.epoch as i64)
            .bind(now_unix() as i64)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

const TENANT_COLUMNS: &str = "id, name, key_id, epoch, tier, key_hash, created_unix";

#[async_trait::async_trait]
impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn version(&self) -> Result<u64, RegistryError> {
        let v: i64 = sqlx::query_scalar("SELECT version FROM registry_version")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(v as u64)
    }

    async fn changes(&self, since: Option<u64>) -> Result<Delta, RegistryError> {
        let mut tx = self.begin().await?;
        // One snapshot for the version and everything it covers.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM registry_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let since = since.filter(|&s| s <= version as u64);
        let after = since.map_or(-1, |s| s as i64);
        let mut delta = Delta { version: version as u64, complete: since.is_none(), ..Delta::default() };
        let rows = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE changed > $1 ORDER BY id"))
            .bind(after)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        delta.tenants = rows.iter().map(|r| self.tenant(r)).collect::<Result<_, _>>()?;
        if since.is_some() {
            let ids: Vec<i64> =
                sqlx::query_scalar("SELECT id FROM deleted_tenants WHERE changed > $1 ORDER BY changed")
                    .bind(after)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
            delta.deleted = ids.into_iter().map(|id| id as u64).collect();
        }
        let rows = sqlx::query("SELECT kind, name, config, wasm FROM policies WHERE changed > $1 ORDER BY kind")
            .bind(after)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        delta.policies = rows.iter().map(|r| self.policy(r)).collect::<Result<_, _>>()?;
        delta.prefixes = sqlx::query_scalar("SELECT text FROM prefixes WHERE changed > $1 ORDER BY id")
            .bind(after)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        self.commit(tx).await?;
        Ok(delta)
    }

    async fn create(&self, new: NewTenant) -> Result<TenantRecord, RegistryError> {
        let mut tx = self.begin().await?;
        let version = self.bump(&mut tx).await?;
        let row = sqlx::query(&format!(
            "INSERT INTO tenants (name, key_id, epoch, tier, key_hash, created_unix, changed) \
             VALUES ($1, $2, 0, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING RETURNING {TENANT_COLUMNS}"
        ))
        .bind(&new.name)
        .bind(&new.key_id)
        .bind(new.tier as i16)
        .bind(new.key_hash.as_slice())
        .bind(new.created_unix as i64)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let Some(row) = row else {
            return Err(RegistryError::Exists(new.name));
        };
        let record = self.tenant(&row)?;
        self.record_epoch(&mut tx, &record).await?;
        self.commit(tx).await?;
        Ok(record)
    }

    async fn delete(&self, name: &str) -> Result<TenantRecord, RegistryError> {
        let mut tx = self.begin().await?;
        let version = self.bump(&mut tx).await?;
        let row = sqlx::query(&format!("DELETE FROM tenants WHERE name = $1 RETURNING {TENANT_COLUMNS}"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        let record = self.tenant(&row.ok_or_else(|| RegistryError::NotFound(name.to_owned()))?)?;
        sqlx::query("INSERT INTO deleted_tenants (id, changed) VALUES ($1, $2)")
            .bind(record.id as i64)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        self.commit(tx).await?;
        Ok(record)
    }

    async fn bump_epoch(&self, name: &str) -> Result<TenantRecord, RegistryError> {
        let mut tx = self.begin().await?;
        let version = self.bump(&mut tx).await?;
        let row = sqlx::query(&format!(
            "UPDATE tenants SET epoch = epoch + 1, changed = $2 WHERE name = $1 RETURNING {TENANT_COLUMNS}"
        ))
        .bind(name)
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let record = self.tenant(&row.ok_or_else(|| RegistryError::NotFound(name.to_owned()))?)?;
        self.record_epoch(&mut tx, &record).await?;
        self.commit(tx).await?;
        Ok(record)
    }

    async fn set_policy(&self, kind: &str, policy: Option<&PolicyRecord>) -> Result<(), RegistryError> {
        let mut tx = self.begin().await?;
        let version = self.bump(&mut tx).await?;
        sqlx::query(
            "INSERT INTO policies (kind, name, config, wasm, sha256, changed) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (kind) DO UPDATE SET name = $2, config = $3, wasm = $4, sha256 = $5, changed = $6",
        )
        .bind(kind)
        .bind(policy.map(|p| p.name.clone()))
        .bind(policy.map(|p| p.config.clone()))
        .bind(policy.map(|p| p.wasm.clone()))
        .bind(policy.map(PolicyRecord::sha256))
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        self.commit(tx).await
    }

    async fn add_prefix(&self, text: &str) -> Result<(), RegistryError> {
        let known: Option<i64> = sqlx::query_scalar("SELECT id FROM prefixes WHERE text = $1")
            .bind(text)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if known.is_some() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        let version = self.bump(&mut tx).await?;
        sqlx::query("INSERT INTO prefixes (text, changed) VALUES ($1, $2) ON CONFLICT (text) DO NOTHING")
            .bind(text)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        self.commit(tx).await
    }

    fn listen(&self, listening: Arc<Listening>) -> bool {
        let options = self.listen_options.clone();
        let described = self.described.clone();
        tokio::spawn(async move {
            loop {
                match connect_listener(&options).await {
                    Ok(mut listener) => {
                        listening.connected.store(true, Ordering::SeqCst);
                        listening.connects.fetch_add(1, Ordering::SeqCst);
                        // Whatever committed while no listener was connected was
                        // announced to nobody: look.
                        listening.changed.notify_one();
                        loop {
                            match listener.try_recv().await {
                                Ok(Some(_)) => listening.changed.notify_one(),
                                // The connection is gone; so is anything sent meanwhile.
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!(store = described, "registry notifications: {e}");
                                    break;
                                }
                            }
                        }
                        listening.connected.store(false, Ordering::SeqCst);
                        tracing::warn!(store = described, "registry notification connection lost; polling covers it");
                    }
                    Err(e) => tracing::warn!(store = described, "registry notifications: cannot connect: {e}"),
                }
                let retry = *listening.retry.lock().expect("retry lock");
                tokio::time::sleep(retry).await;
            }
        });
        true
    }
}

async fn connect_listener(options: &PgConnectOptions) -> Result<PgListener, sqlx::Error> {
    let pool =
        PgPoolOptions::new().max_connections(1).acquire_timeout(ACQUIRE_TIMEOUT).connect_lazy_with(options.clone());
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
