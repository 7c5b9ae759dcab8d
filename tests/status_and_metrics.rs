//! `nginx-graceful status` and `GET /metrics`, against a real nginx: with a supervisor, and
//! from the pid file without one.

use test_support as common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{Site, Supervisor, children_of, code};
use serde_json::Value;

const SECONDS: Duration = Duration::from_secs(1);

/// The whole response to a GET, head and body, over HTTP/1.0.
fn fetch(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(5 * SECONDS)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample whose line starts with `series`, in a /metrics response.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `nginx-graceful status` with `args`: (exit code, stdout).
fn status(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_nginx-graceful"))
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    (
        code(output.status),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn status_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (code, out) = status(&args);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A request in flight for a few seconds (a slow download), which keeps its worker busy
/// through a reload; an idle keep-alive connection would be closed at once.
fn request_in_flight(
    site: &Site,
    master: i32,
) -> std::thread::JoinHandle<Result<common::http::Reply, String>> {
    let download = common::http::get_in_background(site.addr(), &site.slow_path(4));
    common::wait_until("the download to start", 5 * SECONDS, || {
        nginx_graceful::nginx::connections::by_process(&children_of(master))
            .iter()
            .any(|(_, n)| *n > 0)
    });
    download
}

#[test]
fn a_supervisor_reports_its_phase_generations_reloads_and_crashes() {
    let site = Site::new();
    let health = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut supervisor =
        Supervisor::start(&site.run_args_with_health(health, &["--no-watch", "--reload-close-window", "0s"]));
    supervisor.wait_serving(&site);
    let runtime = site.runtime.display().to_string();
    let master = supervisor.master();

    let metrics = fetch(health, "/metrics");
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    assert!(
        metrics.contains("content-type: application/openmetrics-text"),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "nginx_graceful_phase{phase=\"serving\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "nginx_graceful_phase{phase=\"quitting\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "nginx_graceful_worker_generations{state=\"serving\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&metrics, "nginx_graceful_worker_crashes_total"), Some(0.0));
    // stderr is read: no log line was lost.
    assert_eq!(
        sample(&metrics, "nginx_graceful_log_lines_dropped_total"),
        Some(0.0),
        "{metrics}"
    );

    // One connection held open by a worker of the first generation, then a reload: that worker
    // keeps it while it shuts down, beside the new generation.
    let held = request_in_flight(&site, master);
    let before = status_json(&["--runtime-dir", &runtime]);
    assert_eq!(before["source"], "supervisor");
    assert_eq!(before["phase"], "serving");
    assert_eq!(before["master"]["pid"], master);
    assert!(before["last_reload"].is_null());
    let workers = before["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{before}");
    assert!(
        workers
            .iter()
            .all(|w| w["generation"] == 0 && w["state"] == "serving")
    );
    assert_eq!(before["connections"], 1, "{before}");

    supervisor.signal(libc::SIGHUP);
    supervisor
        .log
        .wait_for("the reload", 10 * SECONDS, |l| l.contains("reload confirmed"));
    let after = status_json(&["--runtime-dir", &runtime]);
    assert_eq!(after["last_reload"]["outcome"], "reloaded", "{after}");
    let workers = after["workers"].as_array().unwrap();
    let old: Vec<&Value> = workers.iter().filter(|w| w["generation"] == 1).collect();
    assert_eq!(old.len(), 1, "the worker holding the connection drains: {after}");
    assert_eq!(
        (old[0]["state"].as_str(), old[0]["connections"].as_u64()),
        (Some("shutting_down"), Some(1))
    );
    assert_eq!(
        workers.iter().filter(|w| w["generation"] == 0).count(),
        2,
        "{after}"
    );

    let (exit, table) = status(&["--runtime-dir", &runtime]);
    assert_eq!(exit, 0);
    assert!(table.contains("phase        serving"), "{table}");
    assert!(table.contains("last reload  reloaded"), "{table}");
    assert!(table.contains("old 1       shutting down"), "{table}");

    let metrics = fetch(health, "/metrics");
    assert_eq!(
        sample(&metrics, "nginx_graceful_reloads_total{outcome=\"reloaded\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "nginx_graceful_reload_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "nginx_graceful_worker_generations{state=\"shutting_down\"}"
        ),
        Some(1.0)
    );
    assert_eq!(held.join().unwrap().map(|r| r.status.as_u16()), Ok(200));

    // A worker killed from outside: the master reports it and starts another.
    let worker = *children_of(master).iter().max().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    common::wait_until("the crash counted", 5 * SECONDS, || {
        sample(&fetch(health, "/metrics"), "nginx_graceful_worker_crashes_total") == Some(1.0)
    });

    // Prometheus' own parser reads the whole scrape: one prefix, the conventional names.
    let scrape = fetch(health, "/metrics");
    let (head, body) = scrape.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let families = parse_openmetrics(body);
    for name in [
        "nginx_graceful_build_info",
        "nginx_graceful_config_last_reload_successful",
        "nginx_graceful_config_last_reload_successful_timestamp_seconds",
        "nginx_graceful_last_reload_timestamp_seconds",
        "nginx_graceful_worker_crashes",
        "nginx_graceful_master_unexpected_exits",
    ] {
        assert!(families.contains_key(name), "{name} not in {families:?}");
    }
    assert!(
        families
            .keys()
            .all(|n| n.starts_with("nginx_graceful_") && !n.starts_with("nginx_graceful_nginx_"))
    );
    assert_eq!(families["nginx_graceful_config_last_reload_successful"], 1.0);
    let reloaded_at = families["nginx_graceful_config_last_reload_successful_timestamp_seconds"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        reloaded_at > now - 60.0 && reloaded_at <= now,
        "{reloaded_at} for now {now}"
    );

    supervisor.signal(libc::SIGQUIT);
    assert_eq!(code(supervisor.wait_exit(10 * SECONDS)), 0);
}

/// The scrape through prometheus_client's OpenMetrics parser (which refuses anything out of
/// the format): each family's name and its first sample's value.
fn parse_openmetrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.samples:
        out[family.name] = family.samples[0].value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/install-deps.sh installs prometheus-client)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the scrape does not parse as OpenMetrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn without_a_supervisor_or_a_pid_file_status_reads_the_one_nginx_t_names() {
    let site = Site::new();
    let daemon = site.start_daemon();
    let (_nginx_dir, path) = site.path_with_its_nginx();
    let output = Command::new(env!("CARGO_BIN_EXE_nginx-graceful"))
        .args(["status", "--json", "--runtime-dir"])
        .arg(&site.runtime)
        .env("PATH", path)
        .env_remove("NGINX_GRACEFUL_PID_FILE")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(code(output.status), 0, "{out}");
    let view: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(view["pid_file"], site.pid_file().display().to_string());
    assert_eq!(view["master"]["pid"], daemon.master);
}

#[test]
fn without_a_supervisor_status_reads_the_pid_file() {
    let site = Site::new();
    let pid_file = site.pid_file().display().to_string();
    let runtime = site.runtime.display().to_string();

    let (exit, table) = status(&["--pid-file", &pid_file, "--runtime-dir", &runtime]);
    assert_eq!(exit, 23, "not running: {table}");
    assert!(table.contains("master       not running"), "{table}");

    let daemon = site.start_daemon();
    let held = request_in_flight(&site, daemon.master);
    let view = status_json(&["--pid-file", &pid_file, "--runtime-dir", &runtime]);
    assert_eq!(view["source"], "pid_file");
    assert_eq!(view["phase"], "serving");
    assert_eq!(view["master"]["pid"], daemon.master);
    assert_eq!(view["connections"], 1, "{view}");

    // `nginx -s reload` from outside: the old generation is told apart by its start time.
    let reload = Command::new("nginx")
        .args(["-e", "stderr", "-c"])
        .arg(&site.config)
        .args(["-s", "reload"])
        .status()
        .unwrap();
    assert!(reload.success());
    common::wait_until("the new generation", 5 * SECONDS, || {
        let view = status_json(&["--pid-file", &pid_file, "--runtime-dir", &runtime]);
        let workers = view["workers"].as_array().unwrap().clone();
        workers.iter().filter(|w| w["generation"] == 0).count() == 2
            && workers
                .iter()
                .any(|w| w["generation"] == 1 && w["connections"] == 1)
    });
    assert_eq!(held.join().unwrap().map(|r| r.status.as_u16()), Ok(200));
    drop(daemon);
}
