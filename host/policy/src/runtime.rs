//! The wasmtime side of plugins: one engine, the sandbox every instance runs in,
//! compiling and identifying components, and running calls under limits.

use crate::error::{Failure, PluginError};
use crate::kind::{PolicyKind, WorldKind};
use crate::sandbox::Sandbox;
use crate::world::{self, World};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store, Trap};

/// How often the engine's epoch advances; deadlines are whole ticks.
const TICK: Duration = Duration::from_millis(5);

/// Limits every plugin call and instance runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock budget of one call.
    pub deadline: Duration,
    /// Instructions-ish budget of one call (wasmtime fuel).
    pub fuel: u64,
    /// Linear memory of one instance.
    pub memory_bytes: usize,
    /// Consecutive failures after which a plugin is quarantined.
    pub max_failures: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { deadline: Duration::from_millis(50), fuel: 2_000_000_000, memory_bytes: 64 << 20, max_failures: 3 }
    }
}

/// One wasmtime engine for all plugins, with its epoch ticker.
pub struct PluginRuntime {
    engine: Engine,
    pub limits: Limits,
}

impl PluginRuntime {
    /// `cache_dir` keeps compiled components across processes (a cache hit costs
    /// about a millisecond instead of a compile).
    pub fn new(limits: Limits, cache_dir: Option<&std::path::Path>) -> anyhow::Result<Arc<Self>> {
        let mut config = Config::new();
        config.wasm_component_model(true).consume_fuel(true).epoch_interruption(true);
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            match wasmtime::Cache::new(cache) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!("plugin compile cache disabled: {e:#}"),
            }
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let weak = engine.weak();
        std::thread::Builder::new().name("kframe-plugin-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })?;
        Ok(Arc::new(Self { engine, limits }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn store(&self) -> Store<Sandbox> {
        let mut store = Store::new(&self.engine, Sandbox::new(self.limits.memory_bytes));
        store.limiter(|s| s);
        store
    }

    /// Compiles `bytes` and links it with nothing but traps for its imports.
    fn link(&self, name: &str, bytes: &[u8]) -> Result<(Component, Linker<Sandbox>), PluginError> {
        self.link_granting(name, bytes, |_, _| Ok(()))
    }

    /// Compiles `bytes`, lets `grant` link the capabilities it grants (it may
    /// refuse the component, having seen it), and links traps for every other import.
    pub(crate) fn link_granting(
        &self,
        name: &str,
        bytes: &[u8],
        grant: impl FnOnce(&Component, &mut Linker<Sandbox>) -> Result<(), Failure>,
    ) -> Result<(Component, Linker<Sandbox>), PluginError> {
        let err = |failure| PluginError { plugin: name.to_owned(), failure };
        if bytes.starts_with(b"\0asm\x01\0\0\0") {
            return Err(err(Failure::Malformed("a core WebAssembly module, not a component".into())));
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| err(Failure::Malformed(format!("{e:#}"))))?;
        if let Some((package, found, supported)) = crate::versions::unsupported(&self.engine, &component) {
            return Err(err(Failure::UnsupportedVersion { package, found, supported }));
        }
        let mut linker = Linker::new(&self.engine);
        grant(&component, &mut linker).map_err(err)?;
        // No other capability is granted: WASI and anything else the guest imports
        // traps when called (std guests import wasi:cli and wasi:io they never use).
        linker.define_unknown_imports_as_traps(&component).map_err(|e| err(Failure::Malformed(format!("{e:#}"))))?;
        Ok((component, linker))
    }

    /// Which world a component implements, or why it is rejected.
    pub fn check(&self, name: &str, bytes: &[u8]) -> Result<WorldKind, PluginError> {
        let (component, linker) = self.link(name, bytes)?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError { plugin: name.into(), failure: Failure::Malformed(format!("{e:#}")) })?;
        let kind = if world::AdmissionWorld::pre(pre.clone()).is_ok() {
            WorldKind::Policy(PolicyKind::Admission)
        } else if world::EvictionWorld::pre(pre.clone()).is_ok() {
            WorldKind::Policy(PolicyKind::Eviction)
        } else if world::DepthGateWorld::pre(pre.clone()).is_ok() {
            WorldKind::Policy(PolicyKind::DepthGate)
        } else if world::AdversaryWorld::pre(pre).is_ok() {
            WorldKind::Adversary
        } else {
            // No world was asked for here, so there is no "expected" to report.
            let detail = format!(
                "a component, but it implements no {} or {} world",
                crate::versions::POLICY,
                crate::versions::PROBE
            );
            return Err(PluginError { plugin: name.into(), failure: Failure::Malformed(detail) });
        };
        Ok(kind)
    }

    /// Compiles and type-checks a component for world `W`, instantiates it once and
    /// runs its `configure`: everything that can fail before it serves.
    pub fn load<W: World>(self: &Arc<Self>, name: &str, bytes: &[u8], config: &str) -> Result<Loaded<W>, PluginError> {
        let (component, linker) = self.link(name, bytes)?;
        self.load_linked(name, bytes, config, component, linker)
    }

    /// [`PluginRuntime::load`] for a component already compiled and linked.
    pub(crate) fn load_linked<W: World>(
        self: &Arc<Self>,
        name: &str,
        bytes: &[u8],
        config: &str,
        component: Component,
        linker: Linker<Sandbox>,
    ) -> Result<Loaded<W>, PluginError> {
        let err = |failure| PluginError { plugin: name.to_owned(), failure };
        let pre = linker.instantiate_pre(&component).map_err(|e| err(Failure::Malformed(format!("{e:#}"))))?;
        let pre = match W::pre(pre) {
            Ok(pre) => pre,
            Err(_) => {
                let found = self.check(name, bytes).ok();
                return Err(err(Failure::WrongWorld { expected: W::KIND, found }));
            }
        };
        let mut loaded = Loaded {
            name: name.to_owned(),
            runtime: self.clone(),
            pre,
            config: config.to_owned(),
            instance: None,
            failures: 0,
        };
        loaded.instance(|_, _| Ok(()))?;
        Ok(loaded)
    }

    fn classify(&self, name: &str, err: wasmtime::Error, sandbox: &Sandbox) -> PluginError {
        let failure = if sandbox.denied_growth {
            Failure::OutOfMemory { limit: self.limits.memory_bytes }
        } else {
            match err.downcast_ref::<Trap>() {
                Some(Trap::OutOfFuel) => Failure::OutOfFuel,
                Some(Trap::Interrupt) => Failure::Timeout { ms: self.limits.deadline.as_millis() as u64 },
                Some(trap) => Failure::Trap(trap.to_string()),
                None => {
                    let text = format!("{err:#}");
                    if text.contains("unknown import") || text.contains("has not been defined") {
                        Failure::Denied(text)
                    } else {
                        Failure::Trap(text)
                    }
                }
            }
        };
        PluginError { plugin: name.to_owned(), failure }
    }
}

/// Resets a store's budgets before a call: fresh fuel, a fresh deadline.
fn arm(limits: &Limits, store: &mut Store<Sandbox>) {
    store.data_mut().denied_growth = false;
    // Fuel is enabled on the engine, so setting it cannot fail.
    let _ = store.set_fuel(limits.fuel);
    store.set_epoch_deadline(limits.deadline.as_micros().div_ceil(TICK.as_micros()).max(1) as u64);
}

struct Instance<B> {
    store: Store<Sandbox>,
    bindings: B,
}

/// A plugin ready to serve: its type-checked component, its configuration, and a
/// live instance (re-created after any failure, never re-entered after a trap).
pub struct Loaded<W: World> {
    pub name: String,
    runtime: Arc<PluginRuntime>,
    pre: W::Pre,
    config: String,
    instance: Option<Instance<W::Bindings>>,
    /// Consecutive failed calls.
    pub failures: u32,
}

impl<W: World> Loaded<W> {
    pub fn quarantined(&self) -> bool {
        self.failures >= self.runtime.limits.max_failures
    }

    /// The live instance, creating (and configuring, then `restore`-ing state
    /// into) a new one if the last was discarded.
    fn instance(
        &mut self,
        restore: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<()>,
    ) -> Result<&mut Instance<W::Bindings>, PluginError> {
        if self.instance.is_none() {
            let mut store = self.runtime.store();
            arm(&self.runtime.limits, &mut store);
            let bindings = match W::instantiate(&self.pre, &mut store) {
                Ok(b) => b,
                Err(e) => return Err(self.runtime.classify(&self.name, e, store.data())),
            };
            match W::configure(&bindings, &mut store, &self.config) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    return Err(PluginError { plugin: self.name.clone(), failure: Failure::Config(reason) })
                }
                Err(e) => return Err(self.runtime.classify(&self.name, e, store.data())),
            }
            arm(&self.runtime.limits, &mut store);
            if let Err(e) = restore(&bindings, &mut store) {
                return Err(self.runtime.classify(&self.name, e, store.data()));
            }
            self.instance = Some(Instance { store, bindings });
        }
        Ok(self.instance.as_mut().expect("created above"))
    }

