//! Long-lived TCP connections, read and written raw: an echo backend of our own, round trips,
//! and how a connection ended (FIN or reset, and when).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::websocket;

/// How a connection ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// An orderly close (FIN): read returned 0.
    Eof,
    /// RST: read failed with ECONNRESET.
    Reset,
    Other(String),
}

/// The end a failed read or write means.
pub fn end_of(err: &std::io::Error) -> End {
    match err.kind() {
        ErrorKind::UnexpectedEof => End::Eof,
        ErrorKind::ConnectionReset => End::Reset,
        _ => End::Other(err.to_string()),
    }
}

/// An echo server on loopback; with `websocket`, it first answers the upgrade with 101. Records
/// how each connection ended, as it saw it. Stops accepting on drop.
pub struct Echo {
    pub port: u16,
    ends: Arc<Mutex<Vec<End>>>,
    stop: Arc<AtomicBool>,
    accepting: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(websocket: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let ends = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ends2, stop2) = (ends.clone(), stop.clone());
        let accepting = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let ends = ends2.clone();
                        std::thread::spawn(move || {
                            let end = echo(conn, websocket);
                            ends.lock().unwrap().push(end);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            ends,
            stop,
            accepting: Some(accepting),
        }
    }

    /// How each connection that has ended did, in the order they ended.
    pub fn ends(&self) -> Vec<End> {
        self.ends.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

fn echo(mut conn: TcpStream, websocket: bool) -> End {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    if websocket {
        if let Err(err) = websocket::accept(&mut conn) {
            return end_of(&err);
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                if let Err(err) = conn.write_all(&buf[..n]) {
                    return end_of(&err);
                }
            }
            Err(err) => return end_of(&err),
        }
    }
}

/// Reads an HTTP head, up to its blank line, byte by byte so nothing after it is consumed.
pub fn read_head(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
        conn.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Sends `payload` and reads the same bytes back.
pub fn round_trip(conn: &mut TcpStream, payload: &[u8]) {
    conn.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).expect("the echo comes back");
    assert_eq!(back, payload);
}

/// Reads until the connection ends; returns how, when, and any bytes that came first.
pub fn read_until_end(conn: &mut TcpStream, limit: Duration) -> (End, Instant, Vec<u8>) {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return (End::Eof, Instant::now(), got),
            Ok(n) => got.extend(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::ConnectionReset => {
                return (End::Reset, Instant::now(), got);
            }
            Err(err) => return (End::Other(err.to_string()), Instant::now(), got),
        }
    }
}
