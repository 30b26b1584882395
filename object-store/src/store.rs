//! [`LocalObjectStore`]: the node-local store, owned by the node daemon.
//!
//! Every object is in one of these states; each transition happens under the one lock:
//!
//! | state | shm file | spill file | counted in `bytes_in_memory` |
//! | --- | --- | --- | --- |
//! | unsealed (being written) | `<id>.unsealed` | – | yes, from `create` on |
//! | sealed, in memory | `<id>` | maybe (an earlier spill) | yes |
//! | sealed, spilled | – | `<id>` in the spill dir | no |
//!
//! Invariants:
//! - `bytes_in_memory <= capacity` at all times: capacity is reserved *before* a file is
//!   allocated (`create`, restore, or the seal of a file a client made itself).
//! - Only sealed, in-memory, unpinned objects are spill candidates, least recently used
//!   first (`lru` holds exactly the sealed in-memory objects, keyed by last use).
//! - Objects are immutable once sealed, so a spill copy stays valid: an object restored
//!   to memory keeps it, and spilling it again only unlinks the shm file.
//!
//! Recycling: allocating and zeroing fresh tmpfs pages costs several times a memcpy, so
//! the file of a deleted object (1 MiB or more) is kept as `free-<n>`, still allocated,
//! and handed to the next object of about its size (between its size and half of it),
//! which is then written at memory speed. A file is recycled only when no view anywhere
//! maps it (the exclusive `flock`, see `view`), and free files count against capacity:
//! they are the first thing dropped when room is needed, and they hold at most half
//! of the capacity.
//!
//! Spill and restore copy files while holding the lock (simple and correct; a node with
//! heavy spill traffic would want them off the lock). The daemon calls these methods from
//! blocking threads (`spawn_blocking`), never on an async worker thread.
//!
//! Why one file of some 650 lines: every method here moves objects between the states
//! above under the one lock, and the table's invariants are checked by reading them side
//! by side; the tests live in `store/tests.rs`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Weak};

use ionet_common::ObjectId;
use memmap2::MmapMut;

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::layout;
use crate::view::{ObjectView, ViewInner};

/// Where and how big the store is.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Bytes of shared memory the store may hold (sealed objects plus reservations).
    pub capacity: u64,
    /// Where the store makes its own directory `ionet-objects-<pid>-<random>`;
    /// `None`: `/dev/shm`, or the system temp dir where `/dev/shm` is absent.
    pub root: Option<PathBuf>,
    /// Where the store makes its spill directory `ionet-spill-<pid>-<random>` (should be
    /// a disk, not tmpfs); `None`: the system temp dir.
    pub spill_root: Option<PathBuf>,
    /// Its writers and readers run as other users than the store's (a root daemon's
    /// jobs, each with a uid of its own): the directory lets them create and open files
    /// by name but not list them (mode 1733), and a sealed object is readable by its
    /// group alone (0440; [`LocalObjectStore::seal_for`] names the group). Otherwise the
    /// directory is the store's user's alone (0700) and sealed objects are 0444.
    pub separate_users: bool,
}

impl StoreConfig {
    pub fn with_capacity(capacity: u64) -> StoreConfig {
        StoreConfig { capacity, root: None, spill_root: None, separate_users: false }
    }
}

/// Usage figures. An object restored from spill is counted in both memory and spill
/// figures, since it keeps its spill copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity: u64,
    /// Sealed objects in memory plus space reserved for objects being written.
    pub bytes_in_memory: u64,
    pub bytes_spilled: u64,
    /// Sealed objects in memory.
    pub objects_in_memory: u64,
    pub objects_spilled: u64,
    /// Objects created but not sealed yet.
    pub objects_unsealed: u64,
    pub bytes_pinned: u64,
    /// Files of freed objects kept allocated for reuse (not counted in `bytes_in_memory`;
    /// dropped first when room is needed).
    pub bytes_free_for_reuse: u64,
}

