//! New connections to nginx's listeners, seen as they arrive: the evidence that the endpoint
//! removal has reached every client, for the adaptive propagation delay ([`crate::core::quiet`]).
//!
//! The master's listening sockets are duplicated into this process (pidfd_getfd, Linux 5.6):
//! the same sockets, not new ones, so nothing changes for nginx, which still accepts every
//! connection. Each new connection in a socket's accept queue wakes its waiters, this process
//! among them (nothing is read or accepted here). After a wake a copy leaves the runtime's epoll
//! for [`REST`], then comes back: however heavy the traffic, a listener wakes the supervisor 20
//! times a second at most, and an idle nginx never wakes it. epoll looks at a socket again
//! before it reports it, so an arrival that a worker accepted first (or during the rest) is not
//! seen; the drain's look at the socket table covers for those still open (see `drain`).
//!
//! The copies keep the sockets open, and a listening socket that nginx closes but this process
//! still holds would take connections that nobody accepts. So the watch lives only while the
//! master holds its listeners too: it is stopped, and its copies closed, before the SIGQUIT
//! that makes the master close them.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use procfs::process::{FDTarget, Process};
use rustix::process::{PidfdGetfdFlags, pidfd_getfd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::pidfd::PidFd;
use super::sock_diag::{self, Family, states};
use crate::core::quiet::{self, Arrivals, Unseen};

/// How long a listener's watch rests after a wake; the drain reads the socket table again
/// then, for the connections that came meanwhile.
pub const REST: Duration = quiet::LOOK_AFTER;

/// The watch on every listening socket of the masters, and what it has seen. It can be paused
/// (its copies closed) and resumed, keeping what it saw.
#[derive(Debug)]
pub struct ArrivalWatch {
    origin: Instant,
    /// Ports whose arrivals are probes, not traffic.
    ignored: Vec<u16>,
    arrivals: Arc<Mutex<Arrivals>>,
    arrived: Arc<Notify>,
    /// One task per copy of a listener; none while paused.
    tasks: Vec<JoinHandle<()>>,
}

impl ArrivalWatch {
    /// A watch that has seen nothing and watches nothing yet; `ignored` are ports whose
    /// arrivals are probes, not traffic.
    pub fn paused(ignored: &[u16]) -> Self {
        Self {
            origin: Instant::now(),
            ignored: ignored.to_vec(),
            arrivals: Arc::default(),
            arrived: Arc::default(),
            tasks: Vec::new(),
        }
    }

    /// Starts watching the listening sockets of `masters`.
    pub fn start(masters: &[&PidFd], ignored: &[u16]) -> Result<Self, String> {
        let mut watch = Self::paused(ignored);
        watch.resume(masters)?;
        Ok(watch)
    }

    /// Watches the listening sockets of `masters` (again). Fails with the reason when there
    /// are none to watch or they cannot be copied (no ptrace access to the master: another
    /// user, or a Yama policy for a process that is not our descendant).
    pub fn resume(&mut self, masters: &[&PidFd]) -> Result<(), String> {
        if self.is_watching() {
            return Ok(());
        }
        let mut copies = Vec::new();
        let mut seen = HashSet::new();
        for master in masters {
            for (fd, inode) in listening_fds(master.pid(), &self.ignored)? {
                if !seen.insert(inode) {
                    continue; // a binary upgrade's two masters share their listeners
                }
                copies.push(copy(master, fd, inode)?);
            }
        }
        if copies.is_empty() {
            return Err("the nginx master holds no listening TCP socket".into());
        }
        self.tasks = copies
            .into_iter()
            .map(|copy| {
                let (arrivals, arrived) = (self.arrivals.clone(), self.arrived.clone());
                tokio::spawn(watch(copy, arrivals, arrived, self.origin))
            })
            .collect();
        Ok(())
    }

    pub fn is_watching(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// When the watch began: arrivals are offsets from it.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The arrivals so far.
    pub fn arrivals(&self) -> Arrivals {
        self.arrivals.lock().expect("not poisoned").clone()
    }

    /// Records an arrival at `at` (from the origin) that the drain learnt of another way.
    pub fn record_unseen(&self, at: Duration, how: Unseen) {
        let mut arrivals = self.arrivals.lock().expect("not poisoned");
        match how {
            Unseen::Dated => arrivals.record(at),
            Unseen::Undated => arrivals.record_undated(at),
        }
    }

    /// Resolves at the next arrival (or at once if one came since the last call).
    pub async fn arrival(&self) {
        self.arrived.notified().await
    }

    /// Stops watching and closes the copies of the listeners before it returns: the tasks are
    /// awaited, not only aborted, so no copy outlives this call. What was seen is kept.
    pub async fn pause(&mut self) {
        if self.tasks.is_empty() {
            return;
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        self.arrivals.lock().expect("not poisoned").interrupted();
    }

    /// [`ArrivalWatch::pause`], for good.
    pub async fn stop(mut self) {
        self.pause().await
    }
}

/// Records a wake of `copy` for each burst of arrivals: in the runtime's epoll until a new
/// connection wakes it, then out of it for the rest.
async fn watch(copy: OwnedFd, arrivals: Arc<Mutex<Arrivals>>, arrived: Arc<Notify>, origin: Instant) {
    let mut copy = copy;
    loop {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for as
        // long as it is registered; into_inner() deregisters it before handing it back.
        let Ok(listening) = (unsafe { AsyncFd::register_with_interest(copy, Interest::READABLE) }) else {
            return;
        };
        let woke = listening.readable().await.is_ok();
        copy = listening.into_inner();
        if !woke {
            return;
        }
        arrivals.lock().expect("not poisoned").record(origin.elapsed());
        arrived.notify_one();
        tokio::time::sleep(REST).await;
    }
}

/// The master's file descriptors that are listening TCP sockets, with their inodes, but those
/// on `ignored` ports.
fn listening_fds(pid: i32, ignored: &[u16]) -> Result<Vec<(i32, u64)>, String> {
    let fds = Process::new(pid)
        .and_then(|p| p.fd())
        .map_err(|e| format!("cannot read the file descriptors of the nginx master {pid}: {e}"))?;
    let sockets: Vec<(i32, u64)> = fds
        .filter_map(|fd| {
            let fd = fd.ok()?;
            match fd.target {
                FDTarget::Socket(inode) => Some((fd.fd, inode)),
                _ => None,
            }
        })
        .collect();
    let mut listening = HashSet::new();
    for family in [Family::V4, Family::V6] {
        let found = sock_diag::tcp_sockets(family, states::LISTEN, &[])
            .map_err(|e| format!("cannot read the kernel's socket table: {e}"))?;
        listening.extend(
            found
                .into_iter()
                .filter(|s| !ignored.contains(&s.local.port()))
                .map(|s| s.inode),
        );
    }
    Ok(sockets
        .into_iter()
        .filter(|(_, inode)| listening.contains(inode))
        .collect())
}

/// A copy of the master's descriptor `fd`, checked to be the socket `inode` (the number may
/// have been closed and reused since it was read).
fn copy(master: &PidFd, fd: i32, inode: u64) -> Result<OwnedFd, String> {
    let copied = pidfd_getfd(master.as_fd(), fd, PidfdGetfdFlags::empty()).map_err(|e| {
        format!(
            "cannot copy the listening sockets of the nginx master {} (pidfd_getfd: {e})",
            master.pid()
        )
    })?;
    let stat = rustix::fs::fstat(&copied).map_err(|e| format!("cannot stat a copied socket: {e}"))?;
    if stat.st_ino != inode {
        return Err(format!(
            "the nginx master's descriptor {fd} changed while it was copied"
        ));
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Command, Stdio};

    /// A child process that holds a listening socket, as an nginx master does.
    struct Holder {
        child: std::process::Child,
        addr: std::net::SocketAddr,
    }

    impl Holder {
        fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let fd: OwnedFd = listener.into();
            let child = Command::new("sleep")
                .arg("30")
                .stdin(Stdio::from(fd))
                .spawn()
                .unwrap();
            Self { child, addr }
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn sees_each_burst_of_new_connections_without_accepting_them() {
        let holder = Holder::start();
        let master = PidFd::open(holder.child.id() as i32).unwrap();
        let watch = ArrivalWatch::start(&[&master], &[]).unwrap();
        assert_eq!(watch.arrivals().total(), 0);
        let first = TcpStream::connect(holder.addr).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(watch.arrivals().total(), 1);
        // Nobody accepts here, so the queue stays full, and the watch sees it once per rest:
        // never more often, however many connections wait.
        let more: Vec<TcpStream> = (0..30)
            .map(|_| TcpStream::connect(holder.addr).unwrap())
            .collect();
        tokio::time::sleep(REST * 10).await;
        let seen = watch.arrivals().total();
        assert!((5..=12).contains(&seen), "{seen} wakes in 10 rests");
        watch.stop().await;
        drop((first, more));
    }

    #[tokio::test]
    async fn a_stopped_watch_holds_no_copy_of_the_listener() {
        let holder = Holder::start();
        let master = PidFd::open(holder.child.id() as i32).unwrap();
        let watch = ArrivalWatch::start(&[&master], &[]).unwrap();
        watch.stop().await;
        let mut holder = holder;
        let _ = holder.child.kill();
        let _ = holder.child.wait();
        // The only holder is gone: the port refuses, nobody queues the connection.
        let refused = TcpStream::connect(holder.addr).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_master_without_listeners_is_an_error() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let master = PidFd::open(child.id() as i32).unwrap();
        let err = ArrivalWatch::start(&[&master], &[]).unwrap_err();
        assert!(err.contains("no listening TCP socket"), "{err}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
