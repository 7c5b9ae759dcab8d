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
                let wrapped = serde_json::json!({"source": "nginx", "message": text.trim_end()});
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

#[cfg(test)]
mod tests {
    use super::*;

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
