//! Scripted nginx processes for the drain's tests in paused time: each exits at a set time, or a
//! set delay after a signal, or never; every signal the drain sends is recorded with the time it
//! was sent at.
//!
//! Like nginx's, a master passes SIGQUIT and SIGTERM on to the workers; the drain's own signals
//! are the only ones recorded.

use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::{Instant, sleep_until};

use super::{NginxProcesses, Unseen};

/// The kernel's PID_MAX_LIMIT: a fake's pids are above it, so that no real process has them
/// and the connection counts the drain reads beside the wait find nothing.
const PID_MAX_LIMIT: i32 = 1 << 22;

/// How one process behaves during the drain. It ignores every signal it has no reaction to,
/// except SIGKILL, which ends it at once unless it [`survives_sigkill`](Self::survives_sigkill).
#[derive(Debug, Clone)]
pub struct Script {
    pid: i32,
    master: bool,
    /// After the drain's start: when it exits on its own.
    exits_at: Option<Duration>,
    /// How long after each signal it exits.
    reactions: Vec<(Signal, Duration)>,
    survives_sigkill: bool,
    /// After the drain's start: when it was forked, missed by the snapshot. `None`: in it.
    appears_at: Option<Duration>,
}

impl Script {
    pub fn master(pid: i32) -> Self {
        Self::new(pid, true)
    }

    pub fn worker(pid: i32) -> Self {
        Self::new(pid, false)
    }

    fn new(pid: i32, master: bool) -> Self {
        assert!(
            pid > PID_MAX_LIMIT,
            "a fake pid must be above {PID_MAX_LIMIT}: {pid}"
        );
        Self {
            pid,
            master,
            exits_at: None,
            reactions: Vec::new(),
            survives_sigkill: false,
            appears_at: None,
        }
    }

    /// Exits `after` it receives `signal` (from the drain, or from its master).
    pub fn on(mut self, signal: Signal, after: Duration) -> Self {
        self.reactions.push((signal, after));
        self
    }

    /// Exits on its own this long after the drain's start, signalled or not.
    pub fn exits_at(mut self, at: Duration) -> Self {
        self.exits_at = Some(at);
        self
    }

    /// Stuck in the kernel: even SIGKILL does not end it within the budget.
    pub fn survives_sigkill(mut self) -> Self {
        self.survives_sigkill = true;
        self
    }

    /// Not in the drain's snapshot: exists from this long after the drain's start on, for
    /// `find_new` to find (a worker forked just before SIGQUIT).
    pub fn appears_at(mut self, at: Duration) -> Self {
        self.appears_at = Some(at);
        self
    }
}

struct Process {
    script: Script,
    /// In the drain's set: from the snapshot or `find_new`, until `next_exit` reports it.
    tracked: bool,
    /// When it exits, as far as its script and the signals so far decide.
    exit: Option<Instant>,
    appears: Instant,
}

impl Process {
    fn exists(&self, now: Instant) -> bool {
        self.appears <= now && self.exit.is_none_or(|exit| exit > now)
    }

    fn react(&mut self, signal: Signal, now: Instant) {
        let after = match signal {
            Signal::SIGKILL if !self.script.survives_sigkill => Some(Duration::ZERO),
            _ => self
                .script
                .reactions
                .iter()
                .find(|(s, _)| *s == signal)
                .map(|(_, after)| *after),
        };
        if let Some(after) = after {
            let exit = now + after;
            self.exit = Some(self.exit.map_or(exit, |scripted| scripted.min(exit)));
        }
    }
}

/// A set of scripted processes, as a drain sees nginx's.
pub struct FakeNginx {
    start: Instant,
    processes: Mutex<Vec<Process>>,
    /// (milliseconds after the start, pid, signal), in the order sent.
    sent: Mutex<Vec<(u64, i32, Signal)>>,
    /// Until then every look for new processes fails, as /proc does when the supervisor is out
    /// of file descriptors.
    blind_until: Option<Instant>,
    /// How many looks for new processes the drain made.
    looks: usize,
}

impl FakeNginx {
    /// The processes as the drain's snapshot finds them at `start`, when the drain's budget
    /// starts; every time in the scripts counts from it.
    pub fn new(start: Instant, scripts: Vec<Script>) -> Self {
        let processes = scripts
            .into_iter()
            .map(|script| Process {
                tracked: script.appears_at.is_none(),
                exit: script.exits_at.map(|at| start + at),
                appears: start + script.appears_at.unwrap_or_default(),
                script,
            })
            .collect();
        Self {
            start,
            processes: Mutex::new(processes),
            sent: Mutex::new(Vec::new()),
            blind_until: None,
            looks: 0,
        }
    }

