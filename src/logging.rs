//! Logs: readable text on a terminal, one JSON object per line for containers, all to stderr.
//!
//! Logging never ends or stalls the supervisor. A broken pipe (the log collector gone), a full
//! disk or a reader that stopped reading would otherwise abort it (a failed `eprintln!` panics)
//! or block its one thread on a full pipe, and with it the drain. So every line, the
//! supervisor's and nginx's alike, goes into a queue bounded in bytes, and one thread of its
//! own writes the queue to stderr. A line that finds the queue full, or whose write fails, is
//! dropped and counted; the next line that gets through is preceded by one that says how many
//! were lost. Before the supervisor exits, [`flush`] waits, briefly, for the queue to empty.
//! SIGPIPE is ignored (Rust's runtime does that before `main`), so a reader gone is an EPIPE
//! here, not the end of the supervisor.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

static JSON: OnceLock<bool> = OnceLock::new();
/// In JSON, each of this process's lines says which command wrote it (`"source"`), as nginx's
/// lines say `"nginx"`: one schema, one query for both.
static SOURCE: OnceLock<&'static str> = OnceLock::new();

/// Lines waiting for a slow stderr: enough for a drain's worth of lines; beyond it, lines go.
const QUEUE_BYTES: usize = 1024 * 1024;

/// [`flush`] stops waiting when stderr took no line for this long (its reader has stalled)...
const FLUSH_STALL: Duration = Duration::from_millis(100);
/// ...or after this long in all, so the exit stays within the drain's safety margin.
const FLUSH_AT_MOST: Duration = Duration::from_millis(500);

/// Whether log lines are JSON objects (then `run` wraps nginx's own lines to match).
pub fn is_json() -> bool {
    JSON.get() == Some(&true)
}

/// Installs the subscriber: JSON lines or text, at `level` and above; `source` names this
/// process's lines in JSON (`supervisor` for `run`).
pub fn init(json: bool, level: tracing::Level, source: &'static str) {
    let _ = JSON.set(json);
    let _ = SOURCE.set(source);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(|| QueuedLine(Vec::new()))
        .log_internal_errors(false)
        .with_target(false);
    if json {
        builder.json().flatten_event(true).with_current_span(false).init()
    } else {
        builder
            .with_ansi(nix::unistd::isatty(std::io::stderr()).unwrap_or(false))
            .init()
    }
}

/// Queues one line (with its newline) for stderr; never blocks on stderr, never fails.
pub fn write_line(line: Vec<u8>) {
    SINK.push(line);
}

/// Lines dropped so far because stderr was full, closed or failing.
pub fn dropped_lines() -> u64 {
    SINK.dropped.load(Ordering::Relaxed)
}

/// Waits until every queued line is written, stderr stalls, or [`FLUSH_AT_MOST`] has passed.
pub fn flush() {
    SINK.flush(FLUSH_AT_MOST, FLUSH_STALL);
}

/// What tracing formats one event into; queued whole when tracing drops it.
struct QueuedLine(Vec<u8>);

impl Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_line(with_source(std::mem::take(&mut self.0)));
        }
    }
}

/// A JSON line with `"source"` first, unless the event named one itself (a `drain` hook that
/// relays the supervisor's events says whose they are).
fn with_source(line: Vec<u8>) -> Vec<u8> {
    let (Some(source), Some(b'{')) = (SOURCE.get(), line.first()) else {
        return line;
    };
    if !is_json() || line.get(1) == Some(&b'}') || line.windows(9).any(|w| w == b"\"source\":") {
        return line;
    }
    let mut out = Vec::with_capacity(line.len() + 32);
    out.extend_from_slice(format!("{{\"source\":\"{source}\",").as_bytes());
    out.extend_from_slice(&line[1..]);
    out
}

static SINK: LazyLock<Sink> = LazyLock::new(Sink::start);

struct Sink {
    queue: Mutex<Queue>,
    changed: Condvar,
    dropped: AtomicU64,
    /// The writer thread runs; without one, lines are written where they are logged.
    threaded: OnceLock<bool>,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The writer holds a line it has not finished writing.
    writing: bool,
    /// Lines written so far: [`Sink::flush`] sees progress in it.
    written: u64,
    /// Dropped lines already reported in a line of their own.
    dropped_told: u64,
}

impl Sink {
    fn start() -> Self {
        let sink = Sink {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            dropped: AtomicU64::new(0),
            threaded: OnceLock::new(),
        };
        // A small stack: the thread only copies bytes.
        let spawned = std::thread::Builder::new()
            .name("stderr".into())
            .stack_size(64 * 1024)
            .spawn(|| SINK.write_forever());
        let _ = sink.threaded.set(spawned.is_ok());
        sink
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: Vec<u8>) {
        if self.threaded.get() == Some(&false) {
            // No thread to spare (a limit on threads): as before the queue, errors ignored.
            let _ = std::io::stderr().write_all(&line);
            return;
        }
        let mut queue = self.lock();
        if queue.bytes + line.len() > QUEUE_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.bytes += line.len();
        queue.lines.push_back(line);
        self.changed.notify_all();
    }

    fn write_forever(&self) {
        let mut stderr = std::io::stderr();
        let mut queue = self.lock();
        loop {
            let Some(line) = queue.lines.pop_front() else {
                queue.writing = false;
                self.changed.notify_all();
                queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            queue.bytes -= line.len();
            queue.writing = true;
            let dropped = self.dropped.load(Ordering::Relaxed);
            let untold = dropped - queue.dropped_told;
            queue.dropped_told = dropped;
            drop(queue);
            if untold > 0 {
                let _ = stderr.write_all(&dropped_note(untold));
            }
            // EPIPE, ENOSPC, EIO: the line is lost, the supervisor goes on.
            if stderr.write_all(&line).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue = self.lock();
            queue.written += 1;
            self.changed.notify_all();
        }
    }

    fn flush(&self, at_most: Duration, stall: Duration) {
        let deadline = Instant::now() + at_most;
        let mut queue = self.lock();
        let (mut written, mut progress_at) = (queue.written, Instant::now());
        while !queue.lines.is_empty() || queue.writing {
            if queue.written != written {
                (written, progress_at) = (queue.written, Instant::now());
            }
            // Nothing written for `stall`: the reader has stopped reading.
            let stalled_at = progress_at + stall;
            let left = deadline.min(stalled_at).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self
                .changed
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The line that stands for lines lost, in the log's own format.
fn dropped_note(count: u64) -> Vec<u8> {
    let message = format!("{count} log lines were dropped: stderr was full, closed or failing");
    let line = match is_json() {
        true => serde_json::json!({"level": "WARN", "message": message, "dropped_lines": count}).to_string(),
        false => format!("WARN {message}"),
    };
    format!("{line}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_line_note_matches_the_log_format() {
        let note = String::from_utf8(dropped_note(3)).unwrap();
        assert!(note.ends_with('\n'));
        assert!(note.contains("3 log lines were dropped"), "{note}");
    }
}
