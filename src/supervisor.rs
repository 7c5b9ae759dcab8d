//! `run`: the one loop that owns the nginx master, from start-up to the supervisor's exit code.

use std::path::Path;
use tokio::time::Instant;

use tokio::sync::Notify;

use crate::cli::{HealthListen, RunArgs};
use crate::controller_mode::Controller;
use crate::core::outcome::{DrainOutcome, log_summary};
use crate::core::phase::{Phase, Phases};
use crate::core::plan::DrainPlan;
use crate::drain::{Drain, NginxTree};
use crate::error::{Error, exit};
use crate::nginx::command::NginxCommand;
use crate::nginx::config;
use crate::nginx::log::NginxErrors;
use crate::nginx::pidfd::PidFd;
use crate::nginx::tree::ProcStat;
use crate::os::config_watch::{ConfigWatch, dirs_to_watch};
use crate::os::reaper::{self, Exit, Reaper};
use crate::os::runtime_dir::{RuntimeDir, record_outcome};
use crate::os::signals::{Signals, Trigger};
use crate::reload;
use crate::surfaces::control_socket::{ControlRequest, ControlServer};
use crate::surfaces::health;
use crate::surfaces::live::Live;
use crate::surfaces::metrics::Metrics;

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
    // A controller that starts nginx itself: nginx is found through its pid file. With nginx
    // itself as the command, the pid file is only where nginx writes its pid.
    let controller = args
        .pid_file
        .clone()
        .filter(|_| !nginx.is_nginx())
        .map(Controller::new);
    let health_listener = match args.health_listen {
        HealthListen::On(addr) => Some(health::bind(addr)?),
        HealthListen::Off => None,
    };
    let reaper = Reaper::start(signals.child.take().expect("SIGCHLD stream"));
    let phases = Phases::default();
    let nginx_errors = NginxErrors::default();
    let generations = reload::Generations::default();
    let live = Live::new(
        phases.subscribe(),
        controller.clone(),
        generations.clone(),
        Metrics::new(nginx_errors.worker_crashes.clone()),
    );
    let mut control = ControlServer::start(runtime.path(), &phases, live.clone())?;
    let flag = runtime.flag();
    tracing::info!(phase = Phase::Starting.name(), ?role, command = ?args.command, controller_mode = controller.is_some(), "starting");

    let config_dump = if nginx.is_nginx() {
        check_config(&nginx, &reaper, &flag).await?
    } else {
        String::new()
    };
    let (nginx, shutdown_timeout) = fit_worker_shutdown_timeout(nginx, &plan, &config_dump);
    let mut watch = start_watch(&args, &config_dump);
    let mut master = nginx.spawn(&reaper, &nginx_errors)?;
    let nginx_log = master.log.take();
    let master_pid = master.pidfd.pid();
    live.set_child(master_pid);
    if let Some(listener) = health_listener {
        tokio::spawn(health::serve(listener, live.clone()));
    }
    match &controller {
        Some(c) => phases.enter(
            Phase::Serving,
            &format!(
                "controller started (pid {master_pid}); its nginx is found through {}",
                c.pid_file().display()
            ),
        ),
        None => phases.enter(
            Phase::Serving,
            &format!("nginx started (master pid {master_pid})"),
        ),
    }

    let skip_delay = Notify::new();
    // Read when the drain starts: by then the child has exec'd nginx, even through a wrapper.
    let nginx_comm = || match &controller {
        Some(_) => "nginx".to_owned(),
        None => ProcStat::read(master_pid).map_or_else(|| command_name(&nginx), |stat| stat.comm),
    };
    let drain = |plan, masters, comm| Drain {
        plan,
        phases: &phases,
        reaper: &reaper,
        flag: &flag,
        masters,
        tree: NginxTree {
            roots: vec![std::process::id() as i32],
            include_roots: false,
            comm,
        },
        skip_delay: &skip_delay,
        shutdown_timeout,
    };

    // Serving: until a drain trigger, or nginx ends on its own. A reload runs beside the loop,
    // so a SIGTERM never waits for `nginx -T` or for a reload to be confirmed.
    let reload_settings = reload::ReloadSettings {
        timeout: args.reload.reload_timeout,
        max_draining_generations: args.reload.max_draining_generations,
        generations,
        close_window: args.reload.reload_close_window,
        flag: Some(flag.clone()),
    };
    let start_reload = || {
        let started = Instant::now();
        let reload = reload::reload(&nginx, &reaper, &master.pidfd, &nginx_errors, &reload_settings);
        async move { (reload.await, started.elapsed()) }
    };
    let mut reloading = None;
    let mut reloads = reload::ReloadQueue::default();
    let (trigger_plan, started) = loop {
        tokio::select! {
            // nginx's own end first: its status must not be lost to a signal in the same wake-up.
            biased;
            status = &mut master.exit => {
                let status = status.unwrap_or(Exit::Code(exit::INTERNAL));
                live.set_child(0);
                if controller.is_none() {
                    live.metrics.master_exited_unexpectedly();
                }
                let what = if controller.is_some() { "the controller" } else { "the nginx master" };
                tracing::error!(pid = master_pid, %status, "{what} exited on its own");
                drop(reloading.take());
                reloads.refuse_all();
                let outcome = drain(&plan, Vec::new(), nginx_comm()).orphans(Instant::now()).await;
                reaper.reap_now();
                let _ = flag.lower();
                let mut report = outcome.to_json();
                report["outcome"] = "nginx_exited".into();
                report["exit_code"] = status.as_exit_code().into();
                live.metrics.drain_finished(&report);
                control.finish(report).await;
                flush(nginx_log).await;
                return Ok(status.as_exit_code());
            }
            trigger = signals.next() => match trigger {
                Trigger::Drain { signal } => {
                    tracing::info!(%signal, "drain requested");
                    break (plan.clone(), Instant::now());
                }
                Trigger::DrainNow => {
                    tracing::info!(signal = "SIGQUIT", "drain requested without propagation delay");
                    break (plan.without_delay(), Instant::now());
                }
                // The controller owns nginx's config: a SIGHUP is nginx's plain reload.
                Trigger::Reload if controller.is_some() => forward_to_nginx(&controller, &master.pidfd, nix::sys::signal::Signal::SIGHUP),
                Trigger::Reload => {
                    if reloads.ask(None) {
                        reloading = Some(Box::pin(start_reload()));
                    }
                }
                Trigger::Forward(signal) => forward_to_nginx(&controller, &master.pidfd, signal),
            },
            Some(request) = control.requests.recv() => match request {
                ControlRequest::Drain => {
                    tracing::info!("drain requested over the control socket (preStop hook)");
                    break (plan.clone(), Instant::now());
                }
                ControlRequest::Reload(reply) if controller.is_some() => {
                    let _ = reply.send(reload::refused_because("the controller owns nginx's config and reloads it: change it through the controller"));
                }
                ControlRequest::Reload(reply) => {
                    tracing::info!("reload requested over the control socket");
                    if reloads.ask(Some(reply)) {
                        reloading = Some(Box::pin(start_reload()));
                    }
                }
            },
            Some(()) = async { watch.as_mut().expect("guarded").changes.recv().await }, if watch.is_some() => {
                tracing::info!("the nginx config changed on disk");
                if controller.is_some() {
                    forward_to_nginx(&controller, &master.pidfd, nix::sys::signal::Signal::SIGHUP);
                } else if reloads.ask(None) {
                    reloading = Some(Box::pin(start_reload()));
                }
            }
            (outcome, took) = async { reloading.as_mut().expect("guarded").await }, if reloading.is_some() => {
                reloading = None;
                live.reload_finished(outcome.to_json(), took);
                if reloads.done(&outcome) {
                    reloading = Some(Box::pin(start_reload()));
                }
            }
        }
    };
    if reloading.take().is_some() {
        tracing::warn!("the reload under way is abandoned: a drain has begun");
    }
    // No reload from here on. Closing an inotify instance waits for the kernel to retire its
    // watches (about 10 ms); done now, that overlaps the drain instead of delaying our exit.
    drop(watch);
    reloads.refuse_all();

    // Draining: signals keep arriving; only a second SIGINT (or a SIGQUIT) changes anything.
    // In controller mode the master is the one the pid file names now (the controller may have
    // restarted it), and none is fine: the controller had not started it, or it had died.
    let nginx_master = controller.as_ref().and_then(Controller::nginx_master);
    let masters = match (&controller, &nginx_master) {
        (None, _) => vec![&master.pidfd],
        (Some(_), Some(found)) => vec![&found.pidfd],
        (Some(c), None) => {
            tracing::warn!(pid_file = %c.pid_file().display(), "no nginx master to drain");
            Vec::new()
        }
    };
    // The name to look for below us: the master's own (an nginx-debug, an openresty).
    let comm = nginx_master
        .as_ref()
        .map_or_else(nginx_comm, |found| found.comm.clone());
    let draining = drain(&trigger_plan, masters, comm.clone()).run(started);
    tokio::pin!(draining);
    let mut master_status = None;
    let outcome: DrainOutcome = loop {
        tokio::select! {
            outcome = &mut draining => break outcome,
            status = &mut master.exit, if master_status.is_none() => {
                // Liveness follows the master even mid-drain.
                live.set_child(0);
                let status = status.unwrap_or(Exit::Code(exit::INTERNAL));
                if controller.is_some() {
                    tracing::info!(pid = master_pid, %status, "the controller exited while nginx drains");
                }
                master_status = Some(status);
            }
            trigger = signals.next() => match trigger {
                Trigger::Drain { signal: nix::sys::signal::Signal::SIGINT } | Trigger::DrainNow => {
                    tracing::info!(phase = %phases.current(), "second interrupt: skipping what is left of the propagation delay");
                    skip_delay.notify_one();
                }
                Trigger::Drain { signal } => tracing::info!(%signal, phase = %phases.current(), "already draining: the signal changes nothing"),
                Trigger::Reload => tracing::warn!("reload refused: a drain has begun"),
                Trigger::Forward(signal) => forward_to_nginx(&controller, &master.pidfd, signal),
            },
            Some(request) = control.requests.recv() => match request {
                ControlRequest::Drain => tracing::info!(phase = %phases.current(), "drain requested over the control socket: already draining, the client follows this drain"),
                ControlRequest::Reload(reply) => {
                    tracing::warn!("reload refused: a drain has begun");
                    let _ = reply.send(reload::refused());
                }
            },
        }
    };
    if master_status.is_none() {
        reaper.reap_now();
        // Closed without a status (the reaper gone) must not be awaited again below.
        master_status = match master.exit.try_recv() {
            Ok(status) => Some(status),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Exit::Code(exit::INTERNAL)),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
        };
    }
    let mut report = match &controller {
        Some(c) => {
            // nginx is gone: only now may the controller hear SIGTERM.
            let end = c
                .stop(
                    &master.pidfd,
                    &mut master.exit,
                    master_status,
                    started + trigger_plan.kill_at,
                )
                .await;
            // Whatever nginx it started since (a restart) goes the same way, within the budget.
            let rest = drain(&trigger_plan, Vec::new(), comm).orphans(started).await;
            controller_report(&outcome, &rest, end)
        }
        None => outcome.to_json(),
    };
    live.set_child(0);
    reaper.reap_now();
    if let Err(err) = flag.lower() {
        tracing::warn!(%err, "cannot remove the drain flag");
    }
    // A master that died during the drain (OOM-killed, say) did not quit cleanly.
    if let Some(status) = master_status.filter(|s| controller.is_none() && !s.success() && !outcome.escalated)
    {
        tracing::error!(pid = master_pid, %status, "the nginx master did not exit cleanly during the drain");
        report["outcome"] = "nginx_failed".into();
        report["exit_code"] = status.as_exit_code().into();
    }
    let code = log_summary(&report, "drain finished");
    live.metrics.drain_finished(&report);
    record_outcome(runtime.path(), &report);
    // The preStop hook, if one asked, hears the outcome and exits before we do.
    control.finish(report).await;
    flush(nginx_log).await;
    Ok(code)
}

