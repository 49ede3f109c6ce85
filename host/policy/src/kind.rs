//! Which world a component implements: one of the serving policies', or the
//! adversary world.

use crate::versions;
use std::fmt;

/// The serving policies' worlds, of the `kframe:policy` package.
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
