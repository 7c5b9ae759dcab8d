//! Connections that are not short HTTP/1.1 requests, through a real drain under `run`: HTTP/2
//! over TLS and in clear text (h2c), HTTP/1.1 keep-alive over TLS, a WebSocket held open, and a
//! `stream {}` TCP proxy. What each client sees is asserted exactly: curl's result for every
//! transfer, the HTTP/2 frames nginx sends, and how a held connection ends (FIN or reset, when).

use test_support as common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{SLOW_RATE, Site, Supervisor, TempDir, TestCertificate, code, drain_args};
use serde_json::Value;

const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);

/// SIGQUIT 1 s after SIGTERM and escalation at 8 − 2 = 6 s, so `run` gives nginx
/// `worker_shutdown_timeout` 6 − 1 − 1 = 4 s (see `DrainPlan::worker_shutdown_timeout`).
const PLAN: &[&str] = &[
    "--grace-period",
    "8s",
    "--propagation-delay",
    "1s",
    "--safety-margin",
    "2s",
];
const DELAY: Duration = Duration::from_secs(1);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);
/// How far a close by nginx's shutdown timer may be from SIGQUIT + SHUTDOWN_TIMEOUT, measured
/// from the moment the test reads the `quitting` line.
const EARLY: Duration = Duration::from_millis(300);
const LATE: Duration = Duration::from_millis(700);
/// Requests for the slow path take this long: they start before SIGTERM and end after SIGQUIT,
/// well before the shutdown timeout.
const SLOW_SECS: usize = 3;

const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

// ---------------------------------------------------------------------------------------------
// The supervisor and its log.

fn start(site: &Site) -> Supervisor {
    let supervisor = Supervisor::start(&site.run_args(PLAN));
    supervisor.wait_serving(site);
    // The premise of every test here: nginx closes what is left itself, 4 s after SIGQUIT.
    let set = supervisor
        .log
        .events()
        .into_iter()
        .find_map(|e| e["worker_shutdown_timeout_ms"].as_u64());
    assert_eq!(
        set,
        Some(SHUTDOWN_TIMEOUT.as_millis() as u64),
        "run sets worker_shutdown_timeout: {:?}",
        supervisor.log.lines()
    );
    supervisor
}

/// Exit 0, no escalation, and how many connections nginx's shutdown timer closed.
fn assert_clean(supervisor: &Supervisor, status: std::process::ExitStatus, closed_by_timeout: u64) {
    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());
    let phases = supervisor.log.phases();
    assert!(
        !phases.iter().any(|p| p == "fast_shutdown" || p == "killing"),
        "{phases:?}"
    );
    let outcome = supervisor.log.drain_summary();
    assert_eq!(outcome["outcome"], "clean", "{outcome}");
    assert_eq!(outcome["killed"], 0, "{outcome}");
    assert_eq!(
        outcome["closed_by_shutdown_timeout"], closed_by_timeout,
        "{outcome}"
    );
}

/// Waits until nginx's workers hold at least `n` established connections.
fn wait_for_connections(supervisor: &Supervisor, n: usize) {
    common::wait_until(
        &format!("{n} connections on nginx's workers"),
        5 * SECONDS,
        || {
            nginx_graceful::nginx::connections::by_process(&supervisor.descendants())
                .iter()
                .map(|(_, c)| c)
                .sum::<usize>()
                >= n
        },
    );
}

// ---------------------------------------------------------------------------------------------
// curl, one result per transfer.

/// Every transfer's result, then its response header fields as JSON (`%{header_json}`, curl
/// 7.83 or later), then a line of its own.
const WRITE_OUT: &str = "transfer %{exitcode} %{http_version} %{http_code} %{num_connects} \
                         %{size_download} %{errormsg}\n%{header_json}\nend\n";

