//! Who the supervisor's child is, and everything that differs because of it: where signals for
//! nginx go, which masters the drain waits on, and what happens once nginx has drained.
//!
//! Controller mode (`run --pid-file FILE -- CONTROLLER`) is for ingress images whose main
//! process is a controller that starts nginx itself (F5 NGINX Ingress Controller's
//! `nginx-ingress`, ingress-nginx's `/nginx-ingress-controller`). The nginx master is whatever
//! process the pid file names, read again whenever it matters, so a master the controller
//! restarted is followed. nginx's processes are below the supervisor either way (the
//! controller's children, or reparented to us as subreaper), so the drain finds and waits for
//! all of them. The order on SIGTERM: the whole drain on nginx first, and only then SIGTERM to
//! the controller, whose own shutdown (`nginx -s quit`) then finds nothing left to cut.
//!
//! A wrapper (`run -- sh -c "nginx -g 'daemon off;'; echo done"`, without a pid file) that
//! stays the parent of nginx instead of exec'ing it would take nginx's signals: a shell dies of
//! SIGQUIT or SIGHUP, and the drain would end with it while nginx serves on. So when the child
//! is not itself an nginx master, the master is looked for beneath it whenever a signal is for
//! nginx; found, it gets the signal, the drain waits on it, and the wrapper is stopped after
//! nginx as a controller is.

use std::path::Path;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::core::outcome::{ControllerEnd, Exit};
use crate::core::policy::Mode;
use crate::nginx::command::NginxCommand;
use crate::nginx::pidfd::PidFd;
use crate::nginx::pidfile::{FollowedMaster, FoundMaster, looks_like_master};
use crate::nginx::tree::{self, ProcStat, ProcessTable};

pub enum Child {
    /// nginx itself: the child is the master, or a wrapper that starts it.
    Nginx {
        /// The kernel's name for the program, used when the master cannot be read.
        program_comm: String,
        /// The command is not nginx (a shell, a script): it may exec nginx, or stay its parent.
        wrapper: bool,
    },
    /// An ingress controller; its nginx master is the one the pid file names.
    Controller(Arc<FollowedMaster>),
}

/// The masters a drain waits on, whatever their name.
pub enum DrainTargets {
    /// The child is the master.
    Child,
    /// The master the controller's pid file names now.
    Found(FoundMaster),
    /// The controller had not started nginx, or it had died: the drain looks below us only.
    None,
    /// A wrapper's nginx master, beneath the child.
    Beneath(MasterBeneath),
}

impl DrainTargets {
    /// Whether the child is not the nginx master drained: its status is not nginx's, and it is
    /// stopped once nginx has drained.
    pub fn child_is_not_nginx(&self) -> bool {
        matches!(self, DrainTargets::Beneath(_))
    }
}

/// The nginx master a wrapper started and stayed the parent of, pinned by a pidfd.
pub struct MasterBeneath {
    pub pidfd: PidFd,
    pub comm: String,
}

impl Child {
    /// Controller mode when a pid file is given and the command is not nginx: with nginx itself
    /// as the command, the pid file is only where nginx writes its pid.
    pub fn new(nginx: &NginxCommand, pid_file: Option<&Path>) -> Self {
        match pid_file.filter(|_| !nginx.is_nginx()) {
            Some(path) => Child::Controller(Arc::new(FollowedMaster::new(path.to_owned()))),
            None => Child::Nginx {
                program_comm: command_name(nginx),
                wrapper: !nginx.is_nginx(),
            },
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Child::Nginx { .. } => Mode::Nginx,
            Child::Controller(_) => Mode::Controller,
        }
    }

    /// In controller mode, the master the probes, `/metrics` and `status` follow.
    pub fn followed_master(&self) -> Option<Arc<FollowedMaster>> {
        match self {
            Child::Nginx { .. } => None,
            Child::Controller(master) => Some(master.clone()),
        }
    }