/// `nginx -T` before the first start: a broken config stops start-up with nginx's own words, and
/// a config without the drain snippet is pointed out once.
async fn check_config(
    nginx: &NginxCommand,
    reaper: &Reaper,
    flag: &crate::os::drain_flag::DrainFlag,
) -> Result<String, Error> {
    let report = nginx.test(reaper).await?;
    for warning in &report.warnings {
        tracing::warn!(nginx = %warning, "nginx config warning");
    }
    if !flag.is_checked_by(&report.dump) {
        tracing::warn!(
            flag = %flag.path().display(),
            "the nginx config does not include the drain snippet: keep-alive clients will not be told to close before nginx quits; include nginx-conf/graceful-drain.conf in every server block"
        );
    }
    Ok(report.dump)
}

/// Long-lived connections (WebSockets, streams) never finish on their own: unless the config
/// or `-g` sets it, nginx gets a `worker_shutdown_timeout` that makes it close them itself,
/// cleanly, before the budget would make us escalate with signals. Returns the command and the
/// timeout nginx will apply, when known.
fn fit_worker_shutdown_timeout(
    nginx: NginxCommand,
    plan: &DrainPlan,
    config_dump: &str,
) -> (NginxCommand, Option<std::time::Duration>) {
    if let Some(value) = config::directive_value(config_dump, "worker_shutdown_timeout") {
        return (nginx, config::time(&value));
    }
    if nginx.directives_set("worker_shutdown_timeout") {
        return (nginx, None);
    }
    match plan.worker_shutdown_timeout() {
        Some(timeout) if nginx.is_nginx() => {
            let ms = timeout.as_millis();
            tracing::info!(
                worker_shutdown_timeout_ms = ms as u64,
                "nginx will close connections still open {ms}ms after SIGQUIT (worker_shutdown_timeout, not set in the config)"
            );
            (
                nginx.with_directive(&format!("worker_shutdown_timeout {ms}ms;")),
                Some(timeout),
            )
        }
        _ => (nginx, None),
    }
}