#[derive(Debug)]
struct Transfer {
    /// curl's exit code for this transfer: 16 and 92 are HTTP/2 framing and stream errors.
    exit_code: i32,
    version: String,
    status: u16,
    /// New connections this transfer opened: 0 when it reused or multiplexed on one.
    connects: u32,
    size: usize,
    error: String,
    headers: Value,
}

impl Transfer {
    fn has_connection_field(&self) -> bool {
        self.headers.get("connection").is_some()
    }

    fn says_close(&self) -> bool {
        self.headers["connection"].as_array().is_some_and(|v| {
            v.iter()
                .any(|v| v.as_str().is_some_and(|v| v.eq_ignore_ascii_case("close")))
        })
    }

    fn ok(&self, version: &str) -> bool {
        self.exit_code == 0 && self.status == 200 && self.version == version
    }
}

/// A curl process; killed on drop if it is still running.
struct Curl(Option<Child>);

impl Curl {
    fn start(options: &[&str], urls: &[String]) -> Self {
        let mut command = Command::new("curl");
        // --no-progress-meter: curl 7.88 draws the --parallel meter even with --silent.
        command
            .args([
                "--silent",
                "--show-error",
                "--no-progress-meter",
                "--max-time",
                "20",
            ])
            .args(["--write-out", WRITE_OUT])
            .args(options);
        for url in urls {
            command.arg(url).args(["--output", "/dev/null"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl on PATH (scripts/install-deps.sh)");
        Self(Some(child))
    }

    /// Waits for curl to exit; returns each transfer and when curl was seen to exit.
    fn finish(mut self) -> (Vec<Transfer>, Instant) {
        let output = self.0.take().unwrap().wait_with_output().unwrap();
        let done = Instant::now();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let transfers = parse_transfers(&stdout);
        assert!(
            !transfers.is_empty(),
            "curl wrote no result: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        (transfers, done)
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn curl(options: &[&str], urls: &[String]) -> Vec<Transfer> {
    Curl::start(options, urls).finish().0
}

fn parse_transfers(stdout: &str) -> Vec<Transfer> {
    let mut transfers = Vec::new();
    let mut lines = stdout.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("transfer ") else {
            continue;
        };
        let fields: Vec<&str> = rest.splitn(6, ' ').collect();
        let json: Vec<&str> = lines.by_ref().take_while(|l| *l != "end").collect();
        transfers.push(Transfer {
            exit_code: fields[0].parse().unwrap(),
            version: fields[1].to_owned(),
            status: fields[2].parse().unwrap(),
            connects: fields[3].parse().unwrap(),
            size: fields[4].parse().unwrap(),
            error: fields.get(5).unwrap_or(&"").to_string(),
            headers: serde_json::from_str(&json.join("\n"))
                .unwrap_or_else(|e| panic!("header_json: {e}: {json:?}")),
        });
    }
    transfers
}

// ---------------------------------------------------------------------------------------------
// TLS.

/// A site whose server block also listens with TLS (and `params`, like http2) on a port of its
/// own, with a certificate made for it: (the certificate's directory, the site, its https URL).
fn tls_site(params: &str) -> (TempDir, Site, String) {
    let dir = TempDir::new("tls");
    let cert = TestCertificate::make(&dir.0);
    let port = common::free_port();
    let listen = format!(
        "listen 127.0.0.1:{port} ssl {params}; ssl_certificate {}; ssl_certificate_key {};",
        cert.cert.display(),
        cert.key.display()
    );
    let site = Site::build(true, &listen);
    (dir, site, format!("https://127.0.0.1:{port}"))
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 frames, read raw, to see what nginx sends on SIGQUIT.

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

#[derive(Debug, Clone)]
struct Frame {
    at: Instant,
    kind: u8,
    flags: u8,
    stream: u32,
    len: usize,
    /// Kept for control frames only; DATA is counted, not kept.
    payload: Vec<u8>,
}

/// How a connection ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// An orderly close (FIN): read returned 0.
    Eof,
    /// RST: read failed with ECONNRESET.
    Reset,
    Other(String),
}

fn end_of(err: &std::io::Error) -> End {
    match err.kind() {
        ErrorKind::UnexpectedEof => End::Eof,
        ErrorKind::ConnectionReset => End::Reset,
        _ => End::Other(err.to_string()),
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut bytes = len.to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    bytes
}

/// One GET on stream 1 of a new h2c connection (prior knowledge), with windows so large that
/// flow control never holds nginx back; every frame nginx sends is recorded with its arrival
/// time, until the connection ends.
fn h2c_get(addr: SocketAddr, path: &str) -> JoinHandle<(Vec<Frame>, End)> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(20 * SECONDS)).unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE (0x4) at its maximum, and the connection window with it.
        out.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        out.extend(frame(
            WINDOW_UPDATE,
            0,
            0,
            &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
        ));
        // HPACK: :method GET and :scheme http from the static table; :path and :authority as
        // literals with an indexed name, without Huffman coding.
        let mut block = vec![0x82, 0x86];
        for (index, value) in [(4u8, path.as_str()), (1, &addr.to_string())] {
            block.extend([index, value.len() as u8]);
            block.extend(value.as_bytes());
        }
        out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block));
        conn.write_all(&out).unwrap();

        let mut frames = Vec::new();
        let deadline = Instant::now() + 30 * SECONDS;
        let end = loop {
            if Instant::now() > deadline {
                break End::Other("still open after 30 s".into());
            }
            let mut head = [0u8; 9];
            if let Err(err) = conn.read_exact(&mut head) {
                break end_of(&err);
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if let Err(err) = conn.read_exact(&mut payload) {
                break end_of(&err);
            }
            let (kind, flags) = (head[3], head[4]);
            if kind == SETTINGS && flags & ACK == 0 {
                conn.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
            }
            if kind == DATA {
                payload = Vec::new();
            }
            frames.push(Frame {
                at: Instant::now(),
                kind,
                flags,
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                len,
                payload,
            });
        };
        (frames, end)
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 clients that multiplex a batch of GETs on one connection.

/// What an HTTP/2 client saw for one request.
#[derive(Debug)]
struct H2Reply {
    /// curl's exit code and message (16 and 92 are HTTP/2 framing and stream errors), or
    /// hyper's error.
    error: Option<String>,
    version: String,
    status: u16,
    size: usize,
    /// A `Connection` field in the response: forbidden in HTTP/2.
    connection_field: bool,
}

impl H2Reply {
    fn ok(&self) -> bool {
        self.error.is_none() && self.status == 200 && self.version == "2"
    }
}

impl From<&Transfer> for H2Reply {
    fn from(t: &Transfer) -> Self {
        Self {
            error: (t.exit_code != 0).then(|| format!("curl exit {}: {}", t.exit_code, t.error)),
            version: t.version.clone(),
            status: t.status,
            size: t.size,
            connection_field: t.has_connection_field(),
        }
    }
}

enum H2Client<'a> {
    /// curl --parallel, over TLS (ALPN h2).
    Curl { options: &'a [&'a str], base: String },
    /// hyper's HTTP/2 client, h2c with prior knowledge: curl 7.88 fails every request after
    /// the first on a prior-knowledge connection (framing error 16), with or without a drain.
    Hyper(SocketAddr),
}

enum Pending {
    Curl(Curl),
    Hyper(JoinHandle<(Vec<H2Reply>, u32)>),
}

impl H2Client<'_> {
    /// Starts `n` GETs of `path` at once, on one connection.
    fn start(&self, path: &str, n: usize) -> Pending {
        match self {
            Self::Curl { options, base } => {
                let options: Vec<&str> = options.iter().copied().chain(["--parallel"]).collect();
                Pending::Curl(Curl::start(&options, &vec![format!("{base}{path}"); n]))
            }
            Self::Hyper(addr) => Pending::Hyper(hyper_h2c_batch(*addr, path.to_owned(), n)),
        }
    }

    fn batch(&self, path: &str, n: usize) -> (Vec<H2Reply>, u32) {
        let (replies, connections, _) = self.start(path, n).finish();
        (replies, connections)
    }
}

impl Pending {
    /// Every reply, the connections opened for them, and when the last one was seen to end.
    fn finish(self) -> (Vec<H2Reply>, u32, Instant) {
        match self {
            Self::Curl(curl) => {
                let (transfers, done) = curl.finish();
                let connections = transfers.iter().map(|t| t.connects).sum();
                (transfers.iter().map(H2Reply::from).collect(), connections, done)
            }
            Self::Hyper(thread) => {
                let (replies, connections) = thread.join().unwrap();
                (replies, connections, Instant::now())
            }
        }
    }
}

fn hyper_h2c_batch(addr: SocketAddr, path: String, n: usize) -> JoinHandle<(Vec<H2Reply>, u32)> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let failed = |error: String| H2Reply {
        error: Some(error),
        version: "0".into(),
        status: 0,
        size: 0,
        connection_field: false,
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let connected = async {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))
            };
            let (sender, conn) = match connected.await {
                Ok(pair) => pair,
                Err(error) => return ((0..n).map(|_| failed(error.clone())).collect(), 0),
            };
            tokio::spawn(conn);
            let requests: Vec<_> = (0..n)
                .map(|_| {
                    let mut sender = sender.clone();
                    let request = hyper::Request::get(format!("http://{addr}{path}"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    tokio::spawn(async move {
                        let response = sender
                            .send_request(request)
                            .await
                            .map_err(|e| format!("request: {e:?}"))?;
                        // In curl's spelling, as `%{http_version}` writes it.
                        let version = match response.version() {
                            hyper::Version::HTTP_2 => "2".to_owned(),
                            other => format!("{other:?}"),
                        };
                        let status = response.status().as_u16();
                        let connection_field = response.headers().contains_key(hyper::header::CONNECTION);
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e:?}"))?;
                        Ok::<_, String>(H2Reply {
                            error: None,
                            version,
                            status,
                            size: body.to_bytes().len(),
                            connection_field,
                        })
                    })
                })
                .collect();
            let mut replies = Vec::new();
            for request in requests {
                let reply = tokio::time::timeout(20 * SECONDS, request).await;
                replies.push(match reply {
                    Ok(Ok(Ok(reply))) => reply,
                    Ok(Ok(Err(error))) => failed(error),
                    Ok(Err(panic)) => failed(panic.to_string()),
                    Err(_) => failed("no reply within 20 s".into()),
                });
            }
            (replies, 1)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 through a drain: the same steps over TLS and over h2c.

struct Http2Case<'a> {
    h2: H2Client<'a>,
    /// The same server over HTTP/1.1 (curl options, base URL), to show that the drain snippet
    /// is active meanwhile.
    h1: &'a [&'a str],
    h1_base: String,
    /// An h2c address to watch the frames on.
    raw_h2c: Option<SocketAddr>,
}

