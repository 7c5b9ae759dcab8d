//! Reloads that cannot break a running nginx: test the config, SIGHUP the master, then confirm
//! that a new generation of workers serves, or report nginx's own reason why it does not.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::core::policy::Refusal;
use crate::nginx::command::NginxCommand;
use crate::nginx::generations::wait_for_room;
pub use crate::nginx::generations::{Generations, serving_workers};
pub use crate::nginx::log::NginxErrors;
use crate::nginx::pidfd::PidFd;
use crate::nginx::tree;
use crate::os::drain_flag::{DrainFlag, FlagState};
use crate::os::reaper::Reaper;

mod command;

pub use command::{argv_from_title, request};

/// How often the worker list is read while a reload is being confirmed. No event announces a
/// fork in another process, so this is the one place that looks repeatedly, and only for
/// the --reload-timeout after a SIGHUP.
const CONFIRM_EVERY: Duration = Duration::from_millis(20);

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

pub struct ReloadSettings {
    pub timeout: Duration,
    pub max_draining_generations: usize,
    pub generations: Generations,
    /// Before the SIGHUP, keep-alive clients are told to close for this long (see
    /// `--reload-close-window`); zero turns it off.
    pub close_window: Duration,
    pub flag: Option<DrainFlag>,
}

pub async fn reload(
    nginx: &NginxCommand,
    reaper: &Reaper,
    master: &PidFd,
    errors: &NginxErrors,
    settings: &ReloadSettings,
) -> ReloadOutcome {
    let timeout = settings.timeout;
    if nginx.is_nginx()
        && let Err(err) = nginx.test(reaper).await
    {
        // nginx's own words: the start-up error's advice ("nothing was started") is not a
        // reload's, where the old config goes on serving.
        let reason = match err {
            crate::error::Error::ConfigTest { detail } => detail,
            other => other.to_string(),
        };
        let outcome = ReloadOutcome::Invalid(reason);
        log(&outcome);
        return outcome;
    }
    wait_for_room(
        master.pid(),
        settings.max_draining_generations,
        &settings.generations,
    )
    .await;
    // Old workers close idle keep-alive connections the moment they are told to quit: a client
    // that reuses one then gets a reset. Telling clients to close first empties them. Lowered
    // when this reload ends, however it ends (cancelled by a drain included).
    let mut window = match settings
        .flag
        .as_ref()
        .filter(|_| !settings.close_window.is_zero())
    {
        Some(flag) => {
            let guard = FlagGuard::raise(flag, master.pid());
            tokio::time::sleep(settings.close_window).await;
            Some(guard)
        }
        None => None,
    };
    // The confirmation deadline counts from the signal, not from the wait for room.
    let started = Instant::now();
    let before: HashSet<i32> = serving_workers(master.pid()).into_iter().collect();
    let signalled_at = ticks_since_boot();
    let mut nginx_errors = errors.subscribe();
    master.signal(Signal::SIGHUP);
    tracing::info!(
        pid = master.pid(),
        "config valid: SIGHUP sent to the nginx master"
    );
    let deadline = started + timeout;
    // Workers started before our SIGHUP belong to an earlier reload, however late it ran.
    let generation = || -> Option<Vec<i32>> {
        let now = serving_workers(master.pid());
        let old_still_serving = now.iter().any(|pid| before.contains(pid));
        let new: Vec<i32> = now
            .into_iter()
            .filter(|pid| !before.contains(pid))
            .filter(|pid| tree::ProcStat::read(*pid).is_some_and(|s| s.start_time + 1 >= signalled_at))
            .collect();
        (!new.is_empty() && !old_still_serving).then_some(new)
    };
    // Only the master's own lines speak for the reload ("... [emerg] PID#TID: ...").
    let from_master = format!(" {}#", master.pid());
    let outcome = loop {
        if let Some(workers) = generation() {
            break ReloadOutcome::Reloaded {
                workers,
                elapsed: started.elapsed(),
            };
        }
        tokio::select! {
            line = nginx_errors.recv() => match line {
                Ok(line) if line.contains(&from_master) => {
                    // The flag is lowered first: nginx's retries take seconds.
                    drop(window.take());
                    settle(&mut nginx_errors, deadline).await;
                    // nginx retries a failed bind(); a later try may have succeeded.
                    break match generation() {
                        Some(workers) => ReloadOutcome::Reloaded { workers, elapsed: started.elapsed() },
                        None => ReloadOutcome::RolledBack(line),
                    };
                }
                _ => {}
            },
            _ = tokio::time::sleep(CONFIRM_EVERY) => {}
            _ = tokio::time::sleep_until(deadline.into()) => {
                drop(window.take());
                // Let a master still busy with it finish, so its lines do not fall on the next reload.
                settle(&mut nginx_errors, deadline + timeout).await;
                break match generation() {
                    Some(workers) => ReloadOutcome::Reloaded { workers, elapsed: started.elapsed() },
                    None => ReloadOutcome::Unconfirmed(timeout),
                };
            }
        }
    };
    if matches!(outcome, ReloadOutcome::Reloaded { .. }) {
        settings.generations.retire(before.into_iter().collect());
    }
    log(&outcome);
    outcome
}

