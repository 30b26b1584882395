//! The on-disk layout of a store directory, shared by the owning store and by clients in
//! other processes, which know nothing but the directory path.
//!
//! - `<dir>/<object id hex>`: a sealed object, immutable: mode 0444, or 0440 readable by
//!   its account's group when the store's users are separate (a root daemon's jobs).
//! - `<dir>/<object id hex>.unsealed`: an object being written (sized up front).
//! - `<dir>/<object id hex>.restoring`: a spilled object being copied back.
//!
//! Publication is a `rename` from `.unsealed` to the bare name, atomic within the
//! directory, so a reader either finds no file or the complete object.

use std::fs::{self, File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use ionet_common::ObjectId;
use memmap2::{MmapMut, MmapOptions};

use crate::error::{ObjectStoreError, ObjectStoreResult};

pub(crate) fn sealed_path(dir: &Path, id: &ObjectId) -> PathBuf {
    dir.join(id.hex())
}

pub(crate) fn unsealed_path(dir: &Path, id: &ObjectId) -> PathBuf {
    dir.join(format!("{}.unsealed", id.hex()))
}

pub(crate) fn restoring_path(dir: &Path, id: &ObjectId) -> PathBuf {
    dir.join(format!("{}.restoring", id.hex()))
}

/// Sizes a fresh file and allocates its pages now, so that running out of tmpfs space is
/// an error here instead of a SIGBUS on the first write through a mapping.
pub(crate) fn allocate(file: &File, size: u64, path: &Path) -> ObjectStoreResult<()> {
    if size == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(size).map_err(|_| {
        ObjectStoreError::io_at(
            "size",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "size overflows off_t"),
        )
    })?;
    // SAFETY: plain syscall on a file descriptor we own; posix_fallocate returns the
    // error number instead of setting errno.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(ObjectStoreError::io_at(
            &format!("allocate {size} bytes for"),
            path,
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// Maps a sized, unsealed file writable (shared, so other processes see the bytes).
pub(crate) fn map_writable(file: &File, size: u64, path: &Path) -> ObjectStoreResult<Option<MmapMut>> {
    if size == 0 {
        return Ok(None);
    }
    // SAFETY: the unsealed file is written only by the one process that created it or
    // was handed it for writing; nobody reads it before it is sealed.
    // Populated: one kernel call faults in every (already allocated) page, instead of
    // one fault per page during the write.
    let map = unsafe { MmapOptions::new().len(size as usize).populate().map_mut(file) }
        .map_err(|err| ObjectStoreError::io_at("map", path, err))?;
    Ok(Some(map))
}

/// Makes `from` read-only (`mode`) and renames it to `to`: the atomic publication step.
pub(crate) fn publish(from: &Path, to: &Path, mode: u32) -> ObjectStoreResult<()> {
    fs::set_permissions(from, Permissions::from_mode(mode))
        .map_err(|err| ObjectStoreError::io_at("make read-only", from, err))?;
    fs::rename(from, to).map_err(|err| ObjectStoreError::io_at("publish", to, err))
}

/// Opens the file under `path` to seal it, never through a link: a regular file with
/// one name, and its metadata (from the descriptor).
pub(crate) fn open_to_seal(path: &Path) -> ObjectStoreResult<(File, fs::Metadata)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| ObjectStoreError::io_at("open to seal", path, err))?;
    let opened = file.metadata().map_err(|err| ObjectStoreError::io_at("stat", path, err))?;
    if !opened.file_type().is_file() || opened.nlink() != 1 {
        return Err(ObjectStoreError::io_at(
            "seal",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file of one name"),
        ));
    }
    Ok((file, opened))
}

/// Makes the open `file` the store's user's, its group `group` (else the store's), mode
/// `mode`: through the descriptor, whatever its name now points at.
pub(crate) fn take_for_group(file: &File, path: &Path, group: Option<u32>, mode: u32) -> ObjectStoreResult<()> {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::fchown(file, Some(uid), Some(group.unwrap_or(gid)))
        .map_err(|err| ObjectStoreError::io_at("take", path, err))?;
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|err| ObjectStoreError::io_at("make read-only", path, err))
}

/// Whether `path` itself (not a link's target) is the file whose metadata is `opened`.
pub(crate) fn still_named_exactly(path: &Path, opened: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).is_ok_and(|named| named.dev() == opened.dev() && named.ino() == opened.ino())
}

/// Copies `from` into a new file at `to` (mode 0600; failing if anything is there, a
/// link included); the new file.
pub(crate) fn copy_into_new(from: &Path, to: &Path) -> ObjectStoreResult<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(|err| ObjectStoreError::io_at("create", to, err))?;
    let mut source = File::open(from).map_err(|err| ObjectStoreError::io_at("open", from, err))?;
    std::io::copy(&mut source, &mut out).map_err(|err| ObjectStoreError::io_at("restore into", to, err))?;
    Ok(out)
}

/// Makes `path`'s group `group` (its readers, once sealed 0440).
pub(crate) fn give_to_group(path: &Path, group: u32) -> ObjectStoreResult<()> {
    std::os::unix::fs::chown(path, None, Some(group)).map_err(|err| ObjectStoreError::io_at("give", path, err))
}

/// Takes a shared `flock` on a sealed object's file without waiting: `false` while the
/// store holds the exclusive lock (it is recycling the file: the object is gone).
pub(crate) fn lock_shared(file: &File) -> bool {
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
}

/// Takes the exclusive `flock` without waiting: `true` when no view in any process holds
/// the file, so its pages may be reused for another object. Released when `file` closes.
pub(crate) fn lock_for_reuse(file: &File) -> bool {
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Releases a lock taken by [`lock_for_reuse`] (the file is about to become an object).
pub(crate) fn unlock(file: &File) {
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// Whether `path` still names the open file whose metadata is `opened` (same device
/// and inode).
pub(crate) fn still_named(path: &Path, opened: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).is_ok_and(|named| named.dev() == opened.dev() && named.ino() == opened.ino())
}

/// `<dir>/free-<n>`: the file of a deleted object, kept allocated for a new one.
pub(crate) fn free_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("free-{n}"))
}

/// Removes a file if present; a file that is still mapped by a reader stays readable
/// through that mapping (Linux frees the pages when the last mapping goes).
pub(crate) fn remove_if_present(path: &Path) -> ObjectStoreResult<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(ObjectStoreError::io_at("remove", path, err)),
    }
}
