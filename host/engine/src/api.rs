//! What crosses the engine's boundary: requests, the events a request's stream
//! carries, errors, settings, and the commands the handle sends the engine thread.

use crate::isolation::IsolationReport;
use kframe_core::cache::KvPrecision;
use kframe_model::generate::{FinishReason, SamplingParams};
use kframe_model::Variant;
use tokio::sync::{mpsc, oneshot};

/// A tenant as the engine sees it: the registry's numeric id (what policies see
/// and sessions are keyed by), the identity its frames are derived from, its key
/// epoch and its service tier. The engine never sees a tenant's name: a name can be
/// deleted and created again, and the new tenant must not get the old frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: u64,
    /// The frame identity: key material is derived from (master secret, this,
    /// epoch). Assigned once at creation and never reused.
    pub key_id: String,
    pub epoch: u64,
    pub tier: u8,
}

/// One request: a prompt for a tenant, optionally continuing one of its sessions.
#[derive(Debug, Clone)]
pub struct Submit {
    pub tenant: Tenant,
    /// A session name chosen by the client; only this tenant can reach it.
    pub session: Option<String>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the session's cache instead of prefilled.
    pub cached_tokens: usize,
}

/// What a request's stream carries: `Started` once it runs, tokens as they are
/// sampled, then exactly one `Done` or `Failed` (a request refused before it runs
/// gets only `Failed`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request started running: of its prompt, `cached_tokens` come from its
    /// session's cache (or a shared prefix). Before any token.
    Started {
        cached_tokens: usize,
    },
    Token {
        id: u32,
        text: String,
    },
    /// Text completed at the end without a new token (the rest of a character
    /// split across tokens).
    Text(String),
    Done {
        finish: FinishReason,
        usage: Usage,
        /// What the corrective layer checked while serving the request.
        isolation: IsolationReport,
    },
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The admission policy said no; the reason is its own.
    #[error("rejected by the admission policy: {0}")]
    Rejected(String),
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(u32),
    #[error("the request needs {needed} cache bytes; the budget is {budget}")]
    OverBudget { needed: u64, budget: u64 },
    /// Bigger than the tenant's cache quota: it can never run.
    #[error("the request needs {needed} cache bytes; the tenant may hold {quota}")]
    OverQuota { needed: u64, quota: u64 },
    #[error("the tenant has {limit} requests running or waiting, its limit")]
    TenantBusy { limit: u32 },
    #[error("the session is in use by another request")]
    SessionBusy,
    #[error("the session is in key epoch {session}, the request in {request}")]
    StaleEpoch { session: u64, request: u64 },
    #[error("the tenant was deleted")]
    TenantDeleted,
    #[error("invalid request: {0}")]
    Invalid(InvalidRequest),
    #[error("model error: {0}")]
    Model(String),
    #[error("the engine has shut down")]
    ShutDown,
}

/// Why a request cannot run at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The model refuses the prompt: empty, or an id outside the vocabulary.
    #[error("{0}")]
    Prompt(String),
    /// Longer than the engine admits (its limit, or the context window less one
    /// token for the answer).
    #[error("the prompt has {tokens} tokens; the limit is {limit}")]
    TooLong { tokens: usize, limit: usize },
}

impl EngineError {
    /// Whether the same request may succeed later (a busy server, not a bad request).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::QueueFull(_)
                | EngineError::OverBudget { .. }
                | EngineError::TenantBusy { .. }
                | EngineError::SessionBusy
                | EngineError::Rejected(_)
        )
    }
}

/// How a registered shared prefix reaches a tenant's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixMode {
    /// One plaintext copy, referenced by every tenant; its rows are never in any
    /// tenant's frame, so they give no known pairs of any key.
    #[default]
    SharedPlain,
    /// Each tenant gets its own copy rotated into its frame.
    RotateCopy,
}

/// A registered shared prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrefixInfo {
    /// blake3 of the model's shape and the token ids, hex.
    pub id: String,
    pub tokens: usize,
    pub bytes: u64,
}