fn http2_through_a_drain(site: &Site, case: Http2Case) {
    let mut supervisor = start(site);
    let h1 = || curl(case.h1, &[format!("{}/", case.h1_base)]);

    let (before, _) = case.h2.batch("/", 1);
    assert!(before[0].ok() && !before[0].connection_field, "{before:?}");
    let before = h1();
    assert!(before[0].ok("1.1") && !before[0].says_close(), "{before:?}");

    // Four slow streams on one connection, in flight across SIGQUIT.
    let slow_path = site.slow_path(SLOW_SECS);
    let slow = case.h2.start(&slow_path, 4);
    let raw = case.raw_h2c.map(|addr| h2c_get(addr, &slow_path));
    wait_for_connections(&supervisor, 1 + usize::from(raw.is_some()));

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);

    // New connections during the delay, stopped short of its end: the listeners close at
    // SIGQUIT, and a connect in that instant is refused by design (the delay exists for that).
    let mut rounds = 0;
    while signalled.elapsed() < DELAY - Duration::from_millis(300) && rounds < 100 {
        let (h2, connections) = case.h2.batch("/", 3);
        assert_eq!(h2.len(), 3, "{h2:?}");
        for reply in &h2 {
            assert!(reply.ok(), "an HTTP/2 request during the delay failed: {reply:?}");
            assert!(
                !reply.connection_field,
                "HTTP/2 with a Connection field: {reply:?}"
            );
        }
        assert_eq!(connections, 1, "multiplexed: {h2:?}");
        let h1 = h1();
        assert!(
            h1[0].ok("1.1") && h1[0].says_close(),
            "HTTP/1.1 on the same server is told to close: {h1:?}"
        );
        rounds += 1;
    }
    assert!(rounds >= 3, "only {rounds} rounds during the delay");

    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();

    let (slow, connections, done) = slow.finish();
    assert_eq!(slow.len(), 4, "{slow:?}");
    for reply in &slow {
        assert!(
            reply.ok() && reply.size == SLOW_SECS * SLOW_RATE,
            "a stream in flight at SIGQUIT did not finish: {reply:?}"
        );
        assert!(!reply.connection_field, "{reply:?}");
    }
    assert_eq!(connections, 1, "one connection: {slow:?}");
    assert!(
        done > quit_seen + SECONDS,
        "the streams were in flight for over a second after SIGQUIT"
    );

    if let Some(raw) = raw {
        let (frames, end) = raw.join().unwrap();
        let goaway = frames
            .iter()
            .position(|f| f.kind == GOAWAY)
            .unwrap_or_else(|| panic!("no GOAWAY: {frames:?}"));
        let g = &frames[goaway];
        // Last stream id 1 (the stream in flight is kept), error code NO_ERROR.
        assert_eq!(g.payload, [0, 0, 0, 1, 0, 0, 0, 0], "{g:?}");
        assert!(
            g.at > signalled + DELAY - Duration::from_millis(50) && g.at < quit_seen + LATE,
            "GOAWAY at SIGQUIT, not during the delay: {:?} after SIGTERM",
            g.at - signalled
        );
        assert_eq!(
            frames.iter().filter(|f| f.kind == GOAWAY).count(),
            1,
            "{frames:?}"
        );
        assert!(!frames.iter().any(|f| f.kind == RST_STREAM), "{frames:?}");
        let data: Vec<&Frame> = frames
            .iter()
            .filter(|f| f.kind == DATA && f.stream == 1)
            .collect();
        assert_eq!(data.iter().map(|f| f.len).sum::<usize>(), SLOW_SECS * SLOW_RATE);
        assert!(
            frames[goaway..].iter().any(|f| f.kind == DATA && f.len > 0),
            "the stream went on after GOAWAY"
        );
        assert!(data.last().unwrap().flags & END_STREAM != 0);
        assert!(
            frames.last().unwrap().kind == DATA,
            "nothing after the last DATA frame: {:?}",
            frames.last()
        );
        assert_eq!(end, End::Eof, "nginx closes the connection after its last stream");
    }

    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(
        signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT,
        "the drain ended with the streams, not at the shutdown timeout: {:?}",
        signalled.elapsed()
    );
    assert_clean(&supervisor, status, 0);
}

