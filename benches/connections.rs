//! How long one count of nginx's established connections takes with many of them: the
//! sock_diag count a drain makes at SIGQUIT (`to_listeners`), the per-worker count of progress
//! reports and `status` (`by_process`), and, for comparison, the /proc/net/tcp reading they
//! replaced. A real nginx holds BENCH_CONNECTIONS (default 10000) idle keep-alive connections
//! from this process, beside BENCH_TIME_WAIT (default 5000) sockets in TIME_WAIT, as a busy
//! server has.
//!
//! `cargo bench --bench connections`

use test_support as common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, free_port, wait_until};
use nginx_graceful::nginx::connections::{self, Listeners};
use nginx_graceful::nginx::tree::ProcessTable;

const ROUNDS: usize = 50;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Nginx {
    child: Child,
    _dir: TempDir,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master first: workers exit with it (QUIT would wait for the idle connections).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn start_nginx(connections: usize) -> Nginx {
    let dir = TempDir::new("bench-connections");
    let d = dir.0.display().to_string();
    let port = free_port();
    let config = format!(
        "worker_processes 2;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
        nofile = connections + 1024
    );
    let path = dir.0.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("nginx")
        .args(["-p", &d, "-c"])
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .spawn()
        .expect("nginx (apt-get install nginx)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("nginx serving", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok()
    });
    Nginx {
        child,
        _dir: dir,
        addr,
    }
}

/// One request on a new connection, kept open afterwards: nginx holds it as an idle keep-alive.
fn open_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to nginx");
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "nginx answered {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream
}

fn raise_fd_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = needed.max(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, want).expect("raise RLIMIT_NOFILE (run as root)");
}

/// Median and worst of ROUNDS runs.
fn time(mut count: impl FnMut() -> usize, expected: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let n = count();
        times.push(start.elapsed());
        assert_eq!(n, expected, "a count came out wrong");
    }
    times.sort_unstable();
    (times[ROUNDS / 2], times[ROUNDS - 1])
}

/// The method replaced: socket inodes from every worker's fds, states from /proc/net/tcp(6).
fn proc_net_tcp(workers: &[i32]) -> usize {
    use procfs::process::{FDTarget, Process};
    let inodes: HashSet<u64> = workers
        .iter()
        .filter_map(|&pid| Process::new(pid).ok()?.fd().ok())
        .flatten()
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let process = Process::new(workers[0]).unwrap();
    let tables = [process.tcp().unwrap(), process.tcp6().unwrap_or_default()];
    tables
        .into_iter()
        .flatten()
        .filter(|e| e.state == procfs::net::TcpState::Established && inodes.contains(&e.inode))
        .count()
}

fn main() {
    let n = env_usize("BENCH_CONNECTIONS", 10_000);
    let time_wait = env_usize("BENCH_TIME_WAIT", 5_000);
    raise_fd_limit(n as u64 + 1024);
    let nginx = start_nginx(n);
    let master = nginx.child.id() as i32;

    // TIME_WAIT sockets, on our side (we close first), as many as a busy server shows.
    for _ in 0..time_wait {
        drop(open_connection(nginx.addr));
    }
    let started = Instant::now();
    let clients: Vec<TcpStream> = (0..n).map(|_| open_connection(nginx.addr)).collect();
    eprintln!("{n} connections open in {:?}", started.elapsed());

    let workers: Vec<i32> = ProcessTable::read()
        .unwrap()
        .children(master)
        .map(|s| s.pid)
        .collect();
    let listeners = Listeners::of(&[master]);
    assert!(!listeners.is_empty(), "the master's listener was not found");

    let one_count = time(|| connections::to_listeners(&listeners).unwrap(), n);
    let per_worker = time(
        || connections::by_process(&workers).iter().map(|(_, c)| c).sum(),
        n,
    );
    let old = time(|| proc_net_tcp(&workers), n);

    println!(
        "## One count of nginx's connections: {n} established, {time_wait} in TIME_WAIT (median / worst of {ROUNDS})"
    );
    println!();
    println!("| method | median | worst |");
    println!("|---|---|---|");
    for (name, (median, worst)) in [
        (
            "sock_diag, connections to nginx's listeners (the drain's count at SIGQUIT)",
            one_count,
        ),
        (
            "sock_diag + each worker's fds (progress reports, `status`)",
            per_worker,
        ),
        ("/proc/net/tcp + each worker's fds (before)", old),
    ] {
        println!("| {name} | {:.2} ms | {:.2} ms |", ms(median), ms(worst));
    }
    drop(clients);
    drop(nginx);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
