//! The health endpoint: `/healthz` for liveness, `/readyz` for readiness, `/metrics` for
//! Prometheus.
//!
//! Readiness fails from the first instant of a drain, so the kubelet's own probe removes the pod
//! from the Service too, in case the endpoint controller is slow.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::error::Error;
use crate::surfaces::live::Live;

/// Binds before nginx starts, so a taken port stops start-up with nothing left behind.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::HealthListen { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::HealthListen { addr, source })?;
    // std's backlog is 128: a client opening connections faster than they are accepted would
    // fill it and the kubelet's SYN would be dropped, its retry a second later too late for
    // the probe. The kernel caps this at net.core.somaxconn.
    rustix::net::listen(&listener, LISTEN_BACKLOG).map_err(|err| Error::HealthListen {
        addr,
        source: err.into(),
    })?;
    Ok(listener)
}

/// Connections waiting to be accepted cost the kernel's memory, not our file descriptors.
const LISTEN_BACKLOG: i32 = 4096;
/// The most connections held at once: enough that a flood of idle ones always has an oldest to
/// give up for the next probe, no more than a quarter of the supervisor's file descriptors (see
/// [`connection_cap`]).
const MOST_CONNECTIONS: usize = 512;
const LEAST_CONNECTIONS: usize = 16;
/// A probe sends its request at once; a connection that has not sent a whole request head by
/// then is idle or slow on purpose, and is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection's whole life, whatever it does (a client that never reads its response): a
/// probe takes milliseconds, a scrape of /metrics a few.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The connections the listener may hold for an open-file limit: the drain's pidfds and
/// sockets, reloads' pipes and the control socket come first, so the listener takes a quarter
/// at most.
pub fn connection_cap(open_files_limit: u64) -> usize {
    usize::try_from(open_files_limit / 4)
        .unwrap_or(usize::MAX)
        .clamp(LEAST_CONNECTIONS, MOST_CONNECTIONS)
}

fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _hard)| soft)
        .unwrap_or(1024)
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Open(VecDeque<Connection>);

struct Connection {
    task: AbortHandle,
    /// Whether its request head has arrived: until then it is only holding a slot.
    asked: Arc<AtomicBool>,
}

impl Open {
    fn forget_closed(&mut self) {
        self.0.retain(|conn| !conn.task.is_finished());
    }

    /// Closes the connection that has waited longest without sending a request, or, when
    /// every one is being answered, the oldest: the next probe is never refused for them.
    fn close_oldest_idle(&mut self) {
        let at = self
            .0
            .iter()
            .position(|conn| !conn.asked.load(Ordering::Relaxed))
            .unwrap_or(0);
        if let Some(conn) = self.0.remove(at) {
            conn.task.abort();
        }
    }
}

pub async fn serve(listener: std::net::TcpListener, state: Arc<Live>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => return tracing::error!(%err, "health listener unusable"),
    };
    let slots = Arc::new(Semaphore::new(connection_cap(open_files_limit())));
    let mut open = Open::default();
    loop {
        // Accepting never waits for a slot: the kubelet's probe must not queue behind idle
        // sockets in the kernel's backlog.
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        open.forget_closed();
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                open.close_oldest_idle();
                // The closed connection's task gives its slot back as soon as it is dropped,
                // which this wait lets the runtime do; the others are bounded by their timeouts.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                slot
            }
        };
        let asked = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(answer_connection(stream, state.clone(), asked.clone(), slot));
        open.0.push_back(Connection {
            task: task.abort_handle(),
            asked,
        });
    }
}

/// One request per connection (probes open one each): no idle keep-alive connection to hold.
async fn answer_connection(
    stream: TcpStream,
    state: Arc<Live>,
    asked: Arc<AtomicBool>,
    _slot: OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        asked.store(true, Ordering::Relaxed);
        answer(req, state.clone())
    });
    let connection = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        // hyper's least: a probe's request is a few hundred bytes.
        .max_buf_size(8192)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
}

async fn answer(req: Request<Incoming>, state: Arc<Live>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") if state.live() => (StatusCode::OK, "ok\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "nginx is not running\n".to_owned(),
        ),
        (&Method::GET | &Method::HEAD, "/readyz") if state.ready() => (StatusCode::OK, "ready\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", state.phase()),
        ),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            content_type = crate::surfaces::metrics::CONTENT_TYPE;
            // /proc reads: off the thread that handles signals.
            let state = state.clone();
            match tokio::task::spawn_blocking(move || state.metrics_text()).await {
                Ok(text) => (StatusCode::OK, text),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics unavailable\n".to_owned(),
                ),
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_takes_a_quarter_of_the_open_file_limit_within_bounds() {
        for (limit, cap) in [
            (64, 16),
            (256, 64),
            (1024, 256),
            (4096, 512),
            (1 << 20, 512),
            (u64::MAX, 512),
        ] {
            assert_eq!(connection_cap(limit), cap, "{limit}");
        }
    }
}
