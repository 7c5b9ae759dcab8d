//! Config changes in, one reload trigger out: the directories of every config file are watched
//! (inotify), events on files that are not the config (nginx's logs beside it) are dropped, a
//! burst of changes is coalesced, and only a change of contents counts.
//!
//! Directories, not files: a Kubernetes ConfigMap volume changes by swapping its `..data`
//! symlink, and an editor saves by renaming a temporary file over the old one; a watch on the
//! file itself would miss both.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A running watch: each message on `changes` is one change of contents. The watching runs
/// in a task of its own, so that the supervisor's `select!` can be woken by anything else
/// without losing a change half-way through its debounce.
pub struct ConfigWatch {
    pub changes: mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the watch listens to: the directories of the config, and which of their files are
/// the config. Only an event on one of those counts, so that nginx's own writes (an access log
/// beside the config) never postpone a reload.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    dirs: Vec<PathBuf>,
    /// The files nginx read at start (`nginx -T` prints `# configuration file PATH:` before each).
    read: BTreeSet<PathBuf>,
    /// Its `include` patterns, absolute: a new file one of them matches is config too.
    includes: Vec<PathBuf>,
    /// Files and directories given with `--watch`: all of it is config but what nginx writes.
    given: Vec<PathBuf>,
    /// What nginx writes (logs, pid and lock files), as patterns where a path has variables.
    written: Vec<PathBuf>,
}

const CERTIFICATE_DIRECTIVES: [&str; 7] = [
    "ssl_certificate",
    "ssl_certificate_key",
    "ssl_trusted_certificate",
    "ssl_client_certificate",
    "ssl_crl",
    "ssl_dhparam",
    "ssl_password_file",
];

/// What to watch for a config dump (of `nginx -T`) and the paths given with `--watch`.
pub fn dirs_to_watch(config_dump: &str, extra: &[PathBuf]) -> Watched {
    let config_files: Vec<PathBuf> = config_dump
        .lines()
        .filter_map(|line| line.strip_prefix("# configuration file ")?.strip_suffix(':'))
        .map(PathBuf::from)
        .collect();
    // nginx reads a relative path against the directory of its main config, the first listed.
    let conf_dir = config_files
        .first()
        .and_then(|main| main.parent())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let paths_of = |directives: &[&str]| -> Vec<PathBuf> {
        directive_args(config_dump, directives)
            .into_iter()
            .filter(|arg| !arg.contains(':') && arg != "off" && arg != "stderr")
            .map(|arg| conf_dir.join(arg))
            .collect()
    };
    // Certificates and keys are read when the config loads: a renewed one needs a reload (one
    // named with a variable is read at each handshake).
    let read: BTreeSet<PathBuf> = paths_of(&CERTIFICATE_DIRECTIVES)
        .into_iter()
        .filter(|path| !path.to_string_lossy().contains('$'))
        .chain(config_files.iter().cloned())
        .collect();
    let dirs: BTreeSet<PathBuf> = config_files
        .iter()
        .filter_map(|file| file.parent().map(Path::to_path_buf))
        .chain(extra.iter().map(|p| {
            if p.is_file() {
                p.parent().unwrap_or(p).to_path_buf()
            } else {
                p.clone()
            }
        }))
        .collect();
    Watched {
        dirs: dirs.into_iter().collect(),
        read,
        includes: paths_of(&["include"]),
        given: extra.to_vec(),
        written: paths_of(&["access_log", "error_log", "pid", "lock_file"])
            .iter()
            .map(|path| variables_as_wildcards(path))
            .collect(),
    }
}

impl Watched {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Whether a change of `path` may be a change of the config.
    pub fn counts(&self, path: &Path) -> bool {
        // nginx read it as config: whatever a log path with variables may match.
        if self.read.contains(path) {
            return true;
        }
        if self.written.iter().any(|pattern| matches(pattern, path)) {
            return false;
        }
        let config_like = is_config_like(path);
        is_volume_update(path)
            || (config_like && self.includes.iter().any(|pattern| matches(pattern, path)))
            || (config_like
                && self
                    .given
                    .iter()
                    .any(|given| given == path || path.parent() == Some(given)))
    }
}

/// A ConfigMap or Secret volume updates by writing a `..2026_...` directory and renaming a new
/// `..data` link over the old one; the config files are links through `..data`.
fn is_volume_update(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| name.starts_with(".."))
}

/// The first argument of each of `directives` in a config dump, outside comments, unquoted.
/// Line by line, as `nginx -T` prints each file as written: good enough for the paths of
/// `include`, logs and pid files, which take one line each.
fn directive_args(config_dump: &str, directives: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    for line in config_dump.lines() {
        let code = line.split('#').next().unwrap_or_default();
        let mut words = code
            .split(|c: char| c.is_whitespace() || matches!(c, ';' | '{' | '}'))
            .filter(|w| !w.is_empty());
        while let Some(word) = words.next() {
            if directives.contains(&word)
                && let Some(arg) = words.next()
            {
                args.push(arg.trim_matches(|c| c == '"' || c == '\'').to_owned());
            }
        }
    }
    args
}

