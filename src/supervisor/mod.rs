//! `run`: the one loop that owns the nginx master, from start-up to the supervisor's exit code.
//!
//! The loop is thin: each thing that happens (a signal, a control request, a config change, a
//! reload's end, the child's exit) becomes an [`Input`]; [`decide`] says what to do about it;
//! the loop does it. What differs in controller mode is the `Child`'s (`child.rs`).

mod child;
mod startup;

use std::collections::HashMap;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::cli::{HealthListen, RunArgs};
use crate::core::outcome::{DrainOutcome, Exit, Outcome, Verdict};
use crate::core::phase::{Phase, Phases};
use crate::core::plan::{DrainPlan, PropagationDelay};
use crate::core::policy::{Action, Cause, Input, Note, Stage, State, Waiter, decide};
use crate::drain::{Drain, NginxTree};
use crate::error::{Error, exit};
use crate::nginx::arrivals::ArrivalWatch;
use crate::nginx::command::NginxCommand;
use crate::nginx::log::NginxErrors;
use crate::nginx::pidfd::PidFd;
use crate::os::drain_flag::DrainFlag;
use crate::os::reaper::{self, Reaper};
use crate::os::runtime_dir::{RuntimeDir, record_outcome};
use crate::os::signals::Signals;
use crate::reload::{self, ReloadReply};
use crate::surfaces::control_socket::{ControlRequest, ControlServer};
use crate::surfaces::health;
use crate::surfaces::live::Live;
use crate::surfaces::metrics::Metrics;
use child::{Child, DrainTargets};
use startup::{
    check_config, check_foreground, fit_worker_shutdown_timeout, flush, start_watch, unless_stopped,
};

