//! Pre-drain hooks: commands run in order when a drain starts, each within its timeout, with
//! their output logged. A process a hook leaves in the background is named in the log and not
//! waited for. This is how a pod leaves nacos, consul or eureka before it stops serving.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, BufReader};

use crate::nginx::tree::ProcessTable;
use crate::os::lines;
use crate::os::reaper::{Exit, Reaper};

/// How long the output of a hook that has exited is read before the drain goes on: what it
/// wrote is in the pipe's buffer already, read in microseconds; only a leftover process that
/// holds the pipe open would make the wait longer.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_millis(20);

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
    // What the hook wrote before it ended is in the pipes: read it for a moment, bounded by the
    // hook's own timeout, which is its place in the plan. A background process the hook left
    // (`curl ... &`) keeps the pipes open: its output is logged as it comes, but the drain does
    // not wait for it.
    let read_until = (Instant::now() + OUTPUT_AFTER_EXIT).min(started + timeout);
    let readers = readers.into_iter().flatten();
    let all_read = async {
        for reader in readers {
            let _ = reader.await;
        }
    };
    let _ = tokio::time::timeout_at(read_until.into(), all_read).await;
    report_leftovers(&hook, child.pid);
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

/// Logs what a hook left running in its process group (a background `curl`, say): left to
/// finish its work, and not waited for.
fn report_leftovers(hook: &str, group: Pid) {
    // Signal 0: whether any process is left in the group, without reading /proc.
    if killpg(group, None).is_err() {
        return;
    }
    // A leftover that has just exited is a zombie until reaped: still in the group, not running.
    let left = match ProcessTable::read() {
        Ok(table) => {
            let members: Vec<String> = table
                .members_of_group(group.as_raw())
                .map(|stat| format!("{} ({})", stat.pid, stat.comm))
                .collect();
            if members.is_empty() {
                return;
            }
            members
        }
        Err(err) => vec![format!("unknown: cannot read /proc: {err}")],
    };
    tracing::warn!(
        hook,
        left = left.join(", "),
        "pre-drain hook left processes running; the drain does not wait for them"
    );
}

fn log_lines(
    hook: String,
    stream: &'static str,
    pipe: impl AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The reader may outlive the hook (a background child holds the pipe): a line without
        // an end is logged in pieces rather than kept.
        let mut pipe = BufReader::new(pipe);
        let mut line = Vec::new();
        while lines::next_line(&mut pipe, &mut line).await {
            let text = String::from_utf8_lossy(&line);
            tracing::info!(hook, stream, "{}", text.trim_end_matches(['\r', '\n']));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// What the subscriber writes, one event a line.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn output_without_a_newline_is_logged_in_pieces() {
        // A megabyte with no newline used to be held whole until the pipe closed, and a
        // background child that never closes it grows the supervisor without bound.
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);

        let (mut hook_side, our_side) = tokio::io::duplex(64 * 1024);
        let reader = log_lines("echo".into(), "stdout", our_side);
        hook_side.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        hook_side.write_all(b"\nlast line\n").await.unwrap();
        drop(hook_side);
        tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();

        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let events: Vec<&str> = text.lines().collect();
        let longest = events.iter().map(|e| e.len()).max().unwrap_or(0);
        assert!(longest < lines::MAX_LINE + 200, "a line of {longest} bytes");
        assert!(
            events.len() > (1 << 20) / lines::MAX_LINE,
            "{} events",
            events.len()
        );
        assert!(
            events.last().unwrap().contains(" last line "),
            "the line after it is whole"
        );
    }
}
