//! The engine thread's loop. Each turn it takes new commands, admits what it
//! can, then runs one step: [`State::schedule`] picks what runs, [`State::execute`]
//! runs one forward pass over it, [`State::update`] samples, streams and finishes.

use crate::api::{Command, EngineError, Event};
use crate::state::{Pending, State};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Runs the engine until a shutdown command or until every handle is gone.
///
/// The loop runs on a thread of the engine's own compute pool (RAYON_NUM_THREADS
/// threads), not beside it: the forward pass splits many small products over the
/// pool, and a split started from a pool thread hands half to a thread that is
/// already awake, while one started from outside queues the whole job and puts
/// the caller to sleep until it is done (two thread switches per product; at
/// batch 1 on the embedded model about a fifth of a decode step, in the kernel's
/// scheduler). The pool is the engine's own because the loop holds its thread
/// for the engine's life, waiting for commands too: in the global pool it would
/// take a thread from every other user, and two engines in one process could
/// hold them all.
pub(crate) fn run(state: State, rx: mpsc::UnboundedReceiver<Command>) {
    let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("kframe-compute-{i}")).build();
    match pool {
        Ok(pool) => pool.install(move || state.run(rx)),
        Err(e) => {
            tracing::warn!("no compute pool for the engine ({e}); running on the global one");
            state.run(rx)
        }
    }
}

impl State {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                let keep_going = rx.blocking_recv().is_some_and(|cmd| self.command(cmd));
                if !keep_going {
                    return self.shutdown();
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                if !self.command(cmd) {
                    return self.shutdown();
                }
            }
            self.retry_waiting();
            self.drop_cancelled();
            let worked = self.step();
            self.publish();
            if !worked && !self.waiting.is_empty() {
                // Only queued requests, none admissible yet: wait for a change.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// One step: schedule, one forward pass, update. False if nothing ran.
    fn step(&mut self) -> bool {
        let work = self.schedule();
        if work.is_empty() {
            return false;
        }
        let out = self.execute(&work);
        self.update(work, out);
        true
    }

    /// Handles one command; false to stop.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(req, tx) => {
                let pending = Pending { req, tx, since: Instant::now() };
                if let Some(p) = self.admit(pending, false) {
                    if self.waiting.len() >= self.cfg.queue_limit as usize {
                        self.reject(p, EngineError::QueueFull(self.waiting.len() as u32));
                    } else {
                        self.waiting.push_back(p);
                    }
                }
                true
            }
            Command::DropTenant(tenant, reply) => {
                let _ = reply.send(self.drop_tenant(&tenant));
                true
            }
            Command::RegisterPrefix(tokens, reply) => {
                let _ = reply.send(self.register_prefix(tokens));
                true
            }
            Command::Rekey(tenant, epoch, reply) => {
                let _ = reply.send(self.rekey(&tenant, epoch));
                true
            }
            Command::EndSession(tenant, name, reply) => {
                let _ = reply.send(self.end_session(tenant, &name));
                true
            }
            Command::Shutdown => false,
        }
    }

    fn shutdown(mut self) {
        for p in std::mem::take(&mut self.waiting) {
            let _ = p.tx.send(Event::Failed(EngineError::ShutDown));
        }
        for seq in std::mem::take(&mut self.active) {
            let _ = seq.tx.send(Event::Failed(EngineError::ShutDown));
        }
    }
}
