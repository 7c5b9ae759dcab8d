//! Config changes in, one reload trigger out: the directories of every config file are watched
//! (inotify), a burst of changes is coalesced, and only a change of contents counts.
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

/// The directories to watch: those of every file in a config dump (`nginx -T` prints
/// `# configuration file PATH:` before each file) and of the paths given.
pub fn dirs_to_watch(config_dump: &str, extra: &[PathBuf]) -> Vec<PathBuf> {
    let files = config_dump
        .lines()
        .filter_map(|line| line.strip_prefix("# configuration file ")?.strip_suffix(':'))
        .map(PathBuf::from);
    let dirs: BTreeSet<PathBuf> = files
        .filter_map(|file| file.parent().map(Path::to_path_buf))
        .chain(extra.iter().map(|p| {
            if p.is_file() {
                p.parent().unwrap_or(p).to_path_buf()
            } else {
                p.clone()
            }
        }))
        .collect();
    dirs.into_iter().collect()
}

/// What the files in `dirs` hold, names and contents, through symlinks; subdirectories (such
/// as a ConfigMap's `..2026_...` data) count through the links that point into them.
pub fn contents_hash(dirs: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        names.sort();
        for path in names.into_iter().filter(|p| is_config_like(p)) {
            // `metadata` follows symlinks: a link to a file counts as that file.
            if std::fs::metadata(&path).is_ok_and(|m| m.is_file())
                && let Ok(bytes) = std::fs::read(&path)
            {
                path.hash(&mut hasher);
                bytes.hash(&mut hasher);
            }
        }
    }
    hasher.finish()
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
    pub fn start(dirs: Vec<PathBuf>, debounce: Duration) -> notify::Result<Self> {
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads are events too (our own hashing, nginx -T): only writes and renames count.
            let counts = event.is_ok_and(|e| match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            });
            if counts {
                let _ = tx.send(());
            }
        })?;
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        tracing::info!(dirs = ?dirs, "watching the nginx config for changes");
        let (changes_tx, changes) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            // Owned here: dropping the task (a drain has begun) closes the inotify instance.
            let _watcher = watcher;
            let mut contents = hash_off_thread(&dirs).await;
            while events.recv().await.is_some() {
                // Coalesce the burst: wait until it has been quiet for the debounce.
                while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
                let now = hash_off_thread(&dirs).await;
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
async fn hash_off_thread(dirs: &[PathBuf]) -> u64 {
    let dirs = dirs.to_vec();
    tokio::task::spawn_blocking(move || contents_hash(&dirs))
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
        let dirs = dirs_to_watch(dump, &[PathBuf::from("/srv/extra/")]);
        assert_eq!(
            dirs,
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
    fn only_contents_change_the_hash() {
        let dir = std::env::temp_dir().join(format!("ng-watch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..data_dir")).unwrap();
        std::fs::write(dir.join("..data_dir/nginx.conf"), "a").unwrap();
        std::os::unix::fs::symlink(dir.join("..data_dir/nginx.conf"), dir.join("nginx.conf")).unwrap();
        let dirs = vec![dir.clone()];
        let first = contents_hash(&dirs);
        // Touching without a change changes nothing.
        std::fs::write(dir.join("..data_dir/nginx.conf"), "a").unwrap();
        assert_eq!(contents_hash(&dirs), first);
        // A change behind the symlink counts.
        std::fs::write(dir.join("..data_dir/nginx.conf"), "b").unwrap();
        assert_ne!(contents_hash(&dirs), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
