//! `drain` without a supervisor, against what it finds: a drain flag a previous life of the
//! container left, a stale `.oldbin` naming another nginx, a pid file that is missing, a FIFO, a
//! device; and `post-start`, which clears what a killed hook left.

use std::process::Command;
use std::time::{Duration, Instant};

use super::common;
use common::{Site, Supervisor, code, drain_args, http};

const SECONDS: Duration = Duration::from_secs(1);

/// nginx as PID 1 of a PID namespace of its own (as in a container), its pid file and drain
/// flag in the site's directory outside it, as in a pod's emptyDir. Killed when dropped.
struct ContainerNginx {
    unshare: Supervisor,
    /// nginx's pid as the host sees it; inside, it is 1.
    pid: i32,
}

impl ContainerNginx {
    fn start(site: &Site) -> Self {
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
            .arg(common::nginx_path())
            .args(&site.nginx_command()[2..]);
        let unshare = Supervisor::spawn_command(&mut command);
        common::wait_until("nginx as PID 1 serving", 10 * SECONDS, || {
            site.serves() && http::get(site.addr(), "/").is_ok()
        });
        let pid = common::children_of(unshare.pid)[0];
        Self { unshare, pid }
    }

    /// `nginx-graceful ARGS` inside the container (its PID and mount namespaces), as the
    /// kubelet runs a hook: it dies with PID 1.
    fn exec(&self, args: &[String]) -> Supervisor {
        let mut command = Command::new("nsenter");
        command
            .args(["--target", &self.pid.to_string(), "--pid", "--mount"])
            .arg(common::bin())
            .args(args);
        Supervisor::spawn_command(&mut command)
    }

    fn wait_exit(&mut self) {
        self.unshare.wait_exit(10 * SECONDS);
    }
}

/// `post-start` for the site, as the preStop-only recipe's postStart hook runs it.
fn post_start_args(site: &Site) -> Vec<String> {
    ["--log-format", "json", "post-start", "--runtime-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([site.runtime.display().to_string()])
        .collect()
}

#[test]
fn a_drain_flag_from_a_previous_life_of_the_container_is_not_obeyed() {
    // It used to stay in the emptyDir when nginx, PID 1, exited and the kernel killed the hook:
    // the restarted container answered `Connection: close` (and /readyz 503) for good.
    let site = Site::new();
    let flag = site.runtime.join("draining");
    let mut first_life = ContainerNginx::start(&site);
    let mut hook = first_life.exec(&drain_args(&site, &["--propagation-delay", "300ms"]));
    common::wait_until("the drain flag", 5 * SECONDS, || flag.exists());
    // What a hook killed before it could lower the flag leaves behind.
    let left_behind = std::fs::read(&flag).unwrap();
    first_life.wait_exit();
    let hook_status = hook.wait_exit(10 * SECONDS);
    // The hook lowers the flag when the last worker exits, before the master does: in practice
    // it wins the race with the kernel's kill. Either way it does not reach its summary.
    let lowered_in_time = !flag.exists();
    eprintln!(
        "hook exit {}, flag lowered before the kill: {lowered_in_time}",
        code(hook_status)
    );

    for (what, flag_now) in [
        ("as the hook leaves it", None),
        ("as a hook killed earlier leaves it", Some(&left_behind)),
    ] {
        if let Some(record) = flag_now {
            std::fs::write(&flag, record).unwrap();
        }
        let _ = std::fs::remove_file(site.pid_file());
        let next_life = ContainerNginx::start(&site);
        let mut post_start = next_life.exec(&post_start_args(&site));
        let post_start_status = post_start.wait_exit(10 * SECONDS);
        let reply = http::get(site.addr(), "/").unwrap();
        assert!(
            !reply.close,
            "{what}: the new nginx obeys the old flag; post-start: {:?}",
            post_start.log.lines()
        );
        assert!(!flag.exists(), "{what}: the stale flag is gone");
        assert_eq!(code(post_start_status), 0, "{what}: {:?}", post_start.log.lines());
        drop(next_life);
    }
}

#[test]
fn post_start_keeps_the_flag_of_a_drain_under_way() {
    let site = Site::new();
    let nginx = ContainerNginx::start(&site);
    let flag = site.runtime.join("draining");
    let mut hook = nginx.exec(&drain_args(&site, &["--propagation-delay", "3s"]));
    common::wait_until("the drain flag", 5 * SECONDS, || flag.exists());
    let mut post_start = nginx.exec(&post_start_args(&site));
    assert_eq!(code(post_start.wait_exit(10 * SECONDS)), 0);
    assert!(flag.exists(), "{:?}", post_start.log.lines());
    assert!(
        http::get(site.addr(), "/").unwrap().close,
        "keep-alive clients are still told to close"
    );
    // The drain goes on to its end; the container with it.
    let _ = hook.wait_exit(10 * SECONDS);
}

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
    // Its budget is spent by then: nginx is stopped, by SIGTERM if need be (or SIGKILL just
    // before the hook exits, which the kernel carries out a moment later).
    assert!([0, 3].contains(&code(status)), "{:?}", hook.log.lines());
    common::wait_until("nginx gone", SECONDS, || nginx.all_gone());
}

#[test]
fn a_fifo_as_drain_lock_does_not_stop_the_drain() {
    // Any uid in the pod can write the runtime dir: a FIFO there used to block every direct
    // `drain` in its open, before it signalled anything.
    let site = Site::new();
    std::fs::create_dir_all(&site.runtime).unwrap();
    let lock = site.runtime.join("drain.lock");
    nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let nginx = site.start_daemon();
    let started = Instant::now();
    let mut hook = Supervisor::start(&drain_args(&site, &["--propagation-delay", "0s"]));
    let status = hook.wait_exit(10 * SECONDS);
    let took = started.elapsed();
    assert_eq!(code(status), 0, "{:?}", hook.log.lines());
    assert!(nginx.all_gone(), "nginx is drained");
    assert!(took < 5 * SECONDS, "{took:?}");
    assert!(
        hook.log.contains("cannot open the drain lock") && hook.log.contains("not a regular file"),
        "{:?}",
        hook.log.lines()
    );
}
