//! Logs: readable text on a terminal, one JSON object per line for containers. Every event goes
//! to stderr, unbuffered, so the last lines are out before the supervisor exits.

use std::sync::OnceLock;

use crate::cli::{LogArgs, LogFormat};

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Whether log lines are JSON objects: then nginx's own lines are wrapped to match, so a log
/// pipeline that parses every line as JSON does not choke on them.
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

pub fn init(args: &LogArgs) {
    let _ = FORMAT.set(args.log_format);
    let builder = tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder
            .with_ansi(nix::unistd::isatty(std::io::stderr()).unwrap_or(false))
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
