//! The health endpoint: `/healthz` for liveness, `/readyz` for readiness.
//!
//! Readiness fails from the first instant of a drain, so the kubelet's own probe removes the pod
//! from the Service too, in case the endpoint controller is slow.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;
use crate::nginx::tree::ProcessTable;
use crate::phase::Phase;

/// What the probes look at.
#[derive(Debug)]
pub struct HealthState {
    phase: watch::Receiver<Phase>,
    /// The nginx master's pid, 0 once it has exited.
    master: AtomicI32,
}

impl HealthState {
    pub fn new(phase: watch::Receiver<Phase>) -> Arc<Self> {
        Arc::new(Self {
            phase,
            master: AtomicI32::new(0),
        })
    }

    pub fn set_master(&self, pid: i32) {
        self.master.store(pid, Ordering::Relaxed);
    }

    fn live(&self) -> bool {
        self.master.load(Ordering::Relaxed) != 0
    }

    /// Ready when no drain has started and nginx serves: the master has started its workers,
    /// which it does only after it has bound every listening socket.
    fn ready(&self) -> bool {
        let master = self.master.load(Ordering::Relaxed);
        if *self.phase.borrow() != Phase::Serving || master == 0 {
            return false;
        }
        ProcessTable::read().is_ok_and(|table| table.children(master).next().is_some())
    }
}

/// Binds before nginx starts, so a taken port stops start-up with nothing left behind.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::HealthListen { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::HealthListen { addr, source })?;
    Ok(listener)
}

/// Probes are a few requests a second; more than this many connections at once is abuse, and
/// each would hold a file descriptor the drain may need.
const MAX_CONNECTIONS: usize = 32;
/// A probe that has not sent its request line by then is not a probe.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve(listener: std::net::TcpListener, state: Arc<HealthState>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => return tracing::error!(%err, "health listener unusable"),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: wait instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| answer(req, state.clone()));
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<HealthState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") if state.live() => (StatusCode::OK, "ok\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "nginx is not running\n".to_owned(),
        ),
        (&Method::GET | &Method::HEAD, "/readyz") if state.ready() => (StatusCode::OK, "ready\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", *state.phase.borrow()),
        ),
        _ => (StatusCode::NOT_FOUND, "try /healthz or /readyz\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    Ok(response)
}
