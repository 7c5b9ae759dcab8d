//! Reloads that cannot break a running nginx: test the config, SIGHUP the master, then confirm
//! that a new generation of workers serves, or report nginx's own reason why it does not.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::nginx::command::NginxCommand;
use crate::nginx::log::NginxErrors;
use crate::nginx::pidfd::PidFd;
use crate::nginx::tree::{self, ProcessTable};
use crate::reaper::Reaper;

/// How often the worker list is read while a reload is being confirmed. No event announces a
/// fork in another process, so this is the one place that looks repeatedly, and only for
/// the --reload-timeout after a SIGHUP.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

const SERVING: &str = "nginx: worker process";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new generation serves; the old one was told to quit.
    Reloaded { workers: Vec<i32>, elapsed: Duration },
    /// The config test (`nginx -T`) refused the config: no signal was sent.
    Invalid(String),
    /// The master kept the old config; nginx's reason.
    RolledBack(String),
    /// No new generation within the timeout.
    Unconfirmed(Duration),
}

/// The workers of `master` that serve (not shutting down), read from /proc.
pub fn serving_workers(master: i32) -> Vec<i32> {
    let Ok(table) = ProcessTable::read() else {
        return Vec::new();
    };
    let mut workers: Vec<i32> = table
        .children(master)
        .map(|s| s.pid)
        .filter(|&pid| tree::title(pid) == SERVING)
        .collect();
    workers.sort_unstable();
    workers
}

pub async fn reload(
    nginx: &NginxCommand,
    reaper: &Reaper,
    master: &PidFd,
    errors: &NginxErrors,
    timeout: Duration,
) -> ReloadOutcome {
    let started = Instant::now();
    if nginx.is_nginx()
        && let Err(err) = nginx.test(reaper).await
    {
        let outcome = ReloadOutcome::Invalid(err.to_string());
        log(&outcome);
        return outcome;
    }
    let before: HashSet<i32> = serving_workers(master.pid()).into_iter().collect();
    let mut nginx_errors = errors.subscribe();
    master.signal(Signal::SIGHUP);
    tracing::info!(
        pid = master.pid(),
        "config valid: SIGHUP sent to the nginx master"
    );
    let deadline = started + timeout;
    let outcome = loop {
        let now = serving_workers(master.pid());
        let old_still_serving = now.iter().any(|pid| before.contains(pid));
        let new: Vec<i32> = now.into_iter().filter(|pid| !before.contains(pid)).collect();
        if !new.is_empty() && !old_still_serving {
            break ReloadOutcome::Reloaded {
                workers: new,
                elapsed: started.elapsed(),
            };
        }
        tokio::select! {
            line = nginx_errors.recv() => {
                if let Ok(line) = line {
                    settle(&mut nginx_errors, deadline).await;
                    break ReloadOutcome::RolledBack(line);
                }
            }
            _ = tokio::time::sleep(CONFIRM_EVERY) => {}
            _ = tokio::time::sleep_until(deadline.into()) => break ReloadOutcome::Unconfirmed(timeout),
        }
    };
    log(&outcome);
    outcome
}

/// After a failed reload the master may go on trying (nginx retries a failed bind() five times,
/// 500 ms apart) and ignores signals meanwhile. Waiting until it has been quiet for longer than
/// that keeps its late lines out of the next reload's verdict.
async fn settle(errors: &mut tokio::sync::broadcast::Receiver<String>, deadline: Instant) {
    const QUIET: Duration = Duration::from_millis(700);
    loop {
        tokio::select! {
            line = errors.recv() => if line.is_err() { return },
            _ = tokio::time::sleep(QUIET) => return,
            _ = tokio::time::sleep_until(deadline.into()) => return,
        }
    }
}

fn log(outcome: &ReloadOutcome) {
    match outcome {
        ReloadOutcome::Reloaded { workers, elapsed } => tracing::info!(
            reload = "confirmed",
            workers = workers.iter().map(i32::to_string).collect::<Vec<_>>().join(","),
            elapsed_ms = elapsed.as_millis() as u64,
            "reload confirmed: a new generation of workers serves"
        ),
        ReloadOutcome::Invalid(err) => {
            tracing::error!(
                reload = "invalid",
                "reload refused, nginx keeps serving the previous config: {err}"
            )
        }
        ReloadOutcome::RolledBack(reason) => tracing::error!(
            reload = "rolled_back",
            "reload failed: nginx kept the previous config: {reason}: fix the config and reload again"
        ),
        ReloadOutcome::Unconfirmed(timeout) => tracing::error!(
            reload = "unconfirmed",
            timeout_ms = timeout.as_millis() as u64,
            "reload not confirmed: no new generation of workers within --reload-timeout; see nginx's log"
        ),
    }
}
