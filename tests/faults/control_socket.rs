//! The control socket under attack: floods of connections, endless lines, a stopped
//! supervisor, a fake server or a client of another user, and a client that names another
//! nginx. Each ends in one line and an exit code, and the supervisor keeps what a drain needs.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::common::{self, Site, Supervisor, code, http};

const SECONDS: Duration = Duration::from_secs(1);
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;
/// The user a process of another uid in the pod runs as.
const NOBODY: u32 = 65534;

fn socket(runtime: &Path) -> PathBuf {
    runtime.join("control.sock")
}

/// Runs `nginx-graceful ARGS` (JSON logs) to its end; returns its exit code, its log and how
/// long it took. One that has not ended after `within` fails the test.
fn client(args: &[String], within: Duration) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut argv = vec!["--log-format".to_string(), "json".into()];
    argv.extend(args.iter().cloned());
    let mut process = Supervisor::start(&argv);
    let status = process.wait_exit(within);
    (code(status), process.log.lines().join("\n"), started.elapsed())
}

/// `COMMAND --runtime-dir RUNTIME --pid-file PID_FILE EXTRA...`
fn command(command: &str, runtime: &Path, pid_file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        command.to_string(),
        "--runtime-dir".into(),
        runtime.display().to_string(),
        "--pid-file".into(),
        pid_file.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A field of /proc/PID/status, in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Keeps up to `n` fresh connections to `path` open (each dropped after 2 s and replaced),
/// from a thread, until dropped. Connects never block: past the backlog they fail and are
/// tried again on the next round.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(path: PathBuf, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
            use std::os::fd::AsRawFd;
            let addr = UnixAddr::new(&path).unwrap();
            let mut held = VecDeque::new();
            let until = Instant::now() + 60 * SECONDS;
            while !stopping.load(Ordering::Relaxed) && Instant::now() < until {
                while held
                    .front()
                    .is_some_and(|(at, _)| Instant::elapsed(at) > 2 * SECONDS)
                {
                    held.pop_front();
                }
                while held.len() < n {
                    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
                    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
                    if connect(fd.as_raw_fd(), &addr).is_err() {
                        break;
                    }
                    held.push_back((Instant::now(), fd));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn a_flood_of_control_connections_leaves_the_drain_its_descriptors() {
    // It used to accept every connection: under `ulimit -n 128`, 400 of them took every
    // descriptor, the drain could not read /proc or open pidfds, and it reported every nginx
    // process gone 0.2 ms after SIGQUIT while a download was cut.
    let site = Site::new();
    let download = site.slow_path(2);
    let mut prlimit = Command::new("prlimit");
    prlimit
        .arg("--nofile=128:128")
        .arg(common::bin())
        .args(site.run_args(&["--propagation-delay", "500ms", "--grace-period", "10s"]));
    let mut supervisor = Supervisor::spawn_command(&mut prlimit);
    supervisor.wait_serving(&site);
    let path = socket(&site.runtime);

    // Connections that say nothing are closed after the request timeout (1 s), past the cap too.
    let idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&path).unwrap()).collect();
    let opened = Instant::now();
    for mut connection in idle {
        connection.set_read_timeout(Some(5 * SECONDS)).unwrap();
        // A signal to this process (a sibling test's child exiting) may interrupt the read.
        let read = loop {
            match connection.read(&mut [0u8; 64]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => break read,
            }
        };
        assert!(
            matches!(read, Ok(0)),
            "an idle control connection was not closed: {read:?}"
        );
    }
    assert!(
        opened.elapsed() < 4 * SECONDS,
        "20 idle connections took {:?} to be closed",
        opened.elapsed()
    );

    let flood = Flood::start(path, 400);
    let request = http::get_in_background(site.addr(), &download);
    common::wait_for_busy_worker(supervisor.pid);
    // The flood has had time to take what it can.
    std::thread::sleep(SECONDS / 2);
    let fds = open_fds(supervisor.pid);
    supervisor.signal(SIGTERM);
    let status = supervisor.wait_exit(15 * SECONDS);
    drop(flood);

    let reply = request.join().unwrap().expect("the download in flight finishes");
    assert_eq!(reply.body_len, 2 * common::SLOW_RATE, "the download was cut");
    assert_eq!(code(status), 0, "{:?}", supervisor.log.lines());
    supervisor.log.assert_drain_under_load(SECONDS / 2, 2 * SECONDS);
    assert!(
        fds < 64,
        "the supervisor held {fds} descriptors of its 128 while flooded"
    );
}

#[test]
fn a_line_without_end_is_cut_off_and_costs_the_supervisor_no_memory() {
    // It used to read the line whole: 330 MB in one second.
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    let peak_before = status_kb(supervisor.pid, "VmHWM");

    let mut connection = UnixStream::connect(socket(&site.runtime)).unwrap();
    connection.set_write_timeout(Some(5 * SECONDS)).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    let refused = loop {
        if written >= 64 << 20 {
            break None;
        }
        match connection.write(&chunk) {
            Ok(n) => written += n,
            Err(err) => break Some(err),
        }
    };
    let err = refused.unwrap_or_else(|| panic!("the supervisor took {written} bytes of one line"));
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    assert!(written < 4 << 20, "{written} bytes went in before the close");

    let grew = status_kb(supervisor.pid, "VmHWM").saturating_sub(peak_before);
    assert!(grew < 2048, "the supervisor's peak memory grew by {grew} kB");
    let args = command("status", &site.runtime, &site.pid_file(), &[]);
    let (status, log, _) = client(&args, 10 * SECONDS);
    assert_eq!(status, 0, "the supervisor still answers: {log}");
}

/// Sends SIGCONT to a stopped supervisor when the test ends, before it is cleaned up.
struct Continue(i32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

#[test]
fn a_stopped_supervisor_makes_each_client_fail_in_bounded_time() {
    // `drain` and `status` used to wait for ever on a supervisor stopped with SIGSTOP.
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    supervisor.signal(SIGSTOP);
    let _continue = Continue(supervisor.pid);
    let (runtime, pid_file) = (&site.runtime, &site.pid_file());

    let status = std::thread::spawn({
        let args = command("status", runtime, pid_file, &[]);
        move || client(&args, 15 * SECONDS)
    });
    let reload = std::thread::spawn({
        let args = command("reload", runtime, pid_file, &[]);
        move || client(&args, 15 * SECONDS)
    });
    let drain = command(
        "drain",
        runtime,
        pid_file,
        &["--grace-period", "3s", "--propagation-delay", "0s"],
    );
    let (code, log, took) = client(&drain, 15 * SECONDS);
    assert_eq!(code, 18, "{log}");
    assert!(
        log.contains("did not report the drain's outcome within 3s"),
        "{log}"
    );
    assert!(
        took >= 3 * SECONDS && took < 5 * SECONDS,
        "the hook gave up after {took:?}, for a grace period of 3s"
    );
    for (what, answer, message) in [
        (
            "status",
            status.join().unwrap(),
            "did not answer the status request within 5s",
        ),
        (
            "reload",
            reload.join().unwrap(),
            "did not take the reload request within 5s",
        ),
    ] {
        let (code, log, took) = answer;
        assert_eq!(code, 18, "{what}: {log}");
        assert!(log.contains(message), "{what}: {log}");
        assert!(took < 8 * SECONDS, "{what} gave up after {took:?}");
    }
    supervisor.signal(SIGCONT);
}

/// Runs as another user: a fake supervisor at `FAKE_CONTROL_SOCKET`, which answers every
/// request with "accepted" and a clean outcome. A helper of the test below, which starts it.
#[test]
#[ignore = "a helper: started as uid 65534 by a_fake_supervisor_of_another_user_is_not_believed"]
fn fake_supervisor() {
    let Some(path) = std::env::var_os("FAKE_CONTROL_SOCKET") else {
        return;
    };
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let clean = nginx_graceful::core::outcome::Outcome::of_drain(Default::default()).to_json();
    let until = Instant::now() + 30 * SECONDS;
    for connection in listener.incoming().take(10) {
        let Ok(mut connection) = connection else { break };
        let _ = connection.set_read_timeout(Some(SECONDS));
        let _ = connection.read(&mut [0u8; 4096]);
        let _ = writeln!(
            connection,
            "{}\n{clean}",
            serde_json::json!({"event": "accepted"})
        );
        if Instant::now() > until {
            break;
        }
    }
}

#[test]
fn a_fake_supervisor_of_another_user_is_not_believed() {
    // In a runtime directory every user may write (an emptyDir is 777), any process of the pod
    // could put its own control socket there; `drain` believed its "clean" and exited 0.
    let dir = common::TempDir::new("fake-control");
    let runtime = dir.0.join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = socket(&runtime);
    // A copy the other user can run: this binary may sit under a directory only root can enter
    // (a checkout in a mktemp directory).
    let exe = dir.0.join("fake-supervisor");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    for open in [&dir.0, &exe] {
        std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut fake = Command::new(&exe)
        .args(["--exact", "control_socket::fake_supervisor", "--ignored"])
        .args(["--nocapture", "--test-threads", "1"])
        .env("FAKE_CONTROL_SOCKET", &path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _fake = Reap(&mut fake);
    common::wait_until("the fake socket", 10 * SECONDS, || {
        std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o777)
    });

    let pid_file = dir.0.join("nginx.pid");
    for (what, extra) in [
        ("drain", &["--propagation-delay", "0s"][..]),
        ("status", &[]),
        ("reload", &[]),
    ] {
        let (code, log, _) = client(&command(what, &runtime, &pid_file, extra), 15 * SECONDS);
        assert_eq!(code, 19, "{what}: {log}");
        assert!(
            log.contains(&format!(
                "is served by uid {NOBODY}, neither this user (uid 0) nor root"
            )),
            "{what}: {log}"
        );
    }
}

#[test]
fn a_client_of_another_user_is_refused_by_the_supervisor() {
    // Only the socket's mode kept other users out; with a mode opened by mistake, any of them
    // could drain the pod.
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    let path = socket(&site.runtime);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();

    let mut argv = vec![
        "--reuid=nobody".to_string(),
        "--regid=nogroup".into(),
        "--clear-groups".into(),
        common::bin().into(),
        "--log-format".into(),
        "json".into(),
    ];
    argv.extend(command(
        "drain",
        &site.runtime,
        &site.pid_file(),
        &["--propagation-delay", "0s"],
    ));
    let mut hook = Supervisor::spawn_command(Command::new("setpriv").args(&argv));
    let status = hook.wait_exit(10 * SECONDS);
    let log = hook.log.lines().join("\n");
    assert_eq!(code(status), 19, "{log}");
    assert!(
        log.contains(&format!(
            "uid {NOBODY} is neither the supervisor's user (uid 0) nor root"
        )),
        "{log}"
    );
    assert!(
        supervisor.log.phase_count("unready") == 0 && site.serves(),
        "no drain began: {:?}",
        supervisor.log.phases()
    );
}

#[test]
fn a_pid_file_that_names_another_nginx_is_not_the_supervisors_to_act_on() {
    // With --pid-file naming nginx B, drain, reload and status acted on the supervisor's nginx
    // A and exited 0.
    let supervised = Site::new();
    let mut supervisor = Supervisor::start_serving(&supervised, &["--propagation-delay", "200ms"]);
    let other = Site::new();
    let nginx = other.start_daemon();
    let ours = supervisor.master();

    for (what, extra) in [
        ("drain", &["--propagation-delay", "0s"][..]),
        ("reload", &[]),
        ("status", &[]),
    ] {
        let args = command(what, &supervised.runtime, &other.pid_file(), extra);
        let (code, log, _) = client(&args, 15 * SECONDS);
        assert_eq!(code, 19, "{what}: {log}");
        let reason = format!("its nginx master is pid {ours}, not pid {}", nginx.master);
        assert!(log.contains(&reason), "{what}: {log}");
    }
    assert!(!nginx.all_gone() && other.serves(), "nginx B was left alone");
    assert_eq!(
        supervisor.log.phase_count("unready"),
        0,
        "the supervisor's nginx was left alone: {:?}",
        supervisor.log.phases()
    );
    assert!(
        !supervisor.log.contains("reload requested"),
        "no reload was asked of the supervisor"
    );

    // Its own pid file: the supervisor drains, by its own plan, and the hook says so.
    let args = command(
        "drain",
        &supervised.runtime,
        &supervised.pid_file(),
        &["--propagation-delay", "0s", "--grace-period", "5s"],
    );
    let (code, log, _) = client(&args, 15 * SECONDS);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("the supervisor drains by its own plan (grace period 30s, propagation delay 200ms)"),
        "{log}"
    );
    assert_eq!(common::code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn a_fifo_or_a_device_as_the_named_pid_file_is_refused_at_once() {
    // With a supervisor running, the named pid file was read whole and synchronously: a FIFO
    // hung drain, reload and status for good, /dev/zero filled their memory.
    let site = Site::new();
    let supervisor = Supervisor::start_serving(&site, &[]);
    let fifo = site.dir.0.join("nginx.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for (pid_file, refusal) in [
        (fifo.as_path(), "it is a FIFO, not a regular file"),
        (
            Path::new("/dev/zero"),
            "it is a character device, not a regular file",
        ),
    ] {
        for (what, extra) in [
            ("drain", &["--propagation-delay", "0s"][..]),
            ("reload", &[]),
            ("status", &[]),
        ] {
            let args = command(what, &site.runtime, pid_file, extra);
            let (code, log, took) = client_bounded(&args, 10 * SECONDS);
            assert_eq!(code, 17, "{what}: {log}");
            assert!(
                log.contains("cannot read pid file") && log.contains(refusal),
                "{what}: {log}"
            );
            assert!(took < 5 * SECONDS, "{what}: {took:?}");
        }
    }
    assert_eq!(
        supervisor.log.phase_count("unready"),
        0,
        "the supervisor's nginx was left alone: {:?}",
        supervisor.log.phases()
    );
    assert!(site.serves());
}

/// [`client`] under a 1 GiB address-space limit: a read without bound fails fast instead of
/// taking the machine's memory.
fn client_bounded(args: &[String], within: Duration) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut process = Supervisor::spawn_command(
        Command::new("prlimit")
            .arg("--as=1073741824")
            .arg(common::bin())
            .args(["--log-format", "json"])
            .args(args),
    );
    let status = process.wait_exit(within);
    (code(status), process.log.lines().join("\n"), started.elapsed())
}
