//! The runtime directory: what the supervisor creates at run time (drain flag, bundled config,
//! nginx's pid file and temp files), locked so that two supervisors never share one.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::core::outcome::Outcome;
use crate::error::Error;
use crate::os::drain_flag::DrainFlag;

pub const BUNDLED_CONFIG: &str = include_str!("../../nginx-conf/nginx.conf");

#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl RuntimeDir {
    /// Creates and locks the directory, and clears a drain flag left by an earlier run.
    pub fn prepare(path: &Path) -> Result<Self, Error> {
        let fail = |source| Error::RuntimeDir {
            path: path.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(fail)?;
        // nginx workers run as another user and must stat() the drain flag. A Kubernetes
        // emptyDir is root's with mode 777: already open enough, and not ours to chmod.
        let open_enough = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
        if !open_enough
            && let Err(err) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        {
            tracing::warn!(dir = %path.display(), %err, "cannot make the runtime directory world-readable; nginx workers may not see the drain flag");
        }
        let lock_file = crate::os::small_file::open_lock(&path.join("lock")).map_err(fail)?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| Error::RuntimeDirBusy {
                path: path.to_owned(),
            })?;
        let dir = Self {
            path: path.to_owned(),
            _lock: lock,
        };
        if dir.flag().lower().map_err(fail)? {
            tracing::warn!(flag = %dir.flag().path().display(), "removed a drain flag left by an earlier run");
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn flag(&self) -> DrainFlag {
        DrainFlag::in_dir(&self.path)
    }

    /// Writes the bundled config and its drain snippet; returns the config's path.
    pub fn write_bundled_config(&self, listen: &str) -> Result<PathBuf, Error> {
        let fail = |source| Error::RuntimeDir {
            path: self.path.clone(),
            source,
        };
        let config = render_config(BUNDLED_CONFIG, listen, &self.path);
        let config_path = self.path.join("nginx.conf");
        std::fs::write(&config_path, config).map_err(fail)?;
        std::fs::write(self.path.join("graceful-drain.conf"), self.flag().snippet()).map_err(fail)?;
        Ok(config_path)
    }
}

/// A shipped config template with its address and runtime directory filled in.
pub fn render_config(template: &str, listen: &str, dir: &Path) -> String {
    template
        .replace("@RUNTIME_DIR@", &dir.to_string_lossy())
        .replace("@LISTEN@", listen)
}

/// Who nginx's workers run as: its `user` directive (`nobody` by default) when the master runs
/// as root, with the groups `initgroups` gives them.
#[derive(Debug)]
struct WorkerUser {
    name: String,
    uid: u32,
    groups: Vec<u32>,
}

impl WorkerUser {
    fn of_config(config_dump: &str) -> Option<Self> {
        let (name, group) = user_directive(config_dump).unwrap_or_else(|| ("nobody".to_owned(), None));
        let user = nix::unistd::User::from_name(&name).ok()??;
        // nginx takes the group named as the user when the directive names none.
        let gid = nix::unistd::Group::from_name(group.as_deref().unwrap_or(&name))
            .ok()
            .flatten()
            .map_or(user.gid, |group| group.gid);
        let c_name = std::ffi::CString::new(name.clone()).ok()?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&c_name, gid)
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.push(gid.as_raw());
        Some(Self {
            name,
            uid: user.uid.as_raw(),
            groups,
        })
    }

    /// What the mode bits say; root searches everything.
    fn can_search(&self, mode: u32, owner: u32, group: u32) -> bool {
        let bit = if self.uid == 0 {
            return true;
        } else if owner == self.uid {
            0o100
        } else if self.groups.contains(&group) {
            0o010
        } else {
            0o001
        };
        mode & bit != 0
    }
}

