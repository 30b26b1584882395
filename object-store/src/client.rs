//! [`StoreClient`]: how a process on the node other than the store's owner (a worker,
//! the driver) reads and writes objects, knowing only the store directory.
//!
//! Reads map the sealed file directly: no call to the owner. Writes go into the
//! `.unsealed` file; the owner (node daemon) seals it, which is the step that accounts
//! the bytes against capacity and may spill other objects. The preferred order is
//! owner `create` (reserves capacity first) → client `write_unsealed` → owner `seal`;
//! a client may also create the unsealed file itself, and the owner accounts it at seal.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use ionet::ObjectId;

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::layout;
use crate::view::ObjectView;

/// A handle on a store directory owned by another process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreClient {
    dir: PathBuf,
}

impl StoreClient {
    /// Opens the store directory `dir` (as given by `LocalObjectStore::dir`).
    pub fn open(dir: impl Into<PathBuf>) -> ObjectStoreResult<StoreClient> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(ObjectStoreError::io_at(
                "open store directory",
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        Ok(StoreClient { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the object is sealed and in memory (a spilled object is not: ask the owner
    /// to restore it).
    pub fn contains(&self, id: &ObjectId) -> bool {
        layout::sealed_path(&self.dir, id).exists()
    }

    /// Maps a sealed, in-memory object read-only. `NotFound` if it is absent, unsealed,
    /// or spilled (the owner's `get` restores spilled objects).
    pub fn map(&self, id: &ObjectId) -> ObjectStoreResult<ObjectView> {
        ObjectView::map_file(*id, &layout::sealed_path(&self.dir, id))
    }

    /// Writes an object of `size` bytes through a writable shared mapping: `fill` gets
    /// the whole buffer. Uses the unsealed file the owner created for it, or creates one.
    /// The object is not readable until the owner seals it.
    pub fn write_unsealed<R>(
        &self,
        id: &ObjectId,
        size: u64,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> ObjectStoreResult<R> {
        if self.contains(id) {
            return Err(ObjectStoreError::AlreadyExists { id: *id });
        }
        let path = layout::unsealed_path(&self.dir, id);
        let file = open_unsealed(*id, &path, size)?;
        let mut map = layout::map_writable(&file, size, &path)?;
        let result = fill(map.as_deref_mut().unwrap_or(&mut []));
        Ok(result)
    }
}

/// Opens the unsealed file the owner created (checking its size), or creates it.
fn open_unsealed(id: ObjectId, path: &Path, size: u64) -> ObjectStoreResult<File> {
    match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
        Ok(file) => {
            if let Err(err) = layout::allocate(&file, size, path) {
                let _ = layout::remove_if_present(path);
                return Err(err);
            }
            Ok(file)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|err| ObjectStoreError::io_at("open", path, err))?;
            let actual = file.metadata().map_err(|err| ObjectStoreError::io_at("stat", path, err))?.len();
            if actual != size {
                return Err(ObjectStoreError::SizeMismatch { id, expected: size, actual });
            }
            Ok(file)
        }
        Err(err) => Err(ObjectStoreError::io_at("create", path, err)),
    }
}
