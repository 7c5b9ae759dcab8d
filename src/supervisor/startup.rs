//! Before the loop: the config test that gates the first start, the worker_shutdown_timeout
//! fitted into the drain's budget, the config watch; and nginx's last log lines at the end.

use std::path::Path;

use crate::cli::RunArgs;
use crate::core::outcome::{DrainOutcome, Outcome};
use crate::core::plan::DrainPlan;
use crate::core::policy::Trigger;
use crate::error::Error;
use crate::nginx::command::NginxCommand;
use crate::nginx::config;
use crate::os::config_watch::{ConfigWatch, dirs_to_watch};
use crate::os::drain_flag::DrainFlag;
use crate::os::reaper::Reaper;
use crate::os::runtime_dir::record_outcome;
use crate::os::signals::Signals;
use crate::reload::ReloadReply;
use crate::surfaces::control_socket::{ControlRequest, ControlServer};

/// What ended start-up before nginx existed: a drain signal, or a preStop hook's request.
pub struct StoppedBeforeStart(&'static str);

/// Runs a start-up step (the config test, which may wait on DNS for up to its timeout) while
/// a SIGTERM, SIGINT or SIGQUIT, or a preStop hook's drain request, can still end start-up: the
/// step is dropped at once, and dropping it kills `nginx -T`.
pub async fn unless_stopped<T>(
    step: impl Future<Output = T>,
    signals: &mut Signals,
    control: &mut ControlServer,
) -> Result<T, StoppedBeforeStart> {
    let mut step = std::pin::pin!(step);
    loop {
        tokio::select! {
            done = &mut step => return Ok(done),
            trigger = signals.next() => match trigger {
                Trigger::Drain { signal } => return Err(StoppedBeforeStart(signal.as_str())),
                Trigger::DrainNow => return Err(StoppedBeforeStart("SIGQUIT")),
                Trigger::Reload => {
                    tracing::info!("SIGHUP before nginx started: it will start with the config on disk")
                }
                Trigger::Forward(signal) => {
                    tracing::info!(%signal, "signal not forwarded: nginx has not started yet")
                }
            },
            Some(request) = control.requests.recv() => match request {
                ControlRequest::Drain => return Err(StoppedBeforeStart("a drain request (preStop hook)")),
                ControlRequest::Reload(reply) => {
                    let why = "nginx has not started yet: its config is being tested";
                    let _ = reply.send(ReloadReply::NotRunning(why.into()));
                }
            },
        }
    }
}

impl StoppedBeforeStart {
    /// Nothing was started, so nothing was lost: a clean end (exit 0) with the summary line, told
    /// to a waiting hook too.
    pub async fn end(self, control: ControlServer, runtime: &Path) -> i32 {
        tracing::info!(
            trigger = self.0,
            "{} before nginx started: the config test is stopped and nothing was started",
            self.0
        );
        let outcome = Outcome::of_drain(DrainOutcome::default());
        let code = outcome.log_summary("stopped before nginx started");
        record_outcome(runtime, &outcome);
        control.finish(&outcome).await;
        code
    }
}

/// `nginx -T` before the first start: a broken config stops start-up with nginx's own words, and
/// a config without the drain snippet is pointed out once.
/// nginx goes to the background unless told not to (`daemon on` is its default): its first
/// process exits at once and the supervisor would take that for nginx's end. Refused before
/// anything starts.
pub fn check_foreground(nginx: &NginxCommand, config_dump: &str) -> Result<(), Error> {
    let daemon = nginx
        .directive_value("daemon")
        .or_else(|| config::directive_value(config_dump, "daemon"));
    match daemon.as_deref() {
        Some("off") => Ok(()),
        _ => Err(Error::WouldDaemonize),
    }
}

pub async fn check_config(nginx: &NginxCommand, reaper: &Reaper, flag: &DrainFlag) -> Result<String, Error> {
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
    if flag.is_checked_by(&report.dump) && !flag.slots_are_checked_by(&report.dump) {
        tracing::info!(
            flag = %flag.path().display(),
            "the drain snippet in the nginx config tests the drain flag alone: its keep-alive clients are told to close all at once, at the end of --close-spread; the snippet in nginx-conf/graceful-drain.conf tells them a tenth at a time"
        );
    }
    crate::os::runtime_dir::warn_if_workers_cannot_see(flag.path(), &report.dump);
    Ok(report.dump)
}

/// Long-lived connections (WebSockets, streams) never finish on their own: unless the config
/// or `-g` sets it, nginx gets a `worker_shutdown_timeout` that makes it close them itself,
/// cleanly, before the budget would make us escalate with signals. Returns the command and the
/// timeout nginx will apply, when known.
pub fn fit_worker_shutdown_timeout(
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
pub fn start_watch(args: &RunArgs, config_dump: &str) -> Option<ConfigWatch> {
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
pub async fn flush(nginx_log: Option<tokio::task::JoinHandle<()>>) {
    if let Some(log) = nginx_log {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), log).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_stays_in_the_foreground_only_when_told_to() {
        let cmd = |args: &[&str]| NginxCommand::custom(args.iter().map(Into::into).collect());
        let plain = cmd(&["nginx", "-c", "/etc/nginx/nginx.conf"]);
        let told = cmd(&["nginx", "-g", "daemon off; worker_processes 2;"]);
        let told_on = cmd(&["nginx", "-g", "daemon on;"]);
        // (command, config dump, stays in the foreground)
        for (nginx, dump, foreground) in [
            (&told, "", true),
            (&plain, "daemon off;\nevents {}\n", true),
            (&plain, "", false),
            (&plain, "# daemon off;\n", false),
            (&plain, "daemon on;\n", false),
            (&told_on, "", false),
            // -g wins over the file: nginx refuses a duplicate, but we do not guess.
            (&told_on, "daemon off;\n", false),
        ] {
            assert_eq!(
                check_foreground(nginx, dump).is_ok(),
                foreground,
                "{:?} with {dump:?}",
                nginx.program()
            );
        }
    }
}
