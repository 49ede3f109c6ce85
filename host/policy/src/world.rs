//! The four worlds behind one trait, so that loading, configuring and calling a
//! component are written once; and for each policy world, every WIT version the
//! host loads behind one type. A component built for an older version runs through
//! the conversions of [`crate::bindings::to_v0_2`]: the host always speaks the
//! newest records, and an older component sees them as it was built to.

use crate::bindings::{to_v0_2, types, v0_2, v0_3, AdversaryBindings, AdversaryPre};
use crate::kind::{PolicyKind, WorldKind};
use crate::sandbox::Sandbox;
use wasmtime::component::InstancePre;
use wasmtime::Store;

/// One world: how to type-check a component against it, instantiate it and
/// configure it.
pub trait World: Send + 'static {
    const KIND: WorldKind;
    type Pre: Clone + Send + Sync;
    type Bindings: Send;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings>;
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>>;
}

/// A policy world over every version: the marker, its kind, the enums of its
/// pre-instances and instances, and the generated types of each version.
macro_rules! versioned_world {
    ($marker:ident, $kind:ident, $pre:ident, $bindings:ident, $module:ident, $pre_ty:ident, $ty:ident) => {
        pub struct $marker;

        /// A type-checked component of this world, in the version it was built for.
        #[derive(Clone)]
        pub enum $pre {
            V0_3(v0_3::$module::$pre_ty<Sandbox>),
            V0_2(v0_2::$module::$pre_ty<Sandbox>),
        }

        /// A live instance of this world, in the version it was built for.
        pub enum $bindings {
            V0_3(v0_3::$module::$ty),
            V0_2(v0_2::$module::$ty),
        }

        impl World for $marker {
            const KIND: WorldKind = WorldKind::Policy(PolicyKind::$kind);
            type Pre = $pre;
            type Bindings = $bindings;
            fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
                match v0_3::$module::$pre_ty::new(pre.clone()) {
                    Ok(p) => Ok($pre::V0_3(p)),
                    Err(newest) => v0_2::$module::$pre_ty::new(pre).map($pre::V0_2).map_err(|_| newest),
                }
            }
            fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
                Ok(match pre {
                    $pre::V0_3(p) => $bindings::V0_3(p.instantiate(store)?),
                    $pre::V0_2(p) => $bindings::V0_2(p.instantiate(store)?),
                })
            }
            fn configure(
                b: &Self::Bindings,
                store: &mut Store<Sandbox>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                match b {
                    $bindings::V0_3(b) => b.call_configure(store, config),
                    $bindings::V0_2(b) => b.call_configure(store, config),
                }
            }
        }
    };
}

versioned_world!(
    AdmissionWorld,
    Admission,
    AdmissionPre,
    AdmissionBindings,
    admission,
    AdmissionPolicyPre,
    AdmissionPolicy
);
versioned_world!(EvictionWorld, Eviction, EvictionPre, EvictionBindings, eviction, EvictionPolicyPre, EvictionPolicy);
versioned_world!(
    DepthGateWorld,
    DepthGate,
    DepthGatePre,
    DepthGateBindings,
    depth_gate,
    DepthGatePolicyPre,
    DepthGatePolicy
);

type Run<T> = wasmtime::Result<T>;

impl AdmissionBindings {
    pub fn call_decide(&self, s: &mut Store<Sandbox>, req: types::Request, load: types::Load) -> Run<types::Admission> {
        match self {
            Self::V0_3(b) => b.call_decide(s, req, load),
            Self::V0_2(b) => b.call_decide(s, to_v0_2::request(req), to_v0_2::load(load)).map(to_v0_2::admission),
        }
    }
}

impl EvictionBindings {
    pub fn call_on_insert(&self, s: &mut Store<Sandbox>, e: types::Entry) -> Run<()> {
        match self {
            Self::V0_3(b) => b.call_on_insert(s, e),
            Self::V0_2(b) => b.call_on_insert(s, to_v0_2::entry(e)),
        }
    }

    pub fn call_on_hit(&self, s: &mut Store<Sandbox>, id: u64, now: u64) -> Run<()> {
        match self {
            Self::V0_3(b) => b.call_on_hit(s, id, now),
            Self::V0_2(b) => b.call_on_hit(s, id, now),
        }
    }

    pub fn call_on_pin(&self, s: &mut Store<Sandbox>, id: u64, pinned: bool) -> Run<()> {
        match self {
            Self::V0_3(b) => b.call_on_pin(s, id, pinned),
            Self::V0_2(b) => b.call_on_pin(s, id, pinned),
        }
    }

    pub fn call_on_remove(&self, s: &mut Store<Sandbox>, id: u64) -> Run<()> {
        match self {
            Self::V0_3(b) => b.call_on_remove(s, id),
            Self::V0_2(b) => b.call_on_remove(s, id),
        }
    }

    pub fn call_victims(&self, s: &mut Store<Sandbox>, bytes_needed: u64, now: u64) -> Run<Vec<u64>> {
        match self {
            Self::V0_3(b) => b.call_victims(s, bytes_needed, now),
            Self::V0_2(b) => b.call_victims(s, bytes_needed, now),
        }
    }
}

impl DepthGateBindings {
    pub fn call_gates(
        &self,
        s: &mut Store<Sandbox>,
        shape: types::ModelShape,
        tenant: u64,
        context: u32,
    ) -> Run<Vec<types::LayerGate>> {
        match self {
            Self::V0_3(b) => b.call_gates(s, shape, tenant, context),
            Self::V0_2(b) => b
                .call_gates(s, to_v0_2::shape(shape), tenant, context)
                .map(|g| g.into_iter().map(to_v0_2::gate).collect()),
        }
    }
}

/// The adversary world has one version.
pub struct AdversaryWorld;

impl World for AdversaryWorld {
    const KIND: WorldKind = WorldKind::Adversary;
    type Pre = AdversaryPre<Sandbox>;
    type Bindings = AdversaryBindings;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
        AdversaryPre::new(pre)
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>) -> wasmtime::Result<Self::Bindings> {
        pre.instantiate(store)
    }
    fn configure(b: &Self::Bindings, store: &mut Store<Sandbox>, config: &str) -> wasmtime::Result<Result<(), String>> {
        b.call_configure(store, config)
    }
}
