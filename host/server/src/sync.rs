//! Keeping this replica in step with the registry: every change (written here or
//! by another replica) reaches the engine through [`App::apply`], under the
//! re-key lock, so that no request is submitted between the registry's new view
//! of a tenant and the engine's.
//!
//! A shared registry announces its changes; [`App::follow_registry`] listens, and
//! also polls the version, because an announcement sent while the listener was
//! disconnected is lost for good.

use crate::app::{App, Counters, LoadedPolicy};
use kframe_engine::Tenant;
use kframe_policy::PolicyKind;
use kframe_registry::{Change, PolicyRecord, RegistryError, Synced, TenantRecord};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The engine's view of a tenant: its frame identity and epoch.
pub(crate) fn frame(record: &TenantRecord) -> Tenant {
    Tenant { id: record.id, key_id: record.key_id.clone(), epoch: record.epoch, tier: record.tier }
}

impl Counters {
    fn count(&self, trigger: &'static str) {
        *self.syncs.lock().expect("sync counter lock").entry(trigger).or_default() += 1;
    }
}

/// What applying changes did to the engine, by tenant id.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub rekeyed: HashMap<u64, usize>,
    pub removed: HashMap<u64, usize>,
}

impl App {
    /// Runs a registry write with submissions held, and applies what the sync
    /// after it brought in (its own change, and any other replica's).
    pub(crate) async fn write<T>(
        &self,
        write: impl Future<Output = Result<Synced<T>, RegistryError>>,
    ) -> Result<(T, Applied), RegistryError> {
        let _exclusive = self.rekey.write().await;
        let synced = write.await?;
        self.cluster.count("write");
        Ok((synced.value, self.apply(synced.changes).await))
    }

    /// Brings in whatever changed in the registry and applies it.
    pub(crate) async fn sync(&self, trigger: &'static str) -> Result<Applied, RegistryError> {
        let _exclusive = self.rekey.write().await;
        let changes = self.registry.sync().await?;
        self.cluster.count(trigger);
        Ok(self.apply(changes).await)
    }

    /// Applies registry changes to the engine. The caller holds the re-key lock.
    pub(crate) async fn apply(&self, changes: Vec<Change>) -> Applied {
        let mut applied = Applied::default();
        for change in changes {
            match change {
                Change::Created(_) => {}
                Change::Rekeyed { before, after } => {
                    match self.engine.rekey(frame(&before), after.epoch).await {
                        Ok(n) => {
                            applied.rekeyed.insert(after.id, n);
                        }
                        Err(e) => {
                            // Nothing may stay cached in an epoch the tenant left.
                            tracing::error!(tenant = after.id, "re-keying cached sessions failed, dropping them: {e}");
                            let _ = self.engine.drop_tenant(frame(&before)).await;
                        }
                    }
                }
                Change::Deleted(record) => {
                    self.sessions.lock().expect("session lock").retain(|_, owner| *owner != record.id);
                    match self.engine.drop_tenant(frame(&record)).await {
                        Ok(n) => {
                            applied.removed.insert(record.id, n);
                        }
                        Err(e) => tracing::error!(tenant = record.id, "dropping a deleted tenant's caches: {e}"),
                    }
                }
                Change::Policy { kind, now } => self.load_policy(&kind, now).await,
                Change::Prefix(text) => {
                    if let Err(e) = self.register_stored_prefix(&text).await {
                        tracing::error!("a prefix from the registry: {e}");
                    }
                }
            }
        }
        applied
    }

    /// Runs the registry's component for a kind, unless it already does. One that
    /// does not load here is reported (log, `/admin/policies`, a counter) and the
    /// policy this replica had stays.
    async fn load_policy(&self, world: &str, now: Option<PolicyRecord>) {
        let Some(kind) = PolicyKind::ALL.into_iter().find(|k| k.world() == world) else {
            tracing::error!(kind = world, "the registry names a policy kind this kframe does not know");
            self.cluster.policy_load_failures.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(p) = now else {
            self.engine.policies().clear(kind);
            self.loaded_policies.lock().expect("policy lock").remove(&kind);
            return;
        };
        let sha256 = p.sha256();
        let current = self.loaded_policies.lock().expect("policy lock").get(&kind).cloned();
        if current.is_some_and(|c| c.sha256 == sha256 && c.error.is_none()) {
            return;
        }
        let policies = self.engine.policies().clone();
        let name = p.name.clone();
        let loaded = tokio::task::spawn_blocking(move || policies.swap(kind, &p.name, &p.wasm, &p.config))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let error = loaded.err();
        if let Some(e) = &error {
            tracing::error!(%kind, plugin = name, sha256, "the registry's policy component does not load here: {e}");
            self.cluster.policy_load_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.loaded_policies.lock().expect("policy lock").insert(kind, LoadedPolicy { sha256, error });
    }

    /// Follows a shared registry: notifications, and a poll of its version every
    /// `replica.poll`. Returns false for a registry only this process writes,
    /// which has nothing to follow.
    pub fn follow_registry(self: &Arc<Self>) -> bool {
        let Some(listening) = self.registry.listen(self.replica.listen_retry) else {
            return false;
        };
        let _ = self.cluster.listening.set(listening.clone());
        let app = Arc::downgrade(self);
        let mut ticker = tokio::time::interval(self.replica.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                let trigger = tokio::select! {
                    _ = listening.changed.notified() => "notify",
                    _ = ticker.tick() => "poll",
                };
                let Some(app) = app.upgrade() else { return };
                if trigger == "poll" {
                    match app.registry.store_version().await {
                        Ok(v) if v <= app.registry.version() => continue,
                        Ok(_) => {}
                        Err(e) => {
                            app.cluster.sync_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("registry poll: {e}; serving known tenants from memory");
                            continue;
                        }
                    }
                }
                if let Err(e) = app.sync(trigger).await {
                    app.cluster.sync_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("registry sync: {e}; serving known tenants from memory");
                }
            }
        });
        true
    }
}
