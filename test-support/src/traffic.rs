//! Client traffic through a drain or a reload: keep-alive clients, a client that opens a new
//! connection per request and, optionally, a slow download, all against one address, then one
//! report of what they saw.
//!
//! ```ignore
//! let traffic = Traffic::to(site.addr()).keepalive(8).one_shot().slow(&path).start();
//! traffic.wait_served(100);
//! traffic.wait_slow_in_flight();
//! supervisor.signal(SIGTERM);
//! traffic.remove_endpoint_once_unready(&supervisor.log); // the Service stops sending new connections
//! let report = traffic.finish();
//! report.assert_no_failures();
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Log;
use crate::http::{self, LoopControl, LoopReport, Reply};

/// How long after the supervisor turns the pod unready the Service stops sending it new
/// connections, in tests that model the removal (see [`Traffic::remove_endpoint_once_unready`]).
pub const ENDPOINT_REMOVAL: Duration = Duration::from_millis(500);

/// The least margin between the endpoint removal and SIGQUIT those tests leave: a test thread
/// late by less than this cannot make a client meet a closed listener.
pub const REMOVAL_MARGIN: Duration = Duration::from_millis(1000);

/// What to start: see [`Traffic::to`].
#[must_use = "nothing runs until start()"]
pub struct TrafficPlan {
    addr: SocketAddr,
    keepalive: usize,
    pause: Duration,
    one_shot: bool,
    slow: Option<(SocketAddr, String)>,
    limit: Duration,
}

impl TrafficPlan {
    /// `clients` keep-alive clients, each on its own reused connection (see
    /// [`http::keepalive_loop`]).
    pub fn keepalive(mut self, clients: usize) -> Self {
        self.keepalive = clients;
        self
    }

    /// The pause between two requests of a keep-alive client; 20 ms unless set.
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// A client that opens one new connection per request, back to back (see
    /// [`http::close_loop`]).
    pub fn one_shot(mut self) -> Self {
        self.one_shot = true;
        self
    }

    /// One GET of `path` (a slow one, like [`crate::Site::slow_path`]), in flight beside the
    /// loops; it fails unless it ends in a whole 200 response.
    pub fn slow(mut self, path: &str) -> Self {
        self.slow = Some((self.addr, path.to_owned()));
        self
    }

    /// [`TrafficPlan::slow`] from another address: a second server of the same nginx.
    pub fn slow_from(mut self, addr: SocketAddr, path: &str) -> Self {
        self.slow = Some((addr, path.to_owned()));
        self
    }

    /// How long the loops run at most, if the endpoint is never removed; 20 s unless set.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    pub fn start(self) -> Traffic {
        let started = Instant::now();
        let control = LoopControl::default();
        let keepalive = (self.keepalive > 0).then(|| {
            http::keepalive_loop(self.addr, self.keepalive, self.pause, control.clone(), self.limit)
        });
        let one_shot = self
            .one_shot
            .then(|| http::close_loop(self.addr, control.clone(), self.limit));
        let (began_tx, slow_began) = mpsc::channel();
        let slow = self.slow.map(|(addr, path)| {
            std::thread::spawn(move || {
                let mut began = None;
                let result = http::get_observed(addr, &path, || {
                    let now = Instant::now();
                    began = Some(now);
                    let _ = began_tx.send(now);
                });
                Slow {
                    path,
                    result,
                    began,
                    at: Instant::now(),
                }
            })
        });
        Traffic {
            started,
            control,
            removed_at: Mutex::new(None),
            keepalive,
            one_shot,
            slow,
            slow_began,
        }
    }
}

/// Client loops running against one address. Dropped without [`Traffic::finish`] (a test that
/// failed), it removes the endpoint, so the loops end by themselves.
pub struct Traffic {
    started: Instant,
    control: LoopControl,
    removed_at: Mutex<Option<Instant>>,
    keepalive: Option<JoinHandle<LoopReport>>,
    one_shot: Option<JoinHandle<LoopReport>>,
    slow: Option<JoinHandle<Slow>>,
    slow_began: mpsc::Receiver<Instant>,
}

