//! The nginx processes a drain waits for and signals: what the wait and the escalation ask of
//! the system, as one trait, and its implementation on pidfds, /proc and the reaper.
//!
//! The drain's timeline (when to signal, how long to wait) is written against the trait only,
//! so that it can be played in paused time against scripted processes.
//!
//! A process that cannot be read in /proc or held by a pidfd (too many open files, say) is
//! unknown, never gone: the masters the drain was given are waited for through the drain's own
//! pidfds, which need no new descriptor, and a look that fails says so ([`Unseen`]).

use std::future::Future;

use nix::sys::signal::Signal;

use crate::nginx::pidfd::{self, PidFd, Processes};
use crate::nginx::pidfile::looks_like_master;
use crate::nginx::tree::{ProcStat, ProcessTable, title};
use crate::os::reaper::Reaper;

/// A look for nginx processes that could not see them all: /proc could not be read, or a
/// process found could not be held by a pidfd. What it missed may still run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unseen(pub String);

/// The set of nginx processes a drain tracks, from its snapshot until none is left.
pub trait NginxProcesses {
    /// Tracks every nginx process not tracked yet; returns how many were added, or why the look
    /// could not see every one (those it did see are tracked).
    fn find_new(&mut self) -> Result<usize, Unseen>;

    /// Resolves with the pid of the next tracked process to exit, which is then no longer
    /// tracked; `None` at once when none is tracked.
    fn next_exit(&mut self) -> impl Future<Output = Option<i32>> + Send;

    /// Whether an nginx process may exist that is not tracked (a worker forked just before
    /// SIGQUIT), answered cheaply: it is asked each time the tracked set empties.
    fn may_have_stragglers(&self) -> bool;

    /// Whether a master the drain was given has exited (killed, crashed): its workers, orphaned,
    /// no longer hear what is sent to it.
    fn a_master_exited(&self) -> bool;

    /// Signals every master: the ones the drain was given and any other below them.
    fn signal_masters(&self, signal: Signal);

    /// Signals every tracked process; returns how many received it.
    fn signal_all(&self, signal: Signal) -> usize;

    /// The masters' pids, for reading their listening sockets.
    fn masters(&self) -> Vec<i32>;

    /// The tracked processes' pids.
    fn pids(&self) -> Vec<i32>;

    /// How many processes are tracked.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which processes are nginx's: every process named like the master below the roots.
#[derive(Debug, Clone)]
pub struct NginxTree {
    /// The supervisor (for `run`: orphaned workers are reparented to it), or the masters
    /// themselves (two during a binary upgrade).
    pub roots: Vec<i32>,
    pub include_roots: bool,
    /// The master's command name; a hook's leftover `sleep` below the supervisor is not nginx.
    pub comm: String,
}

impl NginxTree {
    /// Every nginx process now, or why /proc could not show them all.
    pub fn scan(&self) -> std::io::Result<Vec<ProcStat>> {
        let table = ProcessTable::read_complete()?;
        let mut seen = Vec::new();
        for &root in &self.roots {
            seen.extend(table.descendants(root));
            if self.include_roots {
                seen.extend(table.get(root));
            }
        }
        Ok(seen
            .into_iter()
            .filter(|stat| stat.comm == self.comm)
            .cloned()
            .collect())
    }
}

/// nginx's real processes: found in /proc below the tree's roots, held by pidfd.
pub struct PidfdProcesses<'a> {
    /// Found in /proc, each held by a pidfd of its own.
    processes: Processes,
    /// The masters the drain was given, whatever their name (an nginx-debug, an openresty),
    /// until they exit: waited for through the drain's own pidfds, so that no failure to read
    /// /proc or to open a descriptor can lose them.
    masters_left: Vec<&'a PidFd>,
    tree: &'a NginxTree,
    given_masters: &'a [&'a PidFd],
    reaper: &'a Reaper,
}

