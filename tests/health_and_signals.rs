//! The health endpoint, reloads on SIGHUP, and signals forwarded to nginx.

use test_support as common;

use std::time::Duration;

use common::{Site, Supervisor, code, http};

const SECONDS: Duration = Duration::from_secs(1);

#[test]
fn with_unready_at_start_readiness_fails_from_the_first_instant_of_a_drain() {
    let site = Site::new();
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut supervisor = Supervisor::start(
        &site.run_args_with_health(health, &["--propagation-delay", "2s", "--unready-at", "start"]),
    );
    supervisor.wait_serving(&site);

    common::wait_until("readiness", 5 * SECONDS, || {
        http::get(health, "/readyz").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(http::get(health, "/healthz").unwrap().status, 200);
    assert_eq!(http::get(health, "/nothing").unwrap().status, 404);

    // A connection that never sends its request is closed, not kept for ever.
    let mut silent = std::net::TcpStream::connect(health).unwrap();
    silent.set_read_timeout(Some(10 * SECONDS)).unwrap();
    let opened = std::time::Instant::now();
    assert_eq!(std::io::Read::read(&mut silent, &mut [0u8; 64]).unwrap_or(0), 0);
    assert!(
        opened.elapsed() < 8 * SECONDS,
        "closed after the request timeout: {:?}",
        opened.elapsed()
    );

    supervisor.signal(15);
    supervisor.log.wait_phase("unready", 5 * SECONDS);
    assert_eq!(http::get(health, "/readyz").unwrap().status, 503);
    assert_eq!(
        http::get(health, "/healthz").unwrap().status,
        200,
        "alive while draining"
    );
    assert_eq!(
        http::get(site.addr(), "/").unwrap().status,
        200,
        "nginx still serves during the delay"
    );
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn by_default_readiness_holds_until_nginx_quits() {
    let site = Site::new();
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut supervisor =
        Supervisor::start(&site.run_args_with_health(health, &["--propagation-delay", "1500ms"]));
    supervisor.wait_serving(&site);
    let ready = || http::get(health, "/readyz").unwrap().status;
    common::wait_until("readiness", 5 * SECONDS, || ready() == 200);
    // A download keeps nginx in its quit long enough to look.
    let slow = site.slow_path(3);
    let download = std::thread::spawn({
        let addr = site.addr();
        move || http::get(addr, &slow)
    });
    supervisor.wait_for_connections(1);

    supervisor.signal(15);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    assert_eq!(ready(), 200, "terminating but serving during the delay");
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    assert_eq!(ready(), 503, "unready once nginx has closed its listeners");
    assert_eq!(download.join().unwrap().unwrap().status, 200);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn with_unready_at_a_duration_readiness_fails_then() {
    let site = Site::new();
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut supervisor = Supervisor::start(
        &site.run_args_with_health(health, &["--propagation-delay", "3s", "--unready-at", "1s"]),
    );
    supervisor.wait_serving(&site);
    let ready = || http::get(health, "/readyz").unwrap().status;
    common::wait_until("readiness", 5 * SECONDS, || ready() == 200);
    supervisor.signal(15);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    let began = std::time::Instant::now();
    assert_eq!(ready(), 200);
    common::wait_until("readiness to fail", 3 * SECONDS, || ready() == 503);
    let after = began.elapsed();
    assert!(
        after > Duration::from_millis(800) && after < Duration::from_millis(2000),
        "unready {after:?} after the drain began, for --unready-at 1s"
    );
    assert_eq!(
        supervisor.log.phases().last().map(String::as_str),
        Some("propagation_delay")
    );
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn sighup_reloads_a_valid_config_and_refuses_a_broken_one() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    let master = supervisor.master();

    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config.replace("return 200 \"ok\\n\";", "return 200 \"reloaded\\n\";"),
    )
    .unwrap();
    supervisor.signal(1);
    supervisor
        .log
        .wait_for("the reload", 5 * SECONDS, |l| l.contains("SIGHUP sent"));
    common::wait_until("the new config to serve", 5 * SECONDS, || {
        http::get(site.addr(), "/").is_ok_and(|r| r.body_len == "reloaded\n".len())
    });
    // The old generation may still accept a connection or two until it has exited.
    common::wait_until("the old workers to exit", 5 * SECONDS, || {
        common::children_of(master).len() == 2
    });

    std::fs::write(
        &site.config,
        config.replace("events {", "broken_directive;\nevents {"),
    )
    .unwrap();
    supervisor.signal(1);
    let refusal = supervisor
        .log
        .wait_for("the refusal", 5 * SECONDS, |l| l.contains("reload refused"));
    assert!(refusal.contains("broken_directive"), "{refusal}");
    assert_eq!(
        http::get(site.addr(), "/").unwrap().body_len,
        "reloaded\n".len(),
        "the old config still serves"
    );
    assert_eq!(supervisor.master(), master);

    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn usr1_is_forwarded_to_the_master_and_sigint_never_reaches_nginx_directly() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    let master = supervisor.master();
    supervisor.signal(10);
    supervisor.log.wait_for("nginx to get SIGUSR1", 5 * SECONDS, |l| {
        l.contains("signal 10 (SIGUSR1) received")
    });

    // nginx has a process group of its own: a terminal's Ctrl-C, sent to the supervisor's
    // group, reaches the supervisor alone.
    let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(master))).unwrap();
    assert_eq!(group.as_raw(), master);
    assert_ne!(
        group,
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(supervisor.pid))).unwrap()
    );

    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    // With --log-format json, nginx's own lines are wrapped too: every line parses.
    for line in supervisor.log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(event["message"].is_string(), "{line}");
    }
}

