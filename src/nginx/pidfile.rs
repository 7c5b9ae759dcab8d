//! Finding a running nginx master from its pid file, trusting nothing: the file may be missing,
//! empty or garbage, and the pid in it may now belong to another process.

use std::path::{Path, PathBuf};

use super::pidfd::PidFd;
use super::tree::{ProcStat, ProcessTable, title};
use crate::error::Error;
use crate::os::small_file;

/// More than any pid file holds (digits and a newline): a larger one is not a pid file.
pub const PID_FILE_LIMIT: usize = 64;

/// What a pid file holds, read as nginx writes it (digits and a newline).
#[derive(Debug, PartialEq, Eq)]
pub enum PidFileContent {
    Pid(i32),
    Empty,
    Garbage(String),
}

impl PidFileContent {
    pub fn parse(content: &str) -> Self {
        let text = content.trim();
        if text.is_empty() {
            return Self::Empty;
        }
        match text.parse::<i32>() {
            Ok(pid) if pid > 0 => Self::Pid(pid),
            _ => Self::Garbage(text.chars().take(40).collect()),
        }
    }
}

/// An nginx master, verified and pinned by a pidfd.
#[derive(Debug)]
pub struct FoundMaster {
    pub pidfd: PidFd,
    pub comm: String,
    pub pid_file: PathBuf,
}

/// The nginx master a pid file names, followed across restarts (an ingress controller's nginx).
/// For the probes, the master last found is kept by its pidfd, and the file is read again only
/// once that master has exited: a probe costs a poll of a pidfd, not a read of the file.
#[derive(Debug)]
pub struct FollowedMaster {
    path: PathBuf,
    last: std::sync::Mutex<Option<PidFd>>,
}

impl FollowedMaster {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            last: std::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master's pid now, quietly: `None` while nginx is not started, is restarting, or the
    /// pid file is unusable (the drain says why, when it matters).
    pub fn current(&self) -> Option<i32> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(master) = last.as_ref().filter(|m| m.is_alive()) {
            return Some(master.pid());
        }
        *last = find_master(&self.path).ok().flatten().map(|m| m.pidfd);
        last.as_ref().map(PidFd::pid)
    }

    /// The master the pid file names now, read afresh and pinned; why not, logged.
    pub fn find(&self) -> Option<FoundMaster> {
        match find_master(&self.path) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(pid_file = %self.path.display(), %err, "no usable nginx master in the pid file");
                None
            }
        }
    }
}

/// Whether the process title and binary are those of an nginx master.
pub fn looks_like_master(cmdline: &str, exe: Option<&Path>) -> bool {
    let title_ok =
        cmdline.starts_with("nginx: master process") || cmdline.starts_with("openresty: master process");
    // The binary is readable for our own user's processes and for root; when it is, it must agree.
    let exe_ok = exe.is_none_or(|exe| {
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.contains("nginx") || name.contains("openresty")
    });
    title_ok && exe_ok
}

/// Reads `path` and returns the master it names; `Ok(None)` when nginx is not running (no pid
/// file, or its pid has exited). Never returns a process that is not an nginx master.
pub fn find_master(path: &Path) -> Result<Option<FoundMaster>, Error> {
    let content = match small_file::read(path, PID_FILE_LIMIT) {
        Ok(content) => content,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(refused) => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                detail: refused.to_string(),
            });
        }
    };
    let pid = match PidFileContent::parse(&content) {
        PidFileContent::Pid(pid) => pid,
        PidFileContent::Empty => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                detail: "it is empty".into(),
            });
        }
        PidFileContent::Garbage(text) => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                detail: format!("`{text}` is not a pid"),
            });
        }
    };
    let Some(stat) = ProcStat::read(pid).filter(|s| s.state != 'Z') else {
        return Ok(None);
    };
    let cmdline = title(pid);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    if !looks_like_master(&cmdline, exe.as_deref()) {
        let what = if cmdline.is_empty() {
            stat.comm.clone()
        } else {
            cmdline
        };
        return Err(Error::NotNginx {
            pid_file: path.to_owned(),
            pid,
            what,
        });
    }
    let owner = process_uid(pid);
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 && owner.is_some_and(|uid| uid != me) {
        return Err(Error::OtherUser {
            pid,
            uid: owner.unwrap_or_default(),
        });
    }
    // The start time, read again after the open, proves the pidfd holds the process we checked.
    let pidfd = PidFd::open_verified(&stat).map_err(|source| Error::Internal {
        context: "pidfd_open on the nginx master (needs Linux 5.3 and a seccomp profile that allows it)",
        source,
    })?;
    let Some(pidfd) = pidfd else {
        return Ok(None);
    };
    Ok(Some(FoundMaster {
        pidfd,
        comm: stat.comm,
        pid_file: path.to_owned(),
    }))
}

