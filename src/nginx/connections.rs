//! Established TCP connections held by nginx processes, read from procfs: the socket inodes among
//! each process's file descriptors, matched against the TCP tables of their network namespace.

use std::collections::{HashMap, HashSet};

use procfs::net::TcpState;
use procfs::process::{FDTarget, Process};

/// Established TCP connections (IPv4 and IPv6) held by each of `pids`, which share one network
/// namespace (nginx's workers do). Listening sockets do not count; a process that is gone or
/// unreadable is left out.
pub fn established(pids: &[i32]) -> Vec<(i32, usize)> {
    let sockets: HashMap<i32, HashSet<u64>> = pids
        .iter()
        .filter_map(|&pid| Some((pid, socket_inodes(pid)?)))
        .collect();
    // The tables are read once, through any of the processes: they are per namespace. Through
    // one that is still there: during a drain, idle workers exit while we read.
    let Some(tables) = sockets.keys().find_map(|&pid| {
        let process = Process::new(pid).ok()?;
        Some([process.tcp().ok()?, process.tcp6().unwrap_or_default()])
    }) else {
        return Vec::new();
    };
    let established: HashSet<u64> = tables
        .into_iter()
        .flatten()
        .filter(|entry| entry.state == TcpState::Established)
        .map(|entry| entry.inode)
        .collect();
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
    fn counts_this_process_connections_but_not_its_listener() {
        let me = std::process::id() as i32;
        let count = || established(&[me, i32::MAX]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let before = count()[0].1;
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // Both ends live in this process: two more established sockets; the missing pid is left out.
        assert_eq!(count(), [(me, before + 2)]);
        drop((client, server));
    }
}
