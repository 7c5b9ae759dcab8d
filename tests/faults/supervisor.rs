//! Faults around the supervisor itself: a stderr that fails or stalls, a COMMAND that wraps
//! nginx in a shell, a signal during the start-time config test, a huge config, a master that
//! crashes while serving. Each ends in a drain that really happened, or in a prompt exit with
//! the right code and one summary line.

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::Signal;
use serde_json::Value;
use test_support as common;

const TERM: i32 = Signal::SIGTERM as i32;
const HUP: i32 = Signal::SIGHUP as i32;

/// The supervisor with stderr (and stdout, as `2>&1` does) into a pipe the test holds; killed,
/// with everything below it, if the test fails first.
struct Unlogged {
    child: Child,
    exited: bool,
}

impl Unlogged {
    fn start(args: &[String], log: OwnedFd) -> Self {
        let child = Command::new(common::bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Self { child, exited: false }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        let signal = Signal::try_from(signal).unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Its exit code; fails the test after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited = true;
                return common::code(status);
            }
            assert!(
                Instant::now() < deadline,
                "the supervisor still runs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Unlogged {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        for pid in common::descendants_of(self.pid()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outcome the supervisor recorded in its runtime directory: what it logged last.
fn recorded_outcome(site: &common::Site) -> Value {
    let text = std::fs::read_to_string(site.runtime.join("drain-outcome.json"))
        .unwrap_or_else(|e| panic!("no outcome recorded: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The site's serving workers, as the supervisor's reload confirmation reads them.
fn workers(master: i32) -> Vec<i32> {
    let mut workers = nginx_graceful::reload::serving_workers(master);
    workers.sort();
    workers
}

/// The nginx master below `supervisor`, once nginx serves `site`.
fn wait_master(site: &common::Site, supervisor: i32) -> i32 {
    let mut master = None;
    common::wait_until(
        "nginx to serve under the supervisor",
        Duration::from_secs(10),
        || {
            master = common::children_of(supervisor)
                .into_iter()
                .find(|&pid| common::comm(pid).as_deref() == Some("nginx"));
            master.is_some_and(|m| workers(m).len() == 2) && common::http::get(site.addr(), "/").is_ok()
        },
    );
    master.unwrap()
}

/// SIGTERM with a 2 s download in flight and a 1 s propagation delay: the download ends whole,
/// the supervisor exits 0, and its recorded outcome is a clean drain that SIGQUIT reached with
/// the download open.
fn assert_drains_under_load(site: &common::Site, supervisor: &mut Unlogged) {
    let path = site.slow_path(2);
    let traffic = common::Traffic::to(site.addr()).slow(&path).start();
    traffic.wait_slow_in_flight();
    supervisor.signal(TERM);
    let code = supervisor.wait_exit(Duration::from_secs(10));
    let report = traffic.finish();
    report.assert_no_failures();
    assert_eq!(code, 0, "exit code");
    let outcome = recorded_outcome(site);
    assert_eq!(outcome["outcome"], "clean", "{outcome}");
    assert!(
        outcome["connections_at_quit"].as_u64() >= Some(1),
        "the download was in flight at SIGQUIT: {outcome}"
    );
    assert!(
        outcome["elapsed_ms"].as_u64() >= Some(1000),
        "the propagation delay ran: {outcome}"
    );
}

#[test]
fn a_log_reader_that_went_away_does_not_end_the_supervisor() {
    // It used to abort (exit 134, 101 in a debug build) at the first line after the reader
    // left: no drain, and nginx killed or orphaned.
    let site = common::Site::new();
    let (reader, writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let args = site.run_args(&["--grace-period", "10s", "--propagation-delay", "1s"]);
    let mut supervisor = Unlogged::start(&args, writer);
    // Read until nginx serves, then go, as `| head -c 300` does.
    let mut lines = BufReader::new(std::fs::File::from(reader)).lines();
    let serving = lines.find(|line| line.as_ref().is_ok_and(|l| l.contains("\"phase\":\"serving\"")));
    assert!(serving.is_some(), "the supervisor did not start");
    drop(lines);
    let master = wait_master(&site, supervisor.pid());

    // A reload logs lines, every one of which now meets a broken pipe.
    let before = workers(master);
    supervisor.signal(HUP);
    common::wait_until("the reload's new workers", Duration::from_secs(10), || {
        let now = workers(master);
        now.len() == 2 && now.iter().all(|pid| !before.contains(pid))
    });
    assert_drains_under_load(&site, &mut supervisor);
}

#[test]
fn a_log_reader_that_stopped_reading_does_not_stall_the_supervisor() {
    // It used to block on its first line, before nginx even started, and a drain could never
    // run: the log pipe was full and nobody read it.
    let site = common::Site::new();
    let (reader, writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    fill(&writer);
    let args = site.run_args(&["--grace-period", "10s", "--propagation-delay", "1s"]);
    let mut supervisor = Unlogged::start(&args, writer);
    let master = wait_master(&site, supervisor.pid());
    let before = workers(master);
    supervisor.signal(HUP);
    common::wait_until("the reload's new workers", Duration::from_secs(10), || {
        let now = workers(master);
        now.len() == 2 && now.iter().all(|pid| !before.contains(pid))
    });

    // The reader comes back: what waited in the queue arrives, in order, none of it lost.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(std::fs::File::from(reader)).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    while !log.contains("reload confirmed") {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the reload's confirmation");
        log.push_str(&line);
        log.push('\n');
    }
    assert_drains_under_load(&site, &mut supervisor);
    // Every writer has closed the pipe now: the lines end.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        log.push_str(&line);
        log.push('\n');
    }
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
    };
    assert!(at("\"phase\":\"serving\"") < at("reload confirmed"));
    assert!(at("reload confirmed") < at("drain finished: clean"));
    assert!(!log.contains("log lines were dropped"), "{log}");
}

/// Fills a pipe to the brim, then makes its writes block again, as a stalled reader leaves it.
fn fill(pipe: &OwnedFd) {
    let _ = fcntl(pipe, FcntlArg::F_SETPIPE_SZ(4096));
    fcntl(pipe, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let chunk = [b'#'; 1024];
    for _ in 0..1024 {
        if nix::unistd::write(pipe, &chunk).is_err() {
            break;
        }
    }
    fcntl(pipe, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
}

#[test]
fn a_master_that_crashes_while_serving_ends_with_the_summary_line() {
    // It used to end with the error line only: no summary, the one line every other end has.
    let site = common::Site::new();
    let mut supervisor = common::Supervisor::start_serving(&site, &[]);
    let master = supervisor.master();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), Signal::SIGKILL).unwrap();
    let code = common::code(supervisor.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, 137, "128 + SIGKILL");
    let summary = supervisor.log.drain_summary();
    assert_eq!(summary["outcome"], "nginx_exited", "{summary}");
    assert_eq!(summary["exit_code"], 137, "{summary}");
    assert!(
        summary["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited while serving")),
        "{summary}"
    );
    assert_eq!(supervisor.log.count("\"exit_code\":137"), 1, "one summary line");
    assert!(!site.serves(), "no nginx is left");
}

/// An `nginx` that is the real one, except that its config test (`-T`) writes `testing` in
/// `dir` and then hangs, as one does on a DNS server that does not answer.
fn nginx_with_a_hanging_test(dir: &std::path::Path) -> String {
    let path = dir.join("nginx");
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" -T \"*) : > '{}/testing'; exec sleep 60;; esac\nexec '{}' \"$@\"\n",
        dir.display(),
        common::nginx_path().display()
    );
    std::fs::write(&path, script).unwrap();
    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).unwrap();
    path.display().to_string()
}

#[test]
fn sigterm_during_the_start_time_config_test_ends_it_at_once() {
    // It used to be ignored until the test ended (30 s here), and nginx then started.
    let site = common::Site::new();
    let nginx = nginx_with_a_hanging_test(&site.dir.0);
    let mut args = site.run_args(&[]);
    let at = args.iter().position(|a| a == "nginx").unwrap();
    args[at] = nginx;
    let mut supervisor = common::Supervisor::start(&args);
    let testing = site.dir.0.join("testing");
    common::wait_until("the config test to run", Duration::from_secs(10), || {
        testing.exists()
    });
    let test = *supervisor
        .descendants()
        .iter()
        .find(|&&pid| common::comm(pid).as_deref() == Some("sleep"))
        .expect("the hanging nginx -T");

    let sent = Instant::now();
    supervisor.signal(TERM);
    let code = common::code(supervisor.wait_exit(Duration::from_secs(5)));
    let took = sent.elapsed();
    assert_eq!(code, 0, "nothing was started, nothing was lost");
    assert!(took < Duration::from_secs(2), "exit {took:?} after SIGTERM");
    assert!(common::all_exited(&[test]), "nginx -T was killed");
    let log = &supervisor.log;
    assert!(log.contains("SIGTERM before nginx started"), "{:?}", log.lines());
    assert_eq!(log.drain_summary()["outcome"], "clean");
    assert!(
        !log.phases().iter().any(|p| p == "serving"),
        "nginx must not start: {:?}",
        log.lines()
    );
    assert!(!site.serves());
}

/// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`).
fn memory_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_huge_config_costs_the_supervisor_no_memory_to_speak_of() {
    // A 32 MB config used to be kept whole for the supervisor's life (its dump read at once, then
    // copied), and read again at each reload: about 3 times its size at a reload.
    const CONFIG_MB: usize = 32;
    let dir = common::TempDir::new("huge-config");
    let big = dir.0.join("comments.conf");
    let comment = format!("# {}\n", "x".repeat(97));
    std::fs::write(&big, comment.repeat(CONFIG_MB * 1024 * 1024 / comment.len())).unwrap();
    let site = common::Site::build(true, &format!("include {};", big.display()));
    // The config watch hashes every file it watches, a piece at a time: measured too.
    let mut supervisor = common::Supervisor::start_serving(&site, &[]);
    let pid = supervisor.pid;
    let after_start = (memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM"));

    let master = supervisor.master();
    let before = workers(master);
    supervisor.signal(HUP);
    supervisor
        .log
        .wait_for("the reload", Duration::from_secs(30), |l| {
            l.contains("config valid")
        });
    common::wait_until("the reload's new workers", Duration::from_secs(30), || {
        let now = workers(master);
        now.len() == 2 && now.iter().all(|pid| !before.contains(pid))
    });
    let after_reload = (memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM"));
    supervisor.signal(TERM);
    assert_eq!(common::code(supervisor.wait_exit(Duration::from_secs(40))), 0);

    // The supervisor itself is a few MB; the config is 32.
    let bound = 16 * 1024;
    eprintln!("VmRSS, VmHWM in kB: after start {after_start:?}, after a reload {after_reload:?}");
    assert!(
        after_start.0 < bound && after_start.1 < bound,
        "after start (VmRSS, VmHWM) = {after_start:?} kB, with a {CONFIG_MB} MB config"
    );
    assert!(
        after_reload.0 < bound && after_reload.1 < bound,
        "after a reload (VmRSS, VmHWM) = {after_reload:?} kB, with a {CONFIG_MB} MB config"
    );
}

#[test]
fn a_wrapper_is_ready_only_once_its_nginx_serves() {
    // Readiness asked whether the child had children: a wrapper's `sleep` was enough for 200
    // while nothing listened, and the pod joined its Service with no nginx behind it.
    let site = common::Site::new();
    let nginx = format!(
        "sleep 2; {} -e stderr -c {} -g 'daemon off;'; echo done",
        common::nginx_path().display(),
        site.config.display()
    );
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut args = site.run_args_with_health(health, &["--grace-period", "10s", "--propagation-delay", "0s"]);
    let at = args.iter().position(|a| a == "--").unwrap();
    args.truncate(at);
    args.extend(["--", "sh", "-c", &nginx].map(String::from));
    let mut supervisor = common::Supervisor::start_as_pid1(&args);
    let readiness = || common::http::get(health, "/readyz").map(|r| r.status.as_u16());
    common::wait_until("the health listener", Duration::from_secs(5), || {
        readiness().is_ok()
    });
    assert!(!site.serves(), "nginx starts only after the wrapper's sleep");
    assert_eq!(readiness(), Ok(503), "nothing serves yet");
    supervisor.wait_serving(&site);
    common::wait_until("readiness once nginx serves", Duration::from_secs(5), || {
        readiness() == Ok(200)
    });
    supervisor.signal(TERM);
    assert_eq!(common::code(supervisor.wait_exit(Duration::from_secs(10))), 0);
}

#[test]
fn a_shell_that_stays_the_parent_of_nginx_does_not_fake_the_drain() {
    // The shell used to get the SIGQUIT and die of it: "drain finished" in milliseconds (exit
    // 131) while nginx served on, or was killed with the download in flight.
    let site = common::Site::new();
    let nginx = format!(
        "{} -e stderr -c {} -g 'daemon off;'; echo done",
        common::nginx_path().display(),
        site.config.display()
    );
    let mut args = site.run_args(&["--grace-period", "10s", "--propagation-delay", "1s"]);
    let at = args.iter().position(|a| a == "--").unwrap();
    args.truncate(at);
    args.extend(["--", "sh", "-c", &nginx].map(String::from));
    // PID 1 of its own namespace: an nginx the supervisor lost ends with the test.
    let mut supervisor = common::Supervisor::start_as_pid1(&args);
    supervisor.wait_serving(&site);
    let shell = common::children_of(supervisor.pid)[0];
    assert_eq!(
        common::comm(shell).as_deref(),
        Some("sh"),
        "the shell stays the parent"
    );

    // A reload's SIGHUP goes to nginx: the shell would die of it.
    let master = common::children_of(shell)[0];
    let before = workers(master);
    supervisor.signal(HUP);
    common::wait_until("the reload's new workers", Duration::from_secs(10), || {
        let now = workers(master);
        now.len() == 2 && now.iter().all(|pid| !before.contains(pid))
    });

    let path = site.slow_path(2);
    let traffic = common::Traffic::to(site.addr()).slow(&path).start();
    traffic.wait_slow_in_flight();
    supervisor.signal(TERM);
    let code = common::code(supervisor.wait_exit(Duration::from_secs(10)));
    traffic.finish().assert_no_failures();
    let log = &supervisor.log;
    assert_eq!(code, 0, "{}", log.lines().join("\n"));
    log.assert_drain_under_load(Duration::from_secs(1), Duration::from_secs(2));
    assert!(
        log.contains("draining the nginx master beneath it"),
        "{:?}",
        log.lines()
    );
}

/// Sends `count` GETs of `path` on one keep-alive connection, all at once, and reads every
/// response.
fn pipelined_gets(addr: std::net::SocketAddr, path: &str, count: usize) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    let writer = {
        let mut conn = conn.try_clone().unwrap();
        let requests = request.repeat(count);
        std::thread::spawn(move || conn.write_all(requests.as_bytes()))
    };
    const STATUS: &[u8] = b"HTTP/1.1 404";
    let (mut seen, mut buf, mut tail) = (0, vec![0; 64 * 1024], Vec::new());
    while seen < count {
        let n = conn.read(&mut buf).expect("the responses");
        assert!(n > 0, "nginx closed the connection after {seen} responses");
        tail.extend_from_slice(&buf[..n]);
        seen += tail.windows(STATUS.len()).filter(|w| *w == STATUS).count();
        // Only a status line cut in two goes on in the next read.
        tail.drain(..tail.len().saturating_sub(STATUS.len() - 1));
    }
    writer.join().unwrap().unwrap();
}

#[test]
fn a_log_queue_that_overflows_drops_lines_and_says_how_many() {
    // nginx logs each request (about 1 KB) to stderr, through the supervisor, while nobody
    // reads: 2 MB of lines for a queue of 1 MiB.
    let site = common::Site::build(true, "access_log /dev/stderr;");
    let (reader, writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    fill(&writer);
    let args = site.run_args(&["--grace-period", "10s", "--propagation-delay", "1s"]);
    let mut supervisor = Unlogged::start(&args, writer);
    wait_master(&site, supervisor.pid());
    let path = format!("/{}", "x".repeat(1000));
    for _ in 0..3 {
        pipelined_gets(site.addr(), &path, 700);
    }

    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(std::fs::File::from(reader)).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    assert_drains_under_load(&site, &mut supervisor);
    let mut log = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        log.push(line);
    }
    let note = log
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["dropped_lines"].is_u64())
        .unwrap_or_else(|| panic!("no line says how many were dropped, of {} lines", log.len()));
    assert!(note["dropped_lines"].as_u64() > Some(100), "{note}");
    assert!(
        log.last().unwrap().contains("drain finished: clean"),
        "{:?}",
        log.last()
    );
}

#[test]
fn a_prestop_drain_during_the_start_time_config_test_ends_it_at_once() {
    // The hook used to wait for the whole test (30 s here), and nginx then started.
    let site = common::Site::new();
    let nginx = nginx_with_a_hanging_test(&site.dir.0);
    let mut args = site.run_args(&[]);
    let at = args.iter().position(|a| a == "nginx").unwrap();
    args[at] = nginx;
    let mut supervisor = common::Supervisor::start(&args);
    let testing = site.dir.0.join("testing");
    common::wait_until("the config test to run", Duration::from_secs(10), || {
        testing.exists()
    });

    let mut hook = common::Supervisor::start(&common::drain_args(&site, &[]));
    assert_eq!(
        common::code(hook.wait_exit(Duration::from_secs(5))),
        0,
        "{:?}",
        hook.log.lines()
    );
    assert_eq!(common::code(supervisor.wait_exit(Duration::from_secs(5))), 0);
    let log = &supervisor.log;
    assert!(
        log.contains("a drain request (preStop hook) before nginx started"),
        "{:?}",
        log.lines()
    );
    assert!(
        !log.phases().iter().any(|p| p == "serving"),
        "nginx must not start: {:?}",
        log.lines()
    );
}
