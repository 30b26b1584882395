//! Borrowers: a ref that travels from one process to another keeps its object alive for
//! as long as the process it reached holds it (Ray's ownership protocol, by lends).
//!
//! Every handle of an object this process does not own shares one [`Borrowed`] per
//! object: the local count. A `Borrowed` remembers who *lent* the object here, and how
//! many times; when the last handle goes, each lender gets its lends back
//! (`ReleaseBorrows`). A lender keeps a handle per lend still out (`Borrows::lent`, under
//! the borrower's address): a counted handle when it owns the object, else a handle on
//! its own `Borrowed`, so a chain of borrowers holds the object at its owner until the
//! end of the chain lets go.
//!
//! Lends travel in the replies to tasks and actor calls:
//! - *return values*: the worker that ran the call lends the caller every ref in the
//!   value that it holds (`PushTaskReply.lent`); the caller's entry of the return object
//!   holds them while the value is kept. A ref the caller itself passed in the call's
//!   arguments is held with the caller's own handle instead (and the lend given back at
//!   once: two processes lending each other one object would hold it forever);
//! - *arguments kept*: a worker that still holds, after a call, refs it decoded during
//!   the call (stored in an actor's state, passed on to a task still running) counts a
//!   lend from the caller and names them (`PushTaskReply.kept`); the caller lends it its
//!   own handle of each (those the call's arguments held).
//!
//! Refs inside an actor's constructor arguments are held by its creator while the actor
//! lives (`CoreWorker::actor_args`, let go once the control store says it is dead): each
//! incarnation's constructor reads them again.
//!
//! Invariants:
//! - a lender gives back no more counts than it lent to the releasing borrower (a release
//!   beyond that is ignored), so a borrower cannot free what another still holds, and a
//!   reply can only make its caller give back lends to the replying worker;
//! - a borrower releases each lend once: a [`Borrowed`] sends its lends when dropped.
//!
//! A worker with lends out tells its node so (`crate::blocked`): it is not stopped for
//! being idle while it holds objects for others.
//!
//! Not covered yet: a borrower that dies without releasing (its lender keeps the object
//! until it exits itself), refs decoded from a value read by `get` and kept past the call
//! (only the call's own arguments are lent by its caller), and async actor methods (their
//! replies lend nothing).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Weak};

use dashmap::DashMap;
use ionet_common::rpc::proto::worker::{BorrowObjectsRequest, LentRef, PushTaskReply, ReleaseBorrowsRequest};
use ionet_common::rpc::CoreWorkerClient;
use ionet_common::ObjectId;

use crate::object_ref::{Arg, ObjectRef};
use crate::runtime::CoreWorker;

/// The local count of an object of another process: shared by every handle of it here.
pub(crate) struct Borrowed {
    id: ObjectId,
    /// The processes that lent it here, with how many lends each (given back on drop).
    lenders: Mutex<Vec<(Arc<str>, u32)>>,
}

