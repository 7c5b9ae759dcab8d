//! The control socket, the supervisor's end: how `drain` (the preStop hook), `reload` and
//! `status` reach a `run` supervisor in the same container.
//!
//! One JSON object per line. `{"request":"status"}` gets one reply, what `status` prints.
//! `{"request":"reload"}` gets `{"event":"accepted",...}`, then the reload's outcome. For
//! `{"request":"drain"}` the server answers with `{"event":"accepted",...}` (its master and its
//! plan), then every phase and progress event, then one `{"event":"outcome",...}`, and waits for
//! the client to hang up: the hook process exits before the supervisor does, so the kubelet sees
//! a hook that finished, not one that was killed. A request may name the nginx master its client
//! means (`"master_pid"`); a supervisor that runs another one answers
//! `{"event":"refused","reason":...}` and does nothing, as it does for a client that is neither
//! its own user nor root.
//!
//! The socket cannot cost the supervisor what a drain needs: it takes a bounded number of
//! connections at once (the rest wait in the kernel's backlog, holding no descriptor of ours),
//! closes one that has not sent its request within a second, and reads a request no longer than
//! a few KB.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::control_client::{read_line, send, socket_path, trusted_uid};
use crate::core::outcome::Outcome;
use crate::core::phase::Phases;
use crate::core::plan::DrainPlan;
use crate::error::Error;
use crate::nginx::tree::ProcStat;
use crate::reload::ReloadReply;
use crate::surfaces::live::Live;

/// How long the supervisor waits for its `drain` clients to hang up before it exits.
pub const CLIENT_EXIT_WAIT: Duration = Duration::from_secs(2);
/// How long a new connection may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest request line: a request is a few dozen bytes.
const MAX_REQUEST_LINE: usize = 4096;
/// Connections served at once, at most: two hooks and a few `status` calls need far fewer.
const MAX_CONNECTIONS: usize = 16;

