//! The health endpoint: `/healthz` for liveness, `/readyz` for readiness, `/metrics` for
//! Prometheus.
//!
//! Readiness fails from the first instant of a drain, so the kubelet's own probe removes the pod
//! from the Service too, in case the endpoint controller is slow.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::surfaces::live::Live;

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

pub async fn serve(listener: std::net::TcpListener, state: Arc<Live>) {
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