/// `/var/log/$host.log` is written as any file that `/var/log/*.log` matches.
fn variables_as_wildcards(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        out.push('*');
        if chars.peek() == Some(&'{') {
            chars.by_ref().find(|&c| c == '}');
        } else {
            while chars
                .next_if(|c| c.is_ascii_alphanumeric() || *c == '_')
                .is_some()
            {}
        }
    }
    PathBuf::from(out)
}

/// Whether `path` is what `pattern` names: the same directory, and a file name that matches
/// with glob's `*` and `?` (no leading dot, as glob, which nginx's `include` uses). A pattern
/// with wildcards in a directory matches nothing here: the files it took at start are in the
/// dump.
fn matches(pattern: &Path, path: &Path) -> bool {
    let (Some(want), Some(name)) = (pattern.file_name(), path.file_name()) else {
        return false;
    };
    let (want, name) = (want.to_string_lossy(), name.to_string_lossy());
    pattern.parent() == path.parent()
        && (want.starts_with('.') || !name.starts_with('.'))
        && wildcard(want.as_bytes(), name.as_bytes())
}

fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            wildcard(rest, name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, name_rest))) => wildcard(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) => p == n && wildcard(rest, name_rest),
        _ => false,
    }
}

/// What the config files in `watched` hold, names and contents, through symlinks (a
/// ConfigMap's files are links into its `..2026_...` data).
pub fn contents_hash(watched: &Watched) -> u64 {
    let mut hasher = DefaultHasher::new();
    for dir in &watched.dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        names.sort();
        for path in names.into_iter().filter(|p| watched.counts(p)) {
            // `metadata` follows symlinks: a link to a file counts as that file.
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                path.hash(&mut hasher);
                hash_file(&path, &mut hasher);
            }
        }
    }
    hasher.finish()
}

/// Hashes a file's contents a piece at a time: a config of many megabytes is never held whole.
fn hash_file(path: &Path, hasher: &mut DefaultHasher) {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(path) else {
        return;
    };
    let mut piece = [0u8; 64 * 1024];
    loop {
        match file.read(&mut piece) {
            Ok(0) | Err(_) => return,
            Ok(n) => hasher.write(&piece[..n]),
        }
    }
}

/// Files that change while nginx runs without being its config: its pid file and logs, and an
/// editor's swap and backup files.
fn is_config_like(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let runtime = [".pid", ".oldbin", ".log", ".sock", ".lock", ".swp", "~"];
    // The supervisor's own files, when the bundled config sits in the runtime directory.
    let ours = [
        "draining",
        "lock",
        "drain.lock",
        "drain-outcome.json",
        "control.sock",
    ];
    !name.starts_with('.')
        && !name.starts_with('#')
        && !name.contains(".log.")
        && !ours.contains(&name)
        && !runtime.iter().any(|suffix| name.ends_with(suffix))
}

impl ConfigWatch {
    pub fn start(watched: Watched, debounce: Duration) -> notify::Result<Self> {
        let (tx, mut events) = mpsc::unbounded_channel();
        let filter = watched.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads are events too (our own hashing, nginx -T): only writes and renames count,
            // and only of the config's files.
            let counts = event.is_ok_and(|e| {
                let kind = match e.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                };
                kind && e.paths.iter().any(|path| filter.counts(path))
            });
            if counts {
                let _ = tx.send(());
            }
        })?;
        for dir in watched.dirs() {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        tracing::info!(dirs = ?watched.dirs(), "watching the nginx config for changes");
        let (changes_tx, changes) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            // Owned here: dropping the task (a drain has begun) closes the inotify instance.
            let _watcher = watcher;
            let mut contents = hash_off_thread(&watched).await;
            while events.recv().await.is_some() {
                // Coalesce the burst: wait until it has been quiet for the debounce.
                while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
                let now = hash_off_thread(&watched).await;
                if now == contents {
                    tracing::debug!("config files touched, contents unchanged: no reload");
                    continue;
                }
                contents = now;
                // A change already waiting to be taken covers this one too.
                let _ = changes_tx.try_send(());
            }
        });
        Ok(Self { changes, task })
    }
}