/// [`EngineConfig::keyring_bytes`]'s default, 1 GiB: about 3,000 tenants of the
/// embedded model, or 110 of Qwen2.5-3B (9.4 MB of rotations each).
pub const DEFAULT_KEYRING_BYTES: usize = 1 << 30;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub variant: Variant,
    pub prefix_mode: PrefixMode,
    pub precision: KvPrecision,
    /// Bytes of K/V cache (allocated, over all tenants) the engine may hold.
    pub kv_budget: u64,
    /// The most sequences in one step (prompt chunks and decode tokens).
    pub max_batch: usize,
    /// Prompt tokens prefilled per scheduler step, over all sequences, so that a
    /// long prompt does not stall everyone else's decoding.
    pub prefill_chunk: usize,
    /// Requests the admission policy may queue.
    pub queue_limit: u32,
    /// The longest prompt admitted (the context window, less one token for the
    /// answer, is the limit in any case).
    pub max_prompt_tokens: usize,
    /// Bytes of tenants' rotations kept derived when not in use (least recently
    /// used tenants past it derive theirs again at their next admission).
    pub keyring_bytes: usize,
    /// Norm padding for the layers the depth-gate policy pads; None: no layer is
    /// padded whatever the policy says.
    pub padding: Option<kframe_core::layout::Padding>,
    /// What one tenant may hold and ask for at once, unless its tier has its own.
    pub tenant_limits: TenantLimits,
    /// Per service tier, limits that replace `tenant_limits`.
    pub tier_limits: std::collections::BTreeMap<u8, TenantLimits>,
}

/// A tenant's share of the engine, so that no tenant crowds out the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Cache bytes the tenant's sessions and running requests may hold together;
    /// None: half the engine's budget. A tenant past it loses its own least
    /// recently used idle sessions first, never another tenant's.
    pub cache_bytes: Option<u64>,
    /// Requests of the tenant running and waiting at once; more are refused
    /// (`TenantBusy`, HTTP 429 with Retry-After).
    pub requests: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self { cache_bytes: None, requests: 32 }
    }
}

impl EngineConfig {
    /// The limits that apply to a tenant of `tier`, with the cache share resolved.
    pub fn limits_for(&self, tier: u8) -> (u64, u32) {
        let l = self.tier_limits.get(&tier).copied().unwrap_or(self.tenant_limits);
        (l.cache_bytes.unwrap_or(self.kv_budget / 2), l.requests)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            variant: Variant::ProbeTime,
            prefix_mode: PrefixMode::SharedPlain,
            precision: KvPrecision::Native,
            kv_budget: 1 << 30,
            max_batch: 64,
            prefill_chunk: 512,
            queue_limit: 256,
            max_prompt_tokens: usize::MAX,
            keyring_bytes: DEFAULT_KEYRING_BYTES,
            padding: None,
            tenant_limits: TenantLimits::default(),
            tier_limits: Default::default(),
        }
    }
}

/// A request's event stream. Dropping it cancels the request.
pub struct Stream {
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
}

impl Stream {
    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, for callers outside the async runtime.
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Reads to the end: the generated tokens and the final event.
    pub async fn collect(mut self) -> (Vec<u32>, String, Event) {
        let (mut tokens, mut text) = (Vec::new(), String::new());
        while let Some(ev) = self.next().await {
            match ev {
                Event::Token { id, text: piece } => {
                    tokens.push(id);
                    text += &piece;
                }
                Event::Text(piece) => text += &piece,
                Event::Started { .. } => {}
                last => return (tokens, text, last),
            }
        }
        (tokens, text, Event::Failed(EngineError::ShutDown))
    }
}

pub(crate) enum Command {
    Submit(Submit, mpsc::UnboundedSender<Event>),
    DropTenant(Tenant, oneshot::Sender<usize>),
    Rekey(Tenant, u64, oneshot::Sender<Result<usize, EngineError>>),
    RegisterPrefix(Vec<u32>, oneshot::Sender<Result<PrefixInfo, EngineError>>),
    EndSession(u64, String, oneshot::Sender<bool>),
    Shutdown,
}
