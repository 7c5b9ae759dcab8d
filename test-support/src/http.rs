//! HTTP clients for the tests, on hyper: one request per connection, and a keep-alive client that
//! behaves like a well-written one (it honours `Connection: close` and never retries).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONNECTION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// The server asked the client to close the connection.
    pub close: bool,
    pub body_len: usize,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One GET on a new connection; `Err` says what failed.
pub fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    get_observed(addr, path, || {})
}

/// [`get`], calling `began` once the response's head has arrived: from then on the request is
/// in flight on the server, its body still to come.
pub fn get_observed(addr: SocketAddr, path: &str, began: impl FnOnce()) -> Result<Reply, String> {
    runtime().block_on(async {
        let mut sender = connect(addr).await?;
        send_observed(&mut sender, addr, path, began).await
    })
}

/// Starts a GET in the background; the handle yields its result and when the first byte of the
/// body arrived.
pub fn get_in_background(addr: SocketAddr, path: &str) -> std::thread::JoinHandle<Result<Reply, String>> {
    let path = path.to_owned();
    std::thread::spawn(move || get(addr, &path))
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, addr: SocketAddr, path: &str) -> Result<Reply, String> {
    send_observed(sender, addr, path, || {}).await
}

async fn send_observed(
    sender: &mut SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    began: impl FnOnce(),
) -> Result<Reply, String> {
    let request = Request::get(path)
        .header(HOST, addr.to_string())
        .body(Empty::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e:?}"))?;
    began();
    let status = response.status();
    let close = response.headers().get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?;
    Ok(Reply {
        status,
        close,
        body_len: body.to_bytes().len(),
    })
}

/// What a client loop saw.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Instant,
    /// The request went out on a connection that had already served one: the keep-alive race.
    pub reused: bool,
    pub error: String,
}

#[derive(Debug, Default, Clone)]
pub struct LoopReport {
    pub ok: usize,
    pub errors: Vec<Failure>,
    /// Responses that told the client to close; it reconnected for the next request.
    pub told_to_close: usize,
    /// When each of those responses arrived.
    pub closes: Vec<Instant>,
    pub connections: usize,
    /// Clients that needed a new connection after the endpoint was removed: a Service would
    /// send them to another pod.
    pub moved: usize,
}

/// What client loops share with the test while they run.
#[derive(Debug, Clone, Default)]
pub struct LoopControl {
    /// The Service no longer sends new connections to the address (see [`keepalive_loop`]).
    pub endpoint_removed: Arc<AtomicBool>,
    /// Successful responses so far, over every loop given this control.
    pub served: Arc<AtomicUsize>,
}

impl LoopControl {
    pub fn remove_endpoint(&self) {
        self.endpoint_removed.store(true, Ordering::Relaxed);
    }

    fn removed(&self) -> bool {
        self.endpoint_removed.load(Ordering::Relaxed)
    }

    fn count_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// Keep-alive clients, `clients` of them, each sending a request every `pause` on its own reused
/// connection until `limit` passes. A failed request is recorded, never retried.
///
/// The control's `endpoint_removed` models the Service: once set, a client that needs a new
/// connection gets one to another pod (it stops, counted as moved), while established
/// connections go on being used, as kube-proxy keeps established flows on their backend.
pub fn keepalive_loop(
    addr: SocketAddr,
    clients: usize,
    pause: Duration,
    control: LoopControl,
    limit: Duration,
) -> std::thread::JoinHandle<LoopReport> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..clients {
                let control = control.clone();
                tasks.spawn(async move {
                    let mut report = LoopReport::default();
                    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
                    let mut reused = false;
                    let deadline = Instant::now() + limit;
                    while Instant::now() < deadline {
                        // A connection the server closed while idle is gone before we write: a
                        // client notices that and reconnects, which is not a failure.
                        if sender.as_ref().is_none_or(|s| s.is_closed()) {
                            if control.removed() {
                                report.moved += 1;
                                break;
                            }
                            match connect(addr).await {
                                Ok(s) => {
                                    sender = Some(s);
                                    reused = false;
                                    report.connections += 1;
                                }
                                Err(error) => {
                                    report.errors.push(Failure {
                                        at: Instant::now(),
                                        reused: false,
                                        error,
                                    });
                                    tokio::time::sleep(pause).await;
                                    continue;
                                }
                            }
                        }
                        let conn = sender.as_mut().unwrap();
                        match send(conn, addr, "/").await {
                            Ok(reply) if reply.status == StatusCode::OK => {
                                report.ok += 1;
                                control.count_served();
                                reused = true;
                                if reply.close {
                                    report.told_to_close += 1;
                                    report.closes.push(Instant::now());
                                    sender = None;
                                }
                            }
                            Ok(reply) => {
                                let error = format!("status {}", reply.status);
                                report.errors.push(Failure {
                                    at: Instant::now(),
                                    reused,
                                    error,
                                });
                            }
                            Err(error) => {
                                report.errors.push(Failure {
                                    at: Instant::now(),
                                    reused,
                                    error,
                                });
                                sender = None;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    report
                });
            }
            let mut total = LoopReport::default();
            while let Some(report) = tasks.join_next().await {
                let report = report.unwrap();
                total.ok += report.ok;
                total.errors.extend(report.errors);
                total.told_to_close += report.told_to_close;
                total.closes.extend(report.closes);
                total.connections += report.connections;
                total.moved += report.moved;
            }
            total.closes.sort();
            total
        })
    })
}

/// One new connection per request, back to back, until the endpoint is removed (see
/// [`keepalive_loop`]) or `limit` passes.
pub fn close_loop(
    addr: SocketAddr,
    control: LoopControl,
    limit: Duration,
) -> std::thread::JoinHandle<LoopReport> {
    std::thread::spawn(move || {
        let mut report = LoopReport::default();
        let deadline = Instant::now() + limit;
        let rt = runtime();
        while !control.removed() && Instant::now() < deadline {
            let failure = |error| Failure {
                at: Instant::now(),
                reused: false,
                error,
            };
            match rt.block_on(async { send(&mut connect(addr).await?, addr, "/").await }) {
                Ok(reply) if reply.status == StatusCode::OK => {
                    report.ok += 1;
                    control.count_served();
                }
                Ok(reply) => report.errors.push(failure(format!("status {}", reply.status))),
                Err(e) => report.errors.push(failure(e)),
            }
            report.connections += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        report
    })
}