#[test]
fn pre_drain_hooks_run_in_order_before_the_delay_and_a_failure_does_not_stop_the_drain() {
    let site = Site::new();
    let marks = site.dir.0.join("marks");
    let first = format!("sh -c 'echo deregistered >> {}'", marks.display());
    let mut supervisor = Supervisor::start_serving(
        &site,
        &[
            "--propagation-delay",
            "200ms",
            "--pre-drain-exec",
            &first,
            "--pre-drain-exec",
            "false",
            "--pre-drain-exec",
            "sleep 30",
            "--pre-drain-timeout",
            "500ms",
            "--pre-drain-exec",
            "echo from-hook",
        ],
    );
    supervisor.signal(15);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);

    assert_eq!(std::fs::read_to_string(&marks).unwrap(), "deregistered\n");
    let lines = supervisor.log.lines().join("\n");
    assert!(lines.contains("pre-drain hook failed"), "{lines}");
    assert!(lines.contains("timed out and was killed"), "{lines}");
    assert!(lines.contains("from-hook"), "hook output is logged: {lines}");
    let phases = supervisor.log.phases();
    let hooks = phases.iter().position(|p| p == "pre_drain_hooks").unwrap();
    assert_eq!(phases[hooks + 1], "propagation_delay");
}

#[test]
fn a_reload_nginx_rolls_back_is_reported_with_nginx_reason_and_the_old_config_serves() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &[]);
    let master = supervisor.master();
    let workers = common::children_of(master);

    // `nginx -t` does not bind, so this config passes the test and fails only in the master.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        config
            .replace("return 200 \"ok\\n\";", "return 200 \"new\\n\";")
            .replace(
                &format!("listen 127.0.0.1:{};", site.port),
                &format!("listen 127.0.0.1:{}; listen 127.0.0.1:{port};", site.port),
            ),
    )
    .unwrap();
    supervisor.signal(1);
    let failure = supervisor.log.wait_for("the failed reload", 10 * SECONDS, |l| {
        l.contains("\"reload\":\"rolled_back\"")
    });
    assert!(
        failure.contains(&format!("127.0.0.1:{port}")) && failure.contains("bind()"),
        "{failure}"
    );
    assert_eq!(
        http::get(site.addr(), "/").unwrap().body_len,
        "ok\n".len(),
        "the old config serves"
    );
    assert_eq!(
        common::children_of(master),
        workers,
        "the old workers still serve"
    );

    // A good config after that reloads and is confirmed.
    std::fs::write(
        &site.config,
        config.replace("return 200 \"ok\\n\";", "return 200 \"new\\n\";"),
    )
    .unwrap();
    supervisor.signal(1);
    let confirmed = supervisor
        .log
        .wait_for("the confirmed reload", 10 * SECONDS, |l| {
            l.contains("\"reload\":\"confirmed\"")
        });
    let event: serde_json::Value = serde_json::from_str(&confirmed).unwrap();
    let new_workers: Vec<i32> = event["workers"]
        .as_str()
        .unwrap()
        .split(',')
        .map(|pid| pid.parse().unwrap())
        .collect();
    assert!(
        !new_workers.is_empty() && new_workers.iter().all(|w| !workers.contains(w)),
        "{confirmed}"
    );
    assert_eq!(http::get(site.addr(), "/").unwrap().body_len, "new\n".len());

    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}
