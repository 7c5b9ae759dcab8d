//! Just enough WebSocket to hold one open through a proxy: the client's upgrade with the
//! RFC 6455 sample key, the server's 101, and a masked text frame.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::tcp::read_head;

/// Upgrades a new connection to `addr` on `/ws`; asserts a 101 with `Upgrade: websocket` and
/// returns the connection and the response head, lower-cased.
pub fn connect(addr: SocketAddr) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut conn)
        .expect("the upgrade answer")
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    (conn, head)
}

/// The server's side: reads the upgrade request and answers it with 101.
pub fn accept(conn: &mut TcpStream) -> std::io::Result<()> {
    read_head(conn)?;
    // The accept value for the RFC 6455 sample key, which the client sends.
    let reply = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    conn.write_all(reply.as_bytes())
}

/// A masked WebSocket text frame, as a client sends it.
pub fn text_frame(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}
