//! What neighbours can reach: the health port, open to every pod of the cluster, and the
//! directories the config watch listens to, where nginx may write its own logs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Site, Supervisor, code};

const SECONDS: Duration = Duration::from_secs(1);

/// The kubelet's default probe timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One probe as the kubelet sends it: a new connection, one GET, an answer within the timeout.
fn probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let started = Instant::now();
    let left = || {
        PROBE_TIMEOUT
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1))
    };
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(left())).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("send after {:?}: {e}", started.elapsed()))?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(left())).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("no answer after {:?}: {e}", started.elapsed())),
        }
    }
    if started.elapsed() > PROBE_TIMEOUT {
        return Err(format!("answered after {:?}", started.elapsed()));
    }
    match answer.starts_with(b"HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!("answered {:?}", String::from_utf8_lossy(&answer))),
    }
}

/// A hostile client: `connections` held open on `addr` at all times, half of them silent, half
/// sending a request head one byte every 100 ms, each reopened as soon as the server closes it.
struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// However the test ends, the flood stops by then.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

impl Flood {
    fn start(addr: SocketAddr, connections: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (stop2, opened2) = (stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let deadline = tokio::time::Instant::now() + FLOOD_LIMIT;
                let tasks: Vec<_> = (0..connections)
                    .map(|i| {
                        let (stop, opened) = (stop2.clone(), opened2.clone());
                        tokio::spawn(async move {
                            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                                let Ok(Ok(stream)) =
                                    tokio::time::timeout(SECONDS, tokio::net::TcpStream::connect(addr)).await
                                else {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    continue;
                                };
                                opened.fetch_add(1, Ordering::Relaxed);
                                hold(stream, i % 2 == 1, &stop).await;
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    let _ = task.await;
                }
            });
        });
        Self {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }
}

/// Holds one connection until the server closes it (or the flood stops); `slow` sends a request
/// head that never ends, a byte at a time.
async fn hold(mut stream: tokio::net::TcpStream, slow: bool, stop: &AtomicBool) {
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        .iter()
        .chain(b"X-Slow: ".iter().cycle());
    let mut head = head.copied();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            read = stream.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { return },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if slow && stream.write_all(&[head.next().unwrap()]).await.is_err() {
                    return;
                }
            }
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

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |fds| fds.count())
}

/// The supervisor's open-file limit in this test: small, so that a listener that took a
/// connection per hostile socket would run out of file descriptors.
const OPEN_FILES: usize = 256;
/// More hostile connections than the supervisor has file descriptors.
const HOSTILE: usize = 400;