#[test]
fn http2_over_tls_streams_in_flight_finish_and_never_carry_a_connection_field() {
    let (_tls, site, base) = tls_site("http2");
    http2_through_a_drain(
        &site,
        Http2Case {
            h2: H2Client::Curl {
                options: &["--insecure", "--http2"],
                base: base.clone(),
            },
            h1: &["--insecure", "--http1.1"],
            h1_base: base,
            raw_h2c: None,
        },
    );
}

#[test]
fn http2_cleartext_gets_goaway_at_sigquit_and_streams_in_flight_finish() {
    let port = common::free_port();
    let site = Site::build(true, &format!("listen 127.0.0.1:{port} http2;"));
    let h2c = SocketAddr::from(([127, 0, 0, 1], port));
    // In nginx 1.22 an `http2` listener without TLS speaks HTTP/2 only: HTTP/1.1 goes to the
    // site's other port, same server block.
    http2_through_a_drain(
        &site,
        Http2Case {
            h2: H2Client::Hyper(h2c),
            h1: &["--http1.1"],
            h1_base: format!("http://{}", site.addr()),
            raw_h2c: Some(h2c),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 keep-alive over TLS.

/// Five requests in one curl, which reuses its connection unless told to close.
fn keepalive_round(base: &str) -> Vec<Transfer> {
    let transfers = curl(&["--insecure", "--http1.1"], &vec![format!("{base}/"); 5]);
    assert_eq!(transfers.len(), 5, "{transfers:?}");
    for t in &transfers {
        assert!(t.ok("1.1"), "{t:?}");
    }
    transfers
}

/// Rounds of keep-alive requests through the propagation delay that began at `since`: every
/// response says close and curl opens a new connection for the next request.
fn closing_rounds_during_the_delay(base: &str, since: Instant) {
    let mut rounds = 0;
    while since.elapsed() < DELAY - Duration::from_millis(300) && rounds < 100 {
        let during = keepalive_round(base);
        for t in &during {
            assert!(t.says_close() && t.connects == 1, "{during:?}");
        }
        rounds += 1;
    }
    assert!(rounds >= 3, "only {rounds} rounds during the delay");
}

/// The TLS download in flight at SIGQUIT (seen at `quit_seen`) finished, whole, well after it.
fn download_finished_after_quit(slow: Curl, quit_seen: Instant) {
    let (slow, done) = slow.finish();
    assert!(
        slow[0].ok("1.1") && slow[0].size == SLOW_SECS * SLOW_RATE,
        "the TLS download in flight at SIGQUIT finished: {slow:?}"
    );
    assert!(done > quit_seen + SECONDS, "it was in flight after SIGQUIT");
}

#[test]
fn tls_keepalive_clients_are_told_to_close_and_see_no_failure() {
    let (_tls, site, base) = tls_site("");
    let mut supervisor = start(&site);

    let before = keepalive_round(&base);
    assert_eq!(
        before.iter().map(|t| t.connects).collect::<Vec<_>>(),
        [1, 0, 0, 0, 0],
        "one connection, reused: {before:?}"
    );
    assert!(!before.iter().any(Transfer::says_close), "{before:?}");

    let slow = Curl::start(
        &["--insecure", "--http1.1"],
        &[format!("{base}{}", site.slow_path(SLOW_SECS))],
    );
    wait_for_connections(&supervisor, 1);
    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);

    closing_rounds_during_the_delay(&base, signalled);

    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    download_finished_after_quit(slow, quit_seen);
    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT);
    assert_clean(&supervisor, status, 0);
}

#[test]
fn tls_keepalive_clients_through_drain_without_a_supervisor() {
    let (_tls, site, base) = tls_site("");
    let nginx = site.start_daemon();
    assert_eq!(keepalive_round(&base).iter().map(|t| t.connects).sum::<u32>(), 1);

    let slow = Curl::start(
        &["--insecure", "--http1.1"],
        &[format!("{base}{}", site.slow_path(SLOW_SECS))],
    );
    common::wait_for_busy_worker(nginx.master);
    let started = Instant::now();
    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "1s"]));
    hook.log.wait_phase("propagation_delay", 5 * SECONDS);
    closing_rounds_during_the_delay(&base, started);

    hook.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    download_finished_after_quit(slow, quit_seen);
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(nginx.all_gone());
    let summary = hook.log.drain_summary();
    assert_eq!(summary["outcome"], "clean", "{summary}");
}

