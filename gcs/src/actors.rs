//! Actors: the control store's table of stateful workers, and their life cycle.
//!
//! An actor is created PENDING_CREATION. A task of the control store then places it like
//! a task: it asks the creator's node daemon for a worker lease of the actor's resources
//! (following spillbacks, waiting while the cluster is busy), runs the constructor on the
//! leased worker (`CreateActor`), and marks it ALIVE with the worker's address. Callers
//! then talk to that worker directly; the control store is off the call path.
//!
//! Invariants:
//! - At most one incarnation of an actor runs: a new one is placed only after the old
//!   worker's lease was returned as failed (which kills the process), or, for an actor in
//!   a shared process (`share_process`, see `hosts`), after that process ended it (or was
//!   itself killed). A call it was running then may still finish on its thread there;
//!   its reply goes nowhere.
//! - The control store holds a `Watch` stream to every ALIVE actor's worker, and one to the
//!   owner of every non-detached actor. A worker's stream ending means the worker died: the
//!   actor RESTARTS (incarnation + 1, constructor re-run) while `restarts < max_restarts`
//!   (`-1`: forever), else it is DEAD with the cause. An owner's stream ending kills its
//!   non-detached actors. A node declared dead ends the actors on it the same way.
//! - A name is unique per namespace among one account's actors not DEAD (tenants' names
//!   never meet: one cannot take or find another's); a DEAD actor frees its name.
//! - Every change of an actor bumps its version, which its `GetActor` waiters and `WatchActors`
//!   followers watch (each wakes for its own actor's changes only: a thousand waiting callers
//!   cost a change one wake, not a thousand).
//! - At most `max_dead_actors` DEAD actors are remembered: past it the longest dead (whose
//!   lease is returned) are forgotten, in memory and in storage, so a cluster creating
//!   and ending actors for ever keeps its head's memory bounded.
//!
//! Each incarnation's creation is recorded in the head's task table as its creator records
//! a task: one row per actor, the task that creates it (`ACTOR_CREATION_TASK`,
//! `Class.__init__`, [`TaskId::actor_creation`]), whose attempts are its incarnations:
//! waiting for a lease and why, running its constructor on which node and worker, finished
//! when the actor is ALIVE, failed with why when it never was. The state API lists it and
//! the timeline draws it.
//!
//! Every change of a row is written to the head's storage (`Table::Actors`) before
//! anyone can learn of it (a create is answered, an ALIVE address is published), with
//! the lease an incarnation runs on written before its constructor is called. A head
//! restarted from storage ([`Actors::restore`]) carries on where it stopped: an ALIVE
//! actor keeps its worker and incarnation (the head watches its worker and owner again;
//! its callers, who talk to the worker directly, never notice), one being placed is
//! placed again (the lease of a creation cut short is returned as failed first, so no
//! second copy ever runs), and names resolve as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::credential::Issuer;
use ionet_common::failover::ClusterChannel;
use ionet_common::lease::{self, Backoff, LeaseOutcome};
use ionet_common::rpc::proto::common::{NodeState as WireNodeState, ResourceQuantities};
use ionet_common::rpc::proto::gcs::cluster_event::Event;
use ionet_common::rpc::proto::gcs::{ActorInfo, ActorSpec, ActorState, StoredActor, TaskState};
use ionet_common::rpc::proto::metering::HeldLease;
use ionet_common::rpc::proto::node::{
    LeaseGranted, RequestWorkerLeaseRequest, ReturnWorkerLeaseRequest, SchedulingKind,
};
use ionet_common::rpc::proto::worker::{CreateActorRequest, WatchRequest};
use ionet_common::rpc::{self, AuthChannel, CoreWorkerClient, NodeManagerClient};
use ionet_common::task_event_batch::{BatchBuilder, Event as TaskEvent};
use ionet_common::{ActorId, IonetError, IonetResult, JobId, PlacementGroupId, TaskId};
use prost::Message;
use tokio::sync::watch;

use crate::error::{GcsError, GcsResult};
use crate::metering::Metering;
use crate::placement_groups::PlacementGroups;
use crate::state::{blocking, GcsState};
use crate::storage::{StorageWrite, Table};
use crate::task_events::TaskTable;

mod hosts;

/// Pause between placement attempts that failed for a reason that may pass.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// An actor's incarnation running on a lease: what ending it takes.
struct OnLease<'a> {
    spec: &'a ActorSpec,
    actor_id: ActorId,
    incarnation: u32,
    lease_id: &'a [u8],
    node_address: &'a str,
}

impl<'a> OnLease<'a> {
    fn of(spec: &'a ActorSpec, actor_id: ActorId, incarnation: u32, lease_id: &'a [u8], node_address: &'a str) -> Self {
        OnLease { spec, actor_id, incarnation, lease_id, node_address }
    }
}

#[derive(Clone)]
struct Row {
    info: ActorInfo,
    /// The lease the current incarnation runs on: (lease id, node daemon address).
    lease: Option<(Vec<u8>, String)>,
}

pub struct Actors {
    state: Arc<GcsState>,
    /// Mints the credential of an actor's job, which every call the head makes for the
    /// actor carries (its lease, its creation, watching its worker and its owner,
    /// returning its lease): the node starts the actor's worker holding that and nothing
    /// broader, and whatever listens at an address a tenant named learns nothing more
    /// than that tenant's own job's credential.
    issuer: Issuer,
    /// Where an actor in a placement group is placed: its bundle's node.
    placement_groups: Arc<PlacementGroups>,
    /// The head holds actors' leases: it gives the holder's word for them.
    metering: Arc<Metering>,
    /// Where each incarnation's creation is recorded, as a task.
    tasks: Arc<TaskTable>,
    rows: Mutex<HashMap<ActorId, Row>>,
    /// (account, namespace, name) → actor, for actors not DEAD.
    names: Mutex<HashMap<(String, String, String), ActorId>>,
    /// Owners already watched.
    owners: DashMap<String, ()>,
    /// Connections by address, shared between the head's credential and the jobs'.
    channels: DashMap<String, ClusterChannel>,
    /// The version of each actor `GetActor` calls wait on (made by the first waiter,
    /// dropped with the last).
    versions: Mutex<HashMap<ActorId, watch::Sender<u64>>>,
    /// Serialises writes of rows to storage: each writes the row as it is when its turn
    /// comes, so the last write is always the newest state.
    writing: tokio::sync::Mutex<()>,
    /// DEAD actors, longest dead first: the ones forgotten past `max_dead_actors`.
    dead: Mutex<VecDeque<ActorId>>,
    /// Shared processes and their actors (`hosts`).
    hosts: Mutex<hosts::Hosts>,
    /// Held while a new shared process of a key is leased.
    host_starts: DashMap<hosts::HostKey, Arc<tokio::sync::Mutex<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `GetActor` call waiting on an actor: the actor's version goes with the last one.
struct Leaving<'a> {
    versions: &'a Mutex<HashMap<ActorId, watch::Sender<u64>>>,
    id: ActorId,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        let mut versions = lock(self.versions);
        // This waiter's receiver is gone by now (dropped before this guard).
        if versions.get(&self.id).is_some_and(|version| version.receiver_count() == 0) {
            versions.remove(&self.id);
        }
    }
}

