//! The close spread against a real nginx: the snippet tells one connection in ten per slot flag
//! up, for the connection's whole life, and never on HTTP/2 or an upgrade; `draining` alone
//! (for older snippets) tells it nothing; `run --close-spread`
//! raises the slot flags over the window, all before SIGQUIT, and the adaptive delay lasts its
//! floor after the window.

use test_support as common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::curl::Curl;
use common::tcp::read_head;
use common::{Site, Supervisor, Traffic, code, http};

const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);
const SLOTS: usize = 10;
/// Fresh connections per look: four of each last digit of nginx's connection number.
const CONNECTIONS: usize = 40;
const REQUESTS_PER_CONNECTION: usize = 3;

fn slot_flag(site: &Site, slot: usize) -> std::path::PathBuf {
    site.runtime.join(format!("draining.{slot}"))
}

fn raise(path: &Path) {
    std::fs::write(path, "draining\n").unwrap();
}

/// Whether each of `CONNECTIONS` new connections was told to close, the same answer on each of
/// its requests (asserted).
fn told_per_connection(addr: SocketAddr) -> Vec<bool> {
    (0..CONNECTIONS)
        .map(|_| {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.set_read_timeout(Some(5 * SECONDS)).unwrap();
            let answers: Vec<bool> = (0..REQUESTS_PER_CONNECTION)
                .map(|_| {
                    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                    let head = read_head(&mut conn).unwrap().to_ascii_lowercase();
                    let mut body = [0u8; 3];
                    conn.read_exact(&mut body).unwrap();
                    assert_eq!(&body, b"ok\n", "{head}");
                    head.contains("\r\nconnection: close\r\n")
                })
                .collect();
            assert!(
                answers.iter().all(|&a| a == answers[0]),
                "one connection, two answers: {answers:?}"
            );
            answers[0]
        })
        .collect()
}

#[test]
fn the_snippet_tells_a_tenth_of_the_connections_per_slot_flag() {
    let h2c_port = common::free_port();
    let site = Site::build(true, &format!("listen 127.0.0.1:{h2c_port} http2;"));
    std::fs::create_dir_all(&site.runtime).unwrap();
    let _nginx = site.start_daemon();

    assert!(
        !told_per_connection(site.addr()).contains(&true),
        "no flag, no close"
    );
    for raised in [1, 3, 7, SLOTS] {
        for slot in 0..raised {
            raise(&slot_flag(&site, slot));
        }
        let told = told_per_connection(site.addr()).iter().filter(|&&t| t).count();
        assert_eq!(told, CONNECTIONS * raised / SLOTS, "{raised} slot flags up");
    }

    // Every slot flag up, `draining` not: HTTP/2 carries no `Connection` field (forbidden
    // there), and an upgrade is not told to close.
    // One URL per curl: curl 7.88 reusing an h2c connection to nginx 1.22 fails its framing,
    // flags or not.
    for _ in 0..3 {
        let h2 = Curl::run(
            &["--http2-prior-knowledge"],
            &[format!("http://127.0.0.1:{h2c_port}/")],
        );
        assert!(h2[0].ok("2") && !h2[0].has_connection_field(), "{h2:?}");
    }
    let mut conn = TcpStream::connect(site.addr()).unwrap();
    conn.set_read_timeout(Some(5 * SECONDS)).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .unwrap();
    let head = read_head(&mut conn).unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("close"),
        "{head}"
    );

    // `draining` is for snippets from before the spread: this one tests the slot flags alone
    // (one stat() per request).
    for slot in 0..SLOTS {
        std::fs::remove_file(slot_flag(&site, slot)).unwrap();
    }
    raise(&site.runtime.join("draining"));
    assert!(!told_per_connection(site.addr()).contains(&true));
}

/// When each drain flag was last written, from `since`; `None` for a flag that is not there.
fn raised_after(site: &Site, since: SystemTime) -> (Vec<Option<Duration>>, Option<Duration>) {
    let after = |path: std::path::PathBuf| {
        let modified = std::fs::metadata(path).ok()?.modified().ok()?;
        Some(modified.duration_since(since).unwrap_or_default())
    };
    let slots = (0..SLOTS).map(|slot| after(slot_flag(site, slot))).collect();
    (slots, after(site.runtime.join("draining")))
}

