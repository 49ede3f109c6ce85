//! The host bindings of the three policy worlds (wasmtime `bindgen!` over
//! `wit/policy`) and of the adversary world (`wit/probe`), behind one trait, so
//! loading, configuring and calling are written once.

use super::runtime::Sandbox;
use super::PolicyKind;
use wasmtime::component::InstancePre;
use wasmtime::Store;

mod admission {
    wasmtime::component::bindgen!({
        path: "../wit/policy",
        world: "admission-policy",
        additional_derives: [PartialEq],
    });
}
mod eviction {
    wasmtime::component::bindgen!({
        path: "../wit/policy",
        world: "eviction-policy",
        with: { "kframe:policy/types": super::admission::kframe::policy::types },
    });
}
mod depth_gate {
    wasmtime::component::bindgen!({
        path: "../wit/policy",
        world: "depth-gate-policy",
        with: { "kframe:policy/types": super::admission::kframe::policy::types },
    });
}

mod adversary {
    wasmtime::component::bindgen!({
        path: "../wit/probe",
        world: "adversary",
    });
}

pub use admission::kframe::policy::types;
pub use admission::{AdmissionPolicy, AdmissionPolicyPre};
pub use adversary::kframe::probe::{known_pairs, model_oracle, types as probe_types};
pub use adversary::{Adversary as AdversaryBindings, AdversaryPre};
pub use depth_gate::{DepthGatePolicy, DepthGatePolicyPre};
pub use eviction::{EvictionPolicy, EvictionPolicyPre};

/// One policy world: how to type-check a component against it, instantiate it and
/// configure it.
pub trait World: Send + 'static {
    const KIND: PolicyKind;
    type Pre: Clone + Send + Sync;
    type Bindings: Send;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings>;
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>>;
}

/// Implements [`World`] for a marker type over one world's generated bindings.
macro_rules! world {
    ($marker:ident, $kind:ident, $pre:ident, $bindings:ident) => {
        pub struct $marker;

        impl World for $marker {
            const KIND: PolicyKind = PolicyKind::$kind;
            type Pre = $pre<Sandbox>;
            type Bindings = $bindings;
            fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
                $pre::new(pre)
            }
            fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate(store)
            }
            fn configure(
                b: &Self::Bindings,
                store: &mut Store<Sandbox>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                b.call_configure(store, config)
            }
        }
    };
}

world!(Admission, Admission, AdmissionPolicyPre, AdmissionPolicy);
world!(Eviction, Eviction, EvictionPolicyPre, EvictionPolicy);
world!(DepthGate, DepthGate, DepthGatePolicyPre, DepthGatePolicy);
world!(Adversary, Adversary, AdversaryPre, AdversaryBindings);
