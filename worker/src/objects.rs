//! The node daemon's object store: the shared-memory store of this node, pulls from
//! other nodes, and the record of which nodes hold copies of objects made here.
//!
//! Invariants:
//! - Processes on the node write objects straight into the store's files and read them
//!   by mapping; the daemon only reserves room (`create`), publishes (`seal`), restores
//!   from spill and pulls, so bytes never cross a socket on one node.
//! - A copy pulled from another node is reported to the node holding the primary copy,
//!   so that freeing the primary frees every copy.
//! - An object a job creates here is its account's: only a job of that account (or a
//!   peer node, or the head) may seal or free it. Ids are random (224 bits), so another
//!   tenant cannot name one it was not given; one it was given still cannot be freed.
//! - An object a process of this node owns (its put) is freed here, with every copy, when
//!   that process exits: nobody can read an object whose owner is gone.
//! - A node given notice moves the primary copies it holds to other nodes before it
//!   leaves ([`NodeObjects::primaries`] → a peer's [`NodeObjects::take`]): the taker
//!   holds each as its own primary copy (its account's, with the copies it knew of), and
//!   the head records where each went, for readers and owners who ask the node that left.

use std::sync::Arc;

use dashmap::DashMap;
use ionet_common::auth::SharedCredential;
use ionet_common::authz::Principal;
use ionet_common::rpc::proto::node::{AddObjectLocationRequest, FreeObjectsRequest, NodeObject, TakenObject};
use ionet_common::rpc::{self, NodeManagerClient};
use ionet_common::{IonetError, IonetResult, ObjectId};
use ionet_object_store::{LocalObjectStore, ObjectStoreError, Puller, StoreConfig};

use crate::identities::WorkerIdentities;

pub struct NodeObjects {
    pub store: Arc<LocalObjectStore>,
    puller: Puller,
    /// The node's credential: its calls to peer nodes carry it.
    credential: SharedCredential,
    own_address: String,
    /// For objects whose primary copy is here: the nodes that pulled a copy.
    copies: DashMap<ObjectId, Vec<String>>,
    /// For objects a job created or pulled here: its account.
    creators: Arc<DashMap<ObjectId, Arc<str>>>,
    /// Objects whose primary copy is here: made here, or taken from a node that left
    /// (`true`: taken, so the head records a move to forget when it is freed).
    primaries: DashMap<ObjectId, bool>,
    /// Objects owned by a process of this node (its puts), by its address, freed when it
    /// exits; and each such object's owner.
    owned: DashMap<Arc<str>, std::collections::HashSet<ObjectId>>,
    owner_of: DashMap<ObjectId, Arc<str>>,
    /// One `ensure_local` at a time per object: the account a copy is pulled for is the
    /// one recorded for it.
    ensuring: DashMap<ObjectId, Arc<tokio::sync::Mutex<()>>>,
    /// Jobs' identities when they run as users of their own: an account's objects are
    /// readable by its group alone.
    identities: Option<Arc<WorkerIdentities>>,
}

/// Default store capacity: 30% of the machine's memory, as Ray's default.
pub fn default_capacity() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(8 * 1024 * 1024);
    kib * 1024 * 3 / 10
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ObjectStoreError> + Send + 'static,
) -> IonetResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| IonetError::Internal(format!("object store task failed: {err}")))?
        .map_err(Into::into)
}

impl NodeObjects {
    pub fn new(
        capacity: u64,
        credential: SharedCredential,
        own_address: String,
        identities: Option<Arc<WorkerIdentities>>,
    ) -> IonetResult<Self> {
        let capacity = if capacity == 0 { default_capacity() } else { capacity };
        let config = StoreConfig { separate_users: identities.is_some(), ..StoreConfig::with_capacity(capacity) };
        let store = Arc::new(LocalObjectStore::new(config).map_err(IonetError::from)?);
        Ok(Self {
            puller: Puller::new(store.clone(), credential.clone()),
            store,
            credential,
            own_address,
            copies: DashMap::new(),
            creators: Arc::new(DashMap::new()),
            primaries: DashMap::new(),
            owned: DashMap::new(),
            owner_of: DashMap::new(),
            ensuring: DashMap::new(),
            identities,
        })
    }

