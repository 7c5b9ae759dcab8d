//! The control socket, the supervisor's end: how `drain` (the preStop hook), `reload` and
//! `status` reach a `run` supervisor in the same container.
//!
//! One JSON object per line. `{"request":"status"}` gets one reply, what `status` prints.
//! `{"request":"reload"}` gets the reload's outcome. For `{"request":"drain"}` the server answers with
//! `{"event":"accepted",...}`, then every phase and progress event, then one
//! `{"event":"outcome",...}`, and waits for the client to hang up: the hook process exits before
//! the supervisor does, so the kubelet sees a hook that finished, not one that was killed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::control_client::{send, socket_path};
use crate::core::outcome::Outcome;
use crate::core::phase::Phases;
use crate::error::Error;
use crate::reload::ReloadReply;
use crate::surfaces::live::Live;

/// How long the supervisor waits for its `drain` clients to hang up before it exits.
pub const CLIENT_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a new connection may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// What a client asks of the supervisor.
#[derive(Debug)]
pub enum ControlRequest {
    /// Drain; the client follows the phase feed and the outcome.
    Drain,
    /// Validate and reload now; the reply goes back on the sender.
    Reload(tokio::sync::oneshot::Sender<ReloadReply>),
}

/// The supervisor's end.
pub struct ControlServer {
    pub requests: mpsc::Receiver<ControlRequest>,
    outcome: watch::Sender<Option<Value>>,
    clients_gone: mpsc::Receiver<()>,
    accept_task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl ControlServer {
    /// Binds the socket, owner-only. The runtime directory is locked by this supervisor, so a
    /// socket file already there is left over from a dead one.
    pub fn start(runtime_dir: &Path, phases: &Phases, live: std::sync::Arc<Live>) -> Result<Self, Error> {
        let path = socket_path(runtime_dir);
        let fail = |source| Error::RuntimeDir {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        // Owner-only from the first instant: bound under a umask that leaves nobody else a way in.
        let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(&path);
        nix::sys::stat::umask(umask);
        let listener = bound.map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;

        let (request_tx, requests) = mpsc::channel(8);
        let (outcome, outcome_rx) = watch::channel(None);
        let (client_alive, clients_gone) = mpsc::channel::<()>(1);
        let feed = phases.feed_source();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let connection = Connection {
                    events: feed.subscribe(),
                    outcome: outcome_rx.clone(),
                    requests: request_tx.clone(),
                    live: live.clone(),
                    _alive: client_alive.clone(),
                };
                tokio::spawn(connection.serve(stream));
            }
        });
        Ok(Self {
            requests,
            outcome,
            clients_gone,
            accept_task,
            path,
        })
    }

    /// Reports the outcome to every client and waits (bounded) until they have hung up.
    pub async fn finish(mut self, outcome: &Outcome) {
        self.accept_task.abort();
        let _ = std::fs::remove_file(&self.path);
        let _ = self.accept_task.await;
        self.outcome.send_replace(Some(outcome.to_json()));
        // Each connection holds a sender: `None` once every one of them is gone.
        match tokio::time::timeout(CLIENT_EXIT_WAIT, self.clients_gone.recv()).await {
            Ok(_) => tracing::debug!("every drain client has hung up"),
            Err(_) => tracing::warn!("a drain client did not hang up in time; exiting anyway"),
        }
    }
}

struct Connection {
    events: tokio::sync::broadcast::Receiver<Value>,
    outcome: watch::Receiver<Option<Value>>,
    requests: mpsc::Sender<ControlRequest>,
    live: std::sync::Arc<Live>,
    _alive: mpsc::Sender<()>,
}

