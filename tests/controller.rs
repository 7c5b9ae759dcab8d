//! Controller mode (`run --pid-file FILE -- CONTROLLER`), as PID 1, with a stand-in ingress
//! controller (tests/fixtures/ingress-controller.sh) that starts, restarts, reloads and quits
//! nginx itself, the way ingress-nginx's controller does.

use test_support as common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::http;
use common::{Site, Supervisor, Traffic, code};
use serde_json::Value;

const SECONDS: Duration = Duration::from_secs(1);
const SIGTERM: i32 = 15;
const CONTROLLER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ingress-controller.sh"
);

/// The supervisor as PID 1 with the stand-in controller as its command; `events` is where the
/// controller writes what it did and when.
fn start(site: &Site, health: Option<SocketAddr>, extra: &[&str]) -> (Supervisor, PathBuf) {
    start_with(site, health, extra, None)
}

fn start_with(
    site: &Site,
    health: Option<SocketAddr>,
    extra: &[&str],
    behaviour: Option<&str>,
) -> (Supervisor, PathBuf) {
    start_with_env(site, health, extra, behaviour, &[])
}

fn start_with_env(
    site: &Site,
    health: Option<SocketAddr>,
    extra: &[&str],
    behaviour: Option<&str>,
    env: &[(&str, &str)],
) -> (Supervisor, PathBuf) {
    let events = site.dir.0.join("controller.events");
    let mut args = match health {
        Some(health) => site.run_args_with_health(health, extra),
        None => site.run_args(extra),
    };
    let at = args.iter().position(|a| a == "--").unwrap();
    args.truncate(at);
    args.extend([
        "--pid-file".into(),
        site.pid_file().display().to_string(),
        "--".into(),
    ]);
    args.extend(["sh", CONTROLLER].map(String::from));
    args.extend([&site.config, &site.pid_file(), &events].map(|p| p.display().to_string()));
    args.extend(behaviour.map(String::from));
    let supervisor = Supervisor::start_as_pid1_with_env(&args, env);
    (supervisor, events)
}

fn events(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(' ').map_or(l, |(_, what)| what).to_owned())
        .collect()
}

/// The nginx master below the supervisor, as the host sees it.
fn nginx_master(supervisor: &Supervisor) -> Option<i32> {
    supervisor
        .descendants()
        .into_iter()
        .find(|&pid| nginx_graceful::nginx::tree::title(pid).starts_with("nginx: master process"))
}

fn status(runtime: &Path) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_nginx-graceful"))
        .args(["status", "--json", "--runtime-dir"])
        .arg(runtime)
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {output:?}"))
}

