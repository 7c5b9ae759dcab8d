//! Pre-drain hooks: commands run in order when a drain starts, each within its timeout, with
//! their output logged. This is how a pod leaves nacos, consul or eureka before it stops serving.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::os::reaper::{Exit, Reaper};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    Exited(Exit),
    TimedOut,
    NotStarted(String),
}

/// Runs every hook in order. A hook that fails is logged and the drain goes on: the pod is
/// leaving either way, and a registry that still lists it is better than a pod that never drains.
pub async fn run_all(reaper: &Reaper, hooks: &[Vec<String>], timeout: Duration) -> Vec<HookOutcome> {
    let mut outcomes = Vec::with_capacity(hooks.len());
    for argv in hooks {
        outcomes.push(run_one(reaper, argv, timeout).await);
    }
    outcomes
}

pub async fn run_one(reaper: &Reaper, argv: &[String], timeout: Duration) -> HookOutcome {
    let hook = argv.join(" ");
    let started = Instant::now();
    let mut command = Command::new(&argv[0]);
    // Its own process group, so that a timeout kills what the hook started too.
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match reaper.spawn(&mut command) {
        Ok(child) => child,
        Err(err) => {
            tracing::warn!(hook, %err, "pre-drain hook could not start; the drain goes on");
            return HookOutcome::NotStarted(err.to_string());
        }
    };
    let readers = [
        child
            .stdout
            .take()
            .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
            .map(|s| log_lines(hook.clone(), "stdout", s)),
        child
            .stderr
            .take()
            .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
            .map(|s| log_lines(hook.clone(), "stderr", s)),
    ];
    let outcome = tokio::select! {
        biased;
        exit = &mut child.exit => HookOutcome::Exited(exit.unwrap_or(Exit::Code(-1))),
        _ = tokio::time::sleep(timeout) => {
            // Not reaped yet (the exit branch comes first), so the group still exists.
            let _ = killpg(child.pid, Signal::SIGKILL);
            let _ = child.exit.await;
            HookOutcome::TimedOut
        }
    };
    // Output the hook wrote just before it ended is still in the pipes: read it, but do not wait
    // on a background process of the hook's that keeps them open.
    for mut reader in readers.into_iter().flatten() {
        if tokio::time::timeout(Duration::from_millis(200), &mut reader)
            .await
            .is_err()
        {
            reader.abort();
            tracing::debug!(hook, "stopped reading the output of a hook's leftover process");
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match &outcome {
        HookOutcome::Exited(exit) if exit.success() => {
            tracing::info!(hook, elapsed_ms, "pre-drain hook succeeded")
        }
        HookOutcome::Exited(exit) => {
            tracing::warn!(hook, elapsed_ms, %exit, "pre-drain hook failed; the drain goes on")
        }
        HookOutcome::TimedOut => tracing::warn!(
            hook,
            elapsed_ms,
            timeout_ms = timeout.as_millis() as u64,
            "pre-drain hook timed out and was killed; raise --pre-drain-timeout if it needs longer"
        ),
        HookOutcome::NotStarted(_) => {}
    }
    outcome
}

fn log_lines(
    hook: String,
    stream: &'static str,
    pipe: impl AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(hook, stream, "{line}");
        }
    })
}
