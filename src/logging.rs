//! Logs: readable text on a terminal, one JSON object per line for containers. Every event goes
//! to stderr, unbuffered, so the last lines are out before the supervisor exits.

use std::sync::OnceLock;

static JSON: OnceLock<bool> = OnceLock::new();

/// Whether log lines are JSON objects (then `run` wraps nginx's own lines to match).
pub fn is_json() -> bool {
    JSON.get() == Some(&true)
}

/// Installs the subscriber: JSON lines or text, at `level` and above.
pub fn init(json: bool, level: tracing::Level) {
    let _ = JSON.set(json);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).with_current_span(false).init()
    } else {
        builder
            .with_ansi(nix::unistd::isatty(std::io::stderr()).unwrap_or(false))
            .init()
    }
}
