//! `rehearse` end to end (real nginx in PID namespaces, real signals, the Service imitation),
//! and the Service imitation on its own: it must behave as kube-proxy does, or the rehearsal
//! proves nothing.

use test_support as common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::free_port;

/// The tools binary under test.
const TOOLS: &str = env!("CARGO_BIN_EXE_nginx-graceful-tools");
use nginx_graceful_tools::rehearse::service::Service;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn nginx_graceful_drops_nothing_where_the_naive_recipe_drops_requests() {
    let (graceful, naive, code) = graceful_against_naive(&[]);

    assert_eq!(graceful["strategy"], "nginx-graceful");
    for mode in ["close", "keep-alive"] {
        let summary = &graceful["modes"][mode];
        assert_eq!(summary["failed"], 0, "{mode}: {summary}");
        assert!(summary["requests"].as_u64().unwrap() > 300, "{mode}: {summary}");
    }
    let events: Vec<&str> = graceful["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "load",
            "terminating",
            "preStop",
            "endpoint removed",
            "preStop done",
            "stop signal",
            "exited"
        ],
        "{graceful}"
    );
    assert_eq!(graceful["exit"], "exit 0");
    let exit_after = graceful["exit_after_ms"].as_u64().unwrap();
    assert!((2000..8000).contains(&exit_after), "drained in {exit_after} ms");

    // The rehearsal sees what the fast shutdown does: requests lost, in the close mode at least.
    assert_eq!(naive["strategy"], "naive");
    assert!(naive["modes"]["close"]["failed"].as_u64().unwrap() > 0, "{naive}");
    assert_eq!(code, Some(1), "a failed request fails the run");
}

/// A short rehearsal of nginx-graceful and the naive recipe with `extra` arguments: the
/// nginx-graceful pods take a 2 s propagation delay from the environment they inherit, against
/// the Service's 1 s lag. Returns both reports and the exit code.
fn graceful_against_naive(extra: &[&std::ffi::OsStr]) -> (Value, Value, Option<i32>) {
    let output = Command::new(TOOLS)
        .args(["rehearse", "--compare", "nginx-graceful,naive", "--json"])
        .args(["--warmup", "1s", "--tail", "500ms", "--grace-period", "10s"])
        .args(extra)
        .env("NGINX_GRACEFUL_PROPAGATION_DELAY", "2s")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let [graceful, naive] = report["rehearsals"].as_array().unwrap().as_slice() else {
        panic!("two rehearsals: {report}");
    };
    (graceful.clone(), naive.clone(), output.status.code())
}