/// Runs nginx until it is drained or ends on its own; returns the supervisor's exit code.
pub async fn run(args: RunArgs) -> Result<i32, Error> {
    // Everything that can refuse to start is checked before nginx exists, so a refusal leaves
    // nothing behind.
    let plan = DrainPlan::new(&args.drain.settings())?;
    PidFd::check_support().map_err(|source| Error::Internal {
        context: "pidfds are needed to wait for nginx (Linux 5.3 or later, and a seccomp profile that allows pidfd_open)",
        source,
    })?;
    let mut signals = Signals::install().map_err(Error::internal("installing signal handlers"))?;
    let role = reaper::become_reaper().map_err(Error::internal("becoming child subreaper"))?;
    let runtime = RuntimeDir::prepare(&args.runtime_dir)?;
    let nginx = if args.command.is_empty() {
        NginxCommand::bundled(&runtime.write_bundled_config(&args.listen)?)
    } else {
        NginxCommand::custom(args.command.clone())
    };
    let child = Child::new(&nginx, args.pid_file.as_deref());
    let health_listener = match args.health_listen {
        HealthListen::On(addr) => Some(health::bind(addr)?),
        HealthListen::Off => None,
    };
    let reaper = Reaper::start(signals.child.take().expect("SIGCHLD stream"));
    let phases = Phases::default();
    let nginx_errors = NginxErrors::new(crate::logging::is_json());
    let generations = reload::Generations::default();
    let live = Live::new(
        phases.subscribe(),
        phases.delay_state(),
        phases.drain_start(),
        args.unready_at,
        child.followed_master(),
        generations.clone(),
        Metrics::new(nginx_errors.worker_crashes.clone()),
    );
    let mut control = ControlServer::start(runtime.path(), &phases, live.clone(), &plan)?;
    let flag = runtime.flag();
    tracing::info!(phase = Phase::Starting.name(), ?role, command = ?args.command, controller_mode = !child.is_nginx(), "starting");

    let config_dump = if nginx.is_nginx() {
        let test = check_config(&nginx, &reaper, &flag);
        let dump = match unless_stopped(test, &mut signals, &mut control).await {
            Ok(dump) => dump?,
            Err(stopped) => return Ok(stopped.end(control, runtime.path()).await),
        };
        check_foreground(&nginx, &dump)?;
        dump
    } else {
        String::new()
    };
    let (nginx, shutdown_timeout) = fit_worker_shutdown_timeout(nginx, &plan, &config_dump);
    let mut watch = start_watch(&args, &config_dump);
    // Read at start only; a reload tests the config afresh.
    drop(config_dump);
    let mut master = nginx.spawn(&reaper, &nginx_errors)?;
    let nginx_log = master.log.take();
    let master_pid = master.pidfd.pid();
    live.set_child(master_pid);
    if let Some(listener) = health_listener {
        tokio::spawn(health::serve(listener, live.clone()));
    }
    phases.enter(Phase::Serving, &child.started(master_pid));
    let mut arrivals = ServingArrivals::new(&plan, child.is_nginx());

    // What the drain and the reloads borrow for as long as they run.
    let skip_delay = Notify::new();
    let drains = Drains {
        phases: &phases,
        reaper: &reaper,
        flag: &flag,
        skip_delay: &skip_delay,
        shutdown_timeout,
    };
    let reload_settings = reload::ReloadSettings {
        timeout: args.reload.reload_timeout,
        max_draining_generations: args.reload.max_draining_generations,
        generations,
        close_window: args.reload.reload_close_window,
        flag: Some(flag.clone()),
    };
    let child_pidfd = &master.pidfd;
    let start_reload = || {
        let started = Instant::now();
        // A wrapper that stayed nginx's parent would die of the SIGHUP meant for nginx.
        let beneath = child.master_beneath(master_pid);
        let (nginx, reaper, errors, settings) = (&nginx, &reaper, &nginx_errors, &reload_settings);
        async move {
            let master = beneath.as_ref().map_or(child_pidfd, |b| &b.pidfd);
            let outcome = reload::reload(nginx, reaper, master, errors, settings).await;
            (outcome, started.elapsed())
        }
    };

    // A reload and the drain run beside the loop, so a SIGTERM never waits for `nginx -T` or
    // for a reload to be confirmed, and a signal mid-drain is heard at once.
    let mut state = State::new(child.mode());
    let mut waiters = Waiters::default();
    let mut reloading = None;
    let mut last_reload = None;
    let mut draining = None;
    let mut child_status: Option<Exit> = None;
    let drained: Drained = loop {
        let input = tokio::select! {
            // The child's end first: its status must not be lost to a signal in the same wake-up.
            biased;
            status = &mut master.exit, if child_status.is_none() => {
                // Liveness follows the child, mid-drain too.
                live.set_child(0);
                child_status = Some(status.unwrap_or(Exit::Code(exit::INTERNAL)));
                Input::ChildExited
            }
            drained = async { draining.as_mut().expect("guarded").await }, if draining.is_some() => break drained,
            trigger = signals.next() => Input::Signal(trigger),
            Some(request) = control.requests.recv() => match request {
                ControlRequest::Drain => Input::DrainRequested,
                ControlRequest::Reload(reply) => {
                    tracing::info!("reload requested over the control socket");
                    Input::ReloadRequested(waiters.add(reply))
                }
            },
            Some(()) = async { watch.as_mut().expect("guarded").changes.recv().await }, if watch.is_some() => {
                tracing::info!("the nginx config changed on disk");
                Input::ConfigChanged
            }
            _ = arrivals.due(), if arrivals.is_due() => {
                arrivals.resume(child_pidfd);
                continue;
            }
            (outcome, took) = async { reloading.as_mut().expect("guarded").await }, if reloading.is_some() => {
                reloading = None;
                arrivals.resume(child_pidfd);
                live.reload_finished(&outcome, took);
                last_reload = Some(outcome);
                Input::ReloadFinished
            }
        };
        for action in decide(&mut state, input) {
            match action {
                Action::Drain(cause) => {
                    announce(cause);
                    let plan = match cause.keeps_delay() {
                        true => plan.clone(),
                        false => plan.without_delay(),
                    };
                    let targets = child.drain_targets(master_pid);
                    let comm = child.nginx_comm(master_pid, &targets);
                    let drains = &drains;
                    let started = Instant::now();
                    let history = arrivals.take();
                    draining = Some(Box::pin(async move {
                        let masters = match &targets {
                            DrainTargets::Child => vec![child_pidfd],
                            DrainTargets::Found(found) => vec![&found.pidfd],
                            DrainTargets::Beneath(beneath) => vec![&beneath.pidfd],
                            DrainTargets::None => Vec::new(),
                        };
                        let mut drain = drains.below_us(&plan, masters, comm.clone());
                        drain.arrivals = history;
                        let outcome = drain.run(started).await;
                        Drained {
                            outcome,
                            plan,
                            comm,
                            started,
                            child_is_not_nginx: targets.child_is_not_nginx(),
                        }
                    }));
                }
                Action::SkipDelay => {
                    tracing::info!(phase = %phases.current(), "second interrupt: skipping what is left of the propagation delay");
                    skip_delay.notify_one();
                }
                Action::StartReload => {
                    // A reload may close a listener: no copy of it may keep it open.
                    arrivals.pause().await;
                    reloading = Some(Box::pin(start_reload()));
                }
                Action::AbandonReload => {
                    reloading = None;
                    tracing::warn!("the reload under way is abandoned: a drain has begun");
                }
                // Closing an inotify instance waits for the kernel to retire its watches (about
                // 10 ms); done now, that overlaps the drain instead of delaying our exit.
                Action::StopWatching => watch = None,
                Action::ReplyOutcome(to) => {
                    if let Some(outcome) = &last_reload {
                        waiters.reply(to, ReloadReply::Done(outcome.clone()));
                    }
                }
                Action::Refuse(to, why) => {
                    if state.stage != Stage::Serving {
                        tracing::warn!("reload refused: {}", why.reason());
                    }
                    waiters.reply(to, ReloadReply::Refused(why));
                }
                Action::Forward(signal) => child.forward(child_pidfd, signal),
                Action::EndWithoutDrain => {
                    // The master's listeners are closed: no copy of them may stay open.
                    if let Some(watch) = arrivals.take() {
                        watch.stop().await;
                    }
                    let status = child_status.unwrap_or(Exit::Code(exit::INTERNAL));
                    tracing::error!(pid = master_pid, %status, "{} exited on its own", child.what());
                    if child.is_nginx() {
                        live.metrics.master_exited_unexpectedly();
                    }
                    // Its orphaned workers, ours as reaper, may still hold connections.
                    let comm = child.nginx_comm(master_pid, &DrainTargets::None);
                    let rest = drains
                        .below_us(&plan, Vec::new(), comm)
                        .orphans(Instant::now())
                        .await;
                    reaper.reap_now();
                    let _ = flag.lower();
                    let outcome = Outcome::nginx_ended(Verdict::NginxExited, status, rest);
                    flush(nginx_log).await;
                    // The same last line as every other end, with the cause and its exit code.
                    outcome.log_summary(&format!("{} exited while serving", child.what()));
                    live.metrics.drain_finished(&outcome);
                    record_outcome(runtime.path(), &outcome);
                    control.finish(&outcome).await;
                    return Ok(outcome.exit_code);
                }
                Action::Say(note) => say(note, &child, &phases),
            }
        }
    };
    drop(draining);

    if child_status.is_none() {
        reaper.reap_now();
        // Closed without a status (the reaper gone) must not be awaited again below.
        child_status = match master.exit.try_recv() {
            Ok(status) => Some(status),
            Err(oneshot::error::TryRecvError::Closed) => Some(Exit::Code(exit::INTERNAL)),
            Err(oneshot::error::TryRecvError::Empty) => None,
        };
    }
    let mut outcome = Outcome::of_drain(drained.outcome.clone());
    let kill_at = drained.started + drained.plan.kill_at;
    let stopped = child.after_drain(
        &master.pidfd,
        &mut master.exit,
        child_status,
        kill_at,
        drained.child_is_not_nginx,
    );
    if let Some(end) = stopped.await {
        // Whatever nginx a controller started since (a restart) goes the same way, within the
        // budget.
        let rest = drains
            .below_us(&drained.plan, Vec::new(), drained.comm.clone())
            .orphans(drained.started)
            .await;
        // `killed` counts nginx processes; the controller's own kill is `controller.killed`.
        let mut both = drained.outcome.clone().then(rest);
        both.escalated |= end.killed;
        outcome = Outcome::of_drain(both);
        outcome.controller = Some(end);
    }
    live.set_child(0);
    reaper.reap_now();
    if let Err(err) = flag.lower() {
        tracing::warn!(%err, "cannot remove the drain flag");
    }
    // Our child's status is known: a master that ended on its own during the drain is reported
    // with it. One that died (OOM-killed, say) did not quit cleanly; one that quit with exit
    // code 0 before being asked did (an `nginx -s quit` from elsewhere), only early.
    let child_was_nginx = child.is_nginx() && !drained.child_is_not_nginx;
    match child_status.filter(|_| child_was_nginx && !drained.outcome.escalated) {
        Some(status) if !status.success() => {
            tracing::error!(pid = master_pid, %status, "the nginx master did not exit cleanly during the drain");
            outcome = Outcome::nginx_ended(Verdict::NginxFailed, status, drained.outcome);
        }
        Some(_) if drained.outcome.master_died_before_quit => {
            tracing::warn!(
                pid = master_pid,
                "the nginx master quit on its own (exit code 0) before the drain asked it: its listeners closed early (an `nginx -s quit` in a preStop hook, say)"
            );
            outcome = Outcome::master_quit_first(drained.outcome);
        }
        _ => {}
    }
    // nginx's last lines first: the summary is the log's last line.
    flush(nginx_log).await;
    let code = outcome.log_summary("drain finished");
    live.metrics.drain_finished(&outcome);
    record_outcome(runtime.path(), &outcome);
    // The preStop hook, if one asked, hears the outcome and exits before we do.
    control.finish(&outcome).await;
    Ok(code)
}

