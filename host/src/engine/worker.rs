//! The scheduler loop. One thread owns the model, the keyring, every cache and the
//! memory ledger; each turn it takes new commands, admits what it can, prefills a
//! bounded number of prompt tokens, then decodes one token for every ready
//! sequence in a single batched step.

use super::metrics::Metrics;
use super::sessions::{Checkout, SessionKey, Sessions};
use super::{Command, EngineConfig, EngineError, Event, PrefixInfo, PrefixMode, Submit, Tenant, Usage};
use crate::cache::{CacheShape, KvCache, SharedPrefix};
use crate::generate::{sampler, FinishReason, Generator, TextStream};
use crate::integrity::{IsolationReport, TagKey};
use crate::keys::MasterSecret;
use crate::model::Chunk;
use crate::plugin::{Admission, Entry, Load, ModelShape, PolicySet, Request};
use crate::rotation::{Frame, Keyring};
use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long an admission-queued request may wait before it is turned away.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

struct Pending {
    req: Submit,
    tx: mpsc::UnboundedSender<Event>,
    since: Instant,
}

/// A request being served.
struct Seq {
    tenant: Tenant,
    frame: Frame,
    session: Option<SessionKey>,
    /// The session's eviction entry, pinned while this sequence runs.
    entry: Option<u64>,
    cache: KvCache,
    /// The tokens `cache` holds, in order.
    context: Vec<u32>,
    /// Prompt tokens not yet prefilled.
    unfilled: Vec<u32>,
    /// The sampled token to feed at the next decode step.
    next: Option<u32>,
    sampler: LogitsProcessor,
    text: TextStream,
    max_tokens: usize,
    tx: mpsc::UnboundedSender<Event>,
    /// Bytes the ledger holds for this sequence.
    reserved: u64,
    started: Instant,
    usage: Usage,
    isolation: IsolationReport,
}

impl Seq {
    /// Samples this sequence's next token from its logits and streams it.
    /// Returns how it finished, if it did.
    fn sample(&mut self, logits: &Tensor, gen: &Generator, metrics: &Metrics, max_len: usize) -> Option<Finish> {
        if self.text.tokens().len() >= self.max_tokens {
            return Some(Finish::Done(FinishReason::Length));
        }
        let next = match self.sampler.sample(logits) {
            Ok(t) => t,
            Err(e) => return Some(Finish::Failed(EngineError::Model(e.to_string()))),
        };
        if gen.eos_token_ids.contains(&next) {
            return Some(Finish::Done(FinishReason::Stop));
        }
        let piece = match self.text.push(&gen.tokenizer, next) {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return Some(Finish::Failed(EngineError::Model(e.to_string()))),
        };
        Metrics::add(&metrics.tokens_generated, 1);
        let _ = self.tx.send(Event::Token { id: next, text: piece });
        if self.text.tokens().len() >= self.max_tokens || self.cache.len() >= max_len {
            return Some(Finish::Done(FinishReason::Length));
        }
        self.next = Some(next);
        None
    }
}

pub(super) struct State {
    gen: Generator,
    keyring: Keyring,
    policies: Arc<PolicySet>,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    sessions: Sessions,
    active: Vec<Seq>,
    waiting: VecDeque<Pending>,
    /// Allocated cache bytes: checked-in sessions plus running sequences.
    used: u64,
    /// Of `used`, the bytes running sequences hold (what eviction cannot free).
    in_flight: u64,
    tenant_bytes: HashMap<u64, u64>,
    prefixes: Vec<PrefixSlot>,
    /// Logical time for policies: one tick per admission or finish.
    now: u64,
    shape: CacheShape,
    /// Seals every tenant's and prefix's cache blocks (the corrective layer).
    tag_key: Arc<TagKey>,
}

/// A registered shared prefix. Its prefilled rows can be evicted like a session
/// when nothing uses them; the tokens stay, and the next request that starts with
/// them prefills them once again for everyone.
struct PrefixSlot {
    /// The eviction policy's entry id (in a range sessions never reach).
    entry: u64,
    id: [u8; 32],
    tokens: Vec<u32>,
    shared: Option<Arc<SharedPrefix>>,
    bytes: u64,
    /// Whether the eviction policy was last told it is in use.
    pinned: bool,
}