/// Reading files is blocking I/O: kept off the supervisor's thread.
async fn hash_off_thread(watched: &Watched) -> u64 {
    let watched = watched.clone();
    tokio::task::spawn_blocking(move || contents_hash(&watched))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dump_names_every_directory_to_watch() {
        let dump = "# configuration file /etc/nginx/nginx.conf:\nhttp { include conf.d/*.conf; }\n\n\
                    # configuration file /etc/nginx/conf.d/site.conf:\nserver {}\n\n\
                    # configuration file /etc/nginx/mime.types:\ntypes {}\n";
        let watched = dirs_to_watch(dump, &[PathBuf::from("/srv/extra/")]);
        assert_eq!(
            watched.dirs(),
            [
                Path::new("/etc/nginx"),
                Path::new("/etc/nginx/conf.d"),
                Path::new("/srv/extra")
            ]
        );
    }

    #[test]
    fn runtime_files_beside_the_config_do_not_count() {
        for (name, counts) in [
            ("nginx.conf", true),
            ("mime.types", true),
            ("site", true),
            ("nginx.pid", false),
            ("nginx.pid.oldbin", false),
            ("error.log", false),
            (".nginx.conf.swp", false),
            ("nginx.conf~", false),
            ("access.log.1", false),
            ("#nginx.conf#", false),
            ("draining", false),
            ("drain-outcome.json", false),
        ] {
            assert_eq!(is_config_like(Path::new(name)), counts, "{name}");
        }
    }

    #[test]
    fn only_the_config_counts_never_what_nginx_writes() {
        let dump = "# configuration file /etc/nginx/nginx.conf:\n\
                    pid /run/nginx.pid; error_log /etc/nginx/error;\n\
                    http { include conf.d/*.conf; include /etc/nginx/mime.types;\n\
                    ssl_certificate conf.d/tls.crt; ssl_certificate_key $host.key;\n\
                    access_log /etc/nginx/conf.d/access.conf; # include /etc/nginx/off/*;\n\
                    server { access_log \"/etc/nginx/$host.conf\" main; }\n}\n\
                    # configuration file /etc/nginx/mime.types:\ntypes {}\n\
                    # configuration file /etc/nginx/conf.d/site.conf:\nserver {}\n";
        let watched = dirs_to_watch(dump, &[PathBuf::from("/srv/certs")]);
        for (path, counts) in [
            ("/etc/nginx/nginx.conf", true),
            ("/etc/nginx/mime.types", true),
            ("/etc/nginx/conf.d/site.conf", true),
            // A new file the include pattern takes.
            ("/etc/nginx/conf.d/new.conf", true),
            ("/etc/nginx/conf.d/.new.conf.swp", false),
            ("/etc/nginx/conf.d/notes.txt", false),
            // A certificate the config loads, beside it.
            ("/etc/nginx/conf.d/tls.crt", true),
            ("/etc/nginx/example.org.key", false),
            // A ConfigMap volume's update.
            ("/etc/nginx/conf.d/..data", true),
            ("/etc/nginx/conf.d/..2026_11_30_22_00_00.123", true),
            // What nginx writes, whatever it is named.
            ("/etc/nginx/conf.d/access.conf", false),
            ("/etc/nginx/error", false),
            ("/etc/nginx/example.org.conf", false),
            ("/etc/nginx/access.log", false),
            ("/etc/nginx/off/x.conf", false),
            // Everything given with --watch, but what is not config-like.
            ("/srv/certs/tls.crt", true),
            ("/srv/certs/renew.log", false),
        ] {
            assert_eq!(watched.counts(Path::new(path)), counts, "{path}");
        }
    }

    #[test]
    fn variables_in_a_log_path_match_any_name() {
        for (pattern, path, matched) in [
            ("/var/log/$host.log", "/var/log/example.org.log", true),
            ("/var/log/${host}_access", "/var/log/a_access", true),
            ("/var/log/$host.log", "/var/log/sub/example.org.log", false),
            ("/etc/nginx/conf.d/*.conf", "/etc/nginx/conf.d/a.conf", true),
            ("/etc/nginx/conf.d/*.conf", "/etc/nginx/conf.d/a.conf.bak", false),
            (
                "/etc/nginx/conf.d/site?.conf",
                "/etc/nginx/conf.d/site1.conf",
                true,
            ),
            ("/etc/nginx/conf.d/*", "/etc/nginx/conf.d/.hidden", false),
        ] {
            let pattern = variables_as_wildcards(Path::new(pattern));
            assert_eq!(matches(&pattern, Path::new(path)), matched, "{pattern:?} {path}");
        }
    }

    #[test]
    fn only_contents_change_the_hash() {
        let dir = std::env::temp_dir().join(format!("ng-watch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..data_dir")).unwrap();
        std::fs::write(dir.join("..data_dir/nginx.conf"), "a").unwrap();
        std::os::unix::fs::symlink(dir.join("..data_dir/nginx.conf"), dir.join("nginx.conf")).unwrap();
        let dump = format!("# configuration file {}/nginx.conf:\n", dir.display());
        let watched = dirs_to_watch(&dump, &[]);
        let first = contents_hash(&watched);
        // Touching without a change changes nothing.
        std::fs::write(dir.join("..data_dir/nginx.conf"), "a").unwrap();
        assert_eq!(contents_hash(&watched), first);
        // Nor does a file that is not the config.
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        assert_eq!(contents_hash(&watched), first);
        // A change behind the symlink counts.
        std::fs::write(dir.join("..data_dir/nginx.conf"), "b").unwrap();
        assert_ne!(contents_hash(&watched), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