impl Borrowed {
    fn add_lend(&self, lender: &Arc<str>) {
        let mut lenders = self.lenders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match lenders.iter_mut().find(|(known, _)| known == lender) {
            Some((_, count)) => *count = count.saturating_add(1),
            None => lenders.push((lender.clone(), 1)),
        }
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        let lenders = std::mem::take(self.lenders.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let Ok(worker) = crate::runtime::current() else { return };
        worker.borrows.held.remove_if(&self.id, |_, weak| weak.strong_count() == 0);
        for (lender, count) in lenders {
            give_back(&worker, &lender, vec![(self.id, count)]);
        }
    }
}

/// Gives `lends` back to the process at `lender` (in the background: nothing waits).
fn give_back(worker: &CoreWorker, lender: &str, lends: Vec<(ObjectId, u32)>) {
    if lends.is_empty() {
        return;
    }
    let Ok(channel) = worker.channel(lender) else { return };
    let request = ReleaseBorrowsRequest {
        object_ids: lends.iter().map(|(id, _)| id.to_vec()).collect(),
        counts: lends.iter().map(|(_, count)| *count).collect(),
        borrower_address: worker.address.to_string(),
    };
    worker.handle.spawn(async move {
        if let Err(status) = CoreWorkerClient::new(channel).release_borrows(request).await {
            tracing::debug!(error = %status.message(), "giving borrowed objects back failed");
        }
    });
}

#[derive(Default)]
pub(crate) struct Borrows {
    /// The local count of each object of another process, while a handle holds it.
    held: DashMap<ObjectId, Weak<Borrowed>>,
    /// The refs each owned object's value holds (lent with it, or the caller's own).
    contained: DashMap<ObjectId, Vec<ObjectRef<()>>>,
    /// Objects lent out: a handle per lend still out, with the borrower it is out to.
    lent: DashMap<ObjectId, Vec<(Arc<str>, ObjectRef<()>)>>,
}

/// The most lends one reply may carry (more are not registered, and so never released:
/// the lender keeps those objects until it exits).
const MAX_LENT_PER_REPLY: usize = 10_000;

/// Objects of other processes whose handles were decoded, with their owners.
pub struct DecodedRefs(Vec<(ObjectId, Arc<str>)>);

impl DecodedRefs {
    fn ids(self) -> Vec<ObjectId> {
        self.0.into_iter().map(|(id, _)| id).collect()
    }
}

std::thread_local! {
    /// While a call runs or a value read by `get` is decoded: the objects of other
    /// processes whose handles were decoded.
    static REVIVED: RefCell<Option<Vec<(ObjectId, Arc<str>)>>> = const { RefCell::new(None) };
}

/// Runs `call` and returns, with its result, the objects of other processes whose
/// handles it decoded (see [`Borrows::keep_after_call`]).
pub(crate) fn collect_revived<R>(call: impl FnOnce() -> R) -> (R, Vec<ObjectId>) {
    let (result, decoded) = collect_decoded(call);
    (result, decoded.ids())
}

/// Runs `decode` and returns, with its result, the refs to other processes' objects it
/// decoded: a value read by `get` holds them only while its own object lives, so
/// [`borrow_decoded`] asks their owners for lends of their own.
pub fn collect_decoded<R>(decode: impl FnOnce() -> R) -> (R, DecodedRefs) {
    /// Puts back the outer collection (none, unless nested) even if `decode` panics.
    struct Restore(Option<Option<Vec<(ObjectId, Arc<str>)>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                REVIVED.with(|revived| *revived.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(REVIVED.with(|revived| revived.borrow_mut().replace(Vec::new()))));
    let result = decode();
    let outer = restore.0.take().expect("set above");
    let found = REVIVED.with(|revived| std::mem::replace(&mut *revived.borrow_mut(), outer));
    (result, DecodedRefs(found.unwrap_or_default()))
}

/// How long a reader waits for owners to lend what it decoded.
const BORROW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Asks the owners of `decoded` (refs decoded from a value read by `get`, while the
/// reader still holds that value's ref, so the objects are still there) for a lend each,
/// unless this process holds one already: the refs then keep their objects on their own.
/// Blocks until the owners answered; an owner that does not answer lends nothing (the
/// refs then live as long as the value's object does).
pub fn borrow_decoded(decoded: DecodedRefs) {
    let Ok(worker) = crate::runtime::current() else { return };
    let mut by_owner: std::collections::HashMap<Arc<str>, Vec<ObjectId>> = std::collections::HashMap::new();
    for (id, owner) in decoded.0 {
        let Some(borrowed) = worker.borrows.holder_of(&id) else { continue };
        if borrowed.lenders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty() {
            by_owner.entry(owner).or_default().push(id);
        }
    }
    if by_owner.is_empty() {
        return;
    }
    let asks = by_owner.into_iter().map(|(owner, mut ids)| {
        ids.sort_unstable();
        ids.dedup();
        let worker = worker.clone();
        async move {
            let channel = worker.channel(&owner).ok()?;
            let request = BorrowObjectsRequest {
                object_ids: ids.iter().map(ObjectId::to_vec).collect(),
                borrower_address: worker.address.to_string(),
            };
            let mut owner_client = CoreWorkerClient::new(channel);
            match tokio::time::timeout(BORROW_TIMEOUT, owner_client.borrow_objects(request)).await {
                Ok(Ok(reply)) => Some((owner, reply.into_inner().lent)),
                Ok(Err(status)) => {
                    tracing::debug!(owner = %owner, error = %status.message(), "an owner lent nothing");
                    None
                }
                Err(_) => None,
            }
        }
    });
    let answers = crate::runtime::block_on(futures::future::join_all(asks));
    for (owner, lent) in answers.into_iter().flatten() {
        for id in lent.iter().filter_map(|id| ObjectId::from_bytes(id).ok()) {
            match worker.borrows.holder_of(&id) {
                Some(borrowed) => borrowed.add_lend(&owner),
                // Dropped meanwhile: the lend goes back at once.
                None => give_back(&worker, &owner, vec![(id, 1)]),
            }
        }
    }
}

/// The handles a call's arguments hold (refs inside argument values).
fn argument_handles(args: &[Arg]) -> impl Iterator<Item = &ObjectRef<()>> {
    args.iter().flat_map(|arg| match arg {
        Arg::Holding(_, handles) => handles.as_slice(),
        _ => &[],
    })
}

impl Borrows {
    /// The local count of `id`, an object of another process, for a handle decoded here.
    pub(crate) fn holder(&self, id: ObjectId, owner: &str) -> Arc<Borrowed> {
        REVIVED.with(|revived| {
            if let Some(revived) = revived.borrow_mut().as_mut() {
                revived.push((id, Arc::from(owner)));
            }
        });
        if let Some(borrowed) = self.held.get(&id).and_then(|weak| weak.upgrade()) {
            return borrowed;
        }
        let mut slot = self.held.entry(id).or_default();
        if let Some(borrowed) = slot.upgrade() {
            return borrowed;
        }
        let borrowed = Arc::new(Borrowed { id, lenders: Mutex::new(Vec::new()) });
        *slot = Arc::downgrade(&borrowed);
        borrowed
    }

    /// The caller's side of a reply from the worker at `lender` to a call with `args`
    /// whose value is `container`: the refs lent with the value are held while it is kept,
    /// and the refs the worker kept from the arguments are lent to it.
    pub(crate) fn settle_reply(&self, container: ObjectId, reply: &PushTaskReply, args: &[Arg], lender: &str) {
        if reply.lent.is_empty() && reply.kept.is_empty() {
            return;
        }
        let lender: Arc<str> = Arc::from(lender);
        for id in reply.kept.iter().take(MAX_LENT_PER_REPLY) {
            let Some(handle) = argument_handles(args).find(|handle| handle.id().as_bytes() == id.as_slice()) else {
                continue;
            };
            self.lent.entry(handle.id()).or_default().push((lender.clone(), handle.clone()));
        }
        if !reply.kept.is_empty() {
            self.report_holding();
        }
        let mut holding = Vec::new();
        let mut returned = Vec::new();
        for lent in reply.lent.iter().take(MAX_LENT_PER_REPLY) {
            let Ok(id) = ObjectId::from_bytes(&lent.object_id) else { continue };
            if let Some(own) = argument_handles(args).find(|handle| handle.id() == id) {
                // This process passed it in: its own handle holds it, and the lend goes back
                // (else each would hold the object for the other, for ever).
                holding.push(own.clone());
                returned.push((id, 1));
                continue;
            }
            let borrowed = self.holder_untracked(id, &lent.owner);
            borrowed.add_lend(&lender);
            holding.push(ObjectRef::borrowed(id, Arc::from(lent.owner.as_str()), Some(borrowed)));
        }
        if !holding.is_empty() {
            self.contained.entry(container).or_default().extend(holding);
        }
        if let Ok(worker) = crate::runtime::current() {
            give_back(&worker, &lender, returned);
        }
    }

    /// The local count of `id` (not counted as decoded by the running call).
    fn holder_untracked(&self, id: ObjectId, owner: &str) -> Arc<Borrowed> {
        let (borrowed, _) = collect_decoded(|| self.holder(id, owner));
        borrowed
    }

    /// The local count of `id` if a handle here holds it.
    pub(crate) fn holder_of(&self, id: &ObjectId) -> Option<Arc<Borrowed>> {
        self.held.get(id).and_then(|weak| weak.upgrade())
    }

    /// `container` is forgotten: the refs its value held go (given back when nothing else
    /// holds them).
    pub(crate) fn forget_container(&self, container: &ObjectId) {
        let held = self.contained.remove(container);
        drop(held);
    }

    /// After a call from `caller`: which of the objects it decoded (`revived`) this
    /// process still holds, other than in `reply_refs` (its return value's refs). Each
    /// counts one lend from the caller, who is told to keep it (`PushTaskReply.kept`).
    pub(crate) fn keep_after_call(
        &self,
        mut revived: Vec<ObjectId>,
        reply_refs: &[ObjectRef<()>],
        caller: &Arc<str>,
    ) -> Vec<Vec<u8>> {
        revived.sort_unstable();
        revived.dedup();
        let mut kept = Vec::new();
        for id in revived.into_iter().take(MAX_LENT_PER_REPLY) {
            let Some(borrowed) = self.holder_of(&id) else { continue };
            let in_reply = reply_refs.iter().filter(|handle| handle.id() == id && handle.holds_borrow()).count();
            // One count is `borrowed` itself.
            if Arc::strong_count(&borrowed) > 1 + in_reply {
                borrowed.add_lend(caller);
                kept.push(id.to_vec());
            }
        }
        kept
    }

    /// Lends `refs` (handles this process holds, found in a call's return value) to the
    /// process at `borrower`: each keeps its object until that borrower gives it back.
    /// Handles that hold nothing (decoded while a caller held the object for the call)
    /// are named anyway: the borrower's release of them is ignored.
    pub(crate) fn lend(&self, refs: Vec<ObjectRef<()>>, borrower: Arc<str>) -> Vec<LentRef> {
        let lent: Vec<LentRef> = refs
            .into_iter()
            .take(MAX_LENT_PER_REPLY)
            .map(|handle| {
                let lent = LentRef { object_id: handle.id().to_vec(), owner: handle.owner_address().to_string() };
                self.lent.entry(handle.id()).or_default().push((borrower.clone(), handle));
                lent
            })
            .collect();
        if !lent.is_empty() {
            self.report_holding();
        }
        lent
    }

    /// Lends the process at `borrower` each of `ids` this process still owns (it read
    /// them in a value it got: `BorrowObjects`); returns those lent.
    pub(crate) fn lend_owned(&self, worker: &CoreWorker, ids: &[ObjectId], borrower: &str) -> Vec<ObjectId> {
        let borrower: Arc<str> = Arc::from(borrower);
        let mut lent = Vec::new();
        for id in ids.iter().take(MAX_LENT_PER_REPLY) {
            let Some(entry) = worker.objects.revive(id) else { continue };
            let handle = ObjectRef::counted(*id, worker.address.clone(), entry);
            self.lent.entry(*id).or_default().push((borrower.clone(), handle));
            lent.push(*id);
        }
        if !lent.is_empty() {
            self.report_holding();
        }
        lent
    }

    /// Tells this worker's node whether it holds objects for others now: while it does, it
    /// is not stopped for being idle (`crate::blocked`).
    fn report_holding(&self) {
        let Ok(worker) = crate::runtime::current() else { return };
        if let Some(reporter) = worker.blocked.get() {
            reporter.set_holding(!self.lent.is_empty());
        }
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
        if !returned.is_empty() {
            self.report_holding();
        }
        drop(returned);
    }
}
