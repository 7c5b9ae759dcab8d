//! `run`'s ordered drain against a real nginx: requests in flight, new connections during the
//! propagation delay, keep-alive clients, escalation, and the signals around it.

use test_support as common;

use std::time::{Duration, Instant};

use common::{Site, Supervisor, Traffic, code};
use common::{h2, http};

const SIGINT: i32 = 2;
const SIGQUIT: i32 = 3;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGSTOP: i32 = 19;
const SECONDS: Duration = Duration::from_secs(1);
const MILLIS: Duration = Duration::from_millis(1);

#[test]
fn sigterm_drains_in_order_and_exits_zero_after_the_last_worker() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "300ms"]);
    let nginx = supervisor.descendants();
    assert_eq!(nginx.len(), 3, "a master and two workers: {nginx:?}");

    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(10 * SECONDS);

    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());
    assert_eq!(supervisor.log.phases(), common::DRAIN_PHASES);
    for pid in nginx {
        assert!(
            !common::exists(pid),
            "nginx process {pid} outlived the supervisor"
        );
    }
    assert!(
        !site.runtime.join("draining").exists(),
        "the drain flag is removed at exit"
    );
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["outcome"], "clean");
}

#[test]
fn a_request_in_flight_at_sigterm_completes() {
    let site = Site::new();
    let path = site.slow_path(2);
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "200ms"]);
    let started = Instant::now();
    let request = http::get_in_background(site.addr(), &path);
    // nginx counts the request as established from the worker's side before we signal.
    common::wait_for_busy_worker(supervisor.pid);
    supervisor.signal(SIGTERM);

    let reply = request.join().unwrap().expect("the request in flight finishes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body_len, 2 * common::SLOW_RATE);
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the request really was slow"
    );
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    supervisor
        .log
        .assert_drain_under_load(Duration::from_millis(200), 2 * SECONDS);
}

/// The supervisor's line at the close spread's end.
const ALL_TOLD: &str = "every keep-alive client is told to close";

#[test]
fn new_connections_during_the_propagation_delay_are_served() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "2s"]);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);

    let mut served = 0;
    while supervisor.log.phases().last().map(String::as_str) == Some("propagation_delay") {
        // Over the close spread (half the fixed delay here: 1 s) a tenth more of the connections is told each
        // time; after it, every one.
        let all_told = supervisor.log.contains(ALL_TOLD);
        let reply = http::get(site.addr(), "/");
        // The delay may end between the check and the connect (the phase is logged just after
        // SIGQUIT): only then is a refusal expected.
        if reply.is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
        if supervisor.log.phases().last().map(String::as_str) != Some("propagation_delay") {
            break;
        }
        let reply = reply.expect("a new connection during the delay is accepted and answered");
        assert_eq!(reply.status, 200);
        assert!(
            reply.close || !all_told,
            "responses after the close spread tell the client to close"
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 10, "only {served} requests during a 2 s delay");
    assert!(supervisor.log.contains(ALL_TOLD), "{:?}", supervisor.log.lines());
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

/// The propagation delay of the tests with clients through the drain: the endpoint removal
/// (half a second after the drain began) has a second of margin before SIGQUIT.
const DELAY: Duration = Duration::from_millis(1500);
/// The download in flight across SIGQUIT in those tests, in seconds: it begins before SIGTERM and
/// ends well after SIGQUIT.
const SLOW_SECS: usize = 3;

#[test]
fn keepalive_and_one_shot_clients_see_no_error_through_the_drain() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "1500ms"]);
    let nginx = supervisor.descendants();
    let traffic = Traffic::to(site.addr())
        .keepalive(8)
        .one_shot()
        .slow(&site.slow_path(SLOW_SECS))
        .start();
    traffic.wait_served(100);
    traffic.wait_slow_in_flight();

    supervisor.signal(SIGTERM);
    // The endpoint removal reaches the Service within the propagation delay, as it should.
    traffic.remove_endpoint_once_unready(&supervisor.log, DELAY);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    assert!(
        common::all_exited(&nginx),
        "nginx outlived the supervisor: the drain did not wait for it"
    );
    let report = traffic.finish();

    // No reset, no EOF on a reused connection, no refusal: every client was told to close,
    // reconnected while the pod was still an endpoint, and left once it no longer was; the
    // download in flight at SIGQUIT finished.
    report.assert_drained_whole(&supervisor.log, SLOW_SECS);
    supervisor
        .log
        .assert_drain_under_load(DELAY, SLOW_SECS as u32 * SECONDS);
    let (one_shot, keepalive) = (&report.one_shot, &report.keepalive);
    assert!(one_shot.ok > 20, "connection-per-request client: {one_shot:?}");
    assert!(keepalive.ok > 100, "{keepalive:?}");
    assert!(
        keepalive.told_to_close >= 8,
        "every client was told to close: {keepalive:?}"
    );
    assert!(
        keepalive.connections > 8,
        "clients reconnected after close: {keepalive:?}"
    );
    assert_eq!(keepalive.moved, 8, "every client left the pod: {keepalive:?}");
}

