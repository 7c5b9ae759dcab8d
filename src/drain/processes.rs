//! The nginx processes a drain waits for and signals: what the wait and the escalation ask of
//! the system, as one trait, and its implementation on pidfds, /proc and the reaper.
//!
//! The drain's timeline (when to signal, how long to wait) is written against the trait only,
//! so that it can be played in paused time against scripted processes.

use std::future::Future;

use nix::sys::signal::Signal;

use crate::nginx::pidfd::{PidFd, Processes};
use crate::nginx::pidfile::looks_like_master;
use crate::nginx::tree::{ProcStat, ProcessTable, title};
use crate::os::reaper::Reaper;

/// The set of nginx processes a drain tracks, from its snapshot until none is left.
pub trait NginxProcesses {
    /// Tracks every nginx process not tracked yet; returns how many were added.
    fn find_new(&mut self) -> usize;

    /// Resolves with the pid of the next tracked process to exit, which is then no longer
    /// tracked; `None` at once when none is tracked.
    fn next_exit(&mut self) -> impl Future<Output = Option<i32>> + Send;

    /// Whether an nginx process may exist that is not tracked (a worker forked just before
    /// SIGQUIT), answered cheaply: it is asked each time the tracked set empties.
    fn may_have_stragglers(&self) -> bool;

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
    /// Tracks every nginx process not tracked yet; returns how many were added.
    pub fn track(&self, processes: &mut Processes) -> usize {
        let Ok(table) = ProcessTable::read() else {
            return 0;
        };
        let mut seen = Vec::new();
        for &root in &self.roots {
            seen.extend(table.descendants(root));
            if self.include_roots {
                seen.extend(table.get(root));
            }
        }
        seen.into_iter()
            .filter(|stat| stat.comm == self.comm && processes.track(stat))
            .count()
    }
}

/// nginx's real processes: found in /proc below the tree's roots, held by pidfd.
pub struct PidfdProcesses<'a> {
    processes: Processes,
    tree: &'a NginxTree,
    /// The masters the drain was given, whatever their name (an nginx-debug, an openresty).
    given_masters: &'a [&'a PidFd],
    reaper: &'a Reaper,
}

impl<'a> PidfdProcesses<'a> {
    /// Every nginx process now: those named like the master below the roots, and the masters
    /// we were given whatever their name.
    pub fn snapshot(tree: &'a NginxTree, given_masters: &'a [&'a PidFd], reaper: &'a Reaper) -> Self {
        let mut processes = Processes::default();
        tree.track(&mut processes);
        for master in given_masters {
            if let Some(stat) = ProcStat::read(master.pid()) {
                processes.track(&stat);
            }
        }
        Self {
            processes,
            tree,
            given_masters,
            reaper,
        }
    }

    fn is_given_master(&self, pid: i32) -> bool {
        self.given_masters.iter().any(|m| m.pid() == pid)
    }
}

impl NginxProcesses for PidfdProcesses<'_> {
    fn find_new(&mut self) -> usize {
        self.tree.track(&mut self.processes)
    }

    fn next_exit(&mut self) -> impl Future<Output = Option<i32>> + Send {
        self.processes.next_exit()
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

    /// The given masters by their own pidfds, tracked or not; any other master below too: a
    /// binary upgrade may have started a new one (a child of the old) after we read the pid file.
    fn signal_masters(&self, signal: Signal) {
        for master in self.given_masters {
            master.signal(signal);
        }
        for pid in self.processes.pids().filter(|&pid| !self.is_given_master(pid)) {
            if looks_like_master(&title(pid), None) {
                tracing::info!(pid, %signal, "another nginx master below: signalled too");
                self.processes.signal(pid, signal);
            }
        }
    }

    fn signal_all(&self, signal: Signal) -> usize {
        self.processes.signal_all(signal)
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
        self.processes.pids().collect()
    }

    fn len(&self) -> usize {
        self.processes.len()
    }
}
