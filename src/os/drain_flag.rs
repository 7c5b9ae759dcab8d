//! The drain flags: while `draining.N` exists, the snippet in `nginx-conf/graceful-drain.conf`
//! makes nginx answer HTTP/1 requests on connections whose serial number ends in the digit N
//! with `Connection: close` (the close spread raises them one after another); `draining` goes
//! up with the last, for a snippet from before the spread, readiness and `status`. This module
//! owns them all: every caller raises, reads and lowers them here.
//!
//! Why a file: stock nginx cannot change keep-alive at run time without a reload, and a reload
//! itself closes idle keep-alive connections, the very race this avoids. An `if (-f ...)` is
//! checked on every request, so the flag takes effect on the next response.
//!
//! nginx cannot tell a flag of its own drain from one a previous life of the container left in
//! the emptyDir (a `drain` killed with nginx as PID 1). So the flag names its owner, the nginx
//! master it drains, and a flag whose master is gone is stale: `run` and `post-start` remove it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::core::close_spread::SLOTS;
use crate::nginx::tree::ProcStat;
use crate::os::small_file;

/// The snippet as shipped, for the default runtime directory.
pub const SNIPPET: &str = include_str!("../../nginx-conf/graceful-drain.conf");
const SHIPPED_FLAG: &str = "/run/nginx-graceful/draining";

#[derive(Debug, Clone)]
pub struct DrainFlag {
    path: PathBuf,
}

