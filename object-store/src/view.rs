//! [`ObjectView`]: a read-only mapping of one sealed object.

use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use ionet_common::ObjectId;
use memmap2::{Mmap, MmapOptions};

use crate::error::{ObjectStoreError, ObjectStoreResult};
use crate::layout;

/// The bytes of one sealed object, mapped read-only from the store's shared memory.
///
/// Reads are zero-copy: the slice points into the page cache pages of the object's file,
/// which every process on the node maps. Cloning is an `Arc` increment. The mapping stays
/// valid after the object is spilled or deleted, so a view never dangles: a view holds a
/// shared `flock` on the object's file for its life, and the store recycles a deleted
/// object's file for a new object only when it can take the exclusive lock (no view
/// anywhere); otherwise it unlinks the file, whose pages live until the last mapping goes.
#[derive(Clone)]
pub struct ObjectView {
    inner: Arc<ViewInner>,
}

pub(crate) struct ViewInner {
    id: ObjectId,
    /// `None` for an empty object: a zero-length file cannot be mapped.
    map: Option<Mmap>,
    /// Open for the view's life: it carries the shared lock that keeps the store from
    /// recycling the file (see `layout::lock_for_reuse`).
    _file: File,
}

impl ObjectView {
    /// Maps the sealed object file at `path`.
    pub(crate) fn map_file(id: ObjectId, path: &Path) -> ObjectStoreResult<ObjectView> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(ObjectStoreError::NotFound { id }),
            Err(err) => return Err(ObjectStoreError::io_at("open", path, err)),
        };
        // The shared lock, then a check that `path` still names this file: the store
        // renames a file away (to recycle it) only while holding the exclusive lock, so a
        // file opened just before that rename is caught here, never mapped as the object.
        if !layout::lock_shared(&file) {
            return Err(ObjectStoreError::NotFound { id });
        }
        let opened = file.metadata().map_err(|err| ObjectStoreError::io_at("stat", path, err))?;
        if !layout::still_named(path, &opened) {
            return Err(ObjectStoreError::NotFound { id });
        }
        let len = opened.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: a sealed object file is immutable by protocol: it is made read-only
            // (0444) before the rename that publishes it, and it is written again only
            // after the store recycled it, which it does only holding the exclusive lock
            // that this view's shared lock excludes (else removal only unlinks it). A hostile local process with
            // the same uid could still truncate it; that is outside the trust boundary of
            // a node (same as Ray's plasma store).
            Some(
                unsafe { MmapOptions::new().len(len as usize).map(&file) }
                    .map_err(|err| ObjectStoreError::io_at("map", path, err))?,
            )
        };
        Ok(ObjectView { inner: Arc::new(ViewInner { id, map, _file: file }) })
    }

    pub(crate) fn from_inner(inner: Arc<ViewInner>) -> ObjectView {
        ObjectView { inner }
    }

    pub(crate) fn downgrade(&self) -> std::sync::Weak<ViewInner> {
        Arc::downgrade(&self.inner)
    }

    pub fn id(&self) -> ObjectId {
        self.inner.id
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.inner.map {
            Some(map) => map,
            None => &[],
        }
    }

    /// Whether two views share one mapping.
    pub fn same_mapping(&self, other: &ObjectView) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Deref for ObjectView {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for ObjectView {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for ObjectView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectView").field("id", &self.inner.id).field("len", &self.len()).finish()
    }
}
