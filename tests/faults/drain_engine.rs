//! The drain's engine under faults, with real nginx under the supervisor as PID 1: a master
//! killed during the propagation delay, a supervisor with no file descriptor left, hooks that
//! leave a background process behind.

use std::time::{Duration, Instant};

use test_support as common;

use common::{Site, Supervisor, code, http};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);

#[test]
fn a_master_killed_during_the_delay_leaves_workers_that_serve_to_its_end_then_quit() {
    // It used to leave the orphaned workers without SIGQUIT: they kept accepting after the
    // "quitting" phase and were SIGKILLed at the deadline (exit 3).
    let site = Site::new();
    let path = site.slow_path(3);
    let args = site.run_args(&["--propagation-delay", "2s", "--grace-period", "12s"]);
    let mut supervisor = Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    let master = supervisor.master();
    let download = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(master);

    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until("the master to be gone", 2 * SECONDS, || !common::exists(master));
    // The endpoint removal has not landed yet: the orphaned workers still serve new clients.
    let during = http::get(site.addr(), "/");
    assert!(
        during.as_ref().is_ok_and(|r| r.status == 200),
        "served after the master's death, within the delay: {during:?}"
    );

    // At the delay's end the workers are told to quit: their listeners close at once.
    supervisor.log.wait_phase("quitting", 5 * SECONDS);
    common::wait_until("the workers to close their listeners", SECONDS, || !site.serves());
    let reply = download
        .join()
        .unwrap()
        .expect("the download in flight completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body_len, 3 * common::SLOW_RATE);

    let status = supervisor.wait_exit(15 * SECONDS);
    let summary = supervisor.log.drain_summary();
    assert_eq!(code(status), 128 + SIGKILL, "the master's status: {summary}");
    assert_eq!(summary["outcome"], "nginx_failed", "{summary}");
    assert_eq!(summary["master_died_before_quit"], true, "{summary}");
    assert_eq!(summary["killed"], 0, "{summary}");
    let message = summary["message"].as_str().unwrap_or_default();
    assert!(message.contains("master died before SIGQUIT"), "{summary}");
    // The workers ended with the download, not at the escalation (10 s into the drain).
    let elapsed = summary["elapsed_ms"].as_u64().unwrap();
    assert!(elapsed < 6_000, "the drain took {elapsed} ms: {summary}");
    let phases = supervisor.log.phases();
    assert!(
        !phases.iter().any(|p| p == "fast_shutdown" || p == "killing"),
        "{phases:?}"
    );
    assert!(
        supervisor.log.contains("the nginx master has died"),
        "the death is reported when it happens"
    );
}

#[test]
fn a_master_that_quits_cleanly_during_the_delay_is_its_own_exit_code() {
    // A leftover `preStop: nginx -s quit` beside `run`: the master quits on its own, exit code
    // 0. That used to be reported as a failed nginx, exit 4 (a status not ours to know), though
    // under `run` the master's own status is the exit code.
    let site = Site::new();
    let args = site.run_args(&["--propagation-delay", "2s", "--grace-period", "12s"]);
    let mut supervisor = Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    let master = supervisor.master();

    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .unwrap();

    let status = supervisor.wait_exit(15 * SECONDS);
    let summary = supervisor.log.drain_summary();
    assert_eq!(code(status), 0, "the master's own status: {summary}");
    assert_eq!(summary["outcome"], "nginx_exited", "{summary}");
    assert_eq!(summary["exit_code"], 0, "{summary}");
    assert_eq!(summary["master_died_before_quit"], true, "{summary}");
    assert_eq!(summary["killed"], 0, "{summary}");
    let message = summary["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the nginx master quit before the drain asked it"),
        "{summary}"
    );
    assert!(!message.contains("died"), "a clean quit is no death: {summary}");
}

/// Lowers the open-files limit of `pid` to its lowest free descriptor: from then on, every
/// descriptor it tries to open (a /proc file, a pidfd, a socket) fails with EMFILE.
fn exhaust_file_descriptors(pid: i32) {
    let open: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).unwrap();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={lowest_free}:")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");
}

#[test]
fn a_supervisor_out_of_file_descriptors_waits_for_what_it_cannot_see() {
    // /proc reads that failed used to read as "no process": the drain reported every process
    // exited 0.2 ms after SIGQUIT (exit 0) and the download in flight was cut.
    let site = Site::new();
    let path = site.slow_path(2);
    // No watch: closing its inotify descriptor at the drain would free one.
    let args = site.run_args(&["--propagation-delay", "200ms", "--no-watch"]);
    let mut supervisor = Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    let download = http::get_in_background(site.addr(), &path);
    common::wait_for_busy_worker(supervisor.pid);

    exhaust_file_descriptors(supervisor.pid);
    let signalled = Instant::now();
    supervisor.signal(SIGTERM);
    let reply = download
        .join()
        .unwrap()
        .expect("the download in flight at SIGTERM completes");
    assert_eq!(reply.body_len, 2 * common::SLOW_RATE);
    let status = supervisor.wait_exit(15 * SECONDS);
    assert!(
        signalled.elapsed() > SECONDS,
        "the supervisor waited for the download"
    );

    let summary = supervisor.log.drain_summary();
    // It could not read /proc, but saw the master exit (its pidfd, held from the start) and no
    // child left (waitid): the end was seen, and the summary says what was not.
    assert_eq!(summary["observed"], "with_gaps", "{summary}");
    let reason = summary["unobserved"].as_str().unwrap_or_default();
    assert!(reason.contains("Too many open files"), "{summary}");
    let message = summary["message"].as_str().unwrap_or_default();
    assert!(message.contains("could not always be seen"), "{summary}");
    assert_eq!(summary["outcome"], "clean", "{summary}");
    assert_eq!(code(status), 0, "{summary}");
    assert!(
        summary["elapsed_ms"].as_u64().unwrap() >= 1_000,
        "the drain ended with the download: {summary}"
    );
}

#[test]
fn hooks_that_leave_a_background_process_take_no_longer_than_themselves() {
    // A hook's leftover held its output pipes open, and the supervisor waited 200 ms for each
    // pipe: 400 ms per hook, outside the plan's check.
    let site = Site::new();
    let hook = "sh -c 'echo deregistering; sleep 30 &'";
    let args = site.run_args(&[
        "--propagation-delay",
        "100ms",
        "--pre-drain-exec",
        hook,
        "--pre-drain-exec",
        hook,
    ]);
    let mut supervisor = Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(10 * SECONDS);
    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());

    let hooks = supervisor.log.phase_ms("pre_drain_hooks").unwrap();
    let delay = supervisor.log.phase_ms("propagation_delay").unwrap();
    assert!(
        delay - hooks < 200,
        "two hooks that each exit at once took {} ms",
        delay - hooks
    );
    let output = supervisor
        .log
        .events()
        .into_iter()
        .filter(|e| e["message"] == "deregistering")
        .count();
    assert_eq!(output, 2, "each hook's output is logged");
    let left = supervisor.log.wait_for("the leftovers reported", SECONDS, |l| {
        l.contains("left processes running")
    });
    assert!(left.contains("(sleep)"), "what was left is named: {left}");
}
