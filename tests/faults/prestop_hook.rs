//! `drain` without a supervisor, against what it finds: a stale `.oldbin` naming another nginx,
//! a pid file that is missing, a FIFO, a device, a lock held for good.

use std::process::Command;
use std::time::{Duration, Instant};

use super::common;
use common::{Site, Supervisor, code, drain_args};

const SECONDS: Duration = Duration::from_secs(1);

#[test]
fn a_stale_oldbin_naming_another_nginx_is_left_alone() {
    // It used to drain the other nginx too.
    let site = Site::new();
    let other = Site::new();
    let nginx = site.start_daemon();
    let bystander = other.start_daemon();
    let oldbin = site.dir.0.join("nginx.pid.oldbin");
    std::fs::write(&oldbin, format!("{}\n", bystander.master)).unwrap();

    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 0, "{:?}", hook.log.lines());
    assert!(nginx.all_gone(), "the nginx the pid file names is drained");
    assert!(
        hook.log.contains("not the old master of this nginx"),
        "{:?}",
        hook.log.lines()
    );
    assert!(
        other.serves() && !bystander.all_gone(),
        "the other nginx still serves"
    );
    assert!(
        !bystander.log_text().contains("signal"),
        "no signal reached the other nginx: {}",
        bystander.log_text()
    );

    // Where no nginx runs (no pid file), the stale .oldbin alone names nothing to drain either.
    let empty = Site::new();
    std::fs::write(
        empty.dir.0.join("nginx.pid.oldbin"),
        format!("{}\n", bystander.master),
    )
    .unwrap();
    let mut hook = Supervisor::start(&drain_args(&empty, &["--propagation-delay", "0s"]));
    assert_eq!(code(hook.wait_exit(10 * SECONDS)), 23, "{:?}", hook.log.lines());
    assert!(other.serves() && !bystander.log_text().contains("signal"));
}

#[test]
fn a_pid_file_that_does_not_exist_is_reported_not_taken_for_success() {
    // It used to exit 0, "nothing to drain": a typo'd path in a manifest looked like success.
    let site = Site::new();
    let run = |pid_file: &str| {
        let mut args = drain_args(&site, &["--propagation-delay", "0s"]);
        let at = args.iter().position(|a| a == "--pid-file").unwrap();
        args[at + 1] = pid_file.to_owned();
        let mut hook = Supervisor::start(&args);
        let status = hook.wait_exit(10 * SECONDS);
        (code(status), hook.log.lines().join("\n"))
    };
    let no_directory = site.dir.0.join("no-such-dir/nginx.pid");
    let (status, log) = run(&no_directory.display().to_string());
    assert_eq!(status, 23, "{log}");
    assert!(
        log.contains("nothing to drain")
            && log.contains("directory of pid file")
            && log.contains("--pid-file"),
        "{log}"
    );
    let typo = site.dir.0.join("ngnix.pid");
    let (status, log) = run(&typo.display().to_string());
    assert_eq!(status, 23, "{log}");
    assert!(log.contains("does not exist, and no drain is recorded"), "{log}");

    // nginx ran here and is gone: a pid file naming a process that has exited.
    let mut exited = Command::new("true").spawn().unwrap();
    let gone = exited.id();
    exited.wait().unwrap();
    std::fs::write(site.pid_file(), format!("{gone}\n")).unwrap();
    let (status, log) = run(&site.pid_file().display().to_string());
    assert_eq!(status, 0, "{log}");

    // A repeat of the hook after a drain (nginx removed its pid file) reports that drain.
    let _nginx = site.start_daemon();
    let (status, log) = run(&site.pid_file().display().to_string());
    assert_eq!(status, 0, "{log}");
    assert!(!site.pid_file().exists());
    let (status, log) = run(&site.pid_file().display().to_string());
    assert_eq!(status, 0, "{log}");
    assert!(log.contains("the last drain ended"), "{log}");
}

/// `drain` with `pid_file` as its pid file, under a 1 GiB address-space limit: a read without
/// bound fails fast instead of taking the machine's memory.
fn drain_bounded(site: &Site, pid_file: &str) -> (i32, String, Duration) {
    let mut args = drain_args(site, &["--propagation-delay", "0s"]);
    let at = args.iter().position(|a| a == "--pid-file").unwrap();
    args[at + 1] = pid_file.to_owned();
    let started = Instant::now();
    let mut hook = Supervisor::spawn_command(
        Command::new("prlimit")
            .arg("--as=1073741824")
            .arg(common::bin())
            .args(&args),
    );
    let status = hook.wait_exit(10 * SECONDS);
    (code(status), hook.log.lines().join("\n"), started.elapsed())
}

#[test]
fn a_fifo_as_pid_file_is_refused_at_once() {
    // It used to block `drain` forever on the open.
    let site = Site::new();
    let fifo = site.dir.0.join("nginx.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (status, log, took) = drain_bounded(&site, &fifo.display().to_string());
    assert_eq!(status, 17, "{log}");
    assert!(log.contains("it is a FIFO, not a regular file"), "{log}");
    assert!(took < 5 * SECONDS, "{took:?}");
}

#[test]
fn a_device_or_a_huge_file_as_pid_file_is_refused_without_reading_it_all() {
    // /dev/zero used to grow `drain` by gigabytes.
    let site = Site::new();
    let (status, log, _) = drain_bounded(&site, "/dev/zero");
    assert_eq!(status, 17, "{log}");
    assert!(
        log.contains("it is a character device, not a regular file"),
        "{log}"
    );

    let huge = site.dir.0.join("huge.pid");
    std::fs::write(&huge, "1".repeat(1 << 20)).unwrap();
    let (status, log, _) = drain_bounded(&site, &huge.display().to_string());
    assert_eq!(status, 17, "{log}");
    assert!(log.contains("it holds more than 64 bytes"), "{log}");
}

#[test]
fn a_drain_lock_held_for_good_is_waited_for_within_the_grace_period_only() {
    // A hook that never released the lock used to make every later hook wait forever.
    let site = Site::new();
    std::fs::create_dir_all(&site.runtime).unwrap();
    let lock = std::fs::File::create(site.runtime.join("drain.lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let nginx = site.start_daemon();
    let started = Instant::now();
    let mut hook = Supervisor::start(&drain_args(
        &site,
        &[
            "--grace-period",
            "2s",
            "--safety-margin",
            "500ms",
            "--propagation-delay",
            "0s",
        ],
    ));
    let status = hook.wait_exit(10 * SECONDS);
    let took = started.elapsed();
    assert!(
        hook.log.contains("still holds the lock after the grace period"),
        "{:?}",
        hook.log.lines()
    );
    assert!((2 * SECONDS..5 * SECONDS).contains(&took), "{took:?}");
    // Its budget is spent by then: nginx is stopped, by SIGTERM if need be.
    assert!([0, 3].contains(&code(status)), "{:?}", hook.log.lines());
    assert!(nginx.all_gone());
}
