//! Everything a request handler reads: the engine, the registry, the tokenizer
//! and chat template, the limits, the admin token's hash, the open sessions,
//! this replica's name.

use crate::openai::{self, ChatTemplate};
use kframe_core::keys::MasterSecret;
use kframe_engine::Engine;
use kframe_policy::PolicyKind;
use kframe_registry::{self as registry, Listening, Registry};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokenizers::Tokenizer;

/// What one client may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_tokens: usize,
    pub max_connections: usize,
    pub max_sessions_per_tenant: usize,
    /// A client must finish sending its headers, and its body, within these.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_tokens: 4096,
            max_connections: 1024,
            max_sessions_per_tenant: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("chat template: {0}")]
    Template(String),
    #[error("secret file {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("stored {kind} policy component `{name}` no longer loads: {reason}; start with --drop-unloadable-policies to serve without it (the native policy decides), or rebuild it for this kframe")]
    StoredPolicy { kind: PolicyKind, name: String, reason: String },
    #[error("stored prefix: {0}")]
    Prefix(String),
    #[error("replica name `{0}`: use 1 to 128 of A-Z a-z 0-9 - _ .")]
    Replica(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const ADMIN_HASH_CONTEXT: &str = "kframe admin token hash v1";
const SESSION_TAG_CONTEXT: &str = "kframe session id v1";

/// This server as one replica of several: its name, and how it keeps up with
/// changes other replicas write to a shared registry.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Sent with every response (`x-kframe-replica`), so that a client or a test
    /// sees where a router sent it. Letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// How often the registry's version is polled: notifications sent while this
    /// replica's listener was disconnected are lost, and the poll catches them.
    pub poll: Duration,
    /// How long a lost notification connection waits before reconnecting.
    pub listen_retry: Duration,
}

impl Default for Replica {
    fn default() -> Self {
        Self { name: "kframe".into(), poll: Duration::from_secs(1), listen_retry: Duration::from_secs(5) }
    }
}

impl Replica {
    /// The host's name (a pod's name on Kubernetes), else `kframe`.
    pub fn host_name() -> String {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| valid_replica_name(s))
            .unwrap_or_else(|| "kframe".into())
    }
}

pub fn valid_replica_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// What the metrics report of the registry's follower.
#[derive(Default)]
pub(crate) struct Counters {
    /// Syncs that brought changes in, by what started them: `write` (this
    /// replica's own), `notify` or `poll`.
    pub syncs: Mutex<BTreeMap<&'static str, u64>>,
    pub sync_failures: AtomicU64,
    pub policy_load_failures: AtomicU64,
    pub listening: OnceLock<Arc<Listening>>,
}

/// What this replica runs for a policy kind the registry names a component for.
#[derive(Debug, Clone)]
pub(crate) struct LoadedPolicy {
    pub sha256: String,
    /// Why the registry's component did not load here (the previous policy stays).
    pub error: Option<String>,
}

/// Everything a request handler reads. One per server.
pub struct App {
    pub engine: Engine,
    pub registry: Registry,
    pub replica: Replica,
    /// Shared with the blocking pool that tokenizes, off the async workers.
    pub tokenizer: Arc<Tokenizer>,
    /// The longest token of the vocabulary, in UTF-8 bytes: a text longer than this
    /// times the prompt limit cannot fit, and is refused before it is tokenized.
    pub(crate) max_token_bytes: usize,
    /// The most prompt tokens the engine admits (its own check decides; this
    /// sizes the byte check).
    pub(crate) max_prompt_tokens: usize,
    pub template: ChatTemplate,
    pub model_id: String,
    pub context_window: usize,
    pub limits: Limits,
    pub(crate) admin_hash: [u8; 32],
    pub(crate) admin_key: zeroize::Zeroizing<[u8; 32]>,
    /// Live sessions: id -> owning tenant id. A session is a handle the server
    /// issues; the engine keeps its cache (which eviction may drop at any time).
    pub(crate) sessions: Mutex<HashMap<String, u64>>,
    /// Session ids carry a tag only this deployment's master secret makes, so
    /// that a replica a tenant was moved to takes her session up (a cache miss).
    pub(crate) session_key: zeroize::Zeroizing<[u8; 32]>,
    /// Sessions ended here, refused if they come back.
    pub(crate) ended_sessions: Mutex<lru::LruCache<String, ()>>,
    /// Components loaded from the registry, by kind.
    pub(crate) loaded_policies: Mutex<HashMap<PolicyKind, LoadedPolicy>>,
    pub(crate) cluster: Counters,
    /// Re-keying takes this for writing, submitting for reading, so that no
    /// request reaches the engine in an epoch its sessions have already left.
    pub(crate) rekey: tokio::sync::RwLock<()>,
    pub(crate) draining: AtomicBool,
    pub(crate) responses: Mutex<BTreeMap<u16, u64>>,
}

/// What the server needs to know of the model the engine serves.
pub struct Served {
    /// The name `/v1/models` gives and requests may name.
    pub model_id: String,
    pub tokenizer: Tokenizer,
    /// The Jinja chat template (the model's, or the server's default).
    pub chat_template: Option<String>,
    pub context_window: usize,
    /// The most prompt tokens the engine is configured to admit.
    pub max_prompt_tokens: usize,
}

