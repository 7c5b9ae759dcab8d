//! Client traffic through a drain or a reload: keep-alive clients, a client that opens a new
//! connection per request and, optionally, a slow download, all against one address, then one
//! report of what they saw.
//!
//! ```ignore
//! let traffic = Traffic::to(site.addr()).keepalive(8).one_shot().start();
//! supervisor.signal(SIGTERM);
//! traffic.remove_endpoint(); // the Service stops sending new connections here
//! let report = traffic.finish();
//! report.assert_no_failures();
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{self, LoopReport, Reply};

/// What to start: see [`Traffic::to`].
#[must_use = "nothing runs until start()"]
pub struct TrafficPlan {
    addr: SocketAddr,
    keepalive: usize,
    pause: Duration,
    one_shot: bool,
    slow: Option<String>,
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
        self.slow = Some(path.to_owned());
        self
    }

    /// How long the loops run at most, if the endpoint is never removed; 20 s unless set.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    pub fn start(self) -> Traffic {
        let started = Instant::now();
        let endpoint_removed = Arc::new(AtomicBool::new(false));
        let keepalive = (self.keepalive > 0).then(|| {
            http::keepalive_loop(
                self.addr,
                self.keepalive,
                self.pause,
                endpoint_removed.clone(),
                self.limit,
            )
        });
        let one_shot = self
            .one_shot
            .then(|| http::close_loop(self.addr, endpoint_removed.clone(), self.limit));
        let slow = self.slow.map(|path| {
            let addr = self.addr;
            std::thread::spawn(move || {
                let result = http::get(addr, &path);
                Slow {
                    path,
                    result,
                    at: Instant::now(),
                }
            })
        });
        Traffic {
            started,
            endpoint_removed,
            keepalive,
            one_shot,
            slow,
        }
    }
}

/// Client loops running against one address. Dropped without [`Traffic::finish`] (a test that
/// failed), it removes the endpoint, so the loops end by themselves.
pub struct Traffic {
    started: Instant,
    endpoint_removed: Arc<AtomicBool>,
    keepalive: Option<JoinHandle<LoopReport>>,
    one_shot: Option<JoinHandle<LoopReport>>,
    slow: Option<JoinHandle<Slow>>,
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
        self.endpoint_removed.store(true, Ordering::Relaxed);
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
            keepalive,
            one_shot,
            slow,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.remove_endpoint();
    }
}

/// The slow download's result, and when it ended.
#[derive(Debug)]
pub struct Slow {
    pub path: String,
    pub result: Result<Reply, String>,
    pub at: Instant,
}

impl Slow {
    pub fn ok(&self) -> bool {
        self.result.as_ref().is_ok_and(|r| r.status == 200)
    }
}

/// What the clients saw.
#[derive(Debug)]
pub struct TrafficReport {
    pub started: Instant,
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

    /// Panics unless every request succeeded, listing every failure.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        let failures = self.failures();
        if failures.is_empty() {
            return;
        }
        let list: Vec<String> = failures.iter().map(ToString::to_string).collect();
        panic!(
            "{} of {} requests failed (ms from the start of the traffic):\n{}\nkeep-alive: {}\nconnection per request: {}",
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