fn process_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `old`, named by the `.oldbin` file, is the old master of this nginx's binary upgrade
/// and not whatever nginx now has a stale file's pid. nginx's new master is a child of the old
/// one (it forks and executes the new binary; inherited listeners keep it from daemonizing), so
/// `current`, the master the pid file names, must be `old`'s child. Before the new master has
/// written the pid file, `old` must have a child that is one.
pub fn is_upgrade_of(old: &FoundMaster, current: Option<&FoundMaster>) -> bool {
    let old_pid = old.pidfd.pid();
    match current {
        Some(current) => ProcStat::read(current.pidfd.pid()).is_some_and(|stat| stat.ppid == old_pid),
        None => ProcessTable::read()
            .is_ok_and(|table| new_master_below(old_pid, &old.comm, &table, title).is_some()),
    }
}

/// The child of `old_pid` that is a binary upgrade's new master: titled a master, with workers of
/// its own, or the new binary still starting (not titled by nginx yet). A worker is neither: it
/// has no children, and a worker just forked still bears its master's title.
fn new_master_below(
    old_pid: i32,
    comm: &str,
    table: &ProcessTable,
    title: impl Fn(i32) -> String,
) -> Option<i32> {
    table
        .children(old_pid)
        .filter(|child| child.comm == comm)
        .find(|child| {
            let title = title(child.pid);
            if looks_like_master(&title, None) {
                table.children(child.pid).next().is_some()
            } else {
                !titled_by_nginx(&title)
            }
        })
        .map(|child| child.pid)
}

/// Whether nginx gave the process its title ("nginx: worker process"), as it does to every
/// process it forks.
fn titled_by_nginx(title: &str) -> bool {
    title.starts_with("nginx: ") || title.starts_with("openresty: ")
}

/// The pid file of the old master during a binary upgrade (`nginx.pid.oldbin`).
pub fn oldbin(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_are_read_as_nginx_writes_them() {
        use PidFileContent::*;
        for (content, expected) in [
            ("1234\n", Pid(1234)),
            ("1234", Pid(1234)),
            ("  77 \n\n", Pid(77)),
            ("", Empty),
            ("\n", Empty),
            ("0\n", Garbage("0".into())),
            ("-5", Garbage("-5".into())),
            ("12 34", Garbage("12 34".into())),
            ("nginx", Garbage("nginx".into())),
            ("99999999999999", Garbage("99999999999999".into())),
        ] {
            assert_eq!(PidFileContent::parse(content), expected, "{content:?}");
        }
    }

    #[test]
    fn only_an_nginx_master_is_accepted() {
        let nginx = Some(Path::new("/usr/sbin/nginx"));
        assert!(looks_like_master(
            "nginx: master process nginx -g daemon off;",
            nginx
        ));
        assert!(looks_like_master("nginx: master process /usr/sbin/nginx", None));
        assert!(looks_like_master(
            "openresty: master process",
            Some(Path::new("/usr/bin/openresty"))
        ));
        assert!(!looks_like_master("nginx: worker process", nginx));
        assert!(!looks_like_master(
            "sleep 1000",
            Some(Path::new("/usr/bin/sleep"))
        ));
        // A process that renamed itself to look like nginx is still not nginx.
        assert!(!looks_like_master(
            "nginx: master process",
            Some(Path::new("/usr/bin/python3"))
        ));
    }

    #[test]
    fn an_upgrade_s_new_master_is_a_child_of_the_old_that_no_worker_resembles() {
        let stat = |pid, ppid| ProcStat {
            pid,
            comm: "nginx".into(),
            state: 'S',
            ppid,
            pgrp: pid,
            start_time: 1,
        };
        let title = |pid| match pid {
            20 => "nginx: master process /usr/sbin/nginx".to_owned(),
            21 | 22 | 31 => "nginx: worker process".to_owned(),
            // Forked a moment ago: the worker still bears its master's title.
            23 => "nginx: master process /usr/sbin/nginx".to_owned(),
            30 => "nginx: master process /usr/sbin/nginx".to_owned(),
            40 => "/usr/sbin/nginx -g daemon off;".to_owned(),
            _ => String::new(),
        };
        // 10 -> 20 (old master) -> 21, 22, 23 (workers), 30 (new master) -> 31 (its worker).
        let upgraded = ProcessTable::from_stats([
            stat(20, 10),
            stat(21, 20),
            stat(22, 20),
            stat(23, 20),
            stat(30, 20),
            stat(31, 30),
        ]);
        assert_eq!(new_master_below(20, "nginx", &upgraded, title), Some(30));
        // An nginx with workers only (one just forked) is no upgrade's old master.
        let unrelated = ProcessTable::from_stats([stat(20, 10), stat(21, 20), stat(23, 20)]);
        assert_eq!(new_master_below(20, "nginx", &unrelated, title), None);
        // The new binary executed, not titled yet: an upgrade under way.
        let starting = ProcessTable::from_stats([stat(20, 10), stat(21, 20), stat(40, 20)]);
        assert_eq!(new_master_below(20, "nginx", &starting, title), Some(40));
        assert_eq!(new_master_below(20, "openresty", &starting, title), None);
    }

    #[test]
    fn the_oldbin_file_sits_beside_the_pid_file() {
        assert_eq!(
            oldbin(Path::new("/run/nginx.pid")),
            Path::new("/run/nginx.pid.oldbin")
        );
    }

    #[test]
    fn a_missing_pid_file_means_nginx_is_not_running() {
        assert!(
            find_master(Path::new("/nonexistent/nginx.pid"))
                .unwrap()
                .is_none()
        );
    }
}
