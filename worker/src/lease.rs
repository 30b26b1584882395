//! Leases on a node daemon: resource accounting, GPU ids, the worker pool, spillback.
//!
//! Invariants (all under the one `LeaseState` lock, never held across an await):
//! - `available = total − Σ granted leases' resources`; a lease's resources come back
//!   exactly once, when it is returned or its worker dies.
//! - A granted lease holds one worker process exclusively; the worker was started with
//!   `CUDA_VISIBLE_DEVICES` set to exactly the GPU ids of the lease (whole GPUs exclusive,
//!   fractions packed by [`GpuAllocator`]). Idle workers are reused only for the same job,
//!   command and GPU ids.
//! - A request this node cannot serve now is answered with a node that can (spillback,
//!   from the cluster view refreshed every heartbeat), or waits here if only this node
//!   could; one no node could ever serve is answered `infeasible`, never left waiting.
//! - A leased worker whose task is blocked in `get`/`wait` gives its lease's CPUs back
//!   (`released`) while at most `max_blocked_workers` leases have done so, so the tasks it
//!   waits for can run (Ray's blocked-worker release); past the cap a blocked worker keeps
//!   its CPUs, which bounds the extra workers a tree of tasks starts, unless every lease
//!   holding CPUs is blocked (then nothing else could ever run, so it lends them anyway). Resuming takes them
//!   back even past what is free: `available` may then be negative for CPU until leases
//!   end (it is reported clamped at zero). So `available = total − Σ held`, where a
//!   lease holds its resources less what it released.
//! - Waiting requests are served deepest task first: a request is not granted here while
//!   a deeper one that fits waits, so the leaves of a task tree run before new parents
//!   start and every blocked parent eventually resumes. A request that waits presses the
//!   holders of this node's leases to give back the ones they keep idle for reuse.
//! - Placement-group bundles are held apart: preparing one moves its resources out of
//!   `available` into the bundle (or refuses); a lease naming the bundle is granted only
//!   from the bundle's own free resources, and returns there. Cancelling a bundle gives its
//!   free part back at once; leases still running in it give theirs back to the general
//!   pool when they end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet::resources::{Quantity, ResourceSet, CPU, GPU};
use ionet::rpc::proto::common::NodeInfo;
use ionet::rpc::proto::node::{
    request_worker_lease_reply::Outcome, LeaseGranted, RequestWorkerLeaseReply, RequestWorkerLeaseRequest,
    SchedulingKind, Spillback, WorkerCommand,
};
use ionet::{IonetError, IonetResult, JobId, LeaseId, NodeId, PlacementGroupId, WorkerId};
use ionet_scheduler::{ClusterView, Decision, Demand, GpuAllocator, GpuAssignment, SchedulingStrategy};
use tokio::sync::{oneshot, Notify};

use crate::cluster_view::node_view;

/// Environment a worker process finds its node, job and GPUs in.
pub const WORKER_MODE_ENV: &str = "IONET_WORKER_MODE";
pub const WORKER_ID_ENV: &str = "IONET_WORKER_ID";
pub const NODE_ADDRESS_ENV: &str = "IONET_NODE_ADDRESS";
pub const NODE_ID_ENV: &str = "IONET_NODE_ID";
pub const JOB_ID_ENV: &str = "IONET_JOB_ID";
pub const GPU_IDS_ENV: &str = "IONET_GPU_IDS";
pub const TOKEN_ENV: &str = "IONET_TOKEN";
pub const OBJECT_STORE_DIR_ENV: &str = "IONET_OBJECT_STORE_DIR";
pub const GCS_ADDRESS_ENV: &str = "IONET_GCS_ADDRESS";

/// How long an idle worker past the pool's soft limit is kept for reuse (Ray's
/// `idle_worker_killing_time_threshold_ms`): starting a worker costs far more than
/// keeping one a second.
const EXCESS_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How long a started worker may take to register.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct WorkerPoolOptions {
    /// Idle workers are stopped after this long.
    pub idle_timeout: Duration,
    /// Most idle workers kept (a soft limit on the pool).
    pub max_idle_workers: usize,
    /// Where worker output goes; `None`: inherited from the daemon.
    pub log_dir: Option<PathBuf>,
    /// Most leases whose blocked worker has released its CPUs at once (see the module
    /// invariants): the cap on extra workers a tree of blocked tasks makes this node start.
    pub max_blocked_workers: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    job_id: Vec<u8>,
    argv: Vec<String>,
    gpu_ids: Vec<u32>,
}

struct Worker {
    worker_id: WorkerId,
    address: String,
    pid: u32,
    key: PoolKey,
}

struct Granted {
    resources: ResourceSet,
    gpus: Option<GpuAssignment>,
    worker: WorkerId,
    bundle: Option<BundleKey>,
    /// Where the holder serves (see `RequestWorkerLeaseRequest::holder_address`).
    holder: String,
    /// The worker said its task is blocked in `get`/`wait`.
    blocked: bool,
    /// CPUs given back while blocked (zero when none): the lease holds `resources` less these.
    released: Quantity,
}

impl Granted {
    /// Whether the lease is metered: a lease of nothing (an actor holding no resources)
    /// costs nothing, and one inside a placement-group bundle is paid with the bundle.
    fn metered(resources: &ResourceSet, bundle: Option<&BundleKey>) -> bool {
        !resources.is_empty() && bundle.is_none()
    }
}

/// A placement-group bundle: its id and index in the group.
type BundleKey = (PlacementGroupId, u32);

/// Resources reserved on this node for one bundle.
struct Bundle {
    total: ResourceSet,
    available: ResourceSet,
    /// Leases are granted from a bundle only once the control store committed it.
    committed: bool,
    /// The creating job, billed for the whole bundle from commit to cancel (the leases
    /// granted inside it are not metered again).
    job_id: Option<JobId>,
    /// The metering lease of the committed bundle.
    metered_as: Option<LeaseId>,
}

struct LeaseState {
    total: ResourceSet,
    available: ResourceSet,
    gpus: GpuAllocator,
    leases: HashMap<LeaseId, Granted>,
    idle: Vec<(Worker, Instant)>,
    view: ClusterView,
    bundles: HashMap<BundleKey, Bundle>,
    /// Requests for the general pool waiting here: their depth and demand, by ticket.
    waiters: HashMap<u64, (u32, ResourceSet)>,
    next_ticket: u64,
    /// Leases whose blocked worker released its CPUs now.
    released_leases: usize,
    /// When holders were last pressed to give back idle leases.
    pressed_at: Option<Instant>,
}

impl LeaseState {
    /// The pool a lease's resources come from: its bundle's, or the general one (also
    /// for a lease whose bundle was cancelled meanwhile).
    fn pool_of(&mut self, bundle: Option<&BundleKey>) -> &mut ResourceSet {
        match bundle.and_then(|key| self.bundles.get_mut(key)) {
            Some(bundle) => &mut bundle.available,
            None => &mut self.available,
        }
    }

