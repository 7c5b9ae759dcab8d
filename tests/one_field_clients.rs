//! Clients that read only the first `Connection` field, Python's http.client itself (and so
//! urllib3 and requests), through a real drain. While draining nginx sends its own
//! `Connection: keep-alive` before the snippet's `Connection: close`, and stock nginx cannot put
//! them the other way round (docs/keepalive.md, "One-field clients"): these tests pin down what
//! such a client sees, and what the drain does guarantee it.

use test_support as common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Site, Supervisor, code, free_port};
use serde_json::Value;

const SIGTERM: i32 = 15;
const SECONDS: Duration = Duration::from_secs(1);
const DELAY: Duration = Duration::from_secs(2);
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/one_field_client.py");

/// The script, fed one step at a time; killed on drop.
struct PythonClient {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
}

impl PythonClient {
    fn start(port: u16, upstream_port: u16) -> Self {
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .args([port.to_string(), upstream_port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (apt-get install python3)");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (send, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Self {
            child,
            stdin,
            answers,
        }
    }

    /// Runs one step and returns its answer.
    fn step(&mut self, step: &str) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{step}").unwrap();
        stdin.flush().unwrap();
        let line = self
            .answers
            .recv_timeout(30 * SECONDS)
            .unwrap_or_else(|_| panic!("the Python client did not answer step {step} within 30 s"));
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["step"], step, "{answer}");
        answer
    }
}

impl Drop for PythonClient {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connection_fields(response: &Value) -> Vec<&str> {
    response["connection_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn python_http_client_is_kept_until_sigquit_and_only_a_dropped_connection_check_saves_it() {
    let upstream_port = free_port();
    let site = Site::build(
        true,
        &format!("location = /delayed {{ proxy_pass http://127.0.0.1:{upstream_port}; }}"),
    );
    let delay = format!("{}ms", DELAY.as_millis());
    // Every client told at once: the close spread is tests/close_spread.rs's.
    let mut supervisor =
        Supervisor::start_serving(&site, &["--propagation-delay", &delay, "--close-spread", "0s"]);
    let mut client = PythonClient::start(site.port, upstream_port);

    let before = client.step("before");
    for response in before["responses"].as_array().unwrap() {
        assert_eq!(response["status"], 200, "{before}");
        assert_eq!(connection_fields(response), ["keep-alive"], "{before}");
        assert_eq!(response["will_close"], false, "{before}");
    }

    supervisor.signal(SIGTERM);
    supervisor.log.wait_phase("propagation_delay", 5 * SECONDS);
    let draining = client.step("draining");
    let told_at = Instant::now();
    // The limit: nginx's own field comes first, and http.client reads only that one.
    for response in draining["responses"].as_array().unwrap() {
        assert_eq!(response["status"], 200, "{draining}");
        assert_eq!(connection_fields(response), ["keep-alive", "close"], "{draining}");
        assert_eq!(response["will_close"], false, "{draining}");
    }
    // So the client stays: its next request goes out on the same connection, to this pod.
    assert_eq!(draining["again"]["status"], 200, "{draining}");
    assert_eq!(
        draining["same_connections"],
        serde_json::json!([true, true, true]),
        "{draining}"
    );

    let (_, quit_at) = supervisor.log.wait_phase_arrival("quitting", 5 * SECONDS);
    let quit = client.step("quit");
    assert_eq!(
        code(supervisor.wait_exit(20 * SECONDS)),
        0,
        "{:?}",
        supervisor.log.lines()
    );

    // nginx kept the connection through the whole propagation delay and closed it, idle, at
    // SIGQUIT (ngx_close_idle_connections).
    let closed_after = quit["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("never closed: {quit}"));
    let quit_after = (quit_at - told_at).as_secs_f64();
    assert!(
        closed_after > DELAY.as_secs_f64() * 0.75 && (closed_after - quit_after).abs() < 1.0,
        "closed {closed_after:.2} s after the client was told keep-alive while draining; SIGQUIT logged at {quit_after:.2} s: {quit}"
    );
    // A response nginx began after SIGQUIT says close in its own, first, field: http.client
    // leaves.
    let delayed = &quit["delayed"]["response"];
    assert_eq!(delayed["status"], 200, "{quit}");
    assert_eq!(connection_fields(delayed), ["close", "close"], "{quit}");
    assert_eq!(delayed["will_close"], true, "{quit}");
    // Raw http.client sends its next request into the closed connection and fails;
    // urllib3's check before reuse sees the close and would open a new connection.
    let raw_error = quit["raw"]["error"].as_str().unwrap_or_else(|| panic!("{quit}"));
    assert!(
        ["RemoteDisconnected", "ConnectionResetError", "BrokenPipeError"].contains(&raw_error),
        "{quit}"
    );
    assert_eq!(quit["checking"]["dropped"], true, "{quit}");
}
