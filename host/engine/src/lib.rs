//! kframe-engine: the multi-tenant scheduler. One thread runs the shared model for
//! every tenant, batching their steps; callers on the async runtime submit requests
//! and read token streams.
//!
//! # Layout
//!
//! - This file: the [`Engine`] handle. `api`: what crosses it (requests, events,
//!   errors, settings).
//! - The engine thread's own state, each kind of it in one file with one owner:
//!   [`isolation`] (what a request's attention checked), `ledger` (cache bytes, in
//!   all and per tenant), [`metrics`] (the counters the HTTP layer exports),
//!   `prefixes` (registered shared prefixes), [`sessions`] (tenants' cached
//!   conversations); `state` holds them all, with the running sequences.
//! - What the thread does with it, one job a file: `admission` (a request's way
//!   in: validation, context reuse, the admission policy), `eviction` (making
//!   room), `prefill` (shared prefixes into the cache), `tenants` (delete, re-key),
//!   and each turn `schedule` (what runs this step) -> `execute` (one forward
//!   pass) -> `update` (sample, finish, account). `worker`: the loop.
//!
//! Data flows one way: [`Engine::submit`] -> admission -> prefill and batched
//! decode in the tenant's frame -> the session's cache (eviction when the budget is
//! reached) -> [`Event`]s on the caller's stream.
//!
//! # Dependencies
//!
//! kframe-core, kframe-model, kframe-policy, tokio's channels. No HTTP. Modules
//! point one way: api <- the state's parts <- state <- the jobs <- worker <- this
//! file.

mod admission;
mod api;
mod eviction;
mod execute;
pub mod isolation;
mod ledger;
pub mod metrics;
mod prefill;
mod prefixes;
mod schedule;
pub mod sessions;
mod state;
mod tenants;
mod update;
mod worker;

pub use api::{
    EngineConfig, EngineError, Event, InvalidRequest, PrefixInfo, PrefixMode, Stream, Submit, Tenant, TenantLimits,
    Usage, DEFAULT_KEYRING_BYTES,
};
pub use isolation::IsolationReport;
pub use metrics::{Metrics, MetricsSnapshot};

use api::Command;
use kframe_core::integrity::IsolationEvent;
use kframe_core::keys::MasterSecret;
use kframe_model::ModelBundle;
use kframe_policy::PolicySet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The handle callers hold. Cloning shares the worker.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    metrics: Arc<Metrics>,
    policies: Arc<PolicySet>,
    /// The configuration it started with, for what the server reports of it.
    config: Arc<EngineConfig>,
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
        let reported = Arc::new(config.clone());
        let state = state::State::new(generator, master, policies.clone(), config, metrics.clone());
        let thread = std::thread::Builder::new()
            .name("kframe-engine".into())
            .spawn(move || worker::run(state, rx))
            .expect("spawning the engine thread");
        let inner = Arc::new(Worker { tx: tx.clone(), thread: std::sync::Mutex::new(Some(thread)) });
        Self { tx, metrics, policies, config: reported, inner }
    }

    /// The configuration the engine started with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
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

    /// Ends a tenant's session: its cache is zeroed and freed now, or, if a request
    /// is using it, when that request ends (its answer is not affected). Returns
    /// whether there was such a session.
    pub async fn end_session(&self, tenant: u64, session: String) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::EndSession(tenant, session, tx)).map_err(|_| EngineError::ShutDown)?;
        rx.await.map_err(|_| EngineError::ShutDown)
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