/// The user (and group) of the `user` directive in a config dump, outside comments.
fn user_directive(config_dump: &str) -> Option<(String, Option<String>)> {
    config_dump.lines().find_map(|line| {
        let code = line.split('#').next().unwrap_or_default();
        let mut words = code
            .split(|c: char| c.is_whitespace() || c == ';')
            .filter(|w| !w.is_empty());
        (words.next() == Some("user")).then_some(())?;
        Some((words.next()?.to_owned(), words.next().map(str::to_owned)))
    })
}

/// nginx's workers stat() the drain flag as nginx's `user` when the master runs as root: a
/// directory on the way they cannot search hides the flag, and no keep-alive client is told to
/// close before nginx quits. Checked once at start and warned about with the fix: nginx still
/// serves and drains without the flag, so this is no reason to refuse to start.
pub fn warn_if_workers_cannot_see(flag: &Path, config_dump: &str) {
    if !nix::unistd::geteuid().is_root() {
        // Workers run as the supervisor's user, which made the directory.
        return;
    }
    let Some(worker) = WorkerUser::of_config(config_dump) else {
        return;
    };
    let Some((dir, meta)) = first_unsearchable(flag, &worker) else {
        return;
    };
    tracing::warn!(
        dir = %dir.display(),
        user = %worker.name,
        flag = %flag.display(),
        "nginx workers (user {}) cannot search {} (mode {:o}, owner {}:{}): they will not see the drain flag, and keep-alive clients will not be told to close before nginx quits; let them through (chmod o+x {}) or choose a --runtime-dir they can reach",
        worker.name,
        dir.display(),
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        dir.display(),
    );
}

/// The first directory, from the root down, that `worker` cannot search on the way to `flag`,
/// along the path as written and along the one its symlinks lead to.
fn first_unsearchable(flag: &Path, worker: &WorkerUser) -> Option<(PathBuf, std::fs::Metadata)> {
    let runtime = flag.parent()?;
    let real = std::fs::canonicalize(runtime).ok();
    let mut ways: Vec<&Path> = runtime.ancestors().collect();
    ways.reverse();
    if let Some(real) = &real {
        let mut real_ways: Vec<&Path> = real.ancestors().collect();
        real_ways.reverse();
        ways.extend(real_ways);
    }
    ways.into_iter().find_map(|dir| {
        // `metadata` follows a symlink to the directory it stands for.
        let meta = std::fs::metadata(dir).ok()?;
        (!worker.can_search(meta.mode(), meta.uid(), meta.gid())).then(|| (dir.to_path_buf(), meta))
    })
}

const OUTCOME_FILE: &str = "drain-outcome.json";

/// The most an outcome file may hold; one is a few hundred bytes.
const OUTCOME_MAX_BYTES: usize = 16 * 1024;

/// Keeps a drain's outcome event, for hooks that come late or run twice.
pub fn record_outcome(dir: &Path, outcome: &Outcome) {
    let written =
        crate::os::small_file::write_new(&dir.join(OUTCOME_FILE), outcome.to_json().to_string().as_bytes());
    if let Err(err) = written {
        tracing::debug!(%err, "cannot record the drain's outcome");
    }
}

