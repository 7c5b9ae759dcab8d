//! Test harness: a real nginx site in a temporary directory, the supervisor as a real process
//! (optionally PID 1 of its own PID namespace), its log as it arrives, and cleanup that runs even
//! when a test fails.
//!
//! Clients are in modules of their own: [`http`] (hyper, HTTP/1.1), [`traffic`] (client loops
//! through a drain, one report), [`curl`], [`h2`] (HTTP/2), [`tcp`] (raw connections and an echo
//! backend), [`websocket`]; [`tls`] and [`stream_proxy`] add to a [`Site`]; [`exits`] times
//! process exits for the benches.

pub mod curl;
pub mod exits;
pub mod h2;
pub mod http;
pub mod stream_proxy;
pub mod tcp;
pub mod tls;
pub mod traffic;
pub mod websocket;

pub use traffic::Traffic;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The supervisor binary under test: `NGINX_GRACEFUL_BIN` when set, else `nginx-graceful` beside
/// the directory of the running test or bench (cargo builds every binary of the packages it
/// tests before it runs a test: `cargo test --workspace`, or `-p nginx-graceful`).
pub fn bin() -> &'static str {
    static BIN: LazyLock<String> = LazyLock::new(|| {
        if let Ok(bin) = std::env::var("NGINX_GRACEFUL_BIN") {
            return bin;
        }
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/<test> -> target/<profile>/nginx-graceful
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .join("nginx-graceful");
        assert!(
            bin.exists(),
            "{} is missing: build it first (cargo build -p nginx-graceful), or run scripts/test.sh",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    });
    &BIN
}

/// The repository's top directory, where nginx-conf/ and deploy/ are.
pub const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Bytes per second nginx sends on /slow/ URLs: a file of N * RATE bytes takes about N seconds.
pub const SLOW_RATE: usize = 100 * 1024;

/// The phases of a whole drain with a propagation delay and no hooks, in order.
pub const DRAIN_PHASES: [&str; 7] = [
    "starting",
    "serving",
    "unready",
    "keepalive_close",
    "propagation_delay",
    "quitting",
    "stopped",
];

/// A port that was free a moment ago, on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `condition` with a deadline; for conditions no event announces (a port opening).
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ng-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An nginx site of our own: config, document root, runtime directory, loopback port.
pub struct Site {
    pub dir: TempDir,
    pub port: u16,
    pub config: PathBuf,
    pub runtime: PathBuf,
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

impl Site {
    /// A site whose config includes the drain snippet, as the README tells users to.
    pub fn new() -> Self {
        Self::build(true, "")
    }

    pub fn without_snippet() -> Self {
        Self::build(false, "")
    }

