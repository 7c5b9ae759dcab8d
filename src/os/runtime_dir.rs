//! The runtime directory: what the supervisor creates at run time (drain flag, bundled config,
//! nginx's pid file and temp files), locked so that two supervisors never share one.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
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
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("lock"))
            .map_err(fail)?;
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

const OUTCOME_FILE: &str = "drain-outcome.json";

/// Keeps a drain's outcome event, for hooks that come late or run twice.
pub fn record_outcome(dir: &Path, outcome: &Outcome) {
    if let Err(err) = std::fs::write(dir.join(OUTCOME_FILE), outcome.to_json().to_string()) {
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
    let event = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Outcome::from_json(&event)
}

#[cfg(test)]
mod tests {
    use super::*;

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
