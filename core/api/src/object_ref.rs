//! `ObjectRef<T>`: a typed handle to a value that exists, or will, somewhere in the
//! cluster.
//!
//! A ref carries its object id and its owner's address (the process that created it
//! by `.remote()` or `put`). Handles created in the owner count references: the owner
//! frees the value and every copy when the last handle (including those held by
//! pending tasks as arguments) is dropped. A ref serialised into another process
//! (inside a value, or sent to a task) is a *borrowed* handle there: it resolves
//! through the owner, and keeps the object alive while some process lent it to this
//! one (`crate::borrows`).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use ionet_common::ObjectId;
use serde::{Deserialize, Serialize};

use crate::borrows::Borrowed;
use crate::runtime::{self, ObjectEntry};

pub struct ObjectRef<T> {
    pub(crate) id: ObjectId,
    pub(crate) owner: Arc<str>,
    /// The owner's entry, when this handle counts in it (it lives in the owner).
    pub(crate) entry: Option<Arc<ObjectEntry>>,
    /// Elsewhere, the object's local count here (`crate::borrows`): the lends this
    /// process holds of it are given back when its last handle goes.
    borrow: Option<Arc<Borrowed>>,
    _value: PhantomData<fn() -> T>,
}

impl<T> ObjectRef<T> {
    /// A handle in the owner; the caller has already counted it in `entry`.
    pub(crate) fn counted(id: ObjectId, owner: Arc<str>, entry: Arc<ObjectEntry>) -> Self {
        Self { id, owner, entry: Some(entry), borrow: None, _value: PhantomData }
    }

    /// A handle outside the owner: it resolves through the owner; it keeps the object
    /// alive only while this process holds lends of it (`borrow`).
    pub(crate) fn borrowed(id: ObjectId, owner: Arc<str>, borrow: Option<Arc<Borrowed>>) -> Self {
        Self { id, owner, entry: None, borrow, _value: PhantomData }
    }

    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// Whether this handle holds a local count of another process's object.
    pub(crate) fn holds_borrow(&self) -> bool {
        self.borrow.is_some()
    }

    /// Address of the core worker that owns the object.
    pub fn owner_address(&self) -> &str {
        &self.owner
    }

    /// The same handle as a ref to another type: its count, owner and entry move over
    /// (nothing is counted or leaked twice).
    pub(crate) fn retype<U>(self) -> ObjectRef<U> {
        let mut this = std::mem::ManuallyDrop::new(self);
        let entry = this.entry.take();
        let borrow = this.borrow.take();
        // SAFETY: `this` is never dropped, so its `owner` is moved out exactly once.
        let owner = unsafe { std::ptr::read(&this.owner) };
        ObjectRef { id: this.id, owner, entry, borrow, _value: PhantomData }
    }

    /// The same handle, untyped, as task arguments hold it.
    pub(crate) fn erase(&self) -> ObjectRef<()> {
        self.clone().retype()
    }
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        if let Some(entry) = &self.entry {
            entry.add_reference();
        }
        Self {
            id: self.id,
            owner: self.owner.clone(),
            entry: self.entry.clone(),
            borrow: self.borrow.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> Drop for ObjectRef<T> {
    fn drop(&mut self) {
        if let Some(entry) = &self.entry {
            if entry.remove_reference() {
                runtime::forget_object(&self.id);
            }
        }
    }
}

impl<T> fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectRef({})", self.id.short())
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<T> Eq for ObjectRef<T> {}

impl<T> std::hash::Hash for ObjectRef<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// A ref on the wire: the id's raw bytes (ids are hex elsewhere, for stored and readable
/// formats; a value holding 10,000 refs decodes several times faster this way).
#[derive(Serialize, Deserialize)]
struct WireRef<'a> {
    #[serde(with = "id_bytes")]
    id: [u8; ObjectId::LEN],
    #[serde(borrow)]
    owner: Cow<'a, str>,
}

/// An id as one byte string (a length and the bytes), not a tuple of 28 numbers: decoded
/// in one read, which matters where values decode under a limit on claimed bytes
/// (`crate::task::decode_value`), as every read is then counted.
mod id_bytes {
    use ionet_common::ObjectId;

