//! The first-field client: keep-alive as Python's http.client (and so urllib3 and requests)
//! does it. Only the FIRST `Connection` field of a response decides whether the connection
//! stays open (`HTTPResponse._check_close` reads `headers.get("connection")`), so a response
//! with `Connection: keep-alive` and then `Connection: close` keeps it. hyper honours a `close`
//! in any field and cannot be told otherwise, so this mode reads responses itself; opening
//! connections, TLS and the failure classes are the load's own.
//!
//! Before it reuses a connection it checks, as urllib3 does (`is_connection_dropped`), that the
//! server has not closed it meanwhile; a connection that turns out closed is replaced, which is
//! not a failure.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use super::classify::{Failure, Seen, request_failure};
use super::client::{Load, Metered};

/// A response head or a chunk-size line longer than this is not HTTP as far as the load cares.
const MAX_HEAD: u64 = 64 * 1024;

/// One open connection of the first-field mode.
pub struct Connection {
    reader: BufReader<Metered>,
    /// Bytes read from the server so far: tells "before any response byte" from "cut off".
    received: Arc<AtomicU64>,
    port: u16,
}

/// What the mode needs of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// HTTP/1.1 (or later); HTTP/1.0 closes unless it says keep-alive.
    pub http11: bool,
    /// The first `Connection` field's value, the only one http.client reads.
    pub connection: Option<String>,
    pub has_keep_alive_field: bool,
    pub framing: Framing,
}

/// How the body's end is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Neither: the body ends when the server closes.
    UntilClose,
}

impl Head {
    /// Whether http.client closes the connection after this response: `_check_close`, and a
    /// body that only the close can end.
    pub fn closes(&self) -> bool {
        let first = self.connection.as_deref().map(str::to_ascii_lowercase);
        let says = |word: &str| first.as_deref().is_some_and(|v| v.contains(word));
        let by_header = if self.http11 {
            says("close")
        } else {
            !(self.has_keep_alive_field || says("keep-alive"))
        };
        by_header || self.framing == Framing::UntilClose
    }
}

/// Parses a response head (the status line and the header lines, without the blank line).
/// `None` when it is not an HTTP/1 response head.
pub fn parse_head(lines: &[String]) -> Option<Head> {
    let (status_line, fields) = lines.split_first()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return None,
    };
    let status = parts.next()?;
    if status.len() != 3 {
        return None;
    }
    let status: u16 = status.parse().ok()?;
    let mut head = Head {
        status,
        http11,
        connection: None,
        has_keep_alive_field: false,
        framing: Framing::UntilClose,
    };
    let mut length = None;
    let mut chunked = false;
    for field in fields {
        let (name, value) = field.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            head.connection.get_or_insert_with(|| value.to_owned());
        } else if name.eq_ignore_ascii_case("keep-alive") {
            head.has_keep_alive_field = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>().ok()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        }
    }
    // No body, whatever the fields say (the mode only sends GET).
    head.framing = if matches!(status, 100..=199 | 204 | 304) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    Some(head)
}

/// Why an exchange failed.
enum Broken {
    Io(io::Error),
    /// The server closed the connection where more was due.
    Eof,
    /// Bytes that are not an HTTP/1 response.
    Malformed,
}

impl From<io::Error> for Broken {
    fn from(error: io::Error) -> Self {
        Broken::Io(error)
    }
}

/// One request in the first-field mode, on the worker's connection when the server has not
/// closed it, else on a new one. Returns the status or the failure, and whether the
/// connection was reused.
pub async fn request(
    load: &Load,
    request: &[u8],
    connection: &mut Option<Connection>,
    deadline: tokio::time::Instant,
    port: &mut u16,
) -> (Result<u16, Failure>, bool) {
    if connection.as_ref().is_some_and(Connection::dropped) {
        *connection = None;
    }
    let reused = connection.is_some();
    if connection.is_none() {
        match Metered::open(load, port).await {
            Ok((stream, received)) => {
                *connection = Some(Connection {
                    reader: BufReader::new(stream),
                    received,
                    port: *port,
                })
            }
            Err(failure) => return (Err(failure), false),
        }
    }
    let open = connection.as_mut().expect("opened above");
    *port = open.port;
    let received_before = open.received.load(Ordering::Relaxed);
    let outcome = match tokio::time::timeout_at(deadline, exchange(&mut open.reader, request)).await {
        Ok(Ok(head)) => {
            if head.closes() {
                *connection = None;
            }
            return (Ok(head.status), reused);
        }
        Err(_) => Failure::Timeout,
        Ok(Err(broken)) => {
            let started = open.received.load(Ordering::Relaxed) > received_before;
            classify(broken, started, reused)
        }
    };
    *connection = None;
    (Err(outcome), reused)
}

impl Connection {
    /// urllib3's check before it reuses a pooled connection: anything to read on an idle
    /// connection (its end, a reset, stray bytes) means the server is done with it.
    fn dropped(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut byte = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        let peeked = rustix::net::recv(self.reader.get_ref().tcp().as_fd(), &mut byte, flags);
        !matches!(peeked, Err(rustix::io::Errno::AGAIN))
    }
}

/// Writes the request and reads the whole response; the head, for its status and fields.
async fn exchange(reader: &mut BufReader<Metered>, request: &[u8]) -> Result<Head, Broken> {
    reader.get_mut().write_all(request).await?;
    let head = read_head(reader).await?;
    read_body(reader, head.framing).await?;
    Ok(head)
}

