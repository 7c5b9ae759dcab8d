//! The control socket, the client's end: `drain`, `reload` and `status` asking the `run`
//! supervisor of this container (see [`super::control_socket`] for the protocol).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::Error;

/// How long a client waits for the supervisor to accept before it drains by itself.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("control.sock")
}

/// One JSON object, one line.
pub(super) async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, event: &Value) -> std::io::Result<()> {
    let mut line = event.to_string();
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

/// The client's end: `Ok(None)` when no supervisor answers, so the caller drains by itself.
pub async fn request_drain(
    runtime_dir: &Path,
    mut on_event: impl FnMut(&Value),
) -> Result<Option<Value>, Error> {
    let path = socket_path(runtime_dir);
    if !path.exists() {
        return Ok(None);
    }
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&path)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::warn!(socket = %path.display(), %err, "the supervisor's control socket does not answer: draining directly");
            return Ok(None);
        }
        Err(_) => {
            tracing::warn!(socket = %path.display(), "the supervisor's control socket did not answer in time: draining directly");
            return Ok(None);
        }
    };
    let (read, mut write) = stream.into_split();
    if send(&mut write, &json!({"request": "drain"})).await.is_err() {
        tracing::warn!(socket = %path.display(), "the supervisor closed the control socket: draining directly");
        return Ok(None);
    }
    let mut lines = BufReader::new(read).lines();
    let mut accepted = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match event["event"].as_str() {
            Some("outcome") => {
                // The supervisor exits once this connection closes, and a container's PID 1
                // takes the hook down with it: keep the socket open until this process exits,
                // when the kernel closes it after our exit status is set.
                std::mem::forget(lines);
                std::mem::forget(write);
                return Ok(Some(event));
            }
            Some("accepted") => accepted = true,
            _ => on_event(&event),
        }
    }
    if accepted {
        Err(Error::ControlBroken)
    } else {
        tracing::warn!(socket = %path.display(), "the supervisor did not accept the request: draining directly");
        Ok(None)
    }
}

/// Asks the supervisor to reload; `Ok(None)` when no supervisor answers.
pub async fn request_reload(runtime_dir: &Path) -> Result<Option<Value>, Error> {
    request(runtime_dir, "reload").await
}

/// Asks the supervisor what it and nginx are doing; `Ok(None)` when no supervisor answers.
pub async fn request_status(runtime_dir: &Path) -> Result<Option<Value>, Error> {
    request(runtime_dir, "status").await
}

/// One request, one reply.
async fn request(runtime_dir: &Path, what: &str) -> Result<Option<Value>, Error> {
    let path = socket_path(runtime_dir);
    let Ok(Ok(stream)) = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&path)).await else {
        return Ok(None);
    };
    let (read, mut write) = stream.into_split();
    if send(&mut write, &json!({ "request": what })).await.is_err() {
        return Ok(None);
    }
    match BufReader::new(read).lines().next_line().await {
        Ok(Some(line)) => Ok(serde_json::from_str(&line).ok()),
        _ => Err(Error::ControlBroken),
    }
}