    pub(super) fn serialize<S: serde::Serializer>(id: &[u8; ObjectId::LEN], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(id)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<[u8; ObjectId::LEN], D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = [u8; ObjectId::LEN];

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an object id of {} bytes", ObjectId::LEN)
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                bytes.try_into().map_err(|_| E::invalid_length(bytes.len(), &self))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

std::thread_local! {
    /// While a value is encoded for a task argument or a `put`: the counted refs written
    /// inside it, which the caller keeps alive as long as the value needs them.
    static CONTAINED: std::cell::RefCell<Option<Vec<ObjectRef<()>>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `encode` and returns, with its result, a handle of every ref it serialised that
/// holds its object (owned here, or borrowed: `crate::borrows`): a ref inside a task's
/// argument or a stored value must outlive the caller's own handles for as long as the
/// task or the value does.
pub fn collect_contained<R>(encode: impl FnOnce() -> R) -> (R, Vec<ObjectRef<()>>) {
    collecting(&CONTAINED, encode)
}

/// Runs `run` with a fresh collection in `slot` (a thread's list of what `run` meets) and
/// returns, with its result, what was collected; the outer collection (none, unless
/// nested) is put back, even if `run` panics.
pub(crate) fn collecting<T: 'static, R>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<Vec<T>>>>,
    run: impl FnOnce() -> R,
) -> (R, Vec<T>) {
    struct Restore<T: 'static> {
        slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<Vec<T>>>>,
        outer: Option<Option<Vec<T>>>,
    }
    impl<T: 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            if let Some(outer) = self.outer.take() {
                self.slot.with(|collected| *collected.borrow_mut() = outer);
            }
        }
    }
    let outer = slot.with(|collected| collected.borrow_mut().replace(Vec::new()));
    let mut restore = Restore { slot, outer: Some(outer) };
    let result = run();
    let outer = restore.outer.take().expect("set above");
    let found = slot.with(|collected| std::mem::replace(&mut *collected.borrow_mut(), outer));
    (result, found.unwrap_or_default())
}

impl<T> Serialize for ObjectRef<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.entry.is_some() || self.borrow.is_some() {
            CONTAINED.with(|contained| {
                if let Some(found) = contained.borrow_mut().as_mut() {
                    found.push(self.erase());
                }
            });
        }
        WireRef { id: self.id.to_array(), owner: Cow::Borrowed(&self.owner) }.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for ObjectRef<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireRef::deserialize(deserializer)?;
        // Back in its owner the handle counts again; elsewhere it borrows.
        Ok(runtime::revive_reference(ObjectId::from_array(wire.id), &wire.owner))
    }
}

/// One argument of a remote call: a value, or a ref whose value the task receives.
pub enum Arg {
    Value(Result<Vec<u8>, String>),
    /// A value with refs inside: the call holds them until it has finished.
    Holding(Vec<u8>, Vec<ObjectRef<()>>),
    Ref(ObjectRef<()>),
}

impl Arg {
    /// An encoded value, holding the refs found inside it.
    pub fn encoded(encoded: Result<Vec<u8>, String>, contained: Vec<ObjectRef<()>>) -> Arg {
        match encoded {
            Ok(bytes) if !contained.is_empty() => Arg::Holding(bytes, contained),
            other => Arg::Value(other),
        }
    }
}

/// What may be passed where a remote function takes a `T`.
pub trait IntoArg<T> {
    fn into_arg(self) -> Arg;
}

impl<T: Serialize> IntoArg<T> for T {
    fn into_arg(self) -> Arg {
        let (encoded, contained) = collect_contained(|| crate::task::encode_value(&self));
        Arg::encoded(encoded, contained)
    }
}

impl<T> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self) -> Arg {
        Arg::Ref(self.erase())
    }
}

impl<T> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self) -> Arg {
        Arg::Ref(self.erase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ref_travels_as_its_raw_id_bytes_and_owner() {
        let id = ObjectId::random();
        let owner = "127.0.0.1:4000";
        let reference: ObjectRef<u8> = ObjectRef::borrowed(id, owner.into(), None);
        let bytes = crate::task::encode_value(&reference).unwrap();
        // A length byte and the id's bytes (not its hex), a length byte and the owner.
        assert_eq!(bytes.len(), 1 + ObjectId::LEN + 1 + owner.len(), "the id's bytes, not its hex");
        let back: ObjectRef<u8> = crate::task::decode_value(&bytes).unwrap();
        assert_eq!((back.id(), back.owner_address()), (id, owner));
        // An id of another length is refused, not cut or padded.
        let mut short = bytes.clone();
        short[0] = ObjectId::LEN as u8 - 1;
        short.remove(1);
        let refused = crate::task::decode_value::<ObjectRef<u8>>(&short).err().unwrap();
        assert!(refused.contains("object id of 28 bytes"), "{refused}");
    }
}
