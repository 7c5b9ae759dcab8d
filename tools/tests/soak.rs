//! `soak` against a server that fails on purpose in every way soak tells apart: each failure
//! lands in its own class, and what is not a failure (Connection: close, an idle connection
//! closed cleanly) is not counted as one.

use test_support as common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::free_port;

/// The tools binary under test.
const TOOLS: &str = env!("CARGO_BIN_EXE_nginx-graceful-tools");
use serde_json::Value;

/// A server whose behaviour is chosen by the request path; `n` counts requests on a connection.
fn misbehaving_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut served = 0;
    loop {
        let Some(path) = read_request(&mut stream) else {
            return;
        };
        served += 1;
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        match path.as_str() {
            "/ok" => write(&mut stream, ok),
            "/close" => {
                write(
                    &mut stream,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nok\n",
                );
                return;
            }
            // Answers, then closes the idle connection without saying so beforehand.
            "/idle-close" => {
                write(&mut stream, ok);
                let _ = stream.shutdown(Shutdown::Write);
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            // nginx while draining: its own field, then the snippet's; the connection stays
            // open, as nginx keeps it until SIGQUIT.
            "/two-fields" => write(
                &mut stream,
                "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 3\r\n\r\nok\n",
            ),
            // A close between two keep-alives.
            "/close-between" => write(
                &mut stream,
                "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nok\n",
            ),
            "/chunked" => write(
                &mut stream,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n",
            ),
            "/reset" => return reset(stream),
            "/reset-second" if served == 1 => write(&mut stream, ok),
            "/reset-second" => return reset(stream),
            "/eof" => return,
            "/cut" => {
                write(
                    &mut stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..",
                );
                return;
            }
            "/stall" => {
                std::thread::sleep(Duration::from_secs(3));
                return;
            }
            "/503" => write(
                &mut stream,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            ),
            "/garbage" => {
                write(&mut stream, "SSH-2.0-OpenSSH_9.2\r\n\r\n");
                return;
            }
            _ => write(&mut stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        }
    }
}

/// The path of the next request on the connection, or None at its end.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&request);
    Some(text.split_whitespace().nth(1)?.to_owned())
}

fn write(stream: &mut TcpStream, text: &str) {
    let _ = stream.write_all(text.as_bytes());
}

/// Closes with RST: SO_LINGER with a zero timeout.
fn reset(stream: TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
    drop(stream);
}

/// Runs soak with `args` and returns its exit code and JSON report.
fn soak(url: &str, args: &[&str]) -> (i32, Value) {
    let output = Command::new(TOOLS)
        .args(["soak", "--url", url, "--json", "--timeout", "500ms"])
        .args(args)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code().unwrap(), report)
}

fn failures(report: &Value) -> Vec<(String, u64)> {
    report["failures"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(class, n)| (class.clone(), n.as_u64().unwrap()))
        .collect()
}

#[test]
fn every_failure_lands_in_its_own_class() {
    let server = misbehaving_server();
    let cases = [
        ("/reset", "reset-new"),
        ("/eof", "eof"),
        ("/cut", "truncated"),
        ("/stall", "timeout"),
        ("/503", "http-5xx"),
        ("/garbage", "malformed"),
    ];
    // The first-field mode reads responses itself: it must name failures the same way.
    for mode in ["--keepalive", "--first-field"] {
        for (path, class) in cases {
            let (code, report) = soak(&format!("http://{server}{path}"), &["-c", "1", "-n", "2", mode]);
            assert_eq!(
                failures(&report),
                [(class.to_owned(), 2)],
                "{mode} {path}: {report}"
            );
            assert_eq!(report["requests"], 2, "{mode} {path}: {report}");
            assert_eq!(code, 1, "{mode} {path}: any failure fails the run");
        }
    }
}

#[test]
fn a_refused_connect_is_refused() {
    let url = format!("http://127.0.0.1:{}/", free_port());
    let (code, report) = soak(&url, &["-c", "1", "-n", "3"]);
    assert_eq!(failures(&report), [("refused".to_owned(), 3)], "{report}");
    assert_eq!(code, 1);
}

#[test]
fn a_reset_on_a_reused_connection_is_counted_apart() {
    let server = misbehaving_server();
    // Each connection: the first request is answered, the second is reset.
    for mode in ["--keepalive", "--first-field"] {
        let (_, report) = soak(
            &format!("http://{server}/reset-second"),
            &["-c", "1", "-n", "4", mode],
        );
        assert_eq!(report["ok"], 2, "{mode}: {report}");
        assert_eq!(
            failures(&report),
            [("reset-reused".to_owned(), 2)],
            "{mode}: {report}"
        );
    }
}

#[test]
fn closing_connections_cleanly_is_not_a_failure() {
    let server = misbehaving_server();
    for mode in ["--keepalive", "--first-field"] {
        let (code, report) = soak(&format!("http://{server}/close"), &["-c", "2", "-n", "50", mode]);
        assert_eq!((code, &report["ok"]), (0, &Value::from(50)), "{mode}: {report}");
        // Idle connections closed by the server between requests (here 50 ms apart): the
        // client sees the close and reconnects.
        let url = format!("http://{server}/idle-close");
        let (code, report) = soak(&url, &["-c", "1", "-n", "10", "--rate", "20", mode]);
        assert_eq!((code, &report["ok"]), (0, &Value::from(10)), "{mode}: {report}");
    }
}

