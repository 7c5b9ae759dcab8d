//! The adaptive propagation delay against a real nginx: nginx keeps serving until new
//! connections stop arriving, for as long as the traffic calls for, within its floor and
//! ceiling; and says how the delay ended.

use test_support as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Site, Supervisor, Traffic, code, http};

const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);
const MILLIS: Duration = Duration::from_millis(1);

#[test]
fn the_delay_ends_soon_after_new_connections_stop() {
    let site = Site::new();
    // The defaults: until quiet, at least 1 s, at most 18 s.
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    let traffic = Traffic::to(site.addr()).keepalive(4).one_shot().start();
    traffic.wait_served(200);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    // The endpoint removal takes 2.5 s to reach the clients: longer than the old fixed 5 s
    // would leave room for in a slower cluster, and longer than the floor.
    std::thread::sleep(Duration::from_millis(2500));
    let removed = Instant::now();
    traffic.remove_endpoint();
    let (_, quit_seen) = supervisor.log.wait_phase_arrival("quitting", 20 * SECONDS);
    traffic.finish().assert_no_failures();
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);

    assert!(
        quit_seen > removed,
        "SIGQUIT before the removal reached the clients"
    );
    let after = quit_seen - removed;
    assert!(
        after < Duration::from_millis(1500),
        "nginx served on {after:?} after the last new connection: the delay did not see them stop"
    );
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["propagation"], "quiet", "{summary}");
    assert!(summary["propagation_arrivals"].as_u64() > Some(10), "{summary}");
    // One schema for every line: the supervisor's and nginx's say whose they are.
    let events = supervisor.log.events();
    assert!(
        events
            .iter()
            .all(|e| e["source"] == "supervisor" || e["source"] == "nginx"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["source"] == "nginx" && e["level"] == "INFO" && e["timestamp"].is_string())
    );
}

#[test]
fn a_slow_trickle_of_connections_is_not_taken_for_quiet() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--max-propagation-delay", "10s"]);
    // One new connection every 400 ms, from before the drain to 3 s into it: a quiet time
    // that did not scale with the traffic (300 ms, say) would quit between two of them.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let (stop, addr) = (stop.clone(), site.addr());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            for _ in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(err) = http::get(addr, "/") {
                    failures.push(err);
                }
                std::thread::sleep(Duration::from_millis(400));
            }
            failures
        })
    };
    std::thread::sleep(3 * SECONDS);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    std::thread::sleep(3 * SECONDS);
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let failures = trickle.join().unwrap();
    let (_, quit_seen) = supervisor.log.wait_phase_arrival("quitting", 20 * SECONDS);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(quit_seen > stopped, "SIGQUIT while the trickle still came");
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    // Quiet, or, on a machine too busy for the supervisor to see enough of the trickle, the
    // ceiling: never a quit while it still came.
    let summary = supervisor.log.drain_summary();
    assert!(
        summary["propagation"] == "quiet" || summary["propagation"] == "ceiling",
        "{summary}"
    );
}

#[test]
fn a_wave_of_connections_the_watch_rested_through_is_dated_by_a_look_soon_after() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    // Waves of 8 new connections over 45 ms, once a second, as clients in step make them (a
    // full-speed load whose slow requests all take 1 s): the watch wakes at a wave's first
    // connection, and the others come while it rests. The drain starts just after the first
    // connection of the last wave, so the rest of that wave comes after the delay's first look.
    let (first_of_last, drain_now) = std::sync::mpsc::channel();
    let addr = site.addr();
    let waves = std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut wave_began = Instant::now();
        for wave in 0..7 {
            wave_began = Instant::now();
            for i in 0..8 {
                if let Err(err) = get_closed_by_server(addr) {
                    failures.push(err);
                }
                if wave == 6 && i == 0 {
                    first_of_last.send(()).unwrap();
                }
                std::thread::sleep(Duration::from_millis(if i == 0 { 10 } else { 5 }));
            }
            std::thread::sleep(SECONDS.saturating_sub(wave_began.elapsed()));
        }
        (failures, wave_began)
    });
    drain_now.recv_timeout(20 * SECONDS).unwrap();
    supervisor.signal(SIGTERM);
    let (failures, last_wave) = waves.join().unwrap();
    let (_, quit_seen) = supervisor.log.wait_phase_arrival("quitting", 20 * SECONDS);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    // Gaps of a second: 3 s of quiet after the last wave. Recorded when the quiet time's end
    // looks at the table, the wave's rest would make a 3 s gap, and 9 s more of quiet.
    let after = quit_seen - last_wave;
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["propagation"], "quiet", "{summary}");
    assert!(
        after > 2 * SECONDS && after < 4500 * MILLIS,
        "SIGQUIT {after:?} after the last wave began: {summary}"
    );
}