    /// With `server_extra` added to the server block.
    pub fn build(snippet: bool, server_extra: &str) -> Self {
        let dir = TempDir::new("site");
        let root = dir.0.clone();
        let runtime = root.join("runtime");
        std::fs::create_dir_all(root.join("www/slow")).unwrap();
        let port = free_port();
        let snippet_path = root.join("graceful-drain.conf");
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../nginx-conf/graceful-drain.conf"
        ))
        .unwrap();
        let snippet_text = shipped.replace(
            "/run/nginx-graceful/draining",
            &format!("{}/draining", runtime.display()),
        );
        std::fs::write(&snippet_path, snippet_text).unwrap();
        let include = if snippet {
            format!("include {};", snippet_path.display())
        } else {
            String::new()
        };
        let d = root.display();
        let config = format!(
            "worker_processes 2;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 60s;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {include}
        root {d}/www;
        location = / {{ return 200 \"ok\\n\"; }}
        location /slow/ {{ limit_rate {SLOW_RATE}; }}
        {server_extra}
    }}
}}
"
        );
        let config_path = root.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            port,
            config: config_path,
            runtime,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A URL path whose response takes about `secs` seconds to send.
    pub fn slow_path(&self, secs: usize) -> String {
        let name = format!("{secs}s.bin");
        let path = self.dir.0.join("www/slow").join(&name);
        if !path.exists() {
            std::fs::write(&path, vec![b'x'; secs * SLOW_RATE]).unwrap();
        }
        format!("/slow/{name}")
    }

    /// `run` arguments for this site: its runtime dir, no health listener, JSON logs, and the
    /// nginx command after `--`.
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        self.run_args_with_health("off", extra)
    }

    /// [`Site::run_args`] with the health listener on `health`.
    pub fn run_args_with_health(&self, health: impl std::fmt::Display, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--log-format", "json", "run", "--health-listen"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(health.to_string());
        args.push("--runtime-dir".into());
        args.push(self.runtime.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.nginx_command());
        args
    }

    pub fn nginx_command(&self) -> Vec<String> {
        [
            "--",
            "nginx",
            "-e",
            "stderr",
            "-c",
            &self.config.display().to_string(),
            "-g",
            "daemon off;",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn serves(&self) -> bool {
        TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
    }
}

/// Everything the supervisor (and nginx) wrote to stderr, line by line, as it arrives.
#[derive(Default)]
pub struct Log {
    lines: Mutex<Lines>,
    grew: Condvar,
    closed: AtomicBool,
}

/// The lines so far, and when each arrived here (never before it was written).
#[derive(Default)]
struct Lines {
    text: Vec<String>,
    arrived: Vec<Instant>,
}

impl Log {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap();
        lines.text.push(line);
        lines.arrived.push(Instant::now());
        self.grew.notify_all();
    }

    fn close(&self) {
        let _lines = self.lines.lock().unwrap();
        self.closed.store(true, Ordering::SeqCst);
        self.grew.notify_all();
    }

    /// Waits until every process that held the pipe has closed it: all lines are in.
    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        while !self.closed.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            lines = self.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().text.clone()
    }

    /// Whether a line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .text
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The supervisor's own events (JSON lines); nginx's lines are left out.
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The drain's summary event (outcome, exit code, time, connections); panics with the log
    /// when there is none.
    pub fn drain_summary(&self) -> Value {
        self.events()
            .into_iter()
            .find(|e| e["outcome"].is_string() && e["exit_code"].is_number() && e["elapsed_ms"].is_number())
            .unwrap_or_else(|| panic!("no drain summary in the log:\n{}", self.lines().join("\n")))
    }

    /// Phase names in the order they were entered.
    pub fn phases(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e["phase"].as_str().map(str::to_owned))
            .collect()
    }

    /// How many times `phase` was entered.
    pub fn phase_count(&self, phase: &str) -> usize {
        self.phases().iter().filter(|p| *p == phase).count()
    }

    /// When the supervisor entered `phase` (its first entry), in ms from the supervisor's start.
    pub fn phase_ms(&self, phase: &str) -> Option<u64> {
        self.events()
            .iter()
            .find(|e| e["phase"] == phase)
            .and_then(|e| e["since_start_ms"].as_u64())
    }

    /// When `phase` began, counted from the drain's start (the trigger's arrival), as the drain
    /// itself measures: the summary's `elapsed_ms` ends where the `stopped` phase is entered.
    /// Exact to a few milliseconds, whatever the load on this machine.
    pub fn drain_offset(&self, phase: &str) -> Option<Duration> {
        let summary = self.drain_summary();
        let elapsed = summary["elapsed_ms"].as_u64()?;
        let stopped = self
            .events()
            .iter()
            .rev()
            .find(|e| e["phase"] == "stopped")
            .and_then(|e| e["since_start_ms"].as_u64())?;
        let at = self.phase_ms(phase)?;
        // The clock of since_start_ms may have started after the drain's (a `drain` hook).
        let offset = at as i64 + elapsed as i64 - stopped as i64;
        Some(Duration::from_millis(offset.max(0) as u64))
    }

    /// Checks the drain of a test that had load in flight at SIGQUIT, from its events: a clean
    /// outcome, nothing killed, at least one connection open when SIGQUIT went out, SIGQUIT
    /// `delay` after the drain began (not sooner, at most 0.5 s later), and the whole drain no
    /// shorter than the delay and no longer than the delay + `slowest` (the longest request in
    /// flight) + 0.5 s. Returns the summary.
    #[track_caller]
    pub fn assert_drain_under_load(&self, delay: Duration, slowest: Duration) -> Value {
        let summary = self.drain_summary();
        assert_eq!(summary["outcome"], "clean", "{summary}");
        assert_eq!(summary["killed"], 0, "{summary}");
        assert!(
            summary["connections_at_quit"].as_u64().is_some_and(|n| n >= 1),
            "nothing was in flight at SIGQUIT: the drain proves nothing: {summary}"
        );
        let quit = self
            .drain_offset("quitting")
            .unwrap_or_else(|| panic!("no SIGQUIT in the drain: {:?}", self.phases()));
        // Integer milliseconds on both sides of the subtraction.
        let slack = Duration::from_millis(2);
        assert!(
            quit + slack >= delay && quit <= delay + Duration::from_millis(500),
            "SIGQUIT {quit:?} after the drain began, for a propagation delay of {delay:?}"
        );
        let elapsed = Duration::from_millis(summary["elapsed_ms"].as_u64().unwrap());
        let most = delay + slowest + Duration::from_millis(500);
        assert!(
            elapsed >= delay && elapsed <= most,
            "the drain took {elapsed:?}: the delay ({delay:?}) at least, at most {most:?}: {summary}"
        );
        summary
    }

    /// When the line announcing `phase` arrived here, if it has; it was written no later.
    pub fn phase_seen_at(&self, phase: &str) -> Option<Instant> {
        let needle = format!("\"phase\":\"{phase}\"");
        let lines = self.lines.lock().unwrap();
        let i = lines.text.iter().position(|l| l.contains(&needle))?;
        Some(lines.arrived[i])
    }

    /// Blocks until a line satisfies `predicate`; returns it.
    pub fn wait_for(&self, what: &str, timeout: Duration, predicate: impl Fn(&str) -> bool) -> String {
        self.wait_for_arrival(what, timeout, predicate).0
    }

    /// [`Log::wait_for`], with when the line arrived.
    fn wait_for_arrival(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> (String, Instant) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        let mut seen = 0;
        loop {
            if let Some(i) = (seen..lines.text.len()).find(|&i| predicate(&lines.text[i])) {
                return (lines.text[i].clone(), lines.arrived[i]);
            }
            seen = lines.text.len();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                lines.text.join("\n")
            );
            lines = self.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    pub fn wait_phase(&self, phase: &str, timeout: Duration) -> Value {
        self.wait_phase_arrival(phase, timeout).0
    }

    /// [`Log::wait_phase`], with when its line arrived.
    pub fn wait_phase_arrival(&self, phase: &str, timeout: Duration) -> (Value, Instant) {
        let needle = format!("\"phase\":\"{phase}\"");
        let (line, at) = self.wait_for_arrival(&format!("phase {phase}"), timeout, |l| l.contains(&needle));
        (serde_json::from_str(&line).unwrap(), at)
    }
}