#[test]
fn a_request_longer_than_the_budget_escalates_and_exits_within_the_grace_period() {
    let site = Site::new();
    let path = site.slow_path(30);
    let grace = Duration::from_secs(4);
    // nginx's own worker_shutdown_timeout, longer than the budget: the supervisor leaves it be,
    // and has to escalate.
    let mut args = site.run_args(&[
        "--grace-period",
        "4s",
        "--safety-margin",
        "1s",
        "--propagation-delay",
        "500ms",
    ]);
    let g = args.iter().position(|a| a == "daemon off;").unwrap();
    args[g] = "daemon off; worker_shutdown_timeout 60s;".into();
    let mut supervisor = Supervisor::start(&args);
    supervisor.wait_serving(&site);
    assert!(
        !supervisor.log.contains("nginx will close connections"),
        "left as nginx has it"
    );
    let request = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(supervisor.pid);

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(10 * SECONDS);
    let took = signalled.elapsed();

    assert_eq!(code(status), 3, "the documented code for an escalated drain");
    assert!(
        took < grace,
        "exited after {took:?}, past the {grace:?} grace period"
    );
    let phases = supervisor.log.phases();
    assert!(
        phases.ends_with(&["quitting".into(), "fast_shutdown".into(), "stopped".into()]),
        "{phases:?}"
    );
    // SIGTERM to nginx at grace - margin = 3 s into the drain, not before.
    assert_escalation_at(&supervisor.log, "fast_shutdown", 3 * SECONDS);
    assert!(took >= 3 * SECONDS, "{took:?}");
    assert!(
        request.join().unwrap().is_err(),
        "the cut request fails: that is what escalation means"
    );
}

#[test]
fn nginx_closes_what_outlasts_the_budget_at_the_shutdown_timeout_and_the_drain_counts_it() {
    let site = Site::new();
    let path = site.slow_path(30);
    // worker_shutdown_timeout = 5 s - 1 s (margin) - 0.5 s (delay) - 1 s = 2.5 s after SIGQUIT.
    let mut supervisor = Supervisor::start_serving(
        &site,
        &[
            "--grace-period",
            "5s",
            "--safety-margin",
            "1s",
            "--propagation-delay",
            "500ms",
        ],
    );
    let download = http::get_in_background(site.addr(), &path);
    let idle = http::get_in_background(site.addr(), "/");
    assert_eq!(idle.join().unwrap().map(|r| r.status.as_u16()), Ok(200));
    common::wait_for_busy_worker(supervisor.pid);

    supervisor.signal(SIGTERM);
    assert_eq!(
        code(supervisor.wait_exit(10 * SECONDS)),
        0,
        "nginx closed the download itself: no escalation"
    );
    let outcome = supervisor.log.drain_summary();
    assert_eq!(outcome["outcome"], "clean", "{outcome}");
    assert_eq!(outcome["killed"], 0, "{outcome}");
    assert_eq!(outcome["closed_by_shutdown_timeout"], 1, "{outcome}");
    assert!(
        download.join().unwrap().is_err(),
        "the download was cut by nginx's timeout"
    );
}

#[test]
fn a_worker_that_ignores_sigterm_is_killed_before_the_grace_period_ends() {
    let site = Site::new();
    let path = site.slow_path(30);
    let mut supervisor = Supervisor::start_serving(
        &site,
        &[
            "--grace-period",
            "4s",
            "--safety-margin",
            "1s",
            "--propagation-delay",
            "0s",
        ],
    );
    let _request = http::get_in_background(site.addr(), &path);
    let busy = common::wait_for_busy_worker(supervisor.pid);
    // A stopped worker acts on no signal but SIGKILL: the last step of the escalation.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(busy),
        nix::sys::signal::Signal::try_from(SIGSTOP).unwrap(),
    )
    .unwrap();

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(10 * SECONDS);

    let took = signalled.elapsed();

    assert_eq!(code(status), 3);
    assert!(took < Duration::from_secs(4), "{took:?}");
    let phases = supervisor.log.phases();
    assert!(
        phases.ends_with(&["fast_shutdown".into(), "killing".into(), "stopped".into()]),
        "{phases:?}"
    );
    // SIGTERM at grace - margin = 3 s, SIGKILL at grace - margin / 2 = 3.5 s: each at its
    // deadline, not before.
    assert_escalation_at(&supervisor.log, "fast_shutdown", 3 * SECONDS);
    assert_escalation_at(&supervisor.log, "killing", Duration::from_millis(3500));
    assert!(took >= Duration::from_millis(3500), "{took:?}");
    assert!(!common::exists(busy));
}