/// The arrivals of new connections while nginx serves, so that a drain's adaptive delay knows
/// the traffic of the minute before it. Only where the supervisor runs every reload (nginx is
/// its child): a reload may close a listener, and the watch must let go of it first. Started
/// a second after nginx (its listeners are not open at once), tried again each second for a
/// while, and again after each reload.
struct ServingArrivals {
    watch: Option<ArrivalWatch>,
    due: Option<Instant>,
    tries_left: u32,
}

impl ServingArrivals {
    const FIRST_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
    const TRIES: u32 = 30;

    fn new(plan: &DrainPlan, nginx_is_our_child: bool) -> Self {
        let adaptive = matches!(plan.propagation_delay, PropagationDelay::UntilQuiet { .. });
        let wanted = adaptive && nginx_is_our_child;
        Self {
            watch: wanted.then(|| ArrivalWatch::paused(&plan.probe_ports)),
            due: wanted.then(|| Instant::now() + Self::FIRST_AFTER),
            tries_left: Self::TRIES,
        }
    }

    fn is_due(&self) -> bool {
        self.due.is_some()
    }

    async fn due(&self) {
        if let Some(due) = self.due {
            tokio::time::sleep_until(due).await
        }
    }

    fn resume(&mut self, master: &PidFd) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        self.due = None;
        match watch.resume(&[master]) {
            Ok(()) => self.tries_left = Self::TRIES,
            Err(reason) if self.tries_left > 0 => {
                self.tries_left -= 1;
                tracing::debug!(%reason, "new connections are not watched yet");
                self.due = Some(Instant::now() + Self::FIRST_AFTER);
            }
            Err(reason) => tracing::info!(
                %reason,
                "new connections are not watched while nginx serves: a drain watches them from its start"
            ),
        }
    }

    async fn pause(&mut self) {
        if let Some(watch) = &mut self.watch {
            watch.pause().await;
        }
    }

    fn take(&mut self) -> Option<ArrivalWatch> {
        self.due = None;
        self.watch.take()
    }
}

