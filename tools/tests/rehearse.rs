//! `rehearse` end to end (real nginx in PID namespaces, real signals, the Service imitation),
//! and the Service imitation on its own: it must behave as kube-proxy does, or the rehearsal
//! proves nothing.

use test_support as common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use common::free_port;

/// The tools binary under test.
const TOOLS: &str = env!("CARGO_BIN_EXE_nginx-graceful-tools");
use nginx_graceful_tools::rehearse::service::Service;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[test]
fn nginx_graceful_drops_nothing_where_the_naive_recipe_drops_requests() {
    let dir = common::TempDir::new("rehearse");
    let config = dir.0.join("rehearsal.conf");
    std::fs::write(&config, rehearsal_config(&shipped_config())).unwrap();
    let (graceful, naive, code) = graceful_against_naive(&dir.0, &config, &[]);

    assert_eq!(graceful["strategy"], "nginx-graceful");
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
    assert_terminated_pod_drained(&dir.0, &graceful);

    // The rehearsal sees what the fast shutdown does: requests lost, in the close mode at least.
    assert_eq!(naive["strategy"], "naive");
    assert!(naive["modes"]["close"]["failed"].as_u64().unwrap() > 0, "{naive}");
    assert_eq!(code, Some(1), "a failed request fails the run");
}

/// The propagation delay the nginx-graceful pods take from their environment, against the
/// Service's lag: the endpoint goes a second before SIGQUIT.
const DELAY_MS: u64 = 2000;
const LAG_MS: u64 = 1000;
/// The close spread the nginx-graceful pods take from their environment: within the delay.
const SPREAD_MS: u64 = 1000;
/// How long /slow takes in the tests' rehearsal config. Longer than the second between the
/// endpoint removal and SIGQUIT: the terminated pod has requests in flight at its quit (about
/// ten, from those that begin in the half second before the removal). Shorter than the delay
/// by half a second: a keep-alive response begun before the drain (no `Connection: close` in
/// its head) ends well before SIGQUIT, and the client's next request on that connection is told
/// to close; ending at SIGQUIT, the client would reuse a connection nginx is closing, a race no
/// supervisor can prevent.
const SLOW_MS: u64 = 1500;

fn shipped_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nginx-conf/rehearsal.conf"
    ))
    .unwrap()
}

/// The rehearsal config with what the tests read from a pod: an access log (when each request
/// ended, in epoch seconds, how long it took, its status and path, and whether the drain flag
/// told it to close), and a /slow of 1.5 s instead of 1 s: 32 KiB at 20 KiB/s, in writes of
/// 2 KiB (in larger ones, nginx's rate limit keeps to whole seconds).
fn rehearsal_config(shipped: &str) -> String {
    let config = shipped
        .replace(
            "access_log off;",
            "log_format rehearsal '$msec $request_time $status $request_uri $nginx_graceful_connection';\n    \
             access_log @RUNTIME_DIR@/access.log rehearsal;",
        )
        .replace("limit_rate 32k;", "output_buffers 1 2k; limit_rate 20k;");
    assert!(
        config.contains("access_log @RUNTIME_DIR@") && config.contains("limit_rate 20k;"),
        "the shipped rehearsal config changed: {shipped}"
    );
    config
}

/// A short rehearsal of nginx-graceful and the naive recipe with `config`, its files kept in
/// `work`, and `extra` arguments: the nginx-graceful pods take their propagation delay and JSON
/// logs from the environment they inherit. Returns both reports and the exit code.
fn graceful_against_naive(
    work: &Path,
    config: &Path,
    extra: &[&std::ffi::OsStr],
) -> (Value, Value, Option<i32>) {
    let output = Command::new(TOOLS)
        .args(["rehearse", "--compare", "nginx-graceful,naive", "--json"])
        .args(["--warmup", "1s", "--tail", "500ms", "--grace-period", "10s"])
        // 30 requests a second to /slow in each mode, 45 of them in flight: a few reach the
        // terminated pod in the half second before its endpoint goes.
        .args(["--rate", "300", "--concurrency", "64"])
        .arg("--propagation-lag")
        .arg(format!("{LAG_MS}ms"))
        .arg("--config")
        .arg(config)
        .arg("--work-dir")
        .arg(work.join("work"))
        .args(extra)
        .env("NGINX_GRACEFUL_PROPAGATION_DELAY", format!("{DELAY_MS}ms"))
        .env("NGINX_GRACEFUL_CLOSE_SPREAD", format!("{SPREAD_MS}ms"))
        .env("NGINX_GRACEFUL_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let [graceful, naive] = report["rehearsals"].as_array().unwrap().as_slice() else {
        panic!("two rehearsals: {report}");
    };
    (graceful.clone(), naive.clone(), output.status.code())
}

/// One request in a pod's access log; times in epoch seconds.
#[derive(Debug)]
struct Request {
    start: f64,
    end: f64,
    status: u16,
    path: String,
    /// The drain flag was up: the response said `Connection: close`.
    told_to_close: bool,
}

fn access_log(path: &Path) -> Vec<Request> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let [end, took, status, path, flag] = fields[..] else {
                panic!("an access log line of five fields: {line}");
            };
            let end: f64 = end.parse().unwrap();
            Request {
                start: end - took.parse::<f64>().unwrap(),
                end,
                status: status.parse().unwrap(),
                path: path.to_owned(),
                told_to_close: flag == "close",
            }
        })
        .collect()
}