/// The drain flag, raised for the reload's close window and lowered when dropped. A flag already
/// up for a running master is a drain's (a direct `drain` hook has no supervisor to cancel this
/// reload): the guard leaves it as it is, up, and does not lower it.
struct FlagGuard<'a>(Option<&'a DrainFlag>);

impl<'a> FlagGuard<'a> {
    fn raise(flag: &'a DrainFlag, master: i32) -> Self {
        if let FlagState::Raised(owner) = flag.state() {
            tracing::info!(
                owner = owner.pid,
                "the keep-alive flag is already up, for a drain: the reload leaves it up"
            );
            return Self(None);
        }
        if let Err(err) = flag.raise(master) {
            tracing::warn!(%err, "cannot raise the keep-alive flag before the reload");
        }
        Self(Some(flag))
    }
}

impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            let _ = flag.lower();
        }
    }
}

/// Clock ticks since boot, the unit of a process's start time in /proc.
fn ticks_since_boot() -> u64 {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (seconds * hz) as u64
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

/// The answer to whoever asked for a reload: the `reload` command, over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadReply {
    Done(ReloadOutcome),
    Refused(Refusal),
    /// No nginx master in the pid file (a `reload` without a supervisor).
    NotRunning(String),
}

impl ReloadReply {
    /// The reply as the client reads it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ReloadReply::Done(outcome) => outcome.to_json(),
            ReloadReply::Refused(why) => {
                json!({"event": "reload", "outcome": "refused", "reason": why.reason()})
            }
            ReloadReply::NotRunning(reason) => {
                json!({"event": "reload", "outcome": "not_running", "reason": reason})
            }
        }
    }
}

impl ReloadOutcome {
    /// How it ended, in one word, as the reply and `/metrics` name it.
    pub fn name(&self) -> &'static str {
        match self {
            ReloadOutcome::Reloaded { .. } => "reloaded",
            ReloadOutcome::Invalid(_) => "invalid",
            ReloadOutcome::RolledBack(_) => "rolled_back",
            ReloadOutcome::Unconfirmed(_) => "unconfirmed",
        }
    }

    /// Why it failed, in nginx's words or ours; `None` when it did not.
    pub fn reason(&self) -> Option<String> {
        match self {
            ReloadOutcome::Reloaded { .. } => None,
            ReloadOutcome::Invalid(reason) | ReloadOutcome::RolledBack(reason) => Some(reason.clone()),
            ReloadOutcome::Unconfirmed(timeout) => Some(format!(
                "no new generation of workers within {}",
                crate::duration::fmt(*timeout)
            )),
        }
    }

    /// The reply to `nginx-graceful reload`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut reply = serde_json::json!({"event": "reload", "outcome": self.name()});
        match self {
            ReloadOutcome::Reloaded { workers, elapsed } => {
                reply["workers"] = workers.clone().into();
                reply["elapsed_ms"] = (elapsed.as_millis() as u64).into();
            }
            _ => reply["reason"] = self.reason().into(),
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drains_flag_outlives_the_close_window_of_a_reload() {
        let dir = std::env::temp_dir().join(format!("ng-reload-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        // This process stands for the master: it runs.
        let master = std::process::id() as i32;

        // Raised by a direct drain, as a reload starts: it stays up after the window.
        flag.raise(master).unwrap();
        drop(FlagGuard::raise(&flag, master));
        assert!(
            matches!(flag.state(), FlagState::Raised(_)),
            "the drain's flag was lowered"
        );

        // Down, or stale: the reload raises it for its window, and lowers it after.
        for before in [None, Some("draining\n")] {
            flag.lower().unwrap();
            if let Some(stale) = before {
                std::fs::write(flag.path(), stale).unwrap();
            }
            let window = FlagGuard::raise(&flag, master);
            assert!(matches!(flag.state(), FlagState::Raised(_)));
            drop(window);
            assert_eq!(flag.state(), FlagState::Down);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