#[test]
fn probes_answer_while_hundreds_of_idle_and_slow_connections_are_held() {
    // It used to take 32 connections and hold a silent one for 5 s: every probe timed out.
    let site = Site::new();
    let health = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={OPEN_FILES}"))
        .arg("--")
        .arg(common::bin())
        .args(site.run_args_with_health(health, &["--propagation-delay", "500ms"]));
    let mut supervisor = Supervisor::spawn_command(&mut command);
    supervisor.wait_serving(&site);
    common::wait_until("readiness", 5 * SECONDS, || probe(health, "/readyz").is_ok());

    let flood = Flood::start(health, HOSTILE);
    // A listener that stops accepting leaves most of them waiting in the kernel: no wait for all.
    let flooded = Instant::now();
    while flood.opened() < HOSTILE && flooded.elapsed() < 3 * SECONDS {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut failed = Vec::new();
    let mut most_fds = 0;
    for second in 0..10 {
        let tick = Instant::now();
        for path in ["/healthz", "/readyz"] {
            if let Err(err) = probe(health, path) {
                failed.push(format!("{second}s {path}: {err}"));
            }
        }
        most_fds = most_fds.max(open_fds(supervisor.pid));
        std::thread::sleep(SECONDS.saturating_sub(tick.elapsed()));
    }
    let opened = flood.opened();
    drop(flood);

    assert!(
        failed.is_empty(),
        "{} of 20 probes failed: {failed:#?}",
        failed.len()
    );
    assert!(
        opened > 2 * HOSTILE,
        "the server closed the hostile connections and they came back: {opened} opened"
    );
    assert!(
        most_fds < OPEN_FILES / 2,
        "the supervisor held {most_fds} file descriptors of {OPEN_FILES}"
    );
    assert!(
        !supervisor.log.contains("cannot search"),
        "a runtime directory open to all draws no warning"
    );
    // Still a whole supervisor: the drain has the file descriptors it needs.
    supervisor.signal(15);
    assert_eq!(
        code(supervisor.wait_exit(10 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );
}

/// Requests to `addr`, a new connection every 20 ms, until the handle is dropped (60 s at most).
struct SteadyTraffic {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl SteadyTraffic {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (stop2, served2) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while !stop2.load(Ordering::Relaxed) && started.elapsed() < 60 * SECONDS {
                if common::http::get(addr, "/").is_ok() {
                    served2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            served,
            thread: Some(thread),
        }
    }
}

impl Drop for SteadyTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn an_access_log_beside_the_config_does_not_postpone_a_reload() {
    // Every line nginx logged restarted the debounce: under steady traffic no reload came.
    let site = Site::new();
    let access_log = site.dir.0.join("access.log");
    let config = std::fs::read_to_string(&site.config).unwrap().replace(
        "access_log off;",
        &format!("access_log {};", access_log.display()),
    );
    std::fs::write(&site.config, &config).unwrap();
    let debounce = Duration::from_millis(300);
    let mut supervisor = Supervisor::start_serving(&site, &["--reload-debounce", "300ms"]);
    let traffic = SteadyTraffic::start(site.addr());
    common::wait_until("nginx to log requests", 5 * SECONDS, || {
        traffic.served.load(Ordering::Relaxed) >= 10
            && std::fs::metadata(&access_log).is_ok_and(|m| m.len() > 0)
    });

    let changed = Instant::now();
    std::fs::write(&site.config, config.replace("\"ok\\n\"", "\"changed\\n\"")).unwrap();
    // The debounce, then the config test, SIGHUP and new workers: under a second here.
    supervisor
        .log
        .wait_for("the reload", debounce + 3 * SECONDS, |l| {
            l.contains("\"reload\":\"confirmed\"")
        });
    let took = changed.elapsed();
    let logged_meanwhile = std::fs::metadata(&access_log).unwrap().len();
    drop(traffic);
    assert_eq!(
        common::http::get(site.addr(), "/").unwrap().body_len,
        "changed\n".len()
    );
    assert!(logged_meanwhile > 0, "nginx wrote its access log throughout");
    eprintln!("reloaded {took:?} after the change, under traffic");
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

#[test]
fn a_runtime_dir_the_workers_cannot_search_is_warned_about_at_start() {
    // Under a 0700 parent nginx's workers (nobody, the master being root) never saw the drain
    // flag, and nothing said so.
    let site = Site::new();
    let private = site.dir.0.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let runtime = private.join("runtime");
    // The snippet checks the flag where this supervisor raises it.
    let snippet = site.dir.0.join("graceful-drain.conf");
    let text = std::fs::read_to_string(&snippet).unwrap().replace(
        &site.runtime.display().to_string(),
        &runtime.display().to_string(),
    );
    std::fs::write(&snippet, text).unwrap();
    let mut args = site.run_args(&[]);
    let at = args.iter().position(|a| a == "--runtime-dir").unwrap();
    args[at + 1] = runtime.display().to_string();
    let mut supervisor = Supervisor::start(&args);
    supervisor.wait_serving(&site);

    let warning = supervisor
        .log
        .wait_for("the warning", 5 * SECONDS, |l| l.contains("cannot search"));
    assert!(warning.contains("\"level\":\"WARN\""), "{warning}");
    assert!(
        warning.contains(&format!("cannot search {} (mode 700", private.display())),
        "names the directory and why: {warning}"
    );
    assert!(
        warning.contains(&format!("chmod o+x {}", private.display())),
        "names the fix: {warning}"
    );
    assert_eq!(supervisor.log.count("cannot search"), 1, "once");
    supervisor.signal(3);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}
