//! The state API for programs (Ray's `ray.util.state`): the tasks of this job's account
//! as the head last heard of them (`Gcs/ListTasks`), each with Ray's `list_tasks` fields;
//! its actors and jobs, the cluster's nodes, and who holds which object (`Gcs/ListObjects`).

use ionet_common::rpc::proto::gcs::{
    GetAllJobsRequest, GetAllNodesRequest, ListActorsRequest, ListObjectsRequest, ListPlacementGroupsRequest,
    ListTasksRequest,
};
use ionet_common::{IonetResult, JobId};

use crate::runtime;

/// Which tasks [`list_tasks`] returns (unset: any).
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub job: Option<JobId>,
    /// Ray's state name: `PENDING_ARGS_AVAIL`, `PENDING_NODE_ASSIGNMENT`, `RUNNING`,
    /// `FINISHED` or `FAILED`.
    pub state: Option<String>,
    pub name: Option<String>,
    /// The most returned, oldest first (0: 10,000).
    pub limit: u32,
}

/// The tasks `filter` names, of this job's account, as Ray's state API shows them
/// (`task_id`, `name`, `state`, `node_id`, `error_message`, `pending_reason`, times).
pub fn list_tasks(filter: TaskFilter) -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let state = ionet_worker::state_commands::task_state_named(filter.state.as_deref())?;
    let request = ListTasksRequest {
        job_id: filter.job.map(|job| job.to_vec()).unwrap_or_default(),
        state,
        name: filter.name.unwrap_or_default(),
        limit: filter.limit,
    };
    let reply = runtime::block_on(async {
        // This process's own events first, so what it just saw is listed.
        worker.task_events.flush(std::time::Duration::from_secs(2)).await;
        worker.call_head(request, |mut gcs, request| async move { gcs.list_tasks(request).await }).await
    })?;
    Ok(reply.tasks.iter().map(ionet_worker::state_commands::row_json).collect())
}

/// The actors of this job's account (dead ones too), as Ray's `list_actors` shows them
/// (`actor_id`, `class_name`, `name`, `state`, `job_id`, `node_id`, `death_cause`, …).
pub fn list_actors() -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let request = ListActorsRequest { include_dead: true };
    let reply =
        runtime::block_on(worker.call_head(request, |mut gcs, request| async move { gcs.list_actors(request).await }))?;
    reply.actors.iter().map(ionet_gcs::actors::actor_json).collect()
}

/// Every node of the cluster (dead ones too): id, state, resources, GPUs, price.
pub fn list_nodes() -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let request = GetAllNodesRequest { include_dead: true, ..Default::default() };
    let reply = runtime::block_on(
        worker.call_head(request, |mut gcs, request| async move { gcs.get_all_nodes(request).await }),
    )?;
    ionet_worker::status::node_rows(&reply.nodes, ionet_common::clock::now_ms())
}

/// The jobs of this job's account: id, state (`RUNNING` or `FINISHED`), who pays, when,
/// and the submission that started it.
pub fn list_jobs() -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let reply = runtime::block_on(
        worker.call_head(GetAllJobsRequest {}, |mut gcs, request| async move { gcs.get_all_jobs(request).await }),
    )?;
    Ok(reply.jobs.iter().map(ionet_worker::list_commands::job_json).collect())
}

/// This job's objects and who holds them (asked now of every live node and its driver;
/// a program holds its job's credential, which reads its own job's), largest first, as Ray's `list_objects` shows them (`object_id`,
/// `object_size`, `reference_type`, `type`, `pid`, `ip`, `node_id`, `task_status`, …);
/// only `job`'s holders when one is named; at most `limit` (0: 10,000).
pub fn list_objects(job: Option<JobId>, limit: u32) -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let request = ListObjectsRequest { job_id: job.map(|job| job.to_vec()).unwrap_or_default(), limit };
    let reply = runtime::block_on(
        worker.call_head(request, |mut gcs, request| async move { gcs.list_objects(request).await }),
    )?;
    Ok(reply.objects.iter().map(ionet_gcs::objects::object_json).collect())
}

/// This account's placement groups, as Ray's `list_placement_groups` shows them
/// (`placement_group_id`, `name`, `creator_job_id`, `state`, `strategy`, `bundles`).
pub fn list_placement_groups() -> IonetResult<Vec<serde_json::Value>> {
    let worker = runtime::current()?;
    let reply = runtime::block_on(worker.call_head(ListPlacementGroupsRequest {}, |mut gcs, request| async move {
        gcs.list_placement_groups(request).await
    }))?;
    reply.groups.iter().map(ionet_gcs::placement_groups::group_json).collect()
}
