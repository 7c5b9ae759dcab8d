//! HTTP/2 clients: batches of GETs multiplexed on one connection (curl over TLS, hyper over
//! h2c), and a raw h2c GET that records every frame nginx sends, to see what it does on SIGQUIT.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::curl::{Curl, Transfer};
use crate::tcp::{End, end_of};

// ---------------------------------------------------------------------------------------------
// Frames, read raw.

/// Frame types (RFC 9113, section 6), then the flags read or sent here.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// One frame as nginx sent it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// When it arrived.
    pub at: Instant,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub len: usize,
    /// Kept for control frames only; DATA is counted, not kept.
    pub payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut bytes = len.to_be_bytes()[1..].to_vec();
    bytes.extend([kind, flags]);
    bytes.extend(stream.to_be_bytes());
    bytes.extend(payload);
    bytes
}

/// One GET on stream 1 of a new h2c connection (prior knowledge), with windows so large that
/// flow control never holds nginx back; every frame nginx sends is recorded with its arrival
/// time, until the connection ends.
pub fn raw_get(addr: SocketAddr, path: &str) -> JoinHandle<(Vec<Frame>, End)> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE (0x4) at its maximum, and the connection window with it.
        out.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        out.extend(frame(
            WINDOW_UPDATE,
            0,
            0,
            &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
        ));
        // HPACK: :method GET and :scheme http from the static table; :path and :authority as
        // literals with an indexed name, without Huffman coding.
        let mut block = vec![0x82, 0x86];
        for (index, value) in [(4u8, path.as_str()), (1, &addr.to_string())] {
            block.extend([index, value.len() as u8]);
            block.extend(value.as_bytes());
        }
        out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block));
        conn.write_all(&out).unwrap();

        let mut frames = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let end = loop {
            if Instant::now() > deadline {
                break End::Other("still open after 30 s".into());
            }
            let mut head = [0u8; 9];
            if let Err(err) = conn.read_exact(&mut head) {
                break end_of(&err);
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if let Err(err) = conn.read_exact(&mut payload) {
                break end_of(&err);
            }
            let (kind, flags) = (head[3], head[4]);
            if kind == SETTINGS && flags & ACK == 0 {
                conn.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
            }
            if kind == DATA {
                payload = Vec::new();
            }
            frames.push(Frame {
                at: Instant::now(),
                kind,
                flags,
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                len,
                payload,
            });
        };
        (frames, end)
    })
}

// ---------------------------------------------------------------------------------------------
// Clients that multiplex a batch of GETs on one connection.

/// What an HTTP/2 client saw for one request.
#[derive(Debug)]
pub struct Reply {
    /// curl's exit code and message (16 and 92 are HTTP/2 framing and stream errors), or
    /// hyper's error.
    pub error: Option<String>,
    pub version: String,
    pub status: u16,
    pub size: usize,
    /// A `Connection` field in the response: forbidden in HTTP/2.
    pub connection_field: bool,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status == 200 && self.version == "2"
    }
}

impl From<&Transfer> for Reply {
    fn from(t: &Transfer) -> Self {
        Self {
            error: (t.exit_code != 0).then(|| format!("curl exit {}: {}", t.exit_code, t.error)),
            version: t.version.clone(),
            status: t.status,
            size: t.size,
            connection_field: t.has_connection_field(),
        }
    }
}

/// An HTTP/2 client that sends its GETs together, multiplexed on one connection.
pub enum Client<'a> {
    /// curl --parallel, over TLS (ALPN h2).
    Curl { options: &'a [&'a str], base: String },
    /// hyper's HTTP/2 client, h2c with prior knowledge: curl 7.88 fails every request after
    /// the first on a prior-knowledge connection (framing error 16), with or without a drain.
    Hyper(SocketAddr),
}

/// GETs that [`Client::start`] sent and that have not all been answered yet.
pub enum Pending {
    Curl(Curl),
    Hyper(JoinHandle<(Vec<Reply>, u32)>),
}

impl Client<'_> {
    /// Starts `n` GETs of `path` at once, on one connection.
    pub fn start(&self, path: &str, n: usize) -> Pending {
        match self {
            Self::Curl { options, base } => {
                let options: Vec<&str> = options.iter().copied().chain(["--parallel"]).collect();
                Pending::Curl(Curl::start(&options, &vec![format!("{base}{path}"); n]))
            }
            Self::Hyper(addr) => Pending::Hyper(hyper_batch(*addr, path.to_owned(), n)),
        }
    }

    /// `n` GETs of `path` at once, on one connection; every reply and the connections opened.
    pub fn batch(&self, path: &str, n: usize) -> (Vec<Reply>, u32) {
        let (replies, connections, _) = self.start(path, n).finish();
        (replies, connections)
    }
}

impl Pending {
    /// Every reply, the connections opened for them, and when the last one was seen to end.
    pub fn finish(self) -> (Vec<Reply>, u32, Instant) {
        match self {
            Self::Curl(curl) => {
                let (transfers, done) = curl.finish();
                let connections = transfers.iter().map(|t| t.connects).sum();
                (transfers.iter().map(Reply::from).collect(), connections, done)
            }
            Self::Hyper(thread) => {
                let (replies, connections) = thread.join().unwrap();
                (replies, connections, Instant::now())
            }
        }
    }
}

fn hyper_batch(addr: SocketAddr, path: String, n: usize) -> JoinHandle<(Vec<Reply>, u32)> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let failed = |error: String| Reply {
        error: Some(error),
        version: "0".into(),
        status: 0,
        size: 0,
        connection_field: false,
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let connected = async {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))
            };
            let (sender, conn) = match connected.await {
                Ok(pair) => pair,
                Err(error) => return ((0..n).map(|_| failed(error.clone())).collect(), 0),
            };
            tokio::spawn(conn);
            let requests: Vec<_> = (0..n)
                .map(|_| {
                    let mut sender = sender.clone();
                    let request = hyper::Request::get(format!("http://{addr}{path}"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    tokio::spawn(async move {
                        let response = sender
                            .send_request(request)
                            .await
                            .map_err(|e| format!("request: {e:?}"))?;
                        // In curl's spelling, as `%{http_version}` writes it.
                        let version = match response.version() {
                            hyper::Version::HTTP_2 => "2".to_owned(),
                            other => format!("{other:?}"),
                        };
                        let status = response.status().as_u16();
                        let connection_field = response.headers().contains_key(hyper::header::CONNECTION);
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e:?}"))?;
                        Ok::<_, String>(Reply {
                            error: None,
                            version,
                            status,
                            size: body.to_bytes().len(),
                            connection_field,
                        })
                    })
                })
                .collect();
            let mut replies = Vec::new();
            for request in requests {
                let reply = tokio::time::timeout(Duration::from_secs(20), request).await;
                replies.push(match reply {
                    Ok(Ok(Ok(reply))) => reply,
                    Ok(Ok(Err(error))) => failed(error),
                    Ok(Err(panic)) => failed(panic.to_string()),
                    Err(_) => failed("no reply within 20 s".into()),
                });
            }
            (replies, 1)
        })
    })
}

/// One GET over h2c (prior knowledge); returns the status and whether any `Connection` field
/// came back (forbidden in HTTP/2).
pub fn get_h2c(addr: SocketAddr, path: &str) -> Result<(StatusCode, bool), String> {
    let (mut replies, _) = hyper_batch(addr, path.to_owned(), 1).join().unwrap();
    let reply = replies.remove(0);
    match reply.error {
        Some(error) => Err(error),
        None => Ok((
            StatusCode::from_u16(reply.status).unwrap(),
            reply.connection_field,
        )),
    }
}