// ---------------------------------------------------------------------------------------------
// A backend of our own for long-lived connections.

/// An echo server on loopback; with `websocket`, it first answers the upgrade with 101. Records
/// how each connection ended, as it saw it. Stops accepting on drop.
struct Echo {
    port: u16,
    ends: Arc<Mutex<Vec<End>>>,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(websocket: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let ends = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ends2, stop2) = (ends.clone(), stop.clone());
        let accepting = std::thread::spawn(move || {
            let deadline = Instant::now() + 60 * SECONDS;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let ends = ends2.clone();
                        std::thread::spawn(move || {
                            let end = echo(conn, websocket);
                            ends.lock().unwrap().push(end);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            ends,
            stop,
            accepting: Some(accepting),
        }
    }

    fn ends(&self) -> Vec<End> {
        self.ends.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

fn echo(mut conn: TcpStream, websocket: bool) -> End {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(30 * SECONDS)).unwrap();
    if websocket {
        if let Err(err) = read_head(&mut conn) {
            return end_of(&err);
        }
        // The accept value for the RFC 6455 sample key, which the client sends.
        let reply = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        if let Err(err) = conn.write_all(reply.as_bytes()) {
            return end_of(&err);
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                if let Err(err) = conn.write_all(&buf[..n]) {
                    return end_of(&err);
                }
            }
            Err(err) => return end_of(&err),
        }
    }
}

/// Reads an HTTP head, up to its blank line, byte by byte so nothing after it is consumed.
fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
        conn.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends `payload` and reads the same bytes back.
fn round_trip(conn: &mut TcpStream, payload: &[u8]) {
    conn.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).expect("the echo comes back");
    assert_eq!(back, payload);
}

/// A masked WebSocket text frame, as a client sends it.
fn ws_text(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads until the connection ends; returns how, when, and any bytes that came first.
fn read_until_end(conn: &mut TcpStream, limit: Duration) -> (End, Instant, Vec<u8>) {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return (End::Eof, Instant::now(), got),
            Ok(n) => got.extend(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::ConnectionReset => {
                return (End::Reset, Instant::now(), got);
            }
            Err(err) => return (End::Other(err.to_string()), Instant::now(), got),
        }
    }
}

/// Asserts the client saw nginx's shutdown timer close its connection: an orderly close, no
/// byte before it, SHUTDOWN_TIMEOUT after SIGQUIT; and no reset after it.
fn assert_closed_at_the_shutdown_timeout(conn: &mut TcpStream, quit_seen: Instant) {
    let (end, at, bytes) = read_until_end(conn, 10 * SECONDS);
    let after = at - quit_seen;
    assert_eq!(end, End::Eof, "closed with a FIN, {after:?} after SIGQUIT");
    assert!(bytes.is_empty(), "nothing before the close: {bytes:?}");
    assert!(
        after > SHUTDOWN_TIMEOUT - EARLY && after < SHUTDOWN_TIMEOUT + LATE,
        "closed {after:?} after SIGQUIT, not at the {SHUTDOWN_TIMEOUT:?} shutdown timeout"
    );
    std::thread::sleep(Duration::from_millis(100));
    let again = conn.read(&mut [0u8; 1]);
    assert!(matches!(again, Ok(0)), "no reset followed the FIN: {again:?}");
}

// ---------------------------------------------------------------------------------------------
// A WebSocket.

fn ws_connect(addr: SocketAddr) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(10 * SECONDS)).unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut conn)
        .expect("the upgrade answer")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    (conn, head)
}