/// The requests of a timeline that went out on a reused connection.
fn on_reused(timeline: &std::path::Path) -> usize {
    let csv = std::fs::read_to_string(timeline).unwrap();
    csv.lines()
        .skip(1)
        .filter(|l| l.split(',').nth(3) == Some("true"))
        .count()
}

#[test]
fn keepalive_leaves_on_a_close_in_any_connection_field_and_first_field_only_on_the_first() {
    let server = misbehaving_server();
    let dir = common::TempDir::new("soak-first-field");
    let timeline = dir.0.join("timeline.csv");
    let timeline_arg = timeline.to_str().unwrap();
    // (mode, path, requests on a reused connection out of 50 on one connection at a time).
    let cases = [
        ("--keepalive", "/two-fields", 0..=0),
        ("--keepalive", "/close-between", 0..=0),
        ("--first-field", "/two-fields", 49..=49),
        ("--first-field", "/close", 0..=0),
        ("--first-field", "/chunked", 49..=49),
    ];
    for (mode, path, reused) in cases {
        let args = ["-c", "1", "-n", "50", mode, "--timeline", timeline_arg];
        let (code, report) = soak(&format!("http://{server}{path}"), &args);
        assert_eq!(
            (code, &report["ok"]),
            (0, &Value::from(50)),
            "{mode} {path}: {report}"
        );
        let on_reused = on_reused(&timeline);
        assert!(
            reused.contains(&on_reused),
            "{mode} {path}: {on_reused} requests on a reused connection"
        );
    }
}

#[test]
fn keepalive_reuses_connections_and_no_keepalive_never_does() {
    let server = misbehaving_server();
    let dir = common::TempDir::new("soak-timeline");
    let timeline = dir.0.join("timeline.csv");
    let timeline_arg = timeline.to_str().unwrap();
    // (mode, requests sent on a reused connection): 4 connections carry the 200 requests, all
    // but the first on each (a worker that starts late may carry none).
    for (mode, reused) in [("--keepalive", 196..=200), ("--no-keepalive", 0..=0)] {
        let args = ["-c", "4", "-n", "200", mode, "--timeline", timeline_arg];
        let (code, report) = soak(&format!("http://{server}/ok"), &args);
        assert_eq!(code, 0, "{mode}: {report}");
        assert_eq!(
            (report["requests"].as_u64(), report["failed"].as_u64()),
            (Some(200), Some(0))
        );
        let csv = std::fs::read_to_string(&timeline).unwrap();
        let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
        assert_eq!(rows.len(), 200);
        assert!(rows.iter().all(|r| r[4] == "200" && r[5] == "ok"), "{mode}");
        let on_reused = rows.iter().filter(|r| r[3] == "true").count();
        assert!(
            reused.contains(&on_reused),
            "{mode}: {on_reused} requests on a reused connection"
        );
    }
}

/// nginx serving HTTPS on loopback with a self-signed certificate; stopped on drop.
struct TlsNginx {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
    _dir: common::TempDir,
}

impl TlsNginx {
    fn start() -> Self {
        let dir = common::TempDir::new("soak-tls");
        let certificate = common::tls::TestCertificate::make(&dir.0);
        let port = free_port();
        let d = dir.0.display();
        let config = format!(
            "pid {d}/nginx.pid;
error_log stderr warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
    uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
            cert = certificate.cert.display(),
            key = certificate.key.display(),
        );
        let path = dir.0.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-c"])
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("nginx");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        common::wait_until("nginx to listen", Duration::from_secs(5), || {
            TcpStream::connect(addr).is_ok()
        });
        Self {
            child,
            port,
            ca: certificate.ca,
            _dir: dir,
        }
    }
}

impl Drop for TlsNginx {
    fn drop(&mut self) {
        // The master first: its workers exit with it.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

#[test]
fn https_is_loaded_over_tls_and_an_untrusted_certificate_is_a_tls_failure() {
    let nginx = TlsNginx::start();
    let url = format!("https://127.0.0.1:{}/", nginx.port);
    let ca = nginx.ca.display().to_string();
    for (trust, keepalive) in [
        (["--cacert", ca.as_str()], "--keepalive"),
        (["--insecure", "--keepalive"], "--no-keepalive"),
        (["--insecure", "--keepalive"], "--first-field"),
    ] {
        let (code, report) = soak(&url, &[&trust[..], &[keepalive, "-c", "4", "-n", "200"]].concat());
        assert_eq!(code, 0, "{trust:?} {keepalive}: {report}");
        assert_eq!(report["requests"], 200, "{report}");
        assert_eq!(report["failed"], 0, "{report}");
    }
    // The system's roots do not know a self-signed certificate: every handshake fails, as TLS.
    let (code, report) = soak(&url, &["-c", "2", "-n", "10"]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(failures(&report), [("tls".to_owned(), 10)], "{report}");
}
