//! The nginx command: test its config (`nginx -T`) and start the master as the supervisor's child.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::oneshot;

use super::log::NginxErrors;
use super::pidfd::PidFd;
use crate::error::Error;
use crate::os::reaper::{Exit, Reaper};

/// nginx resolves upstream host names while it tests a config; a DNS server that does not
/// answer must not stall start-up or a reload for ever.
pub const CONFIG_TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct NginxCommand {
    argv: Vec<OsString>,
}

/// The directives whose lines the supervisor keeps from `nginx -T`'s dump (see [`ConfigReport`]).
const DIRECTIVES_KEPT: [&str; 5] = ["daemon", "worker_shutdown_timeout", "pid", "listen", "error_log"];

/// The most of the dump that is kept; a config of any size then costs little memory.
const DUMP_KEPT_AT_MOST: usize = 1024 * 1024;

/// The most of `nginx -T`'s messages that is kept; the rest is read and dropped.
const MESSAGES_KEPT_AT_MOST: u64 = 64 * 1024;

/// A longer line of the dump is a map or a comment, never a line the supervisor reads.
const DUMP_LINE_AT_MOST: u64 = 64 * 1024;

/// What `nginx -T` said of a config that passed.
#[derive(Debug)]
pub struct ConfigReport {
    /// The lines of the dump the supervisor reads, in order: each file's
    /// `# configuration file PATH:` header, the lines that set a directive of
    /// [`DIRECTIVES_KEPT`], and the lines with a `-f` test (the drain snippet's). The dump is
    /// read as it comes, never whole: a 50 MB config costs no more than a small one.
    pub dump: String,
    /// nginx's own warnings, e.g. `[warn] ... "user" directive makes sense only if ...`.
    pub warnings: Vec<String>,
}

/// The running master: our child, held by pidfd.
pub struct Master {
    pub pidfd: PidFd,
    pub exit: oneshot::Receiver<Exit>,
    /// Copies nginx's stderr; ends when the last nginx process has closed it.
    pub log: Option<tokio::task::JoinHandle<()>>,
}

impl NginxCommand {
    /// nginx in the foreground with the bundled config. `-e stderr` keeps nginx from opening its
    /// compiled-in error log before it reads the config, which fails for a non-root user.
    pub fn bundled(config: &Path) -> Self {
        let argv = ["nginx", "-e", "stderr", "-c"].map(OsString::from).into_iter();
        let argv = argv.chain([config.into(), "-g".into(), "daemon off;".into()]);
        Self { argv: argv.collect() }
    }

    pub fn custom(argv: Vec<OsString>) -> Self {
        assert!(!argv.is_empty(), "an empty command");
        Self { argv }
    }

    /// The same command with one more directive in its `-g` (nginx keeps only the last `-g`, so
    /// the directive joins an existing one).
    pub fn with_directive(&self, directive: &str) -> Self {
        let mut argv = self.argv.clone();
        match argv
            .iter()
            .position(|a| a == "-g")
            .filter(|&at| at + 1 < argv.len())
        {
            Some(at) => {
                let mut joined = argv[at + 1].clone();
                joined.push(" ");
                joined.push(directive);
                argv[at + 1] = joined;
            }
            None => argv.extend(["-g".into(), directive.into()]),
        }
        Self { argv }
    }

    /// Whether the command's own `-g` sets `directive` (a config dump does not show `-g`).
    pub fn directives_set(&self, directive: &str) -> bool {
        self.directive_value(directive).is_some()
    }

    /// The value `-g` gives `directive`, as written; `None` when `-g` does not set it.
    pub fn directive_value(&self, directive: &str) -> Option<String> {
        self.argv.windows(2).find_map(|pair| {
            let directives = pair[1].to_string_lossy();
            (pair[0] == "-g").then_some(())?;
            directives.split(';').find_map(|d| {
                let mut words = d.split_whitespace();
                (words.next() == Some(directive)).then(|| words.collect::<Vec<_>>().join(" "))
            })
        })
    }

    pub fn program(&self) -> String {
        self.argv[0].to_string_lossy().into_owned()
    }

    /// Whether the command is nginx itself (so `-T` can be added to test its config), rather
    /// than a wrapper that starts nginx some other way.
    pub fn is_nginx(&self) -> bool {
        let name = Path::new(&self.argv[0]).file_name().and_then(|n| n.to_str());
        matches!(name, Some("nginx" | "nginx-debug" | "openresty"))
    }

