//! The host bindings wasmtime generates from the frozen WIT packages: the policy
//! worlds of every `kframe:policy` version this host loads (`wit/policy/v0.3.0`,
//! the newest, and `v0.2.0`), and the adversary world of `wit/probe/v0.1.0` (see
//! [`crate::versions`]). Types only, and the conversions an older version's records
//! need; how components are instantiated and called lives in [`crate::world`].

macro_rules! policy_worlds {
    ($path:literal) => {
        pub mod admission {
            wasmtime::component::bindgen!({
                path: $path,
                world: "admission-policy",
                additional_derives: [PartialEq],
            });
        }
        pub mod eviction {
            wasmtime::component::bindgen!({
                path: $path,
                world: "eviction-policy",
                with: { "kframe:policy/types": super::admission::kframe::policy::types },
            });
        }
        pub mod depth_gate {
            wasmtime::component::bindgen!({
                path: $path,
                world: "depth-gate-policy",
                with: { "kframe:policy/types": super::admission::kframe::policy::types },
            });
        }
        pub use admission::kframe::policy::types;
    };
}

/// `kframe:policy@0.3.0`: what the host speaks.
pub mod v0_3 {
    policy_worlds!("../../wit/policy/v0.3.0");
}

/// `kframe:policy@0.2.0`, loaded through the conversions below.
pub mod v0_2 {
    policy_worlds!("../../wit/policy/v0.2.0");
}

mod adversary {
    wasmtime::component::bindgen!({
        path: "../../wit/probe/v0.1.0",
        world: "adversary",
    });
}

pub use adversary::kframe::probe::{known_pairs, model_oracle, types as probe_types};
pub use adversary::{Adversary as AdversaryBindings, AdversaryPre};
pub use v0_3::types;

impl From<types::Entry> for kframe_entries::Entry {
    fn from(e: types::Entry) -> Self {
        Self { id: e.id, tenant: e.tenant, bytes: e.bytes, tokens: e.tokens, pinned: e.pinned, inserted: e.inserted }
    }
}

impl From<kframe_entries::Entry> for types::Entry {
    fn from(e: kframe_entries::Entry) -> Self {
        Self { id: e.id, tenant: e.tenant, bytes: e.bytes, tokens: e.tokens, pinned: e.pinned, inserted: e.inserted }
    }
}

/// The newest records as 0.2.0 has them (0.2.0's `request` lacks the tenant's
/// running and queued counts), and 0.2.0's answers as the newest.
pub mod to_v0_2 {
    use super::{types as new, v0_2::types as old};

    pub fn request(r: new::Request) -> old::Request {
        old::Request {
            tenant: r.tenant,
            tier: r.tier,
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            bytes_needed: r.bytes_needed,
            now: r.now,
        }
    }

    pub fn load(l: new::Load) -> old::Load {
        old::Load {
            active_sequences: l.active_sequences,
            queued: l.queued,
            queue_limit: l.queue_limit,
            cache_bytes: l.cache_bytes,
            cache_budget: l.cache_budget,
        }
    }

    pub fn admission(a: old::Admission) -> new::Admission {
        match a {
            old::Admission::Admit => new::Admission::Admit,
            old::Admission::Queue => new::Admission::Queue,
            old::Admission::Reject(reason) => new::Admission::Reject(reason),
        }
    }

    pub fn entry(e: new::Entry) -> old::Entry {
        old::Entry {
            id: e.id,
            tenant: e.tenant,
            bytes: e.bytes,
            tokens: e.tokens,
            pinned: e.pinned,
            inserted: e.inserted,
        }
    }

    pub fn shape(s: new::ModelShape) -> old::ModelShape {
        old::ModelShape { layers: s.layers, kv_heads: s.kv_heads, head_dim: s.head_dim }
    }

    pub fn gate(g: old::LayerGate) -> new::LayerGate {
        new::LayerGate { verify: g.verify, rotate: g.rotate, pad: g.pad }
    }
}
