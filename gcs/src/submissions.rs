//! Submitted jobs (Ray's job submission): what the head's job server ([`crate::job_server`])
//! keeps and does for each.
//!
//! A submission is a command line (the entrypoint) an account asks the cluster to run.
//! The head picks a node for it (alive, taking workloads, with the entrypoint's resources
//! free; the cheapest first, the head's own node last), issues it a submission credential
//! (it starts jobs paid by the account, and only while the submission runs: [`Submissions::is_live`]
//! is checked by `AddJob`), and asks the node to run it (`NodeManager/RunEntrypoint`).
//! The node streams what the entrypoint prints, which the head appends to
//! `<log dir>/job-driver-<submission>.log` (at most [`MAX_LOG_BYTES`]), and how it
//! ended. Every job the entrypoint's drivers started ends with it.
//!
//! Status follows Ray's: PENDING → RUNNING → SUCCEEDED (exit 0), FAILED (another exit,
//! a node lost, no node that fits) or STOPPED (`stop`). Records are kept in storage
//! (`Table::Submissions`, JSON); one that was not finished when the head stopped is
//! failed when it starts again (its node stopped the entrypoint when the head's stream
//! closed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::authz::Principal;
use ionet_common::credential::Issuer;
use ionet_common::jobs::{checked_submission_id, package_name_of_uri};
use ionet_common::resources::{CPU, GPU, MEMORY};
use ionet_common::rpc::proto::common::{JobInfo, JobState, NodeInfo, NodeState};
use ionet_common::rpc::proto::gcs::PlacementGroupState;
use ionet_common::rpc::proto::node::{entrypoint_event, RunEntrypointRequest, StopEntrypointRequest};
use ionet_common::rpc::NodeManagerClient;
use ionet_common::{IonetError, IonetResult, JobId, NodeId, PlacementGroupId, Quantity, ResourceSet};
use serde::{Deserialize, Serialize};

use crate::error::GcsResult;
use crate::packages::PackageStore;
use crate::placement_groups::PlacementGroups;
use crate::state::{blocking, GcsState};
use crate::storage::Table;

/// The most bytes of one submission's output the head keeps (past it, the rest is
/// dropped and the log says so).
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// The most output one read of a submission's logs returns (Ray's whole-output read
/// returns all of it: the head keeps at most [`MAX_LOG_BYTES`]).
const MAX_LOGS_READ: u64 = MAX_LOG_BYTES;
/// How long a submission credential lasts (it is refused once the submission ends).
const SUBMISSION_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the head checks that what a running entrypoint holds is still held.
const HOLD_CHECK: Duration = Duration::from_secs(1);
/// How long the head waits for the entrypoint's node to reserve what it holds.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a stop the head ends a submission whose node has not (the node's
/// grace between SIGTERM and SIGKILL is 3 s).
const STOP_ENFORCED_AFTER: Duration = Duration::from_secs(6);

/// Where a submission is (Ray's `JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Running,
    Stopped,
    Succeeded,
    Failed,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Stopped | Status::Succeeded | Status::Failed)
    }
}

/// What a tenant asks for (Ray's `JobSubmitRequest`). An unknown field is refused unless
/// it is null (Ray's client sends every field it knows, unset ones as null).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub entrypoint: String,
    #[serde(default)]
    pub submission_id: Option<String>,
    /// Ray's deprecated name for `submission_id`.
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub runtime_env: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub entrypoint_num_cpus: Option<f64>,
    #[serde(default)]
    pub entrypoint_num_gpus: Option<f64>,
    #[serde(default)]
    pub entrypoint_memory: Option<u64>,
    #[serde(default)]
    pub entrypoint_resources: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    pub entrypoint_label_selector: Option<BTreeMap<String, String>>,
    /// ionet's: the model of the entrypoint's GPUs (`A100-80GB`).
    #[serde(default)]
    pub entrypoint_gpu_type: Option<String>,
    /// ionet's: the most the entrypoint's node may ask per GPU-hour, in USD.
    #[serde(default)]
    pub entrypoint_max_price_per_gpu_hour: Option<f64>,
}

/// The node a submission's entrypoint runs on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DriverNode {
    pub node_id: String,
    pub address: String,
    pub pid: u32,
}

/// One submission, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    pub submission_id: String,
    /// The account that submitted it (and pays for its jobs).
    pub account: String,
    pub entrypoint: String,
    pub status: Status,
    pub message: String,
    pub error_type: Option<String>,
    /// Milliseconds since the Unix epoch, from the head's clock.
    pub start_time: u64,
    pub end_time: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    pub runtime_env: serde_json::Map<String, serde_json::Value>,
    /// What the entrypoint holds on its node (CPU, GPU, memory, custom).
    pub resources: BTreeMap<String, f64>,
    pub label_selector: BTreeMap<String, String>,
    /// The model its GPUs must be.
    #[serde(default)]
    pub gpu_type: Option<String>,
    /// The most its node may ask per GPU-hour (micro-USD).
    #[serde(default)]
    pub max_price_micros: Option<u64>,
    pub driver: Option<DriverNode>,
    pub driver_exit_code: Option<i32>,
    /// A stop was asked for (its end is STOPPED, whatever the exit).
    #[serde(default)]
    pub stop_requested: bool,
    /// The nonce of this submission's credential: one of an earlier submission of the
    /// same id (deleted, then submitted again) starts nothing.
    #[serde(default)]
    pub credential_nonce: String,
    /// What happened to it, oldest first (at most [`MAX_EVENTS`]).
    #[serde(default)]
    pub events: Vec<SubmissionEvent>,
}