    /// Runs the command with `-T`: the same binary, config and `-g` directives as the master.
    pub async fn test(&self, reaper: &Reaper) -> Result<ConfigReport, Error> {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .arg("-T")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = reaper.spawn(&mut command).map_err(|e| self.spawn_error(e))?;
        let mut stdout = tokio::process::ChildStdout::from_std(child.stdout.expect("piped"))
            .map_err(Error::internal("reading nginx -T"))?;
        let mut stderr = tokio::process::ChildStderr::from_std(child.stderr.expect("piped"))
            .map_err(Error::internal("reading nginx -T"))?;
        // Killed if this test is abandoned (a drain cancels a reload) or times out: a stray
        // `nginx -T` would be waited for as an nginx process. By pidfd: it is safe from reuse.
        let _kill_on_drop = PidFd::open(child.pid.as_raw()).ok().map(KillOnDrop);
        let run = async {
            // Both pipes at once: a large dump would otherwise fill one while we read the other.
            let (dump, messages) = tokio::join!(read_dump(&mut stdout), read_capped(&mut stderr));
            let (dump, messages) = (
                dump.map_err(Error::internal("reading nginx -T"))?,
                messages.map_err(Error::internal("reading nginx -T"))?,
            );
            let exit = child.exit.await.map_err(|_| Error::Internal {
                context: "nginx -T",
                source: std::io::Error::other("its exit status was lost"),
            })?;
            Ok::<_, Error>((exit, dump, messages))
        };
        let (exit, dump, messages) = match tokio::time::timeout(CONFIG_TEST_TIMEOUT, run).await {
            Ok(done) => done?,
            Err(_) => {
                return Err(Error::ConfigTest {
                    detail: format!(
                        "nginx -T did not finish within {}s (an upstream host name that does not resolve?)",
                        CONFIG_TEST_TIMEOUT.as_secs()
                    ),
                });
            }
        };
        let messages = String::from_utf8_lossy(&messages);
        let lines = nginx_messages(&messages);
        if !exit.success() {
            let problems: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| !l.contains("test failed"))
                .collect();
            let detail = if problems.is_empty() {
                format!("nginx -T failed ({exit})")
            } else {
                problems.join("; ")
            };
            return Err(Error::ConfigTest { detail });
        }
        let warnings = lines
            .iter()
            .filter(|l| l.contains("[warn]"))
            .map(|l| l.to_string())
            .collect();
        Ok(ConfigReport { dump, warnings })
    }

    /// Starts the master in its own process group (a Ctrl-C at the terminal reaches the
    /// supervisor only), killed by the kernel if the supervisor dies first.
    pub fn spawn(&self, reaper: &Reaper, errors: &NginxErrors) -> Result<Master, Error> {
        let mut command = Command::new(&self.argv[0]);
        // stderr through us (see `log`); stdout (access logs, often) straight to ours.
        command
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        crate::os::reaper::die_with_parent(&mut command);
        let mut child = reaper.spawn(&mut command).map_err(|e| self.spawn_error(e))?;
        let log = child
            .stderr
            .take()
            .map(|pipe| super::log::pass_through(pipe, errors.clone()));
        // Our unreaped child: its pid cannot be reused, so opening the pidfd now is safe.
        let pidfd = match PidFd::open(child.pid.as_raw()) {
            Ok(pidfd) => pidfd,
            Err(source) => {
                // Without a pidfd we could not drain it: leave nothing half-started behind.
                let _ = nix::sys::signal::kill(child.pid, nix::sys::signal::Signal::SIGKILL);
                return Err(Error::Internal {
                    context: "pidfd_open on the nginx master",
                    source,
                });
            }
        };
        Ok(Master {
            pidfd,
            exit: child.exit,
            log,
        })
    }

    fn spawn_error(&self, source: std::io::Error) -> Error {
        let program = self.program();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { program }
        } else {
            Error::Spawn { program, source }
        }
    }
}

