//! The small files of directories other processes can write (nginx's pid file; the runtime
//! directory, an emptyDir of mode 777 in a pod), trusting nothing: a FIFO must not block, a
//! symlink must not redirect a write, and `/dev/zero` must not fill memory.

use std::fs::{File, FileType, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a small file was not read.
#[derive(Debug)]
pub enum SmallFileError {
    /// It could not be opened or read (`NotFound` included).
    Io(std::io::Error),
    /// A FIFO, a device, a directory, a socket: what it is.
    NotRegular(&'static str),
    /// It holds more than the limit, in bytes.
    TooLarge(usize),
}

impl std::fmt::Display for SmallFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(err) => write!(f, "{err}"),
            Self::NotRegular(what) => write!(f, "it is {what}, not a regular file"),
            Self::TooLarge(limit) => write!(f, "it holds more than {limit} bytes"),
        }
    }
}

impl SmallFileError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(err) if err.kind() == std::io::ErrorKind::NotFound)
    }
}

impl From<std::io::Error> for SmallFileError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

/// Reads `path`, a regular file of at most `limit` bytes, as text (invalid UTF-8 replaced).
pub fn read(path: &Path, limit: usize) -> Result<String, SmallFileError> {
    // Checked before the open too: opening some devices has effects of its own.
    regular(std::fs::metadata(path)?.file_type())?;
    // Non-blocking: a FIFO swapped in after the check must not hang the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    regular(file.metadata()?.file_type())?;
    read_at_most(file, limit)
}

fn read_at_most(file: File, limit: usize) -> Result<String, SmallFileError> {
    let mut bytes = Vec::with_capacity(limit.min(4096) + 1);
    file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(SmallFileError::TooLarge(limit));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn regular(kind: FileType) -> Result<(), SmallFileError> {
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(SmallFileError::NotRegular(what))
}

/// Creates `path` afresh with `bytes`: whatever another process put at that name (a FIFO, a
/// symlink) is removed first, and the open neither follows a link nor blocks.
pub fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    file.write_all(bytes)
}

/// Opens (creating it if need be) a lock file, refusing anything that is not a regular file.
pub fn open_lock(path: &Path) -> std::io::Result<File> {
    let not_regular =
        || std::io::Error::other(format!("{} is not a regular file; remove it", path.display()));
    // Checked first for a clear error; the flags below cover a swap after the check.
    if std::fs::symlink_metadata(path).is_ok_and(|meta| !meta.is_file()) {
        return Err(not_regular());
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("ng-small-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nginx.pid");
        std::fs::write(&file, "1234\n").unwrap();
        assert_eq!(read(&file, 64).unwrap(), "1234\n");
        std::fs::write(&file, "x".repeat(65)).unwrap();
        assert!(matches!(read(&file, 64), Err(SmallFileError::TooLarge(64))));

        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let refused = read(&fifo, 64).unwrap_err();
        assert_eq!(refused.to_string(), "it is a FIFO, not a regular file");
        let refused = read(Path::new("/dev/zero"), 64).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "it is a character device, not a regular file"
        );
        assert!(matches!(
            read(&dir, 64),
            Err(SmallFileError::NotRegular("a directory"))
        ));
        assert!(read(&dir.join("missing"), 64).unwrap_err().is_not_found());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