/// What every drain of this supervisor shares. The nginx processes are found below us: the
/// master's children, and workers orphaned to us as reaper.
struct Drains<'a> {
    phases: &'a Phases,
    reaper: &'a Reaper,
    flag: &'a DrainFlag,
    skip_delay: &'a Notify,
    shutdown_timeout: Option<std::time::Duration>,
}

impl Drains<'_> {
    fn below_us<'b>(&'b self, plan: &'b DrainPlan, masters: Vec<&'b PidFd>, comm: String) -> Drain<'b> {
        Drain {
            plan,
            phases: self.phases,
            reaper: self.reaper,
            flag: self.flag,
            masters,
            tree: NginxTree {
                roots: vec![std::process::id() as i32],
                include_roots: false,
                comm,
            },
            skip_delay: self.skip_delay,
            shutdown_timeout: self.shutdown_timeout,
            arrivals: None,
        }
    }
}

/// A drain that ran to its end, with what the steps after it need.
struct Drained {
    outcome: DrainOutcome,
    plan: DrainPlan,
    /// The name of the nginx processes it looked for.
    comm: String,
    /// When the trigger arrived: the budget counts from here.
    started: Instant,
    /// The master drained was beneath a wrapper: the child's status is not nginx's.
    child_is_not_nginx: bool,
}

