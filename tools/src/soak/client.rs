//! The load: a fixed number of workers, each with one HTTP/1.1 connection at a time that it
//! opens, reuses and drops itself (hyper's connection API, no pool), so that every request is
//! known to have gone out on a new or a reused connection, and none is ever retried.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::classify::{Failure, Seen, connect_failure, request_failure};
use super::first_field;
use super::mix::PathMix;

/// Where the load goes and how.
#[derive(Debug, Clone)]
pub struct Load {
    pub addr: SocketAddr,
    /// The Host header.
    pub host: String,
    pub paths: PathMix,
    pub concurrency: usize,
    pub reuse: Reuse,
    /// Requests per second over all workers; as fast as the server answers when unset.
    pub rate: Option<f64>,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    /// Stop starting requests after this long.
    pub duration: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// HTTPS: the TLS client and the server's name; plain HTTP when `None`.
    pub tls: Option<super::tls::Tls>,
    /// Bind each connection's local port before connecting: a connection reset the moment it
    /// is made (a proxy with nowhere to send it) has no port left to read afterwards, and
    /// `rehearse` traces every failure to a pod by its port.
    pub bind_first: bool,
}

/// How the load uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A new connection for every request, which asks `Connection: close`.
    Never,
    /// HTTP/1.1 keep-alive; a `close` in any `Connection` field of a response ends the
    /// connection after it, as hyper, curl and browsers read it.
    KeepAlive,
    /// Keep-alive where only the first `Connection` field counts, as in Python's http.client
    /// (urllib3, requests): see [`super::first_field`].
    FirstField,
}

impl Reuse {
    /// How reports name it.
    pub fn describe(self) -> &'static str {
        match self {
            Reuse::Never => "a new connection per request",
            Reuse::KeepAlive => "keep-alive",
            Reuse::FirstField => "keep-alive, first Connection field only",
        }
    }
}

/// One request as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// When the request started, from the start of the load.
    pub at: Duration,
    pub latency: Duration,
    pub failure: Option<Failure>,
    /// It went out on a connection that had carried an earlier request.
    pub reused: bool,
    /// The HTTP status, 0 when there was none.
    pub status: u16,
    /// Index into the path mix.
    pub path: u8,
    /// The client's port of the connection the request went out on; 0 when none was made.
    /// With the connection log of a proxy in front, it tells which backend failed it.
    pub port: u16,
}

/// Live counters for a progress line, and the switch that ends the load early.
#[derive(Debug, Default)]
pub struct Progress {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    stop: AtomicBool,
    /// Wakes workers that wait for their rate slot.
    stopped: tokio::sync::Notify,
    slots: AtomicU64,
}

impl Progress {
    /// Workers start no new request; those in flight finish (within the response timeout).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stopped.notify_waiters();
    }

    fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A worker whose request fails without any response (refused, reset, timed out) waits this
/// long before its next one, so that a target that is down is not hammered in a tight loop.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(10);

/// Runs the load to its end and returns every request, ordered by start.
///
/// The workers are spread over one thread per core, each with a single-threaded runtime of its
/// own, like wrk's threads: no work stealing, no task crossing threads.
pub async fn run(load: Arc<Load>, start: Instant, progress: Arc<Progress>) -> Vec<Record> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(load.concurrency.max(1));
    let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
    for thread in 0..threads {
        let ids: Vec<u64> = (thread..load.concurrency.max(1))
            .step_by(threads)
            .map(|id| id as u64)
            .collect();
        let (load, progress, done) = (load.clone(), progress.clone(), done.clone());
        std::thread::spawn(move || {
            let records = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(async {
                    let workers: Vec<_> = ids
                        .into_iter()
                        .map(|id| {
                            // The load is this thread's only work: coop budgeting would only
                            // add bookkeeping to every poll.
                            let work = worker(id, load.clone(), start, progress.clone());
                            tokio::spawn(tokio::task::coop::unconstrained(work))
                        })
                        .collect();
                    let mut records = Vec::new();
                    for worker in workers {
                        records.extend(worker.await.expect("a load worker panicked"));
                    }
                    records
                }),
                Err(e) => panic!("cannot start a load thread's runtime: {e}"),
            };
            let _ = done.send(records);
        });
    }
    drop(done);
    let mut records = Vec::new();
    let mut parts = 0;
    while let Some(part) = finished.recv().await {
        parts += 1;
        records.extend(part);
    }
    // Never a report that silently lacks a thread's requests.
    assert_eq!(
        parts, threads,
        "a load thread failed: its requests would be missing"
    );
    records.sort_by_key(|r| r.at);
    records
}