fn state_of(info: &ActorInfo) -> ActorState {
    ActorState::try_from(info.state).unwrap_or(ActorState::Unspecified)
}

impl Actors {
    pub fn new(
        state: Arc<GcsState>,
        issuer: Issuer,
        placement_groups: Arc<PlacementGroups>,
        metering: Arc<Metering>,
        tasks: Arc<TaskTable>,
    ) -> Arc<Self> {
        Arc::new(Actors {
            state,
            issuer,
            placement_groups,
            metering,
            tasks,
            rows: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            owners: DashMap::new(),
            channels: DashMap::new(),
            versions: Mutex::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
            dead: Mutex::new(VecDeque::new()),
            hosts: Mutex::new(hosts::Hosts::default()),
            host_starts: DashMap::new(),
        })
    }

    /// Writes `row` to storage (the caller holds `writing`).
    async fn store(&self, actor_id: ActorId, row: &Row) -> GcsResult<()> {
        let (lease_id, lease_node_address) = row.lease.clone().unwrap_or_default();
        let bytes = StoredActor { info: Some(row.info.clone()), lease_id, lease_node_address }.encode_to_vec();
        let storage = self.state.storage().clone();
        blocking(move || storage.put(Table::Actors, actor_id.as_bytes(), &bytes)).await
    }

    /// Records a step of the actor's creation task (attempt `incarnation`) in the head's
    /// task table, as the creator's account's: `step` says the state and what goes with it
    /// (the task, its name, its actor and the time are filled in here). Nothing of an
    /// incarnation a later one superseded (a kill that restarts it) is recorded.
    fn record_creation(&self, spec: &ActorSpec, incarnation: u32, step: TaskEvent<'_>) {
        let (Ok(job), Ok(actor)) = (JobId::from_bytes(&spec.job_id), ActorId::from_bytes(&spec.actor_id)) else {
            return;
        };
        if !lock(&self.rows).get(&actor).is_some_and(|row| row.info.incarnation == incarnation) {
            return;
        }
        let class = if spec.display_class.is_empty() { &spec.class_name } else { &spec.display_class };
        let name = format!("{class}.__init__");
        let task_id = TaskId::actor_creation(&actor);
        let mut batch = BatchBuilder::new(&spec.job_id);
        batch.push(&TaskEvent {
            task_id: task_id.as_bytes(),
            name: &name,
            actor_id: actor.as_bytes(),
            attempt: incarnation,
            time_us: ionet_common::clock::now_us(),
            ..step
        });
        let account: Arc<str> = self.state.payer_of(&job).into();
        if let Err(why) = self.tasks.add(&account, &batch.finish(), 0) {
            tracing::warn!(actor = %actor, %why, "the actor's creation could not be recorded");
        }
    }

    /// Records the end of a creation that never made the actor ALIVE: the cause the row
    /// holds (when it is DEAD), else `cause`.
    fn record_creation_failed(&self, actor_id: &ActorId, spec: &ActorSpec, incarnation: u32, cause: &str) {
        let recorded = lock(&self.rows).get(actor_id).map(|row| row.info.death_cause.clone()).unwrap_or_default();
        let error = if recorded.is_empty() { cause } else { recorded.as_str() };
        self.record_creation(spec, incarnation, TaskEvent { state: TaskState::Failed, error, ..Default::default() });
    }

    /// Changes the actor's row: `change` works on a copy (`None`: no change), the copy is
    /// stored, and only then does it become the row, so nobody sees (nor acts on) a state
    /// the head has not stored. Serialised by `writing`: the row in memory is always the
    /// last one stored. A change that must happen whatever storage says (`must`: the
    /// worker is gone) is made even when storing fails (logged; the next change stores
    /// the whole row again); another is not, and the error is returned.
    async fn transition<T>(
        &self,
        actor_id: ActorId,
        must: bool,
        change: impl FnOnce(&mut Row) -> Option<T>,
    ) -> GcsResult<Option<T>> {
        let _writing = self.writing.lock().await;
        let (row, out) = {
            let rows = lock(&self.rows);
            let Some(current) = rows.get(&actor_id) else { return Ok(None) };
            let mut row = current.clone();
            match change(&mut row) {
                Some(out) => (row, out),
                None => return Ok(None),
            }
        };
        if let Err(err) = self.store(actor_id, &row).await {
            if !must {
                return Err(err);
            }
            tracing::error!(actor = %actor_id, error = %err, "could not write the actor's row to storage");
        }
        lock(&self.rows).insert(actor_id, row);
        Ok(Some(out))
    }