    /// Releases the CPUs of a blocked lease to its pool, if under the cap, or past it when
    /// every lease holding CPUs here is blocked (nothing could run otherwise: the tasks
    /// they wait for would never start).
    fn release_blocked_cpus(&mut self, lease_id: &LeaseId, cap: usize) -> bool {
        let stalled = || {
            self.leases
                .values()
                .all(|granted| granted.blocked || !granted.released.is_zero() || granted.resources.get(CPU).is_zero())
        };
        if self.released_leases >= cap && !stalled() {
            tracing::info!(
                cap,
                lease = %lease_id.short(),
                "a blocked worker keeps its CPUs: the cap of blocked workers lending theirs is reached \
                 (a tree of tasks deeper than cap / CPUs may stall; raise IONET_MAX_BLOCKED_WORKERS)"
            );
            return false;
        }
        let Some(granted) = self.leases.get_mut(lease_id) else { return false };
        let cpus = granted.resources.get(CPU);
        if !granted.blocked || !granted.released.is_zero() || cpus.is_zero() {
            return false;
        }
        granted.released = cpus;
        let bundle = granted.bundle;
        let pool = self.pool_of(bundle.as_ref());
        pool.set(CPU, pool.get(CPU) + cpus);
        self.released_leases += 1;
        true
    }

    /// One line on who holds what here, for an operator reading why a request waits.
    fn describe(&self) -> String {
        let blocked = self.leases.values().filter(|granted| granted.blocked).count();
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        for (lease_id, granted) in &self.leases {
            let holder = if granted.holder.is_empty() { "the control store (actors)" } else { &granted.holder };
            holders.entry(holder.to_string()).or_default().push(format!(
                "{} {} on worker {}",
                lease_id.short(),
                granted.resources,
                granted.worker.short()
            ));
        }
        let waiting: Vec<String> =
            self.waiters.values().map(|(depth, wanted)| format!("{wanted} at depth {depth}")).collect();
        format!(
            "available {}, {} leases ({blocked} blocked, {} lending CPUs) held by {holders:?}, {} idle workers, waiting: [{}]",
            self.available,
            self.leases.len(),
            self.released_leases,
            self.idle.len(),
            waiting.join(", ")
        )
    }

    /// Whether granting `demand` now would take the room of a waiting request (other
    /// than `ticket`) deeper than `depth` that fits now: that one goes first.
    fn outranked(&self, ticket: Option<u64>, depth: u32, demand: &ResourceSet) -> bool {
        let mut after = self.available.clone();
        if after.try_subtract(demand).is_err() {
            return false;
        }
        self.waiters.iter().any(|(other, (other_depth, wanted))| {
            Some(*other) != ticket
                && *other_depth > depth
                && self.available.contains(wanted)
                && !after.contains(wanted)
                && (wanted.get(GPU).is_zero() || self.gpus.total_free() >= wanted.get(GPU))
        })
    }
}

/// `set` without its negative entries (CPUs taken back past what was free).
fn clamped(set: &ResourceSet) -> ResourceSet {
    let mut clamped = set.clone();
    for (name, quantity) in set.iter() {
        if quantity < Quantity::ZERO {
            clamped.set(name.to_string(), Quantity::ZERO);
        }
    }
    clamped
}

/// What the control store is told about leases, in order, off the lease path.
enum MeterEvent {
    Started { lease_id: LeaseId, job_id: JobId, resources: ResourceSet },
    Ended { lease_id: LeaseId },
}

/// Sends lease starts and ends to the head's metering service. A send that fails while
/// the head is away is retried; one the head refuses is logged and dropped (metering
/// never blocks a lease; the head also ends the leases of a node it declares dead).
async fn report_leases(
    node_id: NodeId,
    mut client: ionet::rpc::MeteringClient,
    mut events: tokio::sync::mpsc::UnboundedReceiver<MeterEvent>,
) {
    use ionet::rpc::proto::common::ResourceQuantities;
    use ionet::rpc::proto::metering::{LeaseEndedRequest, LeaseStartedRequest};
    while let Some(event) = events.recv().await {
        for attempt in 0..20u32 {
            let result = match &event {
                MeterEvent::Started { lease_id, job_id, resources } => client
                    .lease_started(LeaseStartedRequest {
                        lease_id: lease_id.to_vec(),
                        node_id: node_id.to_vec(),
                        job_id: job_id.to_vec(),
                        resources: Some(ResourceQuantities::from_set(resources)),
                    })
                    .await
                    .map(|_| ()),
                MeterEvent::Ended { lease_id } => {
                    client.lease_ended(LeaseEndedRequest { lease_id: lease_id.to_vec() }).await.map(|_| ())
                }
            };
            match result {
                Ok(()) => break,
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < 19 => {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "the control store did not take a lease report");
                    break;
                }
            }
        }
    }
}

/// The lease side of a node daemon.
pub struct Leases {
    node_id: NodeId,
    address: String,
    token: String,
    state: Mutex<LeaseState>,
    freed: Notify,
    starting: DashMap<WorkerId, oneshot::Sender<String>>,
    /// Worker processes alive now, by id, with the lease each holds (if any).
    workers: DashMap<WorkerId, (u32, Option<LeaseId>)>,
    /// Workers currently leased, by id.
    leased: DashMap<WorkerId, Worker>,
    /// Node addresses by id, from the last refresh of the view.
    addresses: DashMap<NodeId, String>,
    options: WorkerPoolOptions,
    metering: Mutex<Option<tokio::sync::mpsc::UnboundedSender<MeterEvent>>>,
    gcs: Mutex<Option<ionet::rpc::GcsClient>>,
    object_store_dir: Mutex<String>,
    gcs_address: Mutex<String>,
    /// Channels to lease holders, for pressing them to give back idle leases.
    holder_channels: DashMap<String, ionet::rpc::AuthChannel>,
}

/// A request waiting this long (then twice as long, and so on) logs what the node holds.
const LONG_WAIT: Duration = Duration::from_secs(10);

/// How often, at most, waiting requests press the holders of this node's leases.
const PRESS_INTERVAL: Duration = Duration::from_millis(20);

/// Removes a waiting request's entry when its wait ends, however it ends (the caller may
/// give up and drop the request).
struct WaiterTicket<'a> {
    leases: &'a Leases,
    ticket: u64,
}

impl Drop for WaiterTicket<'_> {
    fn drop(&mut self) {
        self.leases.lock().waiters.remove(&self.ticket);
    }
}

enum Step {
    Grant(ResourceSet, Option<GpuAssignment>),
    Spill(NodeId, String),
    Wait(String),
    Infeasible(String),
}

fn strategy(request: &RequestWorkerLeaseRequest) -> IonetResult<SchedulingStrategy> {
    let wire = request.strategy.clone().unwrap_or_default();
    Ok(match SchedulingKind::try_from(wire.kind).unwrap_or(SchedulingKind::Default) {
        SchedulingKind::Default => SchedulingStrategy::Default,
        SchedulingKind::Spread => SchedulingStrategy::Spread,
        SchedulingKind::NodeAffinity => {
            SchedulingStrategy::NodeAffinity { node_id: NodeId::from_bytes(&wire.node_id)?, soft: wire.soft }
        }
    })
}

