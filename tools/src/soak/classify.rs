//! What went wrong with one request, from what the client saw: the failure classes that `soak`
//! counts and `rehearse` reports. Pure: the client gathers the facts, this names them.

use std::io::ErrorKind;

/// A failed request. Anything else is a success, including a server that says
/// `Connection: close` or closes an idle connection before the next request was written: the
/// client reconnects, as every HTTP client does, and nothing was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// Nothing listens: the connect was refused.
    Refused,
    /// The connect did not complete within the connect timeout.
    ConnectTimeout,
    /// The connect failed some other way (no route, no address, ...).
    ConnectError,
    /// Reset before any response byte, on a connection opened for this request.
    ResetNew,
    /// Reset before any response byte, on a reused keep-alive connection: the race where a
    /// server closes an idle connection as the client writes its next request.
    ResetReused,
    /// The connection ended cleanly (EOF) after the request, before any response byte.
    Eof,
    /// The response started and was then cut off: reset or EOF inside the headers or body.
    Truncated,
    /// No complete response within the response timeout.
    Timeout,
    /// Bytes came back that are not an HTTP/1 response.
    Malformed,
    /// The server answered 500..=599.
    Http5xx,
    /// The TLS handshake failed for TLS's own reasons: a certificate not trusted, no protocol
    /// or cipher in common.
    Tls,
}

impl Failure {
    pub const ALL: [Failure; 11] = [
        Failure::Refused,
        Failure::ConnectTimeout,
        Failure::ConnectError,
        Failure::ResetNew,
        Failure::ResetReused,
        Failure::Eof,
        Failure::Truncated,
        Failure::Timeout,
        Failure::Malformed,
        Failure::Http5xx,
        Failure::Tls,
    ];

    /// The short name in reports, JSON and timelines.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::ConnectTimeout => "connect-timeout",
            Failure::ConnectError => "connect-error",
            Failure::ResetNew => "reset-new",
            Failure::ResetReused => "reset-reused",
            Failure::Eof => "eof",
            Failure::Truncated => "truncated",
            Failure::Timeout => "timeout",
            Failure::Malformed => "malformed",
            Failure::Http5xx => "http-5xx",
            Failure::Tls => "tls",
        }
    }

    /// One line for a person reading the report.
    pub fn meaning(self) -> &'static str {
        match self {
            Failure::Refused => "connection refused: nothing listened",
            Failure::ConnectTimeout => "connect timed out",
            Failure::ConnectError => "connect failed otherwise",
            Failure::ResetNew => "reset before any response byte, on a new connection",
            Failure::ResetReused => "reset before any response byte, on a reused keep-alive connection",
            Failure::Eof => "closed after the request, before any response byte",
            Failure::Truncated => "response cut off after it had started",
            Failure::Timeout => "no complete response within the timeout",
            Failure::Malformed => "not an HTTP/1 response",
            Failure::Http5xx => "HTTP 5xx from the server",
            Failure::Tls => "the TLS handshake failed (certificate, protocol)",
        }
    }

    pub fn from_name(name: &str) -> Option<Failure> {
        Failure::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// How a connect attempt failed.
pub fn connect_failure(kind: ErrorKind) -> Failure {
    match kind {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::TimedOut => Failure::ConnectTimeout,
        // A reset that arrives before the connect has completed.
        ErrorKind::ConnectionReset => Failure::ResetNew,
        _ => Failure::ConnectError,
    }
}

/// What the client saw when a request on an open connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The I/O error underneath, if there was one.
    pub io: Option<ErrorKind>,
    /// The parser found bytes that are not HTTP.
    pub parse_error: bool,
    /// Any byte of the response had arrived.
    pub response_started: bool,
    /// The connection had carried an earlier request.
    pub reused: bool,
}

/// Names the failure of a request whose connection was open.
pub fn request_failure(seen: Seen) -> Failure {
    if seen.parse_error {
        return Failure::Malformed;
    }
    if seen.response_started {
        return Failure::Truncated;
    }
    match seen.io {
        Some(ErrorKind::TimedOut) => Failure::Timeout,
        Some(ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe) => {
            if seen.reused {
                Failure::ResetReused
            } else {
                Failure::ResetNew
            }
        }
        // No I/O error: hyper saw the connection end (EOF) before a response.
        _ => Failure::Eof,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(io: Option<ErrorKind>, parse_error: bool, response_started: bool, reused: bool) -> Seen {
        Seen {
            io,
            parse_error,
            response_started,
            reused,
        }
    }

    #[test]
    fn request_failures_are_named_by_what_the_client_saw() {
        use ErrorKind::*;
        let table = [
            (
                seen(Some(ConnectionReset), false, false, false),
                Failure::ResetNew,
            ),
            (
                seen(Some(ConnectionReset), false, false, true),
                Failure::ResetReused,
            ),
            // Writing the request into a connection the server already reset.
            (seen(Some(BrokenPipe), false, false, true), Failure::ResetReused),
            (seen(None, false, false, false), Failure::Eof),
            (seen(None, false, false, true), Failure::Eof),
            (
                seen(Some(ConnectionReset), false, true, false),
                Failure::Truncated,
            ),
            (seen(None, false, true, true), Failure::Truncated),
            (seen(None, true, true, false), Failure::Malformed),
            (seen(Some(TimedOut), false, false, false), Failure::Timeout),
        ];
        for (seen, expected) in table {
            assert_eq!(request_failure(seen), expected, "{seen:?}");
        }
    }

    #[test]
    fn connect_failures_are_named_by_the_error() {
        assert_eq!(connect_failure(ErrorKind::ConnectionRefused), Failure::Refused);
        assert_eq!(connect_failure(ErrorKind::TimedOut), Failure::ConnectTimeout);
        assert_eq!(
            connect_failure(ErrorKind::AddrNotAvailable),
            Failure::ConnectError
        );
    }

    #[test]
    fn names_are_unique_and_read_back() {
        for failure in Failure::ALL {
            assert_eq!(Failure::from_name(failure.name()), Some(failure));
        }
        let mut names: Vec<_> = Failure::ALL.iter().map(|f| f.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Failure::ALL.len());
    }
}
