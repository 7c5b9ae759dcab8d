//! `drain`: the blocking preStop hook. It asks the `run` supervisor of this container to drain
//! (control socket), or, with no supervisor, drains nginx itself, found through its pid file.
//! `post-start`, its postStart counterpart without a supervisor, clears the drain flag a killed
//! hook left to the container's next life.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cli::{NginxTarget, PostStartArgs, PreStopArgs};
use crate::core::outcome::Outcome;
use crate::core::phase::Phases;
use crate::core::plan::DrainPlan;
use crate::drain::{Drain, NginxTree};
use crate::error::{Error, exit};
use crate::nginx::configured_pid_file;
use crate::nginx::pidfile::{self, FoundMaster};
use crate::os::drain_flag::{DrainFlag, FlagState};
use crate::os::reaper::Reaper;
use crate::os::runtime_dir::{record_outcome, recorded_outcome};
use crate::surfaces::control_client as control;

pub async fn drain(args: PreStopArgs) -> Result<i32, Error> {
    let plan = DrainPlan::new(&args.drain.settings())?;
    let started = Instant::now();
    let started_at = SystemTime::now();
    let sigchld = signal(SignalKind::child()).map_err(Error::internal("installing the SIGCHLD handler"))?;

    let relay = |event: &Value| {
        let message = event["message"].as_str().unwrap_or("");
        match event["event"].as_str() {
            Some("phase") => tracing::info!(
                phase = event["phase"].as_str().unwrap_or(""),
                source = "supervisor",
                "{message}"
            ),
            Some("progress") => tracing::info!(
                processes_left = event["processes_left"].as_u64(),
                connections_by_pid = event["connections_by_pid"].as_str(),
                time_left_ms = event["time_left_ms"].as_u64(),
                "waiting for nginx to finish"
            ),
            _ => {}
        }
    };
    // Every wait on the supervisor ends within this hook's grace period.
    let bound = control::Bound::since(started, plan.grace_period);
    if let Some(event) = control::request_drain(&args.target, &plan, bound, relay).await? {
        let outcome = Outcome::from_json(&event).ok_or(Error::ControlBroken)?;
        return Ok(outcome.log_summary("the supervisor drained nginx"));
    }

    // No supervisor: this process drains nginx. Two hooks at once share one drain.
    let runtime = RuntimeFiles::prepare(&args.target.runtime_dir);
    let _turn = match &runtime {
        Some(runtime) => runtime.take_turn(plan.grace_period).await,
        None => None,
    };

    // After another hook's drain this finds nginx gone and reports that drain's outcome; after
    // one that failed, it meets the same problem and says so.
    let target = configured_pid_file::resolve(&args.target).await;
    let masters = masters_to_drain(&target.pid_file)?;
    let Some(first) = masters.first() else {
        return nothing_to_drain(&target, started_at, plan.grace_period);
    };
    if masters.len() > 1 {
        tracing::info!(pids = ?masters.iter().map(|m| m.pidfd.pid()).collect::<Vec<_>>(), "a binary upgrade is under way: draining the old and the new master");
    }
    tracing::info!(pid = first.pidfd.pid(), pid_file = %first.pid_file.display(), "draining nginx directly (no supervisor answered)");

    let reaper = Reaper::start(sigchld);
    let phases = Phases::default();
    let flag = DrainFlag::in_dir(&args.target.runtime_dir);
    let skip_delay = Notify::new();
    let tree = NginxTree {
        roots: masters.iter().map(|m| m.pidfd.pid()).collect(),
        include_roots: true,
        comm: first.comm.clone(),
    };
    let drain = Drain {
        plan: &plan,
        phases: &phases,
        reaper: &reaper,
        flag: &flag,
        masters: masters.iter().map(|m| &m.pidfd).collect(),
        tree,
        skip_delay: &skip_delay,
        // Set in nginx's config or not, a running nginx does not tell.
        shutdown_timeout: None,
        arrivals: None,
    };
    let outcome = drain.run(started).await;
    if let Err(err) = flag.lower() {
        tracing::warn!(%err, "cannot remove the drain flag");
    }
    let outcome = Outcome::of_drain(outcome);
    if let Some(runtime) = &runtime {
        record_outcome(&runtime.dir, &outcome);
    }
    Ok(outcome.log_summary("drained nginx"))
}

