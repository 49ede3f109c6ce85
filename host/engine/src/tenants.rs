//! Tenants as a whole: key-drop delete (every request ended, every cache zeroed
//! and freed, the rotations forgotten) and re-key (every cache moved to the new
//! epoch's frame in place).

use crate::api::{EngineError, Event, Tenant};
use crate::state::{Finish, State};
use kframe_core::layout::Layout;
use kframe_core::rotation::Frame;

impl State {
    pub(crate) fn drop_tenant(&mut self, tenant: &Tenant) -> usize {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].tenant.id == tenant.id {
                let seq = self.active.swap_remove(i);
                // A failed sequence's session is dropped with it.
                self.finish(seq, Finish::Failed(EngineError::TenantDeleted));
            } else {
                i += 1;
            }
        }
        let (gone, keep): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|p| p.req.tenant.id == tenant.id);
        self.waiting = keep.into();
        for p in gone {
            let _ = p.tx.send(Event::Failed(EngineError::TenantDeleted));
        }
        let entries = self.sessions.entries_of(tenant.id);
        for &entry in &entries {
            self.remove_session(entry, false);
        }
        self.keyring.forget(&tenant.key_id, tenant.epoch);
        self.publish();
        entries.len()
    }

    pub(crate) fn rekey(&mut self, tenant: &Tenant, epoch: u64) -> Result<usize, EngineError> {
        let model_err = |e: candle_core::Error| EngineError::Model(e.to_string());
        // Each cache moves between the two epochs' frames of its own layout.
        let ring = &self.keyring;
        let frames = |layout: &Layout| -> Result<(Frame, Frame), EngineError> {
            let old = ring.padded_frame(&tenant.key_id, tenant.epoch, layout).map_err(model_err)?;
            let new = ring.padded_frame(&tenant.key_id, epoch, layout).map_err(model_err)?;
            Ok((old, new))
        };
        let mut done = 0;
        for entry in self.sessions.entries_of(tenant.id) {
            let Some(s) = self.sessions.get_mut(entry) else { continue };
            if let (Some(cache), true) = (s.cache.as_mut(), s.epoch == tenant.epoch) {
                let (old, new) = frames(cache.layout())?;
                cache.rekey(&old, &new).map_err(model_err)?;
                s.epoch = epoch;
                done += 1;
            }
        }
        for seq in self.active.iter_mut().filter(|s| s.tenant.id == tenant.id && s.tenant.epoch == tenant.epoch) {
            let (old, new) = frames(seq.cache.layout())?;
            seq.cache.rekey(&old, &new).map_err(model_err)?;
            seq.frame = new;
            seq.tenant.epoch = epoch;
        }
        self.keyring.forget(&tenant.key_id, tenant.epoch);
        Ok(done)
    }
}
