//! kframe-policy: policies and adversaries as sandboxed WebAssembly components.
//!
//! Operators swap kframe's admission, eviction and depth-gate policies at run time
//! by handing it a component that implements one world of `wit/policy`
//! (`kframe:policy@0.3.0`, or 0.2.0 through conversions). A component is compiled
//! and validated off the serving
//! path, then swapped in atomically; calls in flight finish on the old one. The
//! eval harness runs adversaries, components of the `kframe:probe` world, under the
//! same sandbox.
//!
//! # Layout
//!
//! - [`kind`]: the worlds a component may implement. [`error`]: what can go wrong
//!   with one. [`shipped`]: where kframe's own plugins are.
//! - [`versions`]: the WIT package versions this host loads, and the version a
//!   component declares (one place for version dispatch).
//! - [`bindings`]: what wasmtime generates from the frozen WIT folders.
//! - [`sandbox`]: the store data of an instance: memory limits, granted data.
//! - [`world`]: the four worlds behind one trait.
//! - [`runtime`]: the wasmtime engine, compiling and linking components, calls
//!   under limits, classifying failures.
//! - [`adversary`]: adversaries, linked with only the capabilities an experiment
//!   grants.
//! - [`check`]: every check possible before a component serves.
//! - [`fallback`]: the native policies that decide whenever a plugin cannot.
//! - [`set`]: [`PolicySet`], the live policies, their swaps and fallbacks.
//!
//! A plugin gets no filesystem, network, clock or randomness: every import it has
//! beyond its world traps when called. Each call runs under an epoch deadline and a
//! fuel budget, each instance under a memory limit. Any failure (trap, timeout,
//! out of fuel or memory, an invalid answer) is a typed [`PluginError`]; the
//! native fallback decides that call, a trapped instance is never entered again,
//! and after `max_failures` consecutive failures the plugin is quarantined.
//!
//! # Dependencies
//!
//! wasmtime and kframe-entries; nothing of the model (no candle). Modules point one
//! way: versions <- kind <- error; bindings <- sandbox <- world <- runtime <-
//! adversary <- check; fallback <- set.

pub mod adversary;
pub mod bindings;
pub mod check;
pub mod error;
pub mod fallback;
pub mod kind;
pub mod runtime;
pub mod sandbox;
pub mod set;
pub mod shipped;
pub mod versions;
pub mod world;

pub use bindings::types::{Admission, Entry, LayerGate, Load, ModelShape, Request};
pub use error::{Failure, PluginError};
pub use kind::{PolicyKind, WorldKind};
pub use runtime::{Limits, PluginRuntime};
pub use set::{DecidedBy, Decision, PolicySet, PolicyStats};
pub use shipped::{shipped, shipped_dir};