async fn worker(id: u64, load: Arc<Load>, start: Instant, progress: Arc<Progress>) -> Vec<Record> {
    let mut records = Vec::new();
    let mut connection: Option<Connection> = None;
    let mut first_field_connection: Option<first_field::Connection> = None;
    let mut pick = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let end = start + load.duration;
    let prepared = Prepared::new(&load);
    loop {
        let now = Instant::now();
        if progress.is_stopped() || now >= end {
            break;
        }
        // The shared count of requests started, only where a bound or a rate needs it.
        let slot = if load.requests.is_some() || load.rate.is_some() {
            progress.slots.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        if load.requests.is_some_and(|n| slot >= n) {
            break;
        }
        if let Some(rate) = load.rate {
            let due = start + Duration::from_secs_f64(slot as f64 / rate);
            if due >= end {
                break;
            }
            let stopped = progress.stopped.notified();
            if progress.is_stopped() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = stopped => break,
            }
        }
        let path = load.paths.pick(&mut pick);
        let began = if load.rate.is_some() { Instant::now() } else { now };
        let deadline = (began + load.response_timeout).into();
        let mut port = 0;
        let (outcome, reused) = match load.reuse {
            Reuse::FirstField => {
                first_field::request(
                    &load,
                    &prepared.raw[path],
                    &mut first_field_connection,
                    deadline,
                    &mut port,
                )
                .await
            }
            Reuse::Never | Reuse::KeepAlive => {
                request(&load, &prepared, &mut connection, path, deadline, &mut port).await
            }
        };
        let (status, failure) = match outcome {
            Ok(status) if status >= 500 => (status, Some(Failure::Http5xx)),
            Ok(status) => (status, None),
            Err(failure) => (0, Some(failure)),
        };
        records.push(Record {
            at: began - start,
            latency: began.elapsed(),
            failure,
            reused,
            status,
            path: path as u8,
            port,
        });
        progress.requests.fetch_add(1, Ordering::Relaxed);
        if failure.is_some() {
            progress.failures.fetch_add(1, Ordering::Relaxed);
            if status == 0 {
                connection = None;
                tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
            }
        }
    }
    records
}

