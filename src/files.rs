//! Opening walkie's files safely — the one place for it.
//!
//! - Inputs (the configuration, the state file, the API key file, the CA file) are opened
//!   non-blocking, must be regular files, and are read with a size cap: a FIFO, a device
//!   such as `/dev/zero` or a directory at one of those paths gets a clear error at once
//!   instead of a hang or gigabytes of reading.
//! - Private files walkie creates (the state file's temporary, the lock file) are created
//!   with an explicit mode whatever the umask, and never through a symbolic link.
//! - walkie's own directories (state, runtime, data) are 0700 and must belong to the user.
//! - A file moved aside never replaces another one.

use std::fmt;
use std::fs::{DirBuilder, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;

/// Why an input file was refused before reading it. Carried inside an `io::Error` (kind
/// `InvalidInput` or `FileTooLarge`), so callers report it like any other read error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A FIFO, a device, a socket or a directory where a file was expected.
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    /// Larger than walkie reads from such a file.
    #[error("is {}, more than the {} walkie reads from it", human_size(*.size), human_size(*.limit))]
    TooLarge { size: u64, limit: u64 },
}

impl From<Refused> for io::Error {
    fn from(refused: Refused) -> io::Error {
        let kind = match refused {
            Refused::NotRegular(_) => io::ErrorKind::InvalidInput,
            Refused::TooLarge { .. } => io::ErrorKind::FileTooLarge,
        };
        io::Error::new(kind, refused)
    }
}

/// The refusal inside `error`, if it is one of ours (not an error of the system).
pub fn refusal(error: &io::Error) -> Option<&Refused> {
    error.get_ref()?.downcast_ref::<Refused>()
}

/// Opens an input file for reading without blocking; anything but a regular file is
/// refused (a FIFO would block the open or the read, a device never ends).
pub fn open_regular(path: &Path) -> io::Result<(File, Metadata)> {
    // A look first: opening a device or a FIFO can have effects of its own.
    check_regular(&std::fs::metadata(path)?)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).bits())
        .open(path)?;
    // The check that counts is on what was opened: the path may have changed meanwhile.
    let meta = file.metadata()?;
    check_regular(&meta)?;
    Ok((file, meta))
}

/// Reads a whole input file of at most `limit` bytes (see [`open_regular`]).
pub fn read_capped(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, meta) = open_regular(path)?;
    check_size(&meta, limit)?;
    read_opened(file, limit)
}

/// Reads an input file opened by [`open_regular`], refusing more than `limit` bytes (the
/// file may grow after its size was looked at).
pub fn read_opened(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    let size = bytes.len() as u64;
    if size > limit {
        return Err(Refused::TooLarge { size, limit }.into());
    }
    Ok(bytes)
}

/// Refuses a file larger than `limit` bytes.
pub fn check_size(meta: &Metadata, limit: u64) -> io::Result<()> {
    if meta.len() > limit {
        return Err(Refused::TooLarge {
            size: meta.len(),
            limit,
        }
        .into());
    }
    Ok(())
}

/// Refuses anything but a regular file (a FIFO, a device, a directory), naming what it is.
pub fn check_regular(meta: &Metadata) -> Result<(), Refused> {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    };
    Err(Refused::NotRegular(what))
}

/// Creates a new private file for writing with exactly `mode`, whatever the umask. Fails
/// with `AlreadyExists` if anything is at `path` — a symbolic link planted there is never
/// followed.
pub fn create_new_private(path: &Path, mode: u32) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(path)?;
    // The umask may have taken bits away; the mode is set on the open file, not the path.
    file.set_permissions(Permissions::from_mode(mode))?;
    Ok(file)
}

/// Opens (or creates) a private read-write file that persists, such as the lock file:
/// never through a symbolic link, a regular file of this user, mode 0600 whatever the
/// umask or the mode an older walkie gave it.
pub fn open_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
        .open(path)?;
    let meta = file.metadata()?;
    check_regular(&meta)?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "belongs to uid {}, not to this user (uid {uid}); remove it",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o7777 != 0o600 {
        file.set_permissions(Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Why one of walkie's own directories cannot be used. walkie refuses to start (exit 1);
/// the user removes the directory or points the XDG variable elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error(
        "{dir} belongs to uid {owner}, not to this user (uid {uid}): walkie keeps its files only in a directory of its own; remove it, or point XDG_STATE_HOME / XDG_RUNTIME_DIR / XDG_DATA_HOME elsewhere"
    )]
    Foreign { dir: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{dir} is a symbolic link: walkie keeps its files only in a real directory of its own; replace it, or point XDG_STATE_HOME / XDG_RUNTIME_DIR / XDG_DATA_HOME at its target"
    )]
    Symlink { dir: PathBuf },
    #[error("{dir} is not a directory")]
    NotDirectory { dir: PathBuf },
}

