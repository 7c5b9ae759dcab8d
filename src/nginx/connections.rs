//! Established TCP connections held by nginx, from the kernel's socket table (netlink
//! sock_diag) and the processes' file descriptors.
//!
//! Two counts, for two costs. `to_listeners` is the cheap one (one kernel dump, no /proc walk):
//! every established socket on one of nginx's listening addresses, which is every connection a
//! client opened to nginx, whichever worker holds it. `by_process` walks each process's file
//! descriptors as well, to say which worker holds what; it is for progress reports and `status`.
//! Both see the caller's network namespace, which is nginx's in a pod.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use procfs::process::{FDTarget, Process};

use super::sock_diag::{self, Family, states};

/// The addresses nginx listens on, read from the master's sockets before it closes them
/// (SIGQUIT makes the master close its listeners at once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners(Vec<SocketAddr>);

impl Listeners {
    /// The listening sockets among `masters`' file descriptors.
    pub fn of(masters: &[i32]) -> Self {
        let inodes: HashSet<u64> = masters
            .iter()
            .filter_map(|&pid| socket_inodes(pid))
            .flatten()
            .collect();
        if inodes.is_empty() {
            return Self::default();
        }
        let mut addrs: Vec<SocketAddr> = [Family::V4, Family::V6]
            .into_iter()
            .flat_map(|family| sock_diag::tcp_sockets(family, states::LISTEN, &[]).unwrap_or_default())
            .filter(|socket| inodes.contains(&socket.inode))
            .map(|socket| socket.local)
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        Self(addrs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These listeners but those on `ports`.
    pub fn without_ports(mut self, ports: &[u16]) -> Self {
        self.0.retain(|l| !ports.contains(&l.port()));
        self
    }

    /// Whether a connection with this local address was accepted on one of these listeners.
    fn accepted(&self, local: &SocketAddr) -> bool {
        self.0.iter().any(|listener| {
            listener.port() == local.port()
                && (listener.ip().is_unspecified()
                    || listener.ip() == local.ip()
                    || mapped(local) == Some(listener.ip()))
        })
    }
}

/// An IPv4 client on a dual-stack IPv6 listener shows as ::ffff:a.b.c.d.
fn mapped(addr: &SocketAddr) -> Option<std::net::IpAddr> {
    match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4),
        std::net::IpAddr::V4(_) => None,
    }
}

/// Established connections to `listeners`: accepted or waiting to be. `None` when the kernel's
/// table cannot be read, or no listener was found (the master's fds were not readable).
pub fn to_listeners(listeners: &Listeners) -> Option<usize> {
    if listeners.is_empty() {
        return None;
    }
    let mut ports: Vec<u16> = listeners.0.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    // Only the families nginx listens on: each dump walks the kernel's whole table. An IPv4
    // client of a dual-stack IPv6 listener is an IPv6 socket.
    let mut count = 0;
    for family in [Family::V4, Family::V6] {
        if listeners.0.iter().any(|l| l.is_ipv4() == (family == Family::V4)) {
            let sockets = sock_diag::tcp_sockets(family, states::ESTABLISHED, &ports).ok()?;
            count += sockets.iter().filter(|s| listeners.accepted(&s.local)).count();
        }
    }
    Some(count)
}

/// Every connection to `listeners`, in any state but listening (TIME_WAIT too: a connection
/// nginx closed first stays there for a minute), by the kernel's cookie: a client port reused
/// for a new connection while the old one is in TIME_WAIT is a new cookie. `None` when the
/// kernel's table cannot be read or no listener is known.
pub fn connections_to(listeners: &Listeners) -> Option<HashSet<u64>> {
    if listeners.is_empty() {
        return None;
    }
    let mut ports: Vec<u16> = listeners.0.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut peers = HashSet::new();
    for family in [Family::V4, Family::V6] {
        if listeners.0.iter().any(|l| l.is_ipv4() == (family == Family::V4)) {
            let sockets = sock_diag::tcp_sockets(family, states::CONNECTIONS, &ports).ok()?;
            peers.extend(
                sockets
                    .iter()
                    .filter(|s| listeners.accepted(&s.local))
                    .map(|s| s.cookie),
            );
        }
    }
    Some(peers)
}

/// Established TCP connections (IPv4 and IPv6) held by each of `pids`: their sockets, less
/// listeners and sockets in other states. A process that is gone or unreadable is left out.
pub fn by_process(pids: &[i32]) -> Vec<(i32, usize)> {
    let sockets: HashMap<i32, HashSet<u64>> = pids
        .iter()
        .filter_map(|&pid| Some((pid, socket_inodes(pid)?)))
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let mut established = HashSet::new();
    for family in [Family::V4, Family::V6] {
        match sock_diag::tcp_sockets(family, states::ESTABLISHED, &[]) {
            Ok(sockets) => established.extend(sockets.into_iter().map(|s| s.inode)),
            Err(_) => return Vec::new(),
        }
    }
    let mut counts: Vec<(i32, usize)> = sockets
        .iter()
        .map(|(&pid, inodes)| (pid, inodes.intersection(&established).count()))
        .collect();
    counts.sort_unstable();
    counts
}

