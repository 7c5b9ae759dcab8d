//! Reaping: as PID 1 or child subreaper, every process that ends below the supervisor is
//! reaped here, and its status goes to whoever spawned it.
//!
//! One `waitpid(-1)` loop reaps everything, so nothing else may call `wait` on a child: every
//! child is started through [`Reaper::spawn`], which registers it before the loop can see it exit.

use std::collections::HashMap;
use std::process::{ChildStderr, ChildStdout, Command};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;

pub use crate::core::outcome::Exit;

/// What is below the supervisor: PID 1 of a PID namespace, or a child subreaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Pid1,
    Subreaper,
}

/// Makes this process the reaper of its subtree: nginx processes orphaned by a dying master come
/// to us instead of to the host's init, so they can be waited for and reaped.
pub fn become_reaper() -> std::io::Result<Role> {
    if std::process::id() == 1 {
        return Ok(Role::Pid1);
    }
    nix::sys::prctl::set_child_subreaper(true)?;
    Ok(Role::Subreaper)
}

/// A child started through the reaper.
pub struct Spawned {
    pub pid: Pid,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub exit: oneshot::Receiver<Exit>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<Pid, oneshot::Sender<Exit>>>>,
}

impl Reaper {
    /// Starts the loop that reaps on every SIGCHLD. `sigchld` must have been installed before
    /// the first child was started, so that no exit goes unnoticed.
    pub fn start(sigchld: Signal) -> Self {
        let reaper = Reaper::default();
        let waiters = reaper.waiters.clone();
        tokio::spawn(async move {
            let mut sigchld = sigchld;
            loop {
                reap_all(&waiters);
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        reaper
    }

    /// Reaps what has ended now, without waiting for the SIGCHLD to be handled: before the
    /// supervisor exits, so no zombie of ours is handed to the host's init.
    pub fn reap_now(&self) {
        reap_all(&self.waiters);
    }

    /// Whether any child, alive or not yet reaped, is left: one system call, where a scan of
    /// /proc would read every process on the host.
    pub fn has_children(&self) -> bool {
        self.reap_now();
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(waitid(Id::All, flags), Err(nix::errno::Errno::ECHILD))
    }

    pub fn spawn(&self, command: &mut Command) -> std::io::Result<Spawned> {
        // Held across the fork: the reap loop cannot reap the child before it is registered.
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let mut child = command.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        let (tx, exit) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok(Spawned {
            pid,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            exit,
        })
        // `child` is dropped without `wait`: the reap loop owns its status.
    }
}

/// Has the kernel SIGKILL the child when this process dies, so that nothing it started outlives
/// it (PR_SET_PDEATHSIG). The death signal follows the thread that forks: spawn from the thread
/// that lives as long as the process.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
    // system calls (prctl, getppid), without allocating.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before prctl: then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

fn reap_all(waiters: &Mutex<HashMap<Pid, oneshot::Sender<Exit>>>) {
    loop {
        let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!(%err, "waitpid failed");
                return;
            }
        };
        let waiter = waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
        match waiter {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(Exit::Code(0).as_exit_code(), 0);
        assert_eq!(Exit::Code(1).as_exit_code(), 1);
        assert_eq!(Exit::Signal(9).as_exit_code(), 137);
        assert_eq!(Exit::Signal(15).as_exit_code(), 143);
        assert_eq!(Exit::Signal(9).to_string(), "killed by SIGKILL");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn statuses_reach_the_spawner() {
        let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).unwrap();
        let reaper = Reaper::start(sigchld);
        let ok = reaper.spawn(&mut Command::new("true")).unwrap();
        let failed = reaper.spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        let killed = reaper
            .spawn(Command::new("sh").args(["-c", "kill -9 $$"]))
            .unwrap();
        assert_eq!(ok.exit.await.unwrap(), Exit::Code(0));
        assert_eq!(failed.exit.await.unwrap(), Exit::Code(7));
        assert_eq!(killed.exit.await.unwrap(), Exit::Signal(9));
    }
}
