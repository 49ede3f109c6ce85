//! kframe-engine: the multi-tenant scheduler. One thread runs the shared model for
//! every tenant, batching their steps; callers on the async runtime submit requests
//! and read token streams.
//!
//! # Layout
//!
//! - This file: the [`Engine`] handle and what crosses it (requests, events,
//!   errors, settings).
//! - `state`: the engine thread's state and loop: each turn runs
//!   `schedule` (what runs this step) -> `execute` (one forward pass) -> `update`
//!   (sample, finish, account), in files of those names.
//! - `admission`: a request's way in (validation, context reuse, the admission
//!   policy). `ledger`: the cache bytes, in all and per tenant, and eviction to
//!   make room. `prefixes`: shared prefixes. [`sessions`]: tenants' cached
//!   conversations. `tenants`: delete and re-key.
//! - [`metrics`]: the counters the HTTP layer exports. [`isolation`]: what a
//!   request's attention checked.
//!
//! Data flows one way: [`Engine::submit`] -> admission -> prefill and batched
//! decode in the tenant's frame -> the session's cache (eviction when the budget is
//! reached) -> [`Event`]s on the caller's stream.
//!
//! # Dependencies
//!
//! kframe-core, kframe-model, kframe-policy, tokio's channels. No HTTP.

mod admission;
mod execute;
pub mod isolation;
mod ledger;
pub mod metrics;
mod prefixes;
mod schedule;
pub mod sessions;
mod state;
mod tenants;
mod update;

pub use isolation::IsolationReport;
pub use metrics::{Metrics, MetricsSnapshot};

use kframe_core::cache::KvPrecision;
use kframe_core::integrity::IsolationEvent;
use kframe_core::keys::MasterSecret;
use kframe_model::generate::{FinishReason, SamplingParams};
use kframe_model::{ModelBundle, Variant};
use kframe_policy::PolicySet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A tenant as the engine sees it: the registry's numeric id (what policies see),
/// its name and key epoch (what its frame is derived from) and its service tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: u64,
    pub name: String,
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

/// What a request's stream carries: tokens as they are sampled, then exactly one
/// `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
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
    #[error("the session is in use by another request")]
    SessionBusy,
    #[error("the session is in key epoch {session}, the request in {request}")]
    StaleEpoch { session: u64, request: u64 },
    #[error("the tenant was deleted")]
    TenantDeleted,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("model error: {0}")]
    Model(String),
    #[error("the engine has shut down")]
    ShutDown,
}

impl EngineError {
    /// Whether the same request may succeed later (a busy server, not a bad request).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::QueueFull(_)
                | EngineError::OverBudget { .. }
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
    /// Tenants whose rotations stay derived when not in use.
    pub keyring_capacity: usize,
    /// Norm padding for the layers the depth-gate policy pads; None: no layer is
    /// padded whatever the policy says.
    pub padding: Option<kframe_core::layout::Padding>,
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
            keyring_capacity: 256,
            padding: None,
        }
    }
}

/// A request's event stream. Dropping it cancels the request.
pub struct Stream {
    rx: mpsc::UnboundedReceiver<Event>,
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
                last => return (tokens, text, last),
            }
        }
        (tokens, text, Event::Failed(EngineError::ShutDown))
    }
}

enum Command {
    Submit(Submit, mpsc::UnboundedSender<Event>),
    DropTenant(Tenant, oneshot::Sender<usize>),
    Rekey(Tenant, u64, oneshot::Sender<Result<usize, EngineError>>),
    RegisterPrefix(Vec<u32>, oneshot::Sender<Result<PrefixInfo, EngineError>>),
    Shutdown,
}

/// The handle callers hold. Cloning shares the worker.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    metrics: Arc<Metrics>,
    policies: Arc<PolicySet>,
    inner: Arc<Worker>,
}

/// Joins the worker thread when the last handle goes.
struct Worker {
    tx: mpsc::UnboundedSender<Command>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().expect("worker handle").take() {
            let _ = t.join();
        }
    }
}

impl Engine {
    /// Starts the worker thread, which owns the model and every cache.
    pub fn start(generator: ModelBundle, master: MasterSecret, policies: Arc<PolicySet>, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let state = state::State::new(generator, master, policies.clone(), config, metrics.clone());
        let thread = std::thread::Builder::new()
            .name("kframe-engine".into())
            .spawn(move || state.run(rx))
            .expect("spawning the engine thread");
        let inner = Arc::new(Worker { tx: tx.clone(), thread: std::sync::Mutex::new(Some(thread)) });
        Self { tx, metrics, policies, inner }
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: Submit) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Err(mpsc::error::SendError(Command::Submit(_, tx))) = self.tx.send(Command::Submit(req, tx)) {
            let _ = tx.send(Event::Failed(EngineError::ShutDown));
        }
        Stream { rx }
    }

    /// Key-drop delete: ends the tenant's requests, zeroes and frees every cache
    /// block it owns and forgets its rotations. Returns the sessions removed.
    pub async fn drop_tenant(&self, tenant: Tenant) -> Result<usize, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::DropTenant(tenant, tx)).map_err(|_| EngineError::ShutDown)?;
        rx.await.map_err(|_| EngineError::ShutDown)
    }

    /// Moves the tenant (at `tenant.epoch`) to `new_epoch`: every cache it holds is
    /// re-rotated in place, k'' = R_new R_old^T k', with no new prefill; the old
    /// rotations are forgotten. Returns the sessions re-keyed.
    pub async fn rekey(&self, tenant: Tenant, new_epoch: u64) -> Result<usize, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Rekey(tenant, new_epoch, tx)).map_err(|_| EngineError::ShutDown)?;
        rx.await.map_err(|_| EngineError::ShutDown)?
    }

    /// Prefills `tokens` once in the model's own frame. Requests whose prompt
    /// starts with them (and is longer) then skip that prefill, in the configured
    /// [`PrefixMode`]. Registering the same tokens again returns the same prefix.
    pub async fn register_prefix(&self, tokens: Vec<u32>) -> Result<PrefixInfo, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::RegisterPrefix(tokens, tx)).map_err(|_| EngineError::ShutDown)?;
        rx.await.map_err(|_| EngineError::ShutDown)?
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        let mut m = self.metrics.snapshot();
        let p = self.policies.stats();
        m.plugin_failures = p.admission.failures + p.eviction.failures + p.depth_gate.failures;
        m.plugin_seconds =
            p.admission.seconds_in_plugin + p.eviction.seconds_in_plugin + p.depth_gate.seconds_in_plugin;
        m
    }

    /// The most recent isolation events (blocks that failed verification and were
    /// masked out of attention), oldest first.
    pub fn isolation_events(&self) -> Vec<IsolationEvent> {
        self.metrics.recent_events()
    }

    pub fn policies(&self) -> &Arc<PolicySet> {
        &self.policies
    }

    /// Stops the worker after the current step; pending requests get `ShutDown`.
    pub fn shutdown(&self) {
        let _ = self.inner.tx.send(Command::Shutdown);
    }
}