    /// Takes back the actors a previous run of the head left in storage: rows and names
    /// as they were; ALIVE ones are watched again (worker and owner), ones being placed
    /// are placed again. Call once, before serving.
    pub async fn restore(self: &Arc<Self>) -> GcsResult<usize> {
        let storage = self.state.storage().clone();
        let stored = blocking(move || storage.scan_prefix(Table::Actors, b"")).await?;
        let mut alive = Vec::new();
        let mut placing = Vec::new();
        let mut dead = Vec::new();
        {
            let mut rows = lock(&self.rows);
            let mut names = lock(&self.names);
            for (key, bytes) in &stored {
                let row = StoredActor::decode(bytes.as_slice()).map_err(|err| GcsError::Corrupt {
                    what: format!("actor {}", hex::encode(key)),
                    why: err.to_string(),
                })?;
                let info = row.info.unwrap_or_default();
                let spec = info.spec.clone().unwrap_or_default();
                let actor_id = ActorId::from_bytes(&spec.actor_id).map_err(GcsError::from)?;
                let lease = (!row.lease_id.is_empty()).then_some((row.lease_id, row.lease_node_address));
                match state_of(&info) {
                    ActorState::Dead => {
                        dead.push((info.created_at_ms, actor_id));
                        if let Some(lease) = lease.clone() {
                            placing.push((actor_id, info.incarnation, Some(lease), spec.clone()));
                        }
                    }
                    state => {
                        if !spec.name.is_empty() {
                            names.insert(self.name_key(&spec), actor_id);
                        }
                        if state == ActorState::Alive {
                            if let (true, Some((lease_id, node_address))) = (spec.share_process, lease.clone()) {
                                // Its shared process, known again from the actors in it.
                                let host = hosts::Host {
                                    lease: LeaseGranted {
                                        lease_id,
                                        worker_address: info.address.clone(),
                                        node_id: info.node_id.clone(),
                                        ..Default::default()
                                    },
                                    node_address,
                                    actors: std::collections::HashSet::from([(actor_id, info.incarnation)]),
                                    emptied: 0,
                                };
                                lock(&self.hosts).add(hosts::host_key(&spec), host);
                            }
                            alive.push((actor_id, info.incarnation, info.address.clone(), spec.clone()));
                        } else {
                            placing.push((actor_id, info.incarnation, lease.clone(), spec.clone()));
                        }
                    }
                }
                rows.insert(actor_id, Row { info, lease });
            }
        }
        let restored = stored.len();
        // Storage keeps no time of death: the oldest created are taken as the longest dead.
        dead.sort();
        lock(&self.dead).extend(dead.into_iter().map(|(_, actor_id)| actor_id));
        self.forget_longest_dead().await;
        for (actor_id, incarnation, address, spec) in alive {
            self.watch_owner_of(&spec);
            match self.job_credential(&spec.job_id) {
                Ok(credential) => {
                    let guest = spec.share_process.then_some(actor_id);
                    tokio::spawn(self.clone().watch_worker(actor_id, incarnation, address, guest, credential));
                }
                Err(err) => tracing::warn!(actor = %actor_id, error = %err, "cannot watch a restored actor"),
            }
        }
        for (actor_id, incarnation, lease, spec) in placing {
            if self.get(actor_id.as_bytes()).is_ok_and(|info| state_of(&info) != ActorState::Dead) {
                self.watch_owner_of(&spec);
            }
            let actors = self.clone();
            tokio::spawn(async move {
                // A creation (or an end) the previous run cut short: its worker may hold
                // the actor; it goes (the lease returned as failed) before another is
                // placed.
                if let Some((lease_id, node_address)) = lease {
                    actors.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease_id, &node_address)).await;
                    actors.forget_lease(actor_id, &lease_id).await;
                }
                actors.place(actor_id, incarnation).await;
            });
        }
        if restored > 0 {
            tracing::info!(actors = restored, "actors restored from storage");
            for version in lock(&self.versions).values() {
                version.send_modify(|version| *version += 1);
            }
        }
        Ok(restored)
    }

    /// Watches the owner of a non-detached actor (once per owner): its end kills the
    /// actors it owns.
    fn watch_owner_of(self: &Arc<Self>, spec: &ActorSpec) {
        if !spec.detached
            && !spec.owner_address.is_empty()
            && self.owners.insert(spec.owner_address.clone(), ()).is_none()
        {
            if let Ok(credential) = self.job_credential(&spec.job_id) {
                tokio::spawn(self.clone().watch_owner(spec.owner_address.clone(), credential));
            }
        }
    }

    fn connection(&self, address: &str) -> IonetResult<ClusterChannel> {
        if let Some(channel) = self.channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = rpc::lazy_channel(address, Duration::from_secs(2))?;
        self.channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// A channel to `address` carrying `credential`.
    fn channel(&self, address: &str, credential: &Bearer) -> IonetResult<AuthChannel> {
        Ok(rpc::with_credential(self.connection(address)?, credential))
    }

    /// The credential of job `job_id` (paid by its account).
    fn job_credential(&self, job_id: &[u8]) -> IonetResult<Bearer> {
        let job = JobId::from_bytes(job_id)?;
        let account = self.state.payer_of(&job);
        Bearer::new(&self.issuer.issue_job(job_id, &account, crate::service::JOB_CREDENTIAL_TTL))
    }

    /// Wakes the calls waiting on `actor_id`'s row.
    fn bump(&self, actor_id: &ActorId) {
        if let Some(version) = lock(&self.versions).get(actor_id) {
            version.send_modify(|version| *version += 1);
        }
    }

    /// Registers an actor and starts placing it. With `get_if_exists`, a live actor of the
    /// same name is returned instead of refusing the name. Answers once the row is stored.
    pub async fn create(self: &Arc<Self>, mut spec: ActorSpec, get_if_exists: bool) -> IonetResult<ActorInfo> {
        let actor_id = ActorId::from_bytes(&spec.actor_id)?;
        JobId::from_bytes(&spec.job_id)?;
        if spec.class_name.is_empty() {
            return Err(IonetError::InvalidArgument("actor without a class name".into()));
        }
        if spec.display_class.len() > 256 || spec.display_class.chars().any(char::is_control) {
            return Err(IonetError::InvalidArgument(format!(
                "an actor's shown class name is printable text of at most 256 bytes, not {:?}",
                spec.display_class.chars().take(64).collect::<String>()
            )));
        }
        // Its resources must read as resources (the listings show them).
        spec.resources.clone().unwrap_or_default().to_set()?;
        if spec.max_restarts < -1 || spec.max_task_retries < -1 {
            return Err(IonetError::InvalidArgument(format!(
                "max_restarts and max_task_retries must be -1 (forever) or more, got {} and {}",
                spec.max_restarts, spec.max_task_retries
            )));
        }
        let holds = spec.resources.as_ref().is_some_and(|r| r.units.values().any(|units| *units > 0));
        let spread = spec.strategy.as_ref().is_some_and(|s| s.kind == SchedulingKind::Spread as i32);
        if spec.share_process && spread {
            return Err(IonetError::InvalidArgument(format!(
                "actor {} cannot both share a process and spread: the strategy places the process",
                spec.class_name
            )));
        }
        if spec.share_process && (holds || !spec.placement_group_id.is_empty()) {
            return Err(IonetError::InvalidArgument(format!(
                "actor {} cannot share a process: a shared process holds no resources, outside placement groups",
                spec.class_name
            )));
        }
        spec.max_concurrency = spec.max_concurrency.max(1);
        // One create or change at a time: the row is stored before anyone can see it.
        let writing = self.writing.lock().await;
        let info = {
            let rows = lock(&self.rows);
            if let Some(row) = rows.get(&actor_id) {
                // The same create again (its caller asked again across a head restart):
                // the row it made.
                if row.info.spec.as_ref() == Some(&spec) {
                    return Ok(row.info.clone());
                }
                return Err(IonetError::AlreadyExists(format!("actor {} exists", actor_id.short())));
            }
            if !spec.name.is_empty() {
                let mut names = lock(&self.names);
                let key = self.name_key(&spec);
                if let Some(existing) = names.get(&key) {
                    if get_if_exists {
                        if let Some(row) = rows.get(existing) {
                            return Ok(row.info.clone());
                        }
                    }
                    return Err(IonetError::AlreadyExists(format!(
                        "an actor named {:?} already exists in namespace {:?}",
                        spec.name, spec.namespace
                    )));
                }
                names.insert(key, actor_id);
            }
            ActorInfo {
                spec: Some(spec.clone()),
                state: ActorState::PendingCreation as i32,
                created_at_ms: self.state.now_ms(),
                ..Default::default()
            }
        };
        let row = Row { info: info.clone(), lease: None };
        let stored = self.store(actor_id, &row).await;
        if stored.is_ok() {
            lock(&self.rows).insert(actor_id, row);
        }
        drop(writing);
        if let Err(err) = stored {
            // Not stored: not created (the caller may ask again).
            if !spec.name.is_empty() {
                let mut names = lock(&self.names);
                if names.get(&self.name_key(&spec)) == Some(&actor_id) {
                    names.remove(&self.name_key(&spec));
                }
            }
            return Err(IonetError::Unavailable(format!("the control store could not store the actor: {err}")));
        }
        tracing::info!(actor = %actor_id, class = %spec.class_name, name = %spec.name, "actor registered");
        self.bump(&actor_id);
        self.watch_owner_of(&spec);
        tokio::spawn(self.clone().place(actor_id, 0));
        Ok(info)
    }

    pub fn get(&self, actor_id: &[u8]) -> IonetResult<ActorInfo> {
        let actor_id = ActorId::from_bytes(actor_id)?;
        lock(&self.rows)
            .get(&actor_id)
            .map(|row| row.info.clone())
            .ok_or_else(|| IonetError::NotFound(format!("actor {} does not exist", actor_id.short())))
    }

    /// Waits until the actor is ALIVE in an incarnation newer than `newer_than` (-1: any),
    /// or DEAD; returns its row then, or as it is when `timeout` passes.
    pub async fn wait(&self, actor_id: &[u8], newer_than: i64, timeout: Duration) -> IonetResult<ActorInfo> {
        let id = ActorId::from_bytes(actor_id)?;
        // However the wait ends (its call dropped included), the last waiter's leaving
        // drops the actor's version (the guard is dropped after the receiver below).
        let _leaving = Leaving { versions: &self.versions, id };
        let mut version = lock(&self.versions).entry(id).or_insert_with(|| watch::channel(0).0).subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            version.borrow_and_update();
            let info = self.get(actor_id)?;
            let state = state_of(&info);
            if state == ActorState::Dead || (state == ActorState::Alive && i64::from(info.incarnation) > newer_than) {
                return Ok(info);
            }
            if tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                return Ok(info);
            }
        }
    }

    /// Sends the actor's row now and again at each change of its state or incarnation,
    /// until it is DEAD (that row sent), `send` says its follower is gone, or it is
    /// forgotten (past `max_dead_actors`: the error is sent) (`WatchActors`). Follows the
    /// actor's version as `GetActor`'s waiters do.
    pub async fn follow<Sent: std::future::Future<Output = bool>>(
        &self,
        id: ActorId,
        mut send: impl FnMut(IonetResult<ActorInfo>) -> Sent,
    ) {
        let _leaving = Leaving { versions: &self.versions, id };
        let mut version = lock(&self.versions).entry(id).or_insert_with(|| watch::channel(0).0).subscribe();
        let mut sent = None;
        loop {
            version.borrow_and_update();
            let info = match self.get(id.as_bytes()) {
                Ok(info) => info,
                Err(err) => {
                    send(Err(err)).await;
                    return;
                }
            };
            let now = (info.state, info.incarnation);
            if sent != Some(now) {
                let dead = state_of(&info) == ActorState::Dead;
                if !send(Ok(info)).await || dead {
                    return;
                }
                sent = Some(now);
            }
            if version.changed().await.is_err() {
                return;
            }
        }
    }

    /// Where an actor's name lives: its account's namespace.
    fn name_key(&self, spec: &ActorSpec) -> (String, String, String) {
        let account = JobId::from_bytes(&spec.job_id).map(|job| self.state.payer_of(&job)).unwrap_or_default();
        (account, spec.namespace.clone(), spec.name.clone())
    }

    /// The live actor named `name` in `namespace` of `account` (`None`: the operator's
    /// look-up, in any account).
    pub fn get_named(&self, account: Option<&str>, name: &str, namespace: &str) -> IonetResult<ActorInfo> {
        let id = {
            let names = lock(&self.names);
            match account {
                Some(account) => names.get(&(account.to_string(), namespace.to_string(), name.to_string())).copied(),
                None => {
                    names.iter().find(|((_, space, named), _)| space == namespace && named == name).map(|(_, id)| *id)
                }
            }
        };
        match id {
            Some(id) => self.get(id.as_bytes()),
            None => Err(IonetError::NotFound(format!("no actor named {name:?} in namespace {namespace:?}"))),
        }
    }

    pub fn list(&self, include_dead: bool) -> Vec<ActorInfo> {
        let mut actors: Vec<ActorInfo> = lock(&self.rows)
            .values()
            .filter(|row| include_dead || state_of(&row.info) != ActorState::Dead)
            .map(|row| row.info.clone())
            .collect();
        actors.sort_by_key(|info| info.created_at_ms);
        actors
    }

    /// Kills the actor's worker. `no_restart`: DEAD for good (resources and name freed);
    /// else it restarts if it has restarts left.
    pub async fn kill(self: &Arc<Self>, actor_id: &[u8], no_restart: bool) -> IonetResult<()> {
        let info = self.get(actor_id)?;
        let actor_id = ActorId::from_bytes(actor_id)?;
        if state_of(&info) == ActorState::Dead {
            return Ok(());
        }
        let cause = if no_restart { "killed by ionet::kill" } else { "killed by ionet::kill (restart allowed)" };
        // The incarnation running when the kill is applied: one that ended meanwhile (its
        // worker died, a restart began) is killed in the next.
        let mut incarnation = info.incarnation;
        loop {
            let applied = self
                .worker_ended(actor_id, incarnation, cause, no_restart)
                .await
                .map_err(|err| IonetError::Unavailable(format!("the control store could not store the kill: {err}")))?;
            if applied {
                return Ok(());
            }
            let now = self.get(actor_id.as_bytes())?;
            if state_of(&now) == ActorState::Dead || (!no_restart && now.incarnation != incarnation) {
                return Ok(());
            }
            incarnation = now.incarnation;
        }
    }

    /// The current incarnation's worker ended (died, was killed, or its node died). Returns
    /// its lease as failed, then restarts the actor or marks it DEAD.
    async fn worker_ended(
        self: &Arc<Self>,
        actor_id: ActorId,
        incarnation: u32,
        cause: &str,
        no_restart: bool,
    ) -> GcsResult<bool> {
        // A kill is the caller's to retry when it cannot be stored; a worker that is gone
        // is gone whatever storage says.
        let must = !cause.starts_with("killed by");
        let name_key = |spec: &ActorSpec| self.name_key(spec);
        let decided = self
            .transition(actor_id, must, |row| {
                let state = state_of(&row.info);
                if row.info.incarnation != incarnation || state == ActorState::Dead {
                    return None; // A stale report about an incarnation already handled.
                }
                let spec = row.info.spec.clone().unwrap_or_default();
                let restarts_left =
                    spec.max_restarts == -1 || (row.info.restarts as i64) < i64::from(spec.max_restarts);
                let restart = !no_restart && restarts_left;
                let info = &mut row.info;
                info.death_cause = cause.to_string();
                info.address.clear();
                if restart {
                    info.state = ActorState::Restarting as i32;
                    info.restarts += 1;
                    info.incarnation += 1;
                } else {
                    info.state = ActorState::Dead as i32;
                }
                let freed_name = (!restart && !spec.name.is_empty()).then(|| name_key(&spec));
                // Kept (and stored) until it is returned: a head that dies in between
                // returns it when it comes back.
                let lease = row.lease.clone().map(|lease| (lease, spec));
                Some((lease, restart.then_some(info.incarnation), freed_name))
            })
            .await?;
        let Some((lease, restart, freed_name)) = decided else { return Ok(false) };
        if let Some(key) = freed_name {
            let mut names = lock(&self.names);
            if names.get(&key) == Some(&actor_id) {
                names.remove(&key);
            }
        }
        tracing::info!(actor = %actor_id, cause, restarting = restart.is_some(), "actor worker ended");
        self.bump(&actor_id);
        self.end_children_of(actor_id);
        if let Some(((lease_id, node_address), spec)) = lease {
            if !self.end_on(&OnLease::of(&spec, actor_id, incarnation, &lease_id, &node_address)).await {
                // Its worker may still run (its node cannot be reached): the lease stays
                // recorded, asked back until surely gone, and only then does the next
                // incarnation start: never two at once.
                let actors = self.clone();
                tokio::spawn(async move {
                    actors.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease_id, &node_address)).await;
                    actors.forget_lease(actor_id, &lease_id).await;
                    match restart {
                        Some(incarnation) => actors.place(actor_id, incarnation).await,
                        None => actors.remember_dead(actor_id).await,
                    }
                });
                return Ok(true);
            }
            self.forget_lease(actor_id, &lease_id).await;
        }
        match restart {
            Some(incarnation) => drop(tokio::spawn(self.clone().place(actor_id, incarnation))),
            None => self.remember_dead(actor_id).await,
        }
        Ok(true)
    }

    /// Says, as the holder of an actor's lease (the head holds them), that it was granted
    /// or given back; a record runs only while both the node and its holder say so.
    /// `asked`: what the actor's lease asked for (with `granted`).
    async fn held(
        &self,
        job_id: &[u8],
        lease_id: &[u8],
        node_id: &[u8],
        granted: bool,
        asked: Option<ResourceQuantities>,
    ) {
        let Ok(job) = JobId::from_bytes(job_id) else { return };
        let word =
            HeldLease { lease_id: lease_id.to_vec(), node_id: node_id.to_vec(), granted, age_ms: 0, resources: asked };
        if let Err(err) = self.metering.holder_report(job, &[word], true).await {
            tracing::warn!(job = %job, error = %err, "could not report an actor's lease to metering");
        }
    }

    /// Returns a lease of job `job_id`'s actor, with the job's credential.
    /// Returns a lease of job `job_id`'s actor, with the job's credential. Whether its
    /// worker is surely gone: the node took the lease back or knows it not, or the node
    /// itself is gone (not alive in the node table).
    async fn return_lease(&self, job_id: &[u8], lease_id: Vec<u8>, node_address: &str, worker_failed: bool) -> bool {
        self.held(job_id, &lease_id, &[], false, None).await;
        let node_gone = || {
            !self
                .state
                .nodes(false)
                .iter()
                .any(|node| node.address == node_address && node.state != WireNodeState::Dead as i32)
        };
        let Ok(credential) = self.job_credential(job_id) else { return node_gone() };
        let Ok(channel) = self.channel(node_address, &credential) else { return node_gone() };
        let request = ReturnWorkerLeaseRequest { lease_id, worker_failed };
        match NodeManagerClient::new(channel).return_worker_lease(request).await {
            Ok(_) => true,
            Err(status) if status.code() == tonic::Code::NotFound => true,
            Err(status) => {
                tracing::debug!(node = %node_address, error = %status.message(), "returning an actor's lease failed");
                node_gone()
            }
        }
    }

    /// Returns a lease a previous run of the head left recorded, until its worker is
    /// surely gone (see [`Actors::return_lease`]), asking again every second.
    async fn return_lease_surely(&self, job_id: &[u8], lease_id: &[u8], node_address: &str) {
        // A node that keeps answering, but refusing, for ten minutes is not coming round:
        // given up on (logged), so the actor is not stuck for ever.
        for _ in 0..600 {
            if self.return_lease(job_id, lease_id.to_vec(), node_address, true).await {
                return;
            }
            tokio::time::sleep(RETRY_PAUSE * 2).await;
        }
        tracing::error!(node = %node_address, "an actor's lease could not be returned in ten minutes; going on without");
    }

    /// Ends the incarnation running `on` a lease: its own process's lease is returned as
    /// failed (which kills the process); a guest of a shared process is ended there
    /// (`hosts`). Whether it surely no longer runs.
    async fn end_on(self: &Arc<Self>, on: &OnLease<'_>) -> bool {
        if on.spec.share_process {
            return self.leave_host(on).await;
        }
        self.return_lease(&on.spec.job_id, on.lease_id.to_vec(), on.node_address, true).await
    }

    /// [`Actors::end_on`], asking again every second until it is surely ended (given up
    /// after ten minutes, logged, as [`Actors::return_lease_surely`]).
    async fn end_on_surely(self: &Arc<Self>, on: &OnLease<'_>) {
        for _ in 0..600 {
            if self.end_on(on).await {
                return;
            }
            tokio::time::sleep(RETRY_PAUSE * 2).await;
        }
        tracing::error!(node = %on.node_address, "an actor could not be ended in ten minutes; going on without");
    }

    /// Forgets lease `lease_id` of the actor once returned (a newer one is kept).
    async fn forget_lease(&self, actor_id: ActorId, lease_id: &[u8]) {
        let forgot = self.transition(actor_id, true, |row| {
            row.lease.as_ref().is_some_and(|(held, _)| held == lease_id).then(|| row.lease = None)
        });
        let _ = forgot.await;
    }

    /// Records (and stores) the lease incarnation `incarnation` is being created on, if
    /// that incarnation is still wanted; returns whether it is (and the lease stored).
    async fn record_lease(&self, actor_id: ActorId, incarnation: u32, lease_id: &[u8], node_address: &str) -> bool {
        let recorded = self
            .transition(actor_id, false, |row| {
                let wanted = row.info.incarnation == incarnation
                    && matches!(state_of(&row.info), ActorState::PendingCreation | ActorState::Restarting);
                wanted.then(|| row.lease = Some((lease_id.to_vec(), node_address.to_string())))
            })
            .await;
        match recorded {
            Ok(recorded) => recorded.is_some(),
            Err(err) => {
                // Stored before the constructor runs, or not run at all: placed again.
                tracing::error!(actor = %actor_id, error = %err, "could not store the actor's lease; placing again");
                false
            }
        }
    }

    /// Whether `incarnation` is still the one to place (not killed or superseded meanwhile).
    fn still_wanted(&self, actor_id: &ActorId, incarnation: u32) -> bool {
        lock(&self.rows).get(actor_id).is_some_and(|row| {
            row.info.incarnation == incarnation
                && matches!(state_of(&row.info), ActorState::PendingCreation | ActorState::Restarting)
        })
    }

    /// An alive node daemon to ask first: the creator's if it is alive, else any.
    fn first_node(&self, preferred: &str) -> Option<String> {
        let nodes = self.state.nodes(false);
        let alive = |address: &str| {
            nodes.iter().any(|node| node.address == address && node.state == WireNodeState::Alive as i32)
        };
        if alive(preferred) {
            return Some(preferred.to_string());
        }
        nodes.iter().find(|node| node.state == WireNodeState::Alive as i32).map(|node| node.address.clone())
    }

    /// Places incarnation `incarnation`: a lease, then the constructor, until it runs, the
    /// constructor fails (DEAD), or the actor is killed meanwhile.
    async fn place(self: Arc<Self>, actor_id: ActorId, incarnation: u32) {
        let Ok(info) = self.get(actor_id.as_bytes()) else { return };
        // Nothing to place (a dead actor whose lease a restarted head returned, or one
        // killed already): nothing to record either.
        if !self.still_wanted(&actor_id, incarnation) {
            return;
        }
        let spec = info.spec.unwrap_or_default();
        fn waiting(reason: &str) -> TaskEvent<'_> {
            TaskEvent { state: TaskState::PendingNodeAssignment, reason, ..Default::default() }
        }
        let asks = match spec.resources.clone().unwrap_or_default().to_set() {
            Ok(resources) => format!("waiting for a worker lease of {resources}"),
            Err(_) => "waiting for a worker lease".to_string(),
        };
        self.record_creation(&spec, incarnation, waiting(&asks));
        let credential = match self.job_credential(&spec.job_id) {
            Ok(credential) => credential,
            Err(error) => {
                let cause = format!("actor {} cannot be placed: {error}", spec.class_name);
                self.mark_dead_with(actor_id, incarnation, &cause, Some(&error)).await;
                self.record_creation_failed(&actor_id, &spec, incarnation, &cause);
                return;
            }
        };
        let mut warned = false;
        // Why the last attempt to place it waited (recorded when it changes).
        let mut last_reason = String::new();
        let mut backoff = Backoff::new(None);
        while self.still_wanted(&actor_id, incarnation) {
            // The lease is the job's: asked with its credential, which its worker is given.
            let outcome = match self.target(&spec, incarnation) {
                Ok(_) if spec.share_process => self.host_seat(&spec, actor_id, incarnation, &credential).await,
                Ok((address, request)) => {
                    lease::request(|address| self.channel(address, &credential), address, request).await
                }
                Err(outcome) => outcome,
            };
            let (lease, node_address) = match outcome {
                LeaseOutcome::Granted { lease, node_address } => {
                    backoff.reset();
                    // Nodes meter neither a lease of nothing nor one inside a bundle.
                    let metered = spec.placement_group_id.is_empty()
                        && spec.resources.as_ref().is_some_and(|r| r.units.values().any(|units| *units > 0));
                    if metered {
                        self.held(&spec.job_id, &lease.lease_id, &lease.node_id, true, spec.resources.clone()).await;
                    }
                    (lease, node_address)
                }
                // No node can ever fit its first incarnation (the daemon looked at the whole
                // cluster): its creation fails, and so do its calls, rather than waiting for
                // ever. Not for a restart (its node may be coming back) nor in a placement
                // group (a daemon refuses a bundle it has not reserved yet: it waits).
                LeaseOutcome::Infeasible(reason) if incarnation == 0 && spec.placement_group_id.is_empty() => {
                    let error = IonetError::Infeasible(format!("actor {} cannot be placed: {reason}", spec.class_name));
                    self.mark_dead_with(actor_id, incarnation, &error.to_string(), Some(&error)).await;
                    self.record_creation_failed(&actor_id, &spec, incarnation, &error.to_string());
                    return;
                }
                // The request itself is wrong: asking again cannot help.
                LeaseOutcome::Refused(error) => {
                    let cause = format!("actor {} cannot be placed: {error}", spec.class_name);
                    self.mark_dead_with(actor_id, incarnation, &cause, Some(&error)).await;
                    self.record_creation_failed(&actor_id, &spec, incarnation, &cause);
                    return;
                }
                LeaseOutcome::Infeasible(reason) | LeaseOutcome::Unavailable(reason) => {
                    if !warned {
                        tracing::warn!(actor = %actor_id, %reason, "actor cannot be placed yet; retrying");
                        warned = true;
                    }
                    if reason != last_reason {
                        self.record_creation(&spec, incarnation, waiting(&reason));
                        last_reason = reason;
                    }
                    tokio::time::sleep(backoff.after_failure().unwrap_or(Backoff::LONGEST)).await;
                    continue;
                }
            };
            if !self.record_lease(actor_id, incarnation, &lease.lease_id, &node_address).await {
                if spec.share_process {
                    self.leave_host(&OnLease::of(&spec, actor_id, incarnation, &lease.lease_id, &node_address)).await;
                } else {
                    self.return_lease(&spec.job_id, lease.lease_id, &node_address, false).await;
                }
                if self.still_wanted(&actor_id, incarnation) {
                    continue; // Its lease could not be stored: placed again.
                }
                return;
            }
            self.record_creation(
                &spec,
                incarnation,
                TaskEvent {
                    state: TaskState::Running,
                    node_id: &lease.node_id,
                    worker_address: &lease.worker_address,
                    ..Default::default()
                },
            );
            let created = match self.channel(&lease.worker_address, &credential) {
                Ok(channel) => CoreWorkerClient::new(channel)
                    .create_actor(CreateActorRequest {
                        actor_id: actor_id.to_vec(),
                        class_name: spec.class_name.clone(),
                        args: spec.constructor_args.clone(),
                        max_concurrency: spec.max_concurrency,
                        incarnation,
                        job_id: spec.job_id.clone(),
                        shared: spec.share_process,
                    })
                    .await
                    .map(|reply| reply.into_inner().failure),
                Err(err) => Err(tonic::Status::unavailable(err.to_string())),
            };
            match created {
                Ok(None) => {}
                Ok(Some(failure)) => {
                    self.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease.lease_id, &node_address))
                        .await;
                    self.forget_lease(actor_id, &lease.lease_id).await;
                    let cause = format!("the constructor of {} failed: {}", spec.class_name, failure.message);
                    self.mark_dead(actor_id, incarnation, &cause).await;
                    self.record_creation_failed(&actor_id, &spec, incarnation, &cause);
                    return;
                }
                Err(status) => {
                    tracing::warn!(actor = %actor_id, error = %status.message(), "actor worker did not start the actor; retrying");
                    let reason = format!("placing it again: its worker did not start it: {}", status.message());
                    self.record_creation(&spec, incarnation, waiting(&reason));
                    self.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease.lease_id, &node_address))
                        .await;
                    self.forget_lease(actor_id, &lease.lease_id).await;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
            // Stored before its address is published: a restarted head knows where it runs.
            let alive = self
                .transition(actor_id, false, |row| {
                    let current = row.info.incarnation == incarnation && state_of(&row.info) != ActorState::Dead;
                    current.then(|| {
                        row.info.state = ActorState::Alive as i32;
                        row.info.address = lease.worker_address.clone();
                        row.info.node_id = lease.node_id.clone();
                        row.info.node_address = node_address.clone();
                        row.info.gpu_ids = lease.gpu_ids.clone();
                    })
                })
                .await;
            match alive {
                Ok(Some(())) => {}
                Ok(None) => {
                    // Killed while its constructor ran.
                    self.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease.lease_id, &node_address))
                        .await;
                    self.forget_lease(actor_id, &lease.lease_id).await;
                    self.record_creation_failed(&actor_id, &spec, incarnation, "killed while it was created");
                    return;
                }
                Err(err) => {
                    // Not stored, so not published: this worker goes and another is placed.
                    tracing::error!(actor = %actor_id, error = %err, "could not store the actor alive; placing again");
                    self.end_on_surely(&OnLease::of(&spec, actor_id, incarnation, &lease.lease_id, &node_address))
                        .await;
                    self.forget_lease(actor_id, &lease.lease_id).await;
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            }
            tracing::info!(actor = %actor_id, incarnation, worker = %lease.worker_address, "actor alive");
            self.record_creation(
                &spec,
                incarnation,
                TaskEvent {
                    state: TaskState::Finished,
                    node_id: &lease.node_id,
                    worker_address: &lease.worker_address,
                    ..Default::default()
                },
            );
            self.bump(&actor_id);
            let watched = spec.share_process.then_some(actor_id);
            tokio::spawn(self.clone().watch_worker(actor_id, incarnation, lease.worker_address, watched, credential));
            return;
        }
        // No longer wanted: killed (or its owner gone) before it was placed.
        self.record_creation_failed(&actor_id, &spec, incarnation, "killed before it was created");
    }

    async fn mark_dead(&self, actor_id: ActorId, incarnation: u32, cause: &str) {
        self.mark_dead_with(actor_id, incarnation, cause, None).await;
    }

    /// Marks the actor dead; `error`: the error its calls fail with (else ActorDied).
    async fn mark_dead_with(&self, actor_id: ActorId, incarnation: u32, cause: &str, error: Option<&IonetError>) {
        let name_key = |spec: &ActorSpec| self.name_key(spec);
        let marked = self
            .transition(actor_id, true, |row| {
                if row.info.incarnation != incarnation {
                    return None;
                }
                let newly_dead = state_of(&row.info) != ActorState::Dead;
                row.info.state = ActorState::Dead as i32;
                row.info.death_cause = cause.to_string();
                row.info.death_error = error.map(ionet_common::rpc::status::detail_of);
                let spec = row.info.spec.clone().unwrap_or_default();
                Some(((!spec.name.is_empty()).then(|| name_key(&spec)), newly_dead))
            })
            .await;
        let Ok(Some((freed_name, newly_dead))) = marked else { return };
        if let Some(key) = freed_name {
            let mut names = lock(&self.names);
            if names.get(&key) == Some(&actor_id) {
                names.remove(&key);
            }
        }
        tracing::warn!(actor = %actor_id, cause, "actor dead");
        if newly_dead {
            self.remember_dead(actor_id).await;
        }
        self.bump(&actor_id);
    }

    /// Counts a newly DEAD actor among the remembered, forgetting the longest dead past
    /// the limit.
    async fn remember_dead(&self, actor_id: ActorId) {
        lock(&self.dead).push_back(actor_id);
        self.forget_longest_dead().await;
    }

    /// Forgets the longest dead actors past `max_dead_actors`, in memory and in storage.
    /// One whose lease is not yet returned is kept (its row says where to return it).
    async fn forget_longest_dead(&self) {
        // The actor just marked dead is always remembered (its failure is recorded next).
        let limit = self.state.config().max_dead_actors.max(1);
        if lock(&self.dead).len() <= limit {
            return;
        }
        // Under the writers' turn: no write of a row can follow its deletion.
        let _writing = self.writing.lock().await;
        let mut forgotten = Vec::new();
        {
            let mut dead = lock(&self.dead);
            let mut rows = lock(&self.rows);
            let mut kept = Vec::new();
            while dead.len() + kept.len() > limit {
                let Some(actor_id) = dead.pop_front() else { break };
                match rows.get(&actor_id) {
                    Some(row) if state_of(&row.info) != ActorState::Dead => {}
                    Some(row) if row.lease.is_some() => kept.push(actor_id),
                    Some(_) => {
                        rows.remove(&actor_id);
                        forgotten.push(actor_id);
                    }
                    None => {}
                }
            }
            for actor_id in kept.into_iter().rev() {
                dead.push_front(actor_id);
            }
        }
        if forgotten.is_empty() {
            return;
        }
        let writes: Vec<StorageWrite> = forgotten
            .iter()
            .map(|actor_id| StorageWrite::Delete { table: Table::Actors, key: actor_id.to_vec() })
            .collect();
        let storage = self.state.storage().clone();
        if let Err(err) = blocking(move || storage.write_all(&writes)).await {
            tracing::warn!(error = %err, actors = forgotten.len(), "could not delete forgotten dead actors from storage");
        }
        tracing::debug!(actors = forgotten.len(), limit, "forgot the longest dead actors");
    }

    /// Whom to ask for the actor's lease, and what: outside a placement group, the
    /// creator's node (or any alive one), which may spill it; inside one, the node holding
    /// its bundle, asked directly (any bundle: the groups' bundles in turn, by
    /// incarnation). A pending group is asked again later; a removed one is final.
    fn target(&self, spec: &ActorSpec, incarnation: u32) -> Result<(String, RequestWorkerLeaseRequest), LeaseOutcome> {
        let mut request = self.lease_request(spec);
        if spec.placement_group_id.is_empty() {
            let address = self
                .first_node(&spec.node_address)
                .ok_or_else(|| LeaseOutcome::Unavailable("the cluster has no alive node".into()))?;
            return Ok((address, request));
        }
        let group = PlacementGroupId::from_bytes(&spec.placement_group_id).map_err(LeaseOutcome::Refused)?;
        let row = self.placement_groups.get(&group).map_err(LeaseOutcome::Refused)?;
        let (address, bundle) = lease::bundle_target(&row, spec.bundle_index, incarnation as usize)?;
        request.bundle_index = bundle;
        request.no_spillback = true;
        Ok((address, request))
    }

    /// The lease request for the actor's resources.
    fn lease_request(&self, spec: &ActorSpec) -> RequestWorkerLeaseRequest {
        RequestWorkerLeaseRequest {
            job_id: spec.job_id.clone(),
            resources: spec.resources.clone(),
            strategy: spec.strategy.clone(),
            no_spillback: false,
            placement_group_id: spec.placement_group_id.clone(),
            bundle_index: spec.bundle_index,
            // The control store ends actor leases itself (kill, owner death, node death).
            holder_address: String::new(),
            // Actors are not tasks in a tree: served with the driver's tasks.
            depth: 1,
            avoid_nodes: Vec::new(),
            runtime_env: spec.runtime_env.clone(),
        }
    }

    /// Holds a `Watch` stream to the worker (for a guest of a shared process, to the
    /// actor in it: `guest`); when it ends, the worker is gone. (Boxed: it closes the
    /// cycle place → watch → restart → place.)
    fn watch_worker(
        self: Arc<Self>,
        actor_id: ActorId,
        incarnation: u32,
        address: String,
        guest: Option<ActorId>,
        credential: Bearer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let cause = match self.watch(&address, guest, &credential).await {
                Ok(()) if guest.is_some() => "the actor ended in its shared process, or the process exited".to_string(),
                Ok(()) => "the actor's worker process exited".to_string(),
                Err(why) => format!("the actor's worker process died ({why})"),
            };
            let _ = self.worker_ended(actor_id, incarnation, &cause, false).await;
        })
    }

    /// Ends the non-detached actors that `owner` (an actor in a shared process) created:
    /// its process lives on, so its owner watch would not end them.
    fn end_children_of(self: &Arc<Self>, owner: ActorId) {
        let children: Vec<(ActorId, u32)> = lock(&self.rows)
            .iter()
            .filter(|(_, row)| {
                let spec = row.info.spec.as_ref();
                spec.is_some_and(|spec| spec.owner_actor_id == owner.as_bytes() && !spec.detached)
                    && state_of(&row.info) != ActorState::Dead
            })
            .map(|(id, row)| (*id, row.info.incarnation))
            .collect();
        for (child, incarnation) in children {
            let actors = self.clone();
            tokio::spawn(async move {
                let _ = actors.worker_ended(child, incarnation, "its owner exited", true).await;
            });
        }
    }

    /// Holds a `Watch` stream to an owner; when it ends, its non-detached actors die.
    async fn watch_owner(self: Arc<Self>, owner: String, credential: Bearer) {
        let _ = self.watch(&owner, None, &credential).await;
        self.owners.remove(&owner);
        let owned: Vec<(ActorId, u32)> = lock(&self.rows)
            .iter()
            .filter(|(_, row)| {
                let spec = row.info.spec.as_ref();
                spec.is_some_and(|spec| spec.owner_address == owner && !spec.detached)
                    && state_of(&row.info) != ActorState::Dead
            })
            .map(|(id, row)| (*id, row.info.incarnation))
            .collect();
        for (actor_id, incarnation) in owned {
            let _ = self.worker_ended(actor_id, incarnation, "its owner exited", true).await;
        }
    }

    /// Returns when the stream to `address` ends: `Ok` for an orderly end, `Err` for a
    /// broken connection.
    async fn watch(&self, address: &str, actor: Option<ActorId>, credential: &Bearer) -> Result<(), String> {
        let channel = self.channel(address, credential).map_err(|err| err.to_string())?;
        let actor_id = actor.map(|actor| actor.to_vec()).unwrap_or_default();
        let mut stream = CoreWorkerClient::new(channel)
            .watch(WatchRequest { actor_id })
            .await
            .map_err(|status| status.message().to_string())?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status.message().to_string()),
            }
        }
    }

    /// Ends the actors of nodes declared dead, until `stopped`.
    pub async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut events = self.state.subscribe();
        loop {
            let dead = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => match event.event {
                        Some(Event::NodeDead(node)) => Some(node.node_id),
                        _ => None,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = stopped.changed() => return,
            };
            let Some(node_id) = dead else { continue };
            let on_node: Vec<(ActorId, u32)> = lock(&self.rows)
                .iter()
                .filter(|(_, row)| row.info.node_id == node_id && state_of(&row.info) == ActorState::Alive)
                .map(|(id, row)| (*id, row.info.incarnation))
                .collect();
            for (actor_id, incarnation) in on_node {
                let _ = self.worker_ended(actor_id, incarnation, "its node died", false).await;
            }
        }
    }
}

