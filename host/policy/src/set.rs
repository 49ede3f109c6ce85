//! The live policies of a server: one optional plugin per world, the native
//! fallback behind each, atomic swaps, and counts of what decided.

use crate::bindings::types::{Admission, Entry, LayerGate, Load, ModelShape, Request};
use crate::error::PluginError;
use crate::fallback;
use crate::kind::PolicyKind;
use crate::runtime::{Loaded, PluginRuntime};
use crate::sandbox::Sandbox;
use crate::world::{AdmissionWorld, DepthGateWorld, EvictionBindings, EvictionWorld, World};
use kframe_entries::EntryTable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Who made a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedBy {
    Plugin(String),
    /// The native policy, because no plugin is set or because it failed.
    Fallback(Option<PluginError>),
}

#[derive(Debug, Clone)]
pub struct Decision<T> {
    pub value: T,
    pub by: DecidedBy,
}

/// One world's slot: the plugin, if any. Calls clone the `Arc` and finish on the
/// plugin they started with even if a swap replaces it meanwhile.
struct Slot<W: World> {
    current: RwLock<Option<Arc<Mutex<Loaded<W>>>>>,
    calls: AtomicU64,
    failures: AtomicU64,
    nanos: AtomicU64,
}

impl<W: World> Default for Slot<W> {
    fn default() -> Self {
        Self {
            current: RwLock::new(None),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        }
    }
}

impl<W: World> Slot<W> {
    fn get(&self) -> Option<Arc<Mutex<Loaded<W>>>> {
        self.current.read().expect("policy slot lock").clone()
    }

    fn set(&self, loaded: Option<Loaded<W>>) {
        *self.current.write().expect("policy slot lock") = loaded.map(|l| Arc::new(Mutex::new(l)));
    }

    /// Runs `f` on the plugin, timing it and counting the outcome; `None` when no
    /// plugin is set.
    fn with<R>(&self, f: impl FnOnce(&mut Loaded<W>) -> Result<R, PluginError>) -> Option<Result<R, PluginError>> {
        let plugin = self.get()?;
        let start = std::time::Instant::now();
        let result = f(&mut plugin.lock().expect("plugin lock"));
        self.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kind = %W::KIND, "{e}; the native fallback decides");
        }
        Some(result)
    }

    fn name(&self) -> Option<String> {
        self.get().map(|p| p.lock().expect("plugin lock").name.clone())
    }
}

fn decide<T>(outcome: Option<Result<(T, String), PluginError>>, fallback: impl FnOnce() -> T) -> Decision<T> {
    match outcome {
        Some(Ok((value, name))) => Decision { value, by: DecidedBy::Plugin(name) },
        Some(Err(e)) => Decision { value: fallback(), by: DecidedBy::Fallback(Some(e)) },
        None => Decision { value: fallback(), by: DecidedBy::Fallback(None) },
    }
}

/// Per-world counts of plugin calls.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorldStats {
    pub plugin: Option<String>,
    pub calls: u64,
    pub failures: u64,
    pub seconds_in_plugin: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PolicyStats {
    pub admission: WorldStats,
    pub eviction: WorldStats,
    pub depth_gate: WorldStats,
}

pub struct PolicySet {
    runtime: Arc<PluginRuntime>,
    admission: Slot<AdmissionWorld>,
    eviction: Slot<EvictionWorld>,
    depth_gate: Slot<DepthGateWorld>,
    /// The host's own record of the cache entries (the source of truth for checking
    /// a plugin's victims, for the fallback and for rebuilding an instance).
    /// Eviction events take this lock first, so a swap's replay never misses one.
    mirror: Mutex<EntryTable>,
}

/// Replays the host's entries into a fresh eviction instance.
fn replay(
    mirror: &EntryTable,
) -> impl FnOnce(&EvictionBindings, &mut wasmtime::Store<Sandbox>) -> wasmtime::Result<()> + '_ {
    move |b, store| {
        for t in mirror.iter() {
            b.call_on_insert(&mut *store, t.entry.into())?;
            for _ in 0..t.hits {
                b.call_on_hit(&mut *store, t.entry.id, t.last_used)?;
            }
        }
        Ok(())
    }
}

impl PolicySet {
    /// Every world on its native fallback until a plugin is swapped in.
    pub fn new(runtime: Arc<PluginRuntime>) -> Self {
        Self {
            runtime,
            admission: Slot::default(),
            eviction: Slot::default(),
            depth_gate: Slot::default(),
            mirror: Mutex::new(EntryTable::default()),
        }
    }

    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// Compiles, type-checks, instantiates and configures `bytes` as the `kind`
    /// policy (an eviction policy is also given the live entries), then swaps it
    /// in. On any error the current policy stays.
    pub fn swap(&self, kind: PolicyKind, name: &str, bytes: &[u8], config: &str) -> Result<(), PluginError> {
        match kind {
            PolicyKind::Admission => self.admission.set(Some(self.runtime.load(name, bytes, config)?)),
            PolicyKind::DepthGate => self.depth_gate.set(Some(self.runtime.load(name, bytes, config)?)),
            PolicyKind::Eviction => {
                let mut loaded = self.runtime.load::<EvictionWorld>(name, bytes, config)?;
                let mirror = self.mirror.lock().expect("mirror lock");
                // The instance `load` created is fresh: give it the live entries.
                loaded.notify(|_, _| Ok(()), replay(&mirror))?;
                self.eviction.set(Some(loaded));
            }
        }
        tracing::info!(%kind, plugin = name, "policy swapped in");
        Ok(())
    }

