//! Finding a running nginx master from its pid file, trusting nothing: the file may be missing,
//! empty or garbage, and the pid in it may now belong to another process.

use std::path::{Path, PathBuf};

use super::pidfd::PidFd;
use super::tree::ProcStat;
use crate::error::Error;

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
    let content = match std::fs::read_to_string(path) {
        Ok(content) => content,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::PidFile {
                path: path.to_owned(),
                detail: source.to_string(),
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
    let cmdline = super::tree::title(pid);
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