/// One GET of `path` on a new connection: the status, or how it failed. For readiness checks,
/// where a successful connect proves little (`nginx -t` listens for a moment, for one).
pub async fn probe(
    addr: SocketAddr,
    path: &str,
    tls: Option<super::tls::Tls>,
    timeout: Duration,
) -> Result<u16, Failure> {
    let load = Load {
        addr,
        host: addr.to_string(),
        paths: PathMix::single(path),
        concurrency: 1,
        reuse: Reuse::Never,
        rate: None,
        requests: Some(1),
        duration: timeout,
        connect_timeout: timeout,
        response_timeout: timeout,
        tls,
        bind_first: false,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    request(&load, &Prepared::new(&load), &mut None, 0, deadline, &mut 0)
        .await
        .0
}

/// One request: on the worker's open connection when it is still usable, else on a new one.
/// Returns the status or the failure, and whether the connection was reused; `port` gets the
/// connection's local port.
async fn request(
    load: &Load,
    prepared: &Prepared,
    connection: &mut Option<Connection>,
    path: usize,
    deadline: tokio::time::Instant,
    port: &mut u16,
) -> (Result<u16, Failure>, bool) {
    // At most twice: a reused connection that turns out closed before the request was written
    // gives way to a new one. Nothing was sent, so that is not a retry.
    for _ in 0..2 {
        let reused = connection.is_some();
        // A connection the server closed while idle is dropped here when hyper has seen the
        // close; if the close comes later, the request comes back unsent from try_send_request.
        if let Some(open) = connection.as_mut() {
            let usable = open.driver.connection.is_some()
                && (open.sender.is_ready() || driven(&mut open.driver, open.sender.ready()).await.is_ok());
            if !usable {
                *connection = None;
                continue;
            }
        }
        if connection.is_none() {
            match Connection::open(load, port).await {
                Ok(open) => *connection = Some(open),
                Err(failure) => return (Err(failure), false),
            }
        }
        let open = connection.as_mut().expect("opened above");
        *port = open.port;
        let received_before = open.received.load(Ordering::Relaxed);
        let keepalive = load.reuse != Reuse::Never;
        let request = prepared.request(path, keepalive);
        let sender = &mut open.sender;
        let exchange = async move {
            let response = sender
                .try_send_request(request)
                .await
                .map_err(|mut e| Exchange::Send {
                    unsent: e.take_message().is_some(),
                    error: e.into_error(),
                })?;
            let status = response.status().as_u16();
            let server_closes = says_close(response.headers());
            read_body(response.into_body()).await.map_err(Exchange::Body)?;
            Ok((status, server_closes))
        };
        let done = tokio::time::timeout_at(deadline, driven(&mut open.driver, exchange)).await;
        let outcome = match done {
            Ok(Ok((status, server_closes))) => {
                if server_closes || !keepalive {
                    *connection = None;
                }
                return (Ok(status), reused);
            }
            Err(_) => Failure::Timeout,
            Ok(Err(Exchange::Send { unsent, error })) => {
                if reused && unsent {
                    *connection = None;
                    continue;
                }
                let started = open.received.load(Ordering::Relaxed) > received_before;
                classify(&error, started, reused)
            }
            Ok(Err(Exchange::Body(error))) => classify(&error, true, reused),
        };
        *connection = None;
        return (Err(outcome), reused);
    }
    unreachable!("the second attempt is on a new connection, which never hands a request back unsent")
}

/// A `close` token in any `Connection` field. nginx sends its own `keep-alive` field first
/// and a config's `add_header Connection close` after it: the first value alone would miss it.
/// hyper (1.12) closes on such a response too; this keeps the decision ours whatever its version.
fn says_close(headers: &hyper::HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// What every request shares, parsed once per worker instead of once per request.
struct Prepared {
    uris: Vec<Uri>,
    host: HeaderValue,
    /// The requests as bytes, for the first-field mode, which writes them itself.
    raw: Vec<Vec<u8>>,
}

impl Prepared {
    fn new(load: &Load) -> Self {
        Self {
            uris: (0..load.paths.len())
                .map(|i| {
                    load.paths
                        .path(i)
                        .parse()
                        .unwrap_or_else(|_| Uri::from_static("/"))
                })
                .collect(),
            host: HeaderValue::from_str(&load.host).unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            raw: (0..load.paths.len())
                .map(|i| {
                    format!(
                        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
                        load.paths.path(i),
                        load.host
                    )
                    .into_bytes()
                })
                .collect(),
        }
    }

    fn request(&self, path: usize, keepalive: bool) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.uris[path].clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        if !keepalive {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        request
    }
}

/// Where an exchange failed: sending (hyper may hand back a request it never wrote), or
/// reading the body.
enum Exchange {
    Send { unsent: bool, error: hyper::Error },
    Body(hyper::Error),
}

/// Reads the body to its end, dropping each frame as it comes.
async fn read_body(mut body: Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

fn classify(error: &hyper::Error, response_started: bool, reused: bool) -> Failure {
    let mut io = None;
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(e) = cause.downcast_ref::<io::Error>() {
            io = Some(e.kind());
            break;
        }
        source = cause.source();
    }
    request_failure(Seen {
        io,
        parse_error: error.is_parse() || error.is_parse_status() || error.is_parse_too_large(),
        response_started,
        reused,
    })
}

/// Polls `work` and, beside it in the same task, the connection that carries it. Driving the
/// connection here instead of in a task of its own saves two task wake-ups per request, which
/// is most of what a load generator spends.
async fn driven<T>(driver: &mut Driver, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(connection) = driver.connection.as_mut()
            && connection.as_mut().poll(cx).is_ready()
        {
            // The connection has ended. Dropping it drops its ends of the response channels,
            // which settles whatever `work` still waits for.
            driver.connection = None;
        }
        // What the connection just read may have completed `work`: look again now rather
        // than after a trip through the scheduler.
        work.as_mut().poll(cx)
    })
    .await
}