impl Traffic {
    /// Nothing yet: name the clients, then [`TrafficPlan::start`].
    pub fn to(addr: SocketAddr) -> TrafficPlan {
        TrafficPlan {
            addr,
            keepalive: 0,
            pause: Duration::from_millis(20),
            one_shot: false,
            slow: None,
            limit: Duration::from_secs(20),
        }
    }

    /// What a Service does once the pod is no longer an endpoint: no new connection reaches
    /// this address. The connection-per-request client stops; a keep-alive client goes on on
    /// its established connection and leaves (counted as moved) once it needs a new one.
    pub fn remove_endpoint(&self) {
        self.removed_at.lock().unwrap().get_or_insert_with(Instant::now);
        self.control.remove_endpoint();
    }

    /// The endpoint removal of a pod being terminated, timed from the supervisor's events: once
    /// `log` says the drain began (`unready`), [`ENDPOINT_REMOVAL`] later. The propagation delay
    /// must outlast it by [`REMOVAL_MARGIN`]; [`crate::Log::assert_drain_under_load`] checks
    /// afterwards that SIGQUIT came no sooner than the delay.
    pub fn remove_endpoint_once_unready(&self, log: &Log, delay: Duration) {
        assert!(
            delay >= ENDPOINT_REMOVAL + REMOVAL_MARGIN,
            "a {delay:?} propagation delay leaves too little margin after the endpoint removal"
        );
        let (_, unready) = log.wait_phase_arrival("unready", Duration::from_secs(10));
        std::thread::sleep((unready + ENDPOINT_REMOVAL).saturating_duration_since(Instant::now()));
        self.remove_endpoint();
    }

    /// Waits until the clients have had `n` successful responses, together.
    pub fn wait_served(&self, n: usize) {
        crate::wait_until(
            &format!("{n} responses to the clients"),
            Duration::from_secs(10),
            || self.control.served.load(Ordering::Relaxed) >= n,
        );
    }

    /// Waits until the slow download's response has begun: it is in flight on a worker. Returns
    /// when it began.
    pub fn wait_slow_in_flight(&self) -> Instant {
        assert!(self.slow.is_some(), "no slow download was planned");
        self.slow_began
            .recv_timeout(Duration::from_secs(5))
            .expect("the slow download's response began within 5 s")
    }

    /// Removes the endpoint, if that was not done yet, and waits for every client to end.
    pub fn finish(mut self) -> TrafficReport {
        self.remove_endpoint();
        let join =
            |thread: Option<JoinHandle<LoopReport>>| thread.map(|t| t.join().unwrap()).unwrap_or_default();
        let keepalive = join(self.keepalive.take());
        let one_shot = join(self.one_shot.take());
        let slow = self.slow.take().map(|thread| thread.join().unwrap());
        TrafficReport {
            started: self.started,
            endpoint_removed: *self.removed_at.lock().unwrap(),
            keepalive,
            one_shot,
            slow,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.control.remove_endpoint();
    }
}

/// The slow download's result, when its response began (if it did) and when it ended.
#[derive(Debug)]
pub struct Slow {
    pub path: String,
    pub result: Result<Reply, String>,
    pub began: Option<Instant>,
    pub at: Instant,
}

impl Slow {
    pub fn ok(&self) -> bool {
        self.result.as_ref().is_ok_and(|r| r.status == 200)
    }

    /// Asserts that the download was whole, of `len` bytes, and was in flight when `event`
    /// arrived (its response had begun, its end was still to come).
    #[track_caller]
    pub fn assert_whole_across(&self, len: usize, event: &str, event_seen: Instant) {
        let reply = self
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.path));
        assert_eq!(
            (reply.status.as_u16(), reply.body_len),
            (200, len),
            "GET {}",
            self.path
        );
        assert!(
            self.began.is_some_and(|b| b < event_seen) && self.at > event_seen,
            "GET {} was not in flight across {event}: began {:?}, ended {:?} after it",
            self.path,
            self.began.map(|b| event_seen.saturating_duration_since(b)),
            self.at.saturating_duration_since(event_seen)
        );
    }
}