fn announce(cause: Cause) {
    match cause {
        Cause::Signal(signal) => tracing::info!(%signal, "drain requested"),
        // The official nginx image's STOPSIGNAL, or a pod's stop signal: a mistake as often as
        // not, and one that refuses the connections still on their way.
        Cause::Quit => tracing::warn!(
            signal = "SIGQUIT",
            "drain requested without propagation delay: connections that arrive before the endpoint removal reaches every client are refused; stop the container with SIGTERM (STOPSIGNAL SIGTERM, or the pod's stop signal) for the ordered drain"
        ),
        Cause::PreStopHook => {
            tracing::info!("drain requested over the control socket (preStop hook)")
        }
    }
}

fn say(note: Note, child: &Child, phases: &Phases) {
    match note {
        Note::AlreadyDraining(signal) => {
            tracing::info!(%signal, phase = %phases.current(), "already draining: the signal changes nothing")
        }
        Note::FollowingDrain => {
            tracing::info!(phase = %phases.current(), "drain requested over the control socket: already draining, the client follows this drain")
        }
        Note::ReloadRefused => tracing::warn!("reload refused: a drain has begun"),
        Note::ReloadQueued => tracing::info!("a reload is under way: one more follows it"),
        Note::ChildExitedWhileDraining if !child.is_nginx() => {
            tracing::info!("the controller exited while nginx drains")
        }
        // The drain sees the master go; the outcome says how it went.
        Note::ChildExitedWhileDraining => {}
    }
}

/// Clients on the control socket waiting for a reload's outcome, by the number [`decide`] knows
/// them by.
#[derive(Default)]
struct Waiters {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<ReloadReply>>,
}

impl Waiters {
    fn add(&mut self, reply: oneshot::Sender<ReloadReply>) -> Waiter {
        self.next += 1;
        self.waiting.insert(self.next, reply);
        Waiter(self.next)
    }

    fn reply(&mut self, to: Vec<Waiter>, reply: ReloadReply) {
        for Waiter(id) in to {
            if let Some(waiter) = self.waiting.remove(&id) {
                // A client that hung up has nobody to tell.
                let _ = waiter.send(reply.clone());
            }
        }
    }
}
