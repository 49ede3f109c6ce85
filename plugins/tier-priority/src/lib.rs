//! Tiers under pressure: while the cache is below `high` percent of its budget
//! (default 75) every tier is admitted; above it, tiers below `min_tier` (default
//! 1) are queued (or rejected when the queue is full) so higher tiers keep the room.
use kframe_policy_sdk::{config_number, register_admission, Admission, AdmissionPolicy, Load, Request};

struct TierPriority {
    high_percent: u64,
    min_tier: u8,
}

impl Default for TierPriority {
    fn default() -> Self {
        Self { high_percent: 75, min_tier: 1 }
    }
}

impl AdmissionPolicy for TierPriority {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.high_percent = config_number(config, "high", 75)?;
        self.min_tier = config_number(config, "min_tier", 1)?.min(255) as u8;
        Ok(())
    }
    fn decide(&mut self, req: Request, load: Load) -> Admission {
        let after = load.cache_bytes + req.bytes_needed;
        if after > load.cache_budget {
            return if load.queued < load.queue_limit {
                Admission::Queue
            } else {
                Admission::Reject("cache full".into())
            };
        }
        let pressured = after * 100 > load.cache_budget * self.high_percent;
        if !pressured || req.tier >= self.min_tier {
            Admission::Admit
        } else if load.queued < load.queue_limit {
            Admission::Queue
        } else {
            Admission::Reject(format!("tier {} is paused under load", req.tier))
        }
    }
}

register_admission!(TierPriority);
