//! The supervisor as PID 1 of its own PID namespace, the way a container runs it.

use test_support as common;

use std::time::Duration;

use common::{Site, Supervisor, code};

const SECONDS: Duration = Duration::from_secs(1);

#[test]
fn as_pid1_it_reaps_orphans_and_drains_on_sigterm() {
    let site = Site::new();
    // A wrapper that leaves an orphan behind before it becomes nginx: the orphan's parent is
    // gone, so only PID 1 can reap it.
    let nginx = site.nginx_command()[1..]
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let wrapper = format!("(sleep 0.2 &) ; exec {nginx}");
    let mut args = site.run_args(&["--propagation-delay", "200ms"]);
    let at = args.iter().position(|a| a == "--").unwrap();
    args.truncate(at);
    args.extend(["--".into(), "sh".into(), "-c".into(), wrapper]);
    let mut supervisor = Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    let started = supervisor.log.wait_phase("starting", SECONDS);
    assert_eq!(started["role"], "Pid1", "{started}");

    common::wait_until("the orphaned sleep to be reaped", 5 * SECONDS, || {
        supervisor
            .descendants()
            .iter()
            .all(|&pid| common::comm(pid).as_deref() == Some("nginx"))
    });
    assert!(
        supervisor
            .descendants()
            .iter()
            .all(|&pid| common::stat_fields(pid).is_some_and(|(state, _)| state != 'Z')),
        "no zombie below PID 1"
    );

    supervisor.signal(15);
    assert_eq!(
        code(supervisor.wait_exit(10 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
    assert_eq!(supervisor.log.phases(), common::DRAIN_PHASES);
}

#[test]
fn nginx_dies_with_a_killed_pid1() {
    let site = Site::new();
    let mut supervisor = Supervisor::start_as_pid1(&site.run_args(&[]));
    supervisor.wait_serving(&site);
    // The master forks its second worker a moment after the first one answers.
    common::wait_until("the master and its 2 workers", 5 * SECONDS, || {
        supervisor.descendants().len() == 3
    });
    let nginx = supervisor.descendants();
    supervisor.signal(9);
    // The kernel ends a PID namespace with its PID 1: nothing of it outlives the supervisor.
    supervisor.wait_exit(10 * SECONDS);
    common::wait_until("nginx to be gone", 5 * SECONDS, || {
        nginx.iter().all(|&pid| !common::exists(pid))
    });
    assert!(!site.serves());
}