/// Watches the config unless told not to; a watch that cannot start is a warning, not a reason
/// to refuse to serve.
fn start_watch(args: &RunArgs, config_dump: &str) -> Option<ConfigWatch> {
    if args.no_watch {
        return None;
    }
    let dirs = dirs_to_watch(config_dump, &args.watch);
    if dirs.is_empty() {
        return None;
    }
    ConfigWatch::start(dirs, args.reload_debounce)
        .inspect_err(|err| tracing::warn!(%err, "cannot watch the config: reload with SIGHUP instead"))
        .ok()
}

/// Lets nginx's last log lines through; the pipe closes with the last nginx process.
async fn flush(nginx_log: Option<tokio::task::JoinHandle<()>>) {
    if let Some(log) = nginx_log {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), log).await;
    }
}

/// Signals for nginx go to the master: our child, or the one a controller's pid file names.
fn forward_to_nginx(controller: &Option<Controller>, child: &PidFd, signal: nix::sys::signal::Signal) {
    match controller {
        Some(controller) => controller.forward(signal),
        None => {
            let delivered = child.signal(signal);
            tracing::info!(%signal, pid = child.pid(), delivered, "signal forwarded to the nginx master");
        }
    }
}

/// The outcome in controller mode: nginx's drain, anything the controller started meanwhile,
/// and how the controller ended. Its own exit status is reported, not passed on: ingress-nginx
/// exits 1 when its `nginx -s quit` finds nginx already gone, which is our doing.
fn controller_report(
    drained: &DrainOutcome,
    rest: &DrainOutcome,
    end: crate::controller_mode::ControllerEnd,
) -> serde_json::Value {
    let escalated = drained.escalated || rest.escalated || end.killed;
    let mut report = DrainOutcome {
        escalated,
        // nginx processes; the controller's own kill is `controller_killed`.
        killed: drained.killed + rest.killed,
        elapsed: rest.elapsed.max(drained.elapsed),
        ..drained.clone()
    }
    .to_json();
    report["controller_exit"] = end.status.map(|s| s.to_string()).into();
    report["controller_killed"] = end.killed.into();
    report
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
}
