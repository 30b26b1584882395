//! Borrowers: a ref that travels from one process to another keeps its object alive for
//! as long as the process it reached holds it (Ray's ownership protocol, by lends).
//!
//! Every handle of an object this process does not own shares one [`Borrowed`] per
//! object: the local count. A `Borrowed` remembers who *lent* the object here, and how
//! many times; when the last handle goes, each lender gets its lends back
//! (`ReleaseBorrows`). A lender keeps a handle per lend still out (`Borrows::lent`, under
//! the borrower's address): a counted handle when it owns the object, else a handle on
//! its own `Borrowed`.
//!
//! How a process comes to hold lends:
//! - *return values*: the worker that ran a task or actor call lends the caller every ref
//!   in the value that it holds (`PushTaskReply.lent`); the caller's entry of the return
//!   object holds them while the value is kept. A ref the caller itself passed in the
//!   call's arguments is held with the caller's own handle instead (the lend goes back at
//!   once). A ref the worker only borrowed is lent on through its own borrow, and the
//!   caller then borrows it from its owner and gives the worker's lend back;
//! - *refs kept after a call* (stored in an actor's state, passed on to a task still
//!   running): the worker borrows each from its owner (`BorrowObjects`) before it replies,
//!   while the caller still holds the call's arguments;
//! - *refs read inside a value got with `get`*: the reader borrows them from their owners
//!   before `get` returns, while it still holds the value's ref ([`borrow_decoded`]).
//!
//! So in a steady state every lend comes from an owner: borrowers lend each other only
//! for the moment a relend is exchanged, and no two processes hold an object for each
//! other for ever.
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
//! until it exits itself); a worker with lends out is still stopped when its lease fails
//! or its lease holder dies; async actor methods lend nothing in their replies and borrow
//! nothing they keep; the caller's address on a task or call stream is its own word
//! (another process of the same account could name it).

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Its owner (for `ionet memory`).
    owner: Arc<str>,
    /// The processes that lent it here, with how many lends each (given back on drop).
    lenders: Mutex<Vec<(Arc<str>, u32)>>,
}

impl Borrowed {
    fn lent_by_nobody(&self) -> bool {
        self.lenders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty()
    }

    /// Takes back one lend of `lender` (false: none was counted).
    fn take_lend(&self, lender: &Arc<str>) -> bool {
        let mut lenders = self.lenders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(index) = lenders.iter().position(|(known, _)| known == lender) else { return false };
        lenders[index].1 -= 1;
        if lenders[index].1 == 0 {
            lenders.remove(index);
        }
        true
    }

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
    /// How many handles `lent` holds (counted before each goes in, so never below it):
    /// read by this worker's holding report (`crate::blocked`).
    lends_out: Arc<AtomicUsize>,
}

/// What [`Borrows::census`] counts.
#[derive(Default)]
pub(crate) struct Census {
    pub borrowed: Vec<(ObjectId, Arc<str>, usize)>,
    pub lent: std::collections::HashMap<ObjectId, usize>,
    pub captured: std::collections::HashMap<ObjectId, usize>,
}

/// The most lends one reply may carry (more are not registered, and so never released:
/// the lender keeps those objects until it exits).
const MAX_LENT_PER_REPLY: usize = 10_000;

/// Objects of other processes whose handles were decoded, with their owners.
#[derive(Default)]
pub struct DecodedRefs(Vec<(ObjectId, Arc<str>)>);

impl DecodedRefs {
    pub(crate) fn extend(&mut self, other: DecodedRefs) {
        self.0.extend(other.0);
    }
}

std::thread_local! {
    /// While a call runs or a value read by `get` is decoded: the objects of other
    /// processes whose handles were decoded.
    static REVIVED: RefCell<Option<Vec<(ObjectId, Arc<str>)>>> = const { RefCell::new(None) };
}

/// Runs `decode` and returns, with its result, the refs to other processes' objects it
/// decoded: a value read by `get` holds them only while its own object lives, so
/// [`borrow_decoded`] asks their owners for lends of their own.
pub fn collect_decoded<R>(decode: impl FnOnce() -> R) -> (R, DecodedRefs) {
    let (result, found) = crate::object_ref::collecting(&REVIVED, decode);
    (result, DecodedRefs(found))
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
    let wanted = decoded
        .0
        .into_iter()
        .filter(|(id, _)| worker.borrows.holder_of(id).is_some_and(|borrowed| borrowed.lent_by_nobody()))
        .collect();
    borrow_from_owners(&worker, wanted);
}

/// Asks the owners of `wanted` for a lend of each (blocking up to [`BORROW_TIMEOUT`]).
fn borrow_from_owners(worker: &Arc<CoreWorker>, wanted: Vec<(ObjectId, Arc<str>)>) {
    if wanted.is_empty() {
        return;
    }
    let asked = wanted.len();
    let counted: usize = crate::runtime::block_on(ask_owners(worker, wanted)).iter().map(|(_, ids)| ids.len()).sum();
    if counted < asked {
        tracing::debug!(asked, counted, "owners lent fewer objects than asked (gone, freed, or slow)");
    }
}

