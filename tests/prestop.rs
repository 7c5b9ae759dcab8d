//! `drain`, the preStop hook: through a `run` supervisor in the kubelet's order, and alone against
//! an nginx found through its pid file.

use test_support as common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::http;
use common::{Site, Supervisor, Traffic, code, drain_args};

const SECONDS: Duration = Duration::from_secs(1);
/// A budget a 30 s request cannot fit: SIGTERM to nginx at 2 s, SIGKILL at 2.5 s.
const TIGHT_BUDGET: &[&str] = &[
    "--grace-period",
    "3s",
    "--safety-margin",
    "1s",
    "--propagation-delay",
    "0s",
];

#[test]
fn kubelet_order_prestop_drain_then_sigterm_loses_no_request() {
    let site = Site::new();
    let grace = Duration::from_secs(10);
    // The endpoint removal comes half a second into the drain: a second before SIGQUIT.
    let delay = Duration::from_millis(1500);
    let slow_secs = 3;
    let mut pid1 = Supervisor::start_as_pid1(&site.run_args(&[
        "--grace-period",
        "10s",
        "--propagation-delay",
        "1500ms",
    ]));
    pid1.wait_serving(&site);
    let traffic = Traffic::to(site.addr())
        .keepalive(4)
        .one_shot()
        .slow(&site.slow_path(slow_secs))
        .start();
    traffic.wait_served(50);
    traffic.wait_slow_in_flight();

    // The kubelet: endpoint removal starts, and the hook runs inside the container (its PID
    // namespace), where it dies with PID 1 if PID 1 exits first.
    let terminating = Instant::now();
    let mut hook = Command::new("nsenter");
    hook.args([
        "--target",
        &pid1.pid.to_string(),
        "--pid",
        "--mount",
        common::bin(),
    ])
    .args(drain_args(&site, &[]));
    let mut hook = Supervisor::spawn_command(&mut hook);
    traffic.remove_endpoint_once_unready(&pid1.log, delay);
    let hook_status = hook.wait_exit(grace);
    // Then SIGTERM to PID 1, which may already be on its way out.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1.pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = pid1.wait_exit(grace);
    let took = terminating.elapsed();

    assert_eq!(
        code(hook_status),
        0,
        "the hook finished, it was not killed: {:?}",
        hook.log.lines()
    );
    assert_eq!(code(status), 0, "{:?}", pid1.log.lines());
    assert_eq!(pid1.log.phase_count("unready"), 1, "one drain");
    let relayed: Vec<String> = hook.log.phases();
    assert!(
        relayed.contains(&"quitting".to_string()) && relayed.contains(&"stopped".to_string()),
        "{relayed:?}"
    );
    let report = traffic.finish();
    report.assert_drained_whole(&pid1.log, slow_secs);
    let slowest = slow_secs as u32 * SECONDS;
    pid1.log.assert_drain_under_load(delay, slowest);
    // From the kubelet's first step to PID 1's exit: the drain, and the hook's start and the
    // SIGTERM around it.
    assert!(
        took >= delay && took <= delay + slowest + SECONDS,
        "terminated in {took:?}"
    );
    let (keepalive, one_shot) = (&report.keepalive, &report.one_shot);
    assert!(
        keepalive.ok > 50 && one_shot.ok > 20,
        "{keepalive:?} {one_shot:?}"
    );
    assert!(
        keepalive.told_to_close >= 4 && keepalive.moved == 4,
        "every client was told to close, and left: {keepalive:?}"
    );
}

#[test]
fn sigterm_first_then_a_late_hook_follows_the_same_drain() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "1s"]);
    supervisor.signal(15);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);

    let mut hook = Supervisor::start(&drain_args(&site, &[]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);

    assert_eq!(supervisor.log.phase_count("unready"), 1);
    assert!(supervisor.log.contains("already draining, the client follows"));
    let summary = hook.log.drain_summary();
    assert_eq!(summary["outcome"], "clean");
    assert!(hook.log.phases().contains(&"quitting".to_string()));
}