/// Sends SIGKILL when dropped; harmless once the process has exited.
struct KillOnDrop(PidFd);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.is_alive() {
            self.0.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Reads the dump of `nginx -T` to its end, keeping the lines [`ConfigReport::dump`] names.
async fn read_dump(pipe: impl AsyncRead + Unpin) -> std::io::Result<String> {
    let mut reader = BufReader::new(pipe);
    let (mut kept, mut line, mut whole) = (String::new(), Vec::new(), true);
    loop {
        line.clear();
        if (&mut reader)
            .take(DUMP_LINE_AT_MOST)
            .read_until(b'\n', &mut line)
            .await?
            == 0
        {
            return Ok(kept);
        }
        // A line too long for one piece comes in several: none of them is kept.
        let starts_a_line = whole;
        whole = line.ends_with(b"\n");
        if !(starts_a_line && whole) {
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        if kept.len() + text.len() <= DUMP_KEPT_AT_MOST && is_read_by_the_supervisor(&text) {
            kept.push_str(&text);
        }
    }
}

/// Whether a line of the dump is one the supervisor reads (see [`ConfigReport::dump`]).
fn is_read_by_the_supervisor(line: &str) -> bool {
    let line = line.trim_start();
    if line.starts_with("# configuration file ") {
        return true;
    }
    if line.starts_with('#') {
        return false;
    }
    let first = line.split(|c: char| c.is_whitespace() || c == ';').next();
    first.is_some_and(|word| DIRECTIVES_KEPT.contains(&word)) || line.contains("-f")
}

/// Reads `pipe` to its end, keeping the first [`MESSAGES_KEPT_AT_MOST`] bytes.
async fn read_capped(pipe: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    pipe.take(MESSAGES_KEPT_AT_MOST).read_to_end(&mut kept).await?;
    tokio::io::copy(pipe, &mut tokio::io::sink()).await?;
    Ok(kept)
}

/// nginx's stderr lines without the `nginx: ` prefix.
fn nginx_messages(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("nginx: ").unwrap_or(l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_is_told_apart_from_wrappers() {
        let cmd = |argv: &[&str]| NginxCommand::custom(argv.iter().map(OsString::from).collect());
        assert!(cmd(&["nginx", "-g", "daemon off;"]).is_nginx());
        assert!(cmd(&["/usr/sbin/nginx"]).is_nginx());
        assert!(cmd(&["/usr/local/openresty/bin/openresty"]).is_nginx());
        assert!(!cmd(&["/nginx-ingress-controller"]).is_nginx());
        assert!(!cmd(&["sh", "-c", "exec nginx"]).is_nginx());
        assert!(NginxCommand::bundled(Path::new("/x/nginx.conf")).is_nginx());
    }

    #[test]
    fn a_directive_joins_the_existing_g() {
        let cmd = |argv: &[&str]| NginxCommand::custom(argv.iter().map(OsString::from).collect());
        let args = |c: NginxCommand| {
            c.argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            args(
                cmd(&["nginx", "-g", "daemon off;", "-c", "x"]).with_directive("worker_shutdown_timeout 5s;")
            ),
            [
                "nginx",
                "-g",
                "daemon off; worker_shutdown_timeout 5s;",
                "-c",
                "x"
            ]
        );
        assert_eq!(
            args(cmd(&["nginx"]).with_directive("a 1;")),
            ["nginx", "-g", "a 1;"]
        );
        assert!(
            cmd(&["nginx", "-g", "daemon off; worker_shutdown_timeout 9s;"])
                .directives_set("worker_shutdown_timeout")
        );
        assert!(!cmd(&["nginx", "-g", "daemon off;"]).directives_set("worker_shutdown_timeout"));
    }

    #[tokio::test]
    async fn only_the_lines_the_supervisor_reads_are_kept_of_a_dump() {
        let long = format!("map $a $b {{ {} }}\n", "x".repeat(DUMP_LINE_AT_MOST as usize * 2));
        let dump = format!(
            "# configuration file /etc/nginx/nginx.conf:\n# daemon on;\ndaemon off;\n{long}\
             events {{}}\n    worker_shutdown_timeout 10s;\n  if (-f /run/nginx-graceful/draining) {{\n\
             # configuration file /etc/nginx/conf.d/a.conf:\nserver {{ listen 8080; }}\n"
        );
        let kept = read_dump(dump.as_bytes()).await.unwrap();
        assert_eq!(
            kept,
            "# configuration file /etc/nginx/nginx.conf:\ndaemon off;\n    worker_shutdown_timeout 10s;\n\
             \x20 if (-f /run/nginx-graceful/draining) {\n# configuration file /etc/nginx/conf.d/a.conf:\n"
        );
    }

    #[tokio::test]
    async fn a_dump_of_any_size_keeps_at_most_its_bound() {
        let line = "listen 8080;\n";
        let dump = line.repeat(2 * DUMP_KEPT_AT_MOST / line.len());
        let kept = read_dump(dump.as_bytes()).await.unwrap();
        assert!(kept.len() <= DUMP_KEPT_AT_MOST && kept.len() > DUMP_KEPT_AT_MOST - line.len());
    }

    #[test]
    fn nginx_messages_lose_their_prefix() {
        let stderr = "nginx: [emerg] unknown directive \"foo\" in /x.conf:3\nnginx: configuration file /x.conf test failed\n\n";
        assert_eq!(
            nginx_messages(stderr),
            [
                "[emerg] unknown directive \"foo\" in /x.conf:3",
                "configuration file /x.conf test failed"
            ]
        );
    }
}
