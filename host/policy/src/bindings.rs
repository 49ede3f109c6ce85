//! The host bindings wasmtime generates from the frozen WIT packages: the three
//! policy worlds of `wit/policy/v0.2.0` and the adversary world of
//! `wit/probe/v0.1.0` (see [`crate::versions`]). Types only: how they are
//! instantiated and called lives in [`crate::world`].

mod admission {
    wasmtime::component::bindgen!({
        path: "../../wit/policy/v0.2.0",
        world: "admission-policy",
        additional_derives: [PartialEq],
    });
}
mod eviction {
    wasmtime::component::bindgen!({
        path: "../../wit/policy/v0.2.0",
        world: "eviction-policy",
        with: { "kframe:policy/types": super::admission::kframe::policy::types },
    });
}
mod depth_gate {
    wasmtime::component::bindgen!({
        path: "../../wit/policy/v0.2.0",
        world: "depth-gate-policy",
        with: { "kframe:policy/types": super::admission::kframe::policy::types },
    });
}
mod adversary {
    wasmtime::component::bindgen!({
        path: "../../wit/probe/v0.1.0",
        world: "adversary",
    });
}

pub use admission::kframe::policy::types;
pub use admission::{AdmissionPolicy, AdmissionPolicyPre};
pub use adversary::kframe::probe::{known_pairs, model_oracle, types as probe_types};
pub use adversary::{Adversary as AdversaryBindings, AdversaryPre};
pub use depth_gate::{DepthGatePolicy, DepthGatePolicyPre};
pub use eviction::{EvictionPolicy, EvictionPolicyPre};

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