/// How long an ask of an owner may take before its answer is no longer waited for.
const OWNER_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Asks each owner in `wanted` to lend this process its objects there (`BorrowObjects`).
/// Each answer is settled when it comes, even after the asker stopped waiting (so no lend
/// an owner made is lost): counted on the object's local count, or given back at once when
/// nothing here holds the object any more. Returns, per owner, the objects whose lends
/// were counted by the time the wait ended ([`BORROW_TIMEOUT`] at most).
async fn ask_owners(worker: &Arc<CoreWorker>, wanted: Vec<(ObjectId, Arc<str>)>) -> Vec<(Arc<str>, Vec<ObjectId>)> {
    let mut by_owner: std::collections::HashMap<Arc<str>, Vec<ObjectId>> = std::collections::HashMap::new();
    for (id, owner) in wanted {
        by_owner.entry(owner).or_default().push(id);
    }
    let asks = by_owner.into_iter().map(|(owner, mut ids)| {
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(MAX_LENT_PER_REPLY);
        let (worker, runtime) = (worker.clone(), worker.handle.clone());
        let answer = runtime.spawn(async move {
            let channel = worker.channel(&owner).ok()?;
            let request = BorrowObjectsRequest {
                object_ids: ids.iter().map(ObjectId::to_vec).collect(),
                borrower_address: worker.address.to_string(),
            };
            let mut owner_client = CoreWorkerClient::new(channel);
            let reply = match tokio::time::timeout(OWNER_ANSWER_TIMEOUT, owner_client.borrow_objects(request)).await {
                Ok(Ok(reply)) => reply.into_inner(),
                Ok(Err(status)) => {
                    tracing::debug!(owner = %owner, error = %status.message(), "an owner lent nothing");
                    return None;
                }
                Err(_) => return None,
            };
            let mut counted = Vec::new();
            for id in reply.lent.iter().filter_map(|id| ObjectId::from_bytes(id).ok()) {
                match worker.borrows.holder_of(&id) {
                    Some(borrowed) => {
                        borrowed.add_lend(&owner);
                        counted.push(id);
                    }
                    // Dropped meanwhile: the lend goes back at once.
                    None => give_back(&worker, &owner, vec![(id, 1)]),
                }
            }
            Some((owner, counted))
        });
        async move { tokio::time::timeout(BORROW_TIMEOUT, answer).await.ok().and_then(Result::ok).flatten() }
    });
    futures::future::join_all(asks).await.into_iter().flatten().collect()
}

/// Every handle a call's arguments hold: refs passed by ref, and refs inside values.
fn argument_handles(args: &[Arg]) -> impl Iterator<Item = &ObjectRef<()>> {
    args.iter().flat_map(|arg| match arg {
        Arg::Holding(_, handles) => handles.as_slice(),
        Arg::Ref(handle) => std::slice::from_ref(handle),
        Arg::Value(_) => &[],
    })
}

impl Borrows {
    /// The local count of `id`, an object of another process, for a handle decoded here.
    pub(crate) fn holder(&self, id: ObjectId, owner: &Arc<str>) -> Arc<Borrowed> {
        REVIVED.with(|revived| {
            if let Some(revived) = revived.borrow_mut().as_mut() {
                revived.push((id, owner.clone()));
            }
        });
        if let Some(borrowed) = self.held.get(&id).and_then(|weak| weak.upgrade()) {
            return borrowed;
        }
        let mut slot = self.held.entry(id).or_default();
        if let Some(borrowed) = slot.upgrade() {
            return borrowed;
        }
        let borrowed = Arc::new(Borrowed { id, owner: owner.clone(), lenders: Mutex::new(Vec::new()) });
        *slot = Arc::downgrade(&borrowed);
        borrowed
    }

    /// The caller's side of a reply from the worker at `lender` to a call with `args`
    /// whose value is `container`: the refs lent with the value are held while it is kept.
    /// A ref the worker lent on through its own borrow is then borrowed from its owner,
    /// and the worker's lend given back (so borrowers lend each other nothing for long).
    pub(crate) fn settle_reply(&self, container: ObjectId, reply: &PushTaskReply, args: &[Arg], lender: &str) {
        if reply.lent.is_empty() {
            return;
        }
        let lender: Arc<str> = Arc::from(lender);
        let own: std::collections::HashMap<ObjectId, &ObjectRef<()>> =
            argument_handles(args).map(|handle| (handle.id(), handle)).collect();
        let mut holding = Vec::new();
        let mut returned = Vec::new();
        let mut relent = Vec::new();
        for lent in reply.lent.iter().take(MAX_LENT_PER_REPLY) {
            let Ok(id) = ObjectId::from_bytes(&lent.object_id) else { continue };
            if let Some(own) = own.get(&id) {
                // This process passed it in: its own handle holds it, and the lend goes back.
                holding.push((*own).clone());
                returned.push((id, 1));
                continue;
            }
            let owner: Arc<str> = Arc::from(lent.owner.as_str());
            let borrowed = self.holder_untracked(id, &owner);
            borrowed.add_lend(&lender);
            if owner != lender {
                relent.push((id, owner.clone()));
            }
            holding.push(ObjectRef::borrowed(id, owner, Some(borrowed)));
        }
        if !holding.is_empty() {
            self.contained.entry(container).or_default().extend(holding);
        }
        let Ok(worker) = crate::runtime::current() else { return };
        give_back(&worker, &lender, returned);
        if !relent.is_empty() {
            // The call's arguments may be all that holds those objects at their owners
            // (the worker may have read them out of an argument's value, holding no lend
            // of its own): kept until the owners have answered.
            let arguments: Vec<ObjectRef<()>> = argument_handles(args).cloned().collect();
            worker.handle.clone().spawn(async move {
                for (_, ids) in ask_owners(&worker, relent).await {
                    for id in ids {
                        let Some(borrowed) = worker.borrows.holder_of(&id) else { continue };
                        if borrowed.take_lend(&lender) {
                            give_back(&worker, &lender, vec![(id, 1)]);
                        }
                    }
                }
                drop(arguments);
            });
        }
    }