#[test]
fn two_hooks_through_a_supervisor_share_one_drain() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_serving(&site, &["--propagation-delay", "500ms"]);
    let mut first = Supervisor::start(&drain_args(&site, &[]));
    let mut second = Supervisor::start(&drain_args(&site, &[]));
    assert_eq!(code(first.wait_exit(10 * SECONDS)), 0);
    assert_eq!(code(second.wait_exit(10 * SECONDS)), 0);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
    assert_eq!(supervisor.log.phase_count("unready"), 1);
}

#[test]
fn without_a_supervisor_it_drains_a_daemon_nginx_found_by_its_pid_file() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let path = site.slow_path(2);
    let request = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(nginx.master);

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "300ms"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());

    assert_eq!(
        request
            .join()
            .unwrap()
            .expect("the request in flight finishes")
            .status,
        200
    );
    assert!(nginx.all_gone(), "the master and every worker have exited");
    assert_eq!(
        hook.log.phases(),
        [
            "unready",
            "keepalive_close",
            "propagation_delay",
            "quitting",
            "stopped"
        ]
    );
    let summary = hook
        .log
        .assert_drain_under_load(Duration::from_millis(300), 2 * SECONDS);
    assert_eq!(summary["connections_at_quit"], 1, "{summary}");
}

#[test]
fn without_a_pid_file_it_drains_the_nginx_whose_pid_file_nginx_t_names() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let (_nginx_dir, path) = site.path_with_its_nginx();
    let runtime = site.runtime.display().to_string();
    let args = [
        "--log-format",
        "json",
        "drain",
        "--runtime-dir",
        &runtime,
        "--propagation-delay",
        "300ms",
    ];
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut hook = Supervisor::start_with_env(&args, &[("PATH", &path)]);
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(nginx.all_gone(), "the master and every worker have exited");
    assert_eq!(hook.log.phases().last().map(String::as_str), Some("stopped"));
}

#[test]
fn a_stale_pid_file_is_refused_and_the_process_it_names_is_untouched() {
    let site = Site::new();
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = bystander.id() as i32;
    std::fs::write(site.pid_file(), format!("{pid}\n")).unwrap();

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 15);
    let line = hook.log.lines().join("\n");
    assert!(
        line.contains(&format!("pid {pid}"))
            && line.contains("sleep 30")
            && line.contains("nothing was signalled"),
        "{line}"
    );
    assert_eq!(
        common::stat_fields(pid).unwrap().0,
        'S',
        "the bystander still sleeps"
    );
    assert!(bystander.try_wait().unwrap().is_none());
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn pid_files_that_are_garbage_empty_or_missing() {
    let site = Site::new();
    // Missing, with no drain recorded: a wrong path more often than an nginx gone (see
    // tests/faults/prestop_hook.rs).
    for (content, expected) in [(Some("not-a-pid\n"), 17), (Some(""), 17), (None, 23)] {
        match content {
            Some(text) => std::fs::write(site.pid_file(), text).unwrap(),
            None => {
                let _ = std::fs::remove_file(site.pid_file());
            }
        }
        let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
        assert_eq!(
            code(hook.wait_exit(10 * SECONDS)),
            expected,
            "{content:?}: {:?}",
            hook.log.lines()
        );
    }
}

#[test]
fn two_hooks_at_once_without_a_supervisor_send_one_sigquit() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let mut first = Supervisor::start(&drain_args(&site, &["--propagation-delay", "500ms"]));
    let mut second = Supervisor::start(&drain_args(&site, &["--propagation-delay", "500ms"]));
    assert_eq!(code(first.wait_exit(10 * SECONDS)), 0, "{:?}", first.log.lines());
    assert_eq!(
        code(second.wait_exit(10 * SECONDS)),
        0,
        "{:?}",
        second.log.lines()
    );
    assert!(nginx.all_gone());
    assert_eq!(
        nginx.log_text().matches("signal 3 (SIGQUIT) received").count(),
        1,
        "{}",
        nginx.log_text()
    );
    let outcomes: Vec<_> = [&first, &second]
        .iter()
        .map(|h| h.log.drain_summary()["outcome"].clone())
        .collect();
    assert_eq!(outcomes, ["clean", "clean"]);
}