/// One sealed object of the store, as [`LocalObjectStore::list`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    pub id: ObjectId,
    pub size: u64,
    pub in_memory: bool,
    pub spilled: bool,
    /// Readers holding it in memory right now.
    pub pins: u32,
}

/// An object created and not yet sealed: its file exists at [`CreatedObject::path`],
/// sized and allocated, and is mapped writable here. Dropping it only unmaps; the object
/// stays unsealed (for another process to write) until `seal` or `abort`.
pub struct CreatedObject {
    id: ObjectId,
    path: PathBuf,
    size: u64,
    map: Option<MmapMut>,
}

impl CreatedObject {
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The unsealed file, for a writer in another process (`StoreClient::write_unsealed`
    /// finds it by id too).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

/// An object arriving in pieces (a pull), written with `pwrite` at each piece's offset
/// rather than through a mapping; [`LocalObjectStore::seal`] it once every byte is written,
/// or abort it.
pub struct StreamedObject {
    id: ObjectId,
    path: PathBuf,
    size: u64,
    file: File,
}

impl StreamedObject {
    pub fn id(&self) -> ObjectId {
        self.id
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset`; refused past the object's size.
    pub fn write_at(&self, data: &[u8], offset: u64) -> ObjectStoreResult<()> {
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > self.size) {
            return Err(ObjectStoreError::io_at(
                &format!("write {} bytes at {offset} of {}", data.len(), self.size),
                &self.path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "past the object's end"),
            ));
        }
        self.file.write_all_at(data, offset).map_err(|err| ObjectStoreError::io_at("write", &self.path, err))
    }
}

struct Entry {
    size: u64,
    sealed: bool,
    in_memory: bool,
    spilled: bool,
    pins: u32,
    /// Key in `Inner::lru` while sealed and in memory.
    lru_key: Option<u64>,
    /// The mapping handed out last, reused while any view of it is alive.
    view: Weak<ViewInner>,
    /// The group that may read the sealed file (stores with separate users).
    group: Option<u32>,
}

impl Entry {
    fn unsealed(size: u64) -> Entry {
        Entry {
            size,
            sealed: false,
            in_memory: true,
            spilled: false,
            pins: 0,
            lru_key: None,
            view: Weak::new(),
            group: None,
        }
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<ObjectId, Entry>,
    lru: BTreeMap<u64, ObjectId>,
    tick: u64,
    bytes_in_memory: u64,
    /// Files of deleted objects kept for reuse (see the module docs), oldest first.
    free_files: Vec<FreeFile>,
    free_bytes: u64,
    free_serial: u64,
}

/// A deleted object's file, allocated, renamed to `free-<n>`, held with the exclusive lock.
struct FreeFile {
    size: u64,
    path: PathBuf,
    file: File,
    /// The group whose object it was: with separate users, it becomes an object of that
    /// group only (a writer of the group may still map it).
    group: Option<u32>,
}

/// Objects smaller than this are not worth recycling: their allocation is cheap.
const RECYCLE_MIN_SIZE: u64 = 1 << 20;

impl Inner {
    fn touch(&mut self, id: ObjectId) {
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(&id).expect("touched entry exists");
        if let Some(old) = entry.lru_key.replace(tick) {
            self.lru.remove(&old);
        }
        self.lru.insert(tick, id);
    }

    fn forget_lru(&mut self, id: &ObjectId) {
        if let Some(entry) = self.entries.get_mut(id) {
            if let Some(key) = entry.lru_key.take() {
                self.lru.remove(&key);
            }
        }
    }
}

/// The node's shared-memory object store. See the module docs for states and invariants.
pub struct LocalObjectStore {
    dir: PathBuf,
    spill_dir: PathBuf,
    capacity: u64,
    /// Mode of a sealed object's file: 0440 with separate users, else 0444.
    sealed_mode: u32,
    separate_users: bool,
    inner: Mutex<Inner>,
}

/// Removes `<root>/<prefix>-<pid>-*` directories whose process no longer exists.
fn remove_orphans(root: &Path, prefix: &str) {
    // Once per process and root: what a dead process left is there when this one starts,
    // and a process holding many stores (a simulated fleet) would sweep once per store.
    static SWEPT: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (root.to_path_buf(), prefix.to_string());
        if swept.contains(&key) {
            return;
        }
        swept.push(key);
    }
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(err) = fs::remove_dir_all(entry.path()) {
                tracing::debug!(dir = %entry.path().display(), error = %err, "could not remove an orphaned store directory");
            } else {
                tracing::info!(dir = %entry.path().display(), "removed the store directory of a dead process");
            }
        }
    }
}

impl LocalObjectStore {
    /// Creates the store and spill directories. Dropping the store removes both.
    pub fn new(config: StoreConfig) -> ObjectStoreResult<LocalObjectStore> {
        let root = config.root.unwrap_or_else(default_root);
        let spill_root = config.spill_root.unwrap_or_else(std::env::temp_dir);
        // A daemon killed with SIGKILL never drops its store: reclaim what it left.
        remove_orphans(&root, "ionet-objects");
        remove_orphans(&spill_root, "ionet-spill");
        let dir = make_unique_dir(&root, "ionet-objects")?;
        let mode = if config.separate_users { 0o1733 } else { 0o700 };
        if let Err(err) = fs::set_permissions(&dir, fs::Permissions::from_mode(mode)) {
            let _ = fs::remove_dir_all(&dir);
            return Err(ObjectStoreError::io_at("restrict", &dir, err));
        }
        let spill_dir = match make_unique_dir(&spill_root, "ionet-spill") {
            Ok(spill_dir) => spill_dir,
            Err(err) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(err);
            }
        };
        tracing::info!(dir = %dir.display(), spill_dir = %spill_dir.display(),
            capacity = config.capacity, "object store ready");
        Ok(LocalObjectStore {
            dir,
            spill_dir,
            capacity: config.capacity,
            sealed_mode: if config.separate_users { 0o440 } else { 0o444 },
            separate_users: config.separate_users,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The shared-memory directory; hand it to workers for [`crate::StoreClient::open`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spill_dir(&self) -> &Path {
        &self.spill_dir
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters that are still consistent with
        // the files for every completed step, so poisoning is not fatal.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `size` bytes for a new object and creates its unsealed file, mapped
    /// writable. Spills least recently used objects if needed.
    pub fn create(&self, id: ObjectId, size: u64) -> ObjectStoreResult<CreatedObject> {
        // Allocated now: a writer through the mapping would get SIGBUS, not an error, if
        // tmpfs ran out of space mid-write.
        let (file, path) = self.create_file(id, size, true, None)?;
        let map = match layout::map_writable(&file, size, &path) {
            Ok(map) => map,
            Err(err) => {
                let _ = self.abort(&id);
                return Err(err);
            }
        };
        Ok(CreatedObject { id, path, size, map })
    }

    /// Reserves `size` bytes for a new object that arrives in pieces (a pull) and creates
    /// its unsealed file, neither allocated nor mapped: each piece is a `pwrite`, so the
    /// kernel allocates and fills each page in one pass (allocating first zeroed every
    /// page: most of the time of eight nodes reading a GiB at once), and a full tmpfs is
    /// ENOSPC from the write, never SIGBUS.
    pub fn create_streamed(&self, id: ObjectId, size: u64) -> ObjectStoreResult<StreamedObject> {
        let (file, path) = self.create_file(id, size, false, None)?;
        Ok(StreamedObject { id, path, size, file })
    }

    /// Reserves `size` bytes for a new object and creates its unsealed file, allocated,
    /// for another process to write (`StoreClient::write_unsealed`) before `seal`: as
    /// `create`, without mapping the file here.
    ///
    /// With separate users, the writer is a process of `group`: the file is 0660 to it.
    pub fn create_for_client(&self, id: ObjectId, size: u64, group: Option<u32>) -> ObjectStoreResult<()> {
        let group = group.filter(|_| self.separate_users);
        let (file, path) = self.create_file(id, size, true, group)?;
        if let Some(group) = group {
            if let Err(err) = layout::take_for_group(&file, &path, Some(group), 0o660) {
                let _ = self.abort(&id);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Reserves room and creates the unsealed file, allocated up front or not.
    fn create_file(
        &self,
        id: ObjectId,
        size: u64,
        preallocate: bool,
        group: Option<u32>,
    ) -> ObjectStoreResult<(File, PathBuf)> {
        let path = layout::unsealed_path(&self.dir, &id);
        let mut inner = self.lock();
        if inner.entries.contains_key(&id) {
            return Err(ObjectStoreError::AlreadyExists { id });
        }
        let recycled = Self::take_free_file(&mut inner, size, group);
        if let Err(err) = self.reserve(&mut inner, id, size) {
            if let Some(free) = recycled {
                let _ = layout::remove_if_present(&free.path);
            }
            return Err(err);
        }
        if let Some(free) = recycled {
            match self.reuse(free, size, &path) {
                Ok(file) => {
                    inner.entries.insert(id, Entry::unsealed(size));
                    return Ok((file, path));
                }
                Err(err) => tracing::debug!(error = %err, "could not reuse a free file; allocating a new one"),
            }
        }
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|err| ObjectStoreError::io_at("create", &path, err))
            .and_then(|file| {
                if preallocate {
                    layout::allocate(&file, size, &path)?;
                }
                Ok(file)
            });
        match created {
            Ok(file) => {
                inner.entries.insert(id, Entry::unsealed(size));
                Ok((file, path))
            }
            Err(err) => {
                inner.bytes_in_memory -= size;
                let _ = layout::remove_if_present(&path);
                Err(err)
            }
        }
    }

    /// The smallest free file that can hold `size` bytes without wasting more than half.
    /// With separate users, only a file of the same group (`None`: the store's own).
    fn take_free_file(inner: &mut Inner, size: u64, group: Option<u32>) -> Option<FreeFile> {
        if size < RECYCLE_MIN_SIZE {
            return None;
        }
        let index = (0..inner.free_files.len())
            .filter(|&index| {
                let free = &inner.free_files[index];
                free.size >= size && free.size / 2 <= size && free.group == group
            })
            .min_by_key(|&index| inner.free_files[index].size)?;
        let free = inner.free_files.swap_remove(index);
        inner.free_bytes -= free.size;
        Some(free)
    }

    /// Makes a free file the unsealed file of a new object of `size` bytes.
    fn reuse(&self, free: FreeFile, size: u64, path: &Path) -> ObjectStoreResult<File> {
        let undo = |err| {
            let _ = layout::remove_if_present(&free.path);
            err
        };
        if free.size != size {
            // Shrinking keeps the remaining pages allocated.
            free.file.set_len(size).map_err(|err| undo(ObjectStoreError::io_at("resize", &free.path, err)))?;
        }
        fs::rename(&free.path, path).map_err(|err| undo(ObjectStoreError::io_at("reuse", path, err)))?;
        layout::unlock(&free.file);
        Ok(free.file)
    }

    /// Keeps a deleted object's file for reuse if it is worth it, room allows, and no
    /// view maps it; otherwise unlinks it. With separate users the file is the store's
    /// alone (0600) while it waits, and is reused for an object of its `group` only: a
    /// writer of that group may still map it.
    fn recycle_or_remove(
        &self,
        inner: &mut Inner,
        path: &Path,
        size: u64,
        group: Option<u32>,
    ) -> ObjectStoreResult<()> {
        if size >= RECYCLE_MIN_SIZE && inner.free_bytes + size <= self.capacity / 2 {
            // Writable again (sealed files are read-only); readers keep their descriptors.
            // A sealed file is the store's (with separate users, made so at seal).
            let reopened = fs::set_permissions(path, fs::Permissions::from_mode(0o600))
                .and_then(|_| OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path));
            if let Some(file) = reopened.ok().filter(layout::lock_for_reuse) {
                inner.free_serial += 1;
                let free_path = layout::free_path(&self.dir, inner.free_serial);
                if fs::rename(path, &free_path).is_ok() {
                    inner.free_bytes += size;
                    let group = group.filter(|_| self.separate_users);
                    inner.free_files.push(FreeFile { size, path: free_path, file, group });
                    return Ok(());
                }
            }
        }
        layout::remove_if_present(path)?;
        Ok(())
    }

    /// Publishes an object: renames its unsealed file into place, after which every
    /// process can map it. The file may come from [`LocalObjectStore::create`] or from a
    /// client that created it itself; the latter is accounted now, and discarded if it
    /// does not fit.
    pub fn seal(&self, id: &ObjectId) -> ObjectStoreResult<ObjectView> {
        self.seal_for(id, None)
    }

    /// [`LocalObjectStore::seal`], the sealed file readable by `group` (and the store's
    /// user) alone when the store has separate users.
    pub fn seal_for(&self, id: &ObjectId, group: Option<u32>) -> ObjectStoreResult<ObjectView> {
        let unsealed = layout::unsealed_path(&self.dir, id);
        let sealed = layout::sealed_path(&self.dir, id);
        let mut inner = self.lock();
        if inner.entries.get(id).is_some_and(|entry| entry.sealed) {
            return Err(ObjectStoreError::AlreadyExists { id: *id });
        }
        if !self.separate_users {
            // One user writes and seals: the name is taken as it is (no open on this path).
            if !inner.entries.contains_key(id) {
                let size = match fs::metadata(&unsealed) {
                    Ok(meta) => meta.len(),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        return Err(ObjectStoreError::NotFound { id: *id })
                    }
                    Err(err) => return Err(ObjectStoreError::io_at("stat", &unsealed, err)),
                };
                self.reserve_unsealed(&mut inner, id, size, &unsealed)?;
            }
            layout::publish(&unsealed, &sealed, self.sealed_mode)?;
            return self.sealed_locked(&mut inner, id, None);
        }
        // Writers are other users: the file under the unsealed name is opened without
        // following a link (a writer may have put anything there), and that file is the
        // one accounted, given to its group and published.
        let (file, opened) = match layout::open_to_seal(&unsealed) {
            Ok(opened) => opened,
            Err(ObjectStoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectStoreError::NotFound { id: *id })
            }
            Err(err) => return Err(err),
        };
        if !inner.entries.contains_key(id) {
            self.reserve_unsealed(&mut inner, id, opened.len(), &unsealed)?;
        }
        // The store's from now on, so its writer can neither change nor move it (the
        // directory is sticky); readable by the account's group.
        layout::take_for_group(&file, &unsealed, group, self.sealed_mode)?;
        if !layout::still_named_exactly(&unsealed, &opened) {
            return Err(ObjectStoreError::io_at(
                "seal",
                &unsealed,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "the file was replaced while being sealed"),
            ));
        }
        fs::rename(&unsealed, &sealed).map_err(|err| ObjectStoreError::io_at("publish", &sealed, err))?;
        self.sealed_locked(&mut inner, id, group)
    }

    /// Accounts a file a client made itself, or removes it if it does not fit.
    fn reserve_unsealed(&self, inner: &mut Inner, id: &ObjectId, size: u64, path: &Path) -> ObjectStoreResult<()> {
        if let Err(err) = self.reserve(inner, *id, size) {
            let _ = layout::remove_if_present(path);
            return Err(err);
        }
        inner.entries.insert(*id, Entry::unsealed(size));
        Ok(())
    }

    /// Records a published object as sealed (readable by `group`); its view.
    fn sealed_locked(&self, inner: &mut Inner, id: &ObjectId, group: Option<u32>) -> ObjectStoreResult<ObjectView> {
        let entry = inner.entries.get_mut(id).expect("an entry is made before publishing");
        entry.sealed = true;
        entry.group = group;
        inner.touch(*id);
        self.view_locked(inner, id)
    }

    /// Discards an unsealed object and its reservation (a failed write or transfer).
    pub fn abort(&self, id: &ObjectId) -> ObjectStoreResult<()> {
        let mut inner = self.lock();
        match inner.entries.get(id) {
            Some(entry) if entry.sealed => return Err(ObjectStoreError::AlreadyExists { id: *id }),
            Some(entry) => {
                inner.bytes_in_memory -= entry.size;
                inner.entries.remove(id);
            }
            None => {}
        }
        layout::remove_if_present(&layout::unsealed_path(&self.dir, id))?;
        Ok(())
    }

    /// Creates, writes and seals in one call.
    pub fn put(&self, id: ObjectId, data: &[u8]) -> ObjectStoreResult<ObjectView> {
        // One `pwrite` instead of a mapping: the kernel allocates and fills each page in
        // one pass (no zeroing by fallocate, no page faults), and a full tmpfs is ENOSPC.
        let (file, path) = self.create_file(id, data.len() as u64, false, None)?;
        if let Err(err) = file.write_all_at(data, 0) {
            let _ = self.abort(&id);
            return Err(ObjectStoreError::io_at("write", &path, err));
        }
        drop(file);
        self.seal(&id)
    }

    /// Whether the object is sealed (in memory or spilled).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.lock().entries.get(id).is_some_and(|entry| entry.sealed)
    }

    /// Maps a sealed object, restoring it from spill first if needed. `Ok(None)`: absent
    /// or not sealed yet.
    pub fn get(&self, id: &ObjectId) -> ObjectStoreResult<Option<ObjectView>> {
        let mut inner = self.lock();
        match inner.entries.get(id) {
            Some(entry) if entry.sealed => {}
            _ => return Ok(None),
        }
        self.ensure_in_memory(&mut inner, id)?;
        inner.touch(*id);
        self.view_locked(&mut inner, id).map(Some)
    }

    /// Marks a sealed object as in use by a running task (restoring it if spilled): it is
    /// not spilled until every pin is released with [`LocalObjectStore::unpin`].
    pub fn pin(&self, id: &ObjectId) -> ObjectStoreResult<ObjectView> {
        let mut inner = self.lock();
        match inner.entries.get(id) {
            Some(entry) if entry.sealed => {}
            Some(_) => return Err(ObjectStoreError::NotSealed { id: *id }),
            None => return Err(ObjectStoreError::NotFound { id: *id }),
        }
        self.ensure_in_memory(&mut inner, id)?;
        inner.touch(*id);
        inner.entries.get_mut(id).expect("checked").pins += 1;
        self.view_locked(&mut inner, id)
    }

    pub fn unpin(&self, id: &ObjectId) -> ObjectStoreResult<()> {
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or(ObjectStoreError::NotFound { id: *id })?;
        if entry.pins == 0 {
            return Err(ObjectStoreError::NotPinned { id: *id });
        }
        entry.pins -= 1;
        Ok(())
    }

    /// Frees the object's memory and spill copy. Returns whether it was present.
    /// Processes that still map it keep reading valid bytes: unlinking a mapped file on
    /// Linux removes the name only, and the pages are freed with the last mapping.
    pub fn delete(&self, id: &ObjectId) -> ObjectStoreResult<bool> {
        let mut inner = self.lock();
        inner.forget_lru(id);
        let Some(entry) = inner.entries.remove(id) else {
            return Ok(false);
        };
        if entry.in_memory {
            inner.bytes_in_memory -= entry.size;
            if entry.sealed {
                self.recycle_or_remove(&mut inner, &layout::sealed_path(&self.dir, id), entry.size, entry.group)?;
            } else {
                layout::remove_if_present(&layout::unsealed_path(&self.dir, id))?;
            }
        }
        if entry.spilled {
            layout::remove_if_present(&self.spill_path(id))?;
        }
        Ok(true)
    }

    /// Deletes each object (see [`LocalObjectStore::delete`]); returns how many existed.
    pub fn delete_many(&self, ids: &[ObjectId]) -> ObjectStoreResult<u64> {
        let mut freed = 0;
        for id in ids {
            if self.delete(id)? {
                freed += 1;
            }
        }
        Ok(freed)
    }

    pub fn stats(&self) -> StoreStats {
        let inner = self.lock();
        let mut stats = StoreStats {
            capacity: self.capacity,
            bytes_in_memory: inner.bytes_in_memory,
            bytes_free_for_reuse: inner.free_bytes,
            ..StoreStats::default()
        };
        for entry in inner.entries.values() {
            if !entry.sealed {
                stats.objects_unsealed += 1;
                continue;
            }
            if entry.in_memory {
                stats.objects_in_memory += 1;
            }
            if entry.spilled {
                stats.objects_spilled += 1;
                stats.bytes_spilled += entry.size;
            }
            if entry.pins > 0 {
                stats.bytes_pinned += entry.size;
            }
        }
        stats
    }

    /// The sealed objects, largest first, at most `limit` of them; and whether there were
    /// more. One pass under the store's lock.
    pub fn list(&self, limit: usize) -> (Vec<StoredEntry>, bool) {
        let inner = self.lock();
        let mut entries: Vec<StoredEntry> = inner
            .entries
            .iter()
            .filter(|(_, entry)| entry.sealed)
            .map(|(id, entry)| StoredEntry {
                id: *id,
                size: entry.size,
                in_memory: entry.in_memory,
                spilled: entry.spilled,
                pins: entry.pins,
            })
            .collect();
        drop(inner);
        let more = entries.len() > limit;
        if more {
            entries.select_nth_unstable_by(limit, |a, b| b.size.cmp(&a.size));
            entries.truncate(limit);
        }
        entries.sort_unstable_by(|a, b| b.size.cmp(&a.size).then(a.id.cmp(&b.id)));
        (entries, more)
    }

    fn spill_path(&self, id: &ObjectId) -> PathBuf {
        self.spill_dir.join(id.hex())
    }

    /// Makes room for `size` more bytes in memory by spilling unpinned objects, least
    /// recently used first, then counts them as used.
    fn reserve(&self, inner: &mut Inner, id: ObjectId, size: u64) -> ObjectStoreResult<()> {
        if size > self.capacity {
            return Err(ObjectStoreError::ObjectTooLarge { id, size, capacity: self.capacity });
        }
        while inner.bytes_in_memory + inner.free_bytes + size > self.capacity {
            if let Some(free) = inner.free_files.pop() {
                inner.free_bytes -= free.size;
                layout::remove_if_present(&free.path)?;
                continue;
            }
            let victim = inner.lru.values().find(|candidate| inner.entries[*candidate].pins == 0).copied();
            match victim {
                Some(victim) => self.spill_locked(inner, &victim)?,
                None => {
                    let unspillable: u64 =
                        inner.entries.values().filter(|entry| entry.in_memory).map(|entry| entry.size).sum();
                    return Err(ObjectStoreError::ObjectStoreFull {
                        id,
                        size,
                        used: inner.bytes_in_memory,
                        pinned: unspillable,
                        capacity: self.capacity,
                    });
                }
            }
        }
        inner.bytes_in_memory += size;
        Ok(())
    }

    /// Moves a sealed, in-memory object to the spill directory and frees its memory.
    fn spill_locked(&self, inner: &mut Inner, id: &ObjectId) -> ObjectStoreResult<()> {
        let shm = layout::sealed_path(&self.dir, id);
        let entry = &inner.entries[id];
        let size = entry.size;
        if !entry.spilled {
            let spill = self.spill_path(id);
            let partial = self.spill_dir.join(format!("{}.partial", id.hex()));
            fs::copy(&shm, &partial)
                .map_err(|err| {
                    let _ = fs::remove_file(&partial);
                    ObjectStoreError::io_at("spill to", &partial, err)
                })
                .and_then(|_| {
                    fs::rename(&partial, &spill).map_err(|err| ObjectStoreError::io_at("spill to", &spill, err))
                })?;
        }
        layout::remove_if_present(&shm)?;
        inner.forget_lru(id);
        let entry = inner.entries.get_mut(id).expect("spilled entry exists");
        entry.spilled = true;
        entry.in_memory = false;
        entry.view = Weak::new();
        inner.bytes_in_memory -= size;
        tracing::debug!(object = %id.short(), size, "spilled object");
        Ok(())
    }

    /// Makes a sealed object (one this store made: a copy pulled from another node)
    /// readable by `group` alone, when the store has separate users.
    pub fn set_group(&self, id: &ObjectId, group: u32) -> ObjectStoreResult<()> {
        if !self.separate_users {
            return Ok(());
        }
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or(ObjectStoreError::NotFound { id: *id })?;
        entry.group = Some(group);
        if entry.in_memory && entry.sealed {
            layout::give_to_group(&layout::sealed_path(&self.dir, id), group)?;
        }
        Ok(())
    }

    /// Restores a spilled object into memory (reserving room for it first).
    fn ensure_in_memory(&self, inner: &mut Inner, id: &ObjectId) -> ObjectStoreResult<()> {
        let entry = &inner.entries[id];
        if entry.in_memory {
            return Ok(());
        }
        let (size, group) = (entry.size, entry.group);
        self.reserve(inner, *id, size)?;
        let restoring = layout::restoring_path(&self.dir, id);
        // Whatever someone planted under the name goes first; the copy is a new file,
        // never a link followed.
        let restored = layout::remove_if_present(&restoring)
            .and_then(|_| layout::copy_into_new(&self.spill_path(id), &restoring))
            .and_then(|file| match group {
                Some(group) => layout::take_for_group(&file, &restoring, Some(group), self.sealed_mode),
                None => Ok(()),
            })
            .and_then(|_| layout::publish(&restoring, &layout::sealed_path(&self.dir, id), self.sealed_mode));
        if let Err(err) = restored {
            inner.bytes_in_memory -= size;
            let _ = layout::remove_if_present(&restoring);
            return Err(err);
        }
        inner.entries.get_mut(id).expect("checked").in_memory = true;
        tracing::debug!(object = %id.short(), size, "restored object from spill");
        Ok(())
    }

    /// The live mapping of an in-memory sealed object, or a fresh one.
    fn view_locked(&self, inner: &mut Inner, id: &ObjectId) -> ObjectStoreResult<ObjectView> {
        let entry = inner.entries.get_mut(id).expect("viewed entry exists");
        if let Some(live) = entry.view.upgrade() {
            return Ok(ObjectView::from_inner(live));
        }
        let view = ObjectView::map_file(*id, &layout::sealed_path(&self.dir, id))?;
        entry.view = view.downgrade();
        Ok(view)
    }
}

impl Drop for LocalObjectStore {
    fn drop(&mut self) {
        for dir in [&self.dir, &self.spill_dir] {
            if let Err(err) = fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %err,
                    "could not remove object store directory");
            }
        }
    }
}

fn default_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn make_unique_dir(root: &Path, prefix: &str) -> ObjectStoreResult<PathBuf> {
    let dir = root.join(format!("{prefix}-{}-{}", std::process::id(), ObjectId::random().short()));
    fs::create_dir_all(&dir).map_err(|err| ObjectStoreError::io_at("create", &dir, err))?;
    Ok(dir)
}

#[cfg(test)]
mod tests;
