//! Borrowers: a ref inside a task's return value keeps its object alive in the worker
//! that owns it until the caller is done with it.
//!
//! The worker that ran the task *lends* each ref it owns found in the return value: it
//! keeps one count of the object per lend (`PushTaskReply.lent`) and remembers how many
//! it lent. The caller registers the lends as a [`Borrowed`] per object, held by the
//! return object's entry (the value holds the refs) and by every handle of the ref it
//! decodes; when the last holder goes, it gives the lends back (`ReleaseBorrows`) and
//! the owner drops those counts (freeing the object at zero, as for its own handles).
//!
//! Invariants:
//! - an owner gives back no more counts than it lent to anyone (a release beyond that
//!   is ignored), so a borrower cannot free an object its owner still holds;
//! - a caller takes lends only from the worker that replied, for objects that worker
//!   owns (a reply naming another owner could make it give back another's lends);
//! - a borrower releases each lend once: a [`Borrowed`] sends its lends when dropped.
//!
//! Refs inside an actor's constructor arguments are held by its creator while the actor
//! lives (`CoreWorker::actor_args`, let go once the control store says it is dead): each
//! incarnation's constructor reads them again.
//!
//! The owner keeps each lend under its borrower (the caller's address, which the caller
//! names on its task stream): a release gives back the releasing borrower's lends only,
//! so one borrower cannot give back another's.
//!
//! Not covered yet: a borrower that dies without releasing (its owner, a worker it
//! leased, dies with its lease today, so nothing outlives it; an owner that outlives its
//! borrower keeps the object until it exits), refs passed on from a borrower to a third
//! process (borrowed handles there do not hold the object), and lends in actor calls'
//! replies.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use ionet_common::rpc::proto::worker::{LentRef, ReleaseBorrowsRequest};
use ionet_common::rpc::CoreWorkerClient;
use ionet_common::ObjectId;

use crate::object_ref::ObjectRef;

/// An object of another process this one holds lends of.
pub(crate) struct Borrowed {
    id: ObjectId,
    owner: Arc<str>,
    lends: AtomicU32,
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        let lends = self.lends.load(Ordering::Acquire);
        let Ok(worker) = crate::runtime::current() else { return };
        worker.borrows.held.remove_if(&self.id, |_, weak| weak.strong_count() == 0);
        let Ok(channel) = worker.channel(&self.owner) else { return };
        let request = ReleaseBorrowsRequest {
            object_ids: vec![self.id.to_vec()],
            counts: vec![lends],
            borrower_address: worker.address.to_string(),
        };
        let id = self.id;
        worker.handle.spawn(async move {
            if let Err(status) = CoreWorkerClient::new(channel).release_borrows(request).await {
                tracing::debug!(object = %id.short(), error = %status.message(), "giving a borrowed object back failed");
            }
        });
    }
}

#[derive(Default)]
pub(crate) struct Borrows {
    /// Objects of other processes borrowed here, while something holds them.
    held: DashMap<ObjectId, Weak<Borrowed>>,
    /// The borrows each owned object's value holds (the refs inside it).
    contained: DashMap<ObjectId, Vec<Arc<Borrowed>>>,
    /// Objects this process owns, lent out: a counted handle per lend still out, with
    /// the borrower it is out to.
    lent: DashMap<ObjectId, Vec<(Arc<str>, ObjectRef<()>)>>,
}

/// The most lends one reply may carry (more are not registered, and so never released:
/// the worker keeps those objects until it exits).
const MAX_LENT_PER_REPLY: usize = 10_000;

impl Borrows {
    /// The worker at `lender` that made `container` lent it `refs`: held until `container`
    /// is forgotten. A worker lends only what it owns: refs naming another owner are not
    /// taken (giving them back would free another borrower's objects).
    pub(crate) fn register(&self, container: ObjectId, refs: &[LentRef], lender: &str) {
        if refs.is_empty() {
            return;
        }
        let mut holding = Vec::with_capacity(refs.len());
        for lent in refs.iter().filter(|lent| lent.owner == lender).take(MAX_LENT_PER_REPLY) {
            let Ok(id) = ObjectId::from_bytes(&lent.object_id) else { continue };
            let borrowed = match self.held.get(&id).and_then(|weak| weak.upgrade()) {
                Some(borrowed) => borrowed,
                None => {
                    let borrowed =
                        Arc::new(Borrowed { id, owner: Arc::from(lent.owner.as_str()), lends: AtomicU32::new(0) });
                    self.held.insert(id, Arc::downgrade(&borrowed));
                    borrowed
                }
            };
            borrowed.lends.fetch_add(1, Ordering::AcqRel);
            holding.push(borrowed);
        }
        self.contained.entry(container).or_default().extend(holding);
    }

    /// Lends from `lender` that arrived for a value nobody wants any more: given back at
    /// once.
    pub(crate) fn give_back(&self, refs: &[LentRef], lender: &str) {
        let scratch = ObjectId::random();
        self.register(scratch, refs, lender);
        self.forget_container(&scratch);
    }

    /// The borrow a decoded handle of `id` holds, if this process borrows it.
    pub(crate) fn holder_of(&self, id: &ObjectId) -> Option<Arc<Borrowed>> {
        self.held.get(id).and_then(|weak| weak.upgrade())
    }

    /// `container` is forgotten: the borrows its value held go (given back when nothing
    /// else holds them).
    pub(crate) fn forget_container(&self, container: &ObjectId) {
        self.contained.remove(container);
    }

    /// Lends `refs` (handles this process owns, found in a task's return value) to the
    /// process at `borrower`: each keeps its count until that borrower gives it back.
    pub(crate) fn lend(&self, address: &str, refs: Vec<ObjectRef<()>>, borrower: Arc<str>) -> Vec<LentRef> {
        let lent: Vec<LentRef> = refs
            .into_iter()
            .filter(|handle| handle.entry.is_some())
            .take(MAX_LENT_PER_REPLY)
            .map(|handle| {
                let lent = LentRef { object_id: handle.id().to_vec(), owner: address.to_string() };
                // Its count is the borrower's now: kept here until given back.
                self.lent.entry(handle.id()).or_default().push((borrower.clone(), handle));
                lent
            })
            .collect();
        lent
    }

    /// Borrower `borrower` gives back `count` lends of `id`: at most as many as are out
    /// to it. The handles go after the table's lock is let go (the last may free the
    /// object).
    pub(crate) fn release(&self, id: ObjectId, count: u32, borrower: &str) {
        let mut returned: Vec<ObjectRef<()>> = Vec::new();
        if let Some(mut out) = self.lent.get_mut(&id) {
            let mut left = count as usize;
            out.retain_mut(|(to, handle)| {
                if left > 0 && **to == *borrower {
                    left -= 1;
                    returned.push(handle.clone());
                    false
                } else {
                    true
                }
            });
        }
        self.lent.remove_if(&id, |_, out| out.is_empty());
        drop(returned);
    }
}