#[test]
fn a_connection_held_past_the_budget_escalates_at_the_deadline() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let _request = http::get_in_background(site.addr(), &site.slow_path(30));
    common::wait_for_busy_worker(nginx.master);
    let started = Instant::now();
    let mut hook = Supervisor::start(&drain_args(&site, TIGHT_BUDGET));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 3);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    // SIGTERM to nginx at grace - margin = 2 s into the drain, not before.
    let fast_shutdown = hook
        .log
        .drain_offset("fast_shutdown")
        .unwrap_or_else(|| panic!("no fast shutdown: {:?}", hook.log.phases()));
    assert!(
        fast_shutdown >= 2 * SECONDS && fast_shutdown <= Duration::from_millis(2300),
        "SIGTERM to nginx {fast_shutdown:?} into the drain"
    );
    assert!(nginx.all_gone());

    // Hooks are delivered at least once: a repeat reports the same outcome.
    let mut again = Supervisor::start(&drain_args(&site, TIGHT_BUDGET));
    assert_eq!(code(again.wait_exit(10 * SECONDS)), 3, "{:?}", again.log.lines());
}

#[test]
fn a_control_socket_that_does_not_answer_falls_back_to_draining_directly() {
    let site = Site::new();
    let nginx = site.start_daemon();
    std::fs::create_dir_all(&site.runtime).unwrap();
    // A socket file nobody listens on: a supervisor that died without cleaning up.
    drop(std::os::unix::net::UnixListener::bind(site.runtime.join("control.sock")).unwrap());

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(hook.log.contains("does not answer: draining directly"));
    assert!(nginx.all_gone());
}

#[test]
fn a_master_owned_by_another_user_is_refused() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let mut args = vec![
        "--reuid=nobody".to_string(),
        "--regid=nogroup".into(),
        "--clear-groups".into(),
        common::bin().into(),
    ];
    args.extend(drain_args(&site, &["--propagation-delay", "0s"]));
    let mut hook = Supervisor::spawn_command(Command::new("setpriv").args(&args));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 16, "{:?}", hook.log.lines());
    assert!(hook.log.contains("belongs to uid 0"), "{:?}", hook.log.lines());
    assert!(site.serves() && !nginx.all_gone(), "nginx was left alone");
    assert!(
        !nginx.log_text().contains("signal"),
        "no signal reached nginx: {}",
        nginx.log_text()
    );
}

/// Starts a binary upgrade (SIGUSR2) and waits for the new master; returns every nginx pid.
fn upgrade(site: &Site, nginx: &common::DaemonNginx) -> Vec<i32> {
    // nginx starts a new master from its binary, a child of the old one, and renames its pid
    // file to .oldbin.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nginx.master),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let oldbin = site.dir.0.join("nginx.pid.oldbin");
    common::wait_until("the new master", 5 * SECONDS, || {
        let new_master: i32 = std::fs::read_to_string(site.pid_file())
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        oldbin.exists()
            && new_master > 0
            && new_master != nginx.master
            && common::children_of(new_master).len() == 2
    });
    let mut everything = common::descendants_of(nginx.master);
    everything.push(nginx.master);
    everything
}

#[test]
fn during_a_binary_upgrade_both_masters_are_drained() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let everything = upgrade(&site, &nginx);

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(hook.log.contains("binary upgrade"), "{:?}", hook.log.lines());
    assert!(
        common::all_exited(&everything),
        "an nginx process is still running: {everything:?}"
    );
    assert!(!site.serves());
}

#[test]
fn a_new_master_the_pid_file_does_not_name_yet_is_drained_too() {
    let site = Site::new();
    let nginx = site.start_daemon();
    let everything = upgrade(&site, &nginx);
    // As if the hook had read the pid file just before the new master wrote it.
    std::fs::remove_file(site.pid_file()).unwrap();

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(
        hook.log.contains("another nginx master below"),
        "{:?}",
        hook.log.lines()
    );
    assert!(
        common::all_exited(&everything),
        "an nginx process is still running: {everything:?}"
    );
}