    /// The group that may read `caller`'s objects here, when jobs run as users of their own.
    fn group_of(&self, caller: &Principal) -> IonetResult<Option<u32>> {
        match (caller, &self.identities) {
            (Principal::Job { account, .. }, Some(identities)) => identities.group_of_account(account).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether an object here is `account`'s (for peers pulling a copy for one of its
    /// jobs). An object of no record (none a job made) is no account's.
    pub fn owner_check(&self) -> ionet_object_store::OwnerCheck {
        let creators = self.creators.clone();
        Arc::new(move |id, account| creators.get(id).is_some_and(|owner| **owner == *account))
    }

    /// The store's sealed objects of `account` (every account's when `None`), largest
    /// first, at most `limit`; and whether there were more.
    pub fn listing(&self, account: Option<&str>, limit: usize) -> (Vec<NodeObject>, bool) {
        let (entries, _) = self.store.list(usize::MAX);
        let mut objects = Vec::new();
        let mut more = false;
        for entry in entries {
            let owner = self.creators.get(&entry.id).map(|owner| owner.to_string()).unwrap_or_default();
            if account.is_some_and(|account| account != owner) {
                continue;
            }
            if objects.len() == limit {
                more = true;
                break;
            }
            objects.push(NodeObject {
                object_id: entry.id.to_vec(),
                size: entry.size,
                account: owner,
                primary: self.primaries.contains_key(&entry.id),
                spilled: entry.spilled,
                in_memory: entry.in_memory,
                pins: entry.pins,
                owner_address: self.owner_of.get(&entry.id).map(|owner| owner.to_string()).unwrap_or_default(),
                copies: self.copies.get(&entry.id).map_or(0, |copies| copies.len() as u32),
            });
        }
        (objects, more)
    }

    pub fn dir(&self) -> String {
        self.store.dir().to_string_lossy().into_owned()
    }

    /// Reserves room for an object `creator` writes; a job's object is its account's.
    /// `owner`: the address of the process owning it (empty: its owner is elsewhere).
    pub async fn create(&self, id: &[u8], size: u64, creator: &Principal, owner: &str) -> IonetResult<()> {
        let id = ObjectId::from_bytes(id)?;
        let store = self.store.clone();
        // The writer is another process: no mapping here.
        let group = self.group_of(creator)?;
        blocking(move || store.create_for_client(id, size, group)).await?;
        if let Principal::Job { account, .. } = creator {
            self.creators.insert(id, account.clone());
        }
        if !owner.is_empty() {
            let owner: Arc<str> = owner.into();
            self.owned.entry(owner.clone()).or_default().insert(id);
            self.owner_of.insert(id, owner);
        }
        Ok(())
    }

    /// The process at `owner` exited: the objects it owned here go, with their copies.
    /// Returns how many were here.
    pub async fn owner_exited(&self, owner: &str) -> u64 {
        let Some((_, ids)) = self.owned.remove(owner) else { return 0 };
        let ids: Vec<ObjectId> = ids.into_iter().collect();
        for id in &ids {
            self.owner_of.remove(id);
        }
        match self.free_ids(ids).await {
            Ok((freed, _)) => {
                if freed > 0 {
                    tracing::debug!(%owner, freed, "an owner exited: its objects are freed");
                }
                freed
            }
            Err(err) => {
                tracing::warn!(%owner, error = %err, "could not free the objects of an owner that exited");
                0
            }
        }
    }

    pub async fn seal(&self, id: &[u8], caller: &Principal) -> IonetResult<()> {
        let id = ObjectId::from_bytes(id)?;
        self.check_creator(&id, caller, "seal")?;
        let store = self.store.clone();
        let group = self.group_of(caller)?;
        blocking(move || store.seal_for(&id, group).map(drop)).await?;
        // A file its writer made itself is recorded now.
        if let Principal::Job { account, .. } = caller {
            self.creators.entry(id).or_insert_with(|| account.clone());
        }
        self.primaries.entry(id).or_insert(false);
        Ok(())
    }

    /// The primary copies held here that outlive this node's processes (their owners are
    /// elsewhere), as a peer takes them: account and known copies.
    pub fn primaries(&self) -> Vec<TakenObject> {
        self.primaries
            .iter()
            // A put of a process here dies with it (this node's processes go with it).
            .filter(|entry| !self.owner_of.contains_key(entry.key()))
            .filter_map(|entry| {
                let id = *entry.key();
                let account = self.creators.get(&id)?.to_string();
                let copies = self.copies.get(&id).map(|holders| holders.clone()).unwrap_or_default();
                Some(TakenObject { object_id: id.to_vec(), account, copies })
            })
            .collect()
    }

    /// Takes the primary copies of `objects` from `source` (a node leaving): pulls each
    /// not here yet, for its account (the source vouches for it), and holds it as its own
    /// from now on. A copy already here stays whose it is: one of another account is not
    /// taken. `copies` are kept only where `is_node` says a node of the cluster is (freeing
    /// calls them with this node's credential). Returns the ids taken (one that could not
    /// be pulled is left out).
    pub async fn take(&self, source: &str, objects: Vec<TakenObject>, is_node: impl Fn(&str) -> bool) -> Vec<ObjectId> {
        let mut taken = Vec::with_capacity(objects.len());
        for object in objects {
            let Ok(id) = ObjectId::from_bytes(&object.object_id) else { continue };
            let account: Arc<str> = object.account.as_str().into();
            let store = self.store.clone();
            let here = blocking(move || store.get(&id)).await.is_ok_and(|found| found.is_some());
            if here && self.creators.get(&id).is_some_and(|owner| **owner != *account) {
                tracing::warn!(object = %id.short(), %source, "a leaving node handed over an object held here for another account; not taken");
                continue;
            }
            if !here {
                if let Err(err) = self.puller.pull_for(source, id, &account).await {
                    tracing::warn!(object = %id.short(), %source, error = %err, "could not take an object from a leaving node");
                    continue;
                }
            }
            if let Some(identities) = &self.identities {
                if let Ok(group) = identities.group_of_account(&account) {
                    let store = self.store.clone();
                    let _ = blocking(move || store.set_group(&id, group)).await;
                }
            }
            self.creators.insert(id, account);
            self.primaries.insert(id, true);
            let others: Vec<String> = object
                .copies
                .into_iter()
                .filter(|holder| *holder != self.own_address && holder != source && is_node(holder))
                .collect();
            if !others.is_empty() {
                let mut holders = self.copies.entry(id).or_default();
                for holder in others {
                    if !holders.contains(&holder) {
                        holders.push(holder);
                    }
                }
            }
            taken.push(id);
        }
        taken
    }

    /// Whether `caller` may change object `id`: a job only what its account created here
    /// (or what no job did: a copy pulled from another node); a node or the head, any.
    fn check_creator(&self, id: &ObjectId, caller: &Principal, what: &str) -> IonetResult<()> {
        let Principal::Job { account, .. } = caller else { return Ok(()) };
        match self.creators.get(id) {
            Some(owner) if **owner != **account => Err(IonetError::PermissionDenied(format!(
                "{caller} may not {what} object {}: it belongs to account {}",
                id.short(),
                *owner
            ))),
            _ => Ok(()),
        }
    }

    /// Makes the object readable here: restored from spill, or pulled from `source` (a
    /// copy pulled for `caller` is readable by its account's group).
    pub async fn ensure_local(&self, id: &[u8], source: &str, caller: &Principal) -> IonetResult<()> {
        let id = ObjectId::from_bytes(id)?;
        let account = match caller {
            Principal::Job { account, .. } => Some(account.clone()),
            _ => None,
        };
        let turn = self.ensuring.entry(id).or_default().clone();
        let _turn = turn.lock().await;
        let result = self.ensure_local_in_turn(id, source, account).await;
        drop(_turn);
        self.ensuring.remove_if(&id, |_, turn| Arc::strong_count(turn) == 1);
        result
    }

    async fn ensure_local_in_turn(&self, id: ObjectId, source: &str, account: Option<Arc<str>>) -> IonetResult<()> {
        let store = self.store.clone();
        if blocking(move || store.get(&id)).await?.is_some() {
            // Here already: a job's only if its account's.
            if let Some(account) = &account {
                if self.creators.get(&id).is_none_or(|owner| **owner != **account) {
                    return Err(IonetError::PermissionDenied(format!(
                        "object {} on this node is not account {account}'s",
                        id.short()
                    )));
                }
            }
            return Ok(());
        }
        if source.is_empty() || source == self.own_address {
            return Err(IonetError::ObjectLost(format!("object {} is not in the store of this node", id.short())));
        }
        let for_account = account.as_deref().unwrap_or("");
        self.puller.pull_for(source, id, for_account).await.map_err(|err| match err {
            ObjectStoreError::PullFailed { code: tonic::Code::PermissionDenied, message, .. } => {
                IonetError::PermissionDenied(message)
            }
            err => IonetError::ObjectLost(format!("object {} could not be pulled from {source}: {err}", id.short())),
        })?;
        if let Some(account) = &account {
            // The copy is the account's the source vouched for.
            self.creators.insert(id, account.clone());
            if let Some(group) = self.identities.as_ref().map(|identities| identities.group_of_account(account)) {
                let (store, group) = (self.store.clone(), group?);
                blocking(move || store.set_group(&id, group)).await?;
            }
        }
        // Tell the primary's node, so freeing the object frees this copy too.
        let (credential, source, own) = (self.credential.clone(), source.to_string(), self.own_address.clone());
        tokio::spawn(async move {
            if let Ok(channel) = rpc::connect_shared(&source, &credential, std::time::Duration::from_secs(5)).await {
                let request = AddObjectLocationRequest { object_id: id.to_vec(), holder_address: own };
                let _ = NodeManagerClient::new(channel).add_object_location(request).await;
            }
        });
        Ok(())
    }

    pub fn add_location(&self, id: &[u8], holder: String) -> IonetResult<()> {
        let id = ObjectId::from_bytes(id)?;
        let mut holders = self.copies.entry(id).or_default();
        if !holders.contains(&holder) {
            holders.push(holder);
        }
        Ok(())
    }

    /// Deletes the objects here and asks every node holding a copy to do the same. A job
    /// frees its own account's objects only: one of another's refuses the whole call.
    /// Returns how many were here, and which of them were taken from a node that left.
    pub async fn free(&self, ids: &[Vec<u8>], caller: &Principal) -> IonetResult<(u64, Vec<ObjectId>)> {
        let ids = ids.iter().map(|id| ObjectId::from_bytes(id)).collect::<IonetResult<Vec<_>>>()?;
        for id in &ids {
            self.check_creator(id, caller, "free")?;
        }
        for id in &ids {
            if let Some((_, owner)) = self.owner_of.remove(id) {
                if let Some(mut owned) = self.owned.get_mut(&owner) {
                    owned.remove(id);
                }
                self.owned.remove_if(&owner, |_, owned| owned.is_empty());
            }
        }
        self.free_ids(ids).await
    }

    /// Deletes `ids` here and at the nodes holding copies (no check: the caller's done).
    async fn free_ids(&self, ids: Vec<ObjectId>) -> IonetResult<(u64, Vec<ObjectId>)> {
        let mut taken = Vec::new();
        for id in &ids {
            self.creators.remove(id);
            if let Some((_, true)) = self.primaries.remove(id) {
                taken.push(*id);
            }
        }
        let mut forward: std::collections::HashMap<String, Vec<Vec<u8>>> = std::collections::HashMap::new();
        for id in &ids {
            if let Some((_, holders)) = self.copies.remove(id) {
                for holder in holders {
                    forward.entry(holder).or_default().push(id.to_vec());
                }
            }
        }
        let store = self.store.clone();
        let freed = blocking(move || store.delete_many(&ids)).await?;
        for (holder, object_ids) in forward {
            let credential = self.credential.clone();
            tokio::spawn(async move {
                if let Ok(channel) = rpc::connect_shared(&holder, &credential, std::time::Duration::from_secs(5)).await
                {
                    let _ = NodeManagerClient::new(channel).free_objects(FreeObjectsRequest { object_ids }).await;
                }
            });
        }
        Ok((freed, taken))
    }
}
