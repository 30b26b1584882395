//! The state API for programs (Ray's `ray.util.state`): the tasks of this job's account
//! as the head last heard of them (`Gcs/ListTasks`), each with Ray's `list_tasks` fields.

use ionet_common::rpc::proto::gcs::ListTasksRequest;
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
