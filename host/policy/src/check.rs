//! Every check possible before a component serves: its world, its version, its
//! configuration and one trial call under the limits.

use crate::adversary::{Adversary, Capability};
use crate::bindings::types::{Load, ModelShape, Request};
use crate::error::PluginError;
use crate::kind::{PolicyKind, WorldKind};
use crate::runtime::PluginRuntime;
use crate::world::{AdmissionWorld, DepthGateWorld, EvictionWorld};
use std::sync::Arc;

/// [`PluginRuntime::check`], then instantiates the component, runs its
/// `configure(config)` and one trial decision under the limits (an admission for an
/// idle server, victims from an empty cache, gates for a 4-layer model; an
/// adversary's `about`, with every capability linked).
pub fn validate(
    runtime: &Arc<PluginRuntime>,
    name: &str,
    bytes: &[u8],
    config: &str,
) -> Result<WorldKind, PluginError> {
    let kind = runtime.check(name, bytes)?;
    match kind {
        WorldKind::Policy(PolicyKind::Admission) => {
            let req = Request {
                tenant: 0,
                tier: 0,
                prompt_tokens: 1,
                max_tokens: 1,
                bytes_needed: 1,
                now: 0,
                tenant_running: 0,
                tenant_queued: 0,
            };
            let load = Load { active_sequences: 0, queued: 0, queue_limit: 1, cache_bytes: 0, cache_budget: 1 << 30 };
            runtime.load::<AdmissionWorld>(name, bytes, config)?.call(
                |_, _| Ok(()),
                |b, s| b.call_decide(s, req, load),
                |_| Ok(()),
            )?;
        }
        WorldKind::Policy(PolicyKind::Eviction) => {
            let empty = |ids: &Vec<u64>| match ids.is_empty() {
                true => Ok(()),
                false => Err(format!("{} victims from an empty cache", ids.len())),
            };
            runtime.load::<EvictionWorld>(name, bytes, config)?.call(
                |_, _| Ok(()),
                |b, s| b.call_victims(s, 0, 0),
                empty,
            )?;
        }
        WorldKind::Policy(PolicyKind::DepthGate) => {
            let shape = ModelShape { layers: 4, kv_heads: 1, head_dim: 128 };
            let four = |g: &Vec<_>| match g.len() {
                4 => Ok(()),
                n => Err(format!("{n} gates for 4 layers")),
            };
            runtime.load::<DepthGateWorld>(name, bytes, config)?.call(
                |_, _| Ok(()),
                |b, s| b.call_gates(s, shape, 0, 0),
                four,
            )?;
        }
        WorldKind::Adversary => {
            // Checked with every capability linked; an experiment links fewer.
            Adversary::load(runtime, name, bytes, config, &Capability::ALL)?;
        }
    }
    Ok(kind)
}