/// The outcome recorded at or after `since`, if any.
pub fn recorded_outcome(dir: &Path, since: std::time::SystemTime) -> Option<Outcome> {
    let path = dir.join(OUTCOME_FILE);
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if written < since {
        return None;
    }
    // Any uid in the pod may write here (an emptyDir is mode 777): an outcome is a few hundred
    // bytes, and a FIFO or a huge file is no outcome.
    let text = crate::os::small_file::read(&path, OUTCOME_MAX_BYTES).ok()?;
    let event = serde_json::from_str(&text).ok()?;
    Outcome::from_json(&event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_search_a_directory_by_owner_group_or_other_bits() {
        let worker = WorkerUser {
            name: "www-data".into(),
            uid: 33,
            groups: vec![33, 100],
        };
        // (mode, owner, group, searchable)
        for (mode, owner, group, searchable) in [
            (0o755, 0, 0, true),
            (0o700, 0, 0, false),
            (0o750, 0, 0, false),
            (0o750, 0, 100, true),
            (0o700, 33, 0, true),
            (0o070, 33, 33, false),
            (0o711, 0, 0, true),
            (0o1777, 0, 0, true),
        ] {
            assert_eq!(
                worker.can_search(mode, owner, group),
                searchable,
                "{mode:o} {owner}:{group}"
            );
        }
        let root = WorkerUser {
            name: "root".into(),
            uid: 0,
            groups: vec![0],
        };
        assert!(root.can_search(0o700, 1000, 1000));
    }

    #[test]
    fn the_user_directive_names_the_workers() {
        for (dump, user) in [
            ("user www-data;\nevents {}\n", Some(("www-data", None))),
            ("user  nginx nginx ;\n", Some(("nginx", Some("nginx")))),
            ("# user www-data;\n", None),
            ("events {}\n", None),
        ] {
            let found = user_directive(dump);
            assert_eq!(
                found.as_ref().map(|(u, g)| (u.as_str(), g.as_deref())),
                user,
                "{dump:?}"
            );
        }
    }

    #[test]
    fn an_outcome_file_that_is_no_outcome_is_ignored_without_blocking() {
        let dir = std::env::temp_dir().join(format!("ng-rt-outcome-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(OUTCOME_FILE);
        let since = std::time::SystemTime::UNIX_EPOCH;
        // Another uid's FIFO: a blocking open would wait for a writer for good.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        assert!(recorded_outcome(&dir, since).is_none());
        std::fs::remove_file(&path).unwrap();
        // A file far larger than any outcome is not read into memory.
        std::fs::File::create(&path).unwrap().set_len(1 << 30).unwrap();
        assert!(recorded_outcome(&dir, since).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs `f` on a thread of its own and returns its result, or `None` if it blocks past 2 s.
    fn within_2s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(2)).ok()
    }

    #[test]
    fn fifos_planted_in_the_runtime_directory_block_nothing() {
        let dir = std::env::temp_dir().join(format!("ng-rt-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = |name: &str| {
            nix::unistd::mkfifo(&dir.join(name), nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap()
        };
        // Another uid's FIFO at the lock: refused at once, not waited on.
        fifo("lock");
        let d = dir.clone();
        let prepared = within_2s(move || RuntimeDir::prepare(&d).map(|_| ()));
        assert!(matches!(prepared, Some(Err(_))), "{prepared:?}");
        std::fs::remove_file(dir.join("lock")).unwrap();
        // At the outcome: replaced by the outcome, not written into.
        fifo(OUTCOME_FILE);
        let d = dir.clone();
        let outcome = Outcome::of_drain(Default::default());
        assert!(
            within_2s(move || record_outcome(&d, &outcome)).is_some(),
            "blocked"
        );
        assert!(
            std::fs::symlink_metadata(dir.join(OUTCOME_FILE))
                .unwrap()
                .is_file()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_directory_one_supervisor() {
        let path = std::env::temp_dir().join(format!("ng-rt-{}", std::process::id()));
        let first = RuntimeDir::prepare(&path).unwrap();
        let second = RuntimeDir::prepare(&path);
        assert!(matches!(second, Err(Error::RuntimeDirBusy { .. })), "{second:?}");
        drop(first);
        let third = RuntimeDir::prepare(&path).unwrap();
        let config = std::fs::read_to_string(third.write_bundled_config("127.0.0.1:1").unwrap()).unwrap();
        assert!(config.contains("listen 127.0.0.1:1;"));
        assert!(config.contains(&format!("include {}/graceful-drain.conf;", path.display())));
        assert!(!config.contains('@'));
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn a_stale_flag_is_cleared() {
        let path = std::env::temp_dir().join(format!("ng-rt-stale-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        DrainFlag::in_dir(&path).raise(std::process::id() as i32).unwrap();
        let dir = RuntimeDir::prepare(&path).unwrap();
        assert!(!dir.flag().path().exists());
        std::fs::remove_dir_all(&path).unwrap();
    }
}
