//! Files that hold secrets or that other users must not plant: created once, never
//! through a symbolic link, readable by their owner only.
//!
//! A new file is opened with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600, so a file or
//! link someone placed at the path first makes the write fail instead of being followed
//! or reused; a directory is created (or checked) with mode 0700.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to a new file at `path`, mode 0600; fails if anything is there.
pub fn write_new_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Creates the file at `path` with `contents`, mode 0600, appearing whole or not at all:
/// written to a new private file beside it, then hard-linked into place (which fails if
/// anything is there: `AlreadyExists`, and the existing file is left alone).
pub fn create_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("file");
    let staging = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    let _ = fs::remove_file(&staging);
    write_new_private(&staging, contents)?;
    let linked = fs::hard_link(&staging, path);
    let _ = fs::remove_file(&staging);
    linked
}

/// Replaces the file at `path` with `contents`, mode 0600, atomically: written to a new
/// private file beside it, then renamed over it (a link at `path` is replaced, not
/// followed).
pub fn replace_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|name| name.to_str()).unwrap_or("file");
    let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&staging);
    write_new_private(&staging, contents)?;
    fs::rename(&staging, path)
}

/// Why a file is not private: what [`read_private`] refuses.
#[derive(Debug)]
pub enum NotPrivate {
    /// It could not be opened or read (missing: `NotFound`; a link: refused as `ELOOP`).
    Io(io::Error),
    /// It is another user's, or others may read or write it (mode shown, octal).
    Exposed(String),
}

/// The bytes of the private file at `path`, read through one descriptor (so the file
/// checked is the file read): never through a symbolic link, and only a regular file of
/// this user's that no one else may read or write.
pub fn read_private(path: &Path) -> Result<Vec<u8>, NotPrivate> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file =
        fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(NotPrivate::Io)?;
    let metadata = file.metadata().map_err(NotPrivate::Io)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !metadata.is_file() {
        return Err(NotPrivate::Exposed("not a regular file".into()));
    }
    if metadata.uid() != me {
        return Err(NotPrivate::Exposed(format!("belongs to uid {}, not this user ({me})", metadata.uid())));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NotPrivate::Exposed(format!("readable by others (mode {mode:o}); chmod 600 it")));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.read_to_end(&mut bytes).map_err(NotPrivate::Io)?;
    Ok(bytes)
}

/// Creates `dir` (and its parents) with mode 0700 for the directory itself; an existing
/// directory must belong to this user, and is narrowed to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    let metadata = fs::symlink_metadata(dir)?;
    if !metadata.is_dir() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory"));
    }
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("belongs to uid {}, not this user ({me})", metadata.uid()),
        ));
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_private_file_is_0600_and_never_reused_or_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new_private(&path, b"one").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(write_new_private(&path, b"two").unwrap_err().kind(), io::ErrorKind::AlreadyExists);

        let target = dir.path().join("elsewhere");
        let link = dir.path().join("planted");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write_new_private(&link, b"x").is_err(), "a planted link is not followed");
        assert!(!target.exists());

        assert_eq!(create_private(&path, b"four").unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let fresh = dir.path().join("fresh");
        create_private(&fresh, b"five").unwrap();
        assert_eq!(fs::read(&fresh).unwrap(), b"five");
        assert_eq!(fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "no staging file left behind");

        replace_private(&path, b"three").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_private_file_is_read_only_if_private_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new_private(&path, b"key").unwrap();
        assert_eq!(read_private(&path).unwrap(), b"key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_private(&path), Err(NotPrivate::Exposed(why)) if why.contains("644")));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(read_private(&link), Err(NotPrivate::Io(_))), "a link is never followed");
        let missing = read_private(&dir.path().join("missing"));
        assert!(matches!(missing, Err(NotPrivate::Io(err)) if err.kind() == io::ErrorKind::NotFound));
    }

    #[test]
    fn a_private_dir_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let session = dir.path().join("a").join("session");
        private_dir(&session).unwrap();
        assert_eq!(fs::metadata(&session).unwrap().permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&session, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&session).unwrap();
        assert_eq!(fs::metadata(&session).unwrap().permissions().mode() & 0o777, 0o700, "narrowed");
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
    }
}
