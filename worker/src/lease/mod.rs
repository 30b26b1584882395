//! Leases on a node daemon: resource accounting, GPU ids, the worker pool, spillback.
//!
//! The book itself (pools, leases, bundles, worker processes) and its accounting
//! invariants are in [`state`], one struct under one lock, never held across an await;
//! this module serves requests around it (decide, grant, return, blocked workers), with
//! `process` (starting and stopping workers), `forkserver` (a job's workers forked from
//! a server of its own), `bundles` (placement-group reservations),
//! `holders` (pressing and probing lease holders) and `metering`. Its own rules:
//! - A granted lease holds one worker process exclusively; the worker was started with
//!   `CUDA_VISIBLE_DEVICES` set to exactly the GPU ids of the lease (whole GPUs exclusive,
//!   fractions packed by [`GpuAllocator`]). Idle workers are reused only for the same job,
//!   command and GPU ids.
//! - A request this node cannot serve now is answered with a node that can (spillback,
//!   from the cluster view refreshed every heartbeat), or waits here if only this node
//!   could; one no node could ever serve is answered `infeasible`, never left waiting. A
//!   spill counts against its target in the view until the view next moves on, no longer
//!   (a delta carries a row only when the head's changed).
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

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::resources::{Quantity, ResourceSet, GPU};
use ionet_common::rpc::proto::common::NodeInfo;
use ionet_common::rpc::proto::common::WorkerCommand;
use ionet_common::rpc::proto::gcs::GetJobWorkerCommandRequest;
use ionet_common::rpc::proto::node::{
    request_worker_lease_reply::Outcome, LeaseGranted, RequestWorkerLeaseReply, RequestWorkerLeaseRequest,
    SchedulingKind, Spillback,
};
use ionet_common::{IonetError, IonetResult, JobId, LeaseId, NodeId, PlacementGroupId, WorkerId};
use ionet_scheduler::{ClusterView, Decision, Demand, GpuAssignment, LabelSelector, SchedulingStrategy};
use tokio::sync::{oneshot, Notify};

use crate::cluster_view::node_view;

mod bundles;
mod drain;
mod forkserver;
mod holders;
mod metering;
mod process;
mod sample;
mod state;

use metering::{report_leases, MeterEvent};

/// `IONET_METERING=off` in a node daemon's environment: it reports no leases to the head.
pub const METERING_ENV: &str = "IONET_METERING";
/// The most unreachable nodes one lease request may ask to avoid.
const MAX_AVOIDED: usize = 16;
use state::{clamped, BundleKey, Granted, LeaseState, PoolKey, Step};

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

/// A registered worker process handed to a grant, and where it serves.
struct Worker {
    worker_id: WorkerId,
    address: String,
}

/// The lease side of a node daemon.
/// A node's leases and workers at one moment ([`Leases::readings`]).
#[derive(Clone, Debug, Default)]
pub struct LeaseReadings {
    pub workers: usize,
    pub idle_workers: usize,
    pub leases: usize,
    /// Leases granted since the daemon started.
    pub granted_total: u64,
    /// Requests waiting here for resources.
    pub waiting: usize,
    /// Placement-group bundles reserved here.
    pub bundles: usize,
    pub available: ResourceSet,
    /// Each GPU index with the share of it leased out (0 to 1).
    pub gpus_leased: Vec<(u32, f64)>,
}

pub struct Leases {
    node_id: NodeId,
    address: String,
    /// Each job's credential, from its last lease request: the workers started for the
    /// job are given it (and nothing broader).
    job_credentials: DashMap<JobId, Bearer>,
    /// The jobs' forkservers on this node (a Python job's workers are forked from one).
    forkservers: forkserver::Forkservers,
    /// The pidfd of each worker a forkserver forked, by pid: how it is stopped.
    pidfds: DashMap<u32, Arc<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>>,
    /// Jobs the head says their payer cannot cover, with why (replaced every heartbeat).
    unfunded: std::sync::RwLock<std::collections::HashMap<JobId, String>>,
    /// The account of each job that asked for a lease here.
    job_accounts: DashMap<JobId, Arc<str>>,
    /// What starts each job's workers, as the control store has it.
    job_commands: DashMap<JobId, WorkerCommand>,
    /// Each job's least reliability of a node to run on, as the head told it with the
    /// job's command (0: any).
    job_min_reliability: DashMap<JobId, u32>,
    /// Where each job's workers here write their output (pid, file), kept after they exit
    /// so what they printed last can still be read (`crate::logs`).
    job_logs: DashMap<JobId, Vec<(u32, std::path::PathBuf)>>,
    /// A connection to the control store shared by the jobs' own calls (each with its
    /// job's credential).
    gcs_channel: std::sync::OnceLock<ionet_common::failover::ClusterChannel>,
    /// Who jobs' workers run as, when this daemon may choose (root).
    identities: std::sync::OnceLock<Arc<crate::identities::WorkerIdentities>>,
    /// Where jobs' packages are unpacked on this node.
    packages: std::sync::OnceLock<Arc<crate::packages::PackageCache>>,
    /// Where jobs' requirements are installed on this node.
    pip_envs: std::sync::OnceLock<Arc<crate::pip_envs::PipEnvs>>,
    state: Mutex<LeaseState>,
    /// Told the address of every worker process that exits (its objects go).
    on_worker_exit: std::sync::OnceLock<Arc<dyn Fn(String) + Send + Sync>>,
    freed: Notify,
    /// Started workers not registered yet: their job, and where to tell the grant their
    /// address.
    starting: DashMap<WorkerId, (JobId, oneshot::Sender<String>)>,
    /// Node addresses by id, from the last refresh of the view.
    addresses: DashMap<NodeId, String>,
    /// The same addresses as a set: every pull from a peer checks its source here.
    node_addresses: dashmap::DashSet<String>,
    options: WorkerPoolOptions,
    metering: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(Instant, MeterEvent)>>>,
    gcs: Mutex<Option<ionet_common::rpc::GcsClient>>,
    /// One refresh of the view at a time (a request naming an unknown node, or one
    /// nothing fits, costs the head at most one read in flight per node, and a delta read
    /// at that): holds the number and the outcome of the last; `refreshes` counts those
    /// started.
    refreshing: tokio::sync::Mutex<(u64, bool)>,
    refreshes: std::sync::atomic::AtomicU64,
    /// One look-up of nodes outside a sampled view at a time (`sample`).
    looking_up: tokio::sync::Mutex<()>,
    /// When this node last asked the head for nodes with room (`sample`).
    room_searched: tokio::sync::Mutex<Option<Instant>>,
    /// Addresses the head said are no node's, and when (`sample`).
    unknown_addresses: DashMap<String, Instant>,
    object_store_dir: Mutex<String>,
    gcs_address: Mutex<String>,
    /// The head's public key (hex), once the node has registered: told to workers.
    head_key: Mutex<String>,
    cluster_ca: Mutex<String>,
    /// Channels to lease holders, for pressing them to give back idle leases.
    holder_channels: DashMap<String, ionet_common::rpc::AuthChannel>,
    /// This node takes no leases: every request goes to another node, or is refused.
    no_workloads: std::sync::atomic::AtomicBool,
    /// The head's check of this node's GPUs holds it back (not passed, failed, untrusted),
    /// as of the last view: it grants nothing (the head would bill none of it).
    held_back: std::sync::atomic::AtomicBool,
    /// A check of this node's GPUs is running: no new lease until it ends (a check never
    /// lands on a GPU leased meanwhile, whatever the head's book says).
    checking: std::sync::atomic::AtomicBool,
    /// Leaving: no new leases (`drain`).
    draining: std::sync::atomic::AtomicBool,
}

