//! The ordered drain: readiness, keep-alive flag, hooks, propagation delay, SIGQUIT, wait,
//! escalation. One implementation, whoever asked for the drain.
//!
//! The wait and the escalation see nginx's processes only through [`NginxProcesses`], so their
//! timeline is tested in paused time against scripted processes.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::Notify;
// Tokio's clock, not the system's: the budget's deadlines and the elapsed time then follow
// paused time in tests.
use tokio::time::{Instant, sleep_until};

use crate::core::outcome::{DrainOutcome, Observed};
use crate::core::phase::{Phase, Phases};
use crate::core::plan::{DrainPlan, PropagationDelay};
use crate::core::quiet::{self, Bounds, DelayEnd, DelayEnded, Verdict};
use crate::duration::fmt;
use crate::nginx::arrivals::ArrivalWatch;
use crate::nginx::connections::{self, Listeners};
use crate::nginx::pidfd::{self, PidFd};
use crate::os::drain_flag::DrainFlag;
use crate::os::hooks;
use crate::os::reaper::Reaper;

mod close_spread;
#[cfg(test)]
mod fake;
mod processes;
#[cfg(test)]
mod tests;

use close_spread::CloseSpread;
use processes::PidfdProcesses;
pub use processes::{NginxProcesses, NginxTree, Unseen};

/// The most nginx masters a drain meets at once: an old and a new one during a binary upgrade,
/// and one a controller started meanwhile. With more processes left, one of them is a worker.
const MASTERS_AT_MOST: usize = 3;

/// How often, at most, a drain reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// After a look for nginx processes that failed with none tracked, the next comes this soon,
/// then twice as late each time, up to [`RETRY_AT_MOST`]: a drain that cannot see must not
/// conclude that nothing is there, nor spin.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_AT_MOST: Duration = Duration::from_secs(1);

pub struct Drain<'a> {
    pub plan: &'a DrainPlan,
    pub phases: &'a Phases,
    pub reaper: &'a Reaper,
    pub flag: &'a DrainFlag,
    /// The master, or both masters during a binary upgrade.
    pub masters: Vec<&'a PidFd>,
    pub tree: NginxTree,
    /// Notified to cut the propagation delay short (a second Ctrl-C).
    pub skip_delay: &'a Notify,
    /// nginx's `worker_shutdown_timeout`, when known: the connections still open when it fires
    /// are the ones nginx closes itself, and the drain reports how many.
    pub shutdown_timeout: Option<Duration>,
    /// The arrivals watched while nginx served, for an adaptive delay that knows the traffic
    /// of the minute before; without it, the watch starts with the drain.
    pub arrivals: Option<ArrivalWatch>,
}