    pub fn started(&self, pid: i32) -> String {
        match self {
            Child::Nginx { wrapper: false, .. } => format!("nginx started (master pid {pid})"),
            Child::Nginx { wrapper: true, .. } => format!(
                "nginx started through the command (pid {pid}): the master is the command once it execs nginx, or found beneath it"
            ),
            Child::Controller(master) => format!(
                "controller started (pid {pid}); its nginx is found through {}",
                master.path().display()
            ),
        }
    }

    /// What the child is called in logs.
    pub fn what(&self) -> &'static str {
        match self {
            Child::Nginx { wrapper: false, .. } => "the nginx master",
            Child::Nginx { wrapper: true, .. } => "the command",
            Child::Controller(_) => "the controller",
        }
    }

    /// Signals for nginx go to the master: our child, or the one the pid file names. Never to
    /// a controller, which may not expect them (a Go program exits on SIGHUP).
    pub fn forward(&self, child: &PidFd, signal: Signal) {
        if let Some(master) = self.master_beneath(child.pid()) {
            let delivered = master.pidfd.signal(signal);
            tracing::info!(%signal, pid = master.pidfd.pid(), delivered, "signal forwarded to the nginx master beneath the command");
            return;
        }
        match self {
            Child::Nginx { .. } => {
                let delivered = child.signal(signal);
                tracing::info!(%signal, pid = child.pid(), delivered, "signal forwarded to the nginx master");
            }
            Child::Controller(master) => match master.find() {
                Some(found) => {
                    let delivered = found.pidfd.signal(signal);
                    tracing::info!(%signal, pid = found.pidfd.pid(), delivered, "signal forwarded to the nginx master named by the pid file");
                }
                None => {
                    tracing::warn!(%signal, pid_file = %master.path().display(), "signal not forwarded: no nginx master is running")
                }
            },
        }
    }

    /// The masters to drain, read when the drain starts (the controller may have restarted
    /// nginx since it started).
    pub fn drain_targets(&self, child_pid: i32) -> DrainTargets {
        match self {
            Child::Nginx { .. } => match self.master_beneath(child_pid) {
                Some(master) => {
                    tracing::warn!(
                        pid = master.pidfd.pid(),
                        "the command stayed the parent of nginx: draining the nginx master beneath it; start nginx with `exec` so that it is the child"
                    );
                    DrainTargets::Beneath(master)
                }
                None => DrainTargets::Child,
            },
            Child::Controller(master) => match master.find() {
                Some(found) => DrainTargets::Found(found),
                None => {
                    tracing::warn!(pid_file = %master.path().display(), "no nginx master to drain");
                    DrainTargets::None
                }
            },
        }
    }

    /// The command name of the nginx processes to look for below us: the master's own (an
    /// nginx-debug, an openresty). Read when the drain starts: by then the child has exec'd
    /// nginx, even through a wrapper.
    pub fn nginx_comm(&self, child_pid: i32, targets: &DrainTargets) -> String {
        match (self, targets) {
            (_, DrainTargets::Found(found)) => found.comm.clone(),
            (_, DrainTargets::Beneath(master)) => master.comm.clone(),
            // A wrapper that is not (or no longer) nginx: its nginx is nginx by name.
            (Child::Nginx { wrapper: true, .. }, _) if !is_master(child_pid) => "nginx".to_owned(),
            (Child::Nginx { program_comm, .. }, _) => {
                ProcStat::read(child_pid).map_or_else(|| program_comm.clone(), |stat| stat.comm)
            }
            (Child::Controller(_), _) => "nginx".to_owned(),
        }
    }

    /// After nginx has drained: nothing more for nginx itself. A controller, or a wrapper that
    /// stayed nginx's parent, hears SIGTERM only now, and SIGKILL at `kill_at`; how it ended is
    /// part of the outcome.
    pub async fn after_drain(
        &self,
        child: &PidFd,
        exit: &mut oneshot::Receiver<Exit>,
        exited: Option<Exit>,
        kill_at: Instant,
        child_is_not_nginx: bool,
    ) -> Option<ControllerEnd> {
        match self {
            Child::Nginx { .. } if child_is_not_nginx => {
                Some(stop_controller("the command", child, exit, exited, kill_at).await)
            }
            Child::Nginx { .. } => None,
            Child::Controller(_) => {
                Some(stop_controller("the controller", child, exit, exited, kill_at).await)
            }
        }
    }

    /// The nginx master beneath a wrapper that did not exec nginx; `None` when the child is
    /// nginx itself (or became it), or has not started nginx (yet).
    pub fn master_beneath(&self, child_pid: i32) -> Option<MasterBeneath> {
        let Child::Nginx { wrapper: true, .. } = self else {
            return None;
        };
        if is_master(child_pid) {
            return None;
        }
        let table = ProcessTable::read().ok()?;
        // Parents come first: the topmost master, not one a master started (a binary upgrade).
        let stat = table
            .descendants(child_pid)
            .into_iter()
            .find(|s| is_master(s.pid))?;
        let pidfd = PidFd::open_verified(stat).ok().flatten()?;
        Some(MasterBeneath {
            pidfd,
            comm: stat.comm.clone(),
        })
    }

    /// Whether the child's end is nginx's end: a controller's exit mid-drain is not a failed
    /// nginx, and its status is reported, not passed on.
    pub fn is_nginx(&self) -> bool {
        matches!(self, Child::Nginx { .. })
    }
}

