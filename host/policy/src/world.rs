//! The four worlds behind one trait, so that loading, configuring and calling a
//! component are written once.

use crate::bindings::{
    AdmissionPolicy, AdmissionPolicyPre, AdversaryBindings, AdversaryPre, DepthGatePolicy, DepthGatePolicyPre,
    EvictionPolicy, EvictionPolicyPre,
};
use crate::kind::{PolicyKind, WorldKind};
use crate::sandbox::Sandbox;
use wasmtime::component::InstancePre;
use wasmtime::Store;

/// One policy world: how to type-check a component against it, instantiate it and
/// configure it.
pub trait World: Send + 'static {
    const KIND: WorldKind;
    type Pre: Clone + Send + Sync;
    type Bindings: Send;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings>;
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>>;
}

/// Implements [`World`] for a marker type over one world's generated bindings.
macro_rules! world {
    ($marker:ident, $kind:expr, $pre:ident, $bindings:ident) => {
        pub struct $marker;

        impl World for $marker {
            const KIND: WorldKind = $kind;
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

world!(AdmissionWorld, WorldKind::Policy(PolicyKind::Admission), AdmissionPolicyPre, AdmissionPolicy);
world!(EvictionWorld, WorldKind::Policy(PolicyKind::Eviction), EvictionPolicyPre, EvictionPolicy);
world!(DepthGateWorld, WorldKind::Policy(PolicyKind::DepthGate), DepthGatePolicyPre, DepthGatePolicy);
world!(AdversaryWorld, WorldKind::Adversary, AdversaryPre, AdversaryBindings);
