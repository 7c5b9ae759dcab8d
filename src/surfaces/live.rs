//! What the supervisor knows about nginx right now, shared by the health probes, `/metrics`
//! and `status`: the phase, the master, the worker generations, the last reload.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::watch;

use crate::core::phase::{Phase, UnreadyAt};
use crate::nginx::generations::{Generations, serving_workers};
use crate::nginx::pidfile::FollowedMaster;
use crate::reload::ReloadOutcome;
use crate::surfaces::metrics::Metrics;

#[derive(Debug)]
pub struct Live {
    phase: watch::Receiver<Phase>,
    /// The propagation delay's state once a drain has one.
    delay: watch::Receiver<Option<Value>>,
    /// When the drain began, and when readiness fails in it.
    drain_start: watch::Receiver<Option<std::time::Instant>>,
    unready_at: UnreadyAt,
    /// The command's pid (the nginx master, or the controller), 0 once it has exited.
    child: AtomicI32,
    /// In controller mode, the nginx master the pid file names.
    controller_master: Option<Arc<FollowedMaster>>,
    pub generations: Generations,
    last_reload: Mutex<Option<LastReload>>,
    pub metrics: Metrics,
}

impl Live {
    pub fn new(
        phase: watch::Receiver<Phase>,
        delay: watch::Receiver<Option<Value>>,
        drain_start: watch::Receiver<Option<std::time::Instant>>,
        unready_at: UnreadyAt,
        controller_master: Option<Arc<FollowedMaster>>,
        generations: Generations,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            phase,
            delay,
            drain_start,
            unready_at,
            child: AtomicI32::new(0),
            controller_master,
            generations,
            last_reload: Mutex::new(None),
            metrics,
        })
    }

    /// The command started, or 0 once it has exited.
    pub fn set_child(&self, pid: i32) {
        self.child.store(pid, Ordering::Relaxed);
    }

    /// The controller's pid in controller mode.
    pub fn controller(&self) -> Option<i32> {
        self.controller_master.as_ref().and(self.child())
    }

    fn child(&self) -> Option<i32> {
        Some(self.child.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// The nginx master's pid: the child, or in controller mode the master the pid file names
    /// now. `None` when it is not running.
    pub fn master(&self) -> Option<i32> {
        let child = self.child()?;
        match &self.controller_master {
            Some(master) => master.current(),
            None => Some(child),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// The propagation delay: while it runs, and how it ended.
    pub fn propagation(&self) -> Option<Value> {
        self.delay.borrow().clone()
    }

    /// Liveness: the command runs (the controller restarts an nginx that dies).
    pub fn live(&self) -> bool {
        self.child().is_some()
    }

    /// Ready while nginx serves, until `--unready-at` in a drain: a worker runs below the
    /// master (or below a wrapper command, whose other children, a `sleep` say, serve nothing).
    pub fn ready(&self) -> bool {
        let Some(master) = self.master() else {
            return false;
        };
        let since_drain = self
            .drain_start
            .borrow()
            .map_or(Duration::ZERO, |at| at.elapsed());
        self.unready_at.ready_in(self.phase(), since_drain)
            && crate::nginx::generations::serves_beneath(master)
    }

    /// Records how a reload ended, for `status` and `/metrics`.
    pub fn reload_finished(&self, outcome: &ReloadOutcome, took: Duration) {
        self.metrics.reload_finished(outcome, took);
        let last = LastReload {
            outcome: outcome.clone(),
            finished: SystemTime::now(),
            took,
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
    }

    pub fn last_reload(&self) -> Option<LastReload> {
        self.last_reload.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `/metrics` text, with the generations read from /proc now.
    pub fn metrics_text(&self) -> String {
        let (serving, shutting_down) = match self.master() {
            Some(master) => (
                usize::from(!serving_workers(master).is_empty()),
                self.generations.draining(master).len(),
            ),
            None => (0, 0),
        };
        self.metrics.render(self.phase(), serving, shutting_down)
    }
}

/// The last reload: how it ended, when, and how long it took.
#[derive(Debug, Clone)]
pub struct LastReload {
    pub outcome: ReloadOutcome,
    pub finished: SystemTime,
    pub took: Duration,
}

impl LastReload {
    /// As `status` shows it: the reload's reply, with when it finished and how long it took.
    pub fn to_json(&self) -> Value {
        let mut reply = self.outcome.to_json();
        let finished = self
            .finished
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        reply["finished_unix_ms"] = (finished.as_millis() as u64).into();
        reply["took_ms"] = (self.took.as_millis() as u64).into();
        reply
    }
}
