//! The guest side of kframe's plugins: policies and adversaries.
//!
//! A policy is a type that implements one trait ([`AdmissionPolicy`],
//! [`EvictionPolicy`] or [`DepthGatePolicy`]) and registers it with the matching
//! macro (an adversary implements [`Adversary`] and registers it with
//! `register_adversary!`); the crate is built with `cargo build --release --target wasm32-wasip2` and
//! the resulting `.wasm` is a component kframe loads. Enable the feature of the
//! world you implement (`admission`, `eviction`, `depth-gate` or `adversary`), one per
//! crate.
//!
//! ```ignore
//! use kframe_policy_sdk::{register_eviction, EntryTable, EvictionPolicy};
//!
//! #[derive(Default)]
//! struct Fifo(EntryTable);
//!
//! impl EvictionPolicy for Fifo {
//!     fn table(&mut self) -> &mut EntryTable { &mut self.0 }
//!     fn victims(&mut self, bytes: u64, _now: u64) -> Vec<u64> {
//!         self.0.lowest_first(bytes, |e| e.entry.inserted)
//!     }
//! }
//! register_eviction!(Fifo);
//! ```

#[doc(hidden)]
pub use wit_bindgen;

/// Makes a panic end the call as a plain trap. Without it, std's default hook
/// tries to print to stderr, an import the host never grants, and the host would
/// report a denied capability instead of the panic.
#[doc(hidden)]
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|_| {}));
}

#[cfg(feature = "admission")]
pub mod admission {
    wit_bindgen::generate!({
        path: "../../wit/policy/v0.3.0",
        world: "admission-policy",
        pub_export_macro: true,
        export_macro_name: "export_admission_world",
        default_bindings_module: "kframe_policy_sdk::admission",
    });
}

#[cfg(feature = "eviction")]
pub mod eviction {
    wit_bindgen::generate!({
        path: "../../wit/policy/v0.3.0",
        world: "eviction-policy",
        pub_export_macro: true,
        export_macro_name: "export_eviction_world",
        default_bindings_module: "kframe_policy_sdk::eviction",
    });
}

#[cfg(feature = "depth-gate")]
pub mod depth_gate {
    wit_bindgen::generate!({
        path: "../../wit/policy/v0.3.0",
        world: "depth-gate-policy",
        pub_export_macro: true,
        export_macro_name: "export_depth_gate_world",
        default_bindings_module: "kframe_policy_sdk::depth_gate",
    });
}

#[cfg(feature = "adversary")]
pub mod adversary {
    wit_bindgen::generate!({
        path: "../../wit/probe/v0.1.0",
        world: "adversary",
        pub_export_macro: true,
        export_macro_name: "export_adversary_world",
        default_bindings_module: "kframe_policy_sdk::adversary",
    });
}

#[cfg(feature = "admission")]
pub use admission::{Admission, Load, Request};
/// Capabilities are imports: an adversary that calls `known_pairs::pairs` or
/// `model_oracle::plain_k` imports them, and runs only in experiments that grant them.
#[cfg(feature = "adversary")]
pub use adversary::kframe::probe::{
    known_pairs, model_oracle,
    types::{About, Guess, OwnVector, Task, Vector, View},
};
#[cfg(feature = "depth-gate")]
pub use depth_gate::{LayerGate, ModelShape};
#[cfg(feature = "eviction")]
pub use eviction::Entry;

/// Parses `key=value` pairs separated by commas or whitespace, the configuration
/// format the shipped policies use.
pub fn config_pairs(config: &str) -> impl Iterator<Item = (&str, &str)> {
    config
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// Reads a numeric `key=value`; `default` when absent.
pub fn config_number(config: &str, key: &str, default: u64) -> Result<u64, String> {
    match config_pairs(config).find(|(k, _)| *k == key) {
        None => Ok(default),
        Some((_, v)) => v.parse().map_err(|_| format!("{key}={v:?} is not a number")),
    }
}

#[cfg(feature = "admission")]
pub trait AdmissionPolicy: Default + 'static {
    fn configure(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }
    fn decide(&mut self, req: Request, load: Load) -> Admission;
}

#[cfg(feature = "depth-gate")]
pub trait DepthGatePolicy: Default + 'static {
    fn configure(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }
    /// One gate per layer of `shape`.
    fn gates(&mut self, shape: ModelShape, tenant: u64, context_len: u32) -> Vec<LayerGate>;
}

/// The bookkeeping every eviction policy needs (the live entries, their hits, last
/// use and pin state), kept up to date by [`EvictionPolicy`]'s default hooks. The
/// host keeps the same table (kframe-entries) to check the victims a policy names.
#[cfg(feature = "eviction")]
pub use kframe_entries::{take_until, EntryTable, Tracked};

#[cfg(feature = "eviction")]
impl From<Entry> for kframe_entries::Entry {
    fn from(e: Entry) -> Self {
        Self { id: e.id, tenant: e.tenant, bytes: e.bytes, tokens: e.tokens, pinned: e.pinned, inserted: e.inserted }
    }
}

#[cfg(feature = "eviction")]
pub trait EvictionPolicy: Default + 'static {
    fn configure(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }
    /// The policy's entry table; the default hooks below keep it current.
    fn table(&mut self) -> &mut EntryTable;
    fn on_insert(&mut self, entry: Entry) {
        self.table().insert(entry.into())
    }
    fn on_hit(&mut self, id: u64, now: u64) {
        self.table().hit(id, now)
    }
    fn on_pin(&mut self, id: u64, pinned: bool) {
        self.table().pin(id, pinned)
    }
    fn on_remove(&mut self, id: u64) {
        self.table().remove(id)
    }
    /// Unpinned live entries to evict, in order, freeing at least `bytes_needed`.
    fn victims(&mut self, bytes_needed: u64, now: u64) -> Vec<u64>;
}

