//! Where nginx's own config puts its pid file, for `drain`, `reload` and `status` when no
//! supervisor answers and no pid file was given: an image whose nginx.conf moves it
//! (nginxinc/nginx-unprivileged: `pid /tmp/nginx.pid;`) needs no --pid-file.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::cli::NginxTarget;

/// nginx resolves upstream host names while it tests a config; past this, the default pid
/// file is read instead.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of the dump that is read: the `pid` directive is in the main file, at its top.
const DUMP_READ_AT_MOST: u64 = 1024 * 1024;

/// `target`, with the pid file of `nginx -T` (nginx from PATH, its default config) when none
/// was named; unchanged when one was, or when nginx cannot tell.
pub async fn resolve(target: &NginxTarget) -> NginxTarget {
    let given = target.clone();
    let resolved = tokio::task::spawn_blocking(move || resolve_blocking(given)).await;
    resolved.unwrap_or_else(|_| target.clone())
}

/// [`resolve`], for callers already off the async runtime.
pub fn resolve_blocking(mut target: NginxTarget) -> NginxTarget {
    if target.named_pid_file().is_some() {
        return target;
    }
    if let Some(pid_file) = dump_of_nginx_t().as_deref().and_then(pid_file_in) {
        tracing::debug!(pid_file = %pid_file.display(), "the pid file from nginx -T");
        target.pid_file = pid_file;
    }
    target
}

/// The pid file a config dump sets, when it is an absolute path (a relative one is read from
/// nginx's prefix, which the dump does not show).
fn pid_file_in(dump: &str) -> Option<PathBuf> {
    let value = super::config::directive_value(dump, "pid")?;
    let path = PathBuf::from(value.trim_matches(['"', '\'']));
    path.is_absolute().then_some(path)
}

/// What `nginx -T` prints, or `None` when it is not there or takes too long (then it is
/// killed).
fn dump_of_nginx_t() -> Option<String> {
    let mut nginx = Command::new("nginx")
        .arg("-T")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = nginx.stdout.take()?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dump = String::new();
        let _ = stdout.take(DUMP_READ_AT_MOST).read_to_string(&mut dump);
        let _ = sender.send(dump);
    });
    let dump = receiver.recv_timeout(LOOKUP_TIMEOUT).ok();
    if dump.is_none() {
        let _ = nginx.kill();
    }
    // A config that fails its test prints no dump: its exit status adds nothing.
    let _ = nginx.wait();
    dump
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_absolute_pid_path_is_taken_from_the_dump() {
        for (dump, expected) in [
            ("pid /tmp/nginx.pid;\n", Some("/tmp/nginx.pid")),
            ("user nginx;\n  pid \"/run/x.pid\";\n", Some("/run/x.pid")),
            (
                "# pid /tmp/nginx.pid;\npid /run/nginx.pid;\n",
                Some("/run/nginx.pid"),
            ),
            ("pid logs/nginx.pid;\n", None),
            ("worker_processes 2;\n", None),
        ] {
            assert_eq!(pid_file_in(dump), expected.map(PathBuf::from), "{dump:?}");
        }
    }
}