/// One step of a submission (`ionet job status` shows them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmissionEvent {
    /// Milliseconds since the Unix epoch, from the head's clock.
    pub time: u64,
    pub message: String,
}

/// The most events a submission keeps (the first and the latest).
const MAX_EVENTS: usize = 64;

impl SubmitRequest {
    /// The request in `body` (JSON), or why it is not one.
    pub fn parse(body: &[u8]) -> IonetResult<Self> {
        let invalid = |err: serde_json::Error| {
            IonetError::InvalidArgument(format!("the request is not a job submission (Ray's JobSubmitRequest): {err}"))
        };
        let mut value: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
        if let serde_json::Value::Object(fields) = &mut value {
            fields.retain(|_, field| !field.is_null());
        }
        serde_json::from_value(value).map_err(invalid)
    }
}

impl Submission {
    /// Ray's `JobDetails` of this submission; `jobs` are the ids of the jobs its drivers
    /// started (the latest is Ray's `job_id`).
    pub fn details(&self, jobs: &[JobId]) -> serde_json::Value {
        let driver = self.driver.as_ref();
        serde_json::json!({
            "type": "SUBMISSION",
            "job_id": jobs.last().map(|job| job.hex()),
            "submission_id": self.submission_id,
            "driver_info": match (driver, jobs.last()) {
                (Some(driver), Some(job)) => serde_json::json!({
                    "id": job.hex(),
                    "node_ip_address": ionet_common::tls::host_of(&driver.address),
                    "pid": driver.pid.to_string(),
                }),
                _ => serde_json::Value::Null,
            },
            "status": self.status,
            "entrypoint": self.entrypoint,
            "message": self.message,
            "error_type": self.error_type,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "metadata": self.metadata,
            "runtime_env": self.runtime_env,
            "driver_agent_http_address": serde_json::Value::Null,
            "driver_node_id": driver.map(|driver| driver.node_id.clone()),
            "driver_exit_code": self.driver_exit_code,
            "events": self.events,
            // ionet's own: the account, and every job the entrypoint started.
            "account": self.account,
            "job_ids": jobs.iter().map(|job| job.hex()).collect::<Vec<_>>(),
        })
    }
}

/// What runs entrypoints on nodes (the nodes' `NodeManager` over gRPC; tests may stand in).
pub struct EntrypointRunner {
    /// The head's control credential.
    control: Bearer,
}

impl EntrypointRunner {
    pub fn new(control: Bearer) -> Self {
        Self { control }
    }

    fn client(&self, address: &str) -> IonetResult<NodeManagerClient> {
        Ok(NodeManagerClient::new(ionet_common::rpc::connect_lazy(address, &self.control, Duration::from_secs(5))?))
    }
}

/// The head's submissions.
pub struct Submissions {
    state: Arc<GcsState>,
    placement_groups: Arc<PlacementGroups>,
    issuer: Issuer,
    runner: EntrypointRunner,
    records: DashMap<String, Submission>,
    /// Where each submission's output is kept.
    log_dir: PathBuf,
    packages: PackageStore,
    /// The control store's address(es) as the cluster knows them (entrypoints' drivers
    /// join there); set once the head knows it.
    head_address: std::sync::Mutex<String>,
}

impl Submissions {
    /// Loads what storage holds; a submission left unfinished by a previous head failed.
    pub async fn open(
        state: Arc<GcsState>,
        placement_groups: Arc<PlacementGroups>,
        issuer: Issuer,
        runner: EntrypointRunner,
        log_dir: PathBuf,
        package_dir: PathBuf,
    ) -> GcsResult<Arc<Self>> {
        std::fs::create_dir_all(&log_dir).map_err(IonetError::from)?;
        let packages = PackageStore::new(package_dir)?;
        let storage = state.storage().clone();
        let stored = blocking(move || storage.scan_prefix(Table::Submissions, b"")).await?;
        let submissions = Arc::new(Self {
            state,
            placement_groups,
            issuer,
            runner,
            records: DashMap::new(),
            log_dir,
            packages,
            head_address: Default::default(),
        });
        for (key, value) in stored {
            let mut record: Submission = match serde_json::from_slice(&value) {
                Ok(record) => record,
                Err(err) => {
                    tracing::error!(key = %String::from_utf8_lossy(&key), error = %err, "skipping a corrupt submission");
                    continue;
                }
            };
            let unfinished = !record.status.is_terminal();
            if unfinished {
                record.status = Status::Failed;
                record.message = "the head restarted while the job ran (its node stopped the entrypoint)".into();
                record.error_type = Some("HEAD_RESTARTED".into());
                record.end_time = Some(submissions.state.now_ms());
            }
            submissions.records.insert(record.submission_id.clone(), record.clone());
            if unfinished {
                submissions.persist(&record).await?;
                submissions.finish_jobs(&record.submission_id).await;
            }
        }
        Ok(submissions)
    }