fn socket_inodes(pid: i32) -> Option<HashSet<u64>> {
    let fds = Process::new(pid).ok()?.fd().ok()?;
    Some(
        fds.filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counts_a_process_connections_but_not_its_listener() {
        use std::os::fd::OwnedFd;
        use std::process::{Command, Stdio};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // A process holding exactly one listener and one established socket, and nothing else
        // this test binary's other threads might open meanwhile.
        let mut holder = Command::new("sleep")
            .arg("10")
            .stdin(Stdio::from(OwnedFd::from(server)))
            .stdout(Stdio::from(OwnedFd::from(listener)))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = holder.id() as i32;
        // A pid that does not exist is left out.
        let counts = by_process(&[pid, i32::MAX]);
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(counts, [(pid, 1)]);
        drop(client);
    }

    #[test]
    fn counts_connections_to_a_listener_not_from_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listeners = Listeners(vec![addr]);
        assert_eq!(to_listeners(&listeners), Some(0));
        assert_eq!(to_listeners(&Listeners::default()), None, "not counted is not 0");
        let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Not accepted yet: still connections nginx must serve.
        assert_eq!(to_listeners(&listeners), Some(3));
        let accepted = listener.accept().unwrap();
        assert_eq!(to_listeners(&listeners), Some(3));
        drop((clients, accepted));
    }

    #[test]
    fn a_wildcard_listener_owns_every_address_on_its_port() {
        let listeners = Listeners(vec![
            "0.0.0.0:8080".parse().unwrap(),
            "[::]:8443".parse().unwrap(),
        ]);
        for (local, accepted) in [
            ("10.0.0.7:8080", true),
            ("10.0.0.7:8081", false),
            ("[fd00::7]:8443", true),
            ("[::ffff:10.0.0.7]:8443", true),
        ] {
            assert_eq!(listeners.accepted(&local.parse().unwrap()), accepted, "{local}");
        }
        let one = Listeners(vec!["127.0.0.11:80".parse().unwrap()]);
        assert!(one.accepted(&"127.0.0.11:80".parse().unwrap()));
        assert!(!one.accepted(&"127.0.0.12:80".parse().unwrap()));
        assert!(one.accepted(&"[::ffff:127.0.0.11]:80".parse().unwrap()));
    }

    #[test]
    fn finds_the_listeners_among_a_process_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let found = Listeners::of(&[std::process::id() as i32]);
        assert!(found.0.contains(&listener.local_addr().unwrap()), "{found:?}");
    }

    #[test]
    fn the_connections_to_a_listener_include_those_it_closed_first() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listeners(vec![listener.local_addr().unwrap()]);
        let before = connections_to(&listeners).unwrap();
        let _open = TcpStream::connect(listeners.0[0]).unwrap();
        let closed = TcpStream::connect(listeners.0[0]).unwrap();
        let (_kept, _) = listener.accept().unwrap();
        // The server closes first, as nginx does after a `Connection: close` request: its end
        // waits in TIME_WAIT, with no inode.
        drop(listener.accept().unwrap());
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &closed, &mut buf).unwrap(), 0);
        drop(closed);
        let after = connections_to(&listeners).unwrap();
        let new: Vec<_> = after.difference(&before).collect();
        assert_eq!(new.len(), 2, "{after:?}");
        assert_eq!(connections_to(&Listeners::default()), None);
    }

    #[test]
    fn a_client_port_reused_while_in_time_wait_is_a_new_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listeners(vec![listener.local_addr().unwrap()]);
        let first = connect_from(0, listeners.0[0]);
        let port = first.local_addr().unwrap().port();
        drop(listener.accept().unwrap());
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &first, &mut buf).unwrap(), 0);
        drop(first);
        let before = connections_to(&listeners).unwrap();
        assert_eq!(before.len(), 1, "the server's end in TIME_WAIT");
        // The same client port again: the kernel takes the SYN over the TIME_WAIT entry.
        let again = connect_from(port, listeners.0[0]);
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer.port(), port);
        let after = connections_to(&listeners).unwrap();
        assert_eq!(after.difference(&before).count(), 1, "{before:?} {after:?}");
        drop(again);
    }

    /// A connection from 127.0.0.1:`port` (any port for 0).
    fn connect_from(port: u16, to: SocketAddr) -> TcpStream {
        use rustix::net::{AddressFamily, SocketType, bind, connect, socket, sockopt};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        sockopt::set_socket_reuseaddr(&fd, true).unwrap();
        bind(&fd, &SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        connect(&fd, &to).unwrap();
        TcpStream::from(fd)
    }
}