impl Connection {
    async fn serve(mut self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => serde_json::from_str::<Value>(&line).unwrap_or(Value::Null),
            _ => return,
        };
        match request["request"].as_str() {
            Some("drain") => {}
            Some("status") => {
                // /proc reads: off the thread that handles signals.
                let live = self.live.clone();
                let status =
                    tokio::task::spawn_blocking(move || crate::surfaces::status::of_supervisor(&live))
                        .await
                        .unwrap_or_else(|_| json!({"error": "the status could not be read"}));
                let _ = send(&mut write, &status).await;
                return;
            }
            Some("reload") => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let _ = self.requests.send(ControlRequest::Reload(reply)).await;
                let answer = match answer.await {
                    Ok(reply) => reply.to_json(),
                    Err(_) => {
                        json!({"event": "reload", "outcome": "refused", "reason": "the supervisor is stopping"})
                    }
                };
                let _ = send(&mut write, &answer).await;
                return;
            }
            _ => {
                let _ = send(
                    &mut write,
                    &json!({"event": "error", "message": "unknown request"}),
                )
                .await;
                return;
            }
        }
        // Subscribed before the request goes in, so no event of this drain is missed.
        let _ = self.requests.send(ControlRequest::Drain).await;
        if send(&mut write, &json!({"event": "accepted"})).await.is_err() {
            return;
        }
        let outcome = loop {
            tokio::select! {
                changed = self.outcome.changed() => {
                    if changed.is_err() {
                        break None;
                    }
                    let outcome = self.outcome.borrow().clone();
                    if outcome.is_some() {
                        break outcome;
                    }
                }
                event = self.events.recv() => match event {
                    Ok(event) => { let _ = send(&mut write, &event).await; }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break None,
                },
            }
        };
        // Events published just before the outcome are still queued: send them first.
        while let Ok(event) = self.events.try_recv() {
            let _ = send(&mut write, &event).await;
        }
        if let Some(outcome) = outcome {
            let _ = send(&mut write, &outcome).await;
            // Wait for the client to hang up (it exits once it has the outcome).
            let _ = tokio::time::timeout(CLIENT_EXIT_WAIT, lines.next_line()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::core::outcome::DrainOutcome;
    use crate::core::phase::Phase;
    use crate::core::policy::Refusal;
    use crate::nginx::generations::Generations;
    use crate::surfaces::control_client::{request_drain, request_reload};
    use crate::surfaces::metrics::Metrics;
    use test_support::TempDir as Dir;

    fn server(dir: &Dir, phases: &Phases) -> ControlServer {
        let live = Live::new(
            phases.subscribe(),
            None,
            Generations::default(),
            Metrics::new(Default::default()),
        );
        ControlServer::start(&dir.0, phases, live).unwrap()
    }

    #[tokio::test]
    async fn the_socket_is_the_owners_alone() {
        let dir = Dir::new("mode");
        let phases = Phases::default();
        let _server = server(&dir, &phases);
        let mode = std::fs::metadata(socket_path(&dir.0))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_drain_client_hears_the_phases_then_the_outcome() {
        let dir = Dir::new("drain");
        let phases = Phases::default();
        let mut server = server(&dir, &phases);
        let path = dir.0.clone();
        let client = tokio::spawn(async move {
            let mut events = Vec::new();
            let outcome = request_drain(&path, |event: &Value| events.push(event["phase"].clone()))
                .await
                .unwrap();
            (events, outcome)
        });
        let Some(ControlRequest::Drain) = server.requests.recv().await else {
            panic!("the drain request reaches the loop");
        };
        phases.enter(Phase::Unready, "drain started");
        phases.enter(Phase::Quitting, "SIGQUIT");
        let outcome = Outcome::of_drain(DrainOutcome {
            connections_at_quit: Some(3),
            ..Default::default()
        });
        server.finish(&outcome).await;
        let (events, received) = client.await.unwrap();
        assert_eq!(events, [json!("unready"), json!("quitting")]);
        let received = received.expect("an outcome");
        assert_eq!(Outcome::from_json(&received), Some(outcome));
    }

    #[tokio::test]
    async fn a_reload_client_hears_the_reply_the_loop_gives() {
        let dir = Dir::new("reload");
        let phases = Phases::default();
        let mut server = server(&dir, &phases);
        let path = dir.0.clone();
        let client = tokio::spawn(async move { request_reload(&path).await.unwrap() });
        let Some(ControlRequest::Reload(reply)) = server.requests.recv().await else {
            panic!("the reload request reaches the loop");
        };
        reply.send(ReloadReply::Refused(Refusal::Draining)).unwrap();
        let answer = client.await.unwrap().expect("a reply");
        assert_eq!(answer["outcome"], "refused");
        assert_eq!(answer["reason"], Refusal::Draining.reason());

        // A loop that drops the request (it is stopping) still gets the client an answer.
        let path = dir.0.clone();
        let client = tokio::spawn(async move { request_reload(&path).await.unwrap() });
        let Some(ControlRequest::Reload(reply)) = server.requests.recv().await else {
            panic!("the reload request reaches the loop");
        };
        drop(reply);
        let answer = client.await.unwrap().expect("a reply");
        assert_eq!(answer["reason"], "the supervisor is stopping");
    }

    #[tokio::test]
    async fn an_unknown_request_is_answered_not_passed_on() {
        let dir = Dir::new("unknown");
        let phases = Phases::default();
        let mut server = server(&dir, &phases);
        let stream = UnixStream::connect(socket_path(&dir.0)).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"{\"request\":\"explode\"}\n").await.unwrap();
        let line = BufReader::new(read).lines().next_line().await.unwrap().unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["event"], "error");
        assert!(server.requests.try_recv().is_err(), "nothing reached the loop");
    }

    #[tokio::test]
    async fn without_a_supervisor_the_client_is_told_so() {
        let dir = Dir::new("none");
        assert_eq!(request_drain(&dir.0, |_| {}).await.unwrap(), None);
        assert_eq!(request_reload(&dir.0).await.unwrap(), None);
    }
}
