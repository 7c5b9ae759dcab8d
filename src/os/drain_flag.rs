//! The drain flag: while it exists, the snippet in `nginx-conf/graceful-drain.conf` makes nginx
//! answer every HTTP/1 request with `Connection: close`.
//!
//! Why a file: stock nginx cannot change keep-alive at run time without a reload, and a reload
//! itself closes idle keep-alive connections, the very race this avoids. An `if (-f ...)` is
//! checked on every request, so the flag takes effect on the next response.

use std::path::{Path, PathBuf};

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

    /// Tells keep-alive clients to close from the next response on.
    pub fn raise(&self) -> std::io::Result<()> {
        std::fs::write(&self.path, b"draining\n")
    }

    /// Removes the flag; a flag left by an earlier run would close every connection from the start.
    pub fn lower(&self) -> std::io::Result<bool> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The snippet with this flag's path in place of the shipped one.
    pub fn snippet(&self) -> String {
        SNIPPET.replace(SHIPPED_FLAG, &self.path.to_string_lossy())
    }

    /// Whether a config dump (`nginx -T`) tests for this flag anywhere.
    pub fn is_checked_by(&self, config_dump: &str) -> bool {
        let flag = self.path.to_string_lossy();
        config_dump.lines().any(|line| {
            let line = line.trim_start();
            !line.starts_with('#') && line.contains("-f") && line.contains(flag.as_ref())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snippet_follows_the_runtime_dir() {
        let flag = DrainFlag::in_dir(Path::new("/tmp/rt"));
        let snippet = flag.snippet();
        assert!(snippet.contains("if (-f /tmp/rt/draining)"), "{snippet}");
        assert!(!snippet.contains(SHIPPED_FLAG));
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
        flag.raise().unwrap();
        assert!(flag.path().exists());
        assert!(flag.lower().unwrap());
        assert!(!flag.path().exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