impl Leases {
    pub fn new(
        node_id: NodeId,
        address: String,
        token: String,
        total: ResourceSet,
        gpu_indices: Vec<u32>,
        options: WorkerPoolOptions,
    ) -> Self {
        Self {
            node_id,
            address,
            token,
            state: Mutex::new(LeaseState {
                available: total.clone(),
                total,
                gpus: GpuAllocator::new(gpu_indices),
                leases: HashMap::new(),
                idle: Vec::new(),
                view: ClusterView::new(),
                bundles: HashMap::new(),
                waiters: HashMap::new(),
                next_ticket: 0,
                released_leases: 0,
                pressed_at: None,
            }),
            freed: Notify::new(),
            starting: DashMap::new(),
            workers: DashMap::new(),
            leased: DashMap::new(),
            addresses: DashMap::new(),
            options,
            metering: Mutex::new(None),
            gcs: Mutex::new(None),
            object_store_dir: Mutex::new(String::new()),
            gcs_address: Mutex::new(String::new()),
            holder_channels: DashMap::new(),
        }
    }

    /// Where workers started from now on find the node's object store.
    /// Told to workers, which reach the control store for actors.
    pub fn set_gcs_address(&self, address: String) {
        *self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()) = address;
    }

    pub fn set_object_store_dir(&self, dir: String) {
        *self.object_store_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// Reads the node table now; whether it could.
    async fn refresh_from_control_store(&self) -> bool {
        let client = self.gcs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mut client) = client else { return false };
        match client.get_all_nodes(ionet::rpc::proto::gcs::GetAllNodesRequest { include_dead: false }).await {
            Ok(reply) => {
                self.refresh_view(&reply.into_inner().nodes);
                true
            }
            Err(_) => false,
        }
    }

    /// Connects the leases to the control store: for fresh views, and to report every
    /// lease to the head's metering service.
    pub fn attach_control_store(&self, channel: ionet::rpc::AuthChannel) {
        *self.gcs.lock().unwrap_or_else(|p| p.into_inner()) = Some(ionet::rpc::GcsClient::new(channel.clone()));
        self.attach_metering(ionet::rpc::MeteringClient::new(channel));
    }

    fn attach_metering(&self, client: ionet::rpc::MeteringClient) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(report_leases(self.node_id, client, receiver));
        *self.metering.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }

    fn meter(&self, event: MeterEvent) {
        if let Some(sender) = self.metering.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = sender.send(event);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What is free now (CPUs taken back past what was free count as none).
    pub fn available(&self) -> ResourceSet {
        clamped(&self.lock().available)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Replaces the cluster view with the control store's node table.
    pub fn refresh_view(&self, nodes: &[NodeInfo]) {
        let mut view = ClusterView::new();
        for node in nodes {
            if let Ok(node_id) = NodeId::from_bytes(&node.node_id) {
                self.addresses.insert(node_id, node.address.clone());
            }
            match node_view(node) {
                Ok(node) => {
                    let _ = view.upsert_node(node);
                }
                Err(err) => tracing::warn!(error = %err, "skipping a malformed node record"),
            }
        }
        self.lock().view = view;
    }

    /// Alive nodes in the cluster view that spillback decisions read.
    pub fn nodes_in_view(&self) -> usize {
        self.lock().view.alive_count()
    }

    fn decide(
        &self,
        demand: &ResourceSet,
        strategy: &SchedulingStrategy,
        no_spillback: bool,
        ticket: Option<u64>,
        depth: u32,
    ) -> Step {
        let mut state = self.lock();
        let gpus = demand.get(GPU);
        let fits_now = |state: &LeaseState| {
            state.available.contains(demand) && (gpus.is_zero() || state.gpus.total_free() >= gpus)
        };
        let fits_ever = state.total.contains(demand);
        let grant = |state: &mut LeaseState| -> Step {
            let state = &mut *state;
            take(&mut state.gpus, &mut state.available, demand, "resources are busy")
        };
        let local_or_wait = |state: &mut LeaseState, why: &str| -> Step {
            if !fits_ever {
                Step::Infeasible(format!(
                    "no node can ever fit {demand}: node {} has {} in all",
                    self.node_id.short(),
                    state.total
                ))
            } else if fits_now(state) && !state.outranked(ticket, depth, demand) {
                grant(state)
            } else if fits_now(state) {
                Step::Wait("a deeper task waiting here goes first".to_string())
            } else {
                Step::Wait(why.to_string())
            }
        };
        if no_spillback {
            return local_or_wait(&mut state, "waiting for resources on the node chosen for it");
        }
        if let SchedulingStrategy::NodeAffinity { node_id, soft } = strategy {
            if *node_id == self.node_id {
                if fits_ever || !soft {
                    return local_or_wait(&mut state, "waiting for resources on the node it is pinned to");
                }
            } else if let Some(target) =
                state.view.node(node_id).filter(|node| node.state == ionet_scheduler::NodeState::Alive)
            {
                let address = self.address_of(&target.node_id);
                if let Some(address) = address {
                    return Step::Spill(*node_id, address);
                }
            } else if !soft {
                return Step::Infeasible(format!("{demand} is pinned to node {}, which is not alive", node_id.short()));
            }
        }
        // Our own entry in the view is exact; the others are as of their last heartbeat.
        let (own_total, own_available) = (state.total.clone(), clamped(&state.available));
        let _ = state.view.update_available(&self.node_id, own_available);
        if state.view.node(&self.node_id).is_none() {
            let mut own = ionet_scheduler::NodeView::new(self.node_id, own_total);
            own.available = clamped(&state.available);
            let _ = state.view.upsert_node(own);
        }
        let policy = match strategy {
            SchedulingStrategy::NodeAffinity { .. } => SchedulingStrategy::Default,
            other => other.clone(),
        };
        match state.view.schedule(&Demand::new(demand.clone()), &policy, Some(&self.node_id)) {
            Decision::Place(node_id) if node_id == self.node_id => local_or_wait(&mut state, "resources are busy"),
            Decision::Place(node_id) => match self.address_of(&node_id) {
                Some(address) => {
                    // Count it there until the next refresh, so a burst spreads.
                    let _ = state.view.allocate(&node_id, demand);
                    Step::Spill(node_id, address)
                }
                None => local_or_wait(&mut state, "resources are busy"),
            },
            Decision::Wait { reason } => {
                if fits_ever {
                    Step::Wait(reason)
                } else {
                    // Queue on a node that could take it once free.
                    let target = state
                        .view
                        .nodes()
                        .find(|node| node.state == ionet_scheduler::NodeState::Alive && node.total.contains(demand))
                        .map(|node| node.node_id);
                    match target.and_then(|node_id| self.address_of(&node_id).map(|address| (node_id, address))) {
                        Some((node_id, address)) => Step::Spill(node_id, address),
                        None => Step::Wait(reason),
                    }
                }
            }
            Decision::Infeasible { reason } => {
                if fits_ever {
                    local_or_wait(&mut state, "resources are busy")
                } else {
                    Step::Infeasible(reason)
                }
            }
        }
    }

    /// A request naming a bundle: granted only from the bundle's free resources here.
    fn decide_bundle(&self, key: &BundleKey, demand: &ResourceSet) -> Step {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(bundle) = state.bundles.get_mut(key) else {
            return Step::Infeasible(format!(
                "bundle {} of placement group {} is not reserved on node {}",
                key.1,
                key.0.short(),
                self.node_id.short()
            ));
        };
        if !bundle.total.contains(demand) {
            return Step::Infeasible(format!(
                "{demand} does not fit bundle {} of placement group {} ({})",
                key.1,
                key.0.short(),
                bundle.total
            ));
        }
        if !bundle.committed || !bundle.available.contains(demand) {
            return Step::Wait("waiting for room in the placement-group bundle".into());
        }
        take(&mut state.gpus, &mut bundle.available, demand, "waiting for room in the placement-group bundle")
    }

    /// Phase one of placing a bundle here: takes its resources out of the general pool,
    /// or refuses with `ResourceExhausted`. Preparing a bundle already held is a no-op.
    pub fn prepare_bundle(
        &self,
        placement_group_id: &[u8],
        index: u32,
        job_id: &[u8],
        resources: ResourceSet,
    ) -> IonetResult<()> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let job_id = if job_id.is_empty() { None } else { Some(JobId::from_bytes(job_id)?) };
        let mut state = self.lock();
        if state.bundles.contains_key(&key) {
            return Ok(());
        }
        if state.available.try_subtract(&resources).is_err() {
            return Err(IonetError::ResourceExhausted(format!(
                "node {} cannot reserve bundle {index} of placement group {}: it needs {resources}, {} is free",
                self.node_id.short(),
                key.0.short(),
                state.available
            )));
        }
        state.bundles.insert(
            key,
            Bundle { total: resources.clone(), available: resources, committed: false, job_id, metered_as: None },
        );
        Ok(())
    }

    /// Phase two: the bundle may now serve leases.
    pub fn commit_bundle(&self, placement_group_id: &[u8], index: u32) -> IonetResult<()> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let mut state = self.lock();
        let bundle = state.bundles.get_mut(&key).ok_or_else(|| {
            IonetError::NotFound(format!("bundle {index} of placement group {} is not prepared here", key.0.short()))
        })?;
        let newly = !bundle.committed;
        bundle.committed = true;
        let meter = match (newly, bundle.job_id) {
            (true, Some(job_id)) if !bundle.total.is_empty() => {
                let lease_id = LeaseId::random();
                bundle.metered_as = Some(lease_id);
                Some(MeterEvent::Started { lease_id, job_id, resources: bundle.total.clone() })
            }
            _ => None,
        };
        // Sent under the lock, as `cancel_bundle` sends the end: a cancel that follows
        // cannot report the end before the start.
        if let Some(event) = meter {
            self.meter(event);
        }
        drop(state);
        self.freed.notify_waiters();
        Ok(())
    }

    /// Gives a bundle's free resources back to the general pool; whether it was held.
    pub fn cancel_bundle(&self, placement_group_id: &[u8], index: u32) -> IonetResult<bool> {
        let key = (PlacementGroupId::from_bytes(placement_group_id)?, index);
        let (removed, doomed) = {
            let mut state = self.lock();
            let removed = state.bundles.remove(&key);
            if let Some(bundle) = &removed {
                state.available.add(&bundle.available);
                if let Some(lease_id) = bundle.metered_as {
                    self.meter(MeterEvent::Ended { lease_id });
                }
            }
            let doomed: Vec<WorkerId> = state
                .leases
                .values()
                .filter(|granted| granted.bundle == Some(key))
                .map(|granted| granted.worker)
                .collect();
            (removed.is_some(), doomed)
        };
        // Removing a group ends what runs inside it: its workers are stopped, and their
        // leases end (resources back to the general pool) as their processes exit.
        for worker in doomed {
            if let Some(entry) = self.workers.get(&worker) {
                tracing::info!(worker = %worker.short(), "stopping a worker of a removed placement-group bundle");
                kill(entry.value().0);
            }
        }
        self.freed.notify_waiters();
        Ok(removed)
    }

    /// How many placement-group bundles are reserved here.
    pub fn bundle_count(&self) -> usize {
        self.lock().bundles.len()
    }

    fn address_of(&self, node_id: &NodeId) -> Option<String> {
        self.addresses.get(node_id).map(|entry| entry.clone())
    }

    /// Serves one lease request: grant, spill back, wait, or refuse.
    pub async fn request(self: &Arc<Self>, request: RequestWorkerLeaseRequest) -> IonetResult<RequestWorkerLeaseReply> {
        let demand = request.resources.clone().unwrap_or_default().to_set()?;
        let gpus = demand.get(GPU);
        if gpus > Quantity::whole(1) && gpus.units() % Quantity::whole(1).units() != 0 {
            return Err(IonetError::InvalidArgument(format!("a demand of {gpus} GPUs must be whole above 1")));
        }
        let job_id = JobId::from_bytes(&request.job_id)?;
        let command = request.worker_command.clone().unwrap_or_default();
        if command.argv.is_empty() {
            return Err(IonetError::InvalidArgument("lease request without a worker command".into()));
        }
        let strategy = strategy(&request)?;
        let bundle = if request.placement_group_id.is_empty() {
            None
        } else {
            Some((PlacementGroupId::from_bytes(&request.placement_group_id)?, request.bundle_index))
        };
        let mut refreshed = false;
        let mut waiting: Option<WaiterTicket<'_>> = None;
        let since = Instant::now();
        let mut next_report = LONG_WAIT;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let ticket = waiting.as_ref().map(|waiting| waiting.ticket);
            let step = match &bundle {
                Some(key) => self.decide_bundle(key, &demand),
                None => self.decide(&demand, &strategy, request.no_spillback, ticket, request.depth),
            };
            match step {
                Step::Grant(resources, gpus) => {
                    // The resources are taken: the grant runs to its end in a task of its
                    // own, so a requester that goes away meanwhile (its process killed,
                    // its call dropped) cannot strand them; a lease nobody received ends.
                    let (reply_to, reply) = oneshot::channel();
                    let leases = self.clone();
                    let holder = request.holder_address.clone();
                    let command = command.clone();
                    tokio::spawn(async move {
                        let granted = leases.grant(job_id, &command, resources, gpus, bundle, holder).await;
                        if let Err(Ok(unheard)) = reply_to.send(granted) {
                            if let Some(Outcome::Granted(lease)) = unheard.outcome {
                                tracing::info!("a lease was granted to a requester that went away; it ends");
                                let _ = leases.return_lease(&lease.lease_id, false);
                            }
                        }
                    });
                    return reply
                        .await
                        .map_err(|_| IonetError::Internal("the lease grant was dropped unfinished".into()))?;
                }
                Step::Spill(node_id, node_address) => {
                    return Ok(RequestWorkerLeaseReply {
                        outcome: Some(Outcome::Spillback(Spillback { node_id: node_id.to_vec(), node_address })),
                    })
                }
                Step::Infeasible(reason) => {
                    // The view may predate a node that just joined: look again before refusing.
                    if !refreshed {
                        refreshed = true;
                        if self.refresh_from_control_store().await {
                            continue;
                        }
                    }
                    tracing::warn!(demand = %demand, %reason, "infeasible lease request");
                    return Ok(RequestWorkerLeaseReply { outcome: Some(Outcome::Infeasible(reason)) });
                }
                Step::Wait(reason) => {
                    tracing::debug!(demand = %demand, %reason, "lease request waits");
                    if since.elapsed() >= next_report {
                        next_report *= 2;
                        let state = self.lock().describe();
                        tracing::warn!(demand = %demand, %reason, waited = ?since.elapsed(), %state, "a lease request is waiting long");
                    }
                    if waiting.is_none() && bundle.is_none() {
                        let mut state = self.lock();
                        let ticket = state.next_ticket;
                        state.next_ticket += 1;
                        state.waiters.insert(ticket, (request.depth, demand.clone()));
                        drop(state);
                        waiting = Some(WaiterTicket { leases: self, ticket });
                    }
                    self.press_holders();
                    // Woken when a lease ends; re-decided at least once a second, since
                    // the cluster view changes too.
                    let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
                }
            }
        }
    }

    async fn grant(
        self: &Arc<Self>,
        job_id: JobId,
        command: &WorkerCommand,
        resources: ResourceSet,
        gpus: Option<GpuAssignment>,
        bundle: Option<BundleKey>,
        holder: String,
    ) -> IonetResult<RequestWorkerLeaseReply> {
        let gpu_ids = gpus.as_ref().map(|assignment| assignment.gpu_ids()).unwrap_or_default();
        let key = PoolKey { job_id: job_id.to_vec(), argv: command.argv.clone(), gpu_ids: gpu_ids.clone() };
        loop {
            let idle = {
                let mut state = self.lock();
                state.idle.iter().position(|(worker, _)| worker.key == key).map(|index| state.idle.swap_remove(index).0)
            };
            let worker = match idle {
                Some(worker) => worker,
                None => match self.start_worker(job_id, command, key.clone()).await {
                    Ok(worker) => worker,
                    Err(err) => {
                        self.give_back(&resources, gpus.as_ref(), bundle.as_ref());
                        return Err(err);
                    }
                },
            };
            match self.lease_to(worker, job_id, &resources, &gpus, bundle, &holder) {
                Some(reply) => return Ok(reply),
                // The worker exited as it was leased: another one, same resources.
                None => continue,
            }
        }
    }

    /// Records a lease of `resources` on `worker`, or `None` (nothing recorded) when the
    /// worker's process has exited meanwhile. The lease is in the lease table before it is
    /// in the worker's entry, and the exit watcher removes the entry before it reads it:
    /// whichever runs second sees the other, so a lease never outlives its worker.
    fn lease_to(
        &self,
        worker: Worker,
        job_id: JobId,
        resources: &ResourceSet,
        gpus: &Option<GpuAssignment>,
        bundle: Option<BundleKey>,
        holder: &str,
    ) -> Option<RequestWorkerLeaseReply> {
        let gpu_ids = gpus.as_ref().map(|assignment| assignment.gpu_ids()).unwrap_or_default();
        let gpus = gpus.clone();
        let holder = holder.to_string();
        let lease_id = LeaseId::random();
        let metered = Granted::metered(&resources, bundle.as_ref());
        let granted = Granted {
            resources: resources.clone(),
            gpus,
            worker: worker.worker_id,
            bundle,
            holder,
            blocked: false,
            released: Quantity::ZERO,
        };
        let reply = LeaseGranted {
            lease_id: lease_id.to_vec(),
            worker_id: worker.worker_id.to_vec(),
            worker_address: worker.address.clone(),
            gpu_ids,
            node_id: self.node_id.to_vec(),
        };
        let worker_id = worker.worker_id;
        // Metered from before anyone can end it, so its end is never metered first.
        if metered {
            self.meter(MeterEvent::Started { lease_id, job_id, resources: resources.clone() });
        }
        // The worker is leased, not idle: it goes back to the pool on return.
        self.leased.insert(worker_id, worker);
        self.lock().leases.insert(lease_id, granted);
        let recorded = match self.workers.get_mut(&worker_id) {
            Some(mut entry) => {
                entry.1 = Some(lease_id);
                true
            }
            None => false,
        };
        if !recorded {
            // Its exit was seen before the lease was written: take the lease back out,
            // keeping the resources for the next worker (metered as a lease of no length).
            self.lock().leases.remove(&lease_id);
            self.leased.remove(&worker_id);
            if metered {
                self.meter(MeterEvent::Ended { lease_id });
            }
            return None;
        }
        Some(RequestWorkerLeaseReply { outcome: Some(Outcome::Granted(reply)) })
    }

    fn give_back(&self, resources: &ResourceSet, gpus: Option<&GpuAssignment>, bundle: Option<&BundleKey>) {
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            // A lease of a bundle cancelled meanwhile gives back to the general pool.
            match bundle.and_then(|key| state.bundles.get_mut(key)) {
                Some(bundle) => bundle.available.add(resources),
                None => state.available.add(resources),
            }
            if let Some(assignment) = gpus {
                if let Err(err) = state.gpus.release(assignment) {
                    tracing::error!(error = %err, "gpu accounting refused a release");
                }
            }
        }
        self.freed.notify_waiters();
    }

    /// Ends a lease: resources back, the worker back to the pool (or stopped if it failed).
    pub fn return_lease(&self, lease_id: &[u8], worker_failed: bool) -> IonetResult<()> {
        self.end_lease(LeaseId::from_bytes(lease_id)?, worker_failed)
    }

    /// Removes a lease and gives its resources back (metering its end); `None` if it is
    /// not held here.
    fn release(&self, lease_id: LeaseId) -> Option<Granted> {
        let granted = {
            let mut state = self.lock();
            let granted = state.leases.remove(&lease_id)?;
            if !granted.released.is_zero() {
                state.released_leases -= 1;
                self.release_next_blocked(&mut state);
            }
            granted
        };
        if Granted::metered(&granted.resources, granted.bundle.as_ref()) {
            self.meter(MeterEvent::Ended { lease_id });
        }
        // What it released while blocked is back in the pool already.
        let mut held = granted.resources.clone();
        held.set(CPU, held.get(CPU) - granted.released);
        self.give_back(&held, granted.gpus.as_ref(), granted.bundle.as_ref());
        Some(granted)
    }

    /// Under the cap again: the CPUs of a blocked lease that kept them go back too.
    fn release_next_blocked(&self, state: &mut LeaseState) {
        let next = state
            .leases
            .iter()
            .find(|(_, granted)| granted.blocked && granted.released.is_zero() && !granted.resources.get(CPU).is_zero())
            .map(|(lease_id, _)| *lease_id);
        if let Some(lease_id) = next {
            state.release_blocked_cpus(&lease_id, self.options.max_blocked_workers);
        }
    }

    /// The worker says its task is blocked in `get`/`wait` (or resumed): its lease's
    /// CPUs go back to their pool while it waits (up to the cap), and are taken back, even
    /// past what is free, when it resumes. A worker that holds no lease is told so.
    pub fn set_worker_blocked(&self, worker_id: &[u8], blocked: bool) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let lease_id = self
            .workers
            .get(&worker_id)
            .and_then(|entry| entry.1)
            .ok_or_else(|| IonetError::NotFound(format!("worker {} holds no lease here", worker_id.short())))?;
        let mut state = self.lock();
        let Some(granted) = state.leases.get_mut(&lease_id) else {
            return Err(IonetError::NotFound(format!("lease {} is not held on this node", lease_id.short())));
        };
        if granted.blocked == blocked {
            return Ok(());
        }
        granted.blocked = blocked;
        if blocked {
            let released = state.release_blocked_cpus(&lease_id, self.options.max_blocked_workers);
            drop(state);
            if released {
                self.freed.notify_waiters();
            }
            return Ok(());
        }
        let taken_back = std::mem::replace(&mut granted.released, Quantity::ZERO);
        if !taken_back.is_zero() {
            let bundle = granted.bundle;
            let pool = state.pool_of(bundle.as_ref());
            pool.set(CPU, pool.get(CPU) - taken_back);
            state.released_leases -= 1;
            self.release_next_blocked(&mut state);
        }
        Ok(())
    }

    /// Asks the holders of this node's leases to give back the leases they keep idle
    /// for reuse (a request waits for room). At most once per `PRESS_INTERVAL`; the asks
    /// go out in the background and their failures are ignored (a holder that is gone is
    /// found by the probe of dead holders).
    fn press_holders(&self) {
        let holders: std::collections::BTreeSet<String> = {
            let mut state = self.lock();
            let now = Instant::now();
            if state.pressed_at.is_some_and(|at| now.duration_since(at) < PRESS_INTERVAL) {
                return;
            }
            state.pressed_at = Some(now);
            state.leases.values().map(|granted| granted.holder.clone()).filter(|h| !h.is_empty()).collect()
        };
        let Ok(token) = ionet::auth::ClusterToken::new(&self.token) else { return };
        if self.holder_channels.len() > 4096 {
            self.holder_channels.clear();
        }
        for holder in holders {
            let channel = match self.holder_channels.get(&holder) {
                Some(channel) => channel.clone(),
                None => match ionet::rpc::connect_lazy(&holder, &token, Duration::from_secs(2)) {
                    Ok(channel) => {
                        self.holder_channels.insert(holder.clone(), channel.clone());
                        channel
                    }
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let mut client = ionet::rpc::CoreWorkerClient::new(channel);
                let request = ionet::rpc::proto::worker::ReturnIdleLeasesRequest {};
                let _ = tokio::time::timeout(Duration::from_secs(2), client.return_idle_leases(request)).await;
            });
        }
    }

    /// [`Leases::return_lease`] by id.
    fn end_lease(&self, lease_id: LeaseId, worker_failed: bool) -> IonetResult<()> {
        let granted = self
            .release(lease_id)
            .ok_or_else(|| IonetError::NotFound(format!("lease {} is not held on this node", lease_id.short())))?;
        if let Some(mut entry) = self.workers.get_mut(&granted.worker) {
            entry.1 = None;
        }
        if let Some((_, worker)) = self.leased.remove(&granted.worker) {
            if worker_failed {
                kill(worker.pid);
            } else {
                self.lock().idle.push((worker, Instant::now()));
            }
        }
        Ok(())
    }

    /// A worker announced its address.
    pub fn register_worker(&self, worker_id: &[u8], address: String) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let (_, sender) = self.starting.remove(&worker_id).ok_or_else(|| {
            IonetError::NotFound(format!("worker {} was not started by this node", worker_id.short()))
        })?;
        let _ = sender.send(address);
        Ok(())
    }

    async fn start_worker(
        self: &Arc<Self>,
        job_id: JobId,
        command: &WorkerCommand,
        key: PoolKey,
    ) -> IonetResult<Worker> {
        let worker_id = WorkerId::random();
        let mut process = tokio::process::Command::new(&command.argv[0]);
        process
            .args(&command.argv[1..])
            .envs(&command.env)
            .env(WORKER_MODE_ENV, "1")
            .env(WORKER_ID_ENV, worker_id.hex())
            .env(NODE_ADDRESS_ENV, &self.address)
            .env(NODE_ID_ENV, self.node_id.hex())
            .env(JOB_ID_ENV, job_id.hex())
            .env(TOKEN_ENV, &self.token)
            .env(OBJECT_STORE_DIR_ENV, self.object_store_dir.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .env(GCS_ADDRESS_ENV, self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .env(GPU_IDS_ENV, key.gpu_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .env("CUDA_VISIBLE_DEVICES", key.gpu_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
            .stdin(Stdio::null());
        if !command.cwd.is_empty() {
            process.current_dir(&command.cwd);
        }
        if let Some(dir) = &self.options.log_dir {
            let path = dir.join(format!("worker-{}.log", worker_id.short()));
            let file = std::fs::File::create(&path)?;
            process.stdout(file.try_clone()?).stderr(file);
        }
        // SAFETY: prctl is async-signal-safe; a worker must not outlive its node daemon.
        unsafe {
            process.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (sender, receiver) = oneshot::channel();
        self.starting.insert(worker_id, sender);
        let mut child = match process.spawn() {
            Ok(child) => child,
            Err(err) => {
                self.starting.remove(&worker_id);
                return Err(IonetError::Internal(format!("cannot start worker {:?}: {err}", command.argv[0])));
            }
        };
        let pid = child.id().unwrap_or(0);
        self.workers.insert(worker_id, (pid, None));
        let address = tokio::select! {
            address = receiver => address.map_err(|_| IonetError::Internal("worker registration dropped".into())),
            status = child.wait() => Err(IonetError::Internal(format!(
                "worker {} exited before registering ({}); is ionet::init() called first in main?",
                worker_id.short(),
                status.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string())
            ))),
            _ = tokio::time::sleep(WORKER_START_TIMEOUT) => Err(IonetError::Timeout(format!(
                "worker {} did not register within {WORKER_START_TIMEOUT:?}", worker_id.short()
            ))),
        };
        let address = match address {
            Ok(address) => address,
            Err(err) => {
                self.starting.remove(&worker_id);
                self.workers.remove(&worker_id);
                let _ = child.start_kill();
                return Err(err);
            }
        };
        // Watch the process: when it exits, its lease (if any) ends with it.
        let leases = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            leases.worker_exited(worker_id, status.map(|s| s.to_string()).unwrap_or_else(|err| err.to_string()));
        });
        tracing::debug!(worker = %worker_id.short(), pid, %address, "worker started");
        Ok(Worker { worker_id, address, pid, key })
    }

    fn worker_exited(&self, worker_id: WorkerId, status: String) {
        let lease = self.workers.remove(&worker_id).and_then(|(_, (_, lease))| lease);
        self.leased.remove(&worker_id);
        self.lock().idle.retain(|(worker, _)| worker.worker_id != worker_id);
        if let Some(lease_id) = lease {
            tracing::warn!(worker = %worker_id.short(), %status, lease = %lease_id.short(), "leased worker died; its lease ends");
            self.release(lease_id);
        }
    }

    /// Ends the leases whose holder's address refuses connections (its process is gone;
    /// a probe that times out proves nothing, as with a partitioned network), as failed: the
    /// leased workers are killed, since they may still run the dead holder's tasks, and
    /// the resources come back. Returns how many leases ended.
    pub async fn end_leases_of_dead_holders(&self, timeout: Duration) -> usize {
        let holders: std::collections::BTreeSet<String> =
            self.lock().leases.values().map(|granted| granted.holder.clone()).filter(|h| !h.is_empty()).collect();
        // All probes at once: a holder that does not answer costs one timeout, not one each.
        let mut probes = tokio::task::JoinSet::new();
        for holder in holders {
            probes.spawn(async move {
                let refused = matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&holder)).await,
                    Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused
                );
                (holder, refused)
            });
        }
        let mut ended = 0;
        while let Some(probe) = probes.join_next().await {
            let Ok((holder, true)) = probe else { continue };
            let doomed: Vec<LeaseId> =
                self.lock().leases.iter().filter(|(_, granted)| granted.holder == holder).map(|(id, _)| *id).collect();
            for lease_id in doomed {
                tracing::warn!(lease = %lease_id.short(), %holder, "the lease holder is gone; its lease ends");
                if self.end_lease(lease_id, true).is_ok() {
                    ended += 1;
                }
            }
        }
        ended
    }

    /// Stops workers idle past the timeout, and the excess over the pool's soft limit once
    /// idle for `EXCESS_IDLE_GRACE` (a tree of tasks or the next batch reuses them meanwhile).
    pub fn reap_idle(&self) {
        let doomed: Vec<u32> = {
            let mut state = self.lock();
            let now = Instant::now();
            state.idle.sort_by_key(|(_, since)| std::cmp::Reverse(*since));
            let limit = self.options.max_idle_workers;
            let timeout = self.options.idle_timeout;
            let mut keep = Vec::new();
            let mut doomed = Vec::new();
            for (index, (worker, since)) in state.idle.drain(..).enumerate() {
                let idle = now.duration_since(since);
                if idle > timeout || (index >= limit && idle > EXCESS_IDLE_GRACE) {
                    doomed.push(worker.pid);
                } else {
                    keep.push((worker, since));
                }
            }
            state.idle = keep;
            doomed
        };
        for pid in doomed {
            kill(pid);
        }
    }

    /// Stops every worker (daemon shutdown).
    pub fn stop_all_workers(&self) {
        for entry in self.workers.iter() {
            kill(entry.value().0);
        }
    }
}

