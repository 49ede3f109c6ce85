//! Admission: a request's door into the engine. It is validated, its session
//! checked out, its context source chosen (the session's cache, a shared prefix or
//! nothing), its layout and verified layers taken from the depth gate, its bytes
//! reserved and the admission policy asked; then it starts running, waits in the
//! queue, or is turned away.

use crate::api::{EngineError, Event, PrefixMode, Usage};
use crate::isolation::IsolationReport;
use crate::metrics::Metrics;
use crate::sessions::{Checkout, SessionKey};
use crate::state::{Pending, Seq, State};
use kframe_core::cache::{KvCache, SharedPrefix};
use kframe_model::generate::{sampler, TextStream};
use kframe_policy::{Admission, Load, ModelShape, Request};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long an admission-queued request may wait before it is turned away.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// What admission decided for a request: the layers attention verifies and its
/// cache's layout (the depth gate's), and the ledger's bytes.
pub(crate) struct Plan {
    verify: Vec<bool>,
    layout: kframe_core::layout::Layout,
    /// Bytes its session's cache held before, and bytes reserved for it now.
    held: u64,
    reserved: u64,
}

impl State {
    pub(crate) fn reject(&mut self, p: Pending, err: EngineError) {
        Metrics::add(&self.metrics.requests_failed, 1);
        if matches!(err, EngineError::Rejected(_) | EngineError::QueueFull(_) | EngineError::OverBudget { .. }) {
            Metrics::add(&self.metrics.admissions_rejected, 1);
        }
        let _ = p.tx.send(Event::Failed(err));
    }

    /// Decides a request. Returns it back if it must wait.
    pub(crate) fn admit(&mut self, p: Pending, from_queue: bool) -> Option<Pending> {
        if let Err(e) = self.validate(&p.req.prompt) {
            self.reject(p, e);
            return None;
        }
        let tenant = p.req.tenant.id;
        let (quota, max_requests) = self.cfg.limits_for(p.req.tenant.tier);
        if !from_queue {
            // The tenant's share of the engine's attention: running and waiting.
            let running = self.active.iter().filter(|s| s.tenant.id == tenant).count();
            let waiting = self.waiting.iter().filter(|w| w.req.tenant.id == tenant).count();
            if running + waiting >= max_requests as usize {
                self.reject(p, EngineError::TenantBusy { limit: max_requests });
                return None;
            }
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
            tenant_running: self.active.iter().filter(|s| s.tenant.id == tenant).count() as u32,
            tenant_queued: self.waiting.iter().filter(|w| w.req.tenant.id == tenant).count() as u32,
        };
        // Idle sessions do not count as load: eviction can free them.
        let load = Load {
            active_sequences: self.active.len() as u32,
            queued: self.waiting.len() as u32,
            queue_limit: self.cfg.queue_limit,
            cache_bytes: self.ledger.in_flight,
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
            // The tenant's own sessions make room within its quota first, so that
            // its churn never evicts another tenant's while it can pay itself.
            Admission::Admit => !(self.make_room_within_quota(tenant, needed, quota) && self.make_room(needed)),
        };
        if wait {
            self.give_back(&key, p.req.tenant.id, checkout);
            if needed > self.cfg.kv_budget {
                // Bigger than the whole budget: nothing will ever free enough.
                self.reject(p, EngineError::OverBudget { needed, budget: self.cfg.kv_budget });
                return None;
            }
            // With nothing of the tenant's running, its idle sessions can all make
            // room (the one it continues is reused): only a request bigger than the
            // quota itself can never fit.
            let own_running = self.active.iter().any(|s| s.tenant.id == tenant);
            if !own_running && reserve > quota {
                self.reject(p, EngineError::OverQuota { needed: reserve, quota });
                return None;
            }
            if self.active.is_empty() && never_fits(needed, self.cfg.kv_budget, self.ledger.in_flight) {
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

    /// Returns a checked-out session unchanged.
    pub(crate) fn give_back(&mut self, key: &Option<SessionKey>, tenant: u64, checkout: Checkout) {
        if let (Some(key), Checkout::Cached { entry, epoch, tokens, cache, .. }) = (key, checkout) {
            self.sessions.checkin(*key, tenant, epoch, tokens, cache);
            self.policies.on_pin(entry, false);
        }
    }

    pub(crate) fn start(
        &mut self,
        p: Pending,
        key: Option<SessionKey>,
        checkout: Checkout,
        prefix: Option<Arc<SharedPrefix>>,
        plan: Plan,
    ) {
        let Pending { req, tx, .. } = p;
        let Plan { verify, layout, held, reserved } = plan;
        let frame = match self.keyring.padded_frame(&req.tenant.key_id, req.tenant.epoch, &layout) {
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
                    self.ledger.charge(req.tenant.id, -(held as i64));
                }
                return;
            }
        };
        // The session's bytes move from the idle pool to this sequence.
        self.ledger.charge(req.tenant.id, reserved as i64 - held as i64);
        self.ledger.in_flight += reserved;
        Metrics::add(&self.metrics.prompt_tokens_cached, common as u64);
        let _ = tx.send(Event::Started { cached_tokens: common });
        self.active.push(Seq {
            frame,
            session: key,
            discard_session: false,
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

    pub(crate) fn retry_waiting(&mut self) {
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
}

pub(crate) fn common_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    cached.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1))
}

/// Whether `needed` bytes can never fit while `in_flight` bytes are held.
fn never_fits(needed: u64, budget: u64, in_flight: u64) -> bool {
    in_flight + needed > budget
}