    /// Every look for new processes fails until `at` after the start (forever: `None`); the
    /// processes the snapshot tracked stay tracked, as pidfds already held do.
    pub fn blind_until(mut self, at: Option<Duration>) -> Self {
        self.blind_until = Some(at.map_or(self.start + Duration::from_secs(86_400), |at| self.start + at));
        self
    }

    /// How many looks for new processes the drain made.
    pub fn looks(&self) -> usize {
        self.looks
    }

    /// Every signal the drain sent: (milliseconds after the start, pid, signal), by time, then pid.
    pub fn sent(&self) -> Vec<(u64, i32, Signal)> {
        let mut sent = self.sent.lock().unwrap().clone();
        sent.sort_by_key(|&(at, pid, _)| (at, pid));
        sent
    }

    /// Sends `signal` from the drain to the processes `to` picks; returns how many received it.
    fn send(&self, signal: Signal, to: impl Fn(&Process) -> bool) -> usize {
        let now = Instant::now();
        let mut processes = self.processes.lock().unwrap();
        let mut received = 0;
        let mut passed_on = false;
        for process in processes.iter_mut().filter(|p| p.exists(now) && to(p)) {
            let at = (now - self.start).as_millis() as u64;
            self.sent.lock().unwrap().push((at, process.script.pid, signal));
            process.react(signal, now);
            received += 1;
            passed_on |= process.script.master && matches!(signal, Signal::SIGQUIT | Signal::SIGTERM);
        }
        if passed_on {
            for worker in processes.iter_mut().filter(|p| !p.script.master && p.exists(now)) {
                worker.react(signal, now);
            }
        }
        received
    }
}

impl NginxProcesses for FakeNginx {
    fn find_new(&mut self) -> Result<usize, Unseen> {
        let now = Instant::now();
        self.looks += 1;
        if self.blind_until.is_some_and(|until| now < until) {
            return Err(Unseen(
                "cannot read /proc: Too many open files (os error 24)".into(),
            ));
        }
        let mut found = 0;
        for process in self.processes.get_mut().unwrap().iter_mut() {
            if !process.tracked && process.exists(now) {
                process.tracked = true;
                found += 1;
            }
        }
        Ok(found)
    }

    async fn next_exit(&mut self) -> Option<i32> {
        let processes = self.processes.get_mut().unwrap();
        if !processes.iter().any(|p| p.tracked) {
            return None;
        }
        let next = processes
            .iter()
            .filter(|p| p.tracked)
            .filter_map(|p| Some((p.exit?, p.script.pid)))
            .min();
        // Nothing scheduled: only a signal can change that, and the drain sends none while it
        // waits here.
        let Some((at, pid)) = next else {
            return std::future::pending().await;
        };
        sleep_until(at).await;
        let processes = self.processes.get_mut().unwrap();
        if let Some(process) = processes.iter_mut().find(|p| p.script.pid == pid) {
            process.tracked = false;
        }
        Some(pid)
    }

    fn may_have_stragglers(&self) -> bool {
        let now = Instant::now();
        self.processes
            .lock()
            .unwrap()
            .iter()
            .any(|p| !p.tracked && p.exists(now))
    }

    fn a_master_exited(&self) -> bool {
        let now = Instant::now();
        self.processes
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.script.master && p.exit.is_some_and(|exit| exit <= now))
    }

    fn signal_masters(&self, signal: Signal) {
        self.send(signal, |p| p.script.master);
    }

    fn signal_all(&self, signal: Signal) -> usize {
        self.send(signal, |p| p.tracked)
    }

    fn masters(&self) -> Vec<i32> {
        let now = Instant::now();
        let processes = self.processes.lock().unwrap();
        processes
            .iter()
            .filter(|p| p.script.master && p.exists(now))
            .map(|p| p.script.pid)
            .collect()
    }

    fn pids(&self) -> Vec<i32> {
        let processes = self.processes.lock().unwrap();
        processes
            .iter()
            .filter(|p| p.tracked)
            .map(|p| p.script.pid)
            .collect()
    }

    fn len(&self) -> usize {
        self.processes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.tracked)
            .count()
    }
}