    /// The local count of `id` (not counted as decoded by the running call).
    fn holder_untracked(&self, id: ObjectId, owner: &Arc<str>) -> Arc<Borrowed> {
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

    /// After a call: the objects of others it decoded (`decoded`) that this process still
    /// holds, other than in `reply_refs` (its return value's refs), and holds by no lend,
    /// are borrowed from their owners before the reply goes (the caller holds them for
    /// the call until then).
    pub(crate) fn borrow_kept(&self, decoded: DecodedRefs, reply_refs: &[ObjectRef<()>]) {
        let mut kept = Vec::new();
        for (id, owner) in decoded.0 {
            let Some(borrowed) = self.holder_of(&id) else { continue };
            let in_reply = reply_refs.iter().filter(|handle| handle.id() == id && handle.holds_borrow()).count();
            // One count is `borrowed` itself.
            if Arc::strong_count(&borrowed) > 1 + in_reply && borrowed.lent_by_nobody() {
                kept.push((id, owner));
            }
        }
        if let Ok(worker) = crate::runtime::current() {
            borrow_from_owners(&worker, kept);
        }
    }

    /// Lends `refs` (handles this process holds, found in a call's return value) to the
    /// process at `borrower`: each keeps its object until that borrower gives it back.
    /// A handle holding no lend of its own (read out of an argument) still counts: the
    /// borrower turns it into a lend from the owner while the caller holds the argument.
    pub(crate) fn lend(&self, refs: Vec<ObjectRef<()>>, borrower: Arc<str>) -> Vec<LentRef> {
        let lent: Vec<LentRef> = refs
            .into_iter()
            .take(MAX_LENT_PER_REPLY)
            .map(|handle| {
                let lent = LentRef { object_id: handle.id().to_vec(), owner: handle.owner_address().to_string() };
                self.lends_out.fetch_add(1, Ordering::SeqCst);
                self.lent.entry(handle.id()).or_default().push((borrower.clone(), handle));
                lent
            })
            .collect();
        self.lends_changed(lent.len());
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
            self.lends_out.fetch_add(1, Ordering::SeqCst);
            self.lent.entry(*id).or_default().push((borrower.clone(), handle));
            lent.push(*id);
        }
        self.lends_changed(lent.len());
        lent
    }

    /// What the borrows keep alive, for `ionet memory`: each borrowed object with its
    /// owner and its handles here; how many lends of each object are out; how many owned
    /// values hold each object inside.
    pub(crate) fn census(&self) -> Census {
        let mut census = Census::default();
        // Upgraded only once the map is let go: the last handle of one may go meanwhile,
        // and its drop (ours, then) takes the map's lock.
        let weaks: Vec<Weak<Borrowed>> = self.held.iter().map(|held| held.value().clone()).collect();
        for weak in weaks {
            if let Some(borrowed) = weak.upgrade() {
                // One count is the `upgrade` itself.
                let handles = Arc::strong_count(&borrowed).saturating_sub(1);
                census.borrowed.push((borrowed.id, borrowed.owner.clone(), handles));
            }
        }
        for out in self.lent.iter() {
            *census.lent.entry(*out.key()).or_default() += out.value().len();
        }
        for inside in self.contained.iter() {
            for handle in inside.value() {
                *census.captured.entry(handle.id()).or_default() += 1;
            }
        }
        census
    }

    /// The count of lends out, for this worker's holding report.
    pub(crate) fn lends_counter(&self) -> Arc<AtomicUsize> {
        self.lends_out.clone()
    }

    /// `changed` lends went out or came back: this worker's node hears when it starts or
    /// stops holding objects for others (`crate::blocked`), and does not stop it for
    /// being idle meanwhile.
    fn lends_changed(&self, changed: usize) {
        if changed == 0 {
            return;
        }
        let Ok(worker) = crate::runtime::current() else { return };
        if let Some(reporter) = worker.blocked.get() {
            reporter.lends_changed();
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
        self.lends_out.fetch_sub(returned.len(), Ordering::SeqCst);
        self.lends_changed(returned.len());
        drop(returned);
    }
}