impl Drain<'_> {
    /// Runs the whole drain; `started` is when the trigger arrived, where the budget starts.
    pub async fn run(mut self, started: Instant) -> DrainOutcome {
        let plan = self.plan;
        let history = self.arrivals.take();
        self.phases.enter(Phase::Unready, "drain started");
        // Held from the first instant: workers whose master dies during the hooks or the delay
        // are still known, and quit at its end like the rest.
        let mut sight = Sight::default();
        let mut processes = self.snapshot(&mut sight);
        // Named after the master it drains; with none (a controller's nginx not running), after
        // this process, which lowers it at the end.
        let owner = self
            .masters
            .first()
            .map_or(std::process::id() as i32, |m| m.pid());
        let mut spread = CloseSpread::new(self.flag, owner, started, plan.close_spread);
        match spread.begin() {
            Ok(()) => self.phases.enter(Phase::KeepAliveClose, &spread.announcement()),
            Err(err) => {
                tracing::warn!(flag = %self.flag.path().display(), %err, "cannot create the drain flag: keep-alive clients will not be told to close")
            }
        }
        // Arrivals are watched from the first instant: those during the hooks tell the
        // traffic's rate too.
        let watch = match (plan.propagation_delay, history) {
            (PropagationDelay::UntilQuiet { .. }, Some(mut watch)) => {
                Some(watch.resume(&self.masters).map(|()| watch))
            }
            (PropagationDelay::UntilQuiet { .. }, None) => {
                Some(ArrivalWatch::start(&self.masters, &plan.probe_ports))
            }
            (PropagationDelay::Fixed(_), watch) => {
                if let Some(watch) = watch {
                    watch.stop().await;
                }
                None
            }
        };
        let hooks_and_delay = async {
            if !plan.hooks.is_empty() {
                self.phases.enter(Phase::PreDrainHooks, "running pre-drain hooks");
                hooks::run_all(self.reaper, &plan.hooks, plan.hook_timeout).await;
            }
            match plan.propagation_delay.is_zero() {
                true => None,
                false => {
                    let end = self.propagation_delay(watch, started + plan.close_spread).await;
                    self.phases.report_delay(end.to_json());
                    Some(end)
                }
            }
        };
        let delay = spread.alongside(hooks_and_delay, self.skip_delay).await;
        // Every client is told before the SIGQUIT, even when the delay was cut short.
        let told = spread.finish();
        // Workers forked since the snapshot (one the master replaced, say).
        sight.note(processes.find_new());
        let mut outcome = self.quit(&mut processes, &mut sight, started).await;
        outcome.delay = delay;
        outcome.told = Some(told);
        outcome
    }

    /// The propagation delay: fixed, or until new connections stop arriving. Cut short by a
    /// second interrupt. The watch on arrivals, if any, is stopped (its copies of the
    /// listeners closed) before this returns, so before the SIGQUIT. `all_told` is the close
    /// spread's end: the clients told last get the floor too (the plan made room for it, and
    /// a fixed delay ends after it).
    async fn propagation_delay(
        &self,
        watch: Option<Result<ArrivalWatch, String>>,
        all_told: Instant,
    ) -> DelayEnd {
        let began = Instant::now();
        let mut master_died = false;
        let ceiling = match (self.plan.propagation_delay, watch) {
            (PropagationDelay::UntilQuiet { floor, ceiling }, Some(Ok(watch))) => {
                let floor = floor.max((all_told + floor).saturating_duration_since(began));
                self.phases.enter(
                    Phase::PropagationDelay,
                    &format!(
                        "nginx keeps serving until new connections stop arriving (at least {}, at most {})",
                        fmt(floor),
                        fmt(ceiling)
                    ),
                );
                let ended = self
                    .until_quiet(&watch, began, floor, ceiling, &mut master_died)
                    .await;
                watch.stop().await;
                return ended;
            }
            (PropagationDelay::UntilQuiet { ceiling, .. }, watch) => {
                if let Some(Err(reason)) = watch {
                    tracing::warn!(
                        "cannot watch for new connections ({reason}): the propagation delay runs to its ceiling, {}, as a fixed one",
                        fmt(ceiling)
                    );
                }
                ceiling
            }
            (PropagationDelay::Fixed(delay), _) => delay,
        };
        let fixed = matches!(self.plan.propagation_delay, PropagationDelay::Fixed(_));
        self.phases.enter(
            Phase::PropagationDelay,
            "nginx keeps serving while endpoint removal propagates",
        );
        let cut = self.sleep_in_delay(began + ceiling, &mut master_died).await;
        let how = match (cut, fixed) {
            (true, _) => DelayEnded::CutShort,
            (false, true) => DelayEnded::Fixed,
            (false, false) => DelayEnded::Unwatched,
        };
        DelayEnd {
            how,
            lasted: began.elapsed(),
            arrivals: None,
            quiet_for: None,
            quiet_needed: None,
        }
    }

    /// Waits until no new connection has arrived for the quiet time the traffic calls for,
    /// within `floor` and `ceiling` from `began`. Looks again when the quiet time could have
    /// passed, and a watch's rest after each arrival (what came during the rest is only in the
    /// socket table); never on a tick.
    async fn until_quiet(
        &self,
        watch: &ArrivalWatch,
        began: Instant,
        floor: Duration,
        ceiling: Duration,
        master_died: &mut bool,
    ) -> DelayEnd {
        let origin = watch.origin();
        let start = began.saturating_duration_since(origin);
        let bounds = Bounds {
            floor: start + floor,
            ceiling: start + ceiling,
        };
        let before = watch.arrivals().total();
        let mut peers = Peers::of(&self.masters, start, &self.plan.probe_ports);
        let mut look = true;
        loop {
            // epoll misses an arrival that a worker accepted before this process looked, or
            // during the watch's rest: the socket table, read at each look, tells of those
            // still open or in TIME_WAIT. An arrival epoll reported needs no look of its own.
            let now = origin.elapsed();
            let mut unseen = None;
            if look {
                let new_peers = peers.new_since_last_look();
                unseen = quiet::unseen_arrival(new_peers, watch.arrivals().last(), peers.looked, now);
                if let Some(how) = unseen {
                    watch.record_unseen(now, how);
                }
                peers.looked = now;
            }
            let arrivals = watch.arrivals();
            let quiet_for = arrivals.last().map(|last| now.saturating_sub(last));
            let quiet_needed = arrivals.quiet_needed();
            let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
            let ended = |how| DelayEnd {
                how,
                lasted: began.elapsed(),
                arrivals: Some(arrivals.total() - before),
                quiet_for,
                quiet_needed,
            };
            let end = match quiet::verdict(&arrivals, bounds, now) {
                Verdict::WaitUntil(at) => {
                    let next =
                        quiet::next_look(arrivals.last(), peers.looked).map_or(at, |look| look.min(at));
                    tracing::debug!(
                        arrivals = arrivals.total() - before,
                        unseen = ?unseen,
                        quiet_for_ms = ms(quiet_for),
                        quiet_needed_ms = ms(quiet_needed),
                        next_look_in_ms = ms(Some(next.saturating_sub(now))),
                        "propagation delay: not quiet yet"
                    );
                    self.phases.report_delay(serde_json::json!({
                        "state": "waiting",
                        "arrivals": arrivals.total() - before,
                        "quiet_for_ms": ms(quiet_for),
                        "quiet_needed_ms": ms(quiet_needed),
                        "ceiling_in_ms": ms(Some(bounds.ceiling.saturating_sub(now))),
                    }));
                    // Each arrival may make the quiet time known, and calls for a look a
                    // rest after it.
                    look = tokio::select! {
                        cut = self.sleep_in_delay(origin + next, master_died) => match cut {
                            true => return ended(DelayEnded::CutShort),
                            false => true,
                        },
                        _ = watch.arrival() => false,
                    };
                    continue;
                }
                Verdict::Quiet { .. } => ended(DelayEnded::Quiet),
                Verdict::Ceiling => ended(DelayEnded::Ceiling),
            };
            match end.still_arriving() {
                true => tracing::warn!(
                    arrivals = end.arrivals,
                    "the propagation delay reached its ceiling with new connections still arriving: the endpoint removal has not reached every client; raise --max-propagation-delay (and --grace-period)"
                ),
                false => tracing::info!(arrivals = end.arrivals, "propagation delay: {}", end.words()),
            }
            return end;
        }
    }

    /// Sleeps until `until` within the delay; true when it was cut short. A master that dies
    /// meanwhile is reported at once, but its workers, which still hold the listeners, serve
    /// on: load balancers still send traffic, and quitting them now would refuse it. They are
    /// asked to quit at the delay's end, as the master would have been.
    async fn sleep_in_delay(&self, until: Instant, master_died: &mut bool) -> bool {
        let delay = sleep_until(until);
        tokio::pin!(delay);
        loop {
            tokio::select! {
                _ = &mut delay => return false,
                _ = self.skip_delay.notified() => {
                    tracing::info!("propagation delay cut short");
                    return true;
                }
                at = pidfd::first_exit(&self.masters), if !*master_died && !self.masters.is_empty() => {
                    *master_died = true;
                    tracing::warn!(
                        pid = self.masters[at].pid(),
                        "the nginx master has died: its workers serve on until the propagation delay ends, then get SIGQUIT"
                    );
                }
            }
        }
    }

    /// SIGQUIT to the masters, then the wait for every nginx process and, if the budget runs
    /// out, the escalation. A master that died before it (killed, crashed) has left its workers
    /// orphaned: they are sent SIGQUIT directly, and the outcome says the master died.
    async fn quit(
        &self,
        processes: &mut impl NginxProcesses,
        sight: &mut Sight,
        started: Instant,
    ) -> DrainOutcome {
        if processes.a_master_exited() {
            tracing::error!(
                "the nginx master died before the drain asked it to quit: SIGQUIT goes to its workers directly"
            );
            let mut outcome = self.quit_orphans(processes, sight, started).await;
            outcome.master_died_before_quit = true;
            return outcome;
        }
        // Before the signal: the master closes its listeners as soon as it gets it. Any other
        // master below (a binary upgrade, or one a controller started during the delay) too.
        let listeners = Listeners::of(&processes.masters());
        processes.signal_masters(Signal::SIGQUIT);
        self.phases.enter(
            Phase::Quitting,
            "SIGQUIT sent to the nginx master: requests in flight finish",
        );
        // Counted beside the wait, off this thread: neither the exit of the last nginx process
        // nor a signal waits for the kernel's socket table.
        let counting = count_connections(listeners.clone());
        let before_timeout = self.shutdown_timeout.map(|timeout| {
            let due = Instant::now() + timeout.saturating_sub(JUST_BEFORE_TIMEOUT);
            (due, count_before_shutdown_timeout(listeners, due))
        });
        self.finish(processes, sight, counting, before_timeout, started)
            .await
    }

    /// The master exited on its own: its orphaned workers, ours as reaper, may still hold
    /// connections. They are asked to finish (SIGQUIT) and waited for within the same budget.
    pub async fn orphans(self, started: Instant) -> DrainOutcome {
        let mut sight = Sight::default();
        let mut processes = self.snapshot(&mut sight);
        self.quit_orphans(&mut processes, &mut sight, started).await
    }

    async fn quit_orphans(
        &self,
        processes: &mut impl NginxProcesses,
        sight: &mut Sight,
        started: Instant,
    ) -> DrainOutcome {
        // Workers hold the listeners too; read before they close them.
        let listeners = Listeners::of(&processes.pids());
        let told = processes.signal_all(Signal::SIGQUIT);
        let counting = count_connections(listeners);
        if told > 0 {
            self.phases.enter(
                Phase::Quitting,
                &format!("SIGQUIT sent to {told} orphaned nginx processes"),
            );
        }
        self.finish(processes, sight, counting, None, started).await
    }

    /// Every nginx process now, held by pidfd.
    fn snapshot(&self, sight: &mut Sight) -> PidfdProcesses<'_> {
        let (processes, look) = PidfdProcesses::snapshot(&self.tree, &self.masters, self.reaper);
        sight.note(look);
        processes
    }

    async fn finish(
        &self,
        processes: &mut impl NginxProcesses,
        sight: &mut Sight,
        counting: tokio::task::JoinHandle<Option<usize>>,
        before_timeout: Option<(Instant, tokio::task::JoinHandle<Option<usize>>)>,
        started: Instant,
    ) -> DrainOutcome {
        let stopped = self.stop(processes, sight, started).await;
        let connections_at_quit = match counting.is_finished() {
            true => counting.await.ok().flatten(),
            false => None,
        };
        let closed_by_shutdown_timeout = match before_timeout {
            // The count was due: its few milliseconds are worth the wait, even if nginx, having
            // closed what it counts, was quicker.
            Some((due, count)) if Instant::now() >= due => {
                tokio::time::timeout(Duration::from_secs(1), count)
                    .await
                    .ok()
                    .and_then(|joined| joined.ok())
                    .flatten()
            }
            // nginx was done before its timeout fired: it closed nothing. Unless the budget
            // ran out first (a timeout longer than the budget), or the end was not seen: then
            // it is unknown.
            Some((_, count)) => {
                count.abort();
                (!stopped.escalated && stopped.waited != Waited::Unknown).then_some(0)
            }
            None => None,
        };
        let observed = sight.observed(stopped.waited);
        match &observed {
            Observed::NotTheEnd(_) => self.phases.enter(
                Phase::Stopped,
                "the drain ends without seeing every nginx process exit",
            ),
            _ => self
                .phases
                .enter(Phase::Stopped, "every nginx process has exited"),
        }
        DrainOutcome {
            escalated: stopped.escalated,
            connections_at_quit,
            closed_by_shutdown_timeout,
            killed: stopped.killed,
            elapsed: started.elapsed(),
            master_died_before_quit: false,
            observed,
            delay: None,
            told: None,
        }
    }

    /// Waits for every nginx process until the budget runs out, then escalates: SIGTERM to the
    /// master, SIGKILL to everything left.
    async fn stop(
        &self,
        processes: &mut impl NginxProcesses,
        sight: &mut Sight,
        started: Instant,
    ) -> Stopped {
        let end = started + self.plan.grace_period;
        let stopped = |escalated, killed, waited| Stopped {
            escalated,
            killed,
            waited,
        };
        let waited = self
            .wait_for_all(processes, sight, started + self.plan.fast_shutdown_at, end)
            .await;
        match waited {
            Waited::AllGone => return stopped(false, 0, waited),
            // Nothing tracked is left to signal, and what cannot be seen cannot be signalled:
            // waiting on past the plan would only eat the margin the supervisor needs to exit.
            Waited::Unknown => {
                tracing::error!(
                    "the budget ran out while nginx's processes could not be seen: the drain ends without knowing whether any is left"
                );
                return stopped(false, 0, waited);
            }
            Waited::Deadline => {}
        }
        processes.signal_masters(Signal::SIGTERM);
        self.phases
            .enter(Phase::FastShutdown, "budget ran out: SIGTERM to the nginx master");
        let waited = self
            .wait_for_all(processes, sight, started + self.plan.kill_at, end)
            .await;
        if waited != Waited::Deadline {
            return stopped(true, 0, waited);
        }
        let killed = processes.signal_all(Signal::SIGKILL);
        self.phases.enter(
            Phase::Killing,
            &format!("SIGKILL to the {killed} nginx processes left"),
        );
        let waited = self.wait_for_all(processes, sight, end, end).await;
        if waited == Waited::Deadline {
            tracing::error!(
                left = processes.len(),
                "nginx processes survived SIGKILL (stuck in the kernel?)"
            );
        }
        stopped(true, killed, waited)
    }

    /// Waits until no nginx process is left (seen to be so), or `deadline` passes, with a
    /// progress event at most every second. `budget_end` is only for the time left in those
    /// events. While none is tracked but a look for others fails, the look is tried again, a
    /// little later each time.
    async fn wait_for_all(
        &self,
        processes: &mut impl NginxProcesses,
        sight: &mut Sight,
        deadline: Instant,
        budget_end: Instant,
    ) -> Waited {
        let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let mut retry = RETRY_FIRST;
        loop {
            let mut blind = false;
            // Empty: look once more for stragglers (a worker forked just before SIGQUIT arrived).
            if processes.is_empty() {
                if !processes.may_have_stragglers() {
                    return Waited::AllGone;
                }
                match sight.note(processes.find_new()) {
                    Some(0) => return Waited::AllGone,
                    Some(_) => retry = RETRY_FIRST,
                    None => blind = processes.is_empty(),
                }
            }
            let look_again = Instant::now() + retry;
            tokio::select! {
                _ = processes.next_exit(), if !blind => self.lower_flag_once_no_worker_is_left(processes),
                _ = sleep_until(look_again), if blind => retry = (retry * 2).min(RETRY_AT_MOST),
                // Blind, nothing tracked: nothing to report, and the look is the retry's.
                _ = progress.tick(), if !blind => {
                    sight.note(processes.find_new());
                    report_progress(self.phases, processes, budget_end).await;
                }
                _ = sleep_until(deadline) => {
                    return if blind { Waited::Unknown } else { Waited::Deadline };
                }
            }
        }
    }

    /// The flag matters only while workers write responses. With nginx as PID 1 (the preStop
    /// hook without a supervisor), the kernel ends the hook a moment after the master's exit,
    /// which follows its last worker's: lowered now, the flag is not left behind for the
    /// container's next life.
    fn lower_flag_once_no_worker_is_left(&self, processes: &impl NginxProcesses) {
        let left = processes.pids();
        let given = |pid: &i32| self.masters.iter().any(|m| m.pid() == *pid);
        // Other masters (a binary upgrade's new one) are known by their titles, read only once
        // so few processes are left that they may all be masters.
        let only_masters = left.iter().all(given)
            || (left.len() <= MASTERS_AT_MOST && {
                let masters = processes.masters();
                left.iter().all(|pid| masters.contains(pid))
            });
        if !only_masters {
            return;
        }
        match self.flag.lower() {
            Ok(true) => tracing::info!("no nginx worker is left: drain flag lowered"),
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "cannot remove the drain flag"),
        }
    }
}