/// An attack on kframe's rotation substrate (world `kframe:probe/adversary`).
/// Like a policy, it runs with no filesystem, clock or randomness: std's
/// `HashMap` seeds itself from randomness and traps here, so use a `BTreeMap`
/// (or a fixed hasher).
#[cfg(feature = "adversary")]
pub trait Adversary: Default + 'static {
    fn configure(&mut self, _config: &str) -> Result<(), String> {
        Ok(())
    }
    /// Its name and the tasks it answers.
    fn about(&self) -> About;
    fn attack(&mut self, view: View) -> Result<Guess, String>;
}

/// Cosine similarity of two rows (0 when either is zero).
#[cfg(feature = "adversary")]
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64) * (*x as f64);
        bb += (*y as f64) * (*y as f64);
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (ab / (aa.sqrt() * bb.sqrt())) as f32
    }
}

/// Euclidean norm of a row.
#[cfg(feature = "adversary")]
pub fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32
}

/// Exports a type implementing [`Adversary`] as the component's adversary.
#[cfg(feature = "adversary")]
#[macro_export]
macro_rules! register_adversary {
    ($probe:ty) => {
        thread_local! {
            static KFRAME_PROBE: ::std::cell::RefCell<$probe> = ::std::cell::RefCell::new(<$probe>::default());
        }
        struct KframeAdversary;
        impl $crate::adversary::Guest for KframeAdversary {
            fn configure(config: String) -> Result<(), String> {
                $crate::quiet_panics();
                KFRAME_PROBE.with(|p| $crate::Adversary::configure(&mut *p.borrow_mut(), &config))
            }
            fn about() -> $crate::About {
                KFRAME_PROBE.with(|p| $crate::Adversary::about(&*p.borrow()))
            }
            fn attack(view: $crate::View) -> Result<$crate::Guess, String> {
                KFRAME_PROBE.with(|p| $crate::Adversary::attack(&mut *p.borrow_mut(), view))
            }
        }
        $crate::adversary::export_adversary_world!(KframeAdversary);
    };
}

/// Exports a type implementing [`AdmissionPolicy`] as the component's policy.
#[cfg(feature = "admission")]
#[macro_export]
macro_rules! register_admission {
    ($policy:ty) => {
        thread_local! {
            static KFRAME_POLICY: ::std::cell::RefCell<$policy> = ::std::cell::RefCell::new(<$policy>::default());
        }
        struct KframeAdmission;
        impl $crate::admission::Guest for KframeAdmission {
            fn configure(config: String) -> Result<(), String> {
                $crate::quiet_panics();
                KFRAME_POLICY.with(|p| $crate::AdmissionPolicy::configure(&mut *p.borrow_mut(), &config))
            }
            fn decide(req: $crate::Request, load: $crate::Load) -> $crate::Admission {
                KFRAME_POLICY.with(|p| $crate::AdmissionPolicy::decide(&mut *p.borrow_mut(), req, load))
            }
        }
        $crate::admission::export_admission_world!(KframeAdmission);
    };
}

/// Exports a type implementing [`EvictionPolicy`] as the component's policy.
#[cfg(feature = "eviction")]
#[macro_export]
macro_rules! register_eviction {
    ($policy:ty) => {
        thread_local! {
            static KFRAME_POLICY: ::std::cell::RefCell<$policy> = ::std::cell::RefCell::new(<$policy>::default());
        }
        struct KframeEviction;
        impl $crate::eviction::Guest for KframeEviction {
            fn configure(config: String) -> Result<(), String> {
                $crate::quiet_panics();
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::configure(&mut *p.borrow_mut(), &config))
            }
            fn on_insert(e: $crate::Entry) {
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::on_insert(&mut *p.borrow_mut(), e))
            }
            fn on_hit(id: u64, now: u64) {
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::on_hit(&mut *p.borrow_mut(), id, now))
            }
            fn on_pin(id: u64, pinned: bool) {
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::on_pin(&mut *p.borrow_mut(), id, pinned))
            }
            fn on_remove(id: u64) {
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::on_remove(&mut *p.borrow_mut(), id))
            }
            fn victims(bytes_needed: u64, now: u64) -> Vec<u64> {
                KFRAME_POLICY.with(|p| $crate::EvictionPolicy::victims(&mut *p.borrow_mut(), bytes_needed, now))
            }
        }
        $crate::eviction::export_eviction_world!(KframeEviction);
    };
}

/// Exports a type implementing [`DepthGatePolicy`] as the component's policy.
#[cfg(feature = "depth-gate")]
#[macro_export]
macro_rules! register_depth_gate {
    ($policy:ty) => {
        thread_local! {
            static KFRAME_POLICY: ::std::cell::RefCell<$policy> = ::std::cell::RefCell::new(<$policy>::default());
        }
        struct KframeDepthGate;
        impl $crate::depth_gate::Guest for KframeDepthGate {
            fn configure(config: String) -> Result<(), String> {
                $crate::quiet_panics();
                KFRAME_POLICY.with(|p| $crate::DepthGatePolicy::configure(&mut *p.borrow_mut(), &config))
            }
            fn gates(shape: $crate::ModelShape, tenant: u64, context_len: u32) -> Vec<$crate::LayerGate> {
                KFRAME_POLICY.with(|p| $crate::DepthGatePolicy::gates(&mut *p.borrow_mut(), shape, tenant, context_len))
            }
        }
        $crate::depth_gate::export_depth_gate_world!(KframeDepthGate);
    };
}
