//! One pod on one machine: its entrypoint as PID 1 of a PID namespace of its own (`unshare
//! --pid --fork --mount-proc`, as a container runtime does), nginx listening on the pod's own
//! loopback address, hooks run inside its namespaces (as `kubectl exec` does), and its exit
//! followed through a pidfd.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use super::strategy::Strategy;
use crate::error::Error;
use crate::soak::client::probe;
use crate::soak::tls::Tls;
use nginx_graceful::nginx::pidfd::PidFd;
use nginx_graceful::nginx::tree::ProcessTable;
use nginx_graceful::os::reaper::Exit;

pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    log: PathBuf,
    /// The `unshare` process: PID 1's parent, outside the namespace.
    unshare: Child,
    /// PID 1 of the pod, by its pid on the host.
    pid1: PidFd,
    killed: bool,
}

/// How a pod ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodExit {
    Ended(Exit),
    /// SIGKILL at the end of the grace period, as the kubelet sends it.
    KilledAtGracePeriod,
}

/// How a preStop hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEnd {
    Ended(Exit),
    TimedOut,
}

impl std::fmt::Display for PodExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodExit::Ended(Exit::Code(code)) => write!(f, "exit {code}"),
            PodExit::Ended(Exit::Signal(signal)) => write!(f, "killed by signal {signal}"),
            PodExit::KilledAtGracePeriod => write!(f, "SIGKILL at the grace period"),
        }
    }
}

impl Pod {
    /// Starts the pod's entrypoint as PID 1 of a new PID namespace; output goes to `log`.
    pub async fn start(name: &str, addr: SocketAddr, strategy: &Strategy, log: &Path) -> Result<Pod, Error> {
        let output = File::create(log).map_err(Error::internal("cannot create a pod's log file"))?;
        let mut command = logged_command("unshare", output)?;
        command
            .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", "--"])
            .args(&strategy.entrypoint);
        let unshare = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Rehearsal(
                "unshare not found: install util-linux (a pod is a PID namespace made by unshare)".into(),
            ),
            _ => Error::internal("cannot start unshare")(e),
        })?;
        let parent = unshare
            .id()
            .ok_or_else(|| Error::Rehearsal("unshare exited as soon as it started".into()))?;
        let pid1 = find_pid1(parent as i32, log).await?;
        Ok(Pod {
            name: name.to_owned(),
            addr,
            log: log.to_owned(),
            unshare,
            pid1,
            killed: false,
        })
    }

    /// Waits until the pod answers HTTP on `/`; fails early when the pod exits instead. A
    /// connect alone proves nothing: `nginx -t`, run before nginx starts, listens for a moment.
    pub async fn wait_serving(&self, tls: Option<&Tls>, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if probe(self.addr, "/", tls.cloned(), Duration::from_secs(1))
                .await
                .is_ok_and(|status| status < 500)
            {
                return Ok(());
            }
            if !self.pid1.is_alive() || Instant::now() > deadline {
                return Err(Error::Rehearsal(format!(
                    "{} did not start serving on {} within {timeout:?}; its output:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                )));
            }
            // Nothing announces a port opening: look again shortly (start-up only).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: Signal) {
        self.pid1.signal(signal);
    }

    /// SIGKILL to PID 1: the kernel kills everything in the namespace with it.
    pub fn kill(&mut self) {
        self.killed = true;
        self.pid1.signal(Signal::SIGKILL);
    }

    /// Resolves when PID 1 has exited.
    pub async fn exited(&self) {
        self.pid1.exited().await;
    }

    /// How PID 1 ended. unshare passes on PID 1's exit code; for a SIGKILL that it cannot pass
    /// on, what counts is that we sent it.
    pub async fn exit(&mut self) -> PodExit {
        let status = self.unshare.wait().await;
        if self.killed {
            return PodExit::KilledAtGracePeriod;
        }
        PodExit::Ended(status.map_or(Exit::Code(-1), Exit::from))
    }

    /// Runs `hook` inside the pod's PID and mount namespaces, as the kubelet runs an exec hook,
    /// and waits for it until `deadline`. Past it the waiting ends, as the kubelet's does; the
    /// hook itself goes on inside the pod until the pod dies.
    pub async fn exec(&self, hook: &[String], deadline: Instant) -> Result<HookEnd, Error> {
        let output = File::options()
            .append(true)
            .open(&self.log)
            .map_err(Error::internal("cannot open a pod's log file"))?;
        let target = self.pid1.pid().to_string();
        let mut command = logged_command("nsenter", output)?;
        command
            .args(["--target", &target, "--pid", "--mount", "--"])
            .args(hook);
        let mut child = command.spawn().map_err(Error::internal("cannot start nsenter"))?;
        match tokio::time::timeout_at(deadline.into(), child.wait()).await {
            Ok(Ok(status)) => Ok(HookEnd::Ended(status.into())),
            Ok(Err(e)) => Err(Error::internal("cannot wait for a hook")(e)),
            Err(_) => {
                let _ = child.kill().await;
                Ok(HookEnd::TimedOut)
            }
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The namespace dies with its PID 1, and every process in it.
        self.pid1.signal(Signal::SIGKILL);
    }
}

/// A command with no input and its output in the pod's log, killed when this process dies.
fn logged_command(program: &str, log: File) -> Result<Command, Error> {
    let mut command = Command::new(program);
    let stdout = log
        .try_clone()
        .map_err(Error::internal("cannot share a pod's log file"))?;
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        .kill_on_drop(true);
    nginx_graceful::os::reaper::die_with_parent(command.as_std_mut());
    Ok(command)
}

/// PID 1 of the new namespace: the one child of `unshare`. Nothing announces the fork, so
/// the process table is read until it shows up (start-up only, within 5 s).
async fn find_pid1(unshare: i32, log: &Path) -> Result<PidFd, Error> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let table = ProcessTable::read().map_err(Error::internal("cannot read /proc"))?;
        if let Some(child) = table.children(unshare).next() {
            return PidFd::open_verified(child)
                .ok()
                .flatten()
                .ok_or_else(|| Error::Rehearsal(format!("a pod's PID 1 ({}) exited at once", child.pid)));
        }
        if Instant::now() > deadline || table.get(unshare).is_none() {
            let output = std::fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Rehearsal(format!(
                "unshare started no PID 1 (it needs root, or CAP_SYS_ADMIN); its output:\n{output}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
