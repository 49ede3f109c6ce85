//! Admits while the cache budget and the active-sequence limit allow, queues while
//! the queue has room, and rejects beyond. `max_active=N` (default 256); a request
//! that could never fit the cache budget is rejected outright. `per_tenant=N`
//! (default 0, no limit) queues a tenant's request while N of its own run, so that
//! each tenant gets its share of the running slots.
use kframe_policy_sdk::{config_number, register_admission, Admission, AdmissionPolicy, Load, Request};

struct Capacity {
    max_active: u64,
    per_tenant: u64,
}

impl Default for Capacity {
    fn default() -> Self {
        Self { max_active: 256, per_tenant: 0 }
    }
}

impl AdmissionPolicy for Capacity {
    fn configure(&mut self, config: &str) -> Result<(), String> {
        self.max_active = config_number(config, "max_active", 256)?;
        self.per_tenant = config_number(config, "per_tenant", 0)?;
        Ok(())
    }
    fn decide(&mut self, req: Request, load: Load) -> Admission {
        if req.bytes_needed > load.cache_budget {
            return Admission::Reject(format!(
                "needs {} cache bytes, the budget is {}",
                req.bytes_needed, load.cache_budget
            ));
        }
        let fits = load.cache_bytes + req.bytes_needed <= load.cache_budget;
        let own_share = self.per_tenant == 0 || (req.tenant_running as u64) < self.per_tenant;
        if fits && own_share && (load.active_sequences as u64) < self.max_active {
            Admission::Admit
        } else if load.queued < load.queue_limit {
            Admission::Queue
        } else {
            Admission::Reject("server at capacity".into())
        }
    }
}

register_admission!(Capacity);
