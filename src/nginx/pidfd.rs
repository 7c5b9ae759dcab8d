//! Processes held by pidfd: waited for without polling, and signalled without any risk of
//! hitting a process that reused the number.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::signal::Signal;
use rustix::process::{Pid, PidfdFlags, pidfd_open, pidfd_send_signal};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;

use super::tree::ProcStat;

/// One process, pinned: once open, the pidfd names this process and no later one.
#[derive(Debug)]
pub struct PidFd {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        let raw = Pid::from_raw(pid).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let fd = pidfd_open(raw, PidfdFlags::empty())?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for as
        // long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { pid, fd })
    }

    /// Opens a pidfd on the process a snapshot saw, or nothing if that process is gone: the
    /// start time, read again after the open, proves the number was not reused in between.
    /// `Ok(None)` means gone; any other failure is an error, never "gone": a drain that took
    /// a pidfd failure for an exit would report nginx stopped while it serves.
    pub fn open_verified(seen: &ProcStat) -> std::io::Result<Option<Self>> {
        let fd = match Self::open(seen.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Read again through /proc: a failed read is an error too, never "gone".
        Ok(ProcStat::read_checked(seen.pid)?
            .filter(|now| now.start_time == seen.start_time)
            .map(|_| fd))
    }

    /// Fails with the reason when this kernel or sandbox gives no pidfds (Linux < 5.3, or a
    /// seccomp profile that blocks pidfd_open): checked before nginx starts.
    pub fn check_support() -> std::io::Result<()> {
        Self::open(std::process::id() as i32).map(drop)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd itself, for calls that take one (pidfd_getfd).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Sends `signal`; false if the process had already exited.
    pub fn signal(&self, signal: Signal) -> bool {
        let sig = rustix::process::Signal::from_named_raw(signal as i32).expect("a named signal");
        pidfd_send_signal(self.fd.get_ref(), sig).is_ok()
    }

    /// Whether the process is still running (a pidfd is readable once it has exited).
    pub fn is_alive(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.fd.get_ref().as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n == 0)
    }

    /// Resolves when the process exits (a pidfd becomes readable then).
    pub async fn exited(&self) {
        // An error here means epoll lost the fd, which cannot happen while we own it; treat
        // it as an exit rather than wait forever.
        let _ = self.fd.readable().await;
    }
}

/// Resolves with the index of the first of `fds` whose process has exited; never when `fds` is
/// empty.
pub async fn first_exit(fds: &[&PidFd]) -> usize {
    let mut exits: Vec<_> = fds.iter().map(|fd| Box::pin(fd.exited())).collect();
    std::future::poll_fn(|cx| {
        exits
            .iter_mut()
            .position(|exit| exit.as_mut().poll(cx).is_ready())
            .map_or(std::task::Poll::Pending, std::task::Poll::Ready)
    })
    .await
}

/// A set of processes waited for together: nginx's master and workers during a drain.
#[derive(Debug, Default)]
pub struct Processes {
    live: HashMap<i32, Arc<PidFd>>,
    exits: JoinSet<i32>,
}

impl Processes {
    /// [`Processes::try_track`], with a failure logged: for callers that can do without it.
    pub fn track(&mut self, seen: &ProcStat) -> bool {
        self.try_track(seen).unwrap_or_else(|err| {
            tracing::error!(pid = seen.pid, %err, "cannot hold an nginx process by pidfd; it will not be waited for");
            false
        })
    }

    /// Holds the process a snapshot saw: true if it is tracked now, false if it was already or
    /// is gone. An error (no pidfd: too many open files, say) leaves it untracked but not gone.
    pub fn try_track(&mut self, seen: &ProcStat) -> std::io::Result<bool> {
        if self.live.contains_key(&seen.pid) {
            return Ok(false);
        }
        let Some(fd) = PidFd::open_verified(seen)? else {
            return Ok(false);
        };
        let fd = Arc::new(fd);
        self.live.insert(seen.pid, fd.clone());
        self.exits.spawn(async move {
            fd.exited().await;
            fd.pid()
        });
        Ok(true)
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.live.keys().copied()
    }

    /// The next process to exit; `None` when none is tracked.
    pub async fn next_exit(&mut self) -> Option<i32> {
        loop {
            match self.exits.join_next().await? {
                Ok(pid) => {
                    self.live.remove(&pid);
                    return Some(pid);
                }
                Err(err) => tracing::warn!(%err, "an exit watcher failed"),
            }
        }
    }

    pub fn signal(&self, pid: i32, signal: Signal) -> bool {
        self.live.get(&pid).is_some_and(|fd| fd.signal(signal))
    }

    /// Sends `signal` to every tracked process; returns how many received it.
    pub fn signal_all(&self, signal: Signal) -> usize {
        self.live.values().filter(|fd| fd.signal(signal)).count()
    }
}