/// A request with `Connection: close`: nginx closes first, and its end of the connection waits
/// in TIME_WAIT, where the socket table still shows it.
fn get_closed_by_server(addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    match response.starts_with(b"HTTP/1.1 200") {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&response).into_owned()),
    }
}

#[test]
fn the_ceiling_ends_the_delay_with_a_warning_while_connections_still_arrive() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--max-propagation-delay", "2s"]);
    let traffic = Traffic::to(site.addr()).one_shot().start();
    traffic.wait_served(50);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("quitting", 10 * SECONDS);
    traffic.remove_endpoint();
    // Connections refused after the quit are what the warning is about: not asserted here.
    drop(traffic.finish());
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);

    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= 2 * SECONDS && quit < Duration::from_millis(2500),
        "SIGQUIT {quit:?} into the drain, for a ceiling of 2 s"
    );
    supervisor.log.wait_for("the ceiling's warning", SECONDS, |line| {
        line.contains("\"WARN\"") && line.contains("raise --max-propagation-delay")
    });
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["propagation"], "ceiling", "{summary}");
}

#[test]
fn without_new_connections_the_delay_runs_to_its_ceiling_and_says_why() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--max-propagation-delay", "1500ms"]);
    supervisor.signal(SIGTERM);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= Duration::from_millis(1500),
        "SIGQUIT {quit:?} into the drain"
    );
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["propagation"], "ceiling", "{summary}");
    assert_eq!(summary["propagation_arrivals"], 0, "{summary}");
    let text = summary["message"].as_str().unwrap_or_default();
    assert!(text.contains("too few new connections"), "{summary}");
    assert!(
        supervisor.log.count("raise --max-propagation-delay") == 0,
        "no traffic is no reason to warn"
    );
}

#[test]
fn a_fixed_delay_is_the_old_sleep() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "700ms"]);
    let traffic = Traffic::to(site.addr()).one_shot().start();
    traffic.wait_served(20);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    traffic.remove_endpoint();
    drop(traffic.finish());
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= Duration::from_millis(700) && quit < Duration::from_millis(1200),
        "SIGQUIT {quit:?} into the drain"
    );
    assert_eq!(supervisor.log.drain_summary()["propagation"], "fixed");
}

#[test]
fn unwatchable_arrivals_make_the_delay_its_ceiling_said_once() {
    let site = Site::new();
    // nginx behind a sidecar, on a Unix socket: no TCP listener whose arrivals can be watched.
    let socket = site.config.parent().unwrap().join("nginx.sock");
    let config = std::fs::read_to_string(&site.config).unwrap().replace(
        &format!("listen {};", site.addr()),
        &format!("listen unix:{};", socket.display()),
    );
    std::fs::write(&site.config, config).unwrap();
    let mut supervisor = Supervisor::start(&site.run_args(&["--max-propagation-delay", "1200ms"]));
    common::wait_until("nginx's socket", 5 * SECONDS, || socket.exists());
    supervisor.signal(SIGTERM);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);

    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= Duration::from_millis(1200),
        "SIGQUIT {quit:?} into the drain: never a shorter wait"
    );
    assert_eq!(supervisor.log.count("cannot watch for new connections"), 1);
    assert_eq!(supervisor.log.drain_summary()["propagation"], "unwatched");
}

