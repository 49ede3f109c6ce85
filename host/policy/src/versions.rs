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
//! Today each package has one version. Supporting a second means: freeze the new
//! folder, generate its bindings beside the old ones in [`crate::bindings`], and
//! add an adapter that presents the old world's instance as the newest world
//! (converting records field by field), selected here by the declared version.

use wasmtime::component::Component;
use wasmtime::Engine;

/// The policy package and the one version of it this host loads.
pub const POLICY: &str = "kframe:policy@0.2.0";
/// The adversary package and the one version of it this host loads.
pub const PROBE: &str = "kframe:probe@0.1.0";

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
/// `(package, found, supported)`.
pub fn unsupported(engine: &Engine, component: &Component) -> Option<(String, String, &'static str)> {
    declared(engine, component).into_iter().find_map(|(package, version)| {
        let supported = [POLICY, PROBE].into_iter().find(|s| s.split_once('@').map(|(p, _)| p) == Some(&package))?;
        let loads = supported.split_once('@').map(|(_, v)| v) == Some(version.as_str());
        (!loads).then_some((package, version, supported))
    })
}