/// nginx's connections at the last look, by cookie, to find the arrivals epoll missed.
struct Peers {
    listeners: Listeners,
    known: Option<HashSet<u64>>,
    /// When the last look was, from the arrival watch's origin.
    looked: Duration,
}

impl Peers {
    /// The first look, at `at` from the arrival watch's origin.
    fn of(masters: &[&PidFd], at: Duration, probe_ports: &[u16]) -> Self {
        let pids: Vec<i32> = masters.iter().map(|m| m.pid()).collect();
        let listeners = Listeners::of(&pids).without_ports(probe_ports);
        let known = connections::connections_to(&listeners);
        Self {
            listeners,
            known,
            looked: at,
        }
    }

    /// Looks again; true when a connection is there that the last look did not see.
    fn new_since_last_look(&mut self) -> bool {
        let Some(now) = connections::connections_to(&self.listeners) else {
            return false;
        };
        let new = self
            .known
            .as_ref()
            .is_some_and(|known| now.difference(known).next().is_some());
        self.known = Some(now);
        new
    }
}

/// How a wait for nginx's processes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// None is left, and the drain saw so.
    AllGone,
    /// None is tracked, but others could not be looked for when the deadline passed.
    Unknown,
    /// Tracked processes are still running at the deadline.
    Deadline,
}

