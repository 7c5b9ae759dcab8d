//! Connections that are not short HTTP/1.1 requests, through a real drain under `run`: HTTP/2
//! over TLS and in clear text (h2c), HTTP/1.1 keep-alive over TLS, a WebSocket held open, and a
//! `stream {}` TCP proxy. What each client sees is asserted exactly: curl's result for every
//! transfer, the HTTP/2 frames nginx sends, and how a held connection ends (FIN or reset, when).

use test_support as common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::curl::{Curl, Transfer};
use common::h2::{self, DATA, END_STREAM, Frame, GOAWAY, RST_STREAM};
use common::tcp::{Echo, End, read_until_end, round_trip};
use common::tls::TlsSite;
use common::{SLOW_RATE, Site, Supervisor, code, drain_args, websocket};

const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);

/// SIGQUIT 1 s after SIGTERM and escalation at 8 − 2 = 6 s, so `run` gives nginx
/// `worker_shutdown_timeout` 6 − 1 − 1 = 4 s (see `DrainPlan::worker_shutdown_timeout`).
/// Every HTTP/1 client is told to close at once: the close spread is tests/close_spread.rs's.
const PLAN: &[&str] = &[
    "--grace-period",
    "8s",
    "--propagation-delay",
    "1s",
    "--safety-margin",
    "2s",
    "--close-spread",
    "0s",
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

// ---------------------------------------------------------------------------------------------
// The supervisor and its log.

fn start(site: &Site) -> Supervisor {
    let supervisor = Supervisor::start_serving(site, PLAN);
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

// ---------------------------------------------------------------------------------------------
// HTTP/2 through a drain: the same steps over TLS and over h2c.

struct Http2Case<'a> {
    h2: h2::Client<'a>,
    /// The same server over HTTP/1.1 (curl options, base URL), to show that the drain snippet
    /// is active meanwhile.
    h1: &'a [&'a str],
    h1_base: String,
    /// An h2c address to watch the frames on.
    raw_h2c: Option<SocketAddr>,
}

fn http2_through_a_drain(site: &Site, case: Http2Case) {
    let mut supervisor = start(site);
    let h1 = || Curl::run(case.h1, &[format!("{}/", case.h1_base)]);

    let (before, _) = case.h2.batch("/", 1);
    assert!(before[0].ok() && !before[0].connection_field, "{before:?}");
    let before = h1();
    assert!(before[0].ok("1.1") && !before[0].says_close(), "{before:?}");

    // Four slow streams on one connection, in flight across SIGQUIT.
    let slow_path = site.slow_path(SLOW_SECS);
    let slow = case.h2.start(&slow_path, 4);
    let raw = case.raw_h2c.map(|addr| h2::raw_get(addr, &slow_path));
    supervisor.wait_for_connections(1 + usize::from(raw.is_some()));

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
    let tls = TlsSite::new("http2");
    let (site, base) = (&tls.site, &tls.base);
    http2_through_a_drain(
        site,
        Http2Case {
            h2: h2::Client::Curl {
                options: &["--insecure", "--http2"],
                base: base.clone(),
            },
            h1: &["--insecure", "--http1.1"],
            h1_base: base.clone(),
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
            h2: h2::Client::Hyper(h2c),
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
    let transfers = Curl::run(&["--insecure", "--http1.1"], &vec![format!("{base}/"); 5]);
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
    let tls = TlsSite::new("");
    let (site, base) = (&tls.site, &tls.base);
    let mut supervisor = start(site);

    let before = keepalive_round(base);
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
    supervisor.wait_for_connections(1);
    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);

    closing_rounds_during_the_delay(base, signalled);

    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    download_finished_after_quit(slow, quit_seen);
    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT);
    assert_clean(&supervisor, status, 0);
}

#[test]
fn tls_keepalive_clients_through_drain_without_a_supervisor() {
    let tls = TlsSite::new("");
    let (site, base) = (&tls.site, &tls.base);
    let nginx = site.start_daemon();
    assert_eq!(keepalive_round(base).iter().map(|t| t.connects).sum::<u32>(), 1);

    let slow = Curl::start(
        &["--insecure", "--http1.1"],
        &[format!("{base}{}", site.slow_path(SLOW_SECS))],
    );
    common::wait_for_busy_worker(nginx.master);
    let started = Instant::now();
    let mut hook = Supervisor::start(&drain_args(
        site,
        &["--propagation-delay", "1s", "--close-spread", "0s"],
    ));
    hook.log.wait_phase("propagation_delay", 5 * SECONDS);
    closing_rounds_during_the_delay(base, started);

    hook.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    download_finished_after_quit(slow, quit_seen);
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(nginx.all_gone());
    let summary = hook.log.drain_summary();
    assert_eq!(summary["outcome"], "clean", "{summary}");
}

// ---------------------------------------------------------------------------------------------
// Held connections, closed by nginx at the shutdown timeout: a WebSocket.

/// Asserts the client saw nginx's shutdown timer close its connection: an orderly close, no
/// byte before it, SHUTDOWN_TIMEOUT after SIGQUIT (seen at `quit_seen`); and no reset after it.
/// Then the drain, begun at `signalled`, ended with it: clean, with that one connection held at
/// SIGQUIT and closed by the timer.
fn assert_closed_at_the_shutdown_timeout(
    conn: &mut TcpStream,
    supervisor: &mut Supervisor,
    signalled: Instant,
    quit_seen: Instant,
) {
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

    let status = supervisor.wait_exit(10 * SECONDS);
    assert!(signalled.elapsed() < DELAY + SHUTDOWN_TIMEOUT + SECONDS);
    assert_clean(supervisor, status, 1);
    assert_eq!(supervisor.log.drain_summary()["connections_at_quit"], 1);
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
    let (mut ws, head) = websocket::connect(site.addr());
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    round_trip(&mut ws, &websocket::text_frame("before"));

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    // An upgrade during the drain: the snippet must not add `Connection: close` to the 101.
    let (mut during, head) = websocket::connect(site.addr());
    assert!(
        head.contains("\r\nconnection: upgrade\r\n") && !head.contains("close"),
        "{head}"
    );
    round_trip(&mut during, &websocket::text_frame("during"));
    drop(during);

    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let quit_seen = Instant::now();
    std::thread::sleep(SECONDS);
    // SIGQUIT closes idle keep-alive connections; an upgraded one is not idle and stays.
    round_trip(&mut ws, &websocket::text_frame("after SIGQUIT"));

    // nginx ends it as a TCP connection: no WebSocket close frame (0x88) comes first.
    assert_closed_at_the_shutdown_timeout(&mut ws, &mut supervisor, signalled, quit_seen);
    // The backend's side was closed by nginx too, orderly.
    common::wait_until("the backend to see both ends", 2 * SECONDS, || {
        backend.ends().len() == 2
    });
    assert_eq!(backend.ends(), [End::Eof, End::Eof]);
}

// ---------------------------------------------------------------------------------------------
// A stream {} TCP proxy.

/// An echo backend behind the site's stream proxy, the supervisor, and a TCP connection
/// through the proxy that has carried one round trip.
fn stream_session(site: &Site) -> (Echo, Supervisor, TcpStream) {
    let backend = Echo::start(false);
    let proxy = site.add_stream_proxy(backend.port);
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

    assert_closed_at_the_shutdown_timeout(&mut conn, &mut supervisor, signalled, quit_seen);
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
