//! Controller mode: `run --pid-file FILE -- CONTROLLER`, for ingress images whose main process
//! is a controller that starts nginx itself (ingress-nginx's `/nginx-ingress-controller`, F5's
//! `nginx-ingress`).
//!
//! The child is the controller; the nginx master is whatever process the pid file names, read
//! again whenever it matters, so a master the controller restarted is followed. nginx's
//! processes are below the supervisor either way (the controller's children, or reparented to
//! us as subreaper), so the drain finds and waits for all of them. The order on SIGTERM: the
//! whole drain on nginx first, and only then SIGTERM to the controller, whose own shutdown
//! (`nginx -s quit`) then finds nothing left to cut.

use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
// The drain's clock: `kill_at` is a deadline of the same budget.
use tokio::time::Instant;

use crate::nginx::pidfd::PidFd;
use crate::nginx::pidfile::{FoundMaster, find_master};
use crate::os::reaper::Exit;

#[derive(Debug, Clone)]
pub struct Controller {
    pid_file: PathBuf,
}

/// How the controller ended after the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerEnd {
    pub status: Option<Exit>,
    /// It did not exit on SIGTERM within the budget and was killed.
    pub killed: bool,
}

impl Controller {
    pub fn new(pid_file: PathBuf) -> Self {
        Self { pid_file }
    }

    pub fn pid_file(&self) -> &Path {
        &self.pid_file
    }

    /// The nginx master's pid now, for probes, metrics and status: `None` while the controller
    /// has not started nginx, is restarting it, or the pid file is unusable (said at the drain).
    pub fn current_master(&self) -> Option<i32> {
        find_master(&self.pid_file).ok().flatten().map(|m| m.pidfd.pid())
    }

    /// The nginx master the pid file names now, checked in /proc and pinned by a pidfd. `None`
    /// while the controller has not started nginx (or is restarting it).
    pub fn nginx_master(&self) -> Option<FoundMaster> {
        match find_master(&self.pid_file) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(pid_file = %self.pid_file.display(), %err, "no usable nginx master in the pid file");
                None
            }
        }
    }

    /// Signals meant for nginx (SIGHUP, SIGUSR1, ...) go to the master, not to the controller,
    /// which may not expect them (a Go program exits on SIGHUP).
    pub fn forward(&self, signal: Signal) {
        match self.nginx_master() {
            Some(master) => {
                let delivered = master.pidfd.signal(signal);
                tracing::info!(%signal, pid = master.pidfd.pid(), delivered, "signal forwarded to the nginx master named by the pid file");
            }
            None => {
                tracing::warn!(%signal, pid_file = %self.pid_file.display(), "signal not forwarded: no nginx master is running")
            }
        }
    }

    /// After nginx has drained: SIGTERM to the controller, and wait for it until `kill_at`,
    /// then SIGKILL. `exited` is its status if it has already ended by itself (F5's controller
    /// exits when nginx does).
    pub async fn stop(
        &self,
        controller: &PidFd,
        exit: &mut tokio::sync::oneshot::Receiver<Exit>,
        exited: Option<Exit>,
        kill_at: Instant,
    ) -> ControllerEnd {
        if let Some(status) = exited {
            tracing::info!(%status, "the controller had already exited");
            return ControllerEnd {
                status: Some(status),
                killed: false,
            };
        }
        let pid = controller.pid();
        controller.signal(Signal::SIGTERM);
        tracing::info!(pid, "nginx has exited: SIGTERM to the controller");
        if let Ok(status) = tokio::time::timeout_at(kill_at, &mut *exit).await {
            let status = status.ok();
            tracing::info!(pid, status = ?status, "the controller exited");
            return ControllerEnd {
                status,
                killed: false,
            };
        }
        tracing::error!(
            pid,
            "the controller did not exit on SIGTERM within the budget: SIGKILL"
        );
        controller.signal(Signal::SIGKILL);
        let status = exit.await.ok();
        ControllerEnd { status, killed: true }
    }
}