/// Prefix entry ids: far above any session's.
const PREFIX_ENTRY: u64 = 1 << 62;

enum Finish {
    Done(FinishReason),
    Failed(EngineError),
    Cancelled,
}

impl State {
    pub(super) fn new(
        gen: Generator,
        master: MasterSecret,
        policies: Arc<PolicySet>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let exact = cfg.precision == crate::cache::KvPrecision::Exact;
        let tag_key = Arc::new(TagKey::derive(&master));
        let model = &gen.model;
        let keyring = Keyring::new(
            master,
            model.rotation_shape(),
            model.dtype(),
            exact,
            model.device().clone(),
            cfg.keyring_capacity,
        );
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
            used: 0,
            in_flight: 0,
            tenant_bytes: HashMap::new(),
            prefixes: Vec::new(),
            now: 0,
            shape,
            tag_key,
        }
    }

    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
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

    /// Handles one command; false to stop.
    fn command(&mut self, cmd: Command) -> bool {
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

    fn reject(&mut self, p: Pending, err: EngineError) {
        Metrics::add(&self.metrics.requests_failed, 1);
        if matches!(err, EngineError::Rejected(_) | EngineError::QueueFull(_) | EngineError::OverBudget { .. }) {
            Metrics::add(&self.metrics.admissions_rejected, 1);
        }
        let _ = p.tx.send(Event::Failed(err));
    }

    fn validate(&self, prompt: &[u32]) -> Result<(), EngineError> {
        let cfg = self.gen.model.config();
        if prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if let Some(id) = prompt.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(EngineError::Invalid(format!("token id {id} is outside the vocabulary ({})", cfg.vocab_size)));
        }
        if prompt.len() >= cfg.max_position_embeddings {
            return Err(EngineError::Invalid(format!(
                "a prompt of {} tokens leaves no room in the context window of {}",
                prompt.len(),
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Decides a request. Returns it back if it must wait.
    fn admit(&mut self, p: Pending, from_queue: bool) -> Option<Pending> {
        if let Err(e) = self.validate(&p.req.prompt) {
            self.reject(p, e);
            return None;
        }
        let key = p.req.session.as_deref().map(|name| self.sessions.key(p.req.tenant.id, name));
        let checkout = match &key {
            Some(k) => self.sessions.checkout(k),
            None => Checkout::New,
        };
        let held = match &checkout {
            Checkout::Busy => {
                self.reject(p, EngineError::SessionBusy);
                return None;
            }
            Checkout::New => 0,
            Checkout::Cached { epoch, .. } if *epoch != p.req.tenant.epoch => {
                let err = EngineError::StaleEpoch { session: *epoch, request: p.req.tenant.epoch };
                self.give_back(&key, p.req.tenant.id, checkout);
                self.reject(p, err);
                return None;
            }
            Checkout::Cached { entry, bytes, .. } => {
                self.policies.on_pin(*entry, true);
                *bytes
            }
        };
        // Where the context comes from: the session's cache, a registered prefix
        // that covers more of the prompt, or nothing.
        let (reuse, offset) = match &checkout {
            Checkout::Cached { tokens, cache, .. } => {
                let common = common_prefix(tokens, &p.req.prompt);
                if common >= cache.offset() {
                    (common, cache.offset())
                } else {
                    (0, 0)
                }
            }
            _ => (0, 0),
        };
        self.reload_prefix_for(&p.req.prompt, reuse);
        let prefix = self.prefix_for(&p.req.prompt).filter(|pf| pf.tokens.len() > reuse);
        let offset = match (&prefix, self.cfg.prefix_mode) {
            (Some(pf), PrefixMode::SharedPlain) => pf.tokens.len(),
            (Some(_), PrefixMode::RotateCopy) => 0,
            (None, _) => offset,
        };
        // The depth-gate policy picks the layers whose reads are verified and, for a
        // new cache, the layers padded; a session's cache keeps the layout it has.
        let model_shape = ModelShape {
            layers: self.shape.layers as u32,
            kv_heads: self.shape.kv_heads as u32,
            head_dim: self.shape.head_dim as u32,
        };
        let gates = self.policies.gates(&model_shape, p.req.tenant.id, p.req.prompt.len() as u32).value;
        let layout = match (&checkout, &prefix) {
            (Checkout::Cached { cache, .. }, None) if reuse > 0 => cache.layout().clone(),
            _ => self.keyring.gated_layout(&gates.iter().map(|g| (g.rotate, g.pad)).collect::<Vec<_>>()),
        };
        let total = (p.req.prompt.len() + p.req.params.max_tokens).min(self.shape.max_len);
        let reserve = KvCache::bytes_for(self.shape, &layout, self.store_dtype(), total - offset) as u64;
        // A session cache that a prefix replaces is freed, not reused.
        let held_usable = if prefix.is_some() { 0 } else { held };
        let needed = reserve.saturating_sub(held_usable);
        self.now += 1;
        let request = Request {
            tenant: p.req.tenant.id,
            tier: p.req.tenant.tier,
            prompt_tokens: p.req.prompt.len() as u32,
            max_tokens: p.req.params.max_tokens as u32,
            bytes_needed: needed,
            now: self.now,
        };
        // Idle sessions do not count as load: eviction can free them.
        let load = Load {
            active_sequences: self.active.len() as u32,
            queued: self.waiting.len() as u32,
            queue_limit: self.cfg.queue_limit,
            cache_bytes: self.in_flight,
            cache_budget: self.cfg.kv_budget,
        };
        let decision = self.policies.admit(&request, &load).value;
        let wait = match decision {
            Admission::Reject(reason) => {
                self.give_back(&key, p.req.tenant.id, checkout);
                self.reject(p, EngineError::Rejected(reason));
                return None;
            }
            Admission::Queue => true,
            Admission::Admit => !self.make_room(needed),
        };
        if wait {
            self.give_back(&key, p.req.tenant.id, checkout);
            if self.active.is_empty() && never_fits(needed, self.cfg.kv_budget, self.in_flight) {
                // Nothing running will ever free enough.
                self.reject(p, EngineError::OverBudget { needed, budget: self.cfg.kv_budget });
                return None;
            }
            if from_queue && p.since.elapsed() > QUEUE_TIMEOUT {
                self.reject(p, EngineError::Rejected(format!("queued for over {} s", QUEUE_TIMEOUT.as_secs())));
                return None;
            }
            return Some(p);
        }
        let verify = gates.iter().map(|g| g.verify).collect();
        self.start(p, key, checkout, prefix, Plan { verify, layout, held, reserved: reserve.max(held_usable) });
        None
    }

    /// The longest registered prefix that the prompt starts with and goes beyond.
    fn prefix_for(&self, prompt: &[u32]) -> Option<Arc<SharedPrefix>> {
        self.prefixes
            .iter()
            .filter_map(|p| p.shared.as_ref())
            .filter(|p| p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|p| p.tokens.len())
            .cloned()
    }

    /// Prefills again an evicted prefix that `prompt` starts with (and that covers
    /// more than `reuse` tokens), if there is room; otherwise the request prefills
    /// those tokens itself.
    fn reload_prefix_for(&mut self, prompt: &[u32], reuse: usize) {
        let dormant = self
            .prefixes
            .iter()
            .filter(|p| p.shared.is_none() && p.tokens.len() > reuse)
            .filter(|p| p.tokens.len() < prompt.len() && prompt.starts_with(&p.tokens))
            .max_by_key(|p| p.tokens.len())
            .map(|p| p.tokens.clone());
        if let Some(tokens) = dormant {
            if let Err(e) = self.register_prefix(tokens) {
                tracing::debug!("an evicted shared prefix stays evicted: {e}");
            }
        }
    }

    fn register_prefix(&mut self, tokens: Vec<u32>) -> Result<PrefixInfo, EngineError> {
        let cfg = self.gen.model.config();
        let mut h = blake3::Hasher::new_derive_key("kframe shared prefix v1");
        for n in [cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim] {
            h.update(&(n as u64).to_le_bytes());
        }
        for t in &tokens {
            h.update(&t.to_le_bytes());
        }
        let id = *h.finalize().as_bytes();
        let slot = self.prefixes.iter().position(|p| p.id == id);
        let info = |p: &PrefixSlot| PrefixInfo {
            id: blake3::Hash::from(p.id).to_hex().to_string(),
            tokens: p.tokens.len(),
            bytes: p.bytes,
        };
        if let Some(p) = slot.map(|i| &self.prefixes[i]).filter(|p| p.shared.is_some()) {
            return Ok(info(p));
        }
        self.validate(&tokens)?;
        // Room first: a prefix that does not fit is not prefilled for nothing.
        let plain = crate::pad::Layout::plain(self.shape.layers);
        let bytes = KvCache::bytes_for(self.shape, &plain, self.store_dtype(), tokens.len()) as u64;
        if self.used + bytes > self.cfg.kv_budget && !self.make_room(bytes) {
            return Err(EngineError::OverBudget { needed: bytes, budget: self.cfg.kv_budget });
        }
        let mut cache = self.gen.model.new_cache(self.cfg.precision);
        let t0 = Instant::now();
        cache
            .seal_with(self.tag_key.clone(), &Frame::Identity)
            .map_err(crate::error::Error::from)
            .and_then(|()| self.gen.model.forward(&tokens, &mut cache, &Frame::Identity, self.cfg.variant))
            .and_then(|_| Ok(cache.shrink_to_fit()?))
            .map_err(|e| EngineError::Model(e.to_string()))?;
        Metrics::add(&self.metrics.compute_micros, t0.elapsed().as_micros() as u64);
        debug_assert_eq!(bytes, cache.allocated_bytes() as u64);
        // Shared prefixes are the operator's: charged to no tenant (entry tenant 0).
        self.used += bytes;
        self.now += 1;
        let shared = Some(Arc::new(SharedPrefix { id, tokens: tokens.clone(), cache }));
        let index = match slot {
            Some(i) => {
                self.prefixes[i].shared = shared;
                i
            }
            None => {
                let entry = PREFIX_ENTRY + self.prefixes.len() as u64;
                self.prefixes.push(PrefixSlot { entry, id, tokens, shared, bytes, pinned: false });
                self.prefixes.len() - 1
            }
        };
        let p = &mut self.prefixes[index];
        p.bytes = bytes;
        p.pinned = false;
        let entry =
            Entry { id: p.entry, tenant: 0, bytes, tokens: p.tokens.len() as u32, pinned: false, inserted: self.now };
        self.policies.on_insert(entry);
        let out = info(&self.prefixes[index]);
        self.publish();
        Ok(out)
    }

    /// Tells the eviction policy which prefixes are in use now: referenced by a
    /// running sequence or a session's cache besides the registry.
    fn refresh_prefix_pins(&mut self) {
        for p in &mut self.prefixes {
            let Some(shared) = &p.shared else { continue };
            let pinned = Arc::strong_count(shared) > 1;
            if pinned != p.pinned {
                p.pinned = pinned;
                self.policies.on_pin(p.entry, pinned);
            }
        }
    }

    /// Returns a checked-out session unchanged.
    fn give_back(&mut self, key: &Option<SessionKey>, tenant: u64, checkout: Checkout) {
        if let (Some(key), Checkout::Cached { entry, epoch, tokens, cache, .. }) = (key, checkout) {
            self.sessions.checkin(*key, tenant, epoch, tokens, cache);
            self.policies.on_pin(entry, false);
        }
    }

    fn store_dtype(&self) -> candle_core::DType {
        match self.cfg.precision {
            crate::cache::KvPrecision::Native => self.gen.model.dtype(),
            crate::cache::KvPrecision::Exact => candle_core::DType::F64,
        }
    }

    /// Evicts idle sessions until `needed` more bytes fit in the budget. False if
    /// they cannot.
    fn make_room(&mut self, needed: u64) -> bool {
        let budget = self.cfg.kv_budget;
        if self.used + needed <= budget {
            return true;
        }
        self.refresh_prefix_pins();
        let victims = self.policies.victims(self.used + needed - budget, self.now).value;
        for id in victims {
            self.remove_session(id, true);
        }
        self.used + needed <= budget
    }

    /// Removes an idle session: evicted for room, or deleted with its tenant.
    fn remove_session(&mut self, entry: u64, evicted: bool) {
        if entry >= PREFIX_ENTRY {
            // Only eviction removes a prefix, and only one nothing uses.
            let Some(p) = self.prefixes.iter_mut().find(|p| p.entry == entry) else { return };
            if let Some(shared) = p.shared.take() {
                if Arc::strong_count(&shared) > 1 {
                    p.shared = Some(shared); // in use after all: keep it
                    return;
                }
                self.used -= p.bytes;
                Metrics::add(&self.metrics.evictions, 1);
                tracing::debug!(entry, bytes = p.bytes, "shared prefix evicted");
                // Dropping `shared` zeroes the prefix's rows.
            }
            self.policies.on_remove(entry);
            return;
        }
        if let Some(s) = self.sessions.remove(entry) {
            if s.cache.is_some() {
                self.charge(s.tenant, -(s.bytes as i64));
                if evicted {
                    Metrics::add(&self.metrics.evictions, 1);
                    tracing::debug!(entry, tenant = s.tenant, bytes = s.bytes, "session evicted");
                }
            }
            // Dropping `s` zeroes its cache.
        }
        self.policies.on_remove(entry);
    }

    /// Adjusts the ledger by `delta` bytes for `tenant`.
    fn charge(&mut self, tenant: u64, delta: i64) {
        self.used = (self.used as i64 + delta) as u64;
        let t = self.tenant_bytes.entry(tenant).or_default();
        *t = (*t as i64 + delta) as u64;
        if *t == 0 {
            self.tenant_bytes.remove(&tenant);
        }
    }

    fn start(
        &mut self,
        p: Pending,
        key: Option<SessionKey>,
        checkout: Checkout,
        prefix: Option<Arc<SharedPrefix>>,
        plan: Plan,
    ) {
        let Pending { req, tx, .. } = p;
        let Plan { verify, layout, held, reserved } = plan;
        let frame = match self.keyring.padded_frame(&req.tenant.name, req.tenant.epoch, &layout) {
            Ok(f) => f,
            Err(e) => {
                self.give_back(&key, req.tenant.id, checkout);
                let _ = tx.send(Event::Failed(EngineError::Model(e.to_string())));
                return;
            }
        };
        let (entry, cache, cached_tokens) = match checkout {
            Checkout::Cached { entry, tokens, cache, .. } => (Some(entry), Some(cache), tokens),
            _ => (None, None, Vec::new()),
        };
        let precision = self.cfg.precision;
        let (cache, cached_tokens) = match (prefix, cache) {
            (Some(pf), _) => {
                let cache = match self.cfg.prefix_mode {
                    PrefixMode::SharedPlain => KvCache::after_prefix(pf.clone(), precision).with_layout(layout.clone()),
                    PrefixMode::RotateCopy => KvCache::rotated_copy(&pf, &frame, precision),
                };
                (cache, pf.tokens.clone())
            }
            (None, Some(c)) if c.offset() <= common_prefix(&cached_tokens, &req.prompt) && c.layout() == &layout => {
                (Ok(c), cached_tokens)
            }
            (None, _) => (self.gen.model.new_cache(precision).with_layout(layout.clone()), Vec::new()),
        };
        // Reuse the longest common prefix; at least one prompt token runs, for logits.
        let common = common_prefix(&cached_tokens, &req.prompt);
        let total = (req.prompt.len() + req.params.max_tokens).min(self.shape.max_len);
        let isolation = IsolationReport::new(&verify).laid_out(&layout);
        let prepared = cache.and_then(|mut c| {
            // A new cache is sealed from its first row; a session's already is (and
            // sealing it again would bless whatever it holds now).
            if !c.is_sealed() {
                c.seal_with(self.tag_key.clone(), &frame)?;
            }
            c.truncate(common)?;
            c.reserve(total)?;
            c.set_verify(verify);
            Ok(c)
        });
        let cache = match prepared {
            Ok(cache) => cache,
            Err(e) => {
                let _ = tx.send(Event::Failed(EngineError::Model(e.to_string())));
                if let Some(entry) = entry {
                    // The checked-out cache is gone with the error: drop its session.
                    self.sessions.remove(entry);
                    self.policies.on_remove(entry);
                    self.charge(req.tenant.id, -(held as i64));
                }
                return;
            }
        };
        // The session's bytes move from the idle pool to this sequence.
        self.charge(req.tenant.id, reserved as i64 - held as i64);
        self.in_flight += reserved;
        Metrics::add(&self.metrics.prompt_tokens_cached, common as u64);
        self.active.push(Seq {
            frame,
            session: key,
            entry,
            cache,
            context: req.prompt[..common].to_vec(),
            unfilled: req.prompt[common..].to_vec(),
            next: None,
            sampler: sampler(&req.params),
            text: TextStream::default(),
            max_tokens: req.params.max_tokens,
            tx,
            reserved,
            started: Instant::now(),
            usage: Usage { prompt_tokens: req.prompt.len(), completion_tokens: 0, cached_tokens: common },
            isolation,
            tenant: req.tenant,
        });
    }

    fn retry_waiting(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            if p.tx.is_closed() {
                continue;
            }
            if let Some(p) = self.admit(p, true) {
                self.waiting.push_back(p);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].tx.is_closed() {
                let seq = self.active.swap_remove(i);
                self.finish(seq, Finish::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// One batched forward pass over every sequence with work, up to `max_batch`
    /// of them, oldest first: a sequence with prompt left feeds its next chunk
    /// (`prefill_chunk` prompt tokens per step over all sequences, so that a long
    /// prompt does not stall everyone else's decoding), the others their decode
    /// token. True if it ran anything.
    fn step(&mut self) -> bool {
        let mut budget = self.cfg.prefill_chunk.max(1);
        // (index in `active`, tokens fed, whether they are prompt tokens)
        let mut work: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if work.len() >= self.cfg.max_batch.max(1) {
                break;
            }
            if !seq.unfilled.is_empty() {
                let n = seq.unfilled.len().min(budget);
                if n > 0 {
                    budget -= n;
                    work.push((i, seq.unfilled.drain(..n).collect(), true));
                }
            } else if let Some(token) = seq.next {
                work.push((i, vec![token], false));
            }
        }
        if work.is_empty() {
            return false;
        }
        let t0 = Instant::now();
        let mut chunks: Vec<Chunk> = Vec::with_capacity(work.len());
        let mut feeds = work.iter().peekable();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if let Some((_, tokens, _)) = feeds.next_if(|w| w.0 == i) {
                chunks.push(Chunk { tokens, cache: &mut seq.cache, frame: &seq.frame });
            }
        }
        let out = self.gen.model.forward_chunks(&mut chunks, self.cfg.variant);
        drop(chunks);
        Metrics::add(&self.metrics.compute_micros, t0.elapsed().as_micros() as u64);
        let decoded = work.iter().filter(|w| !w.2).count();
        if decoded > 0 {
            Metrics::add(&self.metrics.decode_steps, 1);
            Metrics::set(&self.metrics.batch_size, decoded as u64);
        }
        // Which row of the logits each sequence samples from: decoders, and
        // prefillers whose prompt is now all in.
        let mut rows: Vec<Option<usize>> = vec![None; self.active.len()];
        let mut finished: Vec<(usize, Finish)> = Vec::new();
        let fed: Vec<usize> = work.iter().map(|w| w.0).collect();
        for (row, (i, tokens, prompt)) in work.into_iter().enumerate() {
            let seq = &mut self.active[i];
            record_findings(&self.metrics, seq);
            // This sequence's own work failed; the others in the step go on.
            if let Some(e) = out.as_ref().ok().and_then(|o| o.failed[row].as_ref()) {
                finished.push((i, Finish::Failed(EngineError::Model(e.to_string()))));
                continue;
            }
            if prompt {
                Metrics::add(&self.metrics.prompt_tokens_prefilled, tokens.len() as u64);
                seq.context.extend_from_slice(&tokens);
                if !seq.unfilled.is_empty() || out.is_err() {
                    continue;
                }
                let ttft = seq.started.elapsed();
                Metrics::add(&self.metrics.ttft_micros_sum, ttft.as_micros() as u64);
                Metrics::add(&self.metrics.ttft_count, 1);
            } else {
                seq.context.push(seq.next.take().expect("decoding sequences have a token"));
            }
            rows[i] = Some(row);
        }
        // Sampling and detokenizing are per sequence: spread over the compute threads.
        let (gen, metrics, max_len) = (&self.gen, &*self.metrics, self.shape.max_len);
        finished.extend(match &out {
            // The step as a whole failed: every sequence in it fails (its cache may
            // hold part of the step).
            Err(e) => fed.into_iter().map(|i| (i, Finish::Failed(EngineError::Model(e.to_string())))).collect(),
            Ok(step) => (self.active.par_iter_mut().zip(rows).enumerate())
                .filter_map(|(i, (seq, row))| {
                    let outcome = match step.logits.get(row?) {
                        Ok(l) => seq.sample(&l, gen, metrics, max_len),
                        Err(e) => Some(Finish::Failed(EngineError::Model(e.to_string()))),
                    };
                    outcome.map(|f| (i, f))
                })
                .collect::<Vec<_>>(),
        });
        self.finish_all(finished);
        true
    }

    /// Ends the sequences at these indices of `active`.
    fn finish_all(&mut self, mut finished: Vec<(usize, Finish)>) {
        // Highest index first, so swap_remove leaves the others' indices valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, f) in finished {
            let seq = self.active.swap_remove(i);
            self.finish(seq, f);
        }
    }

    /// Ends a sequence: its cache goes back to its session (or is dropped, and
    /// zeroed), the ledger and metrics are updated, then the caller hears.
    fn finish(&mut self, mut seq: Seq, how: Finish) {
        self.now += 1;
        seq.usage.completion_tokens = seq.text.tokens().len();
        let tail = match &how {
            Finish::Done(_) => seq.text.finish(&self.gen.tokenizer).ok().flatten(),
            _ => None,
        };
        self.in_flight -= seq.reserved;
        let tenant = seq.tenant.id;
        let keep = !matches!(how, Finish::Failed(_));
        match (seq.session, keep) {
            (Some(key), true) => {
                // Give back the room reserved for tokens never generated.
                let _ = seq.cache.shrink_to_fit();
                let bytes = seq.cache.allocated_bytes() as u64;
                self.charge(tenant, bytes as i64 - seq.reserved as i64);
                let tokens = seq.context.len() as u32;
                let (entry, new) =
                    self.sessions.checkin(key, tenant, seq.tenant.epoch, std::mem::take(&mut seq.context), seq.cache);
                if new {
                    self.policies.on_insert(Entry {
                        id: entry,
                        tenant,
                        bytes,
                        tokens,
                        pinned: false,
                        inserted: self.now,
                    });
                } else {
                    self.policies.on_resize(entry, bytes, tokens);
                    self.policies.on_pin(entry, false);
                    self.policies.on_hit(entry, self.now);
                }
            }
            _ => {
                self.charge(tenant, -(seq.reserved as i64));
                if let Some(entry) = seq.entry {
                    // A failed run leaves the session's cache in doubt: drop it.
                    self.sessions.remove(entry);
                    self.policies.on_remove(entry);
                }
                // Dropping `seq.cache` zeroes it.
            }
        }
        self.publish();
        match how {
            Finish::Done(finish) => {
                if let Some(rest) = tail {
                    // Text held back for an incomplete character, flushed as is.
                    let _ = seq.tx.send(Event::Text(rest));
                }
                Metrics::add(&self.metrics.requests_finished, 1);
                let _ = seq.tx.send(Event::Done { finish, usage: seq.usage, isolation: seq.isolation });
            }
            Finish::Failed(e) => {
                Metrics::add(&self.metrics.requests_failed, 1);
                let _ = seq.tx.send(Event::Failed(e));
            }
            Finish::Cancelled => {}
        }
    }

    fn drop_tenant(&mut self, tenant: &Tenant) -> usize {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].tenant.id == tenant.id {
                let seq = self.active.swap_remove(i);
                // A failed sequence's session is dropped with it.
                self.finish(seq, Finish::Failed(EngineError::TenantDeleted));
            } else {
                i += 1;
            }
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|p| p.req.tenant.id == tenant.id);
        self.waiting = keep.into();
        for p in gone {
            let _ = p.tx.send(Event::Failed(EngineError::TenantDeleted));
        }
        let entries = self.sessions.entries_of(tenant.id);
        for &entry in &entries {
            self.remove_session(entry, false);
        }
        self.keyring.forget(&tenant.name, tenant.epoch);
        self.publish();
        entries.len()
    }

    fn rekey(&mut self, tenant: &Tenant, epoch: u64) -> Result<usize, EngineError> {
        let model_err = |e: candle_core::Error| EngineError::Model(e.to_string());
        // Each cache moves between the two epochs' frames of its own layout.
        let ring = &self.keyring;
        let frames = |layout: &crate::pad::Layout| -> Result<(Frame, Frame), EngineError> {
            let old = ring.padded_frame(&tenant.name, tenant.epoch, layout).map_err(model_err)?;
            let new = ring.padded_frame(&tenant.name, epoch, layout).map_err(model_err)?;
            Ok((old, new))
        };
        let mut done = 0;
        for entry in self.sessions.entries_of(tenant.id) {
            let Some(s) = self.sessions.get_mut(entry) else { continue };
            if let (Some(cache), true) = (s.cache.as_mut(), s.epoch == tenant.epoch) {
                let (old, new) = frames(cache.layout())?;
                cache.rekey(&old, &new).map_err(model_err)?;
                s.epoch = epoch;
                done += 1;
            }
        }
        for seq in self.active.iter_mut().filter(|s| s.tenant.id == tenant.id && s.tenant.epoch == tenant.epoch) {
            let (old, new) = frames(seq.cache.layout())?;
            seq.cache.rekey(&old, &new).map_err(model_err)?;
            seq.frame = new;
            seq.tenant.epoch = epoch;
        }
        self.keyring.forget(&tenant.name, tenant.epoch);
        Ok(done)
    }

    fn publish(&self) {
        let m = &self.metrics;
        Metrics::set(&m.sequences, self.active.len() as u64);
        Metrics::set(&m.queued, self.waiting.len() as u64);
        Metrics::set(&m.cache_bytes, self.used);
        let mut tenants: Vec<u64> = self.active.iter().map(|s| s.tenant.id).collect();
        tenants.sort_unstable();
        tenants.dedup();
        Metrics::set(&m.active_tenants, tenants.len() as u64);
        let mut by_tenant = m.tenant_bytes.lock().expect("metrics lock");
        if by_tenant.len() != self.tenant_bytes.len()
            || self.tenant_bytes.iter().any(|(t, b)| by_tenant.get(t) != Some(b))
        {
            *by_tenant = self.tenant_bytes.iter().map(|(&t, &b)| (t, b)).collect();
        }
    }

    fn shutdown(mut self) {
        for p in std::mem::take(&mut self.waiting) {
            let _ = p.tx.send(Event::Failed(EngineError::ShutDown));
        }
        for seq in std::mem::take(&mut self.active) {
            let _ = seq.tx.send(Event::Failed(EngineError::ShutDown));
        }
    }
}

/// What admission decided for a request: the layers attention verifies and its
/// cache's layout (the depth gate's), and the ledger's bytes.
struct Plan {
    verify: Vec<bool>,
    layout: crate::pad::Layout,
    /// Bytes its session's cache held before, and bytes reserved for it now.
    held: u64,
    reserved: u64,
}

/// Tokens `cached` shares with the start of `prompt`, leaving at least one prompt
/// token to run (its logits start the generation).
/// Moves what the corrective layer found in a sequence's cache during the last
/// forward pass into its report and the engine's metrics.
fn record_findings(metrics: &Metrics, seq: &mut Seq) {
    let findings = seq.cache.take_findings();
    seq.isolation.add(&findings);
    Metrics::add(&metrics.blocks_verified, findings.blocks_verified);
    Metrics::add(&metrics.pad_overflow, findings.pad_overflow);
    metrics.record_events(findings.events);
}

fn common_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1))
}

/// Whether `needed` bytes can never fit while `in_flight` bytes are held.
fn never_fits(needed: u64, budget: u64, in_flight: u64) -> bool {
    in_flight + needed > budget
}