/// An actor state as Ray names it.
pub fn state_name(state: i32) -> &'static str {
    match ActorState::try_from(state).unwrap_or(ActorState::Unspecified) {
        ActorState::PendingCreation => "PENDING_CREATION",
        ActorState::Alive => "ALIVE",
        ActorState::Restarting => "RESTARTING",
        ActorState::Dead => "DEAD",
        ActorState::Unspecified => "UNKNOWN",
    }
}

/// One actor as the state API shows it (Ray's `ray list actors` fields where they
/// exist): for `ionet list actors`, `ionet.util.state.list_actors` and the dashboard.
pub fn actor_json(actor: &ActorInfo) -> ionet_common::IonetResult<serde_json::Value> {
    let spec = actor.spec.clone().unwrap_or_default();
    let resources = spec.resources.clone().unwrap_or_default().to_set()?;
    let resources: serde_json::Map<String, serde_json::Value> =
        resources.iter().map(|(name, quantity)| (name.to_string(), serde_json::json!(quantity.as_f64()))).collect();
    Ok(serde_json::json!({
        "actor_id": hex::encode(&spec.actor_id),
        "class_name": if spec.display_class.is_empty() { &spec.class_name } else { &spec.display_class },
        "name": spec.name,
        "namespace": spec.namespace,
        "state": state_name(actor.state),
        "job_id": hex::encode(&spec.job_id),
        "node_id": hex::encode(&actor.node_id),
        "address": actor.address,
        "resources": resources,
        "gpu_ids": actor.gpu_ids,
        "restarts": actor.restarts,
        "max_restarts": spec.max_restarts,
        "detached": spec.detached,
        "death_cause": actor.death_cause,
    }))
}
