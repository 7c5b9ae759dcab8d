//! Logs: readable text on a terminal, one JSON object per line for containers. Every event goes
//! to stderr, unbuffered, so the last lines are out before the supervisor exits.

use crate::cli::{LogArgs, LogFormat};

pub fn init(args: &LogArgs) {
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
