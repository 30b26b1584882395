//! ionet-object-store: the node-local shared-memory object store, spilling to disk, and
//! chunked transfer of objects between nodes.
//!
//! Data model. An object is an immutable byte string named by an [`ObjectId`]
//! (`ionet_common::ObjectId`, 28 bytes). On a node it lives as one file in the store directory,
//! a tmpfs (`/dev/shm/ionet-objects-…` by default), so every process on the node can
//! map it read-only and read it without copying ([`ObjectView`]). An object is created
//! at its final size, written once, then *sealed*: an atomic rename publishes it, and
//! from then on its bytes never change. Only sealed objects are readable.
//!
//! Who talks to whom.
//! - The node daemon owns the [`LocalObjectStore`]: it alone accounts capacity, spills
//!   least-recently-used unpinned objects to a disk directory when a new object would
//!   not fit, restores them on `get`, pins objects that running tasks use, and deletes
//!   objects when their owner frees them.
//! - Workers and drivers on the node open the same directory with a [`StoreClient`]:
//!   they map sealed objects directly, and write new ones into the unsealed file the
//!   daemon `create`d for them (then ask the daemon to `seal`). Those requests to the
//!   daemon travel over the node daemon's own RPC, not this crate.
//! - Between nodes, the daemon serves [`ObjectManagerService`] (`ionet.object.
//!   ObjectManager` in `core/common/proto/ionet/object.proto`); a [`Puller`] on another node
//!   streams an object from it in chunks straight into a created object, merging
//!   concurrent pulls of one object into one transfer.
//! - [`encode_record_batch`] / [`decode_record_batch`] store Arrow tables as IPC streams
//!   and read them back with column buffers pointing into the mapping.
//!
//! Invariants (detailed in `store.rs`): bytes in memory never exceed capacity (room is
//! reserved before a file is allocated); pinned and unsealed objects are never spilled;
//! a reader never sees a partial object (unsealed files have their own name, and failed
//! writes or transfers are aborted); a mapping stays valid after its object is spilled
//! or deleted, because files are only ever unlinked, never truncated.
//!
//! Every fallible call returns [`ObjectStoreError`], which converts into
//! `ionet_common::IonetError` (and from there into a gRPC status). The store's methods are
//! blocking (they may copy files to spill or restore): call them from blocking threads.

mod arrow;
mod client;
mod error;
mod layout;
mod pull;
mod service;
mod store;
mod view;

pub use arrow::{decode_record_batch, decode_record_batches, encode_record_batch, view_buffer};
pub use client::StoreClient;
pub use error::{ObjectStoreError, ObjectStoreResult};
pub use ionet_common::ObjectId;
pub use pull::Puller;
pub use service::{ObjectManagerService, OwnerCheck, PullStream, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES};
pub use store::{CreatedObject, LocalObjectStore, StoreConfig, StoreStats, StoredEntry, StreamedObject};
pub use view::ObjectView;
