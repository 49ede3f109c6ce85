//! Adversaries (world `kframe:probe/adversary`) for the eval harness.
//!
//! An adversary's capabilities are its imports. An experiment grants some of them
//! ([`Capability`]); [`Adversary::load`] refuses a component that imports one the
//! experiment does not grant, before it runs, and links the granted ones to the
//! data of that experiment ([`Grants`], set per call). Calls run under the same
//! sandbox and limits as policies: a trap, a timeout or an invalid answer is a
//! [`PluginError`], and the harness reports it and goes on.

use crate::bindings::{known_pairs, model_oracle, probe_types};
use crate::error::{Failure, PluginError};
use crate::runtime::{Loaded, PluginRuntime};
use crate::sandbox::Sandbox;
use crate::world::AdversaryWorld;
use std::sync::Arc;

pub use crate::sandbox::{Grants, Oracle};
pub use known_pairs::Pair;
pub use model_oracle::OracleQuery;
pub use probe_types::{About, Guess, OwnVector, Task, Vector, View};

/// What an experiment may grant an adversary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Known plaintext/ciphertext pairs of the victim's key.
    KnownPairs,
    /// The model weights: plaintext K of any token.
    ModelOracle,
}

impl Capability {
    pub const ALL: [Capability; 2] = [Capability::KnownPairs, Capability::ModelOracle];

    /// The interface a component imports to use it.
    pub fn interface(self) -> &'static str {
        match self {
            Capability::KnownPairs => "kframe:probe/known-pairs@0.1.0",
            Capability::ModelOracle => "kframe:probe/model-oracle@0.1.0",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Capability::KnownPairs => "known-pairs",
            Capability::ModelOracle => "model-oracle",
        }
    }
}

/// The capabilities a component imports.
pub fn needs(runtime: &PluginRuntime, component: &wasmtime::component::Component) -> Vec<Capability> {
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(runtime.engine()).map(|(name, _)| name.to_owned()).collect();
    Capability::ALL.into_iter().filter(|c| imports.iter().any(|i| i == c.interface())).collect()
}

/// A loaded adversary.
pub struct Adversary {
    pub about: About,
    pub needs: Vec<Capability>,
    loaded: Loaded<AdversaryWorld>,
}

impl Adversary {
    /// Compiles, type-checks, links and configures an adversary for an experiment
    /// that grants `granted`; refused if it imports anything more.
    pub fn load(
        runtime: &Arc<PluginRuntime>,
        name: &str,
        bytes: &[u8],
        config: &str,
        granted: &[Capability],
    ) -> Result<Self, PluginError> {
        let mut needs_seen = Vec::new();
        let (component, linker) = runtime.link_granting(name, bytes, |component, linker| {
            needs_seen = needs(runtime, component);
            if let Some(extra) = needs_seen.iter().find(|c| !granted.contains(c)) {
                let granted: Vec<&str> = granted.iter().map(|c| c.name()).collect();
                return Err(Failure::Denied(format!(
                    "it imports {} ({}), which this experiment does not grant (granted: {})",
                    extra.name(),
                    extra.interface(),
                    if granted.is_empty() { "none".into() } else { granted.join(", ") }
                )));
            }
            let link = |e: wasmtime::Error| Failure::Malformed(format!("{e:#}"));
            if needs_seen.contains(&Capability::KnownPairs) {
                known_pairs::add_to_linker::<Sandbox, wasmtime::component::HasSelf<Sandbox>>(linker, |s| s)
                    .map_err(link)?;
            }
            if needs_seen.contains(&Capability::ModelOracle) {
                model_oracle::add_to_linker::<Sandbox, wasmtime::component::HasSelf<Sandbox>>(linker, |s| s)
                    .map_err(link)?;
            }
            Ok(())
        })?;
        let mut loaded = runtime.load_linked::<AdversaryWorld>(name, bytes, config, component, linker)?;
        let about = loaded.call(
            |_, _| Ok(()),
            |b, s| b.call_about(s),
            |a: &About| match a.tasks.is_empty() {
                true => Err("it answers no task".into()),
                false => Ok(()),
            },
        )?;
        Ok(Self { about, needs: needs_seen, loaded })
    }

    pub fn name(&self) -> &str {
        &self.about.name
    }

    pub fn answers(&self, task: Task) -> bool {
        self.about.tasks.contains(&task)
    }

    /// One attack. `check` validates the guess's shape; an `Err` the adversary
    /// returns itself counts as an invalid answer.
    pub fn attack(
        &mut self,
        view: &View,
        grants: Grants,
        check: impl FnOnce(&Guess) -> Result<(), String>,
    ) -> Result<Guess, PluginError> {
        let answer = self.loaded.call(
            |_, _| Ok(()),
            |b, s| {
                s.data_mut().grants = grants;
                b.call_attack(s, view)
            },
            |answer: &Result<Guess, String>| match answer {
                Ok(guess) => check(guess),
                Err(reason) => Err(format!("it gave up: {reason}")),
            },
        )?;
        Ok(answer.expect("checked above"))
    }

    /// Consecutive failed calls; past the runtime's limit the adversary is quarantined.
    pub fn failures(&self) -> u32 {
        self.loaded.failures
    }
}
