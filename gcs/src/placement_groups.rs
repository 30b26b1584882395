//! Placement groups: bundles of resources reserved together on nodes the scheduler chose.
//!
//! A group is created PENDING. A background pass (every 200 ms, and at once after a
//! create) solves each pending group against the node table with
//! [`ionet_scheduler::solve_placement_group`], then reserves it in two phases:
//! 1. `PrepareBundle` on the node of every bundle, in bundle order: the node daemon moves the
//!    bundle's resources out of its general pool, or refuses.
//! 2. All prepared: `CommitBundle` on every node, and the group is CREATED. Any refusal or
//!    transport failure: `CancelBundle` on every node that prepared, and the group stays
//!    PENDING for the next pass. No partial reservation outlives a pass.
//!
//! A CREATED group whose node is no longer alive is cancelled on its other nodes and goes
//! back to PENDING. `RemovePlacementGroup` cancels every bundle and marks it REMOVED (kept,
//! so a late `GetPlacementGroup` still answers). Passes and removals are serialised by one
//! async lock, so a removal never races a reservation in flight.
//!
//! Every change of a group's state is written to the head's storage
//! (`Table::PlacementGroups`), and so are the nodes a reservation in flight asked to
//! prepare, before it asks. A head restarted from storage ([`PlacementGroups::restore`])
//! keeps its CREATED groups where they are (the node daemons kept their reservations),
//! cancels what a reservation cut short had prepared, and places its PENDING groups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::resources::{ResourceSet, ACCELERATOR_PREFIX};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState as WireNodeState, ResourceQuantities};
use ionet_common::rpc::proto::gcs::{
    GetPlacementGroupReply, PlacementGroupState, PlacementStrategy as WireStrategy, StoredPlacementGroup,
};
use ionet_common::rpc::proto::node::{
    CancelBundleRequest, CommitBundleRequest, EndLeasesRequest, PrepareBundleRequest,
};
use ionet_common::rpc::{AuthChannel, NodeManagerClient};
use ionet_common::{IonetError, IonetResult, JobId, LeaseId, NodeId, PlacementGroupId};
use ionet_scheduler::{
    solve_placement_group_ordered, ClusterView, Gpu, NodeOrder, NodeState, NodeView, PlacementDecision,
    PlacementStrategy,
};
use prost::Message;
use tokio::sync::{watch, Notify};

use crate::error::{GcsError, GcsResult};
use crate::state::{blocking, GcsState};
use crate::storage::Table;

/// How often pending groups are tried again.
const PLACEMENT_PERIOD: Duration = Duration::from_millis(200);