/// The supervisor under test. Dropping it kills it and every process below it.
pub struct Supervisor {
    child: Child,
    /// The supervisor's pid as the host sees it (inside a PID namespace it is PID 1).
    pub pid: i32,
    pub log: Arc<Log>,
    status: Option<ExitStatus>,
}

impl Supervisor {
    pub fn start(args: &[String]) -> Self {
        Self::spawn(Command::new(bin()).args(args), false)
    }

    /// `run` for `site`, with `extra` arguments (see [`Site::run_args`]), once nginx serves it
    /// (see [`Supervisor::wait_serving`]).
    pub fn start_serving(site: &Site, extra: &[&str]) -> Self {
        let supervisor = Self::start(&site.run_args(extra));
        supervisor.wait_serving(site);
        supervisor
    }

    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(bin()).args(args).envs(env.iter().copied()), false)
    }

    /// As PID 1 of a new PID namespace, the way a container runs it.
    pub fn start_as_pid1(args: &[String]) -> Self {
        Self::start_as_pid1_with_env(args, &[])
    }

    pub fn start_as_pid1_with_env(args: &[String], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", bin()])
            .args(args)
            .envs(env.iter().copied());
        Self::spawn(&mut command, true)
    }

    /// Any command whose stderr is to be followed like the supervisor's.
    pub fn spawn_command(command: &mut Command) -> Self {
        Self::spawn(command, false)
    }

    fn spawn(command: &mut Command, in_namespace: bool) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("NG_TEST_ECHO").is_some() {
                    eprintln!("{line}");
                }
                sink.push(line);
            }
            sink.close();
        });
        let mut supervisor = Self {
            pid: child.id() as i32,
            child,
            log,
            status: None,
        };
        if in_namespace {
            supervisor.log.wait_phase("starting", Duration::from_secs(10));
            supervisor.pid = children_of(supervisor.child.id() as i32)[0];
        }
        supervisor
    }

    /// Waits until nginx has started and answers HTTP on `site`: a connect alone may reach
    /// the master before it has forked its workers.
    pub fn wait_serving(&self, site: &Site) {
        self.log.wait_phase("serving", Duration::from_secs(10));
        wait_until("nginx to answer HTTP", Duration::from_secs(10), || {
            site.serves() && http::get(site.addr(), "/").is_ok()
        });
        // The master forks its second worker a moment after the first one answers: tests
        // that list the workers would otherwise see one, on a loaded machine.
        wait_until("both of the site's workers", Duration::from_secs(10), || {
            self.descendants()
                .iter()
                .filter(|&&pid| nginx_graceful::nginx::tree::title(pid) == "nginx: worker process")
                .count()
                >= 2
        });
    }

    pub fn signal(&self, signal: i32) {
        assert_eq!(
            unsafe_free_kill(self.pid, signal),
            0,
            "signal {signal} to {}",
            self.pid
        );
    }

    /// Waits for the supervisor to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.status = Some(status);
                // Its last lines may still be in the pipe.
                self.log.wait_closed(Duration::from_secs(2));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "supervisor still running after {timeout:?}; log:\n{}",
                self.log.lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The nginx master's pid (the supervisor's child that is not a hook).
    pub fn master(&self) -> i32 {
        *children_of(self.pid)
            .iter()
            .find(|&&pid| comm(pid).as_deref() == Some("nginx"))
            .expect("an nginx master")
    }

    /// Every process below the supervisor.
    pub fn descendants(&self) -> Vec<i32> {
        descendants_of(self.pid)
    }

    /// Waits until nginx's workers hold at least `n` established connections.
    pub fn wait_for_connections(&self, n: usize) {
        wait_until(
            &format!("{n} connections on nginx's workers"),
            Duration::from_secs(5),
            || {
                nginx_graceful::nginx::connections::by_process(&self.descendants())
                    .iter()
                    .map(|(_, c)| c)
                    .sum::<usize>()
                    >= n
            },
        );
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Parents first, from a list taken beforehand: a master whose worker dies starts
        // another, so masters go before their workers, which are then killed by pid.
        let below = descendants_of(self.child.id() as i32);
        for pid in below {
            unsafe_free_kill(pid, 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_kill(pid: i32, signal: i32) -> i32 {
    let signal = nix::sys::signal::Signal::try_from(signal).unwrap();
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) => 0,
        Err(e) => e as i32,
    }
}

pub fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((rest[0].chars().next()?, rest[1].parse().ok()?))
}