/// `post-start`: removes a drain flag whose master no longer runs, the one a `drain` killed with
/// nginx as PID 1 leaves to the container's next life. A running drain's flag stays.
pub async fn post_start(args: PostStartArgs) -> Result<i32, Error> {
    let flag = DrainFlag::in_dir(&args.runtime_dir);
    let removed = flag.lower_if_stale().map_err(|source| Error::RuntimeDir {
        path: args.runtime_dir.clone(),
        source,
    })?;
    match removed {
        Some(FlagState::Stale(Some(owner))) => {
            tracing::warn!(flag = %flag.path().display(), master = owner.pid, "removed a drain flag left by an earlier life of this container (its nginx master no longer runs)")
        }
        Some(_) => {
            tracing::warn!(flag = %flag.path().display(), "removed a drain flag that names no running nginx master")
        }
        None => match flag.state() {
            FlagState::Raised(owner) => tracing::info!(
                master = owner.pid,
                "a drain of the running nginx is under way: its flag stays"
            ),
            _ => tracing::debug!("no drain flag"),
        },
    }
    Ok(exit::OK)
}

/// The master the pid file names and, during a binary upgrade, the old one (`.oldbin`).
fn masters_to_drain(pid_file: &Path) -> Result<Vec<FoundMaster>, Error> {
    let current = pidfile::find_master(pid_file)?;
    // A stale .oldbin must neither stop the drain nor name another nginx to drain.
    let old = match pidfile::find_master(&pidfile::oldbin(pid_file)) {
        Ok(old) => old,
        Err(err) => {
            tracing::warn!("ignoring the binary upgrade's old pid file: {err}");
            None
        }
    };
    let old = old.filter(|old| {
        let upgrade = pidfile::is_upgrade_of(old, current.as_ref());
        if !upgrade {
            tracing::warn!(pid = old.pidfd.pid(), oldbin = %old.pid_file.display(), "ignoring the binary upgrade's old pid file: the nginx master it names is not the old master of this nginx (a stale file); nothing was signalled there");
        }
        upgrade
    });
    Ok(current.into_iter().chain(old).collect())
}

/// No master to drain. A repeat hook reports the drain that ended (hooks are delivered at least
/// once); a pid file naming a process that has exited means nginx ran here and is gone. No pid
/// file and no recorded drain is a wrong path far more often than an nginx that removed its pid
/// file on exit: it fails, and the kubelet shows it (FailedPreStopHook).
fn nothing_to_drain(
    target: &NginxTarget,
    started_at: SystemTime,
    grace_period: Duration,
) -> Result<i32, Error> {
    let recent = started_at
        .checked_sub(grace_period)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if let Some(outcome) = recorded_outcome(&target.runtime_dir, recent) {
        return Ok(outcome.log_summary("nginx is not running; the last drain ended"));
    }
    let pid_file = &target.pid_file;
    if pid_file.symlink_metadata().is_ok() {
        tracing::info!(pid_file = %pid_file.display(), "nginx is not running (its pid file names a process that has exited): nothing to drain");
        return Ok(exit::OK);
    }
    let directory = pid_file.parent().filter(|dir| !dir.as_os_str().is_empty());
    let detail = match directory {
        Some(dir) if !dir.is_dir() => {
            format!("the directory of pid file {} does not exist", pid_file.display())
        }
        _ => format!(
            "pid file {} does not exist, and no drain is recorded in {}",
            pid_file.display(),
            target.runtime_dir.display()
        ),
    };
    Err(Error::NoPidFile { detail })
}

/// The files a direct drain keeps in the runtime directory: a lock that makes concurrent hooks
/// share one drain, and the outcome the followers report.
struct RuntimeFiles {
    dir: PathBuf,
}

impl RuntimeFiles {
    fn prepare(dir: &Path) -> Option<Self> {
        match std::fs::create_dir_all(dir) {
            Ok(()) => Some(Self { dir: dir.to_owned() }),
            Err(err) => {
                tracing::warn!(dir = %dir.display(), %err, "cannot use the runtime directory: no keep-alive flag, no coordination between hooks; pass --runtime-dir");
                None
            }
        }
    }

    /// Takes the drain lock, waiting while another hook's drain holds it, at most `bound` (that
    /// drain's budget). `None` when no lock can be had: the drain goes on alone.
    async fn take_turn(&self, bound: Duration) -> Option<Flock<File>> {
        let path = self.dir.join("drain.lock");
        let file = match crate::os::small_file::open_lock(&path) {
            Ok(file) => file,
            Err(err) => {
                tracing::warn!(lock = %path.display(), %err, "cannot open the drain lock: concurrent hooks will not share one drain");
                return None;
            }
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Some(lock),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                tracing::info!("another drain of this nginx is under way: waiting for it");
                let waiting = tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive));
                match tokio::time::timeout(bound, waiting).await {
                    Ok(waited) => waited.ok()?.ok(),
                    Err(_) => {
                        tracing::warn!(lock = %path.display(), "the other drain still holds the lock after the grace period: draining alone");
                        None
                    }
                }
            }
            Err((_, err)) => {
                tracing::warn!(lock = %path.display(), %err, "cannot lock: concurrent hooks will not share one drain");
                None
            }
        }
    }
}