impl DrainFlag {
    pub fn in_dir(runtime_dir: &Path) -> Self {
        Self {
            path: runtime_dir.join("draining"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells every keep-alive client to close from the next response on: every slot flag (the
    /// snippet tests its connection's), then `draining` (a snippet from before the close spread
    /// tests it alone). Each names `master`, the nginx master it is raised for.
    pub fn raise(&self, master: i32) -> std::io::Result<()> {
        self.raise_from(0, master)
    }

    /// [`DrainFlag::raise`] when the slot flags before `first` are up already.
    pub fn raise_from(&self, first: usize, master: i32) -> std::io::Result<()> {
        for slot in first..SLOTS {
            self.raise_slot(slot, master)?;
        }
        raise_at(&self.path, master)
    }

    /// Tells the clients whose connection's serial number ends in `slot` (0 to 9): a tenth of
    /// them. Named after `master` like the flag, so a slot flag left behind is known as stale.
    pub fn raise_slot(&self, slot: usize, master: i32) -> std::io::Result<()> {
        raise_at(&self.slot_path(slot), master)
    }

    fn slot_path(&self, slot: usize) -> PathBuf {
        self.path.with_extension(slot.to_string())
    }

    /// `draining` first, then each slot flag.
    fn paths(&self) -> impl Iterator<Item = PathBuf> + '_ {
        std::iter::once(self.path.clone()).chain((0..SLOTS).map(|slot| self.slot_path(slot)))
    }

    /// Whether a drain's flags are up, and for a master that still runs: the state of
    /// `draining`, or, before a close spread has raised it, of the first slot flag up.
    pub fn state(&self) -> FlagState {
        self.paths()
            .map(|path| state_of(&path))
            .find(|state| *state != FlagState::Down)
            .unwrap_or(FlagState::Down)
    }

    /// How many tenths of the keep-alive clients are told to close: one per slot flag up.
    pub fn tenths_told(&self) -> usize {
        (0..SLOTS).filter(|&slot| self.slot_path(slot).is_file()).count()
    }

    /// Removes the flag if it is stale; returns what was removed.
    pub fn lower_if_stale(&self) -> std::io::Result<Option<FlagState>> {
        match self.state() {
            stale @ FlagState::Stale(_) => Ok(self.lower()?.then_some(stale)),
            FlagState::Down | FlagState::Raised(_) => Ok(None),
        }
    }

    /// Removes every drain flag, `draining` and the slot flags; true when one was up. A flag
    /// left by an earlier run would close connections from the start. Each is tried, and the
    /// first failure is returned.
    pub fn lower(&self) -> std::io::Result<bool> {
        let mut removed = Ok(false);
        for path in self.paths() {
            match (std::fs::remove_file(&path), &removed) {
                (Ok(()), Ok(_)) => removed = Ok(true),
                (Err(e), Ok(_)) if e.kind() != std::io::ErrorKind::NotFound => removed = Err(e),
                _ => {}
            }
        }
        removed
    }

    /// The snippet with this flag's path in place of the shipped one.
    pub fn snippet(&self) -> String {
        SNIPPET.replace(SHIPPED_FLAG, &self.path.to_string_lossy())
    }

    /// Whether a config dump (`nginx -T`) tests for this flag anywhere.
    pub fn is_checked_by(&self, config_dump: &str) -> bool {
        let flag = self.path.to_string_lossy();
        tested_by(config_dump, &flag)
    }

    /// Whether a config dump tests the slot flags: a snippet from before the close spread tests
    /// `draining` alone, and its clients are all told at the spread's end.
    pub fn slots_are_checked_by(&self, config_dump: &str) -> bool {
        let slot = format!("{}.$", self.path.to_string_lossy());
        tested_by(config_dump, &slot)
    }
}

/// Whether a line of the config, not a comment, tests for a file whose path begins with `path`.
fn tested_by(config_dump: &str, path: &str) -> bool {
    config_dump.lines().any(|line| {
        let line = line.trim_start();
        !line.starts_with('#') && line.contains("-f") && line.contains(path)
    })
}

/// Written aside and renamed: nginx never sees a flag half-written.
fn raise_at(path: &Path, master: i32) -> std::io::Result<()> {
    let staging = path.with_file_name(format!(".draining.{}", std::process::id()));
    small_file::write_new(&staging, record(FlagOwner::of(master).as_ref()).as_bytes())?;
    std::fs::rename(&staging, path)
}

fn state_of(path: &Path) -> FlagState {
    match small_file::read(path, RECORD_LIMIT) {
        Err(err) if err.is_not_found() => FlagState::Down,
        // nginx's `-f` is false for anything but a regular file (or a link to one).
        Err(small_file::SmallFileError::NotRegular(_)) => FlagState::Down,
        Err(_) => FlagState::Stale(None),
        Ok(record) => match FlagOwner::parse(&record) {
            Some(owner) if owner.is_running() => FlagState::Raised(owner),
            owner => FlagState::Stale(owner),
        },
    }
}

/// The flag's contents: more than this is not a flag we wrote.
const RECORD_LIMIT: usize = 256;

fn record(owner: Option<&FlagOwner>) -> String {
    match owner {
        Some(owner) => format!("draining\n{}\n", owner.line()),
        None => "draining\n".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagState {
    Down,
    /// Up, for a master that runs.
    Raised(FlagOwner),
    /// Up, for a master that has exited, in a PID namespace that is not ours (a previous
    /// container), or for no master it names.
    Stale(Option<FlagOwner>),
}

/// The nginx master a flag was raised for, named for good: its pid, its start time (pids are
/// reused; a container's nginx is PID 1 in every life) and the PID namespace the pid counts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagOwner {
    pub pid: i32,
    pub start_time: u64,
    pub pid_namespace: u64,
}

impl FlagOwner {
    /// `pid`'s owner record, or `None` if /proc does not show it.
    pub fn of(pid: i32) -> Option<Self> {
        Some(Self {
            pid,
            start_time: ProcStat::read(pid)?.start_time,
            pid_namespace: own_pid_namespace()?,
        })
    }

    fn line(&self) -> String {
        format!("master {} {} {}", self.pid, self.start_time, self.pid_namespace)
    }

    /// Reads the record [`record`] writes; `None` for anything else.
    pub fn parse(record: &str) -> Option<Self> {
        let line = record.lines().find_map(|l| l.strip_prefix("master "))?;
        let mut fields = line.split_whitespace();
        let owner = Self {
            pid: fields.next()?.parse().ok().filter(|&pid: &i32| pid > 0)?,
            start_time: fields.next()?.parse().ok()?,
            pid_namespace: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(owner)
    }

    /// Whether this master still runs. From another PID namespace its pid means nothing: the
    /// commands that read the flag run in nginx's container, so the namespace is a previous
    /// container's.
    pub fn is_running(&self) -> bool {
        own_pid_namespace() == Some(self.pid_namespace)
            && ProcStat::read(self.pid)
                .is_some_and(|now| now.start_time == self.start_time && now.state != 'Z')
    }
}

fn own_pid_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid").ok().map(|ns| ns.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn the_snippet_follows_the_runtime_dir() {
        let flag = DrainFlag::in_dir(Path::new("/tmp/rt"));
        let snippet = flag.snippet();
        assert!(
            snippet.contains("if (-f /tmp/rt/draining.$nginx_graceful_slot)"),
            "{snippet}"
        );
        assert!(!snippet.contains(SHIPPED_FLAG));
    }

    #[test]
    fn a_snippet_from_before_the_spread_is_told_apart() {
        let flag = DrainFlag::in_dir(Path::new("/run/nginx-graceful"));
        assert!(flag.slots_are_checked_by(SNIPPET));
        let before = "if (-f /run/nginx-graceful/draining) {\n    set $c close;\n}\n";
        assert!(flag.is_checked_by(before));
        assert!(!flag.slots_are_checked_by(before));
    }

    #[test]
    fn slot_flags_are_raised_read_and_lowered_with_the_flag() {
        let dir = std::env::temp_dir().join(format!("ng-flag-slots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        let me = std::process::id() as i32;
        assert_eq!(flag.tenths_told(), 0);
        for slot in 0..3 {
            flag.raise_slot(slot, me).unwrap();
        }
        assert!(dir.join("draining.0").is_file() && dir.join("draining.2").is_file());
        assert_eq!(flag.tenths_told(), 3);
        // Before `draining` is up, the first slot flag says whose drain it is.
        assert_eq!(flag.state(), FlagState::Raised(FlagOwner::of(me).unwrap()));
        assert_eq!(flag.lower_if_stale().unwrap(), None);
        flag.raise(me).unwrap();
        assert_eq!(flag.tenths_told(), SLOTS);
        assert!(flag.lower().unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "every flag lowered");
        assert!(!flag.lower().unwrap());

        // Slot flags a killed drain left, `draining` not yet up: stale, and removed.
        let gone = FlagOwner {
            pid_namespace: FlagOwner::of(me).unwrap().pid_namespace + 1,
            ..FlagOwner::of(me).unwrap()
        };
        for slot in [4, 5] {
            std::fs::write(dir.join(format!("draining.{slot}")), record(Some(&gone))).unwrap();
        }
        assert_eq!(flag.state(), FlagState::Stale(Some(gone.clone())));
        assert_eq!(flag.lower_if_stale().unwrap(), Some(FlagState::Stale(Some(gone))));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_config_dump_shows_whether_the_snippet_is_loaded() {
        let flag = DrainFlag::in_dir(Path::new("/run/nginx-graceful"));
        assert!(flag.is_checked_by(SNIPPET));
        assert!(!flag.is_checked_by("server {\n    listen 80;\n}\n"));
        // A comment that names the flag does not count; nor does another runtime dir.
        assert!(!flag.is_checked_by("# if (-f /run/nginx-graceful/draining) {"));
        assert!(!DrainFlag::in_dir(Path::new("/elsewhere")).is_checked_by(SNIPPET));
    }

    #[test]
    fn raising_and_lowering_the_flag() {
        let dir = std::env::temp_dir().join(format!("ng-flag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        assert!(!flag.lower().unwrap());
        flag.raise(std::process::id() as i32).unwrap();
        assert!(flag.path().exists());
        assert!(flag.lower().unwrap());
        assert!(!flag.path().exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_flag_whose_master_is_gone_is_stale() {
        let dir = std::env::temp_dir().join(format!("ng-flag-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        assert_eq!(flag.state(), FlagState::Down);
        // This process stands for the master: it runs.
        let me = std::process::id() as i32;
        flag.raise(me).unwrap();
        let owner = FlagOwner::of(me).unwrap();
        assert_eq!(flag.state(), FlagState::Raised(owner.clone()));
        assert_eq!(flag.lower_if_stale().unwrap(), None);
        assert!(flag.path().exists(), "a running drain's flag stays");

        let previous_life = [
            // The same pid, started at another time: PID 1 of the container's previous life.
            FlagOwner {
                start_time: owner.start_time + 1,
                ..owner.clone()
            },
            // Another PID namespace: a previous container's.
            FlagOwner {
                pid_namespace: owner.pid_namespace + 1,
                ..owner.clone()
            },
        ];
        for stale in previous_life {
            std::fs::write(flag.path(), record(Some(&stale))).unwrap();
            assert_eq!(
                flag.lower_if_stale().unwrap(),
                Some(FlagState::Stale(Some(stale)))
            );
            assert!(!flag.path().exists());
        }
        // A flag that names no master (by hand, or an older version) is nobody's.
        std::fs::write(flag.path(), "").unwrap();
        assert_eq!(flag.lower_if_stale().unwrap(), Some(FlagState::Stale(None)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_or_a_symlink_at_the_staging_name_is_replaced() {
        let dir = std::env::temp_dir().join(format!("ng-flag-planted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flag = DrainFlag::in_dir(&dir);
        let staging = dir.join(format!(".draining.{}", std::process::id()));
        let target = dir.join("target");
        std::fs::write(&target, "keep me").unwrap();
        let plants: [&dyn Fn(); 2] = [
            &|| nix::unistd::mkfifo(&staging, nix::sys::stat::Mode::S_IRWXU).unwrap(),
            &|| std::os::unix::fs::symlink(&target, &staging).unwrap(),
        ];
        for plant in plants {
            plant();
            let raising = {
                let flag = flag.clone();
                std::thread::spawn(move || flag.raise(std::process::id() as i32))
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !raising.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if !raising.is_finished() {
                // Unblocks the open so the test can clean up and fail rather than hang.
                let _ = std::fs::File::options()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&staging);
                let _ = std::fs::remove_dir_all(&dir);
                panic!("raising the flag blocked on what stood at its staging name");
            }
            raising.join().unwrap().unwrap();
            assert!(matches!(flag.state(), FlagState::Raised(_)));
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
            assert!(!staging.exists() && std::fs::symlink_metadata(&staging).is_err());
            flag.lower().unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_records_are_read_as_written() {
        let owner = FlagOwner {
            pid: 1,
            start_time: 4242,
            pid_namespace: 4026532000,
        };
        assert_eq!(FlagOwner::parse(&record(Some(&owner))), Some(owner));
        for bad in [
            "",
            "draining\n",
            "master 1 2",
            "master 0 1 2",
            "master x 1 2",
            "master 1 2 3 4",
        ] {
            assert_eq!(FlagOwner::parse(bad), None, "{bad:?}");
        }
    }
}