impl App {
    /// A server over `engine` (which it shares; an embedder may keep a handle),
    /// for the model `served` describes, with its tenants in `registry` and its
    /// admin token in `secrets_dir` (created there on first start if missing).
    pub fn new(
        engine: Engine,
        served: Served,
        master: &MasterSecret,
        secrets_dir: &Path,
        registry: Registry,
        replica: Replica,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        if !valid_replica_name(&replica.name) {
            return Err(ServerError::Replica(replica.name));
        }
        let template = ChatTemplate::new(served.chat_template.as_deref().unwrap_or(openai::DEFAULT_CHAT_TEMPLATE))
            .map_err(ServerError::Template)?;
        let admin_token = load_or_create_admin_token(secrets_dir)?;
        let admin_key = master.derive(ADMIN_HASH_CONTEXT);
        let admin_hash = *blake3::keyed_hash(&admin_key, admin_token.as_bytes()).as_bytes();
        let Served { model_id, tokenizer, context_window, max_prompt_tokens, .. } = served;
        let max_token_bytes = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self {
            engine,
            registry,
            replica,
            tokenizer: Arc::new(tokenizer),
            max_token_bytes,
            max_prompt_tokens: max_prompt_tokens.min(context_window.saturating_sub(1)),
            template,
            model_id,
            context_window,
            limits,
            admin_hash,
            admin_key,
            sessions: Mutex::default(),
            session_key: master.derive(SESSION_TAG_CONTEXT),
            ended_sessions: Mutex::new(lru::LruCache::new(NonZeroUsize::new(1 << 16).expect("non-zero"))),
            loaded_policies: Mutex::default(),
            cluster: Default::default(),
            rekey: tokio::sync::RwLock::new(()),
            draining: AtomicBool::new(false),
            responses: Mutex::default(),
        })
    }

    /// Brings back what the registry remembers: the operator's policy components
    /// and registered prefixes. A stored component that no longer loads (built for
    /// another WIT version, say) stops the start with its name, unless
    /// `drop_unloadable` says to serve without it: then it is reported, removed
    /// from the registry, and the native policy decides.
    pub async fn restore(&self, drop_unloadable: bool) -> Result<(), ServerError> {
        for (world, p) in self.registry.policies() {
            let Some(kind) = PolicyKind::ALL.into_iter().find(|k| k.world() == world) else {
                tracing::error!(kind = world, "the registry names a policy kind this kframe does not know");
                continue;
            };
            match self.engine.policies().swap(kind, &p.name, &p.wasm, &p.config) {
                Ok(()) => {
                    let loaded = LoadedPolicy { sha256: p.sha256(), error: None };
                    self.loaded_policies.lock().expect("policy lock").insert(kind, loaded);
                }
                Err(e) if !drop_unloadable => {
                    return Err(ServerError::StoredPolicy { kind, name: p.name, reason: e.failure.to_string() });
                }
                Err(e) => {
                    tracing::error!(%kind, plugin = p.name, "stored policy component no longer loads, dropped: {e}");
                    let _exclusive = self.rekey.write().await;
                    let synced = self.registry.set_policy(kind.world(), None).await?;
                    self.apply(synced.changes).await;
                }
            }
        }
        for text in self.registry.prefixes() {
            self.register_stored_prefix(&text).await?;
        }
        Ok(())
    }

    pub(crate) async fn register_stored_prefix(&self, text: &str) -> Result<(), ServerError> {
        let tokens = self.tokenizer.encode(text, false).map_err(|e| ServerError::Prefix(e.to_string()))?;
        if let Err(e) = self.engine.register_prefix(tokens.get_ids().to_vec()).await {
            tracing::error!("stored prefix could not be registered: {e}");
        }
        Ok(())
    }

    /// The 16 hex digits that end a session id issued to `tenant`: a keyed hash of
    /// the tenant and the id's random part, so that any replica of this deployment
    /// recognises the session as that tenant's and no tenant can forge one.
    pub(crate) fn session_tag(&self, tenant: u64, random: &str) -> String {
        let mut hasher = blake3::Hasher::new_keyed(&self.session_key);
        hasher.update(&tenant.to_le_bytes()).update(random.as_bytes());
        registry::hex(&hasher.finalize().as_bytes()[..8])
    }

    pub(crate) fn is_admin(&self, token: &str) -> bool {
        // blake3's Hash compares in constant time.
        blake3::keyed_hash(&self.admin_key, token.as_bytes()) == blake3::Hash::from_bytes(self.admin_hash)
    }

    pub(crate) fn count_response(&self, status: u16) {
        *self.responses.lock().expect("response counter lock").entry(status).or_default() += 1;
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Reads `DATA_DIR/admin.token` (refusing it if others can read it), creating it
/// (mode 0600) on first start.
fn load_or_create_admin_token(data_dir: &Path) -> Result<zeroize::Zeroizing<String>, ServerError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            // Held to the master secret's standard: a file others can read is refused.
            kframe_core::keys::check_private(&path)
                .map_err(|reason| ServerError::Secret { path: path.clone(), reason })?;
            Ok(zeroize::Zeroizing::new(s.trim().to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = registry::random_token("kfa-");
            kframe_core::keys::write_private(&path, token.as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(e.into()),
    }
}