/// What the control store asks of the node daemons that hold bundles (a trait, so tests
/// can stand in a node that refuses).
#[tonic::async_trait]
pub trait BundleAgent: Send + Sync + 'static {
    /// `job_id`: the group's creator, billed for the bundle once committed.
    async fn prepare(
        &self,
        node_address: &str,
        group: PlacementGroupId,
        index: u32,
        job_id: &[u8],
        resources: &ResourceSet,
    ) -> IonetResult<()>;
    async fn commit(&self, node_address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()>;
    async fn cancel(&self, node_address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()>;
}

/// The real agent: the nodes' `NodeManager` service over gRPC.
pub struct GrpcBundleAgent {
    /// The head's control credential (bundles are the head's to reserve).
    head: Bearer,
    channels: DashMap<String, AuthChannel>,
}

impl GrpcBundleAgent {
    pub fn new(head: Bearer) -> Self {
        Self { head, channels: DashMap::new() }
    }

    fn client(&self, address: &str) -> IonetResult<NodeManagerClient> {
        if let Some(channel) = self.channels.get(address) {
            return Ok(NodeManagerClient::new(channel.clone()));
        }
        let channel = ionet_common::rpc::connect_lazy(address, &self.head, Duration::from_secs(2))?;
        self.channels.insert(address.to_string(), channel.clone());
        Ok(NodeManagerClient::new(channel))
    }
}

#[tonic::async_trait]
impl crate::metering::LeaseStopper for GrpcBundleAgent {
    async fn end_leases(&self, node_address: &str, leases: &[LeaseId], reason: &str) -> IonetResult<u32> {
        let request = EndLeasesRequest {
            lease_ids: leases.iter().map(|lease| lease.to_vec()).collect(),
            reason: reason.to_string(),
        };
        Ok(self.client(node_address)?.end_leases(request).await?.into_inner().ended)
    }
}

#[tonic::async_trait]
impl BundleAgent for GrpcBundleAgent {
    async fn prepare(
        &self,
        node_address: &str,
        group: PlacementGroupId,
        index: u32,
        job_id: &[u8],
        resources: &ResourceSet,
    ) -> IonetResult<()> {
        let request = PrepareBundleRequest {
            placement_group_id: group.to_vec(),
            bundle_index: index,
            resources: Some(ResourceQuantities::from_set(resources)),
            job_id: job_id.to_vec(),
        };
        self.client(node_address)?.prepare_bundle(request).await?;
        Ok(())
    }

    async fn commit(&self, node_address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()> {
        let request = CommitBundleRequest { placement_group_id: group.to_vec(), bundle_index: index };
        self.client(node_address)?.commit_bundle(request).await?;
        Ok(())
    }

    async fn cancel(&self, node_address: &str, group: PlacementGroupId, index: u32) -> IonetResult<()> {
        let request = CancelBundleRequest { placement_group_id: group.to_vec(), bundle_index: index };
        self.client(node_address)?.cancel_bundle(request).await?;
        Ok(())
    }
}

struct Group {
    /// Creation order, so older groups are placed first.
    sequence: u64,
    name: String,
    /// The creating job (empty: unknown, not metered).
    job_id: Vec<u8>,
    bundles: Vec<ResourceSet>,
    strategy: PlacementStrategy,
    /// Which nodes its solver tries first (a tenant's `cheapest_first`).
    order: NodeOrder,
    state: PlacementGroupState,
    /// Once CREATED: the node and address of each bundle.
    nodes: Vec<(NodeId, String)>,
    /// Why it is pending, or why the head removed it (its payer ran out of credit).
    pending_reason: String,
    /// Outlives its job (removed only by `remove`).
    detached: bool,
    /// Bundles being committed or committed, by index: the node holding each. The head
    /// vouches, as their holder, for the bundle leases these nodes report.
    committed: HashMap<u32, NodeId>,
    /// While a reservation is in flight: the nodes asked to prepare its bundles.
    reserving: Vec<(NodeId, String)>,
    /// Its bundles go on this node or nowhere.
    pinned: Option<NodeId>,
}

impl Group {
    fn stored(&self, id: &PlacementGroupId) -> StoredPlacementGroup {
        StoredPlacementGroup {
            row: Some(row(id, self)),
            job_id: self.job_id.clone(),
            detached: self.detached,
            sequence: self.sequence,
            reserving_node_ids: self.reserving.iter().map(|(node, _)| node.to_vec()).collect(),
            reserving_node_addresses: self.reserving.iter().map(|(_, address)| address.clone()).collect(),
            pinned_node_id: self.pinned.map(|node| node.to_vec()).unwrap_or_default(),
        }
    }

    fn from_stored(stored: StoredPlacementGroup) -> IonetResult<(PlacementGroupId, Group)> {
        let row = stored.row.unwrap_or_default();
        let id = PlacementGroupId::from_bytes(&row.placement_group_id)?;
        let nodes_of = |ids: &[Vec<u8>], addresses: &[String]| -> IonetResult<Vec<(NodeId, String)>> {
            ids.iter().zip(addresses).map(|(node, address)| Ok((NodeId::from_bytes(node)?, address.clone()))).collect()
        };
        let nodes = nodes_of(&row.bundle_node_ids, &row.bundle_node_addresses)?;
        let state = PlacementGroupState::try_from(row.state).unwrap_or(PlacementGroupState::Pending);
        let committed = if state == PlacementGroupState::Created {
            nodes.iter().enumerate().map(|(index, (node, _))| (index as u32, *node)).collect()
        } else {
            HashMap::new()
        };
        let group = Group {
            sequence: stored.sequence,
            name: row.name,
            job_id: stored.job_id,
            bundles: row.bundles.iter().map(|bundle| bundle.clone().to_set()).collect::<IonetResult<_>>()?,
            strategy: strategy_from_wire(row.strategy)?,
            order: if row.cheapest_first { NodeOrder::Cheapest } else { NodeOrder::Utilisation },
            state,
            nodes,
            pending_reason: row.pending_reason,
            detached: stored.detached,
            committed,
            reserving: nodes_of(&stored.reserving_node_ids, &stored.reserving_node_addresses)?,
            pinned: (!stored.pinned_node_id.is_empty())
                .then(|| NodeId::from_bytes(&stored.pinned_node_id))
                .transpose()?,
        };
        Ok((id, group))
    }
}

/// The placement-group table and its placement passes.
pub struct PlacementGroups {
    state: Arc<GcsState>,
    agent: Arc<dyn BundleAgent>,
    groups: Mutex<BTreeMap<PlacementGroupId, Group>>,
    sequence: std::sync::atomic::AtomicU64,
    wake: Notify,
    /// Held across a whole pass or removal: they touch the same nodes' reservations.
    placing: tokio::sync::Mutex<()>,
    /// Serialises writes of groups to storage (each writes the group as it then is).
    writing: tokio::sync::Mutex<()>,
}

impl PlacementGroups {
    /// The least reliability of a node the group's job runs on (0: any).
    fn min_reliability_of(&self, job_id: &[u8]) -> u32 {
        JobId::from_bytes(job_id).ok().and_then(|job| self.state.job(&job)).map_or(0, |job| job.min_reliability_bps)
    }
}

pub fn strategy_from_wire(raw: i32) -> IonetResult<PlacementStrategy> {
    Ok(match WireStrategy::try_from(raw) {
        Ok(WireStrategy::Pack) => PlacementStrategy::Pack,
        Ok(WireStrategy::Spread) => PlacementStrategy::Spread,
        Ok(WireStrategy::StrictPack) => PlacementStrategy::StrictPack,
        Ok(WireStrategy::StrictSpread) => PlacementStrategy::StrictSpread,
        Err(_) => return Err(IonetError::InvalidArgument(format!("unknown placement strategy {raw}"))),
    })
}

fn strategy_to_wire(strategy: PlacementStrategy) -> WireStrategy {
    match strategy {
        PlacementStrategy::Pack => WireStrategy::Pack,
        PlacementStrategy::Spread => WireStrategy::Spread,
        PlacementStrategy::StrictPack => WireStrategy::StrictPack,
        PlacementStrategy::StrictSpread => WireStrategy::StrictSpread,
    }
}

/// The scheduler's view of one node as the node table holds it.
pub fn node_view(node: &NodeInfo) -> IonetResult<NodeView> {
    let node_id = NodeId::from_bytes(&node.node_id)?;
    let mut view = NodeView::new(node_id, node.total.clone().unwrap_or_default().to_set()?);
    view.available = node.available.clone().unwrap_or_default().to_set()?;
    view.gpus = node
        .gpus
        .iter()
        .map(|gpu| Gpu { index: gpu.index, model: gpu.model.clone(), memory_bytes: gpu.memory_bytes })
        .collect();
    view.accelerator_type = (!node.accelerator_type.is_empty()).then(|| node.accelerator_type.clone());
    view.labels = node.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
    view.price_per_gpu_hour = node.price_per_gpu_hour_micros;
    view.gpu_tflops_milli = ionet_common::gpu_proof::gpu_tflops_milli(node);
    view.reliability_bps = ionet_common::reliability::listed_score_bps(node);
    view.state = match WireNodeState::try_from(node.state).unwrap_or(WireNodeState::Unspecified) {
        // A node that runs no workloads takes nothing new, as a draining one; nor does
        // one whose GPUs have not passed the head's check (or failed it).
        WireNodeState::Alive if node.no_workloads || ionet_common::gpu_proof::held_back(node) => NodeState::Draining,
        WireNodeState::Alive => NodeState::Alive,
        WireNodeState::Draining => NodeState::Draining,
        WireNodeState::Dead | WireNodeState::Unspecified => NodeState::Dead,
    };
    Ok(view)
}

/// What a node reserves for a bundle: an `accelerator_type:` entry constrains the node,
/// it is not consumed.
fn consumed(bundle: &ResourceSet) -> ResourceSet {
    let mut out = ResourceSet::new();
    for (name, quantity) in bundle.iter().filter(|(name, _)| !name.starts_with(ACCELERATOR_PREFIX)) {
        out.set(name.to_string(), quantity);
    }
    out
}

#[tonic::async_trait]
impl crate::metering::HeadHoldings for PlacementGroups {
    fn bundle_of(&self, job: &JobId, node: &NodeId, group: &[u8], index: u32) -> Option<ResourceSet> {
        let id = PlacementGroupId::from_bytes(group).ok()?;
        let groups = self.lock();
        let group = groups.get(&id)?;
        let placed = group.job_id == job.as_bytes() && group.committed.get(&index) == Some(node);
        placed.then(|| group.bundles.get(index as usize).map(consumed)).flatten()
    }

    async fn remove_unfunded_group(&self, group: &[u8], why: &str) {
        let Ok(id) = PlacementGroupId::from_bytes(group) else { return };
        if self.state_of(&id).is_none_or(|state| state == PlacementGroupState::Removed) {
            return;
        }
        tracing::warn!(group = %id.short(), %why, "removing a placement group: its payer's credit ran out");
        // Said first: whoever sees it removed sees why.
        if let Some(group) = self.lock().get_mut(&id) {
            group.pending_reason = format!("removed: {why}");
        }
        if let Err(err) = self.remove(&id).await {
            tracing::warn!(group = %id.short(), error = %err, "could not remove an unfunded placement group");
        }
    }
}

impl PlacementGroups {
    pub fn new(state: Arc<GcsState>, agent: Arc<dyn BundleAgent>) -> Arc<Self> {
        Arc::new(Self {
            state,
            agent,
            groups: Mutex::new(BTreeMap::new()),
            sequence: std::sync::atomic::AtomicU64::new(0),
            wake: Notify::new(),
            placing: tokio::sync::Mutex::new(()),
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Writes group `id` as it is now to storage.
    async fn persist(&self, id: PlacementGroupId) -> GcsResult<()> {
        let _writing = self.writing.lock().await;
        let Some(bytes) = self.lock().get(&id).map(|group| group.stored(&id).encode_to_vec()) else { return Ok(()) };
        let storage = self.state.storage().clone();
        blocking(move || storage.put(Table::PlacementGroups, id.as_bytes(), &bytes)).await
    }

    /// [`PlacementGroups::persist`] for a change already made: a failure is logged (the
    /// group is written again with its next change).
    async fn persist_or_log(&self, id: PlacementGroupId) {
        if let Err(err) = self.persist(id).await {
            tracing::error!(group = %id.short(), error = %err, "could not write the placement group to storage");
        }
    }

    /// Takes back the groups a previous run of the head left in storage; placement
    /// passes then go on with them. Call once, before serving.
    pub async fn restore(&self) -> GcsResult<usize> {
        let storage = self.state.storage().clone();
        let stored = blocking(move || storage.scan_prefix(Table::PlacementGroups, b"")).await?;
        let mut groups = self.lock();
        for (key, bytes) in &stored {
            let corrupt =
                |why: String| GcsError::Corrupt { what: format!("placement group {}", hex::encode(key)), why };
            let decoded = StoredPlacementGroup::decode(bytes.as_slice()).map_err(|err| corrupt(err.to_string()))?;
            let (id, group) = Group::from_stored(decoded).map_err(|err| corrupt(err.to_string()))?;
            self.sequence.fetch_max(group.sequence + 1, std::sync::atomic::Ordering::Relaxed);
            groups.insert(id, group);
        }
        drop(groups);
        if !stored.is_empty() {
            tracing::info!(groups = stored.len(), "placement groups restored from storage");
            self.wake.notify_one();
        }
        Ok(stored.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PlacementGroupId, Group>> {
        self.groups.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records (and stores) a new PENDING group; placement follows in the background.
    pub async fn create(
        &self,
        bundles: Vec<ResourceSet>,
        strategy: PlacementStrategy,
        name: String,
        job_id: Vec<u8>,
    ) -> IonetResult<PlacementGroupId> {
        self.create_with_lifetime(bundles, strategy, name, job_id, false, NodeOrder::Utilisation).await
    }

    /// [`PlacementGroups::create`]; a `detached` group outlives its job; `order`: which
    /// nodes its solver tries first.
    pub async fn create_with_lifetime(
        &self,
        bundles: Vec<ResourceSet>,
        strategy: PlacementStrategy,
        name: String,
        job_id: Vec<u8>,
        detached: bool,
        order: NodeOrder,
    ) -> IonetResult<PlacementGroupId> {
        self.create_group(bundles, (strategy, order), name, job_id, detached, None).await
    }

    /// A group whose bundles go on `node` or nowhere (the job server reserves what a
    /// submitted job's entrypoint holds on the node it chose).
    pub async fn create_on(
        &self,
        node: NodeId,
        bundles: Vec<ResourceSet>,
        name: String,
        job_id: Vec<u8>,
    ) -> IonetResult<PlacementGroupId> {
        let strategy = (PlacementStrategy::StrictPack, NodeOrder::Utilisation);
        self.create_group(bundles, strategy, name, job_id, false, Some(node)).await
    }

    async fn create_group(
        &self,
        bundles: Vec<ResourceSet>,
        (strategy, order): (PlacementStrategy, NodeOrder),
        name: String,
        job_id: Vec<u8>,
        detached: bool,
        pinned: Option<NodeId>,
    ) -> IonetResult<PlacementGroupId> {
        ionet_common::JobId::from_bytes(&job_id).map_err(|err| {
            IonetError::InvalidArgument(format!(
                "a placement group needs the job creating it (its bundles are billed to that job): {err}"
            ))
        })?;
        if bundles.is_empty() {
            return Err(IonetError::InvalidArgument("a placement group needs at least one bundle".into()));
        }
        if let Some(index) = bundles.iter().position(|bundle| consumed(bundle).iter().next().is_none()) {
            return Err(IonetError::InvalidArgument(format!("bundle {index} of the placement group is empty")));
        }
        let id = PlacementGroupId::random();
        let sequence = self.sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(group = %id.short(), %strategy, bundles = bundles.len(), %name, "placement group created");
        self.lock().insert(
            id,
            Group {
                sequence,
                name,
                job_id,
                bundles,
                strategy,
                order,
                state: PlacementGroupState::Pending,
                nodes: Vec::new(),
                committed: HashMap::new(),
                pending_reason: String::new(),
                detached,
                reserving: Vec::new(),
                pinned,
            },
        );
        if let Err(err) = self.persist(id).await {
            // Not stored: not created (the caller may ask again).
            self.lock().remove(&id);
            return Err(IonetError::Unavailable(format!(
                "the control store could not store the placement group: {err}"
            )));
        }
        self.wake.notify_one();
        Ok(id)
    }

    pub fn get(&self, id: &PlacementGroupId) -> IonetResult<GetPlacementGroupReply> {
        let groups = self.lock();
        let group = groups
            .get(id)
            .ok_or_else(|| IonetError::NotFound(format!("placement group {} does not exist", id.short())))?;
        Ok(row(id, group))
    }

    /// Every group's row, removed ones included, in id order.
    pub fn list(&self) -> Vec<GetPlacementGroupReply> {
        self.lock().iter().map(|(id, group)| row(id, group)).collect()
    }

    /// The job that created the group (and is billed for it), if it exists.
    /// Whether group `id` is pinned to a node (the job server's, for an entrypoint).
    pub fn is_pinned(&self, id: &PlacementGroupId) -> bool {
        self.lock().get(id).is_some_and(|group| group.pinned.is_some())
    }

    pub fn job_of(&self, id: &PlacementGroupId) -> Option<Vec<u8>> {
        self.lock().get(id).map(|group| group.job_id.clone())
    }

    /// The group's state, if it exists.
    pub fn state_of(&self, id: &PlacementGroupId) -> Option<PlacementGroupState> {
        self.lock().get(id).map(|group| group.state)
    }

    /// Removes every group the job created (Ray's behaviour for non-detached groups when
    /// their job ends): their bundles stop being held, and billed.
    pub async fn remove_groups_of_job(&self, job_id: &[u8]) {
        let ids: Vec<PlacementGroupId> = self
            .lock()
            .iter()
            .filter(|(_, group)| {
                group.job_id == job_id && !group.detached && group.state != PlacementGroupState::Removed
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Err(err) = self.remove(&id).await {
                tracing::warn!(group = %id.short(), error = %err, "could not remove a finished job's placement group");
            }
        }
    }

    /// Cancels every bundle of the group and marks it REMOVED.
    pub async fn remove(&self, id: &PlacementGroupId) -> IonetResult<()> {
        let _placing = self.placing.lock().await;
        let nodes = {
            let mut groups = self.lock();
            let group = groups
                .get_mut(id)
                .ok_or_else(|| IonetError::NotFound(format!("placement group {} does not exist", id.short())))?;
            group.state = PlacementGroupState::Removed;
            group.committed.clear();
            // Cancelled now, or (by a restarted head) later.
            group.reserving = std::mem::take(&mut group.nodes);
            group.reserving.clone()
        };
        // Stored first: a removal a restarted head would not know of is not made.
        if let Err(err) = self.persist(*id).await {
            return Err(IonetError::Unavailable(format!("the control store could not store the removal: {err}")));
        }
        let mut all_cancelled = true;
        for (index, (node, address)) in nodes.iter().enumerate() {
            if let Err(err) = self.agent.cancel(address, *id, index as u32).await {
                all_cancelled = false;
                tracing::warn!(group = %id.short(), node = %node.short(), index, error = %err, "could not cancel a bundle");
            }
        }
        // A bundle a node did not cancel stays to cancel: the next pass asks again.
        if all_cancelled {
            if let Some(group) = self.lock().get_mut(id) {
                group.reserving.clear();
            }
            self.persist_or_log(*id).await;
        }
        tracing::info!(group = %id.short(), "placement group removed");
        Ok(())
    }

    /// Places pending groups until `stopped`.
    pub async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(PLACEMENT_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
                _ = stopped.changed() => return,
            }
            self.place_pending().await;
        }
    }

    /// One pass: groups on a node that is gone go back to pending; each pending group,
    /// oldest first, is solved and reserved (two-phase) or left pending with the reason.
    pub async fn place_pending(&self) {
        let _placing = self.placing.lock().await;
        // The node table is read only when a group waits to be placed: every pass reading
        // it whole (five a second) cost a head of ten thousand idle nodes a quarter of a core.
        self.cancel_cut_short().await;
        self.requeue_groups_on_lost_nodes().await;

        type Pending =
            (u64, PlacementGroupId, Vec<ResourceSet>, (PlacementStrategy, NodeOrder), Vec<u8>, Option<NodeId>);
        let mut pending: Vec<Pending> = self
            .lock()
            .iter()
            // One whose old bundles are still to cancel waits for that first.
            .filter(|(_, group)| group.state == PlacementGroupState::Pending && group.reserving.is_empty())
            .map(|(id, group)| {
                let strategy = (group.strategy, group.order);
                (group.sequence, *id, group.bundles.clone(), strategy, group.job_id.clone(), group.pinned)
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_by_key(|(sequence, ..)| *sequence);
        let nodes = self.state.nodes(false);
        let mut view = ClusterView::new();
        let mut addresses = HashMap::new();
        for node in &nodes {
            match node_view(node) {
                Ok(node_view) => {
                    addresses.insert(node_view.node_id, node.address.clone());
                    let _ = view.upsert_node(node_view);
                }
                Err(err) => tracing::warn!(error = %err, "skipping a malformed node record"),
            }
        }
        for (_, id, bundles, (strategy, order), job_id, pinned) in pending {
            let decision = match pinned {
                // Its node or nowhere: the node's own accounting says whether it fits.
                Some(node) if addresses.contains_key(&node) => PlacementDecision::Placed(vec![node; bundles.len()]),
                Some(node) => PlacementDecision::Wait { reason: format!("its node {} is not alive", node.short()) },
                None => match self.min_reliability_of(&job_id) {
                    0 => solve_placement_group_ordered(&view, &bundles, strategy, order),
                    // The job runs only on nodes reliable enough: the others are left out.
                    min => {
                        let mut reliable = view.clone();
                        let below: Vec<NodeId> =
                            view.nodes().filter(|node| node.reliability_bps < min).map(|node| node.node_id).collect();
                        for node_id in &below {
                            let _ = reliable.set_state(node_id, NodeState::Draining);
                        }
                        let need = format!(
                            " (its job runs only on nodes of reliability >= {})",
                            ionet_common::reliability::format(min)
                        );
                        match solve_placement_group_ordered(&reliable, &bundles, strategy, order) {
                            PlacementDecision::Wait { reason } => PlacementDecision::Wait { reason: reason + &need },
                            PlacementDecision::Infeasible { reason } => {
                                PlacementDecision::Infeasible { reason: reason + &need }
                            }
                            placed => placed,
                        }
                    }
                },
            };
            let outcome = match decision {
                PlacementDecision::Placed(chosen) => {
                    match self.reserve(id, &job_id, &bundles, &chosen, &addresses).await {
                        Ok(placed) => {
                            // Later groups of this pass see what this one took.
                            let _ = view.reserve_bundles(&bundles, &chosen);
                            Ok(placed)
                        }
                        Err(reason) => Err(reason),
                    }
                }
                PlacementDecision::Wait { reason } | PlacementDecision::Infeasible { reason } => Err(reason),
            };
            let created = {
                let mut groups = self.lock();
                let Some(group) = groups.get_mut(&id) else { continue };
                match outcome {
                    Ok(placed) => {
                        tracing::info!(group = %id.short(), name = %group.name, "placement group created on its nodes");
                        group.state = PlacementGroupState::Created;
                        group.nodes = placed;
                        group.pending_reason.clear();
                        group.reserving.clear();
                        true
                    }
                    Err(reason) => {
                        if group.pending_reason != reason {
                            tracing::debug!(group = %id.short(), %reason, "placement group stays pending");
                        }
                        group.pending_reason = reason;
                        false
                    }
                }
            };
            if created {
                self.persist_or_log(id).await;
            }
        }
    }

    /// Two-phase reservation of one group on the chosen nodes; on failure nothing stays
    /// reserved and the reason is returned.
    async fn reserve(
        &self,
        id: PlacementGroupId,
        job_id: &[u8],
        bundles: &[ResourceSet],
        chosen: &[NodeId],
        addresses: &HashMap<NodeId, String>,
    ) -> Result<Vec<(NodeId, String)>, String> {
        // Stored before any node is asked: a head that dies in the middle cancels them.
        let reserving: Vec<(NodeId, String)> =
            chosen.iter().map(|node| (*node, addresses.get(node).cloned().unwrap_or_default())).collect();
        if let Some(group) = self.lock().get_mut(&id) {
            group.reserving = reserving;
        }
        self.persist(id).await.map_err(|err| format!("the control store could not store the reservation: {err}"))?;
        let mut prepared: Vec<(NodeId, String)> = Vec::new();
        let mut failure = None;
        for (index, (bundle, node)) in bundles.iter().zip(chosen).enumerate() {
            let Some(address) = addresses.get(node) else {
                failure = Some(format!("node {} of bundle {index} has no address", node.short()));
                break;
            };
            match self.agent.prepare(address, id, index as u32, job_id, &consumed(bundle)).await {
                Ok(()) => prepared.push((*node, address.clone())),
                Err(err) => {
                    failure = Some(format!("node {} refused bundle {index}: {err}", node.short()));
                    break;
                }
            }
        }
        if failure.is_none() {
            for (index, (node, address)) in prepared.iter().enumerate() {
                if let Some(group) = self.lock().get_mut(&id) {
                    group.committed.insert(index as u32, *node);
                }
                if let Err(err) = self.agent.commit(address, id, index as u32).await {
                    failure = Some(format!("node {} did not commit bundle {index}: {err}", node.short()));
                    break;
                }
            }
        }
        match failure {
            None => Ok(prepared),
            Some(reason) => {
                if let Some(group) = self.lock().get_mut(&id) {
                    group.committed.clear();
                }
                for (index, (node, address)) in prepared.iter().enumerate() {
                    if let Err(err) = self.agent.cancel(address, id, index as u32).await {
                        tracing::warn!(group = %id.short(), node = %node.short(), index, error = %err, "could not cancel a prepared bundle");
                    }
                }
                if let Some(group) = self.lock().get_mut(&id) {
                    group.reserving.clear();
                }
                self.persist_or_log(id).await;
                Err(reason)
            }
        }
    }

    async fn requeue_groups_on_lost_nodes(&self) {
        let alive = |node: &NodeId| self.state.is_alive(node);
        let lost: Vec<(PlacementGroupId, Vec<(NodeId, String)>)> = {
            let mut groups = self.lock();
            groups
                .iter_mut()
                .filter(|(_, group)| {
                    group.state == PlacementGroupState::Created && group.nodes.iter().any(|(node, _)| !alive(node))
                })
                .map(|(id, group)| {
                    group.state = PlacementGroupState::Pending;
                    group.pending_reason = "a node holding one of its bundles died".into();
                    group.committed.clear();
                    // Its bundles are cancelled now, or (by a restarted head) later.
                    group.reserving = std::mem::take(&mut group.nodes);
                    (*id, group.reserving.clone())
                })
                .collect()
        };
        for (id, nodes) in lost {
            tracing::warn!(group = %id.short(), "a node of the placement group is gone; placing it again");
            self.persist_or_log(id).await;
            // The dead node too, best effort and bounded: one cut off but running (declared
            // dead while away) would otherwise keep the bundle reserved when it rejoins.
            for (index, (node, address)) in nodes.iter().enumerate() {
                let wait = if alive(node) { Duration::from_secs(10) } else { Duration::from_secs(1) };
                let _ = tokio::time::timeout(wait, self.agent.cancel(address, id, index as u32)).await;
            }
            if let Some(group) = self.lock().get_mut(&id) {
                group.reserving.clear();
            }
            self.persist_or_log(id).await;
        }
    }

    /// Cancels, on their nodes, the bundles of reservations a previous run of the head
    /// left in flight (best effort, bounded: a node that is gone reserved nothing that
    /// outlives it), so the group is reserved afresh.
    async fn cancel_cut_short(&self) {
        let cut_short: Vec<(PlacementGroupId, Vec<(NodeId, String)>)> = self
            .lock()
            .iter()
            .filter(|(_, group)| group.state != PlacementGroupState::Created && !group.reserving.is_empty())
            .map(|(id, group)| (*id, group.reserving.clone()))
            .collect();
        if cut_short.is_empty() {
            return;
        }
        let alive: HashSet<String> = self
            .state
            .nodes(false)
            .into_iter()
            .filter(|node| node.state == WireNodeState::Alive as i32)
            .map(|node| node.address)
            .collect();
        for (id, nodes) in cut_short {
            tracing::info!(group = %id.short(), "cancelling bundles left to cancel");
            let mut done = true;
            for (index, (_, address)) in nodes.iter().enumerate() {
                let cancel = tokio::time::timeout(Duration::from_secs(2), self.agent.cancel(address, id, index as u32));
                // A node that is gone holds nothing any more.
                done &= matches!(cancel.await, Ok(Ok(()))) || !alive.contains(address);
            }
            if done {
                if let Some(group) = self.lock().get_mut(&id) {
                    group.reserving.clear();
                }
                self.persist_or_log(id).await;
            }
        }
    }
}

/// A group as the control store answers for it.
fn row(id: &PlacementGroupId, group: &Group) -> GetPlacementGroupReply {
    GetPlacementGroupReply {
        state: group.state as i32,
        bundle_node_ids: group.nodes.iter().map(|(node, _)| node.to_vec()).collect(),
        bundle_node_addresses: group.nodes.iter().map(|(_, address)| address.clone()).collect(),
        pending_reason: group.pending_reason.clone(),
        bundles: group.bundles.iter().map(ResourceQuantities::from_set).collect(),
        strategy: strategy_to_wire(group.strategy) as i32,
        name: group.name.clone(),
        placement_group_id: id.to_vec(),
        job_id: group.job_id.clone(),
        cheapest_first: group.order == NodeOrder::Cheapest,
    }
}

/// A group as Ray's `list_placement_groups` shows it (`placement_group_id`, `name`,
/// `creator_job_id`, `state`, `strategy`, `bundles` with each one's node and resources),
/// plus why a pending group waits.
pub fn group_json(group: &GetPlacementGroupReply) -> IonetResult<serde_json::Value> {
    let state = match PlacementGroupState::try_from(group.state) {
        Ok(PlacementGroupState::Created) => "CREATED",
        Ok(PlacementGroupState::Removed) => "REMOVED",
        Ok(PlacementGroupState::Pending) | Err(_) => "PENDING",
    };
    let strategy = match WireStrategy::try_from(group.strategy) {
        Ok(WireStrategy::Spread) => "SPREAD",
        Ok(WireStrategy::StrictPack) => "STRICT_PACK",
        Ok(WireStrategy::StrictSpread) => "STRICT_SPREAD",
        Ok(WireStrategy::Pack) | Err(_) => "PACK",
    };
    let mut bundles = Vec::new();
    for (index, bundle) in group.bundles.iter().enumerate() {
        let resources: serde_json::Map<String, serde_json::Value> = bundle
            .to_set()?
            .iter()
            .map(|(name, quantity)| (name.to_string(), serde_json::json!(quantity.as_f64())))
            .collect();
        let node = group.bundle_node_ids.get(index).filter(|node| !node.is_empty()).map(hex::encode);
        bundles.push(serde_json::json!({ "bundle_index": index, "node_id": node, "unit_resources": resources }));
    }
    Ok(serde_json::json!({
        "placement_group_id": hex::encode(&group.placement_group_id),
        "name": group.name,
        "creator_job_id": hex::encode(&group.job_id),
        "state": state,
        "strategy": strategy,
        "cheapest_first": group.cheapest_first,
        "bundles": bundles,
        "pending_reason": (!group.pending_reason.is_empty()).then(|| group.pending_reason.clone()),
    }))
}

#[cfg(test)]
mod tests;