    /// Runs one call under the limits. `restore` rebuilds a fresh instance's state
    /// (eviction replays its live entries); `check` validates the answer. Any
    /// failure discards the instance and counts towards quarantine.
    pub fn call<R>(
        &mut self,
        restore: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<()>,
        f: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<R>,
        check: impl FnOnce(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        if self.quarantined() {
            return Err(PluginError {
                plugin: self.name.clone(),
                failure: Failure::Quarantined { failures: self.failures },
            });
        }
        let result = self.try_call(restore, f, check);
        match &result {
            Ok(_) => self.failures = 0,
            Err(_) => {
                self.failures += 1;
                self.instance = None;
            }
        }
        result
    }

    fn try_call<R>(
        &mut self,
        restore: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<()>,
        f: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<R>,
        check: impl FnOnce(&R) -> Result<(), String>,
    ) -> Result<R, PluginError> {
        let name = self.name.clone();
        let runtime = self.runtime.clone();
        let inst = self.instance(restore)?;
        arm(&runtime.limits, &mut inst.store);
        let answer = f(&inst.bindings, &mut inst.store).map_err(|e| runtime.classify(&name, e, inst.store.data()))?;
        check(&answer).map_err(|detail| PluginError { plugin: name, failure: Failure::InvalidAnswer(detail) })?;
        Ok(answer)
    }

    /// Calls that must reach the instance but have no answer to check (eviction's
    /// event hooks).
    pub fn notify(
        &mut self,
        restore: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<()>,
        f: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<()>,
    ) -> Result<(), PluginError> {
        self.call(restore, f, |_| Ok(()))
    }
}