/// Takes `demand` out of `pool`, with GPU ids from `gpus`: all of it or, changing
/// nothing, a wait (`busy` says why) or a refusal.
fn take(gpus: &mut GpuAllocator, pool: &mut ResourceSet, demand: &ResourceSet, busy: &str) -> Step {
    let wanted = demand.get(GPU);
    let assignment = if wanted.is_zero() {
        None
    } else {
        match gpus.allocate(wanted) {
            Ok(Some(assignment)) => Some(assignment),
            Ok(None) => return Step::Wait("GPUs are busy".into()),
            Err(err) => return Step::Infeasible(format!("no node can ever fit {demand}: {err}")),
        }
    };
    if pool.try_subtract(demand).is_err() {
        if let Some(assignment) = &assignment {
            let _ = gpus.release(assignment);
        }
        return Step::Wait(busy.to_string());
    }
    Step::Grant(demand.clone(), assignment)
}

fn kill(pid: u32) {
    if pid > 0 {
        // SAFETY: signalling a child process this daemon started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use ionet::resources::CPU;

    use super::*;

    fn leases(cpus: i64) -> Leases {
        let options = WorkerPoolOptions {
            idle_timeout: Duration::from_secs(1),
            max_idle_workers: 1,
            log_dir: None,
            max_blocked_workers: 2,
        };
        let total = ResourceSet::new().with(CPU, Quantity::whole(cpus));
        Leases::new(NodeId::random(), "127.0.0.1:1".into(), "token".into(), total, Vec::new(), options)
    }

    #[test]
    fn bundles_are_held_apart_from_the_general_pool() {
        let leases = leases(2);
        let group = PlacementGroupId::random();
        let one = ResourceSet::new().with(CPU, Quantity::whole(1));
        leases.prepare_bundle(group.as_bytes(), 0, &[], one.clone()).unwrap();
        assert_eq!(leases.available(), one, "the bundle's CPU left the general pool");
        // Preparing again is a no-op; a bundle beyond what is free is refused untouched.
        leases.prepare_bundle(group.as_bytes(), 0, &[], one.clone()).unwrap();
        let two = ResourceSet::new().with(CPU, Quantity::whole(2));
        assert!(matches!(
            leases.prepare_bundle(group.as_bytes(), 1, &[], two.clone()),
            Err(IonetError::ResourceExhausted(_))
        ));
        assert_eq!((leases.available(), leases.bundle_count()), (one.clone(), 1));

        // Uncommitted: a lease naming it waits; committed: granted from the bundle only.
        let key = (group, 0);
        assert!(matches!(leases.decide_bundle(&key, &one), Step::Wait(_)));
        leases.commit_bundle(group.as_bytes(), 0).unwrap();
        let Step::Grant(resources, gpus) = leases.decide_bundle(&key, &one) else { panic!("expected a grant") };
        assert_eq!(leases.available(), one, "the general pool is untouched by the bundle's lease");
        assert!(matches!(leases.decide_bundle(&key, &one), Step::Wait(_)), "the bundle is full");
        assert!(matches!(leases.decide_bundle(&(group, 7), &one), Step::Infeasible(_)));

        // Cancelled while the lease runs: the free part comes back now, the lease's on return.
        assert!(leases.cancel_bundle(group.as_bytes(), 0).unwrap());
        assert_eq!(leases.available(), one);
        leases.give_back(&resources, gpus.as_ref(), Some(&key));
        assert_eq!(leases.available(), two);
        assert!(!leases.cancel_bundle(group.as_bytes(), 0).unwrap(), "cancelling twice is harmless");
    }

    /// Puts a lease of one CPU on a fresh worker, as a grant would.
    fn lease_one_cpu(leases: &Leases) -> (WorkerId, LeaseId) {
        let (worker, lease_id) = (WorkerId::random(), LeaseId::random());
        let one = ResourceSet::new().with(CPU, Quantity::whole(1));
        let mut state = leases.lock();
        state.available.try_subtract(&one).unwrap();
        let granted = Granted {
            resources: one,
            gpus: None,
            worker,
            bundle: None,
            holder: String::new(),
            blocked: false,
            released: Quantity::ZERO,
        };
        state.leases.insert(lease_id, granted);
        drop(state);
        leases.workers.insert(worker, (0, Some(lease_id)));
        (worker, lease_id)
    }

    fn cpus(leases: &Leases) -> i64 {
        leases.lock().available.get(CPU).units() / Quantity::whole(1).units()
    }

    #[test]
    fn blocked_workers_lend_their_cpus_up_to_the_cap() {
        let leases = leases(4); // the cap of released blocked workers is 2
        let (x, _) = lease_one_cpu(&leases); // runs without blocking until the end
        let (a, lease_a) = lease_one_cpu(&leases);
        let (b, _) = lease_one_cpu(&leases);
        let (c, _) = lease_one_cpu(&leases);
        assert_eq!(cpus(&leases), 0);
        leases.set_worker_blocked(a.as_bytes(), true).unwrap();
        leases.set_worker_blocked(a.as_bytes(), true).unwrap(); // said twice: counted once
        leases.set_worker_blocked(b.as_bytes(), true).unwrap();
        assert_eq!(cpus(&leases), 2, "two blocked workers lend their CPUs");
        leases.set_worker_blocked(c.as_bytes(), true).unwrap();
        assert_eq!(cpus(&leases), 2, "past the cap a blocked worker keeps its CPU");

        // Both lent CPUs are taken by new leases; the first worker resumes: it takes its
        // CPU back past what is free, which is reported as none free.
        let (d, _) = lease_one_cpu(&leases);
        let (_, lease_e) = lease_one_cpu(&leases);
        assert_eq!(cpus(&leases), 0);
        leases.set_worker_blocked(a.as_bytes(), false).unwrap();
        assert_eq!(cpus(&leases), 0, "under the cap again, the third lends its CPU: -1 + 1");
        leases.set_worker_blocked(b.as_bytes(), false).unwrap();
        assert_eq!(cpus(&leases), -1, "the second takes its CPU back past what is free");
        assert_eq!(leases.available().get(CPU), Quantity::ZERO, "reported clamped");

        // Leases end: each gives back what it holds, exactly once.
        leases.end_lease(lease_a, false).unwrap();
        leases.end_lease(lease_e, false).unwrap();
        assert_eq!(cpus(&leases), 1);
        leases.set_worker_blocked(d.as_bytes(), true).unwrap();
        assert_eq!(cpus(&leases), 2, "one lent (c), so d may lend too");

        // Past the cap, a blocked worker keeps its CPU while another runs; once every
        // holder of CPUs is blocked, nothing could run, so the last to block lends anyway.
        leases.set_worker_blocked(x.as_bytes(), true).unwrap();
        assert_eq!(cpus(&leases), 2, "b still runs: x keeps its CPU");
        leases.set_worker_blocked(b.as_bytes(), true).unwrap();
        assert_eq!(cpus(&leases), 3, "every holder blocked: b lends past the cap");

        assert!(matches!(leases.set_worker_blocked(WorkerId::random().as_bytes(), true), Err(IonetError::NotFound(_))));
        for worker in [b, c, d, x] {
            let lease_id = leases.workers.get(&worker).and_then(|entry| entry.1).unwrap();
            leases.end_lease(lease_id, false).unwrap();
        }
        assert_eq!(cpus(&leases), 4, "available = total once every lease has ended");
        assert_eq!(leases.lock().released_leases, 0);
    }

    #[test]
    fn idle_workers_past_the_soft_limit_get_a_grace() {
        let leases = leases(2); // keeps 1 idle worker; idle timeout 1 s
        let mut children: Vec<std::process::Child> =
            (0..3).map(|_| std::process::Command::new("sleep").arg("60").spawn().unwrap()).collect();
        let now = Instant::now();
        let idle = |child: &std::process::Child, since: Instant| {
            let key = PoolKey { job_id: Vec::new(), argv: Vec::new(), gpu_ids: Vec::new() };
            (Worker { worker_id: WorkerId::random(), address: String::new(), pid: child.id(), key }, since)
        };
        {
            let mut state = leases.lock();
            state.idle.push(idle(&children[0], now));
            state.idle.push(idle(&children[1], now)); // past the limit, idle just now: kept
            state.idle.push(idle(&children[2], now - EXCESS_IDLE_GRACE * 2)); // past it, idle long: stopped
        }
        leases.reap_idle();
        assert_eq!(leases.lock().idle.len(), 2);
        let ended = |child: &mut std::process::Child| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert!(ended(&mut children[2]), "the long-idle excess worker was stopped");
        assert!(children[0].try_wait().unwrap().is_none() && children[1].try_wait().unwrap().is_none());
        for child in &mut children[..2] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    #[test]
    fn deeper_waiting_requests_go_first() {
        let leases = leases(1);
        let one = ResourceSet::new().with(CPU, Quantity::whole(1));
        let strategy = SchedulingStrategy::Default;
        // A request at depth 3 waits here (ticket 7); one CPU comes free.
        leases.lock().waiters.insert(7, (3, one.clone()));
        assert!(
            matches!(leases.decide(&one, &strategy, true, None, 1), Step::Wait(_)),
            "a shallower request took the CPU a deeper one waits for"
        );
        assert!(matches!(leases.decide(&one, &strategy, true, Some(7), 3), Step::Grant(..)));
        // With room for both, nobody waits.
        let leases = leases_with(2);
        leases.lock().waiters.insert(7, (3, one.clone()));
        assert!(matches!(leases.decide(&one, &strategy, true, None, 1), Step::Grant(..)));
    }

    /// A lease request whose caller goes away while its worker starts (the caller's
    /// process killed, its call dropped) leaves the node's resources as they were.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_requester_that_goes_away_strands_nothing() {
        let leases = Arc::new(leases(1));
        let one = ResourceSet::new().with(CPU, Quantity::whole(1));
        // A worker that never registers and exits after a moment.
        let command = WorkerCommand { argv: vec!["sleep".into(), "1".into()], ..Default::default() };
        let request = RequestWorkerLeaseRequest {
            job_id: JobId::from_sequence(1).to_vec(),
            resources: Some((&one).into()),
            worker_command: Some(command),
            no_spillback: true,
            ..Default::default()
        };
        let abandoned = tokio::time::timeout(Duration::from_millis(200), leases.request(request)).await;
        assert!(abandoned.is_err(), "the request was still starting its worker");
        assert_eq!(cpus(&leases), 0, "the starting worker's CPU is taken");
        let deadline = Instant::now() + Duration::from_secs(30);
        while cpus(&leases) != 1 {
            assert!(Instant::now() < deadline, "the abandoned request's CPU never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(leases.lock().leases.is_empty());
    }

    fn leases_with(cpus: i64) -> Leases {
        leases(cpus)
    }
}
