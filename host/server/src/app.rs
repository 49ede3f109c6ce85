//! Everything a request handler reads: the engine, the registry, the tokenizer
//! and chat template, the limits, the admin token's hash, the open sessions.

use crate::openai::{self, ChatTemplate};
use crate::registry::{self, Registry};
use kframe_core::keys::MasterSecret;
use kframe_engine::Engine;
use kframe_policy::PolicyKind;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const ADMIN_HASH_CONTEXT: &str = "kframe admin token hash v1";

/// Everything a request handler reads. One per server.
pub struct App {
    pub engine: Engine,
    pub registry: Registry,
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
    /// for the model `served` describes, keeping its registry and admin token in
    /// `data_dir`.
    pub fn new(
        engine: Engine,
        served: Served,
        master: &MasterSecret,
        data_dir: &Path,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let registry = Registry::open(data_dir, master)?;
        let template = ChatTemplate::new(served.chat_template.as_deref().unwrap_or(openai::DEFAULT_CHAT_TEMPLATE))
            .map_err(ServerError::Template)?;
        let admin_token = load_or_create_admin_token(data_dir)?;
        let admin_key = master.derive(ADMIN_HASH_CONTEXT);
        let admin_hash = *blake3::keyed_hash(&admin_key, admin_token.as_bytes()).as_bytes();
        let Served { model_id, tokenizer, context_window, max_prompt_tokens, .. } = served;
        let max_token_bytes = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self {
            engine,
            registry,
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
        for (kind, p) in self.registry.policies()? {
            if let Err(e) = self.engine.policies().swap(kind, &p.name, &p.wasm, &p.config) {
                if !drop_unloadable {
                    return Err(ServerError::StoredPolicy { kind, name: p.name, reason: e.failure.to_string() });
                }
                tracing::error!(%kind, plugin = p.name, "stored policy component no longer loads, dropped: {e}");
                self.registry.set_policy(kind, None)?;
            }
        }
        for text in self.registry.prefixes()? {
            let tokens = self.tokenizer.encode(text.as_str(), false).map_err(|e| ServerError::Prefix(e.to_string()))?;
            if let Err(e) = self.engine.register_prefix(tokens.get_ids().to_vec()).await {
                tracing::error!("stored prefix could not be registered: {e}");
            }
        }
        Ok(())
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
