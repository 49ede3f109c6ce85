//! The engine's state and its loop. One thread owns the model, the keyring, every
//! cache and the ledger; each turn it takes new commands, admits what it can, then
//! runs one step: [`State::schedule`] picks what runs, [`State::execute`] runs one
//! forward pass over it, [`State::update`] samples, streams and finishes.

use crate::isolation::IsolationReport;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::prefixes::PrefixSlot;
use crate::sessions::{SessionKey, Sessions};
use crate::{Command, EngineConfig, EngineError, Event, Submit, Tenant, Usage};
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
use std::time::{Duration, Instant};
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
            .capacity(cfg.keyring_capacity)
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
            shape,
            tag_key,
        }
    }

    pub(crate) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                let keep_going = rx.blocking_recv().is_some_and(|cmd| self.command(cmd));
                if !keep_going {
                    return self.shutdown();
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                if !self.command(cmd) {
                    return self.shutdown();
                }
            }
            self.retry_waiting();
            self.drop_cancelled();
            let worked = self.step();
            self.publish();
            if !worked && !self.waiting.is_empty() {
                // Only queued requests, none admissible yet: wait for a change.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// One step: schedule, one forward pass, update. False if nothing ran.
    fn step(&mut self) -> bool {
        let work = self.schedule();
        if work.is_empty() {
            return false;
        }
        let out = self.execute(&work);
        self.update(work, out);
        true
    }

    /// Handles one command; false to stop.
    pub(crate) fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(req, tx) => {
                let pending = Pending { req, tx, since: Instant::now() };
                if let Some(p) = self.admit(pending, false) {
                    if self.waiting.len() >= self.cfg.queue_limit as usize {
                        self.reject(p, EngineError::QueueFull(self.waiting.len() as u32));
                    } else {
                        self.waiting.push_back(p);
                    }
                }
                true
            }
            Command::DropTenant(tenant, reply) => {
                let _ = reply.send(self.drop_tenant(&tenant));
                true
            }
            Command::RegisterPrefix(tokens, reply) => {
                let _ = reply.send(self.register_prefix(tokens));
                true
            }
            Command::Rekey(tenant, epoch, reply) => {
                let _ = reply.send(self.rekey(&tenant, epoch));
                true
            }
            Command::Shutdown => false,
        }
    }

    pub(crate) fn store_dtype(&self) -> candle_core::DType {
        match self.cfg.precision {
            KvPrecision::Native => self.gen.model.dtype(),
            KvPrecision::Exact => candle_core::DType::F64,
        }
    }

    pub(crate) fn shutdown(mut self) {
        for p in std::mem::take(&mut self.waiting) {
            let _ = p.tx.send(Event::Failed(EngineError::ShutDown));
        }
        for seq in std::mem::take(&mut self.active) {
            let _ = seq.tx.send(Event::Failed(EngineError::ShutDown));
        }
    }
}