#[test]
fn a_websocket_is_served_after_sigquit_and_closed_by_nginx_at_the_shutdown_timeout() {
    let backend = Echo::start(true);
    let site = Site::build(
        true,
        &format!(
            "location /ws {{
            proxy_pass http://127.0.0.1:{};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection \"upgrade\";
        }}",
            backend.port
        ),
    );
    let mut supervisor = start(&site);
    let (mut ws, head) = ws_connect(site.addr());
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    round_trip(&mut ws, &ws_text("before"));

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    // An upgrade during the drain: the snippet must not add `Connection: close` to the 101.
    let (mut during, head) = ws_connect(site.addr());
    assert!(
        head.contains("\r\nconnection: upgrade\r\n") && !head.contains("close"),
        "{head}"
    );
    round_trip(&mut during, &ws_text("during"));
    drop(during);

    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    std::thread::sleep(SECONDS);
    // SIGQUIT closes idle keep-alive connections; an upgraded one is not idle and stays.
    round_trip(&mut ws, &ws_text("after SIGQUIT"));

    // nginx ends it as a TCP connection: no WebSocket close frame (0x88) comes first.
    assert_closed_at_the_shutdown_timeout(&mut ws, quit_seen);
    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT + SECONDS);
    assert_clean(&supervisor, status, 1);
    assert_eq!(supervisor.log.drain_summary()["connections_at_quit"], 1);
    // The backend's side was closed by nginx too, orderly.
    common::wait_until("the backend to see both ends", 2 * SECONDS, || {
        backend.ends().len() == 2
    });
    assert_eq!(backend.ends(), [End::Eof, End::Eof]);
}

