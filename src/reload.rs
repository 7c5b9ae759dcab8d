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
const SHUTTING_DOWN: &str = "nginx: worker process is shutting down";

/// Workers started within this many clock ticks (10 ms each) of each other belong to one
/// generation: a master forks all its workers within a millisecond or two.
const SAME_GENERATION_TICKS: u64 = 2;

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

/// The worker sets each reload retired, so the ones still draining can be counted exactly.
/// Without that history (`reload` without a supervisor) they are told apart by start time.
#[derive(Clone, Default)]
pub struct Generations {
    retired: std::sync::Arc<std::sync::Mutex<Vec<Vec<i32>>>>,
}

impl Generations {
    fn retire(&self, workers: Vec<i32>) {
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(workers);
    }

    /// Old generations still draining: each a set of workers told to quit and still running.
    pub fn draining(&self, master: i32) -> Vec<Vec<i32>> {
        let shutting_down = shutting_down(master);
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if retired.is_empty() {
            return by_start_time(shutting_down);
        }
        for generation in retired.iter_mut() {
            generation.retain(|pid| shutting_down.iter().any(|(_, p)| p == pid));
        }
        retired.retain(|generation| !generation.is_empty());
        // Workers retired by someone else (`nginx -s reload`, a reload that timed out) count too.
        let unknown: Vec<(u64, i32)> = shutting_down
            .into_iter()
            .filter(|(_, pid)| !retired.iter().flatten().any(|p| p == pid))
            .collect();
        let mut draining = retired.clone();
        draining.extend(by_start_time(unknown));
        draining
    }
}

/// Workers of `master` told to quit and still running, with their start times.
fn shutting_down(master: i32) -> Vec<(u64, i32)> {
    let Ok(table) = ProcessTable::read() else {
        return Vec::new();
    };
    let mut workers: Vec<(u64, i32)> = table
        .children(master)
        .filter(|s| tree::title(s.pid) == SHUTTING_DOWN)
        .map(|s| (s.start_time, s.pid))
        .collect();
    workers.sort_unstable();
    workers
}

/// Groups workers by start time: one master forks a generation within a millisecond or two.
fn by_start_time(workers: Vec<(u64, i32)>) -> Vec<Vec<i32>> {
    let mut generations: Vec<Vec<i32>> = Vec::new();
    let mut last_start = None;
    for (start, pid) in workers {
        match (last_start, generations.last_mut()) {
            (Some(last), Some(generation)) if start - last <= SAME_GENERATION_TICKS => generation.push(pid),
            _ => generations.push(vec![pid]),
        }
        last_start = Some(start);
    }
    generations
}

/// Waits while `cap` old generations are still draining, so reloads never stack more worker
/// sets than that; woken by the exit of one of their workers, not by a timer.
async fn wait_for_room(master: i32, cap: usize, generations: &Generations) {
    let mut reported = false;
    loop {
        let draining = generations.draining(master);
        if draining.len() < cap.max(1) {
            return;
        }
        if !std::mem::replace(&mut reported, true) {
            tracing::info!(
                draining_generations = draining.len(),
                cap,
                "reload waits: old worker generations are still draining connections (--max-draining-generations)"
            );
        }
        let mut workers = crate::nginx::pidfd::Processes::default();
        for pid in draining.iter().flatten() {
            if let Some(stat) = tree::ProcStat::read(*pid) {
                workers.track(&stat);
            }
        }
        if workers.next_exit().await.is_none() {
            return;
        }
    }
}

pub struct ReloadSettings {
    pub timeout: Duration,
    pub max_draining_generations: usize,
    pub generations: Generations,
    /// Before the SIGHUP, keep-alive clients are told to close for this long (see
    /// `--reload-close-window`); zero turns it off.
    pub close_window: Duration,
    pub flag: Option<crate::keepalive::KeepAliveFlag>,
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
        let outcome = ReloadOutcome::Invalid(err.to_string());
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
            let guard = FlagGuard::raise(flag);
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

/// The drain flag, raised for the reload's close window and lowered when dropped.
struct FlagGuard<'a>(&'a crate::keepalive::KeepAliveFlag);

impl<'a> FlagGuard<'a> {
    fn raise(flag: &'a crate::keepalive::KeepAliveFlag) -> Self {
        if let Err(err) = flag.raise() {
            tracing::warn!(%err, "cannot raise the keep-alive flag before the reload");
        }
        Self(flag)
    }
}

impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.lower();
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

impl ReloadOutcome {
    /// The reply to `nginx-graceful reload`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ReloadOutcome::Reloaded { workers, elapsed } => json!({
                "event": "reload", "outcome": "reloaded", "workers": workers,
                "elapsed_ms": elapsed.as_millis() as u64,
            }),
            ReloadOutcome::Invalid(reason) => {
                json!({"event": "reload", "outcome": "invalid", "reason": reason})
            }
            ReloadOutcome::RolledBack(reason) => {
                json!({"event": "reload", "outcome": "rolled_back", "reason": reason})
            }
            ReloadOutcome::Unconfirmed(timeout) => json!({
                "event": "reload", "outcome": "unconfirmed",
                "reason": format!("no new generation of workers within {}", crate::plan::fmt(*timeout)),
            }),
        }
    }
}

/// Who waits for which reload: requests that come while one runs are coalesced into the next.
#[derive(Default)]
pub struct ReloadQueue {
    running: bool,
    replies: Vec<tokio::sync::oneshot::Sender<serde_json::Value>>,
    next: Option<Vec<tokio::sync::oneshot::Sender<serde_json::Value>>>,
}