async fn read_head(reader: &mut BufReader<Metered>) -> Result<Head, Broken> {
    let mut lines = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        if budget == 0 {
            return Err(Broken::Malformed);
        }
        let line = read_line(reader, budget).await?;
        budget = budget.saturating_sub(line.len() as u64 + 2);
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    parse_head(&lines).ok_or(Broken::Malformed)
}

/// One line without its CRLF (or bare LF), of at most `limit` bytes.
async fn read_line(reader: &mut BufReader<Metered>, limit: u64) -> Result<String, Broken> {
    let mut line = Vec::new();
    let read = (&mut *reader).take(limit).read_until(b'\n', &mut line).await?;
    if read == 0 {
        return Err(Broken::Eof);
    }
    if line.pop() != Some(b'\n') {
        return Err(if (read as u64) < limit {
            Broken::Eof
        } else {
            Broken::Malformed
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| Broken::Malformed)
}

async fn read_body(reader: &mut BufReader<Metered>, framing: Framing) -> Result<(), Broken> {
    match framing {
        Framing::Length(length) => skip(reader, length).await,
        Framing::UntilClose => {
            tokio::io::copy(reader, &mut tokio::io::sink()).await?;
            Ok(())
        }
        Framing::Chunked => loop {
            let line = read_line(reader, MAX_HEAD).await?;
            let digits = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(digits, 16).map_err(|_| Broken::Malformed)?;
            if size == 0 {
                // Trailer fields, up to the blank line.
                while !read_line(reader, MAX_HEAD).await?.is_empty() {}
                return Ok(());
            }
            skip(reader, size).await?;
            if !read_line(reader, 2).await?.is_empty() {
                return Err(Broken::Malformed);
            }
        },
    }
}

/// Reads and drops exactly `length` bytes.
async fn skip(reader: &mut (impl AsyncRead + Unpin), length: u64) -> Result<(), Broken> {
    let read = tokio::io::copy(&mut reader.take(length), &mut tokio::io::sink()).await?;
    if read < length {
        return Err(Broken::Eof);
    }
    Ok(())
}

fn classify(broken: Broken, response_started: bool, reused: bool) -> Failure {
    let (io, parse_error) = match broken {
        Broken::Io(error) if error.kind() == io::ErrorKind::UnexpectedEof => (None, false),
        Broken::Io(error) => (Some(error.kind()), false),
        Broken::Eof => (None, false),
        Broken::Malformed => (None, true),
    };
    request_failure(Seen {
        io,
        parse_error,
        response_started,
        reused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[&str]) -> Option<Head> {
        parse_head(&lines.iter().map(|l| l.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn only_the_first_connection_field_counts_as_in_http_client() {
        let table: [(&[&str], bool); 8] = [
            // nginx while draining: its own field first, the snippet's add_header after it.
            (
                &[
                    "HTTP/1.1 200 OK",
                    "Connection: keep-alive",
                    "Connection: close",
                    "Content-Length: 3",
                ],
                false,
            ),
            (
                &[
                    "HTTP/1.1 200 OK",
                    "Connection: close",
                    "Connection: keep-alive",
                    "Content-Length: 3",
                ],
                true,
            ),
            (
                &["HTTP/1.1 200 OK", "connection: Close", "Content-Length: 3"],
                true,
            ),
            (
                &[
                    "HTTP/1.1 200 OK",
                    "Connection: keep-alive, close",
                    "Content-Length: 3",
                ],
                true,
            ),
            (&["HTTP/1.1 200 OK", "Content-Length: 3"], false),
            // A body that only the close can end.
            (&["HTTP/1.1 200 OK", "Connection: keep-alive"], true),
            (&["HTTP/1.0 200 OK", "Content-Length: 3"], true),
            (
                &["HTTP/1.0 200 OK", "Connection: keep-alive", "Content-Length: 3"],
                false,
            ),
        ];
        for (lines, closes) in table {
            assert_eq!(head(lines).unwrap().closes(), closes, "{lines:?}");
        }
    }

    #[test]
    fn heads_are_framed_by_their_fields() {
        let framing = |lines: &[&str]| head(lines).unwrap().framing;
        assert_eq!(
            framing(&["HTTP/1.1 200 OK", "Content-Length: 12"]),
            Framing::Length(12)
        );
        assert_eq!(
            framing(&[
                "HTTP/1.1 200 OK",
                "Transfer-Encoding: chunked",
                "Content-Length: 12"
            ]),
            Framing::Chunked
        );
        assert_eq!(framing(&["HTTP/1.1 204 No Content"]), Framing::Length(0));
        assert_eq!(framing(&["HTTP/1.1 200 OK"]), Framing::UntilClose);
        assert_eq!(head(&["HTTP/1.1 503 Busy"]).unwrap().status, 503);
    }

    #[test]
    fn what_is_not_a_response_head_is_refused() {
        for lines in [
            &[][..],
            &["SSH-2.0-OpenSSH_9.2"][..],
            &["HTTP/1.1 2000 OK"][..],
            &["HTTP/1.1 200 OK", "no colon"][..],
            &["HTTP/1.1 200 OK", "Content-Length: many"][..],
        ] {
            assert_eq!(head(lines), None, "{lines:?}");
        }
    }
}