impl<'a> PidfdProcesses<'a> {
    /// Every nginx process now: the masters we were given, and those named like the master below
    /// the roots. Also returns why the look could not see them all, if it could not.
    pub fn snapshot(
        tree: &'a NginxTree,
        given_masters: &'a [&'a PidFd],
        reaper: &'a Reaper,
    ) -> (Self, Result<usize, Unseen>) {
        let mut processes = Self {
            processes: Processes::default(),
            masters_left: given_masters.to_vec(),
            tree,
            given_masters,
            reaper,
        };
        let found = processes.find_new();
        (processes, found)
    }

    /// A given master still running: tracked through `masters_left`, not by a pidfd of its own.
    /// One that has exited frees its number for a new process, which is tracked like any other.
    fn is_live_given_master(&self, pid: i32) -> bool {
        self.given_masters.iter().any(|m| m.pid() == pid && m.is_alive())
    }
}

/// What ended a wait for the next exit.
enum Exited {
    Tracked(Option<i32>),
    Master(usize),
}

impl NginxProcesses for PidfdProcesses<'_> {
    fn find_new(&mut self) -> Result<usize, Unseen> {
        let mut found = self
            .tree
            .scan()
            .map_err(|err| Unseen(format!("cannot read /proc: {err}")))?;
        found.retain(|stat| !self.is_live_given_master(stat.pid));
        let mut added = 0;
        let mut failed = None;
        for stat in &found {
            match self.processes.try_track(stat) {
                Ok(new) => added += usize::from(new),
                Err(err) => {
                    failed.get_or_insert_with(|| {
                        Unseen(format!("cannot hold nginx process {} by pidfd: {err}", stat.pid))
                    });
                }
            }
        }
        failed.map_or(Ok(added), Err)
    }

    async fn next_exit(&mut self) -> Option<i32> {
        if self.masters_left.is_empty() {
            return self.processes.next_exit().await;
        }
        let tracked = !self.processes.is_empty();
        let exited = tokio::select! {
            pid = self.processes.next_exit(), if tracked => Exited::Tracked(pid),
            at = pidfd::first_exit(&self.masters_left) => Exited::Master(at),
        };
        match exited {
            Exited::Tracked(pid) => pid,
            Exited::Master(at) => Some(self.masters_left.remove(at).pid()),
        }
    }

    /// Answered without reading /proc, so the drain ends within a millisecond of the last exit.
    fn may_have_stragglers(&self) -> bool {
        if self.tree.roots == [nix::unistd::getpid().as_raw()] {
            // As reaper, every process that outlived its parent below us is our child.
            self.reaper.has_children()
        } else {
            // Below a master that has exited, nothing can be found by its pid any more.
            self.given_masters.iter().any(|m| m.is_alive())
        }
    }

    fn a_master_exited(&self) -> bool {
        self.given_masters.iter().any(|m| !m.is_alive())
    }

    /// The given masters by their own pidfds, tracked or not; any other master below too: a
    /// binary upgrade may have started a new one (a child of the old) after we read the pid file.
    fn signal_masters(&self, signal: Signal) {
        for master in self.given_masters {
            master.signal(signal);
        }
        for pid in self.processes.pids() {
            if looks_like_master(&title(pid), None) {
                tracing::info!(pid, %signal, "another nginx master below: signalled too");
                self.processes.signal(pid, signal);
            }
        }
    }

    fn signal_all(&self, signal: Signal) -> usize {
        let masters = self.masters_left.iter().filter(|m| m.signal(signal)).count();
        masters + self.processes.signal_all(signal)
    }

    /// The given masters and any tracked process titled like a master (a binary upgrade's, or
    /// one a controller started during the delay).
    fn masters(&self) -> Vec<i32> {
        let mut masters: Vec<i32> = self.given_masters.iter().map(|m| m.pid()).collect();
        masters.extend(
            self.processes
                .pids()
                .filter(|&pid| looks_like_master(&title(pid), None)),
        );
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    fn pids(&self) -> Vec<i32> {
        let masters = self.masters_left.iter().map(|m| m.pid());
        masters.chain(self.processes.pids()).collect()
    }

    fn len(&self) -> usize {
        self.masters_left.len() + self.processes.len()
    }
}