/// The escalation step `phase` came at `deadline` into the drain: not before, and at most
/// 0.3 s after.
#[track_caller]
fn assert_escalation_at(log: &common::Log, phase: &str, deadline: Duration) {
    let at = log
        .drain_offset(phase)
        .unwrap_or_else(|| panic!("no {phase} in {:?}", log.phases()));
    assert!(
        at >= deadline && at <= deadline + Duration::from_millis(300),
        "{phase} {at:?} into the drain, due at {deadline:?}"
    );
}

#[test]
fn a_second_sigterm_changes_nothing() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "1s"]);
    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    supervisor.signal(SIGTERM);
    supervisor
        .log
        .wait_for("the repeat to be logged", 5 * SECONDS, |l| {
            l.contains("already draining")
        });
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    assert_eq!(supervisor.log.phase_count("unready"), 1);
    // SIGQUIT a whole delay into the drain: the repeat did not shorten it.
    let quit = supervisor.log.drain_offset("quitting").unwrap();
    assert!(
        quit >= SECONDS && quit <= 1500 * MILLIS,
        "SIGQUIT {quit:?} into the drain"
    );
}

#[test]
fn a_second_sigint_skips_the_rest_of_the_delay() {
    let site = Site::new();
    let mut supervisor =
        Supervisor::start_serving(&site, &["--propagation-delay", "30s", "--grace-period", "60s"]);
    supervisor.signal(SIGINT);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    supervisor.signal(SIGINT);
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn sigquit_drains_without_the_propagation_delay() {
    let site = Site::new();
    let mut supervisor =
        Supervisor::start_serving(&site, &["--propagation-delay", "30s", "--grace-period", "60s"]);
    supervisor.signal(SIGQUIT);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    let phases = supervisor.log.phases();
    assert!(!phases.contains(&"propagation_delay".to_string()), "{phases:?}");
    assert!(phases.contains(&"quitting".to_string()), "{phases:?}");
    // Said as a warning, with the fix: the official image's STOPSIGNAL is SIGQUIT.
    let warning = supervisor.log.wait_for("the warning", SECONDS, |l| {
        l.contains("\"WARN\"") && l.contains("without propagation delay")
    });
    assert!(warning.contains("SIGTERM"), "{warning}");
}

#[test]
fn a_killed_master_leaves_no_process_behind_and_its_status_is_the_exit_code() {
    let site = Site::new();
    let path = site.slow_path(2);
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    let master = supervisor.master();
    let workers = common::children_of(master);
    assert_eq!(workers.len(), 2);
    let request = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(master);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The workers outlive their master; as subreaper the supervisor adopts them...
    supervisor
        .log
        .wait_for("the crash to be logged", 5 * SECONDS, |l| {
            l.contains("exited on its own")
        });
    let status = supervisor.wait_exit(10 * SECONDS);

    // ...lets the one with a request in flight finish it, and reaps them all.
    assert_eq!(
        request
            .join()
            .unwrap()
            .expect("the orphaned worker finished the request")
            .status,
        200
    );
    assert_eq!(code(status), 128 + SIGKILL);
    for pid in workers {
        assert!(
            !common::exists(pid),
            "orphaned worker {pid} left behind (as zombie or alive)"
        );
    }
}

#[test]
fn a_long_connection_is_closed_by_nginx_at_the_timeout_the_supervisor_set_without_escalation() {
    let site = Site::new();
    let path = site.slow_path(30);
    // Escalation would come at 5 s; the supervisor has nginx close what is left 4 s after SIGQUIT.
    let mut supervisor = Supervisor::start_serving(
        &site,
        &[
            "--grace-period",
            "6s",
            "--safety-margin",
            "1s",
            "--propagation-delay",
            "0s",
        ],
    );
    assert!(
        supervisor
            .log
            .contains("nginx will close connections still open 4000ms")
    );
    let request = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(supervisor.pid);
    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    assert_eq!(
        code(supervisor.wait_exit(10 * SECONDS)),
        0,
        "nginx closed it itself: no escalation"
    );
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(3900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(!supervisor.log.phases().contains(&"fast_shutdown".to_string()));
    assert!(
        request.join().unwrap().is_err(),
        "the stream was cut by nginx, at the timeout"
    );
}

#[test]
fn http2_responses_never_carry_connection_close() {
    let h2c_port = common::free_port();
    let site = Site::build(true, &format!("listen 127.0.0.1:{h2c_port} http2;"));
    let h2c = std::net::SocketAddr::from(([127, 0, 0, 1], h2c_port));
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "2s"]);
    assert_eq!(h2::get_h2c(h2c, "/").unwrap(), (hyper::StatusCode::OK, false));

    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    // HTTP/1.1 is told to close (every connection once the close spread is over); HTTP/2
    // gets no Connection field (nginx sends GOAWAY at quit).
    supervisor
        .log
        .wait_for("every client told", 5 * SECONDS, |l| l.contains(ALL_TOLD));
    assert!(http::get(site.addr(), "/").unwrap().close);
    assert_eq!(h2::get_h2c(h2c, "/").unwrap(), (hyper::StatusCode::OK, false));
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}