#[test]
fn nginx_is_drained_and_followed_across_a_restart_before_the_controller_hears_sigterm() {
    let site = Site::new();
    let health = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let (mut supervisor, events_file) = start(&site, Some(health), &["--propagation-delay", "1500ms"]);
    supervisor.wait_serving(&site);
    common::wait_until(
        "readiness, from the master the pid file names",
        5 * SECONDS,
        || http::get(health, "/readyz").is_ok_and(|r| r.status == 200),
    );
    let view = status(&site.runtime);
    assert!(view["controller_pid"].is_i64(), "{view}");
    assert!(view["master"]["pid"].is_i64(), "{view}");
    assert_eq!(view["workers"].as_array().unwrap().len(), 2, "{view}");

    // nginx dies (all of its process group, as an OOM kill would): the controller starts it
    // again, and the supervisor follows the new master.
    let first = nginx_master(&supervisor).expect("an nginx master");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until("nginx started again by the controller", 10 * SECONDS, || {
        nginx_master(&supervisor).is_some_and(|m| m != first)
            && http::get(site.addr(), "/").is_ok_and(|r| r.status == 200)
    });
    let second = nginx_master(&supervisor).unwrap();
    assert_eq!(
        events(&events_file)
            .iter()
            .filter(|e| e.starts_with("started nginx"))
            .count(),
        2
    );

    // A download in flight across SIGQUIT; the endpoint removal a second before SIGQUIT.
    let delay = Duration::from_millis(1500);
    let slow_secs = 3;
    let traffic = Traffic::to(site.addr())
        .keepalive(4)
        .one_shot()
        .slow(&site.slow_path(slow_secs))
        .start();
    traffic.wait_served(50);
    traffic.wait_slow_in_flight();

    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    traffic.remove_endpoint_once_unready(&supervisor.log, delay);
    assert_eq!(
        code(supervisor.wait_exit(15 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
    let took = signalled.elapsed();
    let slowest = slow_secs as u32 * SECONDS;
    assert!(
        took >= delay && took <= delay + slowest + SECONDS,
        "drained and exited in {took:?}"
    );

    // The controller heard SIGTERM only once nginx was gone (its `nginx -s quit` found none).
    let seen = events(&events_file);
    assert!(
        seen.contains(&"SIGTERM with no nginx running".to_owned()),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|e| e.starts_with("SIGTERM while nginx runs")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&format!("nginx {} exited with 0", second_in_namespace(&seen))),
        "the restarted nginx quit cleanly: {seen:?}"
    );
    assert!(!common::exists(second));

    // The download in flight at SIGQUIT finished too.
    let report = traffic.finish();
    report.assert_drained_whole(&supervisor.log, slow_secs);
    let (keepalive, one_shot) = (&report.keepalive, &report.one_shot);
    assert!(keepalive.ok > 50, "{keepalive:?}");
    assert!(one_shot.ok > 10, "{one_shot:?}");
    assert!(
        keepalive.told_to_close >= 4 && keepalive.moved == 4,
        "every client was told to close, and left: {keepalive:?}"
    );

    assert_eq!(supervisor.log.phases(), common::DRAIN_PHASES);
    let outcome = supervisor.log.assert_drain_under_load(delay, slowest);
    // ingress-nginx exits 1 when `nginx -s quit` finds no nginx: reported, not passed on.
    assert_eq!(outcome["controller_exit"], "exit code 1", "{outcome}");
    assert_eq!(outcome["controller_killed"], false, "{outcome}");
}

/// The pid (in the pod's namespace) of the second nginx the controller started.
fn second_in_namespace(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| e.strip_prefix("started nginx "))
        .nth(1)
        .expect("a second start")
        .to_owned()
}

#[test]
fn signals_for_nginx_reach_the_master_not_the_controller() {
    let site = Site::new();
    let (mut supervisor, events_file) = start(&site, None, &["--propagation-delay", "0s"]);
    supervisor.wait_serving(&site);
    common::wait_until("both workers", 5 * SECONDS, || {
        nginx_master(&supervisor).is_some_and(|m| common::children_of(m).len() == 2)
    });
    let master = nginx_master(&supervisor).unwrap();
    let workers = common::children_of(master);

    supervisor.signal(1); // SIGHUP
    common::wait_until("a new generation of workers", 5 * SECONDS, || {
        let now = common::children_of(master);
        now.len() == 2 && now.iter().all(|w| !workers.contains(w))
    });
    assert_eq!(
        nginx_master(&supervisor),
        Some(master),
        "the same master reloaded"
    );
    assert!(
        !events(&events_file).iter().any(|e| e.starts_with("SIGHUP")),
        "the controller never saw the SIGHUP"
    );

    supervisor.signal(SIGTERM);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn a_controller_that_hangs_on_sigterm_is_killed_inside_the_grace_period() {
    let site = Site::new();
    let (mut supervisor, events_file) = start_with(
        &site,
        None,
        &[
            "--grace-period",
            "4s",
            "--safety-margin",
            "2s",
            "--propagation-delay",
            "0s",
        ],
        Some("hang-on-term"),
    );
    supervisor.wait_serving(&site);
    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(10 * SECONDS);
    let took = signalled.elapsed();
    assert_eq!(code(status), 3, "escalated: the controller had to be killed");
    // SIGKILL at grace - margin/2 = 3 s: before the kubelet's at 4 s.
    assert!(
        took >= Duration::from_millis(2900) && took < 4 * SECONDS,
        "{took:?}"
    );
    assert!(events(&events_file).contains(&"SIGTERM ignored".to_owned()));
    let outcome = supervisor.log.drain_summary();
    assert_eq!(outcome["controller_killed"], true, "{outcome}");
    assert_eq!(outcome["controller_exit"], "killed by SIGKILL", "{outcome}");
}

#[test]
fn a_master_with_another_name_is_waited_for_all_the_same() {
    let site = Site::new();
    // nginx-debug, as some images run: the kernel names its processes after the binary.
    let link = site.dir.0.join("nginx-debug");
    std::os::unix::fs::symlink(common::nginx_path(), &link).unwrap();
    let link = link.display().to_string();
    let (mut supervisor, events_file) = start_with_env(
        &site,
        None,
        &["--propagation-delay", "200ms"],
        None,
        &[("NGINX_BIN", &link)],
    );
    supervisor.wait_serving(&site);
    assert!(
        supervisor
            .descendants()
            .iter()
            .any(|&pid| common::comm(pid).as_deref() == Some("nginx-debug")),
        "the master runs as nginx-debug"
    );
    drain_with_a_download_in_flight(&site, &mut supervisor, &events_file, Duration::from_millis(200));
}

#[test]
fn a_daemonized_nginx_is_adopted_and_drained_before_the_controller_hears_sigterm() {
    let site = Site::new();
    let (mut supervisor, events_file) =
        start_with(&site, None, &["--propagation-delay", "300ms"], Some("daemon"));
    supervisor.wait_serving(&site);
    // nginx forked away from the controller: its master is now the supervisor's (PID 1's).
    let master = nginx_master(&supervisor).expect("an nginx master");
    assert_eq!(
        common::stat_fields(master).map(|(_, ppid)| ppid),
        Some(supervisor.pid)
    );

    drain_with_a_download_in_flight(&site, &mut supervisor, &events_file, Duration::from_millis(300));
    assert!(!common::exists(master));
}

/// SIGTERM while a 2 s download is in flight: it finishes, the supervisor exits 0 once it has
/// (within the delay + 2 s + 0.5 s), and the controller heard its SIGTERM only once nginx was
/// gone.
fn drain_with_a_download_in_flight(
    site: &Site,
    supervisor: &mut Supervisor,
    events_file: &Path,
    delay: Duration,
) {
    let slow = http::get_in_background(site.addr(), &site.slow_path(2));
    common::wait_for_busy_worker(supervisor.pid);
    supervisor.signal(SIGTERM);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    assert_eq!(slow.join().unwrap().map(|r| r.status.as_u16()), Ok(200));
    supervisor.log.assert_drain_under_load(delay, 2 * SECONDS);
    let seen = events(events_file);
    assert!(
        seen.contains(&"SIGTERM with no nginx running".to_owned()),
        "{seen:?}"
    );
}