    /// The packages accounts uploaded.
    pub fn packages(&self) -> &PackageStore {
        &self.packages
    }

    /// Where entrypoints' drivers find the control store (the head's advertised
    /// address, or the list of heads).
    pub fn set_head_address(&self, address: &str) {
        *self.head_address.lock().unwrap_or_else(|p| p.into_inner()) = address.to_string();
    }

    /// Whether submission `id`, the one given `nonce`, runs now (its credential may start
    /// jobs).
    pub fn is_live(&self, id: &str, nonce: &str) -> bool {
        self.records
            .get(id)
            .is_some_and(|record| !record.status.is_terminal() && !nonce.is_empty() && record.credential_nonce == nonce)
    }

    /// Whether the live submission `id` (given `nonce`) ships package `name`.
    pub fn ships(&self, id: &str, nonce: &str, name: &str) -> bool {
        self.is_live(id, nonce)
            && self.records.get(id).is_some_and(|record| {
                ionet_common::jobs::packages_of(&record.runtime_env).is_ok_and(|packages| {
                    Some(&packages.working_dir)
                        .into_iter()
                        .chain(&packages.py_modules)
                        .any(|uri| package_name_of_uri(uri).is_ok_and(|shipped| shipped == name))
                })
            })
    }

    /// Submits `request` for `account`; its submission id.
    pub async fn submit(self: &Arc<Self>, account: &str, request: SubmitRequest) -> IonetResult<String> {
        if request.entrypoint.trim().is_empty() {
            return Err(IonetError::InvalidArgument("the entrypoint is empty: name the command to run".into()));
        }
        let resources = entrypoint_resources(&request)?;
        let max_price_micros = match request.entrypoint_max_price_per_gpu_hour {
            None => None,
            Some(usd) if usd.is_finite() && usd >= 0.0 => Some((usd * 1_000_000.0).round() as u64),
            Some(usd) => {
                return Err(IonetError::InvalidArgument(format!(
                    "entrypoint_max_price_per_gpu_hour must be a price in USD, not {usd}"
                )))
            }
        };
        if (request.entrypoint_gpu_type.is_some() || max_price_micros.is_some())
            && request.entrypoint_num_gpus.unwrap_or(0.0) <= 0.0
        {
            return Err(IonetError::InvalidArgument(
                "a GPU type or a price names the entrypoint's GPUs: ask for some (entrypoint_num_gpus, --gpus)".into(),
            ));
        }
        let runtime_env = request.runtime_env.unwrap_or_default();
        ionet_common::jobs::env_vars_of(&runtime_env)?;
        let packages = ionet_common::jobs::packages_of(&runtime_env)?;
        for uri in packages.py_modules.iter().chain(Some(&packages.working_dir).filter(|uri| !uri.is_empty())) {
            let name = package_name_of_uri(uri)?;
            if !self.packages.exists(account, name)? {
                return Err(IonetError::InvalidArgument(format!(
                    "package {uri} was not uploaded by account {account}: upload it first (PUT \
                     /api/packages/gcs/{name}; `ionet job submit --working-dir` and ionet.job_submission do)"
                )));
            }
        }
        let id = match request.submission_id.or(request.job_id).filter(|id| !id.is_empty()) {
            Some(id) => id,
            None => new_submission_id(),
        };
        checked_submission_id(&id)?;
        let record = Submission {
            submission_id: id.clone(),
            account: account.to_string(),
            entrypoint: request.entrypoint,
            status: Status::Pending,
            message: "Job has not started yet.".into(),
            error_type: None,
            start_time: self.state.now_ms(),
            end_time: None,
            metadata: request.metadata.unwrap_or_default(),
            runtime_env,
            resources,
            label_selector: request.entrypoint_label_selector.unwrap_or_default(),
            gpu_type: request.entrypoint_gpu_type.filter(|model| !model.trim().is_empty()),
            max_price_micros,
            driver: None,
            driver_exit_code: None,
            stop_requested: false,
            credential_nonce: new_nonce(),
            events: vec![SubmissionEvent {
                time: self.state.now_ms(),
                message: format!("submitted by account {account}"),
            }],
        };
        match self.records.entry(id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(IonetError::AlreadyExists(format!(
                    "Job with submission_id {id} already exists. Please use a different submission_id."
                )))
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(record.clone());
            }
        }
        if let Err(err) = self.persist(&record).await {
            self.records.remove(&id);
            return Err(err.into());
        }
        tracing::info!(submission = %id, %account, "job submitted");
        let submissions = self.clone();
        let supervised = id.clone();
        tokio::spawn(async move { submissions.supervise(supervised).await });
        Ok(id)
    }

    /// The submission `id`, if `principal` may see it (a tenant its own account's).
    pub fn get(&self, principal: &Principal, id: &str) -> IonetResult<Submission> {
        let record = self.records.get(id).map(|record| record.clone());
        match record {
            Some(record) if principal.sees_account(&record.account) => Ok(record),
            // Another account's looks as absent as a missing one.
            _ => Err(IonetError::NotFound(format!("Job {id} does not exist"))),
        }
    }

    /// Every submission `principal` may see, oldest first.
    pub fn list(&self, principal: &Principal) -> Vec<Submission> {
        let mut all: Vec<Submission> = self
            .records
            .iter()
            .filter(|record| principal.sees_account(&record.account))
            .map(|record| record.clone())
            .collect();
        all.sort_by(|a, b| (a.start_time, &a.submission_id).cmp(&(b.start_time, &b.submission_id)));
        all
    }

    /// The jobs submission `id`'s drivers started, oldest first (not those of an earlier
    /// submission of the same id).
    pub fn jobs_of(&self, id: &str) -> Vec<JobId> {
        let since = self.records.get(id).map_or(u64::MAX, |record| record.start_time);
        self.state
            .jobs()
            .into_iter()
            .filter(|job| job.submission_id == id && job.start_time_ms >= since)
            .filter_map(|job| JobId::from_bytes(&job.job_id).ok())
            .collect()
    }

    /// Stops submission `id` (the caller may act for its account); whether it was
    /// running (Ray's `stopped`).
    pub async fn stop(self: &Arc<Self>, principal: &Principal, id: &str) -> IonetResult<bool> {
        let record = self.get(principal, id)?;
        owned_by(principal, &record)?;
        if record.status.is_terminal() {
            return Ok(false);
        }
        let driver = {
            let Some(mut entry) = self.records.get_mut(id) else { return Ok(false) };
            entry.stop_requested = true;
            entry.driver.clone()
        };
        tracing::info!(submission = %id, "stopping a submitted job");
        self.event(id, "stop asked for".into()).await;
        if let Some(driver) = driver {
            let request = StopEntrypointRequest { submission_id: id.to_string() };
            if let Err(err) = self.runner.client(&driver.address)?.stop_entrypoint(request).await {
                tracing::warn!(submission = %id, error = %err, "the entrypoint's node did not take the stop");
            }
        }
        // (Not started yet: the supervisor sees the request before it starts anything.)
        // The head does not wait on the node's word: past the grace, the submission ends
        // here (its credential starts nothing more, its jobs end), whatever the node does.
        let submissions = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(STOP_ENFORCED_AFTER).await;
            if submissions.records.get(&id).is_some_and(|record| !record.status.is_terminal()) {
                tracing::warn!(submission = %id, "the entrypoint's node did not end it in time: ended by the head");
                submissions.end(&id, Status::Stopped, String::new(), None).await;
            }
        });
        Ok(true)
    }

    /// Forgets finished submission `id` and its output; whether it was there.
    pub async fn delete(&self, principal: &Principal, id: &str) -> IonetResult<bool> {
        let record = self.get(principal, id)?;
        owned_by(principal, &record)?;
        if !record.status.is_terminal() {
            return Err(IonetError::FailedPrecondition(format!(
                "Attempted to delete job '{id}', but it is in a non-terminal state {:?}: stop it first",
                record.status
            )));
        }
        let storage = self.state.storage().clone();
        let key = id.as_bytes().to_vec();
        blocking(move || storage.delete(Table::Submissions, &key)).await?;
        self.records.remove(id);
        let _ = std::fs::remove_file(self.log_path(id));
        Ok(true)
    }

    /// What submission `id`'s entrypoint printed, from byte `offset` (at most
    /// [`MAX_LOGS_READ`] bytes, ending on a whole character unless it ended); and the offset
    /// after it.
    pub async fn logs(&self, principal: &Principal, id: &str, offset: u64) -> IonetResult<(String, u64)> {
        self.logs_up_to(principal, id, offset, MAX_LOGS_READ).await
    }

    /// [`Submissions::logs`], at most `limit` bytes (at most [`MAX_LOGS_READ`]).
    pub async fn logs_up_to(
        &self,
        principal: &Principal,
        id: &str,
        offset: u64,
        limit: u64,
    ) -> IonetResult<(String, u64)> {
        let limit = limit.min(MAX_LOGS_READ);
        let record = self.get(principal, id)?;
        let path = self.log_path(id);
        let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Seek};
            let mut file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(err) => return Err(err),
            };
            file.seek(std::io::SeekFrom::Start(offset))?;
            let mut bytes = Vec::new();
            file.take(limit).read_to_end(&mut bytes)?;
            Ok(bytes)
        })
        .await
        .map_err(|err| IonetError::Internal(format!("reading a submission's output: {err}")))??;
        // A character cut at the end waits for the next read (unless nothing more comes).
        let whole = match std::str::from_utf8(&bytes) {
            Err(err) if err.error_len().is_none() && !record.status.is_terminal() => err.valid_up_to(),
            _ => bytes.len(),
        };
        Ok((String::from_utf8_lossy(&bytes[..whole]).into_owned(), offset + whole as u64))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("job-driver-{id}.log"))
    }

    async fn persist(&self, record: &Submission) -> GcsResult<()> {
        let storage = self.state.storage().clone();
        let key = record.submission_id.as_bytes().to_vec();
        let value = serde_json::to_vec(record).map_err(|err| IonetError::Internal(err.to_string()))?;
        blocking(move || storage.put(Table::Submissions, &key, &value)).await
    }

    /// Changes submission `id` with `change` and stores it.
    async fn update(&self, id: &str, change: impl FnOnce(&mut Submission)) -> Option<Submission> {
        let record = {
            let mut entry = self.records.get_mut(id)?;
            change(&mut entry);
            entry.clone()
        };
        if let Err(err) = self.persist(&record).await {
            tracing::error!(submission = %id, error = %err, "could not store a submission's change");
        }
        Some(record)
    }

    /// Records `message` as a step of submission `id`.
    async fn event(&self, id: &str, message: String) {
        let time = self.state.now_ms();
        tracing::debug!(submission = %id, %message, "submission event");
        self.update(id, |record| {
            if record.events.len() >= MAX_EVENTS {
                // The first (how it began) stays; the oldest after it goes.
                record.events.remove(1);
            }
            record.events.push(SubmissionEvent { time, message });
        })
        .await;
    }

    /// Ends submission `id` with `status` (unless it ended already), and every job its
    /// drivers started.
    async fn end(&self, id: &str, status: Status, message: String, exit_code: Option<i32>) {
        let now = self.state.now_ms();
        let ended = self
            .update(id, |record| {
                if record.status.is_terminal() {
                    return;
                }
                // A stop asked for ends STOPPED, whatever the exit it caused.
                let status =
                    if record.stop_requested && status != Status::Succeeded { Status::Stopped } else { status };
                record.status = status;
                record.message = match status {
                    Status::Stopped => "Job was intentionally stopped.".into(),
                    _ => message,
                };
                record.error_type = match status {
                    Status::Failed => Some("JOB_ENTRYPOINT_COMMAND_ERROR".into()),
                    _ => None,
                };
                record.end_time = Some(now);
                record.driver_exit_code = exit_code;
                if record.events.len() >= MAX_EVENTS {
                    record.events.remove(1);
                }
                record.events.push(SubmissionEvent { time: now, message: format!("{status:?}: {}", record.message) });
            })
            .await;
        if let Some(record) = ended {
            tracing::info!(submission = %id, status = ?record.status, "submitted job ended");
        }
        self.finish_jobs(id).await;
    }

    /// Ends the jobs submission `id`'s drivers started (their leases and workers end).
    async fn finish_jobs(&self, id: &str) {
        for job in self.state.jobs().into_iter().filter(|job| job.submission_id == id) {
            if job.state == JobState::Finished as i32 {
                continue;
            }
            if let Err(err) = self.state.finish_job(&job.job_id).await {
                tracing::warn!(submission = %id, error = %err, "could not end a job of a submission");
                continue;
            }
            self.placement_groups.remove_groups_of_job(&job.job_id).await;
        }
    }

    /// Runs submission `id` to its end.
    async fn supervise(self: Arc<Self>, id: String) {
        let Some(record) = self.records.get(&id).map(|record| record.clone()) else { return };
        if record.stop_requested {
            return self.end(&id, Status::Stopped, String::new(), None).await;
        }
        let node = match self.pick_node(&record) {
            Ok(node) => node,
            Err(why) => {
                return self.end(&id, Status::Failed, format!("no node can run the entrypoint: {why}"), None).await
            }
        };
        let packages = ionet_common::jobs::packages_of(&record.runtime_env).unwrap_or_default();
        let mut preparing = Vec::new();
        if !packages.working_dir.is_empty() || !packages.py_modules.is_empty() {
            preparing.push("fetching and unpacking its packages".to_string());
        }
        if !packages.pip.is_empty() {
            preparing.push(format!("installing {:?} (once per node)", packages.pip));
        }
        let placed = format!(
            "placed on node {} ({}){}",
            &hex::encode(&node.node_id)[..8],
            node.address,
            if preparing.is_empty() { String::new() } else { format!(": {}", preparing.join(", ")) }
        );
        self.event(&id, placed).await;
        // What the entrypoint holds is reserved on its node for a job of its own (paid by
        // the account, metered as any bundle), until the submission ends.
        let mut held = None;
        if !record.resources.is_empty() {
            match self.hold(&id, &record, &node).await {
                Ok(group) => held = Some(group),
                Err(why) => {
                    let message = format!("could not hold the entrypoint's resources on node {}: {why}", node.address);
                    return self.end(&id, Status::Failed, message, None).await;
                }
            }
            self.event(&id, format!("holding {} on it", describe(&record.resources))).await;
        }
        let credential =
            self.issuer.issue_submission(&id, &record.credential_nonce, &record.account, SUBMISSION_CREDENTIAL_TTL);
        let request = RunEntrypointRequest {
            submission_id: id.clone(),
            entrypoint: record.entrypoint.clone(),
            env: ionet_common::jobs::env_vars_of(&record.runtime_env).unwrap_or_default(),
            credential,
            gcs_address: self.head_address.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            packages: Some(packages),
            placement_group_id: held.as_ref().map(|group| group.to_vec()).unwrap_or_default(),
            bundle_index: 0,
            gpus: record.resources.get(GPU).map_or(0, |gpus| gpus.ceil() as u32),
        };
        let started = match self.runner.client(&node.address) {
            Ok(mut client) => client.run_entrypoint(request).await.map_err(IonetError::from),
            Err(err) => Err(err),
        };
        let mut events = match started {
            Ok(events) => events.into_inner(),
            Err(err) => {
                let message = format!("node {} could not start the entrypoint: {err}", node.address);
                return self.end(&id, Status::Failed, message, None).await;
            }
        };
        let node_id = hex::encode(&node.node_id);
        let mut log = LogFile::create(self.log_path(&id));
        let mut check = tokio::time::interval(HOLD_CHECK);
        loop {
            let message = tokio::select! {
                message = events.message() => message,
                _ = check.tick() => {
                    // What it holds went (its payer's credit ran out, say): it stops too, or
                    // it would run on unmetered.
                    let Some(group) = held else { continue };
                    if self.placement_groups.state_of(&group) == Some(PlacementGroupState::Created) {
                        continue;
                    }
                    let why = self.placement_groups.get(&group).map(|group| group.pending_reason).unwrap_or_default();
                    let request = StopEntrypointRequest { submission_id: id.clone() };
                    if let Ok(mut client) = self.runner.client(&node.address) {
                        let _ = client.stop_entrypoint(request).await;
                    }
                    let message = format!("the entrypoint's resources were released: {why}");
                    return self.end(&id, Status::Failed, message, None).await;
                }
            };
            let event = match message {
                Ok(Some(event)) => event.event,
                Ok(None) => None,
                Err(status) => {
                    let message =
                        format!("lost the node running the entrypoint ({}): {}", node.address, status.message());
                    return self.end(&id, Status::Failed, message, None).await;
                }
            };
            match event {
                Some(entrypoint_event::Event::StartedPid(pid)) => {
                    self.event(&id, format!("entrypoint started (pid {pid})")).await;
                    let driver = DriverNode { node_id: node_id.clone(), address: node.address.clone(), pid };
                    let record = self
                        .update(&id, |record| {
                            if !record.status.is_terminal() {
                                record.status = Status::Running;
                                record.message = "Job is currently running.".into();
                                record.driver = Some(driver);
                            }
                        })
                        .await;
                    // A stop asked for while it started: it reaches the node now.
                    if record.is_some_and(|record| record.stop_requested) {
                        let request = StopEntrypointRequest { submission_id: id.clone() };
                        if let Ok(mut client) = self.runner.client(&node.address) {
                            let _ = client.stop_entrypoint(request).await;
                        }
                    }
                }
                Some(entrypoint_event::Event::Output(bytes)) => log.append(&bytes),
                Some(entrypoint_event::Event::Exited(exit)) => {
                    let (status, message) = if !exit.error.is_empty() {
                        (Status::Failed, exit.error)
                    } else if exit.signal != 0 {
                        (Status::Failed, format!("Job entrypoint command was ended by signal {}", exit.signal))
                    } else if exit.code == 0 {
                        (Status::Succeeded, "Job finished successfully.".to_string())
                    } else {
                        (Status::Failed, format!("Job entrypoint command failed with exit code {}", exit.code))
                    };
                    let code = (exit.signal == 0).then_some(exit.code);
                    return self.end(&id, status, message, code).await;
                }
                None => {
                    let message = format!("the node running the entrypoint ({}) ended its stream", node.address);
                    return self.end(&id, Status::Failed, message, None).await;
                }
            }
        }
    }

    /// Reserves what `record`'s entrypoint holds on `node`: a job of its own (its
    /// submission's: it ends with it) and a one-bundle placement group of that job on the
    /// node; its id once the node committed it.
    async fn hold(&self, id: &str, record: &Submission, node: &NodeInfo) -> IonetResult<PlacementGroupId> {
        let job = self
            .state
            .add_job(JobInfo {
                entrypoint: format!("the entrypoint of submission {id}"),
                payer_account: record.account.clone(),
                submission_id: id.to_string(),
                ..Default::default()
            })
            .await?;
        let group = self
            .placement_groups
            .create_on(
                NodeId::from_bytes(&node.node_id)?,
                vec![resource_set(&record.resources)?],
                format!("entrypoint of {id}"),
                job.job_id.clone(),
            )
            .await?;
        let deadline = tokio::time::Instant::now() + HOLD_TIMEOUT;
        loop {
            match self.placement_groups.state_of(&group) {
                Some(PlacementGroupState::Created) => return Ok(group),
                Some(PlacementGroupState::Pending) if tokio::time::Instant::now() < deadline => {}
                _ => {
                    let why = self.placement_groups.get(&group).map(|group| group.pending_reason).unwrap_or_default();
                    let _ = self.placement_groups.remove(&group).await;
                    return Err(IonetError::Unavailable(if why.is_empty() {
                        "the node did not reserve it".into()
                    } else {
                        why
                    }));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node to run `record`'s entrypoint on: alive, taking workloads, matching its
    /// labels, with its resources free; the cheapest, then not the head's, then the most
    /// free CPUs.
    fn pick_node(&self, record: &Submission) -> Result<NodeInfo, String> {
        let demand = resource_set(&record.resources).map_err(|err| err.to_string())?;
        let nodes = self.state.nodes(false);
        let matching: Vec<NodeInfo> = nodes
            .into_iter()
            .filter(|node| {
                node.state == NodeState::Alive as i32 && !node.no_workloads && !ionet_common::gpu_proof::held_back(node)
            })
            .filter(|node| record.label_selector.iter().all(|(key, value)| node.labels.get(key) == Some(value)))
            .filter(|node| {
                record.gpu_type.as_ref().is_none_or(|model| node.accelerator_type.eq_ignore_ascii_case(model))
            })
            .filter(|node| {
                node.available
                    .as_ref()
                    .and_then(|available| available.to_set().ok())
                    .is_some_and(|available| available.contains(&demand))
            })
            .collect();
        let usd = |micros: u64| micros as f64 / 1_000_000.0;
        let mut fits: Vec<NodeInfo> = matching
            .iter()
            .filter(|node| record.max_price_micros.is_none_or(|most| node.price_per_gpu_hour_micros <= most))
            .cloned()
            .collect();
        if fits.is_empty() {
            let what = format!(
                "{}{}{}",
                describe(&record.resources),
                record.gpu_type.as_ref().map(|model| format!(" ({model})")).unwrap_or_default(),
                if record.label_selector.is_empty() {
                    String::new()
                } else {
                    format!(" with labels {:?}", record.label_selector)
                }
            );
            let cheapest = matching.iter().min_by_key(|node| node.price_per_gpu_hour_micros);
            return Err(match (cheapest, record.max_price_micros) {
                (Some(node), Some(most)) => format!(
                    "no node with {what} free asks at most ${:.2} per GPU-hour: the cheapest that fits, node {}, \
                     asks ${:.2}",
                    usd(most),
                    &hex::encode(&node.node_id)[..8],
                    usd(node.price_per_gpu_hour_micros)
                ),
                _ => format!("no alive node taking work has {what} free"),
            });
        }
        let gpus = demand.get(GPU);
        let cost = |node: &NodeInfo| {
            // Micro-USD per hour of what the entrypoint holds.
            let gpu_cost = node.price_per_gpu_hour_micros as f64 * gpus.as_f64();
            let cpu_cost = node.price_per_cpu_hour_micros as f64 * demand.get(CPU).as_f64();
            gpu_cost + cpu_cost
        };
        let free_cpus = |node: &NodeInfo| {
            node.available
                .as_ref()
                .and_then(|available| available.to_set().ok())
                .map_or(0.0, |set| set.get(CPU).as_f64())
        };
        fits.sort_by(|a, b| {
            cost(a).total_cmp(&cost(b)).then(a.is_head.cmp(&b.is_head)).then(free_cpus(b).total_cmp(&free_cpus(a)))
        });
        Ok(fits.swap_remove(0))
    }
}

/// Whether `principal` may change `record` (stop, delete): its account's key, or the admin.
fn owned_by(principal: &Principal, record: &Submission) -> IonetResult<()> {
    match principal {
        Principal::Admin => Ok(()),
        Principal::Account(account) if **account == *record.account => Ok(()),
        other => Err(IonetError::PermissionDenied(format!(
            "{other} may not change submission {}: only its account's key may",
            record.submission_id
        ))),
    }
}

/// What the entrypoint holds (Ray's defaults: no CPU, no GPU).
fn entrypoint_resources(request: &SubmitRequest) -> IonetResult<BTreeMap<String, f64>> {
    let mut resources = request.entrypoint_resources.clone().unwrap_or_default();
    for name in [CPU, GPU, MEMORY] {
        if resources.contains_key(name) {
            return Err(IonetError::InvalidArgument(format!(
                "entrypoint_resources may not name {name:?}: use entrypoint_num_cpus, entrypoint_num_gpus or \
                 entrypoint_memory"
            )));
        }
    }
    let mut put = |name: &str, value: Option<f64>| {
        if let Some(value) = value.filter(|value| *value != 0.0) {
            resources.insert(name.to_string(), value);
        }
    };
    put(CPU, request.entrypoint_num_cpus);
    put(GPU, request.entrypoint_num_gpus);
    put(MEMORY, request.entrypoint_memory.map(|bytes| bytes as f64));
    resource_set(&resources)?;
    Ok(resources)
}

fn resource_set(resources: &BTreeMap<String, f64>) -> IonetResult<ResourceSet> {
    let mut set = ResourceSet::new();
    for (name, value) in resources {
        if !value.is_finite() || *value < 0.0 {
            return Err(IonetError::InvalidArgument(format!(
                "entrypoint resource {name:?} must be 0 or more, not {value}"
            )));
        }
        set.set(name.clone(), Quantity::from_f64(*value)?);
    }
    Ok(set)
}

fn describe(resources: &BTreeMap<String, f64>) -> String {
    if resources.is_empty() {
        return "room for an entrypoint".into();
    }
    resources.iter().map(|(name, value)| format!("{value} {name}")).collect::<Vec<_>>().join(", ")
}

/// A credential's nonce: 16 random bytes, hex.
fn new_nonce() -> String {
    use rand::Rng;
    hex::encode(rand::thread_rng().gen::<[u8; 16]>())
}

/// Ray's form: a prefix and 16 letters and digits (no look-alikes).
fn new_submission_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..16).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect();
    format!("ionetsubmit_{tail}")
}

/// A submission's output as the head keeps it: appended, at most [`MAX_LOG_BYTES`].
struct LogFile {
    file: Option<std::fs::File>,
    written: u64,
    path: PathBuf,
}

impl LogFile {
    fn create(path: PathBuf) -> Self {
        let file = std::fs::File::create(&path)
            .map_err(|err| tracing::error!(path = %path.display(), error = %err, "cannot keep a submission's output"))
            .ok();
        Self { file, written: 0, path }
    }

    fn append(&mut self, bytes: &[u8]) {
        let Some(file) = self.file.as_mut() else { return };
        let room = MAX_LOG_BYTES.saturating_sub(self.written) as usize;
        let result = if bytes.len() <= room {
            file.write_all(bytes)
        } else {
            let note = format!("\n[ionet: output past {MAX_LOG_BYTES} bytes is not kept]\n");
            let result = file.write_all(&bytes[..room]).and_then(|()| file.write_all(note.as_bytes()));
            self.file = None;
            result
        };
        self.written += bytes.len() as u64;
        if let Err(err) = result {
            tracing::error!(path = %self.path.display(), error = %err, "cannot keep a submission's output");
            self.file = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_env_keys_are_checked_and_env_vars_must_be_strings() {
        let env = |json: &str| ionet_common::jobs::env_vars_of(&serde_json::from_str(json).unwrap());
        assert_eq!(env(r#"{"env_vars": {"A": "1"}}"#).unwrap().get("A").map(String::as_str), Some("1"));
        let unknown = env(r#"{"colour": "blue"}"#).unwrap_err().to_string();
        assert!(unknown.contains("unknown runtime_env key \"colour\""), "{unknown}");
        let later = env(r#"{"conda": "env.yaml"}"#).unwrap_err().to_string();
        let working_dir = serde_json::from_str(r#"{"working_dir": "/home/me/project"}"#).unwrap();
        let local = ionet_common::jobs::packages_of(&working_dir).unwrap_err().to_string();
        assert!(local.contains("is not an uploaded package"), "{local}");
        assert!(later.contains("\"conda\" is not supported"), "{later}");
        let pip = serde_json::from_str(r#"{"pip": {"packages": ["x"], "pip_install_options": ["--user"]}}"#).unwrap();
        let refused = ionet_common::jobs::packages_of(&pip).unwrap_err().to_string();
        assert!(refused.contains("is not allowed"), "{refused}");
        let uv = r#"{"uv": {"packages": ["x"], "uv_pip_install_options": ["--no-index"]}}"#;
        assert_eq!(
            ionet_common::jobs::packages_of(&serde_json::from_str(uv).unwrap()).unwrap().pip_options,
            ["--no-index"],
            "Ray's key"
        );
        let listed = ionet_common::jobs::packages_of(&serde_json::from_str(r#"{"uv": ["x==1"]}"#).unwrap()).unwrap();
        assert_eq!((listed.pip, listed.pip_tool), (vec!["x==1".to_string()], "uv".to_string()));
        let number = env(r#"{"env_vars": {"A": 1}}"#).unwrap_err().to_string();
        assert!(number.contains("must be a string"), "{number}");
    }

    #[test]
    fn entrypoint_resources_take_ray_names_and_refuse_negative_ones() {
        let request = SubmitRequest {
            entrypoint: "true".into(),
            entrypoint_num_gpus: Some(2.0),
            entrypoint_resources: Some([("TPU".to_string(), 1.0)].into()),
            ..Default::default()
        };
        let resources = entrypoint_resources(&request).unwrap();
        assert_eq!(resources.get(GPU), Some(&2.0));
        assert_eq!(resources.get("TPU"), Some(&1.0));
        assert!(!resources.contains_key(CPU), "Ray's entrypoint holds no CPU by default");
        let negative = SubmitRequest { entrypoint_num_cpus: Some(-1.0), ..request.clone() };
        assert!(entrypoint_resources(&negative).is_err());
        let sneaky = SubmitRequest { entrypoint_resources: Some([(GPU.to_string(), 1.0)].into()), ..request };
        assert!(entrypoint_resources(&sneaky).is_err());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let (one, two) = (new_submission_id(), new_submission_id());
        assert!(checked_submission_id(&one).is_ok() && one != two && one.starts_with("ionetsubmit_"));
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_unless_null() {
        let request = SubmitRequest::parse(br#"{"entrypoint": "x", "retry_policy": null}"#).unwrap();
        assert_eq!(request.entrypoint, "x");
        let err = SubmitRequest::parse(br#"{"entrypoint": "x", "retry_policy": {"n": 1}}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `retry_policy`"), "{err}");
    }
}
