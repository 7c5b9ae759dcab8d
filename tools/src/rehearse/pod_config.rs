//! The files of one pod: its nginx config (the user's template or the rehearsal config, with the
//! pod's address and directory filled in), the keep-alive snippet, and the file /slow serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::strategy::PodFiles;
use crate::error::Error;
use nginx_graceful::os::drain_flag::DrainFlag;
use nginx_graceful::os::runtime_dir::render_config;

/// The config each pod runs when the user gives none.
pub const REHEARSAL_CONFIG: &str = include_str!("../../../nginx-conf/rehearsal.conf");

/// 32 KiB, which the rehearsal config's /slow sends at 32 KiB/s: one second.
const SLOW_BODY: usize = 32 * 1024;

/// Writes the pod's files into `dir` and says how to start its nginx.
pub fn prepare(
    dir: &Path,
    listen: SocketAddr,
    health: SocketAddr,
    template: &str,
    nginx: &str,
) -> Result<PodFiles, Error> {
    let write = |name: &str, contents: &[u8]| -> Result<PathBuf, Error> {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(Error::internal("cannot write a pod's files"))?;
        Ok(path)
    };
    let config = render(template, listen, dir)?;
    std::fs::create_dir_all(dir).map_err(Error::internal("cannot create a pod's directory"))?;
    let config_path = write("nginx.conf", config.as_bytes())?;
    write("graceful-drain.conf", DrainFlag::in_dir(dir).snippet().as_bytes())?;
    write("slow.bin", &vec![b'.'; SLOW_BODY])?;
    let (pid_file, globals) = match pid_directive(&config) {
        Some(path) => (path, "daemon off;".to_owned()),
        None => {
            let path = dir.join("nginx.pid");
            let globals = format!("daemon off; pid {};", path.display());
            (path, globals)
        }
    };
    let config_arg = config_path.to_string_lossy().into_owned();
    Ok(PodFiles {
        dir: dir.to_owned(),
        nginx: vec![
            nginx.into(),
            "-c".into(),
            config_arg,
            "-g".into(),
            globals.clone(),
        ],
        config: config_path,
        pid_file,
        health,
        nginx_bin: nginx.into(),
        nginx_globals: globals,
    })
}

/// Whether a config can serve as every pod's: it must say where each pod listens.
pub fn check(template: &str) -> Result<(), Error> {
    if template.contains("@LISTEN@") {
        return Ok(());
    }
    Err(Error::Rehearsal(
        "the config for rehearse has no @LISTEN@: write `listen @LISTEN@;` where each pod's \
         address goes (and @RUNTIME_DIR@ for its pid file and temp paths)"
            .into(),
    ))
}

/// The template with the pod's address and directory in place of @LISTEN@ and @RUNTIME_DIR@.
pub fn render(template: &str, listen: SocketAddr, dir: &Path) -> Result<String, Error> {
    check(template)?;
    Ok(render_config(template, &listen.to_string(), dir))
}

/// The path of a `pid` directive at the start of a line, if the config has one.
fn pid_directive(config: &str) -> Option<PathBuf> {
    config.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("pid")?;
        let path = rest.strip_suffix(';')?.trim();
        (rest.starts_with(char::is_whitespace) && !path.is_empty()).then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rehearsal_config_gets_the_pods_address_and_directory() {
        let config = render(
            REHEARSAL_CONFIG,
            "127.0.0.11:8080".parse().unwrap(),
            Path::new("/r/a"),
        )
        .unwrap();
        assert!(config.contains("listen 127.0.0.11:8080;"));
        assert!(config.contains("include /r/a/graceful-drain.conf;"));
        assert_eq!(pid_directive(&config), Some(PathBuf::from("/r/a/nginx.pid")));
        assert!(!config.contains('@'));
    }

    #[test]
    fn a_config_without_a_listen_placeholder_is_refused_with_the_fix() {
        let err = render(
            "server { listen 80; }",
            "127.0.0.1:1".parse().unwrap(),
            Path::new("/r"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("listen @LISTEN@;"), "{err}");
    }

    #[test]
    fn the_pid_directive_is_found_only_as_a_directive() {
        assert_eq!(
            pid_directive("  pid /x/n.pid;\n"),
            Some(PathBuf::from("/x/n.pid"))
        );
        assert_eq!(pid_directive("pidfile /x;\n# pid /y;\n"), None);
    }
}
