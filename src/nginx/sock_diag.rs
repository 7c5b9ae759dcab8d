//! The kernel's TCP socket table through netlink sock_diag (what `ss` reads): the sockets in
//! the states asked for, on the local ports asked for, with their local address and inode.
//!
//! /proc/net/tcp prints every socket as text, TIME_WAIT ones included; here the kernel filters
//! by state and runs a small port filter (the `ss sport = :80` bytecode) before it copies
//! anything out, so a count of 10 000 connections costs a few milliseconds. The messages are
//! a few fixed C structs (linux/inet_diag.h), read by hand.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// TCP states as the kernel numbers them, as bits of a state filter.
pub mod states {
    pub const ESTABLISHED: u32 = 1 << 1;
    pub const LISTEN: u32 = 1 << 10;
    /// Every state a connection passes through (TIME_WAIT too), but listening and the
    /// half-open request sockets.
    pub const CONNECTIONS: u32 = (1 << 1)
        | (1 << 2)
        | (1 << 3)
        | (1 << 4)
        | (1 << 5)
        | (1 << 6)
        | (1 << 7)
        | (1 << 8)
        | (1 << 9)
        | (1 << 11);
}

/// One TCP socket of this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    /// The peer's address; unspecified for a listener.
    pub remote: SocketAddr,
    /// 0 for a socket in TIME_WAIT, which no file holds any more.
    pub inode: u64,
    /// The kernel's id of the connection: kept into TIME_WAIT and never given to another, so it
    /// tells a new connection from an old one on the same client port.
    pub cookie: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn raw(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_HEADER_LEN: usize = 16;
/// struct inet_diag_req_v2 and struct inet_diag_msg.
const REQUEST_LEN: usize = 56;
const RESPONSE_LEN: usize = 72;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;

/// The sockets of `family` in `states` (a mask of [`states`] bits) whose local port is one of
/// `ports` (any port when empty), in the caller's network namespace.
pub fn tcp_sockets(family: Family, states: u32, ports: &[u16]) -> io::Result<Vec<TcpSocket>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &request(family, states, ports),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut sockets = Vec::new();
    // The kernel fills each read with as many whole messages as fit.
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let size = recv(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &mut buffer,
            MsgFlags::empty(),
        )?;
        let mut messages = &buffer[..size];
        while messages.len() >= NLMSG_HEADER_LEN {
            let length = u32::from_ne_bytes(messages[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(messages[4..6].try_into().expect("2 bytes"));
            let flags = u16::from_ne_bytes(messages[6..8].try_into().expect("2 bytes"));
            if flags & NLM_F_DUMP_INTR != 0 {
                // The table changed under the dump: a count from it could be off.
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the socket dump was interrupted",
                ));
            }
            if length < NLMSG_HEADER_LEN || length > messages.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let body = &messages[NLMSG_HEADER_LEN..length];
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(body.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => sockets.extend(parse(body)),
                _ => {}
            }
            messages = &messages[align(length).min(messages.len())..];
        }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// nlmsghdr + inet_diag_req_v2 + (when filtering ports) the bytecode attribute.
fn request(family: Family, states: u32, ports: &[u16]) -> Vec<u8> {
    let bytecode = port_filter(ports);
    let attribute_len = if bytecode.is_empty() {
        0
    } else {
        4 + bytecode.len()
    };
    let total = NLMSG_HEADER_LEN + REQUEST_LEN + attribute_len;
    let mut out = Vec::with_capacity(total);
    out.extend((total as u32).to_ne_bytes());
    out.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    out.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    out.extend([0u8; 8]); // sequence number, port id: the kernel's own
    out.push(family.raw());
    out.push(libc::IPPROTO_TCP as u8);
    out.push(0); // no extensions
    out.push(0); // padding
    out.extend(states.to_ne_bytes());
    out.extend([0u8; 48]); // inet_diag_sockid: unused in a dump
    if !bytecode.is_empty() {
        out.extend((attribute_len as u16).to_ne_bytes());
        out.extend(INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        out.extend(bytecode);
    }
    out
}

/// "local port is one of `ports`" as inet_diag bytecode, the way `ss` writes `sport = :80 or
/// sport = :443`. Ops are {code, yes, no} jumps, a port test followed by an op whose `no` holds
/// the port; a run that ends exactly at the end accepts, one that jumps past it rejects. The
/// kernel checks that every op is reached through the `yes` jumps, so ports are chained: a
/// match falls through to a JMP to the end, a miss skips that JMP to the next port test, and a
/// miss on the last one jumps past the end.
fn port_filter(ports: &[u16]) -> Vec<u8> {
    const TEST: usize = 8;
    const JMP: usize = 4;
    const INET_DIAG_BC_JMP: u8 = 1;
    let mut code = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let last = i + 1 == ports.len();
        let no = if last { TEST + 4 } else { TEST + JMP };
        code.extend([INET_DIAG_BC_S_EQ, TEST as u8]);
        code.extend((no as u16).to_ne_bytes());
        code.extend([0, 0]);
        code.extend(port.to_ne_bytes());
        if !last {
            let rest = (ports.len() - i - 2) * (TEST + JMP) + TEST;
            code.extend([INET_DIAG_BC_JMP, JMP as u8]);
            code.extend(((rest + JMP) as u16).to_ne_bytes());
        }
    }
    code
}

/// struct inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid (ports in network
/// order, source then destination, addresses as four 32-bit words, interface, cookie), then
/// expires, queues, uid, inode.
fn parse(body: &[u8]) -> Option<TcpSocket> {
    if body.len() < RESPONSE_LEN {
        return None;
    }
    let v4 = body[0] == libc::AF_INET as u8;
    let address = |at: usize| -> Option<IpAddr> {
        Some(match v4 {
            true => IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3])),
            false => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&body[at..at + 16]).ok()?)),
        })
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let word = |at: usize| -> Option<u32> { Some(u32::from_ne_bytes(body[at..at + 4].try_into().ok()?)) };
    Some(TcpSocket {
        local: SocketAddr::new(address(8)?, port(4)),
        remote: SocketAddr::new(address(24)?, port(6)),
        inode: u64::from(word(68)?),
        // idiag_cookie[2], the low half first.
        cookie: u64::from(word(44)?) | (u64::from(word(48)?) << 32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn sees_listeners_and_established_sockets_apart() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();

        let listening = tcp_sockets(Family::V4, states::LISTEN, &[]).unwrap();
        assert!(listening.iter().any(|s| s.local == addr));
        let established = tcp_sockets(Family::V4, states::ESTABLISHED, &[]).unwrap();
        // The server's end has the listener's address; the client's end its own port.
        assert!(established.iter().any(|s| s.local == addr && s.remote == local));
        assert!(established.iter().any(|s| s.local == local && s.remote == addr));
        drop((client, server));
    }

    #[test]
    fn a_connection_keeps_its_cookie_into_time_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let on = || tcp_sockets(Family::V4, states::CONNECTIONS, &[addr.port()]).unwrap();
        let open = on();
        assert_eq!(open.len(), 1, "{open:?}");
        // The server closes first: its end waits in TIME_WAIT, with no inode.
        drop(server);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &client, &mut buf).unwrap(), 0);
        drop(client);
        let closed = on();
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert_eq!(closed[0].inode, 0);
        assert_ne!(open[0].cookie, 0);
        assert_eq!(closed[0].cookie, open[0].cookie);
    }

    #[test]
    fn the_kernel_filters_by_local_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let to_other = TcpStream::connect(other.local_addr().unwrap()).unwrap();

        let on = |ports: &[u16]| tcp_sockets(Family::V4, states::ESTABLISHED, ports).unwrap();
        let found = on(&[addr.port()]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|s| s.local == addr));
        // Several ports: any of them.
        assert_eq!(on(&[1, other.local_addr().unwrap().port(), addr.port()]).len(), 4);
        assert_eq!(on(&[1]).len(), 0);
        drop((clients, to_other));
    }

    #[test]
    fn ipv6_sockets_have_ipv6_addresses() {
        let listener = TcpListener::bind("[::1]:0").expect(
            "cannot bind [::1]: this test needs IPv6 on loopback (sysctl net.ipv6.conf.lo.disable_ipv6=0)",
        );
        let addr = listener.local_addr().unwrap();
        let found = tcp_sockets(Family::V6, states::LISTEN, &[addr.port()]).unwrap();
        assert_eq!(found.iter().map(|s| s.local).collect::<Vec<_>>(), [addr]);
    }

    #[test]
    fn the_port_filter_is_the_bytecode_ss_would_send() {
        // One port: S_EQ, accept by jumping 8 (the end), reject by jumping 12 (past it).
        let mut expected = vec![INET_DIAG_BC_S_EQ, 8];
        expected.extend(12u16.to_ne_bytes());
        expected.extend([0, 0]);
        expected.extend(8080u16.to_ne_bytes());
        assert_eq!(port_filter(&[8080]), expected);
        assert!(port_filter(&[]).is_empty());
        // Two: test 80 (match: on to the JMP; miss: skip it), JMP over the rest, test 443.
        let two = port_filter(&[80, 443]);
        let op = |at: usize| {
            (
                two[at],
                two[at + 1],
                u16::from_ne_bytes([two[at + 2], two[at + 3]]),
            )
        };
        assert_eq!(two.len(), 20);
        assert_eq!(op(0), (INET_DIAG_BC_S_EQ, 8, 12));
        assert_eq!(op(8), (1, 4, 12));
        assert_eq!(op(12), (INET_DIAG_BC_S_EQ, 8, 12));
    }
}
