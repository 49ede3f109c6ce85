//! What can go wrong with a plugin, as one typed error.

use crate::kind::WorldKind;
use std::fmt;

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
        supported: String,
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
