//! Timing process exits from outside, for the benchmarks: pidfds polled together, so each exit
//! is stamped within microseconds and the watcher's own delay is the same for every process.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid)?,
        rustix::process::PidfdFlags::empty(),
    )
    .ok()
}

/// Waits until every process has exited and returns when each did.
pub fn exit_times(fds: &[OwnedFd], timeout: Duration) -> Vec<Instant> {
    let mut exited: Vec<Option<Instant>> = vec![None; fds.len()];
    let deadline = Instant::now() + timeout;
    while exited.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "processes still running after {timeout:?}"
        );
        let mut polls: Vec<PollFd> = fds
            .iter()
            .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut polls, PollTimeout::from(1000u16)).unwrap();
        let now = Instant::now();
        for (i, p) in polls.iter().enumerate() {
            if exited[i].is_none() && p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
                exited[i] = Some(now);
            }
        }
    }
    exited.into_iter().map(Option::unwrap).collect()
}

/// Time in ms from the last of `nginx` exiting to the exit of the process `start` starts;
/// negative when that process returned while nginx was still running. nginx is watched from a
/// thread of its own, started before `start` runs, so fast exits are not stamped late.
pub fn lag_after_last(nginx: Vec<OwnedFd>, start: impl FnOnce() -> OwnedFd, timeout: Duration) -> f64 {
    let watcher = std::thread::spawn(move || exit_times(&nginx, timeout));
    let waiter = start();
    let waiter_exit = exit_times(&[waiter], timeout)[0];
    let last = watcher.join().unwrap().into_iter().max().unwrap();
    if waiter_exit >= last {
        (waiter_exit - last).as_secs_f64() * 1e3
    } else {
        -((last - waiter_exit).as_secs_f64() * 1e3)
    }
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