/// Connections served at once under a limit of `nofile` descriptors: at most an eighth of them,
/// so that a flood of clients leaves the drain the descriptors it needs (pidfds, /proc reads,
/// netlink). The supervisor leaves RLIMIT_NOFILE as it found it: nginx inherits it.
fn connection_cap(nofile: u64) -> usize {
    (nofile / 8).clamp(1, MAX_CONNECTIONS as u64) as usize
}

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
    /// socket file already there is left over from a dead one. `plan` is what a drain client
    /// is told the drain will follow.
    pub fn start(
        runtime_dir: &Path,
        phases: &Phases,
        live: Arc<Live>,
        plan: &DrainPlan,
    ) -> Result<Self, Error> {
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
        let plan = json!({
            "grace_period_ms": plan.grace_period.as_millis() as u64,
            "propagation_delay": plan.propagation_delay.to_string(),
        });
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let slots = Arc::new(Semaphore::new(connection_cap(nofile)));
        let accept_task = tokio::spawn(async move {
            loop {
                // Past the cap, clients wait in the kernel's backlog, not in our descriptors.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let connection = Connection {
                    events: feed.subscribe(),
                    outcome: outcome_rx.clone(),
                    requests: request_tx.clone(),
                    live: live.clone(),
                    plan: plan.clone(),
                    _slot: slot,
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
    live: Arc<Live>,
    /// The drain plan, as a drain client is told it.
    plan: Value,
    /// One of the connections the socket serves at once.
    _slot: OwnedSemaphorePermit,
    _alive: mpsc::Sender<()>,
}

impl Connection {
    async fn serve(self, stream: UnixStream) {
        let client_uid = stream.peer_cred().map(|cred| cred.uid()).ok();
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let Some(request) = read_request(&mut read, &mut write).await else {
            return;
        };
        // Refused once its request is in, so the client reads why instead of a closed socket.
        let refusal = refuse_client(client_uid).or_else(|| {
            request["master_pid"]
                .as_i64()
                .and_then(|pid| self.refuse_master(pid))
        });
        if let Some(reason) = refusal {
            tracing::warn!(uid = client_uid, "control request refused: {reason}");
            let _ = send(&mut write, &refused(reason)).await;
            return;
        }
        match request["request"].as_str() {
            Some("drain") => self.follow_drain(read, write).await,
            Some("status") => self.status(write).await,
            Some("reload") => self.reload(write).await,
            _ => {
                let unknown = json!({"event": "error", "message": "unknown request"});
                let _ = send(&mut write, &unknown).await;
            }
        }
    }

    async fn status(self, mut write: OwnedWriteHalf) {
        // /proc reads: off the thread that handles signals.
        let live = self.live.clone();
        let status = tokio::task::spawn_blocking(move || crate::surfaces::status::of_supervisor(&live))
            .await
            .unwrap_or_else(|_| json!({"error": "the status could not be read"}));
        let _ = send(&mut write, &status).await;
    }

    async fn reload(self, mut write: OwnedWriteHalf) {
        let accepted = json!({"event": "accepted", "master_pid": self.live.master()});
        if send(&mut write, &accepted).await.is_err() {
            return;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.requests.send(ControlRequest::Reload(reply)).await;
        let answer = match answer.await {
            Ok(reply) => reply.to_json(),
            Err(_) => {
                json!({"event": "reload", "outcome": "refused", "reason": "the supervisor is stopping"})
            }
        };
        let _ = send(&mut write, &answer).await;
    }

    /// Starts the drain (or joins the one under way) and relays it: the plan, each event, the
    /// outcome; then waits for the client to hang up.
    async fn follow_drain(mut self, mut read: BufReader<OwnedReadHalf>, mut write: OwnedWriteHalf) {
        // Subscribed before the request goes in, so no event of this drain is missed.
        let _ = self.requests.send(ControlRequest::Drain).await;
        let mut accepted = json!({"event": "accepted", "master_pid": self.live.master()});
        for (field, value) in self.plan.as_object().into_iter().flatten() {
            accepted[field] = value.clone();
        }
        if send(&mut write, &accepted).await.is_err() {
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
                    // A client that stopped reading is not waited for.
                    Ok(event) => if send(&mut write, &event).await.is_err() { return },
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
            let _ = tokio::time::timeout(CLIENT_EXIT_WAIT, hang_up(&mut read)).await;
        }
    }

    /// Why a request for the master `pid` is refused: it runs, and it is not this supervisor's
    /// (nor one its master started, the new master of a binary upgrade). A pid that no longer
    /// runs is a pid file left by a master that has exited, ours most likely: nothing to protect.
    fn refuse_master(&self, pid: i64) -> Option<String> {
        let ours = self.live.master();
        let pid = i32::try_from(pid).ok()?;
        let runs = ProcStat::read(pid).is_some_and(|stat| stat.state != 'Z');
        if !runs || ours.is_some_and(|master| master == pid || descends_from(pid, master)) {
            return None;
        }
        let ours = ours.map_or("none running".to_owned(), |master| format!("pid {master}"));
        Some(format!(
            "its nginx master is {ours}, not pid {pid} that --pid-file names; give --runtime-dir of the supervisor of pid {pid}, or one with no supervisor to act on pid {pid} directly"
        ))
    }
}

/// The request, read within [`REQUEST_TIMEOUT`] and [`MAX_REQUEST_LINE`]; `None` when there is
/// none to serve (a longer line is told why).
async fn read_request(read: &mut BufReader<OwnedReadHalf>, write: &mut OwnedWriteHalf) -> Option<Value> {
    match tokio::time::timeout(REQUEST_TIMEOUT, read_line(read, MAX_REQUEST_LINE)).await {
        Ok(Ok(Some(line))) => Some(serde_json::from_str::<Value>(&line).unwrap_or(Value::Null)),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::InvalidData => {
            let reason = format!("a request is one line of at most {MAX_REQUEST_LINE} bytes");
            let _ = send(write, &refused(reason)).await;
            None
        }
        // Silent for a second, gone, or unreadable: its slot goes to the next client.
        _ => None,
    }
}

/// Why a client of `uid` is refused: neither the supervisor's user nor root.
fn refuse_client(uid: Option<u32>) -> Option<String> {
    match uid {
        Some(uid) if trusted_uid(uid) => None,
        Some(uid) => Some(format!(
            "uid {uid} is neither the supervisor's user (uid {}) nor root",
            nix::unistd::geteuid()
        )),
        None => Some("the client's credentials cannot be read".to_owned()),
    }
}

fn refused(reason: String) -> Value {
    json!({"event": "refused", "reason": reason})
}

/// Whether `ancestor` is among the parents of `pid` (a few generations up, at most).
fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut pid = pid;
    for _ in 0..8 {
        match ProcStat::read(pid) {
            Some(stat) if stat.ppid == ancestor => return true,
            Some(stat) if stat.ppid > 1 => pid = stat.ppid,
            _ => return false,
        }
    }
    false
}

/// Until the client hangs up; what it still sends is read into a small buffer and dropped.
async fn hang_up(read: &mut (impl AsyncRead + Unpin)) {
    let mut sink = [0u8; 512];
    while let Ok(1..) = read.read(&mut sink).await {}
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;
    use crate::cli::{DEFAULT_PID_FILE, NginxTarget};
    use crate::core::outcome::DrainOutcome;
    use crate::core::phase::Phase;
    use crate::core::plan::{DelaySetting, DrainSettings};
    use crate::core::policy::Refusal;
    use crate::nginx::generations::Generations;
    use crate::surfaces::control_client::{Bound, request_drain, request_reload, request_status};
    use crate::surfaces::metrics::Metrics;
    use test_support::TempDir as Dir;

    fn plan() -> DrainPlan {
        DrainPlan::new(&DrainSettings {
            grace_period: Duration::from_secs(30),
            propagation_delay: DelaySetting::Fixed(Duration::from_secs(5)),
            min_propagation_delay: Duration::from_secs(1),
            max_propagation_delay: None,
            safety_margin: Duration::from_secs(2),
            pre_drain_exec: Vec::new(),
            pre_drain_timeout: Duration::from_secs(5),
            probe_ports: Vec::new(),
            close_spread: None,
        })
        .unwrap()
    }

    fn server(dir: &Dir, phases: &Phases) -> ControlServer {
        server_of(dir, phases, 0)
    }

    /// A server whose nginx master is `master` (0: none).
    fn server_of(dir: &Dir, phases: &Phases, master: i32) -> ControlServer {
        let live = Live::new(
            phases.subscribe(),
            phases.delay_state(),
            phases.drain_start(),
            crate::core::phase::UnreadyAt::Start,
            None,
            Generations::default(),
            Metrics::new(Default::default()),
        );
        live.set_child(master);
        ControlServer::start(&dir.0, phases, live, &plan()).unwrap()
    }

    fn target(dir: &Dir) -> NginxTarget {
        NginxTarget {
            pid_file: DEFAULT_PID_FILE.into(),
            runtime_dir: dir.0.clone(),
        }
    }

    fn a_while() -> Bound {
        Bound::from_now(Duration::from_secs(10))
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
        let target = target(&dir);
        let client = tokio::spawn(async move {
            let mut events = Vec::new();
            let outcome = request_drain(&target, &plan(), a_while(), |event: &Value| {
                events.push(event["phase"].clone())
            })
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
        let target = target(&dir);
        let ask = |target: NginxTarget| async move {
            request_reload(&target, Duration::from_secs(10)).await.unwrap()
        };
        let client = tokio::spawn(ask(target.clone()));
        let Some(ControlRequest::Reload(reply)) = server.requests.recv().await else {
            panic!("the reload request reaches the loop");
        };
        reply.send(ReloadReply::Refused(Refusal::Draining)).unwrap();
        let answer = client.await.unwrap().expect("a reply");
        assert_eq!(answer["outcome"], "refused");
        assert_eq!(answer["reason"], Refusal::Draining.reason());

        // A loop that drops the request (it is stopping) still gets the client an answer.
        let client = tokio::spawn(ask(target));
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
        let reply = exchange(&dir, b"{\"request\":\"explode\"}\n").await;
        assert_eq!(reply["event"], "error");
        assert!(server.requests.try_recv().is_err(), "nothing reached the loop");
    }

    #[tokio::test]
    async fn a_request_past_the_line_limit_is_refused_unread() {
        let dir = Dir::new("long");
        let phases = Phases::default();
        let mut server = server(&dir, &phases);
        let mut long = vec![b' '; MAX_REQUEST_LINE];
        long.extend_from_slice(b"{\"request\":\"drain\"}\n");
        let reply = exchange(&dir, &long).await;
        assert_eq!(reply["event"], "refused", "{reply}");
        assert!(server.requests.try_recv().is_err(), "nothing reached the loop");
    }

    #[tokio::test]
    async fn a_request_for_another_master_is_refused_and_goes_no_further() {
        let dir = Dir::new("other-master");
        let phases = Phases::default();
        let me = std::process::id() as i32;
        let mut server = server_of(&dir, &phases, me);
        // pid 1 is neither this "master" nor below it.
        let reply = exchange(&dir, b"{\"request\":\"drain\",\"master_pid\":1}\n").await;
        assert_eq!(reply["event"], "refused", "{reply}");
        let reason = reply["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("its nginx master is pid {me}, not pid 1")),
            "{reason}"
        );
        assert!(server.requests.try_recv().is_err(), "nothing reached the loop");

        // Its own master is its own, and a pid that no longer runs names nothing to protect.
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        for pid in [me, exited.id() as i32] {
            let line = format!("{{\"request\":\"status\",\"master_pid\":{pid}}}\n");
            assert_eq!(exchange(&dir, line.as_bytes()).await["source"], "supervisor");
        }
        assert!(!descends_from(1, me));
    }

    #[tokio::test]
    async fn without_a_supervisor_the_client_is_told_so() {
        let dir = Dir::new("none");
        let target = target(&dir);
        assert_eq!(
            request_drain(&target, &plan(), a_while(), |_| {}).await.unwrap(),
            None
        );
        assert_eq!(
            request_reload(&target, Duration::from_secs(1)).await.unwrap(),
            None
        );
        assert_eq!(request_status(&target).await.unwrap(), None);
    }

    #[test]
    fn the_connection_cap_stays_well_below_the_descriptor_limit() {
        for (nofile, cap) in [
            (1_048_576, MAX_CONNECTIONS),
            (1024, 16),
            (128, 16),
            (64, 8),
            (4, 1),
        ] {
            assert_eq!(connection_cap(nofile), cap, "RLIMIT_NOFILE {nofile}");
        }
    }

    #[test]
    fn only_the_supervisors_user_and_root_are_served() {
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(refuse_client(Some(me)), None);
        assert_eq!(refuse_client(Some(0)), None);
        let other = if me == 65534 { 65533 } else { 65534 };
        let reason = refuse_client(Some(other)).expect("refused");
        assert!(reason.starts_with(&format!("uid {other} is neither")), "{reason}");
        assert!(refuse_client(None).is_some());
    }

    /// Sends `request` as it is and returns the one line the server answers.
    async fn exchange(dir: &Dir, request: &[u8]) -> Value {
        let stream = UnixStream::connect(socket_path(&dir.0)).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(request).await.unwrap();
        let line = BufReader::new(read).lines().next_line().await.unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    }
}