/// Fresh workers a grant starts at most when each exits as it is leased.
const MAX_STARTS_PER_GRANT: u32 = 3;

/// A request waiting this long (then twice as long, and so on) logs what the node holds.
const LONG_WAIT: Duration = Duration::from_secs(10);
/// How long a request spilled here waits before it may be spilled on again.
const RESPILL_AFTER: Duration = Duration::from_secs(2);
/// How long a request waits for room in a sampled view before the head is asked for
/// nodes that have some.
const ROOM_SEARCH_AFTER: Duration = Duration::from_millis(500);

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

/// What a node must be to take a request besides room: labelled to match every selector
/// and, for a job that asks for it, at least as reliable as the job's minimum (the
/// head's score, as the node table shows it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Needs {
    pub(crate) selectors: Vec<LabelSelector>,
    pub(crate) min_reliability_bps: u32,
}

impl Needs {
    pub(crate) fn admits(&self, node: &ionet_scheduler::NodeView) -> bool {
        node.reliability_bps >= self.min_reliability_bps
            && self.selectors.iter().all(|selector| selector.matches(&node.labels))
    }

    /// `resources` as the scheduler's demand, with these needs.
    fn demand(&self, resources: &ResourceSet) -> Demand {
        let mut demand = Demand::new(resources.clone());
        for selector in &self.selectors {
            demand = demand.with_label_selector(selector.clone());
        }
        if self.min_reliability_bps > 0 {
            demand = demand.with_min_reliability_bps(self.min_reliability_bps);
        }
        demand
    }
}

/// Where a request may run: its strategy, and the label selectors a node must match (the
/// job's minimum reliability is the job's, never the request's: set by the caller).
fn placement(request: &RequestWorkerLeaseRequest) -> IonetResult<(SchedulingStrategy, Needs)> {
    let wire = request.strategy.clone().unwrap_or_default();
    let strategy = match SchedulingKind::try_from(wire.kind).unwrap_or(SchedulingKind::Default) {
        SchedulingKind::Default => SchedulingStrategy::Default,
        SchedulingKind::Spread => SchedulingStrategy::Spread,
        SchedulingKind::Cost => SchedulingStrategy::Cost,
        SchedulingKind::CostPerTflop => SchedulingStrategy::CostPerTflop,
        SchedulingKind::NodeAffinity => {
            SchedulingStrategy::NodeAffinity { node_id: NodeId::from_bytes(&wire.node_id)?, soft: wire.soft }
        }
    };
    let selectors = wire
        .label_selectors
        .iter()
        .map(|text| LabelSelector::parse(text).map_err(|err| IonetError::InvalidArgument(err.to_string())))
        .collect::<IonetResult<Vec<_>>>()?;
    Ok((strategy, Needs { selectors, min_reliability_bps: 0 }))
}