// ---------------------------------------------------------------------------------------------
// A stream {} TCP proxy.

/// The site with a `stream {}` TCP proxy to `backend` on a port of its own.
fn with_stream_proxy(site: &Site, backend: u16) -> SocketAddr {
    assert!(
        Path::new(STREAM_MODULE).exists(),
        "{STREAM_MODULE} is missing: install libnginx-mod-stream (scripts/install-deps.sh)"
    );
    let port = common::free_port();
    let config = std::fs::read_to_string(&site.config).unwrap();
    let config = format!(
        "load_module {STREAM_MODULE};\n{config}\
         stream {{\n    server {{ listen 127.0.0.1:{port}; proxy_pass 127.0.0.1:{backend}; }}\n}}\n"
    );
    std::fs::write(&site.config, config).unwrap();
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An echo backend behind the site's stream proxy, the supervisor, and a TCP connection
/// through the proxy that has carried one round trip.
fn stream_session(site: &Site) -> (Echo, Supervisor, TcpStream) {
    let backend = Echo::start(false);
    let proxy = with_stream_proxy(site, backend.port);
    let supervisor = start(site);
    let mut conn = TcpStream::connect(proxy).unwrap();
    conn.set_read_timeout(Some(10 * SECONDS)).unwrap();
    round_trip(&mut conn, b"before");
    (backend, supervisor, conn)
}

#[test]
fn a_stream_connection_works_after_sigquit_and_is_closed_at_the_shutdown_timeout() {
    let site = Site::new();
    let (backend, mut supervisor, mut conn) = stream_session(&site);

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    std::thread::sleep(SECONDS);
    // nginx does not close stream connections on a graceful quit.
    round_trip(&mut conn, b"after SIGQUIT");

    assert_closed_at_the_shutdown_timeout(&mut conn, quit_seen);
    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT + SECONDS);
    assert_clean(&supervisor, status, 1);
    assert_eq!(supervisor.log.drain_summary()["connections_at_quit"], 1);
    common::wait_until("the backend to see the end", 2 * SECONDS, || {
        !backend.ends().is_empty()
    });
    assert_eq!(backend.ends(), [End::Eof]);
}

#[test]
fn a_stream_connection_that_ends_before_the_timeout_ends_the_drain_at_once() {
    let site = Site::new();
    let (_backend, mut supervisor, mut conn) = stream_session(&site);

    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    round_trip(&mut conn, b"after SIGQUIT");
    let closed = Instant::now();
    drop(conn);

    let status = supervisor.wait_exit(10 * SECONDS);
    let exit_after = closed.elapsed();
    assert!(
        exit_after < Duration::from_millis(500),
        "the drain ended with the connection: {exit_after:?} after the client closed"
    );
    assert!(quit_seen.elapsed() < SHUTDOWN_TIMEOUT / 2);
    assert_clean(&supervisor, status, 0);
    assert_eq!(supervisor.log.drain_summary()["connections_at_quit"], 1);
}