type HyperConnection = hyper::client::conn::http1::Connection<TokioIo<Metered>, Empty<Bytes>>;

struct Driver {
    /// None once the connection has ended.
    connection: Option<Pin<Box<HyperConnection>>>,
}

struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    driver: Driver,
    /// Bytes read from the server so far: tells "before any response byte" from "cut off".
    received: Arc<AtomicU64>,
    port: u16,
}

impl Connection {
    async fn open(load: &Load, port: &mut u16) -> Result<Self, Failure> {
        let (metered, received) = Metered::open(load, port).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(metered))
            .await
            .map_err(|_| Failure::ConnectError)?;
        let driver = Driver {
            connection: Some(Box::pin(connection)),
        };
        Ok(Self {
            sender,
            driver,
            received,
            port: *port,
        })
    }
}

/// A handshake that failed: cut by the server (as any new connection can be), or refused by
/// TLS itself (a certificate not trusted, no common protocol).
fn tls_failure(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            Failure::ResetNew
        }
        io::ErrorKind::UnexpectedEof => Failure::Eof,
        _ => Failure::Tls,
    }
}

impl Metered {
    /// Connects (and for https shakes hands) within the connect timeout. Returns the stream
    /// and its count of bytes read; `port` gets the local port once connected, so that a failed
    /// handshake too can be traced.
    pub(super) async fn open(load: &Load, port: &mut u16) -> Result<(Self, Arc<AtomicU64>), Failure> {
        let connect = async {
            if !load.bind_first {
                return TcpStream::connect(load.addr).await;
            }
            let (socket, any) = match load.addr {
                SocketAddr::V4(_) => (tokio::net::TcpSocket::new_v4()?, Ipv4Addr::UNSPECIFIED.into()),
                SocketAddr::V6(_) => (tokio::net::TcpSocket::new_v6()?, Ipv6Addr::UNSPECIFIED.into()),
            };
            socket.bind(SocketAddr::new(any, 0))?;
            let bound = socket.local_addr()?.port();
            let connected = socket.connect(load.addr).await;
            // Only a connection that was made can be traced: a reset means the handshake was
            // done and the other end cut it at once; a refusal or a timeout leaves 0.
            if connected.as_ref().map_or_else(
                |e| {
                    matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    )
                },
                |_| true,
            ) {
                *port = bound;
            }
            connected
        };
        let stream = match tokio::time::timeout(load.connect_timeout, connect).await {
            Err(_) => return Err(Failure::ConnectTimeout),
            Ok(Err(e)) => return Err(connect_failure(e.kind())),
            Ok(Ok(stream)) => stream,
        };
        if !load.bind_first {
            *port = stream.local_addr().map_or(0, |a| a.port());
        }
        let _ = stream.set_nodelay(true);
        let stream = match &load.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let handshake = connector.connect(tls.server_name.clone(), stream);
                match tokio::time::timeout(load.connect_timeout, handshake).await {
                    Err(_) => return Err(Failure::ConnectTimeout),
                    Ok(Err(e)) => return Err(tls_failure(&e)),
                    Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                }
            }
        };
        let received = Arc::new(AtomicU64::new(0));
        let metered = Metered {
            stream,
            received: received.clone(),
        };
        Ok((metered, received))
    }

    /// The TCP connection underneath, TLS or not.
    pub(super) fn tcp(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(stream) => stream,
            Stream::Tls(stream) => stream.get_ref().0,
        }
    }
}

/// A connection to the server, with or without TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A stream that counts the bytes it reads (after TLS: response bytes, not records).
pub(super) struct Metered {
    stream: Stream,
    received: Arc<AtomicU64>,
}

impl Stream {
    fn pinned(&mut self) -> Pin<&mut (dyn AsyncReadWrite + Send)> {
        match self {
            Stream::Plain(stream) => Pin::new(stream),
            Stream::Tls(stream) => Pin::new(stream.as_mut()),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWrite for T {}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.stream.pinned().poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.received.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream.pinned().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.pinned().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.pinned().poll_shutdown(cx)
    }
}
