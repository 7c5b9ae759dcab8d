//! The control socket, the client's end: `drain`, `reload` and `status` asking the `run`
//! supervisor of this container (see [`super::control_socket`] for the protocol).
//!
//! Nothing the socket says is believed before its server's credentials are: a runtime directory
//! that every user may write (a Kubernetes emptyDir is mode 777) lets any process of the pod put
//! a socket of its own at the path. And every wait is bounded, so a supervisor that is stopped
//! or hung turns into one line and an exit code, never a hook that blocks forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::cli::NginxTarget;
use crate::core::plan::DrainPlan;
use crate::duration::fmt;
use crate::error::Error;
use crate::nginx::pidfile::{PID_FILE_LIMIT, PidFileContent};
use crate::os::small_file;

/// How long `status` waits for the supervisor's answer, and `reload` for it to take the request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may wait for the other side to read: a reply is a few KB, far less than
/// a socket's buffer, so only a peer that stopped reading ever waits.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest line a client reads: a status reply with hundreds of workers fits.
const MAX_REPLY_LINE: usize = 1 << 20;

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("control.sock")
}

/// One JSON object, one line; a peer that does not read for [`WRITE_TIMEOUT`] is given up.
pub(super) async fn send(write: &mut OwnedWriteHalf, event: &Value) -> std::io::Result<()> {
    let mut line = event.to_string();
    line.push('\n');
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line.as_bytes())).await {
        Ok(written) => written,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// One line of at most `max` bytes, without its newline; `None` at the end of the stream. A
/// longer line is an error, read no further than `max` + 1 bytes: memory stays bounded
/// whatever the peer sends.
pub(super) async fn read_line(
    read: &mut (impl AsyncBufRead + Unpin),
    max: usize,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = read.take(max as u64 + 1).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {max} bytes"),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The uids a side of the control socket trusts: its own, and root's.
pub(super) fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// How long a wait on the supervisor may last: until `deadline`, which is `within` after the
/// wait's start (for the message when it runs out).
#[derive(Clone, Copy)]
pub struct Bound {
    deadline: Instant,
    within: Duration,
}

impl Bound {
    pub fn from_now(within: Duration) -> Self {
        Self::since(Instant::now(), within)
    }

    pub fn since(start: Instant, within: Duration) -> Self {
        Self {
            deadline: start + within,
            within,
        }
    }
}

/// An open exchange with a supervisor whose credentials have been checked.
struct Session {
    path: PathBuf,
    lines: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Session {
    /// Connects and checks who listens. `Ok(None)` when no supervisor is there: no socket, or
    /// one that nobody listens on (a supervisor that died); `otherwise` says what the command
    /// does then.
    async fn open(runtime_dir: &Path, bound: Bound, otherwise: &str) -> Result<Option<Self>, Error> {
        let path = socket_path(runtime_dir);
        if !path.exists() {
            return Ok(None);
        }
        let stream = match tokio::time::timeout_at(bound.deadline, UnixStream::connect(&path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::ControlRefused {
                    detail: format!(
                        "cannot connect to the control socket {}: {err}: it is another user's; run this command as the supervisor's user",
                        path.display()
                    ),
                });
            }
            Ok(Err(err)) => {
                tracing::warn!(socket = %path.display(), %err, "the supervisor's control socket does not answer: {otherwise}");
                return Ok(None);
            }
            Err(_) => return Err(timed_out(&path, "take the connection", bound)),
        };
        // Who bound the socket: a process of another user may have put its own at the path.
        let uid = stream
            .peer_cred()
            .map(|cred| cred.uid())
            .map_err(|err| Error::ControlRefused {
                detail: format!(
                    "cannot read who serves the control socket {}: {err}",
                    path.display()
                ),
            })?;
        if !trusted_uid(uid) {
            return Err(Error::ControlRefused {
                detail: format!(
                    "the control socket {} is served by uid {uid}, neither this user (uid {}) nor root: another user's process may have put it there (`ss -xlp` names it)",
                    path.display(),
                    nix::unistd::geteuid()
                ),
            });
        }
        let (read, write) = stream.into_split();
        Ok(Some(Self {
            path,
            lines: BufReader::new(read),
            write,
        }))
    }

    /// Sends the request; `false` when the supervisor closed the socket first.
    async fn ask(&mut self, request: Value) -> bool {
        send(&mut self.write, &request).await.is_ok()
    }

    /// The next JSON line, within `bound`; `Ok(None)` when the supervisor hung up.
    async fn next(&mut self, bound: Bound, waiting_for: &'static str) -> Result<Option<Value>, Error> {
        loop {
            let line =
                match tokio::time::timeout_at(bound.deadline, read_line(&mut self.lines, MAX_REPLY_LINE))
                    .await
                {
                    Err(_) => return Err(timed_out(&self.path, waiting_for, bound)),
                    Ok(Ok(Some(line))) => line,
                    Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
                };
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                return Ok(Some(event));
            }
        }
    }
}

/// The error for a wait that ran out: the supervisor is stopped, hung or swamped.
fn timed_out(path: &Path, what: &'static str, bound: Bound) -> Error {
    Error::ControlTimeout {
        socket: path.to_owned(),
        what,
        within: fmt(bound.within),
    }
}

/// What the supervisor said when it refused a request.
fn refusal(path: &Path, event: &Value) -> Error {
    Error::ControlRefused {
        detail: format!(
            "the supervisor at {} refused: {}",
            path.display(),
            event["reason"].as_str().unwrap_or("no reason given")
        ),
    }
}

/// The request, with the master the user named: a supervisor that runs another one refuses.
fn request_for(what: &str, target: &NginxTarget) -> Result<Value, Error> {
    let mut request = json!({ "request": what });
    if let Some(pid) = named_master(target)? {
        request["master_pid"] = pid.into();
    }
    Ok(request)
}

/// The pid in the pid file the user named (`--pid-file` or its variable, when not the default).
/// `None` when none was named, or when it is missing or holds no pid: then there is nothing to
/// compare, and the supervisor is asked as it would be without one. A pid file that is not a
/// small regular file (a FIFO, a device) is refused, as a direct drain refuses it.
fn named_master(target: &NginxTarget) -> Result<Option<i32>, Error> {
    let Some(path) = target.named_pid_file() else {
        return Ok(None);
    };
    match small_file::read(path, PID_FILE_LIMIT).map(|text| PidFileContent::parse(&text)) {
        Ok(PidFileContent::Pid(pid)) => Ok(Some(pid)),
        Ok(_) => {
            tracing::info!(pid_file = %path.display(), "the pid file holds no pid: the supervisor's own nginx is the target");
            Ok(None)
        }
        Err(err) if err.is_not_found() => {
            tracing::info!(pid_file = %path.display(), %err, "cannot read the pid file: the supervisor's own nginx is the target");
            Ok(None)
        }
        Err(refused) => Err(Error::PidFile {
            path: path.to_owned(),
            detail: refused.to_string(),
        }),
    }
}

/// What `drain` does when no supervisor answers.
const DRAINING_DIRECTLY: &str = "draining directly";

/// Asks the supervisor to drain and follows its drain within `bound` (the hook's grace
/// period). `Ok(None)` when no supervisor answers, so the caller drains by itself.
pub async fn request_drain(
    target: &NginxTarget,
    hook_plan: &DrainPlan,
    bound: Bound,
    mut on_event: impl FnMut(&Value),
) -> Result<Option<Value>, Error> {
    let Some(mut session) = Session::open(&target.runtime_dir, bound, DRAINING_DIRECTLY).await? else {
        return Ok(None);
    };
    if !session.ask(request_for("drain", target)?).await {
        tracing::warn!(socket = %session.path.display(), "the supervisor closed the control socket: {DRAINING_DIRECTLY}");
        return Ok(None);
    }
    let mut accepted = false;
    while let Some(event) = session.next(bound, "report the drain's outcome").await? {
        match event["event"].as_str() {
            Some("outcome") => {
                // The supervisor exits once this connection closes, and a container's PID 1
                // takes the hook down with it: keep the socket open until this process exits,
                // when the kernel closes it after our exit status is set.
                std::mem::forget(session);
                return Ok(Some(event));
            }
            Some("accepted") => {
                accepted = true;
                say_whose_plan(&event, hook_plan);
            }
            Some("refused") => return Err(refusal(&session.path, &event)),
            _ => on_event(&event),
        }
    }
    if accepted {
        Err(Error::ControlBroken)
    } else {
        tracing::warn!(socket = %session.path.display(), "the supervisor did not accept the request: {DRAINING_DIRECTLY}");
        Ok(None)
    }
}

/// The supervisor drains by its own plan: said when this hook's flags differ from it.
fn say_whose_plan(accepted: &Value, hook: &DrainPlan) {
    let grace = accepted["grace_period_ms"].as_u64().map(Duration::from_millis);
    let (Some(grace), Some(delay)) = (grace, accepted["propagation_delay"].as_str()) else {
        return;
    };
    let own_delay = hook.propagation_delay.to_string();
    if (grace, delay) == (hook.grace_period, own_delay.as_str()) {
        return;
    }
    let message = format!(
        "the supervisor drains by its own plan (grace period {}, propagation delay {}), not this hook's --grace-period {} and --propagation-delay {}, which apply only without a supervisor",
        fmt(grace),
        delay,
        fmt(hook.grace_period),
        own_delay
    );
    if grace > hook.grace_period {
        // This hook stops following at its own grace period, before the supervisor's ends.
        tracing::warn!("{message}; this hook waits at most {}", fmt(hook.grace_period));
    } else {
        tracing::info!("{message}");
    }
}

/// Asks the supervisor to reload, and waits `reply_within` for the outcome once it has taken
/// the request; `Ok(None)` when no supervisor answers.
pub async fn request_reload(target: &NginxTarget, reply_within: Duration) -> Result<Option<Value>, Error> {
    let Some(mut session) = Session::open(
        &target.runtime_dir,
        Bound::from_now(ANSWER_TIMEOUT),
        "reloading directly",
    )
    .await?
    else {
        return Ok(None);
    };
    if !session.ask(request_for("reload", target)?).await {
        return Ok(None);
    }
    let taken = session
        .next(Bound::from_now(ANSWER_TIMEOUT), "take the reload request")
        .await?;
    match taken {
        None => return Err(Error::ControlBroken),
        Some(event) if event["event"] == "refused" => return Err(refusal(&session.path, &event)),
        Some(event) if event["event"] == "accepted" => {}
        // The outcome at once (a reload refused during a drain).
        Some(reply) => return Ok(Some(reply)),
    }
    match session
        .next(Bound::from_now(reply_within), "report the reload's outcome")
        .await?
    {
        Some(reply) => Ok(Some(reply)),
        None => Err(Error::ControlBroken),
    }
}

/// Asks the supervisor what it and nginx are doing; `Ok(None)` when no supervisor answers.
pub async fn request_status(target: &NginxTarget) -> Result<Option<Value>, Error> {
    let bound = Bound::from_now(ANSWER_TIMEOUT);
    let Some(mut session) = Session::open(&target.runtime_dir, bound, "reading the pid file").await? else {
        return Ok(None);
    };
    if !session.ask(request_for("status", target)?).await {
        return Ok(None);
    }
    match session.next(bound, "answer the status request").await? {
        Some(event) if event["event"] == "refused" => Err(refusal(&session.path, &event)),
        Some(status) => Ok(Some(status)),
        None => Err(Error::ControlBroken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_is_read_no_further_than_its_bound() {
        let input: &[u8] = b"{\"request\":\"status\"}\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
        let mut read = BufReader::new(input);
        let first = read_line(&mut read, 32).await.unwrap();
        assert_eq!(first.as_deref(), Some("{\"request\":\"status\"}"));
        let second = read_line(&mut read, 32).await;
        assert_eq!(second.unwrap_err().kind(), std::io::ErrorKind::InvalidData);

        let mut last = BufReader::new(&b"no newline"[..]);
        assert_eq!(
            read_line(&mut last, 32).await.unwrap().as_deref(),
            Some("no newline")
        );
        assert_eq!(read_line(&mut last, 32).await.unwrap(), None);
    }
}
