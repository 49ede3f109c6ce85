//! Which versions of kframe's WIT packages this host loads, and which one a
//! component was built against: version dispatch in one place.
//!
//! A published WIT version is frozen in its own folder (`wit/policy/v0.2.0/`,
//! `wit/probe/v0.1.0/`) and never edited. A component records the version it was
//! built against in the names of the kframe interfaces it imports (every world
//! imports its package's `types`). The registry persists operators' components, so
//! a server that outlives a WIT change meets components built for an older
//! version: it must load them through an adapter or refuse them by name, never
//! drop them silently.
//!
//! The policy package has two versions: 0.3.0 (the newest: an admission request
//! carries the tenant's running and queued counts) and 0.2.0. A new version means:
//! freeze its folder, generate its bindings beside the others in
//! [`crate::bindings`], convert the records of the versions before it, and let
//! [`crate::world`] pick a component's version when it type-checks it.

use wasmtime::component::Component;
use wasmtime::Engine;

/// The policy package and the newest version of it, the one this host speaks.
pub const POLICY: &str = "kframe:policy@0.3.0";

/// Every version of the policy package this host loads, newest first: older ones
/// through the conversions of `bindings::to_v0_2`.
pub const POLICY_VERSIONS: &[&str] = &["0.3.0", "0.2.0"];
/// The adversary package and the one version of it this host loads.
pub const PROBE: &str = "kframe:probe@0.1.0";

/// Every version of the adversary package this host loads.
pub const PROBE_VERSIONS: &[&str] = &["0.1.0"];

/// The kframe packages a component's imports name, with their versions, as
/// `(package, version)` (for example `("kframe:policy", "0.2.0")`).
pub fn declared(engine: &Engine, component: &Component) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = component
        .component_type()
        .imports(engine)
        .filter_map(|(name, _)| {
            let (interface, version) = name.split_once('@')?;
            let package = interface.split_once('/').map_or(interface, |(p, _)| p);
            package.starts_with("kframe:").then(|| (package.to_owned(), version.to_owned()))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The first declared kframe package version this host does not load, as
/// `(package, found, what it loads)`.
pub fn unsupported(engine: &Engine, component: &Component) -> Option<(String, String, String)> {
    declared(engine, component).into_iter().find_map(|(package, version)| {
        let loads = match package.as_str() {
            "kframe:policy" => POLICY_VERSIONS,
            "kframe:probe" => PROBE_VERSIONS,
            _ => return None,
        };
        let supported = loads.iter().map(|v| format!("{package}@{v}")).collect::<Vec<_>>().join(" or ");
        (!loads.contains(&version.as_str())).then_some((package, version, supported))
    })
}
