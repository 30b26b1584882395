//! [`StoreClient`]: how a process on the node other than the store's owner (a worker,
//! the driver) reads and writes objects, knowing only the store directory.
//!
//! Reads map the sealed file directly: no call to the owner. Writes go into the
//! `.unsealed` file; the owner (node daemon) seals it, which is the step that accounts
//! the bytes against capacity and may spill other objects. The preferred order is
//! owner `create` (reserves capacity first) → client `write_unsealed` → owner `seal`;
//! a client may also create the unsealed file itself, and the owner accounts it at seal.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

use ionet_common::ObjectId;

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::layout;
use crate::view::ObjectView;

/// A handle on a store directory owned by another process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreClient {
    dir: PathBuf,
    write_maps: Arc<Mutex<WriteMaps>>,
}

/// Writable mappings of files this client wrote, kept for when the store recycles the
/// file for a new object (see `store`): mapping 100 MiB and unmapping it again costs
/// more than copying it, so a recycled file already mapped here is written through the
/// old mapping. A mapping holds its file open, so an inode in this cache is never reused
/// for another file; an entry whose file was unlinked (not recycled) is dropped at the
/// next write, and the cache holds at most `WRITE_MAPS_MAX` mappings and
/// `WRITE_MAPS_MAX_BYTES`, the most memory of freed objects it can keep alive.
#[derive(Default)]
struct WriteMaps {
    entries: Vec<WriteMap>,
}

struct WriteMap {
    inode: (u64, u64),
    file: File,
    map: MmapMut,
}

const WRITE_MAPS_MAX: usize = 16;
const WRITE_MAPS_MAX_BYTES: usize = 2 << 30;
/// Smaller objects are cheap to map: not cached.
const WRITE_MAPS_MIN_BYTES: u64 = 1 << 20;

impl fmt::Debug for WriteMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteMaps").field("entries", &self.entries.len()).finish()
    }
}

impl WriteMaps {
    /// Drops the mappings of files that were unlinked, then takes the one of `inode` if
    /// it can hold `size` bytes.
    fn take(&mut self, inode: (u64, u64), size: u64) -> Option<WriteMap> {
        self.entries.retain(|entry| entry.file.metadata().is_ok_and(|meta| meta.nlink() > 0));
        let index = self.entries.iter().position(|entry| entry.inode == inode && entry.map.len() as u64 >= size)?;
        Some(self.entries.remove(index))
    }

    fn keep(&mut self, entry: WriteMap) {
        self.entries.retain(|old| old.inode != entry.inode);
        self.entries.push(entry);
        while self.entries.len() > WRITE_MAPS_MAX
            || self.entries.iter().map(|entry| entry.map.len()).sum::<usize>() > WRITE_MAPS_MAX_BYTES
        {
            self.entries.remove(0);
        }
    }
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
        Ok(StoreClient { dir, write_maps: Arc::default() })
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
        if size < WRITE_MAPS_MIN_BYTES {
            let mut map = layout::map_writable(&file, size, &path)?;
            return Ok(fill(map.as_deref_mut().unwrap_or(&mut [])));
        }
        let meta = file.metadata().map_err(|err| ObjectStoreError::io_at("stat", &path, err))?;
        let inode = (meta.dev(), meta.ino());
        let cached = self.write_maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take(inode, size);
        let mut entry = match cached {
            Some(entry) => entry,
            None => {
                let map = layout::map_writable(&file, size, &path)?.expect("a sized object has a mapping");
                WriteMap { inode, file, map }
            }
        };
        // Exactly the object's bytes: a recycled file may be shorter than the old mapping.
        let result = fill(&mut entry.map[..size as usize]);
        self.write_maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).keep(entry);
        Ok(result)
    }
}

/// Opens the unsealed file the owner created (checking its size), or creates it.
/// A file this process creates is its own alone until the owner seals it.
fn open_unsealed(id: ObjectId, path: &Path, size: u64) -> ObjectStoreResult<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path) {
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
