//! curl as a client, one result per transfer: its exit code, HTTP version, status, the
//! connections it opened and the response's header fields, read from `--write-out`.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::Value;

/// Every transfer's result, then its response header fields as JSON (`%{header_json}`, curl
/// 7.83 or later), then a line of its own.
const WRITE_OUT: &str = "transfer %{exitcode} %{http_version} %{http_code} %{num_connects} \
                         %{size_download} %{errormsg}\n%{header_json}\nend\n";

#[derive(Debug)]
pub struct Transfer {
    /// curl's exit code for this transfer: 16 and 92 are HTTP/2 framing and stream errors.
    pub exit_code: i32,
    pub version: String,
    pub status: u16,
    /// New connections this transfer opened: 0 when it reused or multiplexed on one.
    pub connects: u32,
    pub size: usize,
    pub error: String,
    pub headers: Value,
}

impl Transfer {
    pub fn has_connection_field(&self) -> bool {
        self.headers.get("connection").is_some()
    }

    pub fn says_close(&self) -> bool {
        self.headers["connection"].as_array().is_some_and(|v| {
            v.iter()
                .any(|v| v.as_str().is_some_and(|v| v.eq_ignore_ascii_case("close")))
        })
    }

    pub fn ok(&self, version: &str) -> bool {
        self.exit_code == 0 && self.status == 200 && self.version == version
    }
}

/// A curl process; killed on drop if it is still running.
pub struct Curl(Option<Child>);

impl Curl {
    /// Starts curl on `urls`, one transfer each, with `options`; bodies go to /dev/null.
    pub fn start(options: &[&str], urls: &[String]) -> Self {
        let mut command = Command::new("curl");
        // --no-progress-meter: curl 7.88 draws the --parallel meter even with --silent.
        command
            .args([
                "--silent",
                "--show-error",
                "--no-progress-meter",
                "--max-time",
                "20",
            ])
            .args(["--write-out", WRITE_OUT])
            .args(options);
        for url in urls {
            command.arg(url).args(["--output", "/dev/null"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl on PATH (scripts/install-deps.sh)");
        Self(Some(child))
    }

    /// Runs curl to its end; returns each transfer.
    pub fn run(options: &[&str], urls: &[String]) -> Vec<Transfer> {
        Self::start(options, urls).finish().0
    }

    /// Waits for curl to exit; returns each transfer and when curl was seen to exit.
    pub fn finish(mut self) -> (Vec<Transfer>, Instant) {
        let output = self.0.take().unwrap().wait_with_output().unwrap();
        let done = Instant::now();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let transfers = parse_transfers(&stdout);
        assert!(
            !transfers.is_empty(),
            "curl wrote no result: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        (transfers, done)
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_transfers(stdout: &str) -> Vec<Transfer> {
    let mut transfers = Vec::new();
    let mut lines = stdout.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("transfer ") else {
            continue;
        };
        let fields: Vec<&str> = rest.splitn(6, ' ').collect();
        let json: Vec<&str> = lines.by_ref().take_while(|l| *l != "end").collect();
        transfers.push(Transfer {
            exit_code: fields[0].parse().unwrap(),
            version: fields[1].to_owned(),
            status: fields[2].parse().unwrap(),
            connects: fields[3].parse().unwrap(),
            size: fields[4].parse().unwrap(),
            error: fields.get(5).unwrap_or(&"").to_string(),
            headers: serde_json::from_str(&json.join("\n"))
                .unwrap_or_else(|e| panic!("header_json: {e}: {json:?}")),
        });
    }
    transfers
}