    /// Back to the native policy for `kind`.
    pub fn clear(&self, kind: PolicyKind) {
        match kind {
            PolicyKind::Admission => self.admission.set(None),
            PolicyKind::Eviction => self.eviction.set(None),
            PolicyKind::DepthGate => self.depth_gate.set(None),
        }
    }

    pub fn admit(&self, req: &Request, load: &Load) -> Decision<Admission> {
        let outcome = self.admission.with(|p| {
            let name = p.name.clone();
            p.call(|_, _| Ok(()), |b, s| b.call_decide(s, *req, *load), |_| Ok(())).map(|v| (v, name))
        });
        decide(outcome, || fallback::admit(req, load))
    }

    pub fn gates(&self, shape: &ModelShape, tenant: u64, context_len: u32) -> Decision<Vec<LayerGate>> {
        let layers = shape.layers as usize;
        let outcome = self.depth_gate.with(|p| {
            let name = p.name.clone();
            let check = |g: &Vec<LayerGate>| {
                if g.len() == layers {
                    Ok(())
                } else {
                    Err(format!("{} gates for {layers} layers", g.len()))
                }
            };
            p.call(|_, _| Ok(()), |b, s| b.call_gates(s, *shape, tenant, context_len), check).map(|v| (v, name))
        });
        decide(outcome, || fallback::gates(shape))
    }

    /// Tells the eviction policy of an event, then records it. A plugin failure
    /// here is counted; the next call rebuilds the plugin from the record.
    fn event(
        &self,
        f: impl Fn(&EvictionBindings, &mut wasmtime::Store<Sandbox>) -> wasmtime::Result<()>,
        apply: impl FnOnce(&mut EntryTable),
    ) {
        let mut mirror = self.mirror.lock().expect("mirror lock");
        let _ = self.eviction.with(|p| p.notify(replay(&mirror), f));
        apply(&mut mirror);
    }

    pub fn on_insert(&self, entry: Entry) {
        self.event(|b, s| b.call_on_insert(s, entry), |m| m.insert(entry.into()));
    }

    pub fn on_hit(&self, id: u64, now: u64) {
        self.event(|b, s| b.call_on_hit(s, id, now), |m| m.hit(id, now));
    }

    pub fn on_pin(&self, id: u64, pinned: bool) {
        self.event(|b, s| b.call_on_pin(s, id, pinned), |m| m.pin(id, pinned));
    }

    pub fn on_remove(&self, id: u64) {
        self.event(|b, s| b.call_on_remove(s, id), |m| m.remove(id));
    }

    /// An entry changed size (a session grew). The policy sees it removed and
    /// inserted again with its hit history replayed, so frequency-based policies
    /// keep their counts.
    pub fn on_resize(&self, id: u64, bytes: u64, tokens: u32) {
        let mut mirror = self.mirror.lock().expect("mirror lock");
        let Some(t) = mirror.get(id).cloned() else {
            return;
        };
        let entry = Entry { bytes, tokens, ..t.entry.into() };
        let _ = self.eviction.with(|p| {
            p.notify(replay(&mirror), |b, s| {
                b.call_on_remove(&mut *s, id)?;
                b.call_on_insert(&mut *s, entry)?;
                for _ in 0..t.hits {
                    b.call_on_hit(&mut *s, id, t.last_used)?;
                }
                Ok(())
            })
        });
        mirror.resize(id, bytes, tokens);
    }

    /// One tenant's unpinned entries, least recently used first, until they free
    /// `bytes_needed`: how the host keeps a tenant within its quota (its own
    /// entries only, whatever the eviction policy would pick).
    pub fn tenant_lru_victims(&self, tenant: u64, bytes_needed: u64) -> Vec<u64> {
        self.mirror.lock().expect("mirror lock").lru_victims_of(tenant, bytes_needed)
    }

    /// Entries to evict to free `bytes_needed`: the plugin's answer if it is
    /// valid, else least recently used. The caller evicts them and reports each
    /// with [`PolicySet::on_remove`].
    pub fn victims(&self, bytes_needed: u64, now: u64) -> Decision<Vec<u64>> {
        let mirror = self.mirror.lock().expect("mirror lock");
        let outcome = self.eviction.with(|p| {
            let name = p.name.clone();
            let check = |ids: &Vec<u64>| mirror.validate_victims(ids, bytes_needed);
            p.call(replay(&mirror), |b, s| b.call_victims(s, bytes_needed, now), check).map(|v| (v, name))
        });
        decide(outcome, || mirror.lru_victims(bytes_needed))
    }

    pub fn stats(&self) -> PolicyStats {
        fn stats<W: World>(slot: &Slot<W>) -> WorldStats {
            WorldStats {
                plugin: slot.name(),
                calls: slot.calls.load(Ordering::Relaxed),
                failures: slot.failures.load(Ordering::Relaxed),
                seconds_in_plugin: slot.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            }
        }
        PolicyStats {
            admission: stats(&self.admission),
            eviction: stats(&self.eviction),
            depth_gate: stats(&self.depth_gate),
        }
    }
}