/// Creates `dir` (and missing parents) with mode 0700, or checks the one that exists: it
/// must be a real directory (not a symbolic link) of this user, and is made 0700 if it was
/// open to others.
pub fn ensure_private_dir(dir: &Path) -> Result<(), DirError> {
    let io_error = |source| DirError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        // `create` fails with AlreadyExists when a file (or a dangling link) is there; the
        // open below tells which.
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(io_error(e));
        }
    }
    let handle = match OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(dir)
    {
        Ok(handle) => handle,
        Err(e) => {
            let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Err(if is_link {
                DirError::Symlink {
                    dir: dir.to_path_buf(),
                }
            } else if e.raw_os_error() == Some(nix::libc::ENOTDIR) {
                DirError::NotDirectory {
                    dir: dir.to_path_buf(),
                }
            } else {
                io_error(e)
            });
        }
    };
    // Checked and changed through the open directory: the path cannot be swapped between.
    let meta = handle.metadata().map_err(io_error)?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(DirError::Foreign {
            dir: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 {
        handle
            .set_permissions(Permissions::from_mode(0o700))
            .map_err(io_error)?;
        if mode & 0o077 != 0 {
            log::warn!(
                "{} was open to other users (mode {mode:04o}); walkie made it 0700",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Renames `from` to `to` unless something is already at `to` (then `AlreadyExists`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // Filesystems without RENAME_NOREPLACE: a link cannot replace either.
            Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// Moves `path` aside to `<path>.<label>-<unix seconds>` (with `-2`, `-3`, … when that name
/// is taken: two in the same second never overwrite each other); returns the new path.
pub fn move_aside(path: &Path, label: &str) -> io::Result<PathBuf> {
    let secs = crate::clock::unix_ms(std::time::SystemTime::now()) / 1000;
    for n in 1..=1000u32 {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{label}-{secs}"));
        if n > 1 {
            name.push(format!("-{n}"));
        }
        let to = PathBuf::from(name);
        match rename_noreplace(path, &to) {
            Ok(()) => return Ok(to),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "a thousand files were moved aside this second already",
    ))
}

/// `1.5 MB`, `64 KB`, `12 bytes` (powers of 1024, as `ls -h` does).
pub fn human_size(bytes: u64) -> HumanSize {
    HumanSize(bytes)
}

/// See [`human_size`].
pub struct HumanSize(u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
        if self.0 < 1024 {
            return write!(f, "{} bytes", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if value < 10.0 && value.fract() >= 0.05 {
            write!(f, "{value:.1} {}", UNITS[unit])
        } else {
            write!(f, "{value:.0} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn only_regular_files_are_read_and_only_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello").unwrap();
        assert_eq!(read_capped(&file, 5).unwrap(), b"hello");
        let error = read_capped(&file, 4).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::FileTooLarge);
        assert_eq!(
            error.to_string(),
            "is 5 bytes, more than the 4 bytes walkie reads from it"
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for (path, what) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let error = read_capped(path, 1 << 20).unwrap_err();
            assert_eq!(
                refusal(&error),
                Some(&Refused::NotRegular(what)),
                "{path:?}: {error}"
            );
            assert_eq!(error.to_string(), format!("is {what}, not a regular file"));
        }
        // A symbolic link to a regular file is read; one to a device is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(refusal(&read_capped(&link, 10).unwrap_err()).is_some());
        let missing = read_capped(&dir.path().join("missing"), 10).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(refusal(&missing).is_none());
    }

    #[test]
    fn private_files_have_their_mode_whatever_the_umask_and_never_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        create_new_private(&path, 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        // Something already there, even a dangling link: refused, nothing written through it.
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = create_new_private(&link, 0o600).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert!(!target.exists());
        assert!(open_private(&link).is_err());
        assert!(!target.exists());
        // An old lock file left 0666 is made 0600.
        let lock = dir.path().join("lock");
        std::fs::write(&lock, "").unwrap();
        std::fs::set_permissions(&lock, Permissions::from_mode(0o666)).unwrap();
        open_private(&lock).unwrap();
        assert_eq!(mode_of(&lock), 0o600);
    }

    #[test]
    fn private_dirs_are_made_0700_and_links_or_strangers_refused() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("a/b/walkie");
        ensure_private_dir(&new).unwrap();
        assert_eq!(mode_of(&new), 0o700);
        std::fs::set_permissions(&new, Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&new).unwrap();
        assert_eq!(mode_of(&new), 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        let error = ensure_private_dir(&link).unwrap_err();
        assert!(matches!(error, DirError::Symlink { .. }), "{error}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let error = ensure_private_dir(&file).unwrap_err();
        assert!(matches!(error, DirError::NotDirectory { .. }), "{error}");
        if nix::unistd::geteuid().is_root() {
            let foreign = dir.path().join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
            let error = ensure_private_dir(&foreign).unwrap_err();
            assert!(
                matches!(error, DirError::Foreign { owner: 4242, .. }),
                "{error}"
            );
            assert!(error.to_string().contains("uid 4242"), "{error}");
        }
    }

    #[test]
    fn moving_aside_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut moved = Vec::new();
        for i in 0..3 {
            std::fs::write(&path, format!("{i}")).unwrap();
            moved.push(move_aside(&path, "corrupt").unwrap());
            assert!(!path.exists());
        }
        for (i, p) in moved.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(p).unwrap(), format!("{i}"));
        }
        let target = dir.path().join("taken");
        std::fs::write(&target, "keep").unwrap();
        std::fs::write(&path, "new").unwrap();
        let error = rename_noreplace(&path, &target).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn sizes_read_like_ls() {
        assert_eq!(human_size(12).to_string(), "12 bytes");
        assert_eq!(human_size(64 * 1024).to_string(), "64 KB");
        assert_eq!(human_size(1536 * 1024).to_string(), "1.5 MB");
        assert_eq!(human_size(100 * 1024 * 1024).to_string(), "100 MB");
    }
}