#[test]
fn probes_on_a_probe_port_are_not_traffic() {
    // nginx serving the kubelet's probes itself, on a port of its own (the preStop-only recipe).
    let probe_port = common::free_port();
    let site = Site::build(true, &format!("listen 127.0.0.1:{probe_port};"));
    let port = probe_port.to_string();
    // The delay's floor (the close spread, then the minimum) ends before the traffic does.
    let extra = [
        "--probe-port",
        &port,
        "--max-propagation-delay",
        "6s",
        "--close-spread",
        "400ms",
    ];
    let mut supervisor = Supervisor::start_serving(&site, &extra);
    let stop = Arc::new(AtomicBool::new(false));
    let probes = {
        let stop = stop.clone();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], probe_port));
        std::thread::spawn(move || {
            for _ in 0..300 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = http::get(addr, "/");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let traffic = Traffic::to(site.addr()).one_shot().start();
    traffic.wait_served(100);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    std::thread::sleep(Duration::from_millis(1500));
    let removed = Instant::now();
    traffic.remove_endpoint();
    let (_, quit_seen) = supervisor.log.wait_phase_arrival("quitting", 10 * SECONDS);
    stop.store(true, Ordering::Relaxed);
    probes.join().unwrap();
    traffic.finish().assert_no_failures();
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    let after = quit_seen.saturating_duration_since(removed);
    assert!(
        after < Duration::from_millis(1500),
        "the probes kept the delay going {after:?} after the traffic stopped"
    );
    assert_eq!(supervisor.log.drain_summary()["propagation"], "quiet");
}

#[test]
fn a_listener_a_reload_removes_is_let_go_of() {
    // The arrivals of a serving nginx are watched through copies of its listeners: a copy kept
    // past a reload that removes a `listen` would keep the port open, and its connections would
    // wait for an accept that never comes instead of being refused.
    let second = common::free_port();
    let site = Site::build(true, &format!("listen 127.0.0.1:{second};"));
    let mut supervisor = Supervisor::start_serving(&site, &["--no-watch", "--max-propagation-delay", "1s"]);
    let removed = std::net::SocketAddr::from(([127, 0, 0, 1], second));
    assert_eq!(http::get(removed, "/").unwrap().status, 200);
    // The watch starts a second after nginx, and is taken again after each reload.
    std::thread::sleep(Duration::from_millis(1500));
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config.replace(&format!("listen 127.0.0.1:{second};"), ""),
    )
    .unwrap();
    supervisor.signal(1);
    supervisor
        .log
        .wait_for("the reload", 10 * SECONDS, |l| l.contains("reload confirmed"));
    std::thread::sleep(Duration::from_millis(500));
    let refused = std::net::TcpStream::connect_timeout(&removed, SECONDS).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    assert_eq!(http::get(site.addr(), "/").unwrap().status, 200);
    supervisor.signal(SIGTERM);
    assert_eq!(code(supervisor.wait_exit(30 * SECONDS)), 0);
}

#[test]
fn drain_without_a_supervisor_watches_from_its_start() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let traffic = Traffic::to(site.addr()).keepalive(2).one_shot().start();
    traffic.wait_served(100);
    // The preStop hook of an nginx that runs without the supervisor: no history of the minute
    // before, so the gaps between arrivals are learnt from the hook's start.
    let mut hook = Supervisor::start(&common::drain_args(&site, &[]));
    hook.log.wait_phase("propagation_delay", 5 * SECONDS);
    std::thread::sleep(Duration::from_millis(2000));
    let removed = Instant::now();
    traffic.remove_endpoint();
    let (_, quit_seen) = hook.log.wait_phase_arrival("quitting", 20 * SECONDS);
    traffic.finish().assert_no_failures();
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0);
    assert!(nginx.all_gone());
    let after = quit_seen.saturating_duration_since(removed);
    assert!(
        quit_seen > removed && after < Duration::from_millis(1500),
        "SIGQUIT {after:?} after the last new connection"
    );
    assert_eq!(hook.log.drain_summary()["propagation"], "quiet");
    assert_eq!(hook.log.drain_summary()["source"], "drain");
}