impl Leases {
    pub fn new(
        node_id: NodeId,
        address: String,
        total: ResourceSet,
        gpu_indices: Vec<u32>,
        options: WorkerPoolOptions,
    ) -> Self {
        Self {
            node_id,
            address,
            job_credentials: DashMap::new(),
            forkservers: forkserver::Forkservers::default(),
            pidfds: DashMap::new(),
            unfunded: std::sync::RwLock::new(std::collections::HashMap::new()),
            job_accounts: DashMap::new(),
            job_logs: DashMap::new(),
            job_commands: DashMap::new(),
            job_min_reliability: DashMap::new(),
            gcs_channel: std::sync::OnceLock::new(),
            identities: std::sync::OnceLock::new(),
            packages: std::sync::OnceLock::new(),
            pip_envs: std::sync::OnceLock::new(),
            state: Mutex::new(LeaseState::new(total, gpu_indices)),
            freed: Notify::new(),
            starting: DashMap::new(),
            on_worker_exit: std::sync::OnceLock::new(),
            addresses: DashMap::new(),
            node_addresses: dashmap::DashSet::new(),
            options,
            metering: Mutex::new(None),
            gcs: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new((0, false)),
            refreshes: std::sync::atomic::AtomicU64::new(0),
            looking_up: tokio::sync::Mutex::new(()),
            room_searched: tokio::sync::Mutex::new(None),
            unknown_addresses: DashMap::new(),
            object_store_dir: Mutex::new(String::new()),
            gcs_address: Mutex::new(String::new()),
            head_key: Mutex::new(String::new()),
            cluster_ca: Mutex::new(String::new()),
            holder_channels: DashMap::new(),
            no_workloads: std::sync::atomic::AtomicBool::new(false),
            held_back: std::sync::atomic::AtomicBool::new(false),
            checking: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether `address` is a node of this cluster (this one, or one in the last view):
    /// the only addresses a node daemon calls with its own credential.
    /// `hook` is told the address of every worker process that exits from now on.
    pub fn on_worker_exit(&self, hook: Arc<dyn Fn(String) + Send + Sync>) {
        let _ = self.on_worker_exit.set(hook);
    }

    /// The control store's client, once the daemon registered.
    ///
    /// (See [`Leases::is_node_address`] for whether an address is a node's.)
    pub fn control_store(&self) -> Option<ionet_common::rpc::GcsClient> {
        self.gcs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every other node the view shows alive and taking work: (id, address).
    pub fn other_alive_nodes(&self) -> Vec<(NodeId, String)> {
        let ids: Vec<NodeId> = self
            .lock()
            .view
            .nodes()
            .filter(|node| node.node_id != self.node_id && node.state == ionet_scheduler::NodeState::Alive)
            .map(|node| node.node_id)
            .collect();
        ids.into_iter().filter_map(|id| self.address_of(&id).map(|address| (id, address))).collect()
    }

    /// The address of node `node` (the view refreshed once if it is not known yet, or the
    /// node looked up when the view is a sample).
    pub async fn node_address(&self, node: &NodeId) -> Option<String> {
        if let Some(address) = self.address_of(node) {
            return Some(address);
        }
        let learnt = if self.view_is_sampled() {
            self.look_up(std::slice::from_ref(node), &[]).await
        } else {
            self.refresh_from_control_store().await
        };
        learnt.then(|| self.address_of(node)).flatten()
    }

    /// Whether `address` is a node's in the view as it is (no refresh).
    pub fn knows_node_address(&self, address: &str) -> bool {
        address == self.address || self.node_addresses.contains(address)
    }

    pub async fn is_node_address(&self, address: &str) -> bool {
        let known = |leases: &Self| address == leases.address || leases.node_addresses.contains(address);
        if known(self) {
            return true;
        }
        // A node that joined since the last refresh is found by one more (or by a look-up
        // of the address, when the view is a sample).
        let learnt = if self.view_is_sampled() {
            self.look_up(&[], &[address.to_string()]).await
        } else {
            self.refresh_from_control_store().await
        };
        learnt && known(self)
    }

    /// From now on this node grants no lease: requests are sent to other nodes (the view
    /// shows this node as draining), or refused if none could take them.
    pub fn refuse_workloads(&self) {
        self.no_workloads.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Where workers started from now on find the node's object store.
    /// Told to workers, which reach the control store for actors.
    /// The head's public key, learned at registration, for the workers started from now on.
    pub fn set_head_key(&self, key: &[u8]) {
        *self.head_key.lock().unwrap_or_else(|p| p.into_inner()) = hex::encode(key);
    }

    /// The command that starts `job_id`'s workers: the one its driver declared when the
    /// job was created under its credential, asked of the control store once per job.
    async fn job_command(&self, job_id: JobId) -> IonetResult<WorkerCommand> {
        if let Some(command) = self.job_commands.get(&job_id) {
            return Ok(command.clone());
        }
        // Asked with the job's own credential: the head tells a job's command to that job
        // alone, not to every node of the cluster.
        let credential = self.job_credentials.get(&job_id).map(|credential| credential.clone()).ok_or_else(|| {
            IonetError::Internal(format!("no credential of job {job_id} to ask its worker command with"))
        })?;
        let channel = match self.gcs_channel.get() {
            Some(channel) => channel.clone(),
            None => {
                let address = self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let channel = ionet_common::rpc::lazy_channel(&address, Duration::from_secs(5))?;
                self.gcs_channel.get_or_init(|| channel).clone()
            }
        };
        let mut client = ionet_common::rpc::GcsClient::new(ionet_common::rpc::with_credential(channel, &credential));
        let reply = client.get_job_worker_command(GetJobWorkerCommandRequest { job_id: job_id.to_vec() }).await?;
        let reply = reply.into_inner();
        let command = reply.worker_command.filter(|command| !command.argv.is_empty()).ok_or_else(|| {
            IonetError::FailedPrecondition(format!("job {job_id} declared no command to start its workers"))
        })?;
        self.job_min_reliability.insert(job_id, reply.min_reliability_bps);
        self.job_commands.insert(job_id, command.clone());
        Ok(command)
    }

    /// Declares `job_id`'s worker command here, as the control store would tell it.
    #[cfg(test)]
    pub(crate) fn declare_job_command(&self, job_id: JobId, command: WorkerCommand) {
        self.job_commands.insert(job_id, command);
    }

    /// Jobs' workers run as users of their own from now on.
    /// Where jobs' packages (working dir, modules) are unpacked and their requirements
    /// installed, for their workers.
    pub fn set_package_cache(&self, cache: Arc<crate::packages::PackageCache>, envs: Arc<crate::pip_envs::PipEnvs>) {
        let _ = self.packages.set(cache);
        let _ = self.pip_envs.set(envs);
    }

    pub fn set_identities(&self, identities: Arc<crate::identities::WorkerIdentities>) {
        let _ = self.identities.set(identities);
    }

    /// The cluster CA (PEM) the workers started from now on trust (the cluster speaks TLS).
    pub fn set_cluster_ca(&self, pem: &str) {
        *self.cluster_ca.lock().unwrap_or_else(|p| p.into_inner()) = pem.to_string();
    }

    pub fn set_gcs_address(&self, address: String) {
        *self.gcs_address.lock().unwrap_or_else(|p| p.into_inner()) = address;
    }

    pub fn set_object_store_dir(&self, dir: String) {
        *self.object_store_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// Brings the node view up to the head's table now; whether it could. One refresh
    /// runs at a time: a caller that waited for one that started after it asked takes
    /// that one's outcome (a head that does not answer is asked once, not once per caller).
    async fn refresh_from_control_store(&self) -> bool {
        use std::sync::atomic::Ordering;
        let asked = self.refreshes.load(Ordering::SeqCst);
        let mut last = self.refreshing.lock().await;
        if last.0 > asked {
            return last.1;
        }
        let number = self.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
        let refreshed = self.read_view_from_control_store().await;
        *last = (number, refreshed);
        refreshed
    }

    /// Reads what changed of the node table since the view's version (the head answers
    /// with the whole table when the view is of another incarnation or too far behind).
    async fn read_view_from_control_store(&self) -> bool {
        let client = self.gcs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mut client) = client else { return false };
        let mut since = self.view_at();
        for _ in 0..2 {
            let request = ionet_common::rpc::proto::gcs::GetAllNodesRequest {
                include_dead: false,
                since_incarnation: since.0,
                since_version: since.1,
                sample_for: self.node_id.to_vec(),
                ..Default::default()
            };
            let Ok(reply) = client.get_all_nodes(request).await else { return false };
            let reply = reply.into_inner();
            let at = (reply.incarnation, reply.version);
            if !reply.delta {
                // Applied unless the view is newer already (then it holds all of it).
                self.refresh_view_at(&reply.nodes, at, reply.sampled);
                return true;
            }
            if self.apply_view_delta(&reply.nodes, &reply.removed, since, at) {
                return true;
            }
            let now = self.view_at();
            if now.0 == at.0 && now.1 >= at.1 {
                return true; // a heartbeat's delta took the view as far meanwhile
            }
            // A heartbeat's older delta moved the view meanwhile: read the whole table.
            since = (0, 0);
        }
        false
    }

    /// Connects the leases to the control store: for fresh views, and to report every
    /// lease to the head's metering service.
    pub fn attach_control_store(&self, channel: ionet_common::rpc::AuthChannel) {
        *self.gcs.lock().unwrap_or_else(|p| p.into_inner()) = Some(ionet_common::rpc::GcsClient::new(channel.clone()));
        self.attach_metering(ionet_common::rpc::MeteringClient::new(channel));
    }

    fn attach_metering(&self, client: ionet_common::rpc::MeteringClient) {
        // A node that bills nobody (a private cluster, or a benchmark of metering's cost)
        // reports nothing; such a node is paid nothing either.
        if std::env::var(METERING_ENV).is_ok_and(|value| value == "off") {
            tracing::warn!("{METERING_ENV}=off: this node reports no leases and is paid for none");
            return;
        }
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(report_leases(self.node_id, client, receiver));
        *self.metering.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }

    fn meter(&self, event: MeterEvent) {
        if let Some(sender) = self.metering.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = sender.send((Instant::now(), event));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What is free now (CPUs taken back past what was free count as none).
    pub fn available(&self) -> ResourceSet {
        clamped(&self.lock().available)
    }

    /// Bundle `index` of placement group `group`, whole, for a process this node runs
    /// (a submitted job's entrypoint): no lease is granted in it while the process holds
    /// it, and the ids of its GPUs are taken from the free ones, the process's alone
    /// until [`Leases::vacate_bundle`].
    pub fn occupy_bundle(&self, group: &[u8], index: u32) -> IonetResult<(GpuAssignment, ResourceSet)> {
        let key = (PlacementGroupId::from_bytes(group)?, index);
        let mut state = self.lock();
        let state = &mut *state;
        let bundle = state.bundles.get_mut(&key).ok_or_else(|| {
            IonetError::FailedPrecondition(format!(
                "bundle {index} of placement group {} is not held here",
                key.0.short()
            ))
        })?;
        if !bundle.committed || bundle.available != bundle.total {
            return Err(IonetError::FailedPrecondition(format!(
                "bundle {index} of placement group {} is not committed and free",
                key.0.short()
            )));
        }
        let wanted = bundle.total.get(GPU);
        let gpus = state
            .gpus
            .allocate(wanted)
            .map_err(|err| IonetError::Internal(err.to_string()))?
            .ok_or_else(|| IonetError::Unavailable(format!("{wanted} GPUs are not free on this node")))?;
        bundle.available = ResourceSet::new();
        Ok((gpus, bundle.total.clone()))
    }

    /// Gives back what [`Leases::occupy_bundle`] took: the bundle's room (`held`) to the
    /// bundle, or to the node when the bundle was cancelled meanwhile (which gave back
    /// only its free part), and its GPU ids.
    pub fn vacate_bundle(&self, group: &[u8], index: u32, gpus: &GpuAssignment, held: &ResourceSet) {
        let mut state = self.lock();
        let bundle = PlacementGroupId::from_bytes(group).ok().and_then(|group| state.bundles.get_mut(&(group, index)));
        match bundle {
            Some(bundle) => bundle.available = bundle.total.clone(),
            None => state.available.add(held),
        }
        if let Err(err) = state.gpus.release(gpus) {
            tracing::error!(error = %err, "gpu accounting refused an entrypoint's release");
        }
        drop(state);
        self.freed.notify_waiters();
    }

    pub fn worker_count(&self) -> usize {
        self.lock().processes.len()
    }

    /// The node's work in numbers, for its `/metrics`; `gpus` names the node's GPU
    /// indices (each read as the share of it leased out).
    pub fn readings(&self, gpus: &[u32]) -> LeaseReadings {
        let state = self.lock();
        LeaseReadings {
            workers: state.processes.len(),
            idle_workers: state.idle_count(),
            leases: state.leases.len(),
            granted_total: state.granted_total,
            waiting: state.waiters.len(),
            bundles: state.bundles.len(),
            available: clamped(&state.available),
            gpus_leased: gpus
                .iter()
                .map(|index| (*index, 1.0 - state.gpus.free_share(*index).map_or(0.0, |free| free.as_f64())))
                .collect(),
        }
    }

    /// Replaces the cluster view with the control store's node table, of unknown age (a
    /// delta reader reads it whole next). Nodes always know the version they read: for
    /// tests.
    #[cfg(test)]
    pub(crate) fn refresh_view(&self, nodes: &[NodeInfo]) {
        self.refresh_view_at(nodes, (0, 0), false);
    }

    /// Replaces the cluster view with the node table as of `at` (incarnation, version),
    /// or with this node's sample of it (`sampled`), unless the view is newer already (a
    /// read answered after a later delta was applied: a node dead since would come back).
    pub fn refresh_view_at(&self, nodes: &[NodeInfo], at: (u64, u64), sampled: bool) {
        let older = |state: &LeaseState| at.1 != 0 && state.view_at.0 == at.0 && state.view_at.1 > at.1;
        if older(&self.lock()) {
            return;
        }
        let mut view = ClusterView::new();
        for node in self.learn_rows(nodes) {
            let _ = view.upsert_node(node);
        }
        let mut state = self.lock();
        if older(&state) {
            return;
        }
        self.learn_own_row(nodes);
        view.continue_spread_of(&state.view);
        state.view = view;
        state.view_at = at;
        state.view_sampled = sampled;
        state.found.clear();
        state.spilled.clear();
    }

    /// Applies what changed in the control store's node table from `since` to `at`
    /// (incarnation, version): rows changed (`nodes`) and nodes gone (`removed`); the rest
    /// of the view stays. A delta from anywhere but where the view stands is dropped (the
    /// next read asks from there).
    pub fn apply_view_delta(&self, nodes: &[NodeInfo], removed: &[Vec<u8>], since: (u64, u64), at: (u64, u64)) -> bool {
        if self.lock().view_at != since {
            return false;
        }
        let views = self.learn_rows(nodes);
        let mut state = self.lock();
        if state.view_at != since {
            return false;
        }
        self.learn_own_row(nodes);
        for (node_id, demand) in std::mem::take(&mut state.spilled) {
            let _ = state.view.release(&node_id, &demand);
        }
        let carried: Vec<NodeId> =
            if state.found.is_empty() { Vec::new() } else { views.iter().map(|view| view.node_id).collect() };
        for view in views {
            let _ = state.view.upsert_node(view);
        }
        for node in removed {
            if let Ok(node_id) = NodeId::from_bytes(node) {
                state.view.remove_node(&node_id);
            }
        }
        if !state.found.is_empty() {
            state.expire_found(&carried);
        }
        state.view_at = at;
        true
    }

    /// Where the cluster view stands: (incarnation, version) of the head's node table.
    pub fn view_at(&self) -> (u64, u64) {
        self.lock().view_at
    }

    /// The addresses of `nodes`, and their rows as the scheduler's views.
    fn learn_rows(&self, nodes: &[NodeInfo]) -> Vec<ionet_scheduler::NodeView> {
        let mut views = Vec::with_capacity(nodes.len());
        for node in nodes {
            if let Ok(node_id) = NodeId::from_bytes(&node.node_id) {
                self.addresses.insert(node_id, node.address.clone());
                self.node_addresses.insert(node.address.clone());
            }
            match node_view(node) {
                Ok(view) => views.push(view),
                Err(err) => tracing::warn!(error = %err, "skipping a malformed node record"),
            }
        }
        views
    }

    /// The head's word on this node's own GPU check, if `nodes` holds its row.
    fn learn_own_row(&self, nodes: &[NodeInfo]) {
        if let Some(own) = nodes.iter().find(|node| node.node_id == self.node_id.as_bytes()) {
            // Let go (cleared, passed): requests waiting here are woken.
            self.set_held_back(ionet_common::gpu_proof::held_back(own));
        }
    }

    /// The head's verdict on this node's GPUs, as soon as it comes (before the next view).
    pub fn set_held_back(&self, held: bool) {
        self.held_back.store(held, std::sync::atomic::Ordering::SeqCst);
        if !held {
            self.freed.notify_waiters();
        }
    }

    /// A check of this node's GPUs starts (`true`) or ends: no new lease meanwhile.
    pub fn set_checking(&self, checking: bool) {
        self.checking.store(checking, std::sync::atomic::Ordering::SeqCst);
        if !checking {
            self.freed.notify_waiters();
        }
    }

    /// Whether this node grants nothing now: held back by the head's check of its GPUs,
    /// or running one.
    fn held(&self) -> bool {
        self.held_back.load(std::sync::atomic::Ordering::Relaxed)
            || self.checking.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Alive nodes in the cluster view that spillback decisions read.
    pub fn nodes_in_view(&self) -> usize {
        self.lock().view.alive_count()
    }

    fn decide(
        &self,
        demand: &ResourceSet,
        strategy: &SchedulingStrategy,
        needs: &Needs,
        no_spillback: bool,
        ticket: Option<u64>,
        depth: u32,
        avoid: &[NodeId],
    ) -> Step {
        let mut state = self.lock();
        // Rows found outside a sampled view are dropped once kept long enough (a node
        // found may have died since: deltas of the sample do not say).
        if !state.found.is_empty() {
            state.expire_found(&[]);
        }
        let gpus = demand.get(GPU);
        let fits_now = |state: &LeaseState| {
            state.available.contains(demand) && (gpus.is_zero() || state.gpus.total_free() >= gpus)
        };
        // This node as the head lists it (labels, reliability), read only when the request
        // needs something of it.
        let own = if needs.selectors.is_empty() && needs.min_reliability_bps == 0 {
            None
        } else {
            Some(
                state
                    .view
                    .node(&self.node_id)
                    .cloned()
                    .unwrap_or_else(|| ionet_scheduler::NodeView::new(self.node_id, ResourceSet::new())),
            )
        };
        let own_labels = own.as_ref().map(|own| own.labels.clone()).unwrap_or_default();
        let labelled = needs.selectors.iter().all(|selector| selector.matches(&own_labels));
        let own_reliability = own.as_ref().map_or(ionet_common::reliability::FULL, |own| own.reliability_bps);
        let reliable = own_reliability >= needs.min_reliability_bps;
        let no_workloads = self.no_workloads.load(std::sync::atomic::Ordering::Relaxed);
        let fits_ever = state.total.contains(demand) && labelled && reliable && !no_workloads;
        let grant = |state: &mut LeaseState| -> Step { state.take(demand, None, "resources are busy") };
        let local_or_wait = |state: &mut LeaseState, why: &str| -> Step {
            if no_workloads {
                Step::Infeasible(format!(
                    "node {} runs no workloads (the head pays out on chain; start it with --allow-head-workloads \
                     to let it)",
                    self.node_id.short()
                ))
            } else if !labelled {
                let wanted: Vec<String> = needs.selectors.iter().map(ToString::to_string).collect();
                Step::Infeasible(format!(
                    "no node can ever fit {demand} with labels [{}]: node {} is labelled {own_labels:?}",
                    wanted.join(", "),
                    self.node_id.short()
                ))
            } else if !reliable {
                Step::Infeasible(format!(
                    "the job runs only on nodes of reliability >= {}: node {} scores {}",
                    ionet_common::reliability::format(needs.min_reliability_bps),
                    self.node_id.short(),
                    ionet_common::reliability::format(own_reliability)
                ))
            } else if !fits_ever {
                Step::Infeasible(format!(
                    "no node can ever fit {demand}: node {} has {} in all",
                    self.node_id.short(),
                    state.total
                ))
            } else if self.held_back.load(std::sync::atomic::Ordering::Relaxed) {
                Step::Wait(format!(
                    "node {} takes no work until its GPUs pass the head's check (`ionet status`: GPU CHECK)",
                    self.node_id.short()
                ))
            } else if self.checking.load(std::sync::atomic::Ordering::Relaxed) {
                Step::Wait(format!("node {} takes no work while its GPUs are checked", self.node_id.short()))
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
                // Soft: a node held back by its GPU check sends it elsewhere.
                let held = self.held();
                if (fits_ever && !held) || !soft {
                    return local_or_wait(&mut state, "waiting for resources on the node it is pinned to");
                }
            } else if let Some(target) = state
                .view
                .node(node_id)
                .filter(|node| node.state == ionet_scheduler::NodeState::Alive)
                // A soft preference for a node its requester could not reach is dropped.
                .filter(|node| !*soft || !avoid.contains(&node.node_id))
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
            if no_workloads {
                own.state = ionet_scheduler::NodeState::Draining;
            }
            let _ = state.view.upsert_node(own);
        }
        let policy = match strategy {
            SchedulingStrategy::NodeAffinity { .. } => SchedulingStrategy::Default,
            other => other.clone(),
        };
        let wanted = needs.demand(demand);
        // Nodes its requester could not reach are left out of this choice (their state is
        // put back after it): a spill there would fail again until the head declares them.
        let avoided: Vec<NodeId> = avoid
            .iter()
            .filter(|node_id| **node_id != self.node_id)
            .filter(|node_id| {
                state.view.node(node_id).is_some_and(|node| node.state == ionet_scheduler::NodeState::Alive)
            })
            .copied()
            .collect();
        for node_id in &avoided {
            let _ = state.view.set_state(node_id, ionet_scheduler::NodeState::Draining);
        }
        let mut decision = state.view.schedule(&wanted, &policy, Some(&self.node_id));
        for node_id in &avoided {
            let _ = state.view.set_state(node_id, ionet_scheduler::NodeState::Alive);
        }
        // Only an avoided node could ever take it: not infeasible, it waits for that one
        // (queued there below, as if nothing were avoided: it may be restarting).
        if let Decision::Infeasible { reason } = &decision {
            let an_avoided_node_fits = avoided
                .iter()
                .filter_map(|node_id| state.view.node(node_id))
                .any(|node| node.total.contains(demand) && needs.admits(node));
            if an_avoided_node_fits {
                decision = Decision::Wait { reason: reason.clone() };
            }
        }
        match decision {
            Decision::Place(node_id) if node_id == self.node_id => local_or_wait(&mut state, "resources are busy"),
            Decision::Place(node_id) => match self.address_of(&node_id) {
                Some(address) => {
                    // Count it there until the view next moves on, so a burst spreads.
                    if state.view.allocate(&node_id, demand).is_ok() {
                        state.spilled.push((node_id, demand.clone()));
                    }
                    Step::Spill(node_id, address)
                }
                None => local_or_wait(&mut state, "resources are busy"),
            },
            Decision::Wait { reason } => {
                if fits_ever {
                    Step::Wait(reason)
                } else {
                    // Queue on a node that could take it once free (one its requester
                    // could not reach only if no other could).
                    let could = |node: &&ionet_scheduler::NodeView| {
                        node.state == ionet_scheduler::NodeState::Alive
                            && node.total.contains(demand)
                            && needs.admits(node)
                    };
                    let target = state
                        .view
                        .nodes()
                        .filter(could)
                        .min_by_key(|node| avoided.contains(&node.node_id))
                        .map(|node| node.node_id);
                    match target.and_then(|node_id| self.address_of(&node_id).map(|address| (node_id, address))) {
                        Some((node_id, address)) => Step::Queue(node_id, address),
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

    pub(crate) fn address_of(&self, node_id: &NodeId) -> Option<String> {
        self.addresses.get(node_id).map(|entry| entry.clone())
    }

    /// Serves one lease request, asked with `credential` (its job's own, which the workers
    /// started for it are given): grant, spill back, wait, or refuse.
    pub async fn request(
        self: &Arc<Self>,
        request: RequestWorkerLeaseRequest,
        credential: Bearer,
        account: Arc<str>,
    ) -> IonetResult<RequestWorkerLeaseReply> {
        let demand = request.resources.clone().unwrap_or_default().to_set()?;
        let gpus = demand.get(GPU);
        if gpus > Quantity::whole(1) && gpus.units() % Quantity::whole(1).units() != 0 {
            return Err(IonetError::InvalidArgument(format!("a demand of {gpus} GPUs must be whole above 1")));
        }
        let job_id = JobId::from_bytes(&request.job_id)?;
        // A job whose payer cannot cover its leases gets nothing new here (the head says
        // which with every heartbeat).
        if let Some(reason) = self.unfunded.read().unwrap_or_else(|p| p.into_inner()).get(&job_id) {
            return Err(IonetError::FailedPrecondition(format!("job {job_id} may not lease more: {reason}")));
        }
        self.job_credentials.insert(job_id, credential);
        self.job_accounts.insert(job_id, account);
        // What the job declared when it was created, never what a request says; a task's or
        // actor's own environment adds its env_vars and requirements (never the program).
        let mut command = self.job_command(job_id).await?;
        if let Some(runtime_env) = &request.runtime_env {
            ionet_common::jobs::apply_runtime_env(&mut command, runtime_env)?;
        }
        let (strategy, mut needs) = placement(&request)?;
        needs.min_reliability_bps = self.job_min_reliability.get(&job_id).map_or(0, |min| *min);
        let mut avoid: Vec<NodeId> =
            request.avoid_nodes.iter().take(MAX_AVOIDED).filter_map(|id| NodeId::from_bytes(id).ok()).collect();
        avoid.sort_unstable();
        avoid.dedup();
        let bundle = if request.placement_group_id.is_empty() {
            None
        } else {
            Some((PlacementGroupId::from_bytes(&request.placement_group_id)?, request.bundle_index))
        };
        // A node it is pinned to that a sampled view does not hold is looked up first.
        if let SchedulingStrategy::NodeAffinity { node_id, .. } = &strategy {
            let missing =
                *node_id != self.node_id && self.view_is_sampled() && self.lock().view.node(node_id).is_none();
            if missing {
                self.find_node(node_id).await;
            }
        }
        let (mut refreshed, mut room_searched) = (false, false);
        let mut waiting: Option<WaiterTicket<'_>> = None;
        let since = Instant::now();
        let mut next_report = LONG_WAIT;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let ticket = waiting.as_ref().map(|waiting| waiting.ticket);
            if self.is_draining() {
                // Leaving: the request goes to another node, or its requester asks again
                // elsewhere (an unreachable or leaving spill target is avoided).
                let elsewhere = (bundle.is_none() && !request.no_spillback)
                    .then(|| self.elsewhere(&demand, &strategy, &needs, &avoid))
                    .flatten();
                return match elsewhere {
                    Some((node_id, node_address)) => Ok(RequestWorkerLeaseReply {
                        outcome: Some(Outcome::Spillback(Spillback { node_id: node_id.to_vec(), node_address })),
                    }),
                    None => Err(IonetError::Unavailable(format!(
                        "node {} is draining: it takes no new leases",
                        self.node_id.short()
                    ))),
                };
            }
            let step = match &bundle {
                Some(key) => self.decide_bundle(key, &demand),
                None => {
                    // A request another node sent here stays, unless it waited long enough
                    // for the views to have moved on (two requests spilled here at once on
                    // one stale view, while another node sits free, go on there).
                    let pinned = request.no_spillback && since.elapsed() < RESPILL_AFTER;
                    self.decide(&demand, &strategy, &needs, pinned, ticket, request.depth, &avoid)
                }
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
                    // Served: no longer a waiting request that others must yield to.
                    drop(waiting.take());
                    return reply
                        .await
                        .map_err(|_| IonetError::Internal("the lease grant was dropped unfinished".into()))?;
                }
                Step::Queue(..) if !room_searched && bundle.is_none() && self.view_is_sampled() => {
                    // Nothing in a sampled view has room: the head looks in the whole
                    // table before the request queues on a busy node.
                    room_searched = true;
                    self.search(&demand, &needs, &avoid, true).await;
                    continue;
                }
                Step::Spill(node_id, node_address) | Step::Queue(node_id, node_address) => {
                    return Ok(RequestWorkerLeaseReply {
                        outcome: Some(Outcome::Spillback(Spillback { node_id: node_id.to_vec(), node_address })),
                    })
                }
                Step::Infeasible(reason) => {
                    // The view may predate a node that just joined, or be a sample without
                    // the nodes that fit: look again (the head searches the whole table
                    // for a sample) before refusing.
                    if !refreshed {
                        refreshed = true;
                        let found = self.view_is_sampled()
                            && match &strategy {
                                // Pinned: its node is looked up again (a search finds others).
                                SchedulingStrategy::NodeAffinity { node_id, soft: false }
                                    if *node_id != self.node_id =>
                                {
                                    self.find_node(node_id).await
                                }
                                _ => self.search(&demand, &needs, &avoid, false).await,
                            };
                        if found || self.refresh_from_control_store().await {
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
                    // Nothing in a sampled view has room: the head looks for nodes that
                    // have, in the whole table (at most once a second per node).
                    // (A request sent here moves on only once it has waited `RESPILL_AFTER`.)
                    let pinned = request.no_spillback && since.elapsed() < RESPILL_AFTER;
                    let movable = bundle.is_none() && !pinned && since.elapsed() >= ROOM_SEARCH_AFTER;
                    if movable && self.view_is_sampled() && self.search(&demand, &needs, &avoid, true).await {
                        continue;
                    }
                    // Woken when a lease ends; re-decided at least once a second, since
                    // the cluster view changes too.
                    let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
                }
            }
        }
    }

    /// Leases an idle worker of the pool, or a fresh one, with resources already taken;
    /// gives them back if no worker can be had.
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
        let runtime_env = command.env.get(ionet_common::worker_env::RUNTIME_ENV).cloned().unwrap_or_default();
        let key =
            PoolKey { job_id: job_id.to_vec(), argv: command.argv.clone(), gpu_ids: gpu_ids.clone(), runtime_env };
        let granted = |worker: WorkerId| Granted {
            resources: resources.clone(),
            gpus: gpus.clone(),
            worker,
            bundle,
            pool: bundle,
            holder: holder.clone(),
            blocked: false,
            released: Quantity::ZERO,
        };
        // An idle worker of the pool, found and leased in one step.
        let idle = {
            let mut state = self.lock();
            state.idle_of(&key).and_then(|worker| {
                let address = state.processes.get(&worker).map(|process| process.address.clone())?;
                let lease_id = self.record(&mut state, job_id, granted(worker))?;
                Some((lease_id, worker, address))
            })
        };
        let mut starts = 0;
        let (lease_id, worker, address) = match idle {
            Some(leased) => leased,
            None => loop {
                if starts == MAX_STARTS_PER_GRANT {
                    self.give_back(&resources, gpus.as_ref(), bundle.as_ref());
                    return Err(IonetError::Unavailable(format!(
                        "{MAX_STARTS_PER_GRANT} workers in a row exited as they were leased; see the worker logs"
                    )));
                }
                starts += 1;
                let started = match self.start_worker(job_id, command, key.clone()).await {
                    Ok(started) => started,
                    Err(err) => {
                        self.give_back(&resources, gpus.as_ref(), bundle.as_ref());
                        return Err(err);
                    }
                };
                let recorded = self.record(&mut self.lock(), job_id, granted(started.worker_id));
                match recorded {
                    Some(lease_id) => break (lease_id, started.worker_id, started.address),
                    // It exited as it was leased (its exit watcher ran first): another.
                    None => continue,
                }
            },
        };
        let reply = LeaseGranted {
            lease_id: lease_id.to_vec(),
            worker_id: worker.to_vec(),
            worker_address: address,
            gpu_ids,
            node_id: self.node_id.to_vec(),
        };
        Ok(RequestWorkerLeaseReply { outcome: Some(Outcome::Granted(reply)) })
    }

    /// Records a lease under the lock, metering its start there (so its end, metered
    /// under the lock too, never comes first); `None` when its worker is gone.
    fn record(&self, state: &mut LeaseState, job_id: JobId, granted: Granted) -> Option<LeaseId> {
        let lease_id = LeaseId::random();
        let start = Granted::metered(&granted.resources, granted.bundle.as_ref()).then(|| MeterEvent::Started {
            lease_id,
            job_id,
            resources: granted.resources.clone(),
            bundle: None,
        });
        if !state.record_lease(lease_id, granted) {
            return None;
        }
        if let Some(event) = start {
            self.meter(event);
        }
        Some(lease_id)
    }

    fn give_back(&self, resources: &ResourceSet, gpus: Option<&GpuAssignment>, bundle: Option<&BundleKey>) {
        self.lock().give_back(resources, gpus, bundle);
        self.freed.notify_waiters();
    }

    /// Ends a lease: resources back, the worker back to the pool (or stopped if it failed).
    pub fn return_lease(&self, lease_id: &[u8], worker_failed: bool) -> IonetResult<()> {
        self.end_lease(LeaseId::from_bytes(lease_id)?, worker_failed)
    }

    /// Ends a lease in the book (metering its end under the lock) and stops its worker
    /// when it failed; `None` if it is not held here.
    fn end(&self, lease_id: LeaseId, failed: bool) -> Option<Granted> {
        let ended = {
            let mut state = self.lock();
            let ended = state.end_lease(lease_id, failed, Instant::now(), self.options.max_blocked_workers)?;
            if Granted::metered(&ended.granted.resources, ended.granted.bundle.as_ref()) {
                self.meter(MeterEvent::Ended { lease_id });
            }
            ended
        };
        if let Some(pid) = ended.stop {
            self.kill(pid);
        }
        self.freed.notify_waiters();
        Some(ended.granted)
    }

    /// The worker says its task is blocked in `get`/`wait` (or resumed): its lease's
    /// CPUs go back to their pool while it waits (up to the cap), and are taken back, even
    /// past what is free, when it resumes. A worker that holds no lease is told so.
    pub fn set_worker_blocked(&self, worker_id: &[u8], blocked: bool) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let lent = self.lock().set_blocked(worker_id, blocked, self.options.max_blocked_workers);
        match lent {
            Ok(true) => {
                self.freed.notify_waiters();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(unknown) => Err(IonetError::NotFound(unknown)),
        }
    }

    /// The worker holds objects for other processes (or no longer does): while it does,
    /// it is not stopped for being idle (its objects would be lost with it).
    pub fn set_worker_holding(&self, worker_id: &[u8], holding: bool) -> IonetResult<()> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        let mut state = self.lock();
        let process = state.processes.get_mut(&worker_id).ok_or_else(|| {
            IonetError::NotFound(format!("worker {} was not started by this node", worker_id.short()))
        })?;
        process.holding = holding;
        Ok(())
    }

    /// The pid of `job`'s worker serving at `address` here, if it runs.
    pub fn pid_of_worker_at(&self, job: JobId, address: &str) -> Option<u32> {
        let job = job.to_vec();
        let state = self.lock();
        state.processes.values().find(|process| process.address == address && process.key.job_id == job).map(|p| p.pid)
    }

    /// The output files of `job`'s workers started here (pid, path), oldest first.
    pub fn job_log_files(&self, job: JobId) -> Vec<(u32, std::path::PathBuf)> {
        self.job_logs.get(&job).map(|files| files.clone()).unwrap_or_default()
    }

    /// The job a lease here was granted to.
    pub fn job_of_lease(&self, lease_id: &[u8]) -> IonetResult<JobId> {
        let lease_id = LeaseId::from_bytes(lease_id)?;
        let state = self.lock();
        state
            .leases
            .get(&lease_id)
            .and_then(|granted| state.processes.get(&granted.worker))
            .map(|process| JobId::from_bytes(&process.key.job_id))
            .transpose()?
            .ok_or_else(|| IonetError::NotFound(format!("lease {} is not held on this node", lease_id.short())))
    }

    /// The job a worker this node started (or is starting) serves.
    pub fn job_of_worker(&self, worker_id: &[u8]) -> IonetResult<JobId> {
        let worker_id = WorkerId::from_bytes(worker_id)?;
        if let Some(starting) = self.starting.get(&worker_id) {
            return Ok(starting.0);
        }
        let state = self.lock();
        state
            .processes
            .get(&worker_id)
            .map(|process| JobId::from_bytes(&process.key.job_id))
            .transpose()?
            .ok_or_else(|| IonetError::NotFound(format!("worker {} was not started by this node", worker_id.short())))
    }

    /// Ends the leases the head says are over (their holders gave them back, or nobody
    /// asked for them): their workers are stopped, as a failed lease's. Leases not held
    /// here are skipped; returns how many were.
    pub fn end_leases(&self, lease_ids: &[Vec<u8>], reason: &str) -> IonetResult<u32> {
        let mut ended = 0;
        for lease_id in lease_ids {
            let lease_id = LeaseId::from_bytes(lease_id)?;
            if self.end(lease_id, true).is_some() {
                tracing::info!(lease = %lease_id.short(), %reason, "lease ended on the head's word");
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// The jobs whose payer cannot cover their leases, as the head last said.
    pub fn set_unfunded(&self, jobs: std::collections::HashMap<JobId, String>) {
        *self.unfunded.write().unwrap_or_else(|p| p.into_inner()) = jobs;
    }

    /// [`Leases::return_lease`] by id.
    fn end_lease(&self, lease_id: LeaseId, worker_failed: bool) -> IonetResult<()> {
        self.end(lease_id, worker_failed)
            .map(|_| ())
            .ok_or_else(|| IonetError::NotFound(format!("lease {} is not held on this node", lease_id.short())))
    }
}

#[cfg(test)]
mod tests;