fn status_json(site: &Site) -> serde_json::Value {
    let output = Command::new(common::bin())
        .args(["status", "--json", "--runtime-dir"])
        .arg(&site.runtime)
        .arg("--pid-file")
        .arg(site.pid_file())
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn run_raises_the_slot_flags_over_the_window_and_quits_a_floor_after_it() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(
        &site,
        &[
            "--close-spread",
            "2s",
            "--min-propagation-delay",
            "1s",
            "--max-propagation-delay",
            "8s",
        ],
    );
    // In flight at SIGQUIT: a worker stays, and with it the flags, until the test has read them.
    let download = http::get_in_background(site.addr(), &site.slow_path(8));
    supervisor.wait_for_connections(1);
    // A new connection per request, watched from a second after nginx's start until a second
    // into the drain: quiet soon after.
    let traffic = Traffic::to(site.addr()).one_shot().start();
    traffic.wait_served(50);
    std::thread::sleep(2 * SECONDS);

    let signalled = SystemTime::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    std::thread::sleep(SECONDS);
    traffic.remove_endpoint();
    let mid_window = status_json(&site);
    let told = mid_window["keepalive_told_tenths"].as_u64();
    assert!(
        told.is_some_and(|n| (1..SLOTS as u64).contains(&n)),
        "{mid_window}"
    );

    supervisor.log.wait_phase("quitting", 10 * SECONDS);
    let (slots, all) = raised_after(&site, signalled);
    let slots: Vec<Duration> = slots
        .into_iter()
        .map(|at| at.expect("every slot flag is up at SIGQUIT"))
        .collect();
    let all = all.expect("draining is up at SIGQUIT");
    // Slot i at i * 2s / 9 after the drain's start: a tenth at once, all at the window's end.
    let early = Duration::from_millis(30);
    let late = Duration::from_millis(300);
    for (slot, at) in slots.iter().enumerate() {
        let due = 2 * SECONDS * slot as u32 / 9;
        assert!(
            *at + early >= due && *at <= due + late,
            "slot {slot} raised {at:?} after SIGTERM, due at {due:?}: {slots:?}"
        );
    }
    assert!(
        all + early >= 2 * SECONDS && all <= 2 * SECONDS + late,
        "draining at {all:?}"
    );

    assert_eq!(
        code(supervisor.wait_exit(20 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
    assert!(download.join().unwrap().is_ok());
    traffic.finish().assert_no_failures();
    // Quiet long before, but the delay lasts its 1 s floor after the 2 s window.
    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= 3 * SECONDS && quit <= 3 * SECONDS + Duration::from_millis(500),
        "SIGQUIT at {quit:?}"
    );
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["close_spread_ms"], 2000, "{summary}");
    let all_told = summary["all_told_ms"].as_u64().unwrap();
    assert!((2000..2300).contains(&all_told), "not cut short: {summary}");
    assert_eq!(summary["propagation"], "quiet", "{summary}");
    assert!(
        summary["message"]
            .as_str()
            .unwrap()
            .contains("told to close over 2s"),
        "{summary}"
    );
    assert!(
        !site.runtime.join("draining.0").exists(),
        "slot flags lowered with the flag"
    );
}

#[test]
fn no_spread_raises_every_flag_at_once() {
    let site = Site::new();
    let mut supervisor =
        Supervisor::start_serving(&site, &["--close-spread", "0s", "--propagation-delay", "1s"]);
    let download = http::get_in_background(site.addr(), &site.slow_path(3));
    supervisor.wait_for_connections(1);
    let signalled = SystemTime::now();
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let (slots, all) = raised_after(&site, signalled);
    let at_once = Duration::from_millis(300);
    assert!(
        slots.iter().all(|at| at.is_some_and(|at| at <= at_once)),
        "every slot flag at once: {slots:?}"
    );
    let all = all.expect("draining is up at SIGQUIT");
    assert!(all <= at_once, "draining {all:?} after SIGTERM");
    assert_eq!(
        code(supervisor.wait_exit(20 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
    assert!(download.join().unwrap().is_ok());
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["close_spread_ms"], 0, "{summary}");
    assert!(
        summary["message"]
            .as_str()
            .unwrap()
            .contains("told to close at once"),
        "{summary}"
    );
}

#[test]
fn a_second_interrupt_tells_everyone_at_once() {
    const SIGINT: i32 = 2;
    let site = Site::new();
    let mut supervisor =
        Supervisor::start_serving(&site, &["--close-spread", "3s", "--propagation-delay", "5s"]);
    let download = http::get_in_background(site.addr(), &site.slow_path(3));
    supervisor.wait_for_connections(1);
    supervisor.signal(SIGINT);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    std::thread::sleep(Duration::from_millis(500));
    supervisor.signal(SIGINT);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    let (slots, all) = raised_after(&site, SystemTime::now() - 10 * SECONDS);
    assert!(
        slots.iter().all(Option::is_some) && all.is_some(),
        "every flag up at SIGQUIT: {slots:?} {all:?}"
    );
    assert_eq!(
        code(supervisor.wait_exit(20 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
    assert!(download.join().unwrap().is_ok());
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["close_spread_ms"], 3000, "{summary}");
    let all_told = summary["all_told_ms"].as_u64().unwrap();
    assert!((400..1500).contains(&all_told), "told at the cut: {summary}");
    assert!(
        summary["message"].as_str().unwrap().contains("spread cut short"),
        "{summary}"
    );
}
