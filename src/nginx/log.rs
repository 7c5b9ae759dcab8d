//! nginx's stderr, passed through the supervisor line by line: the container log stays the
//! same, and a reload can read nginx's own reason when the master rolls a new config back.

use tokio::io::BufReader;
use tokio::sync::broadcast;

use crate::os::lines;

/// `[emerg]` lines as nginx wrote them: what a master writes when it cannot apply a new
/// config. (`[crit]` and `[alert]` come from requests too, e.g. failed TLS handshakes.)
#[derive(Debug, Clone)]
pub struct NginxErrors {
    tx: broadcast::Sender<String>,
    /// Workers that crashed, as the master reports them (it starts a new one each time).
    pub worker_crashes: prometheus_client::metrics::counter::Counter,
    /// nginx's lines are wrapped in JSON objects, to match a log whose lines are all JSON.
    as_json: bool,
}

impl Default for NginxErrors {
    fn default() -> Self {
        Self::new(false)
    }
}

impl NginxErrors {
    /// `as_json`: the supervisor logs JSON lines, so a log pipeline that parses every line as
    /// JSON must not choke on nginx's own.
    pub fn new(as_json: bool) -> Self {
        Self {
            tx: broadcast::Sender::new(32),
            worker_crashes: Default::default(),
            as_json,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }
}

pub fn is_error_line(line: &str) -> bool {
    line.contains("[emerg]")
}

/// The master's line for a worker that died: "worker process 7 exited on signal 11", or
/// "... exited with fatal code 2 and cannot be respawned". A worker that quits when told
/// exits with code 0, at notice level.
pub fn is_worker_crash(line: &str) -> bool {
    line.contains("[alert]")
        && line.contains(" worker process ")
        && (line.contains(" exited on signal ") || line.contains(" exited with fatal code "))
}

/// Copies `pipe` to our stderr until every nginx process has closed it.
pub fn pass_through(pipe: std::process::ChildStderr, errors: NginxErrors) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(pipe) = tokio::process::ChildStderr::from_std(pipe) else {
            return;
        };
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        // nginx writes lines of a few hundred bytes; a longer one is passed on in pieces.
        while lines::next_line(&mut reader, &mut line).await {
            let text = String::from_utf8_lossy(&line);
            // Queued, never written here: a stalled stderr must not stall the loop.
            if errors.as_json {
                let wrapped = as_json(text.trim_end(), std::time::SystemTime::now());
                crate::logging::write_line(format!("{wrapped}\n").into_bytes());
            } else {
                let mut copy = line.clone();
                if !copy.ends_with(b"\n") {
                    copy.push(b'\n');
                }
                crate::logging::write_line(copy);
            }
            if is_error_line(&text) {
                let _ = errors.tx.send(text.trim_end().to_owned());
            }
            if is_worker_crash(&text) {
                errors.worker_crashes.inc();
            }
        }
    })
}

/// One of nginx's lines in the supervisor's JSON schema: `timestamp` and `level` as the
/// supervisor writes them (nginx's own `[level]`, as the nearest of ERROR, WARN, INFO, DEBUG),
/// `message` the line as nginx wrote it, `source` "nginx"; one log query then covers both.
fn as_json(line: &str, now: std::time::SystemTime) -> serde_json::Value {
    serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(now).to_string(),
        "level": level_of(line),
        "message": line,
        "source": "nginx",
    })
}

/// nginx's `[emerg]` ... `[debug]`, in the supervisor's levels. A line without one is what
/// nginx prints for a human with no level (its version, a config test's success): INFO.
fn level_of(line: &str) -> &'static str {
    let level = line
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(level, _)| level);
    match level {
        None | Some("notice" | "info") => "INFO",
        Some("warn") => "WARN",
        Some("debug") => "DEBUG",
        Some(_) => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_lines_share_the_supervisors_json_schema() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_764_562_000_123_456);
        let line = "2026/12/01 04:06:40 [notice] 7#7: signal process started";
        let json = as_json(line, at);
        assert_eq!(json["timestamp"], "2025-12-01T04:06:40.123456Z");
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["message"], line);
        assert_eq!(json["source"], "nginx");
        for (line, level) in [
            ("2026/12/01 04:06:40 [emerg] 7#7: bind() failed", "ERROR"),
            ("2026/12/01 04:06:40 [crit] 7#7: *1 stat() failed", "ERROR"),
            ("2026/12/01 04:06:40 [warn] 7#7: conflicting server name", "WARN"),
            (
                "2026/12/01 04:06:40 [info] 7#7: *1 client closed connection",
                "INFO",
            ),
            ("2026/12/01 04:06:40 [debug] 7#7: epoll add event", "DEBUG"),
            ("nginx: [emerg] unknown directive \"lisen\"", "ERROR"),
            ("nginx: configuration file test is successful", "INFO"),
        ] {
            assert_eq!(level_of(line), level, "{line}");
        }
    }

    #[test]
    fn error_lines_are_told_from_notices() {
        assert!(is_error_line(
            "2026/11/22 00:00:00 [emerg] 12#12: bind() to 127.0.0.1:80 failed (98: Address in use)"
        ));
        assert!(!is_error_line(
            "[crit] 7#7: *1 SSL_do_handshake() failed (SSL: error) while SSL handshaking"
        ));
        assert!(!is_error_line(
            "2026/11/22 00:00:00 [notice] 12#12: signal process started"
        ));
        assert!(!is_error_line(
            "[warn] 1#1: the \"user\" directive makes sense only if ..."
        ));
    }

    #[test]
    fn worker_crashes_are_told_from_workers_that_quit() {
        for (line, crash) in [
            (
                "2026/11/22 06:00:00 [alert] 12#12: worker process 41 exited on signal 9",
                true,
            ),
            (
                "[alert] 12#12: worker process 41 exited with fatal code 2 and cannot be respawned",
                true,
            ),
            ("[notice] 12#12: worker process 41 exited with code 0", false),
            ("[alert] 12#12: cache loader process 43 exited on signal 9", false),
            ("[notice] 12#12: signal 17 (SIGCHLD) received from 41", false),
        ] {
            assert_eq!(is_worker_crash(line), crash, "{line}");
        }
    }
}