/// After nginx has drained: SIGTERM to the controller, and wait for it until `kill_at`, then
/// SIGKILL. `exited` is its status if it has already ended by itself (F5's controller exits
/// when nginx does). Its exit status is reported, not passed on: ingress-nginx exits 1 when
/// its `nginx -s quit` finds nginx already gone, which is our doing.
async fn stop_controller(
    what: &str,
    controller: &PidFd,
    exit: &mut oneshot::Receiver<Exit>,
    exited: Option<Exit>,
    kill_at: Instant,
) -> ControllerEnd {
    let end = |status: Option<Exit>, killed| ControllerEnd {
        status: status.map(|s| s.to_string()),
        killed,
    };
    if let Some(status) = exited {
        tracing::info!(%status, "{what} had already exited");
        return end(Some(status), false);
    }
    let pid = controller.pid();
    controller.signal(Signal::SIGTERM);
    tracing::info!(pid, "nginx has exited: SIGTERM to {what}");
    if let Ok(status) = tokio::time::timeout_at(kill_at, &mut *exit).await {
        let status = status.ok();
        tracing::info!(pid, status = ?status, "{what} exited");
        return end(status, false);
    }
    tracing::error!(pid, "{what} did not exit on SIGTERM within the budget: SIGKILL");
    controller.signal(Signal::SIGKILL);
    end(exit.await.ok(), true)
}

/// Whether `pid` is an nginx master now, by its title and binary.
fn is_master(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    looks_like_master(&tree::title(pid), exe.as_deref())
}

/// The kernel's name for the processes the command becomes: the file name, cut to 15 bytes.
fn command_name(nginx: &NginxCommand) -> String {
    let program = nginx.program();
    let name = Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("nginx");
    name.chars()
        .scan(0, |len, c| {
            *len += c.len_utf8();
            (*len <= 15).then_some(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_are_cut_like_the_kernel_cuts_them() {
        let cmd = |program: &str| NginxCommand::custom(vec![program.into()]);
        assert_eq!(command_name(&cmd("/usr/sbin/nginx")), "nginx");
        assert_eq!(command_name(&cmd("/a/very-long-program-name")), "very-long-progr");
    }

    #[test]
    fn a_pid_file_makes_a_controller_only_of_a_command_that_is_not_nginx() {
        let pid_file = Path::new("/run/nginx.pid");
        let nginx = NginxCommand::custom(vec!["nginx".into(), "-g".into(), "daemon off;".into()]);
        let controller = NginxCommand::custom(vec!["/nginx-ingress-controller".into()]);
        assert_eq!(Child::new(&nginx, Some(pid_file)).mode(), Mode::Nginx);
        assert_eq!(Child::new(&nginx, None).mode(), Mode::Nginx);
        assert_eq!(Child::new(&controller, Some(pid_file)).mode(), Mode::Controller);
        assert_eq!(Child::new(&controller, None).mode(), Mode::Nginx);
    }
}
