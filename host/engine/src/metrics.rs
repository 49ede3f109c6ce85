//! Counters the engine keeps for the HTTP layer's /metrics: written by the
//! worker, read by anyone.

use kframe_core::integrity::IsolationEvent;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    pub(super) active_tenants: AtomicU64,
    pub(super) sequences: AtomicU64,
    pub(super) queued: AtomicU64,
    pub(super) batch_size: AtomicU64,
    pub(super) decode_steps: AtomicU64,
    pub(super) tokens_generated: AtomicU64,
    pub(super) prompt_tokens_prefilled: AtomicU64,
    pub(super) prompt_tokens_cached: AtomicU64,
    pub(super) requests_finished: AtomicU64,
    pub(super) requests_failed: AtomicU64,
    pub(super) ttft_micros_sum: AtomicU64,
    pub(super) ttft_count: AtomicU64,
    pub(super) compute_micros: AtomicU64,
    pub(super) cache_bytes: AtomicU64,
    pub(super) keyring_bytes: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) admissions_rejected: AtomicU64,
    pub(super) isolation_events: AtomicU64,
    pub(super) blocks_verified: AtomicU64,
    pub(super) pad_overflow: AtomicU64,
    pub(super) tenant_bytes: Mutex<BTreeMap<u64, u64>>,
    /// The most recent isolation events, oldest first.
    pub(super) recent_events: Mutex<VecDeque<IsolationEvent>>,
}

/// Isolation events kept for the admin API; older ones are only counted.
pub const RECENT_EVENTS: usize = 1024;

impl Metrics {
    pub(super) fn record_events(&self, events: Vec<IsolationEvent>) {
        if events.is_empty() {
            return;
        }
        Metrics::add(&self.isolation_events, events.len() as u64);
        let mut recent = self.recent_events.lock().expect("events lock");
        for e in events {
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(e);
        }
    }

    pub fn recent_events(&self) -> Vec<IsolationEvent> {
        self.recent_events.lock().expect("events lock").iter().cloned().collect()
    }
}

/// A consistent-enough copy of the counters (each read atomically).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetricsSnapshot {
    pub active_tenants: u64,
    pub sequences: u64,
    pub queued: u64,
    /// Sequences in the last decode step.
    pub batch_size: u64,
    pub decode_steps: u64,
    pub tokens_generated: u64,
    pub prompt_tokens_prefilled: u64,
    pub prompt_tokens_cached: u64,
    pub requests_finished: u64,
    pub requests_failed: u64,
    /// Mean time to first token over finished prefills, seconds.
    pub mean_ttft_seconds: f64,
    /// Seconds the worker spent in model compute.
    pub compute_seconds: f64,
    /// Generated tokens per second of compute.
    pub tokens_per_second: f64,
    /// Allocated K/V bytes over all caches.
    pub cache_bytes: u64,
    pub cache_bytes_by_tenant: BTreeMap<u64, u64>,
    /// Bytes of rotation matrices the keyring keeps derived.
    pub keyring_bytes: u64,
    pub evictions: u64,
    pub admissions_rejected: u64,
    pub isolation_events: u64,
    /// Cache blocks whose tags attention verified.
    pub blocks_verified: u64,
    /// Rows written unpadded on a padded layer: their norm exceeded the calibration.
    pub pad_overflow: u64,
    pub plugin_failures: u64,
    pub plugin_seconds: f64,
}

impl Metrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let ttft_count = self.ttft_count.load(Relaxed);
        let compute = self.compute_micros.load(Relaxed) as f64 * 1e-6;
        let tokens = self.tokens_generated.load(Relaxed);
        MetricsSnapshot {
            active_tenants: self.active_tenants.load(Relaxed),
            sequences: self.sequences.load(Relaxed),
            queued: self.queued.load(Relaxed),
            batch_size: self.batch_size.load(Relaxed),
            decode_steps: self.decode_steps.load(Relaxed),
            tokens_generated: tokens,
            prompt_tokens_prefilled: self.prompt_tokens_prefilled.load(Relaxed),
            prompt_tokens_cached: self.prompt_tokens_cached.load(Relaxed),
            requests_finished: self.requests_finished.load(Relaxed),
            requests_failed: self.requests_failed.load(Relaxed),
            mean_ttft_seconds: if ttft_count == 0 {
                0.0
            } else {
                self.ttft_micros_sum.load(Relaxed) as f64 * 1e-6 / ttft_count as f64
            },
            compute_seconds: compute,
            tokens_per_second: if compute > 0.0 { tokens as f64 / compute } else { 0.0 },
            cache_bytes: self.cache_bytes.load(Relaxed),
            cache_bytes_by_tenant: self.tenant_bytes.lock().expect("metrics lock").clone(),
            keyring_bytes: self.keyring_bytes.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            admissions_rejected: self.admissions_rejected.load(Relaxed),
            isolation_events: self.isolation_events.load(Relaxed),
            blocks_verified: self.blocks_verified.load(Relaxed),
            pad_overflow: self.pad_overflow.load(Relaxed),
            plugin_failures: 0,
            plugin_seconds: 0.0,
        }
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(super) fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Relaxed);
    }
}
