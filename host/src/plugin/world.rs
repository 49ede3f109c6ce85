//! The three policy worlds' host bindings (wasmtime `bindgen!` over `wit/policy`)
//! behind one trait, so loading, configuring and calling are written once.

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

pub use admission::kframe::policy::types;
pub use admission::{AdmissionPolicy, AdmissionPolicyPre};
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

pub struct Admission;
pub struct Eviction;
pub struct DepthGate;

impl World for Admission {
    const KIND: PolicyKind = PolicyKind::Admission;
    type Pre = AdmissionPolicyPre<Sandbox>;
    type Bindings = AdmissionPolicy;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
        AdmissionPolicyPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>> {
        b.call_configure(store, config)
    }
}

impl World for Eviction {
    const KIND: PolicyKind = PolicyKind::Eviction;
    type Pre = EvictionPolicyPre<Sandbox>;
    type Bindings = EvictionPolicy;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
        EvictionPolicyPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>> {
        b.call_configure(store, config)
    }
}

impl World for DepthGate {
    const KIND: PolicyKind = PolicyKind::DepthGate;
    type Pre = DepthGatePolicyPre<Sandbox>;
    type Bindings = DepthGatePolicy;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
        DepthGatePolicyPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>> {
        b.call_configure(store, config)
    }
}