/// What the clients saw.
#[derive(Debug)]
pub struct TrafficReport {
    pub started: Instant,
    /// When the endpoint was removed, if it was before [`Traffic::finish`].
    pub endpoint_removed: Option<Instant>,
    /// The keep-alive clients, together; empty when there were none.
    pub keepalive: LoopReport,
    /// The connection-per-request client; empty when there was none.
    pub one_shot: LoopReport,
    pub slow: Option<Slow>,
}

/// Which client a failure happened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A keep-alive client; `reused` when the request went out on a connection that had
    /// already served one (the keep-alive race).
    KeepAlive {
        reused: bool,
    },
    OneShot,
    Slow,
}

#[derive(Debug, Clone)]
pub struct TrafficFailure {
    pub client: Client,
    /// When it happened, from the start of the traffic.
    pub after: Duration,
    pub error: String,
}

impl fmt::Display for TrafficFailure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let client = match self.client {
            Client::KeepAlive { reused: true } => "keep-alive, reused connection",
            Client::KeepAlive { reused: false } => "keep-alive, new connection",
            Client::OneShot => "connection per request",
            Client::Slow => "slow download",
        };
        write!(f, "{:>6} ms  {client}: {}", self.after.as_millis(), self.error)
    }
}

impl TrafficReport {
    /// Requests sent, answered or not (the slow download included).
    pub fn requests(&self) -> usize {
        let count = |r: &LoopReport| r.ok + r.errors.len();
        count(&self.keepalive) + count(&self.one_shot) + usize::from(self.slow.is_some())
    }

    /// Every failure, in the order they happened.
    pub fn failures(&self) -> Vec<TrafficFailure> {
        let after = |at: Instant| at.saturating_duration_since(self.started);
        let mut failures: Vec<TrafficFailure> = self
            .keepalive
            .errors
            .iter()
            .map(|f| TrafficFailure {
                client: Client::KeepAlive { reused: f.reused },
                after: after(f.at),
                error: f.error.clone(),
            })
            .chain(self.one_shot.errors.iter().map(|f| TrafficFailure {
                client: Client::OneShot,
                after: after(f.at),
                error: f.error.clone(),
            }))
            .collect();
        if let Some(slow) = self.slow.as_ref().filter(|s| !s.ok()) {
            let error = match &slow.result {
                Ok(reply) => format!("GET {}: status {}", slow.path, reply.status),
                Err(error) => format!("GET {}: {error}", slow.path),
            };
            failures.push(TrafficFailure {
                client: Client::Slow,
                after: after(slow.at),
                error,
            });
        }
        failures.sort_by_key(|f| f.after);
        failures
    }

    /// Panics unless every request succeeded and the download in flight at SIGQUIT (as `log`
    /// saw it) arrived whole: `slow_secs` of it, at [`crate::SLOW_RATE`].
    #[track_caller]
    pub fn assert_drained_whole(&self, log: &Log, slow_secs: usize) {
        self.assert_no_failures();
        let quit = log.phase_seen_at("quitting").expect("a SIGQUIT in the drain");
        let slow = self.slow.as_ref().expect("a download beside the load");
        slow.assert_whole_across(slow_secs * crate::SLOW_RATE, "SIGQUIT", quit);
    }

    /// Panics unless every request succeeded, listing every failure.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        let failures = self.failures();
        if failures.is_empty() {
            return;
        }
        let list: Vec<String> = failures.iter().map(ToString::to_string).collect();
        let removed = match self.endpoint_removed {
            Some(at) => format!("{} ms", at.saturating_duration_since(self.started).as_millis()),
            None => "at the end".into(),
        };
        panic!(
            "{} of {} requests failed (ms from the start of the traffic):\n{}\nendpoint removed: {removed}\nkeep-alive: {}\nconnection per request: {}",
            failures.len(),
            self.requests(),
            list.join("\n"),
            counts(&self.keepalive),
            counts(&self.one_shot)
        );
    }
}

fn counts(r: &LoopReport) -> String {
    format!(
        "{} ok, {} failed, {} told to close, {} connections, {} moved",
        r.ok,
        r.errors.len(),
        r.told_to_close,
        r.connections,
        r.moved
    )
}