/// The end of the wait and the escalation.
struct Stopped {
    escalated: bool,
    /// nginx processes SIGKILLed.
    killed: usize,
    /// How the last wait ended: [`Waited::Unknown`] when the end was not seen.
    waited: Waited,
}

/// What a drain could see of nginx's processes: the first look that failed, if any did.
#[derive(Debug, Default)]
struct Sight {
    gap: Option<Unseen>,
    blind: bool,
}

impl Sight {
    /// Notes how a look went: how many it found, or `None` when it could not see them all.
    fn note(&mut self, look: Result<usize, Unseen>) -> Option<usize> {
        match look {
            Ok(found) => {
                if std::mem::replace(&mut self.blind, false) {
                    tracing::info!("nginx's processes can be seen again");
                }
                Some(found)
            }
            Err(unseen) => {
                if !std::mem::replace(&mut self.blind, true) {
                    tracing::warn!(reason = %unseen.0, "cannot see every nginx process: those not seen are looked for again, never taken for gone");
                }
                self.gap.get_or_insert(unseen);
                None
            }
        }
    }

    /// `last` is how the drain's last wait ended: survivors of SIGKILL are seen, not unknown.
    fn observed(&self, last: Waited) -> Observed {
        match (&self.gap, last) {
            (None, _) => Observed::Fully,
            (Some(Unseen(reason)), Waited::Unknown) => Observed::NotTheEnd(reason.clone()),
            (Some(Unseen(reason)), _) => Observed::WithGaps(reason.clone()),
        }
    }
}

