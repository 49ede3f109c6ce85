//! The engine thread's state: the model, the keyring, every running sequence and
//! cached session, the ledger and the registered prefixes; and what every part of
//! the engine asks of it (prompt validation, the storage dtype, publishing the
//! metrics). The operations on it live in the files named for their job.

use crate::api::{EngineConfig, EngineError, Event, InvalidRequest, Submit, Tenant, Usage};
use crate::isolation::IsolationReport;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::prefixes::PrefixSlot;
use crate::sessions::{SessionKey, Sessions};
use candle_transformers::generation::LogitsProcessor;
use kframe_core::cache::{CacheShape, KvCache, KvPrecision};
use kframe_core::integrity::TagKey;
use kframe_core::keys::MasterSecret;
use kframe_core::rotation::{Frame, Keyring};
use kframe_model::generate::{FinishReason, TextStream};
use kframe_model::ModelBundle;
use kframe_policy::PolicySet;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

pub(crate) struct Pending {
    pub(crate) req: Submit,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
    pub(crate) since: Instant,
}

/// A request being served.
pub(crate) struct Seq {
    pub(crate) tenant: Tenant,
    pub(crate) frame: Frame,
    pub(crate) session: Option<SessionKey>,
    /// The session was ended while this request used it: its cache is dropped,
    /// not checked back in, when the request finishes.
    pub(crate) discard_session: bool,
    /// The session's eviction entry, pinned while this sequence runs.
    pub(crate) entry: Option<u64>,
    pub(crate) cache: KvCache,
    /// The tokens `cache` holds, in order.
    pub(crate) context: Vec<u32>,
    /// Prompt tokens not yet prefilled.
    pub(crate) unfilled: Vec<u32>,
    /// The sampled token to feed at the next decode step.
    pub(crate) next: Option<u32>,
    pub(crate) sampler: LogitsProcessor,
    pub(crate) text: TextStream,
    pub(crate) max_tokens: usize,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
    /// Bytes the ledger holds for this sequence.
    pub(crate) reserved: u64,
    pub(crate) started: Instant,
    pub(crate) usage: Usage,
    pub(crate) isolation: IsolationReport,
}

pub(crate) struct State {
    pub(crate) gen: ModelBundle,
    pub(crate) keyring: Keyring,
    pub(crate) policies: Arc<PolicySet>,
    pub(crate) cfg: EngineConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sessions: Sessions,
    pub(crate) active: Vec<Seq>,
    pub(crate) waiting: VecDeque<Pending>,
    /// Cache bytes in use, in all and per tenant.
    pub(crate) ledger: Ledger,
    pub(crate) prefixes: Vec<PrefixSlot>,
    /// Logical time for policies: one tick per admission or finish.
    pub(crate) now: u64,
    /// Steps scheduled so far: which tenant goes first in the next one.
    pub(crate) turn: u64,
    pub(crate) shape: CacheShape,
    /// Seals every tenant's and prefix's cache blocks (the corrective layer).
    pub(crate) tag_key: Arc<TagKey>,
}

pub(crate) enum Finish {
    Done(FinishReason),
    Failed(EngineError),
    Cancelled,
}

impl State {
    pub(crate) fn new(
        gen: ModelBundle,
        master: MasterSecret,
        policies: Arc<PolicySet>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let tag_key = Arc::new(TagKey::derive(&master));
        let model = &gen.model;
        let keyring = Keyring::builder(master, model.rotation_shape())
            .dtype(model.dtype())
            .precision(cfg.precision)
            .device(model.device().clone())
            .capacity(usize::MAX)
            .budget_bytes(cfg.keyring_bytes)
            .build();
        let keyring = match &cfg.padding {
            Some(p) => keyring.with_padding(p.clone()),
            None => keyring,
        };
        let shape = model.new_cache(cfg.precision).shape();
        Self {
            gen,
            keyring,
            policies,
            cfg,
            metrics,
            sessions: Sessions::default(),
            active: Vec::new(),
            waiting: VecDeque::new(),
            ledger: Ledger::default(),
            prefixes: Vec::new(),
            now: 0,
            turn: 0,
            shape,
            tag_key,
        }
    }

    /// The dtype caches store rotated values in.
    pub(crate) fn store_dtype(&self) -> candle_core::DType {
        match self.cfg.precision {
            KvPrecision::Native => self.gen.model.kv_dtype(),
            KvPrecision::Exact => candle_core::DType::F64,
        }
    }

    /// The engine's door, the one place a prompt is validated: it must leave room
    /// for a generated token and be within `max_prompt_tokens`, and the model must
    /// take it (`Qwen2::check_input`: not empty, every id in the vocabulary).
    pub(crate) fn validate(&self, prompt: &[u32]) -> Result<(), EngineError> {
        let window = self.gen.model.config().max_position_embeddings;
        let limit = self.cfg.max_prompt_tokens.min(window.saturating_sub(1));
        if prompt.len() > limit {
            return Err(EngineError::Invalid(InvalidRequest::TooLong { tokens: prompt.len(), limit }));
        }
        self.gen.model.check_input(prompt, 0).map_err(|e| EngineError::Invalid(InvalidRequest::Prompt(e.to_string())))
    }

    pub(crate) fn publish(&self) {
        let m = &self.metrics;
        Metrics::set(&m.sequences, self.active.len() as u64);
        Metrics::set(&m.queued, self.waiting.len() as u64);
        Metrics::set(&m.cache_bytes, self.ledger.used);
        Metrics::set(&m.keyring_bytes, self.keyring.held().1 as u64);
        let mut tenants: Vec<u64> = self.active.iter().map(|s| s.tenant.id).collect();
        tenants.sort_unstable();
        tenants.dedup();
        Metrics::set(&m.active_tenants, tenants.len() as u64);
        let mut by_tenant = m.tenant_bytes.lock().expect("metrics lock");
        if by_tenant.len() != self.ledger.tenant_bytes.len()
            || self.ledger.tenant_bytes.iter().any(|(t, b)| by_tenant.get(t) != Some(b))
        {
            *by_tenant = self.ledger.tenant_bytes.iter().map(|(&t, &b)| (t, b)).collect();
        }
    }
}
