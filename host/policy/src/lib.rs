//! kframe-policy: policies and adversaries as sandboxed WebAssembly components.
//!
//! Operators swap kframe's admission, eviction and depth-gate policies at run time
//! by handing it a component that implements one world of `wit/policy`
//! (`kframe:policy@0.2.0`). A component is compiled and validated off the serving
//! path, then swapped in atomically; calls in flight finish on the old one. The
//! eval harness runs adversaries, components of the `kframe:probe` world, under the
//! same sandbox.
//!
//! # Layout
//!
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
//! way: versions, bindings <- sandbox <- world <- runtime <- adversary <- check;
//! fallback <- set.

pub mod adversary;
pub mod bindings;
pub mod check;
pub mod fallback;
pub mod runtime;
pub mod sandbox;
pub mod set;
pub mod versions;
pub mod world;

pub use bindings::types::{Admission, Entry, LayerGate, Load, ModelShape, Request};
pub use runtime::{Limits, PluginRuntime};
pub use set::{DecidedBy, Decision, PolicySet, PolicyStats};

use std::fmt;

/// The serving policies' worlds, of `kframe:policy@0.2.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    Admission,
    Eviction,
    DepthGate,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Admission, PolicyKind::Eviction, PolicyKind::DepthGate];

    pub fn world(self) -> &'static str {
        match self {
            PolicyKind::Admission => "admission-policy",
            PolicyKind::Eviction => "eviction-policy",
            PolicyKind::DepthGate => "depth-gate-policy",
        }
    }

    /// The short name the command line and the admin API use: `admission`,
    /// `eviction`, `depth-gate`.
    pub fn name(self) -> &'static str {
        self.world().trim_end_matches("-policy")
    }

    /// The kind a short name (as [`Self::name`] gives it) names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.world())
    }
}

/// What a component implements: a serving policy's world, or the adversary world
/// of `kframe:probe@0.1.0` (which the eval harness runs; it never serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorldKind {
    Policy(PolicyKind),
    Adversary,
}

impl WorldKind {
    pub fn world(self) -> &'static str {
        match self {
            WorldKind::Policy(kind) => kind.world(),
            WorldKind::Adversary => "adversary",
        }
    }

    /// The WIT package the world belongs to, with its version.
    pub fn package(self) -> &'static str {
        match self {
            WorldKind::Policy(_) => versions::POLICY,
            WorldKind::Adversary => versions::PROBE,
        }
    }
}

impl fmt::Display for WorldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.world())
    }
}

/// What went wrong with a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Timeout {
        ms: u64,
    },
    OutOfFuel,
    OutOfMemory {
        limit: usize,
    },
    Trap(String),
    /// It called an import it was not granted (a file, the clock, ...).
    Denied(String),
    /// Not a valid component (random bytes, a core module, ...).
    Malformed(String),
    WrongWorld {
        expected: WorldKind,
        found: Option<WorldKind>,
    },
    /// Built against a version of a kframe WIT package this host does not load.
    UnsupportedVersion {
        package: String,
        found: String,
        supported: &'static str,
    },
    InvalidAnswer(String),
    /// Its `configure` refused the operator's configuration.
    Config(String),
    Quarantined {
        failures: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin}: {failure}")]
pub struct PluginError {
    pub plugin: String,
    pub failure: Failure,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout { ms } => write!(f, "timed out (deadline {ms} ms)"),
            Failure::OutOfFuel => write!(f, "ran out of fuel"),
            Failure::OutOfMemory { limit } => {
                write!(f, "exceeded its memory limit of {limit} bytes")
            }
            Failure::Trap(detail) => write!(f, "trapped: {detail}"),
            Failure::Denied(detail) => {
                write!(f, "called a capability it was not granted: {detail}")
            }
            Failure::Malformed(detail) => write!(f, "not a valid component: {detail}"),
            Failure::WrongWorld { expected, found: Some(found) } => write!(f, "implements {found}, not {expected}"),
            Failure::WrongWorld { expected, found: None } => {
                write!(f, "implements no kframe world (expected {expected})")
            }
            Failure::UnsupportedVersion { package, found, supported } => write!(
                f,
                "built for {package}@{found}; this kframe loads {supported} (rebuild it against that version's WIT)"
            ),
            Failure::InvalidAnswer(detail) => write!(f, "invalid answer: {detail}"),
            Failure::Config(detail) => write!(f, "refused its configuration: {detail}"),
            Failure::Quarantined { failures } => {
                write!(f, "quarantined after {failures} consecutive failures")
            }
        }
    }
}

/// Where the shipped plugins are found: `$KFRAME_PLUGIN_DIR`, else the
/// wasm32-wasip2 release folder beside the running binary's target folder, else
/// the workspace's.
pub fn shipped_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("KFRAME_PLUGIN_DIR") {
        return dir.into();
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        // target/{release,debug}/kframe or target/debug/deps/test-binary
        exe.ancestors().find(|p| p.file_name().is_some_and(|n| n == "target")).map(|t| t.join("wasm32-wasip2/plugin"))
    });
    match beside_exe {
        Some(dir) if dir.is_dir() => dir,
        _ => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/plugin"),
    }
}

/// The path of a shipped plugin by its short name (`lru`, `verify-all`, ...).
pub fn shipped(name: &str) -> std::path::PathBuf {
    shipped_dir().join(format!("kframe_{}.wasm", name.replace('-', "_")))
}