/// How long before nginx's worker_shutdown_timeout fires its connections are counted.
const JUST_BEFORE_TIMEOUT: Duration = Duration::from_millis(50);

/// The connections open at `due`, just before nginx's worker_shutdown_timeout fires: the ones
/// nginx is about to close. One timer, not a poll.
fn count_before_shutdown_timeout(
    listeners: Listeners,
    due: Instant,
) -> tokio::task::JoinHandle<Option<usize>> {
    tokio::spawn(async move {
        sleep_until(due).await;
        tokio::task::spawn_blocking(move || connections::to_listeners(&listeners))
            .await
            .ok()
            .flatten()
    })
}

/// Established connections to nginx's listeners, counted off the runtime's thread.
fn count_connections(listeners: Listeners) -> tokio::task::JoinHandle<Option<usize>> {
    tokio::task::spawn_blocking(move || connections::to_listeners(&listeners))
}

fn total(counts: &[(i32, usize)]) -> usize {
    counts.iter().map(|(_, n)| n).sum()
}

async fn report_progress(phases: &Phases, processes: &impl NginxProcesses, budget_end: Instant) {
    // Which worker holds what: the file descriptor walk, once a second at most.
    let pids = processes.pids();
    let counts = tokio::task::spawn_blocking(move || connections::by_process(&pids))
        .await
        .unwrap_or_default();
    let per_process: Vec<String> = counts.iter().map(|(pid, n)| format!("{pid}:{n}")).collect();
    let time_left_ms = budget_end.saturating_duration_since(Instant::now()).as_millis() as u64;
    phases.publish(serde_json::json!({
        "event": "progress",
        "processes_left": processes.len(),
        "connections_by_pid": per_process.join(","),
        "time_left_ms": time_left_ms,
    }));
    tracing::info!(
        processes_left = processes.len(),
        connections = total(&counts),
        connections_by_pid = per_process.join(","),
        time_left_ms,
        "waiting for nginx to finish"
    );
}
