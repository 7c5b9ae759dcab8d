//! The Service between clients and pods, as kube-proxy makes it: each new connection goes to
//! one of the current endpoints, an established connection keeps its backend until one side
//! closes it, an endpoint's removal takes effect only after the propagation lag, and a
//! connection whose backend refuses or resets is reset to the client, never retried elsewhere.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Service {
    addr: SocketAddr,
    endpoints: Arc<Endpoints>,
    accepting: JoinHandle<()>,
}

#[derive(Default)]
struct Endpoints {
    current: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    /// Every connection accepted, in order, with the endpoint it was sent to.
    routed: Mutex<Vec<Routed>>,
}

/// One new connection through the Service: which client port, when, and to which pod (`None`:
/// no endpoint was left, and the client was reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub at: Instant,
    pub client_port: u16,
    pub backend: Option<SocketAddr>,
}

impl Endpoints {
    /// Round robin over the endpoints of this moment, as IPVS does.
    fn pick(&self) -> Option<SocketAddr> {
        let current = self.current.lock().expect("not poisoned");
        if current.is_empty() {
            return None;
        }
        Some(current[self.next.fetch_add(1, Ordering::Relaxed) % current.len()])
    }
}

impl Service {
    pub async fn start(addr: SocketAddr, endpoints: Vec<SocketAddr>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let endpoints = Arc::new(Endpoints {
            current: Mutex::new(endpoints),
            ..Endpoints::default()
        });
        let table = endpoints.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                let backend = table.pick();
                table.routed.lock().expect("not poisoned").push(Routed {
                    at: Instant::now(),
                    client_port: peer.port(),
                    backend,
                });
                tokio::spawn(forward(client, backend));
            }
        });
        Ok(Self {
            addr,
            endpoints,
            accepting,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Puts `endpoint` into rotation after `lag`, the time the addition needs to reach every node.
    pub fn add_after(&self, endpoint: SocketAddr, lag: Duration) -> JoinHandle<()> {
        let endpoints = self.endpoints.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lag).await;
            endpoints.current.lock().expect("not poisoned").push(endpoint);
        })
    }

    /// Every connection routed so far, handed over (the log starts afresh).
    pub fn routed(&self) -> Vec<Routed> {
        std::mem::take(&mut *self.endpoints.routed.lock().expect("not poisoned"))
    }

    /// Takes `endpoint` out of rotation after `lag`, the time the removal needs to reach every
    /// node; connections already made keep going.
    pub fn remove_after(&self, endpoint: SocketAddr, lag: Duration) -> JoinHandle<()> {
        let endpoints = self.endpoints.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lag).await;
            endpoints
                .current
                .lock()
                .expect("not poisoned")
                .retain(|e| *e != endpoint);
        })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Carries one client connection to `backend`; what one side does (close, reset) the other
/// sees, as through NAT.
pub(super) async fn forward(client: TcpStream, backend: Option<SocketAddr>) {
    let _ = client.set_nodelay(true);
    let Some(backend) = backend else {
        return reset(&client);
    };
    let server = match TcpStream::connect(backend).await {
        Ok(server) => server,
        // Refused: through NAT the client's SYN would have met the RST itself.
        Err(_) => return reset(&client),
    };
    let _ = server.set_nodelay(true);
    let mut client = client;
    let mut server = server;
    let failed = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let up = pipe(&mut client_read, &mut server_write);
        let down = pipe(&mut server_read, &mut client_write);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                copied = &mut up, if !up_done => match copied {
                    Ok(()) => up_done = true,
                    Err(()) => break true,
                },
                copied = &mut down, if !down_done => match copied {
                    Ok(()) => down_done = true,
                    Err(()) => break true,
                },
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    // A reset on either side resets both, at once: the other direction may be idle for long.
    if failed {
        reset(&client);
        reset(&server);
    }
}

/// Copies one direction until EOF, which it passes on as a FIN.
async fn pipe(from: &mut ReadHalf<'_>, to: &mut WriteHalf<'_>) -> Result<(), ()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.map_err(drop)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(drop)?;
    }
}

/// Closes with RST when the socket is dropped.
fn reset(stream: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(stream, Some(Duration::ZERO));
}