pub fn comm(pid: i32) -> Option<String> {
    Some(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// Whether a process with this pid exists, zombie or not.
pub fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn children_of(parent: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect();
    pids.sort();
    pids
}

pub fn descendants_of(root: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for child in children_of(parent) {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// The run's exit code, or 128 + signal as a shell reports it.
pub fn code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// nginx started by hand as a daemon, as an ingress controller or a plain `nginx` entrypoint
/// does; its log goes to `daemon.log` in the site's directory. Killed on drop if still running.
pub struct DaemonNginx {
    pub master: i32,
    pub log: PathBuf,
    pids: Vec<i32>,
}

impl Site {
    pub fn pid_file(&self) -> PathBuf {
        self.dir.0.join("nginx.pid")
    }

    /// A PATH on which `nginx` is nginx with this site's config, as in an image whose
    /// nginx.conf is the site's: `nginx -T` dumps it. The script lives as long as the TempDir.
    pub fn path_with_its_nginx(&self) -> (TempDir, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("nginx-on-path");
        let script = dir.0.join("nginx");
        let nginx = nginx_path();
        let config = self.config.display();
        let text = format!(
            "#!/bin/sh\nexec {} -e stderr -c {config} \"$@\"\n",
            nginx.display()
        );
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        let path = format!("{}:{path}", dir.0.display());
        (dir, path)
    }

    pub fn start_daemon(&self) -> DaemonNginx {
        let log = self.dir.0.join("daemon.log");
        // By its full path: on a binary upgrade (SIGUSR2) nginx executes its own argv[0] again.
        let status = Command::new(nginx_path())
            .args(["-e", "stderr", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "nginx failed to start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        wait_until("nginx to serve", Duration::from_secs(5), || self.serves());
        let master: i32 = std::fs::read_to_string(self.pid_file())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_until("the workers", Duration::from_secs(5), || {
            children_of(master).len() == 2
        });
        let mut pids = vec![master];
        pids.extend(children_of(master));
        DaemonNginx { master, log, pids }
    }
}

/// Whether every one of `pids` has exited (gone, or a zombie waiting for its reaper).
pub fn all_exited(pids: &[i32]) -> bool {
    pids.iter()
        .all(|&pid| stat_fields(pid).is_none_or(|(state, _)| state == 'Z'))
}

impl DaemonNginx {
    pub fn all_gone(&self) -> bool {
        all_exited(&self.pids)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DaemonNginx {
    fn drop(&mut self) {
        // The master first (it would replace a killed worker), then everything below it now
        // (workers of later reloads, a new master of a binary upgrade), from a list taken
        // beforehand, then what was there at the start.
        let mut pids = vec![self.master];
        pids.extend(descendants_of(self.master));
        pids.extend(self.pids.iter());
        for pid in pids {
            if comm(pid).as_deref() == Some("nginx") {
                unsafe_free_kill(pid, 9);
            }
        }
    }
}

/// `nginx-graceful drain` for this site, JSON logs.
pub fn drain_args(site: &Site, extra: &[&str]) -> Vec<String> {
    client_args("drain", site, extra)
}

/// `nginx-graceful reload` for this site, JSON logs.
pub fn reload_args(site: &Site) -> Vec<String> {
    client_args("reload", site, &[])
}

/// A command that finds the site's nginx (or the supervisor of it) by its runtime dir and pid
/// file.
fn client_args(command: &str, site: &Site, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--log-format", "json", command, "--runtime-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(site.runtime.display().to_string());
    args.push("--pid-file".into());
    args.push(site.pid_file().display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Where `nginx` is on PATH.
pub fn nginx_path() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
        .expect("nginx on PATH")
}

/// Waits until a process below `root` holds an established connection (a request in flight on
/// a worker) and returns that process.
pub fn wait_for_busy_worker(root: i32) -> i32 {
    let mut busy = None;
    wait_until("a request in flight on a worker", Duration::from_secs(5), || {
        busy = nginx_graceful::nginx::connections::by_process(&descendants_of(root))
            .into_iter()
            .find(|(_, n)| *n > 0)
            .map(|(pid, _)| pid);
        busy.is_some()
    });
    busy.unwrap()
}
