//! What a drain ended with, for the exit code, the log, `/metrics` and the `drain` client.

use std::time::Duration;

use serde_json::Value;

use crate::duration::fmt;
use crate::error::exit;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The budget ran out and nginx was stopped by SIGTERM or SIGKILL.
    pub escalated: bool,
    /// Established connections when SIGQUIT went out; `None` when nginx was gone before the
    /// count finished (it had nothing in flight worth waiting for).
    pub connections_at_quit: Option<usize>,
    /// Connections still open when nginx's worker_shutdown_timeout fired, which nginx then
    /// closed itself (WebSockets, streams, slow downloads); `None` when the timeout is unknown.
    pub closed_by_shutdown_timeout: Option<usize>,
    pub killed: usize,
    pub elapsed: Duration,
}

impl DrainOutcome {
    pub fn exit_code(&self) -> i32 {
        if self.escalated {
            crate::error::exit::ESCALATED
        } else {
            crate::error::exit::OK
        }
    }

    /// The event that ends a drain, for logs and for `drain` clients.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "event": "outcome",
            "outcome": if self.escalated { "escalated" } else { "clean" },
            "exit_code": self.exit_code(),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "connections_at_quit": self.connections_at_quit,
            "closed_by_shutdown_timeout": self.closed_by_shutdown_timeout,
            "killed": self.killed,
        })
    }
}

/// The drain's last line, from its outcome event: outcome, total time, connections at SIGQUIT, processes killed.
pub fn log_summary(outcome: &Value, how: &str) -> i32 {
    let code = outcome["exit_code"].as_i64().unwrap_or(exit::INTERNAL as i64) as i32;
    let elapsed = std::time::Duration::from_millis(outcome["elapsed_ms"].as_u64().unwrap_or(0));
    tracing::info!(
        outcome = outcome["outcome"].as_str().unwrap_or("unknown"),
        elapsed_ms = elapsed.as_millis() as u64,
        connections_at_quit = outcome["connections_at_quit"].as_u64(),
        closed_by_shutdown_timeout = outcome["closed_by_shutdown_timeout"].as_u64(),
        killed = outcome["killed"].as_u64().unwrap_or(0),
        // Controller mode: how the controller ended once nginx had.
        controller_exit = outcome["controller_exit"].as_str(),
        controller_killed = outcome["controller_killed"].as_bool(),
        exit_code = code,
        "{how}: {} in {}, {} connections at SIGQUIT,{} {} processes killed",
        outcome["outcome"].as_str().unwrap_or("unknown"),
        fmt(elapsed),
        // Not counted when nginx was gone before the count was: it held nothing for long.
        outcome["connections_at_quit"]
            .as_u64()
            .map_or("uncounted".to_string(), |n| n.to_string()),
        outcome["closed_by_shutdown_timeout"]
            .as_u64()
            .map_or(String::new(), |n| format!(
                " {n} closed by worker_shutdown_timeout,"
            )),
        outcome["killed"],
    );
    code
}
