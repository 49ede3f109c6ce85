//! The seam between the registry and where it keeps its data: [`Store`], the
//! records and change sets that cross it, and the errors it reports.
//!
//! A store holds the durable truth and a version that grows with every write.
//! It never caches; the [`Registry`](crate::Registry) in front of it does, and
//! asks the store only for what changed since the version it last saw.

use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// What the registry keeps of a tenant. The api key itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Public and never reused; api keys carry it, so a router can hash on it.
    pub id: u64,
    pub name: String,
    pub epoch: u64,
    pub tier: u8,
    /// Hex of the keyed hash of the tenant's api key.
    pub key_hash: String,
    pub created_unix: u64,
    /// What the tenant's frames are derived from, with the master secret and the
    /// epoch (see the crate docs). Empty in records written before key ids
    /// existed; the embedded store fills it in when it opens.
    #[serde(default)]
    pub key_id: String,
}

/// A tenant as the caller asks for it; the store gives it its id.
#[derive(Debug, Clone)]
pub struct NewTenant {
    pub name: String,
    pub tier: u8,
    pub key_hash: [u8; 32],
    pub key_id: String,
    pub created_unix: u64,
}

/// An operator's policy component, kept so that every replica, and every
/// restart, runs the same policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub name: String,
    pub config: String,
    pub wasm: Vec<u8>,
}

impl PolicyRecord {
    /// Hex sha256 of the component's bytes: what an operator compares with the
    /// file they built, and how a replica tells it already runs this component.
    pub fn sha256(&self) -> String {
        hex(&sha2::Sha256::digest(&self.wasm))
    }
}

/// What changed after some version, up to `version`.
#[derive(Debug, Default)]
pub struct Delta {
    pub version: u64,
    /// The whole registry: whatever the caller holds that is not here is gone.
    pub complete: bool,
    /// Tenants created or changed, as they are now.
    pub tenants: Vec<TenantRecord>,
    /// Ids of tenants deleted.
    pub deleted: Vec<u64>,
    /// Policy kinds (their WIT world names) set, or with `None` cleared.
    pub policies: Vec<(String, Option<PolicyRecord>)>,
    /// Prefixes registered, in order.
    pub prefixes: Vec<String>,
}

/// Where the registry keeps its data. Every write is one transaction that bumps
/// the version; a write that fails has changed nothing.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Where the data lives, for messages (never a password).
    fn describe(&self) -> String;

    /// The current version: cheap, for polling.
    async fn version(&self) -> Result<u64, RegistryError>;

    /// Everything that changed after `since`, or with `None` the whole registry.
    async fn changes(&self, since: Option<u64>) -> Result<Delta, RegistryError>;

    /// Creates a tenant at epoch 0; [`RegistryError::Exists`] if the name is taken.
    async fn create(&self, tenant: NewTenant) -> Result<TenantRecord, RegistryError>;

    /// Removes a tenant and every epoch it held, for good.
    async fn delete(&self, name: &str) -> Result<TenantRecord, RegistryError>;

    /// Moves a tenant to its next epoch and returns it as it is now. Concurrent
    /// calls (from any replica) each get their own epoch: none is lost or repeated.
    async fn bump_epoch(&self, name: &str) -> Result<TenantRecord, RegistryError>;

    /// Records (or with `None`, clears) the component for a policy kind.
    async fn set_policy(&self, kind: &str, policy: Option<&PolicyRecord>) -> Result<(), RegistryError>;

    /// Remembers a registered shared prefix, once.
    async fn add_prefix(&self, text: &str) -> Result<(), RegistryError>;

    /// Starts telling `listening` of other writers' changes as they commit, if the
    /// store can; a store only this process writes returns false.
    fn listen(&self, listening: Arc<Listening>) -> bool {
        let _ = listening;
        false
    }
}

/// A store's notifications: a wake-up per committed change, and whether the
/// notification connection is up (while it is down, changes arrive by polling).
#[derive(Debug, Default)]
pub struct Listening {
    pub changed: tokio::sync::Notify,
    pub connected: AtomicBool,
    /// Times the notification connection was (re)established.
    pub connects: AtomicU64,
    /// How long to wait before reconnecting a lost notification connection.
    pub retry: std::sync::Mutex<std::time::Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("tenant `{0}` already exists")]
    Exists(String),
    #[error("no tenant `{0}`")]
    NotFound(String),
    #[error("invalid tenant name `{0}`: use 1 to 64 of A-Z a-z 0-9 _ . -, other than `.` and `..`")]
    InvalidName(String),
    /// The store cannot be reached now; nothing was written. Retry later.
    #[error("tenant registry {store} is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    #[error("tenant registry {store}: {reason}")]
    Storage { store: String, reason: String },
    #[error("{0}")]
    Config(String),
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