/// When the first line of a pod's log with `"phase": phase` was written, in epoch seconds: the
/// supervisor's, before the hook relays it.
fn phase_at(events: &[Value], phase: &str) -> f64 {
    events
        .iter()
        .filter(|e| e["phase"] == phase)
        .map(|e| {
            let at = humantime::parse_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
            at.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
        })
        .min_by(f64::total_cmp)
        .unwrap_or_else(|| panic!("no {phase} in the pod's log"))
}

/// The terminated pod of the nginx-graceful rehearsal (pod-a, its files kept in `work`) was
/// drained with load in flight and lost nothing: every request to it succeeded, new ones were
/// served after its drain began and told to close, at least one was in flight when SIGQUIT went
/// out and finished, and the pod exited no sooner than the delay and no later than the delay +
/// the slowest request + 0.5 s. What the clients saw through the Service is the rehearsal's.
#[track_caller]
fn assert_terminated_pod_drained(work: &Path, graceful: &Value) {
    for mode in ["close", "keep-alive"] {
        let summary = &graceful["modes"][mode];
        assert_eq!(summary["failed"], 0, "{mode}: {summary}");
    }
    assert_eq!(graceful["exit"], "exit 0");
    let exit_after = graceful["exit_after_ms"].as_u64().unwrap();
    assert!(
        (DELAY_MS..=DELAY_MS + SLOW_MS + 500).contains(&exit_after),
        "drained in {exit_after} ms"
    );

    let pod = work.join("work/nginx-graceful-1/pod-a");
    let log = std::fs::read_to_string(work.join("work/nginx-graceful-1/pod-a.log")).unwrap();
    let events: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let summary = events
        .iter()
        .find(|e| e["outcome"].is_string() && e["connections_at_quit"].is_number())
        .unwrap_or_else(|| panic!("no drain summary in the pod's log:\n{log}"));
    assert_eq!(summary["outcome"], "clean", "{summary}");
    assert!(
        summary["connections_at_quit"].as_u64().unwrap() >= 1,
        "nothing in flight at SIGQUIT: {summary}"
    );
    let (unready, quit) = (phase_at(&events, "unready"), phase_at(&events, "quitting"));
    assert!(
        quit - unready >= DELAY_MS as f64 / 1e3,
        "SIGQUIT {:.3} s after the drain began",
        quit - unready
    );

    let requests = access_log(&pod.join("access.log"));
    let failed: Vec<&Request> = requests.iter().filter(|r| r.status != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let too_quick: Vec<&Request> = requests
        .iter()
        .filter(|r| r.path == "/slow" && r.end - r.start < (SLOW_MS - 100) as f64 / 1e3)
        .collect();
    assert!(too_quick.is_empty(), "/slow takes {SLOW_MS} ms: {too_quick:?}");
    // Served while the endpoint went away: new requests after the drain began (the log's times
    // are whole milliseconds); some told to close within the close spread, every one after it.
    let during: Vec<&Request> = requests
        .iter()
        .filter(|r| r.start > unready + 0.002 && r.start < quit)
        .collect();
    assert!(
        during.len() >= 100,
        "{} requests to the terminated pod during its drain, of {}",
        during.len(),
        requests.len()
    );
    let spread_over = unready + SPREAD_MS as f64 / 1e3 + 0.002;
    let (in_spread, after): (Vec<&Request>, Vec<&Request>) =
        during.iter().partition(|r| r.start < spread_over);
    let told_in_spread = in_spread.iter().filter(|r| r.told_to_close).count();
    assert!(
        told_in_spread > 0 && told_in_spread < in_spread.len(),
        "{told_in_spread} of {} told to close within the spread",
        in_spread.len()
    );
    let not_told: Vec<&&Request> = after.iter().filter(|r| !r.told_to_close).collect();
    assert!(
        !after.is_empty() && not_told.is_empty(),
        "served after the close spread without Connection: close: {not_told:?} of {}",
        after.len()
    );
    // In flight at SIGQUIT, and finished.
    let across: Vec<&Request> = requests
        .iter()
        .filter(|r| r.start < quit && r.end > quit)
        .collect();
    assert!(
        !across.is_empty() && across.iter().all(|r| r.path == "/slow"),
        "requests in flight at SIGQUIT: {across:?}"
    );
}

#[test]
fn over_tls_the_rehearsal_tells_the_same_story() {
    let dir = common::TempDir::new("rehearse-tls");
    let certificate = common::tls::TestCertificate::make(&dir.0);
    let shipped = rehearsal_config(&shipped_config());
    let config = shipped.replace(
        "listen @LISTEN@;",
        &format!(
            // Records of 2 KiB, as the writes: in larger ones /slow goes faster.
            "listen @LISTEN@ ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        \
             ssl_buffer_size 2k;",
            certificate.cert.display(),
            certificate.key.display()
        ),
    );
    assert_ne!(config, shipped, "the shipped config listens on @LISTEN@");
    let path = dir.0.join("tls.conf");
    std::fs::write(&path, config).unwrap();

    let (graceful, naive, _) = graceful_against_naive(&dir.0, &path, &["--tls".as_ref()]);
    assert_terminated_pod_drained(&dir.0, &graceful);
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