impl ReloadQueue {
    /// Asks for a reload; true when one should start now.
    pub fn ask(&mut self, reply: Option<tokio::sync::oneshot::Sender<serde_json::Value>>) -> bool {
        if self.running {
            if self.next.is_none() {
                tracing::info!("a reload is under way: one more follows it");
            }
            self.next.get_or_insert_default().extend(reply);
            return false;
        }
        self.running = true;
        self.replies.extend(reply);
        true
    }

    /// The reload under way ended; true when the next one should start now.
    pub fn done(&mut self, outcome: &ReloadOutcome) -> bool {
        let reply = outcome.to_json();
        for waiter in self.replies.drain(..) {
            let _ = waiter.send(reply.clone());
        }
        match self.next.take() {
            Some(next) => {
                self.replies = next;
                true
            }
            None => {
                self.running = false;
                false
            }
        }
    }

    /// A drain has begun: nobody gets a reload any more.
    pub fn refuse_all(&mut self) {
        let reply = refused();
        for waiter in self
            .replies
            .drain(..)
            .chain(self.next.take().into_iter().flatten())
        {
            let _ = waiter.send(reply.clone());
        }
        self.running = false;
    }
}

pub fn refused() -> serde_json::Value {
    serde_json::json!({"event": "reload", "outcome": "refused", "reason": "a drain has begun: nginx is shutting down"})
}

/// nginx's argv, read back from a master's process title (`nginx: master process ARGV`). nginx
/// joined the arguments with spaces; options take one argument each, except that `-g` takes
/// directives that may themselves hold spaces, so it runs to the next option.
pub fn argv_from_title(title: &str) -> Option<Vec<String>> {
    let rest = title.strip_prefix("nginx: master process ")?;
    let mut argv: Vec<String> = Vec::new();
    let mut in_directives = false;
    for token in rest.split_whitespace() {
        let option = ["-c", "-p", "-e", "-g", "-q"].contains(&token);
        if in_directives && !option {
            let last = argv.last_mut().expect("-g came first");
            last.push(' ');
            last.push_str(token);
            continue;
        }
        in_directives = false;
        if token == "-g" {
            argv.push(token.to_owned());
            argv.push(String::new());
            in_directives = true;
            continue;
        }
        argv.push(token.to_owned());
    }
    for arg in argv.iter_mut() {
        *arg = arg.trim().to_owned();
    }
    (!argv.is_empty()).then_some(argv)
}

/// `nginx-graceful reload`: through the supervisor, or directly via the pid file.
pub async fn command(args: crate::cli::ReloadArgs) -> Result<i32, crate::error::Error> {
    use crate::error::exit;
    let reply = match crate::control::request_reload(&args.runtime_dir).await? {
        Some(reply) => reply,
        None => direct(&args).await?,
    };
    let outcome = reply["outcome"].as_str().unwrap_or("unknown");
    let code = match outcome {
        "reloaded" => exit::OK,
        "invalid" => exit::RELOAD_INVALID,
        "refused" => exit::RELOAD_REFUSED,
        "not_running" => exit::NOT_RUNNING,
        _ => exit::RELOAD_FAILED,
    };
    match outcome {
        "reloaded" => {
            tracing::info!(workers = %reply["workers"], elapsed_ms = reply["elapsed_ms"].as_u64(), "reloaded: new workers {}", reply["workers"])
        }
        _ => tracing::error!(
            outcome,
            exit_code = code,
            "reload {outcome}: {}",
            reply["reason"].as_str().unwrap_or("")
        ),
    }
    Ok(code)
}

/// No supervisor: test with the master's own binary and arguments, SIGHUP, confirm. Without the
/// master's stderr, a rollback shows only as no new generation.
async fn direct(args: &crate::cli::ReloadArgs) -> Result<serde_json::Value, crate::error::Error> {
    let Some(master) = crate::nginx::pidfile::find_master(&args.pid_file)? else {
        return Ok(
            serde_json::json!({"event": "reload", "outcome": "not_running", "reason": format!("no nginx master in {}", args.pid_file.display())}),
        );
    };
    let pid = master.pidfd.pid();
    let mut argv = argv_from_title(&tree::title(pid)).unwrap_or_else(|| vec!["nginx".into()]);
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        argv[0] = exe.display().to_string();
    }
    let nginx = NginxCommand::custom(argv.into_iter().map(Into::into).collect());
    let sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        .map_err(crate::error::Error::internal("installing the SIGCHLD handler"))?;
    let reaper = Reaper::start(sigchld);
    let settings = ReloadSettings {
        timeout: args.reload_timeout,
        max_draining_generations: args.max_draining_generations,
        generations: Generations::default(),
        close_window: args.reload_close_window,
        flag: Some(crate::keepalive::KeepAliveFlag::in_dir(&args.runtime_dir)),
    };
    let outcome = reload(&nginx, &reaper, &master.pidfd, &NginxErrors::default(), &settings).await;
    Ok(outcome.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_comes_back_from_the_title() {
        let cases: [(&str, Option<Vec<&str>>); 4] = [
            (
                "nginx: master process nginx -g daemon off;",
                Some(vec!["nginx", "-g", "daemon off;"]),
            ),
            (
                "nginx: master process /usr/sbin/nginx -e stderr -c /x/nginx.conf -g daemon off; pid /run/n.pid;",
                Some(vec![
                    "/usr/sbin/nginx",
                    "-e",
                    "stderr",
                    "-c",
                    "/x/nginx.conf",
                    "-g",
                    "daemon off; pid /run/n.pid;",
                ]),
            ),
            (
                "nginx: master process /usr/sbin/nginx",
                Some(vec!["/usr/sbin/nginx"]),
            ),
            ("nginx: worker process", None),
        ];
        for (title, expected) in cases {
            let expected = expected.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(argv_from_title(title), expected, "{title}");
        }
    }
}