#[test]
fn over_tls_the_rehearsal_tells_the_same_story() {
    let dir = common::TempDir::new("rehearse-tls");
    let certificate = common::tls::TestCertificate::make(&dir.0);
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nginx-conf/rehearsal.conf"
    ))
    .unwrap();
    let config = shipped.replace(
        "listen @LISTEN@;",
        &format!(
            "listen @LISTEN@ ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};",
            certificate.cert.display(),
            certificate.key.display()
        ),
    );
    assert_ne!(config, shipped, "the shipped config listens on @LISTEN@");
    let path = dir.0.join("tls.conf");
    std::fs::write(&path, config).unwrap();

    let (graceful, naive, _) =
        graceful_against_naive(&["--tls".as_ref(), "--config".as_ref(), path.as_os_str()]);
    for mode in ["close", "keep-alive"] {
        let summary = &graceful["modes"][mode];
        assert_eq!(summary["failed"], 0, "{mode}: {summary}");
        assert!(summary["requests"].as_u64().unwrap() > 300, "{mode}: {summary}");
    }
    assert_eq!(graceful["exit"], "exit 0");
    assert!(naive["modes"]["close"]["failed"].as_u64().unwrap() > 0, "{naive}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A backend that echoes what it reads, or resets every connection after its first read.
async fn backend(reset_after_read: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if reset_after_read {
                        let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
                        return;
                    }
                    let _ = stream.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

/// Sends one byte and reads what comes back: Ok(true) for the echo, Ok(false) for EOF.
async fn echo(stream: &mut TcpStream) -> std::io::Result<bool> {
    stream.write_all(b"x").await?;
    let mut buf = [0u8; 1];
    Ok(stream.read(&mut buf).await? == 1)
}

async fn reset_kind(stream: &mut TcpStream) -> ErrorKind {
    match echo(stream).await {
        Err(e) => e.kind(),
        Ok(answered) => panic!(
            "expected a reset, got {}",
            if answered { "an answer" } else { "EOF" }
        ),
    }
}

#[test]
fn the_service_moves_only_new_connections_and_only_after_the_lag() {
    runtime().block_on(async {
        let endpoint = backend(false).await;
        let service = Service::start("127.0.0.1:0".parse().unwrap(), vec![endpoint])
            .await
            .unwrap();
        let mut established = TcpStream::connect(service.addr()).await.unwrap();
        assert!(echo(&mut established).await.unwrap());

        let removal = service.remove_after(endpoint, Duration::from_millis(300));
        // Within the lag, new connections still reach the endpoint being removed.
        let mut early = TcpStream::connect(service.addr()).await.unwrap();
        assert!(echo(&mut early).await.unwrap());
        removal.await.unwrap();

        // After it, a new connection has no endpoint: reset, as kube-proxy's REJECT does.
        let mut late = TcpStream::connect(service.addr()).await.unwrap();
        assert_eq!(reset_kind(&mut late).await, ErrorKind::ConnectionReset);
        // Established connections keep their backend (conntrack).
        assert!(echo(&mut established).await.unwrap());
        assert!(echo(&mut early).await.unwrap());
    });
}

#[test]
fn a_refusing_or_resetting_pod_is_a_reset_for_the_client_never_a_retry() {
    runtime().block_on(async {
        let refusing: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let healthy = backend(false).await;
        // Round robin: the first connection goes to the refusing pod, and is not retried on
        // the healthy one.
        let service = Service::start("127.0.0.1:0".parse().unwrap(), vec![refusing, healthy])
            .await
            .unwrap();
        let mut first = TcpStream::connect(service.addr()).await.unwrap();
        assert_eq!(reset_kind(&mut first).await, ErrorKind::ConnectionReset);
        let mut second = TcpStream::connect(service.addr()).await.unwrap();
        assert!(echo(&mut second).await.unwrap());

        let resetting = backend(true).await;
        let service = Service::start("127.0.0.1:0".parse().unwrap(), vec![resetting])
            .await
            .unwrap();
        let mut client = TcpStream::connect(service.addr()).await.unwrap();
        assert_eq!(reset_kind(&mut client).await, ErrorKind::ConnectionReset);
    });
}

#[test]
fn a_custom_strategy_runs_the_users_config_and_commands() {
    let dir = common::TempDir::new("rehearse-custom");
    // The user's own config: the rehearsal config with another response, to see it is used.
    let config = nginx_graceful_tools::rehearse::pod_config::REHEARSAL_CONFIG
        .replace("nginx-graceful: nginx is serving", "served by the user's config");
    let config_path = dir.0.join("my-nginx.conf");
    std::fs::write(&config_path, config).unwrap();
    let work = dir.0.join("work");
    let output = Command::new(TOOLS)
        .args([
            "rehearse",
            "--strategy",
            "custom",
            "--entrypoint",
            "@NGINX@",
            "--stop-signal",
            "QUIT",
        ])
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "--work-dir",
            work.to_str().unwrap(),
        ])
        .args([
            "--modes", "close", "--warmup", "500ms", "--tail", "200ms", "--json",
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let run = &report["rehearsals"][0];
    assert_eq!(run["strategy"], "custom");
    let events: Vec<&str> = run["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"SIGQUIT to PID 1"), "{events:?}");
    // nginx as PID 1 quitting at once: new connections meet closed listeners until the lag is over.
    assert!(
        run["modes"]["close"]["failures"]["reset-new"].as_u64().unwrap() > 0,
        "{run}"
    );
    let pod_config = std::fs::read_to_string(work.join("custom-1/pod-a/nginx.conf")).unwrap();
    assert!(pod_config.contains("served by the user's config") && pod_config.contains("listen 127.0.0.11:"));
}

#[test]
fn a_config_without_a_listen_placeholder_is_refused_before_anything_starts() {
    let dir = common::TempDir::new("rehearse-bad-config");
    let config_path = dir.0.join("nginx.conf");
    std::fs::write(&config_path, "events {}\nhttp { server { listen 8080; } }\n").unwrap();
    let work = dir.0.join("work");
    let output = Command::new(TOOLS)
        .args(["rehearse", "--config", config_path.to_str().unwrap()])
        .args(["--work-dir", work.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no @LISTEN@") && stderr.contains("listen @LISTEN@;"),
        "{stderr}"
    );
    assert!(!work.exists(), "nothing was started, nor written");
}
