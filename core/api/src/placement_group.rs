//! Placement groups from the driver's side: ask the control store to reserve bundles of
//! resources together, wait until they are placed, run tasks inside a bundle, remove them.
//!
//! The control store places and reserves the bundles (see `ionet_gcs::placement_groups`);
//! a task naming a bundle asks the node holding it directly, which grants it only from the
//! bundle's reserved resources.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ionet_common::resources::{Quantity, ResourceSet};
use ionet_common::rpc::proto::common::ResourceQuantities;
use ionet_common::rpc::proto::gcs::{
    CreatePlacementGroupRequest, GetPlacementGroupReply, GetPlacementGroupRequest, ListPlacementGroupsRequest,
    PlacementGroupState, PlacementStrategy as WireStrategy, RemovePlacementGroupRequest,
};
use ionet_common::{IonetError, IonetResult, NodeId, PlacementGroupId};

use crate::cluster_info::{PlacementGroup, PlacementGroupInfo, PlacementStrategy};
use crate::runtime::{self, block_on, CoreWorker};

impl PlacementGroup {
    /// Waits until every bundle is reserved: `true` once it is, `false` if `timeout`
    /// passes first; an error if the group was removed.
    pub fn wait(&self, timeout: Duration) -> IonetResult<bool> {
        let worker = runtime::current()?;
        let deadline = Instant::now() + timeout;
        block_on(async {
            loop {
                let reply = get_group(&worker, &self.id).await?;
                match PlacementGroupState::try_from(reply.state).unwrap_or(PlacementGroupState::Pending) {
                    PlacementGroupState::Created => return Ok(true),
                    PlacementGroupState::Removed => {
                        return Err(IonetError::FailedPrecondition(format!(
                            "placement group {} was removed",
                            self.id.short()
                        )))
                    }
                    PlacementGroupState::Pending if Instant::now() >= deadline => return Ok(false),
                    PlacementGroupState::Pending => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    }

    /// The node of each bundle, in bundle order; empty while the group is pending.
    /// The group with this id, as the control store has it.
    pub fn from_id(id: PlacementGroupId) -> IonetResult<Self> {
        let worker = runtime::current()?;
        let reply = block_on(get_group(&worker, &id))?;
        Ok(PlacementGroup { id, bundle_count: reply.bundles.len() })
    }

    /// The control store's row of the group (state, bundles, their nodes).
    pub fn info(&self) -> IonetResult<PlacementGroupInfo> {
        placement_group_info(self.id)
    }

    /// An object that becomes `value` once the group is created (Ray's `pg.ready()`), or
    /// fails if the group is removed first.
    pub fn ready_raw(&self, value: Vec<u8>) -> IonetResult<crate::ObjectRef<crate::raw::Raw>> {
        let worker = runtime::current()?;
        let id = self.id;
        crate::raw::pending_raw(async move {
            loop {
                let reply = get_group(&worker, &id).await?;
                match PlacementGroupState::try_from(reply.state).unwrap_or(PlacementGroupState::Pending) {
                    PlacementGroupState::Created => return Ok(value),
                    PlacementGroupState::Removed => {
                        return Err(IonetError::FailedPrecondition(format!(
                            "placement group {} was removed",
                            id.short()
                        )))
                    }
                    PlacementGroupState::Pending => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    }

    pub fn bundle_nodes(&self) -> IonetResult<Vec<NodeId>> {
        let worker = runtime::current()?;
        let reply = block_on(get_group(&worker, &self.id))?;
        reply.bundle_node_ids.iter().map(|id| NodeId::from_bytes(id)).collect()
    }
}

pub(crate) async fn get_group(worker: &CoreWorker, id: &PlacementGroupId) -> IonetResult<GetPlacementGroupReply> {
    let request = GetPlacementGroupRequest { placement_group_id: id.to_vec() };
    worker.call_head(request, |mut gcs, request| async move { gcs.get_placement_group(request).await }).await
}

/// The control store's row of one group (state, bundles, their nodes), by id.
pub fn placement_group_info(id: PlacementGroupId) -> IonetResult<PlacementGroupInfo> {
    let worker = runtime::current()?;
    block_on(get_group(&worker, &id))?.try_into()
}

/// The control store's row of every placement group of the cluster, removed ones
/// included, in one call (Ray's `placement_group_table()` with no argument).
pub fn placement_group_table() -> IonetResult<Vec<PlacementGroupInfo>> {
    let worker = runtime::current()?;
    let rows = block_on(async {
        let request = ListPlacementGroupsRequest {};
        let reply =
            worker.call_head(request, |mut gcs, request| async move { gcs.list_placement_groups(request).await });
        Ok::<_, IonetError>(reply.await?.groups)
    })?;
    rows.into_iter().map(PlacementGroupInfo::try_from).collect()
}

/// Asks the control store to reserve `bundles` (resource name → amount, e.g.
/// `{"CPU": 1.0, "GPU": 1.0}`) laid out by `strategy`. Returns at once; see
/// [`PlacementGroup::wait`].
pub fn placement_group(
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: PlacementStrategy,
) -> IonetResult<PlacementGroup> {
    named_placement_group(bundles, strategy, "")
}

/// [`placement_group`] with a name (shown in the table).
pub fn named_placement_group(
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: PlacementStrategy,
    name: &str,
) -> IonetResult<PlacementGroup> {
    placement_group_with(bundles, strategy, PlacementGroupOptions { name: name.into(), ..Default::default() })
}

/// [`named_placement_group`] that outlives this job (Ray's `lifetime="detached"`): it
/// stays reserved, and billed to this job's payer, until [`remove_placement_group`].
pub fn detached_placement_group(
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: PlacementStrategy,
    name: &str,
) -> IonetResult<PlacementGroup> {
    placement_group_with(
        bundles,
        strategy,
        PlacementGroupOptions { name: name.into(), detached: true, ..Default::default() },
    )
}

/// How [`placement_group_with`] makes a group, beyond its bundles and strategy.
#[derive(Clone, Debug, Default)]
pub struct PlacementGroupOptions {
    /// Shown in the listings (empty: none).
    pub name: String,
    /// Outlives this job (Ray's `lifetime="detached"`), until [`remove_placement_group`].
    pub detached: bool,
    /// A group asking for GPUs goes on the cheapest nodes per GPU-hour that keep its
    /// strategy (a `StrictPack` on the cheapest node that holds it all), rather than the
    /// least utilised.
    pub cheapest_first: bool,
}

/// A placement group of `bundles` placed by `strategy`, as `options` says.
pub fn placement_group_with(
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: PlacementStrategy,
    options: PlacementGroupOptions,
) -> IonetResult<PlacementGroup> {
    create_placement_group(bundles, strategy, options)
}

fn create_placement_group(
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: PlacementStrategy,
    options: PlacementGroupOptions,
) -> IonetResult<PlacementGroup> {
    let worker = runtime::current()?;
    let sets = bundles
        .iter()
        .map(|bundle| {
            bundle.iter().try_fold(ResourceSet::new(), |set, (name, amount)| {
                Ok::<_, IonetError>(set.with(name.clone(), Quantity::from_f64(*amount)?))
            })
        })
        .collect::<IonetResult<Vec<_>>>()?;
    let wire = match strategy {
        PlacementStrategy::Pack => WireStrategy::Pack,
        PlacementStrategy::Spread => WireStrategy::Spread,
        PlacementStrategy::StrictPack => WireStrategy::StrictPack,
        PlacementStrategy::StrictSpread => WireStrategy::StrictSpread,
    };
    let request = CreatePlacementGroupRequest {
        bundles: sets.iter().map(ResourceQuantities::from_set).collect(),
        strategy: wire as i32,
        name: options.name,
        job_id: worker.job_id.to_vec(),
        detached: options.detached,
        cheapest_first: options.cheapest_first,
    };
    let reply = block_on(async {
        let mut gcs = ionet_common::rpc::GcsClient::new(worker.channel(&worker.gcs_address)?);
        Ok::<_, IonetError>(gcs.create_placement_group(request).await?.into_inner())
    })?;
    Ok(PlacementGroup { id: PlacementGroupId::from_bytes(&reply.placement_group_id)?, bundle_count: bundles.len() })
}

/// Releases every bundle of the group; tasks waiting for it fail.
pub fn remove_placement_group(group: &PlacementGroup) -> IonetResult<()> {
    let worker = runtime::current()?;
    block_on(async {
        let mut gcs = ionet_common::rpc::GcsClient::new(worker.channel(&worker.gcs_address)?);
        gcs.remove_placement_group(RemovePlacementGroupRequest { placement_group_id: group.id.to_vec() }).await?;
        Ok(())
    })
}
