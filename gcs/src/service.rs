//! The tonic service: decodes requests, checks the caller's scope (a node acts only for
//! itself: [`Principal::may_act_for_node`]), calls [`GcsState`], encodes replies. Which
//! principals may make each call at all is the authorization table's
//! (`ionet_common::authz`), checked before a request reaches this service.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use std::time::Duration;

use ionet_common::authz::Principal;
use ionet_common::credential::{self, Issuer, Role};
use ionet_common::rpc::proto::common::{JobInfo, NodeInfo};
use ionet_common::rpc::proto::gcs::gcs_server::Gcs;
use ionet_common::rpc::proto::gcs::*;
use ionet_common::{tls, ActorId, JobId, NodeId, ObjectId};
use prost::Message;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::actors::Actors;
use crate::placement_groups::{strategy_from_wire, PlacementGroups};
use crate::state::{payer_account, Fit, GcsState, KvScope};
use crate::submissions::Submissions;
use ionet_scheduler::NodeOrder;

/// A heartbeat stream ends after a reply carrying more rows than this (bytes): a whole
/// table past a few hundred nodes, or a large delta.
const LARGE_HEARTBEAT_REPLY: usize = 64 << 10;
/// Most nodes one `GetAllNodes` look-up names (or one `FindNodes` avoids).
const MAX_NODES_LOOKED_UP: usize = 1_000;
/// Most nodes one `FindNodes` answers with.
const MAX_NODES_FOUND: u32 = 64;
/// Most label selectors one `FindNodes` names, and their longest.
const MAX_SELECTORS_SEARCHED: usize = 32;
const MAX_SELECTOR_BYTES: usize = 1024;

/// Every part is shared (`Arc`), so a long-lived stream's handler holds a clone.
#[derive(Clone)]
pub struct GcsService {
    state: Arc<GcsState>,
    placement_groups: Arc<PlacementGroups>,
    actors: Arc<Actors>,
    issuer: Issuer,
    /// When each node's current credential was issued (by this process), and its key:
    /// heartbeats renew credentials a day old.
    node_credentials: Arc<dashmap::DashMap<NodeId, (std::time::Instant, Vec<u8>)>>,
    /// The head serving TLS: the CA that certifies each node for its host.
    tls: Option<HeadTls>,
    /// Submitted jobs: a submission's credential starts jobs only while it runs.
    submissions: Arc<Submissions>,
    /// Tasks as their owners reported them (the state API).
    tasks: Arc<crate::task_events::TaskTable>,
    /// Who holds which object (`ionet memory`), asked of the nodes and drivers.
    objects: Arc<crate::objects::ObjectListing>,
    /// Checks of nodes' GPUs under way.
    gpu_checks: Arc<crate::gpu_checks::GpuChecks>,
    /// The lease book: whether a node's GPUs are leased, by the head's record.
    metering: Arc<crate::metering::Metering>,
    /// Set when the head stops: long-lived streams end then (the server waits for them).
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// Whether a listing of actors or placement groups shows `principal` what belongs to
/// `account`: its own account's, as `sees_account`; a submission's credential (its node, a
/// provider's, holds it) none.
fn lists_for(principal: &Principal, account: &str) -> bool {
    !matches!(principal, Principal::Submission { .. }) && principal.sees_account(account)
}

impl GcsService {
    pub fn new(
        state: Arc<GcsState>,
        placement_groups: Arc<PlacementGroups>,
        actors: Arc<Actors>,
        issuer: Issuer,
        tls: Option<HeadTls>,
        submissions: Arc<Submissions>,
        tasks: Arc<crate::task_events::TaskTable>,
        objects: Arc<crate::objects::ObjectListing>,
        metering: Arc<crate::metering::Metering>,
        stopped: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        // However a job ends (its driver said so, or died), its tasks still open end too.
        let mut events = state.subscribe();
        let ended = Arc::downgrade(&tasks);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent { event: Some(cluster_event::Event::JobFinished(job)), .. }) => {
                        let Some(tasks) = ended.upgrade() else { return };
                        tasks.end_job(&job.job_id, ionet_common::clock::now_us());
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Self {
            state,
            placement_groups,
            actors,
            issuer,
            node_credentials: Default::default(),
            tls,
            submissions,
            tasks,
            objects,
            gpu_checks: Default::default(),
            metering,
            stopped,
        }
    }

    /// Records what a node's answer to its GPU check came to, and what to tell it.
    async fn gpu_check_outcome(
        &self,
        node_id: NodeId,
        outcome: crate::gpu_checks::Outcome,
    ) -> Result<Option<ionet_common::rpc::proto::common::GpuCheck>, Status> {
        use crate::gpu_checks::Outcome;
        let config = &self.state.config;
        let (verdict, took) = match outcome {
            Outcome::Sampled(_) => return Ok(None),
            Outcome::Passed { tflops, bandwidth_gb_per_s, took } => {
                (Ok((tflops, bandwidth_gb_per_s, took.as_millis() as u64)), took)
            }
            Outcome::Failed(reason) => (Err(reason), Duration::from_millis(config.gpu_check_deadline_ms)),
        };
        let check = self.state.record_gpu_check(&node_id, verdict).await?;
        // The next, at a random time (a quarantined node gets its chance to pass again).
        let interval = Duration::from_millis(config.gpu_check_interval_ms);
        self.gpu_checks.schedule_next(node_id, took, interval, config.gpu_check_idle_share_bps);
        Ok(Some(check))
    }

    /// Whether this heartbeat asks the node for a check of its GPUs (recording a check it
    /// was asked for and did not take as a failure).
    async fn gpu_check_due(&self, node_id: NodeId) -> Result<bool, Status> {
        let Some((has_gpus, idle, waiting)) = self.state.gpu_check_view(&node_id) else { return Ok(false) };
        if !has_gpus {
            return Ok(false);
        }
        let config = &self.state.config;
        // Checked before (maybe by an earlier head): the next is scheduled. Never checked
        // (its own first start refused or lost), or overdue when this head started: the
        // head asks for one soon, so a node is never left held back for want of asking.
        if !waiting {
            self.gpu_checks.ensure_scheduled(node_id, Duration::from_millis(config.gpu_check_interval_ms));
        } else {
            let soon = Duration::from_millis(config.gpu_check_min_gap_ms).max(Duration::from_secs(30));
            self.gpu_checks.ensure_scheduled(node_id, soon);
        }
        // Ten heartbeats of a node with nothing new (each asks again) past the deadline.
        let idle_every = config.idle_heartbeat_interval(config.heartbeat_timeout_ms);
        let grace = Duration::from_millis(config.gpu_check_deadline_ms) + 10 * idle_every;
        let uses = || {
            use crate::gpu_checks::GpuUse;
            match (self.metering.gpus_leased_on(&node_id), idle) {
                (true, _) => GpuUse::Leased,
                (false, true) => GpuUse::Idle,
                (false, false) => GpuUse::Busy,
            }
        };
        let max_defer = Duration::from_millis(config.gpu_check_max_defer_ms);
        match self.gpu_checks.on_heartbeat(node_id, uses, grace, max_defer) {
            crate::gpu_checks::Due::No => Ok(false),
            crate::gpu_checks::Due::Now => Ok(true),
            crate::gpu_checks::Due::Overdue => {
                self.state.record_gpu_check_overdue(&node_id).await?;
                Ok(false)
            }
            crate::gpu_checks::Due::Missed(reason) => {
                self.gpu_check_outcome(node_id, crate::gpu_checks::Outcome::Failed(reason)).await?;
                Ok(false)
            }
        }
    }

    /// Simulated GPUs (declared, checked on the CPU, yet billable) are taken only from a
    /// node registering over loopback, one the operator registers (the head's own node,
    /// whatever address it joins through), or one whose simulated GPUs were taken before
    /// (registering again after a head restart), unless the operator accepts them from
    /// anywhere (`accept_remote_simulated_gpus`, for a test cluster across machines): on a
    /// marketplace a stranger's simulated GPU is one nobody can verify. A forwarder on the
    /// head's machine (a port forward, a sidecar) makes every caller look like loopback:
    /// such a head must not forward node registrations.
    fn may_offer_simulated_gpus(
        &self,
        node: &NodeInfo,
        principal: &Principal,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        if self.state.config.accept_remote_simulated_gpus
            || !node.gpus.iter().any(|gpu| gpu.simulated)
            || matches!(principal, Principal::Admin)
        {
            return Ok(());
        }
        let taken_before = NodeId::from_bytes(&node.node_id)
            .ok()
            .and_then(|id| self.state.node(&id))
            .is_some_and(|row| row.gpus.iter().any(|gpu| gpu.simulated));
        let loopback = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
            v4 => v4.is_loopback(),
        };
        if taken_before || peer.is_some_and(|peer| loopback(peer.ip())) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "node {} offers simulated GPUs from {}: this head takes simulated GPUs only from its own machine \
             (a GPU nobody can verify is not offered to strangers); a test cluster across machines sets \
             accept_remote_simulated_gpus = true (IONET_ACCEPT_REMOTE_SIMULATED_GPUS) on the head",
            NodeId::from_bytes(&node.node_id).map(|id| id.short()).unwrap_or_default(),
            peer.map_or_else(|| "an unknown address".to_string(), |peer| peer.ip().to_string())
        )))
    }

    /// The intermediate certificate a registering node asked for (empty: it did not ask,
    /// or the head does not speak TLS). A node is certified for the host of its own
    /// address only; a provider's node naming the head's host (other than loopback, where
    /// every process is the operator's machine's) is refused: it could pose as the head.
    fn certify(&self, principal: &Principal, node: &NodeInfo, public_key: &[u8]) -> Result<Vec<u8>, Status> {
        let Some(tls) = &self.tls else {
            if public_key.is_empty() {
                return Ok(Vec::new());
            }
            return Err(Status::failed_precondition(
                "this head does not speak TLS: a node joins it with a plain host:port address",
            ));
        };
        if public_key.is_empty() {
            return Err(Status::failed_precondition(format!(
                "this head speaks TLS only: node {} must join with its https:// address and --ca-hash",
                NodeId::from_bytes(&node.node_id).map(|id| id.short()).unwrap_or_default()
            )));
        }
        if !ionet_common::rpc::is_tls_address(&node.address) {
            return Err(Status::invalid_argument(format!(
                "a node of a TLS cluster serves TLS: its address {:?} must start with https://",
                node.address
            )));
        }
        let host = tls::host_of(&node.address);
        let operator = matches!(principal, Principal::Admin);
        if !operator && !tls::is_loopback_host(host) && tls.hosts.iter().any(|head| tls::same_host(head, host)) {
            return Err(Status::permission_denied(format!(
                "node {} may not be certified for {host}: that is the head's host",
                NodeId::from_bytes(&node.node_id).map(|id| id.short()).unwrap_or_default()
            )));
        }
        tls.ca.certify_node(&hex::encode(&node.node_id), host, public_key).map_err(Status::from)
    }
}

/// Most bytes of a job's worker command (argv, environment and working directory).
const MAX_WORKER_COMMAND_BYTES: usize = 256 * 1024;

/// A job's declared worker command, refused when empty or oversize.
fn checked_worker_command(
    command: Option<ionet_common::rpc::proto::common::WorkerCommand>,
) -> Result<ionet_common::rpc::proto::common::WorkerCommand, Status> {
    let command = command.unwrap_or_default();
    if command.argv.first().is_none_or(|program| program.is_empty()) {
        return Err(Status::invalid_argument(
            "a job declares the command that starts its workers (AddJob.worker_command): none was given",
        ));
    }
    let size = command.argv.iter().map(String::len).sum::<usize>()
        + command.env.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
        + command.cwd.len();
    if size > MAX_WORKER_COMMAND_BYTES {
        return Err(Status::invalid_argument(format!(
            "a job's worker command is {size} bytes; at most {MAX_WORKER_COMMAND_BYTES} are taken"
        )));
    }
    Ok(command)
}

/// The head serving TLS: its CA, and the hosts its own certificate names.
#[derive(Clone, Debug)]
pub struct HeadTls {
    pub ca: Arc<tls::ClusterCa>,
    pub hosts: Vec<String>,
}

/// How long a node's credential lasts; a node registering again (every head restart, or
/// after losing touch) gets a fresh one.
const NODE_CREDENTIAL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// A heartbeat from a node whose credential is older than this carries a fresh one.
const NODE_CREDENTIAL_RENEWAL: Duration = Duration::from_secs(24 * 3600);
/// A join token's life when the operator does not say; and the longest allowed.
const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(24 * 3600);
const MAX_JOIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// An account's API key: a year unless the operator says; at most two.
const DEFAULT_ACCOUNT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_ACCOUNT_TTL: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// A job's credential outlives any job it is issued to (it ends with the job's driver).
pub(crate) const JOB_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl GcsService {
    /// The account a placement group belongs to: its job's payer.
    fn account_of_group(&self, id: &ionet_common::PlacementGroupId) -> String {
        let job = self.placement_groups.job_of(id).and_then(|job| JobId::from_bytes(&job).ok());
        job.map(|job| self.state.payer_of(&job)).unwrap_or_else(|| "default".into())
    }

    /// The account an actor belongs to: its job's payer.
    fn account_of_actor(&self, actor: &ionet_common::rpc::proto::gcs::ActorInfo) -> String {
        let job = actor.spec.as_ref().and_then(|spec| JobId::from_bytes(&spec.job_id).ok());
        job.map(|job| self.state.payer_of(&job)).unwrap_or_else(|| "default".into())
    }

    /// The node table for a reader at `since` of `since_incarnation`: what changed since,
    /// or all of it (of `viewer`'s sample, checked to be the caller's); or the rows looked up.
    fn nodes_read(&self, request: GetAllNodesRequest, viewer: Option<NodeId>) -> Result<GetAllNodesReply, Status> {
        if !request.node_ids.is_empty() || !request.addresses.is_empty() {
            if request.node_ids.len() + request.addresses.len() > MAX_NODES_LOOKED_UP {
                return Err(Status::invalid_argument(format!(
                    "{} nodes looked up in one call: at most {MAX_NODES_LOOKED_UP}",
                    request.node_ids.len() + request.addresses.len()
                )));
            }
            let ids = request.node_ids.iter().map(|id| node_id_of(id)).collect::<Result<Vec<_>, _>>()?;
            return Ok(GetAllNodesReply {
                nodes: self.state.look_up_nodes(&ids, &request.addresses, request.include_dead),
                incarnation: self.state.incarnation(),
                ..Default::default()
            });
        }
        let read = self.state.nodes_since(
            request.include_dead,
            request.since_version,
            request.since_incarnation,
            viewer.as_ref(),
        );
        Ok(GetAllNodesReply {
            nodes: read.nodes,
            version: read.version,
            incarnation: self.state.incarnation(),
            delta: read.delta,
            removed: read.removed.iter().map(|node| node.to_vec()).collect(),
            sampled: read.sampled,
        })
    }

    /// A heartbeat's answer, by call or on a stream.
    async fn answer_heartbeat(
        &self,
        principal: &Principal,
        request: HeartbeatRequest,
    ) -> Result<HeartbeatReply, Status> {
        let node_id = node_id_of(&request.node_id)?;
        principal.may_act_for_node(&node_id)?;
        self.state.heartbeat(&request.node_id, request.available)?;
        let mut unfunded_jobs: Vec<UnfundedJob> = self
            .state
            .unfunded()
            .into_iter()
            .map(|(job, reason)| UnfundedJob { job_id: job.to_vec(), reason })
            .collect();
        // In one order, so that a stream can tell a set from the one it last carried.
        unfunded_jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        let gpu_check_due = self.gpu_check_due(node_id).await?;
        let view = request.read_view.then(|| {
            let viewer = request.sampled_view.then_some(&node_id);
            let read = self.state.node_rows_since(request.view_since_version, request.view_since_incarnation, viewer);
            NodeRows {
                nodes: read.rows,
                version: read.version,
                incarnation: self.state.incarnation(),
                delta: read.delta,
                removed: read.removed.iter().map(|node| node.to_vec()).collect(),
                sampled: read.sampled,
            }
        });
        Ok(HeartbeatReply {
            incarnation: self.state.incarnation(),
            node_credential: self.renewed_credential(principal, node_id),
            unfunded_jobs,
            gpu_check_due,
            view,
            answers: request.seq,
        })
    }

    /// A fresh credential for the node heartbeating as itself, if the one it holds was
    /// issued a day ago or more (or by an earlier run of the head, which kept its key);
    /// else empty.
    fn renewed_credential(&self, principal: &Principal, node_id: NodeId) -> String {
        if *principal != Principal::Node(node_id) {
            return String::new();
        }
        let fresh = |issued: &std::time::Instant| issued.elapsed() < NODE_CREDENTIAL_RENEWAL;
        let key = match self.node_credentials.get(&node_id) {
            Some(entry) if fresh(&entry.0) => return String::new(),
            Some(entry) => entry.1.clone(),
            None => match self.state.node(&node_id) {
                Some(row) => row.public_key,
                None => return String::new(),
            },
        };
        self.node_credentials.insert(node_id, (std::time::Instant::now(), key.clone()));
        self.issuer.issue_node(node_id.as_bytes(), &key, NODE_CREDENTIAL_TTL)
    }
}

/// One node's `HeartbeatStream` at the head, between two of its heartbeats.
struct HeartbeatStreamState {
    service: GcsService,
    principal: Principal,
    incoming: tonic::Streaming<HeartbeatRequest>,
    /// Refused, or a reply that ends the stream went out: nothing more.
    ended: bool,
    /// The unfunded jobs the stream's last reply carried (none yet: `None`).
    unfunded_sent: Option<Vec<UnfundedJob>>,
}

/// Whether a heartbeat's reply tells the node anything: another set of unfunded jobs than
/// the stream last carried (`unfunded_sent`), a GPU check, a credential, or a node table
/// moved on from the version the node holds (`since`: incarnation, version).
fn has_news(reply: &HeartbeatReply, since: (u64, u64), unfunded_sent: Option<&Vec<UnfundedJob>>) -> bool {
    unfunded_sent != Some(&reply.unfunded_jobs)
        || reply.gpu_check_due
        || !reply.node_credential.is_empty()
        || reply.view.as_ref().is_some_and(|view| {
            !view.delta
                || !view.nodes.is_empty()
                || !view.removed.is_empty()
                || (view.incarnation, view.version) != since
        })
}

fn job_id_of(bytes: &[u8]) -> Result<JobId, Status> {
    JobId::from_bytes(bytes).map_err(|err| Status::invalid_argument(err.to_string()))
}

fn node_id_of(bytes: &[u8]) -> Result<NodeId, Status> {
    NodeId::from_bytes(bytes).map_err(|err| Status::invalid_argument(err.to_string()))
}

/// The answer to a follow of an actor the head will not follow, with why.
fn refused(actor_id: Vec<u8>, status: &Status) -> WatchActorsReply {
    WatchActorsReply { actor_id, actor: None, error: status.message().to_string() }
}

/// Longest a `GetActor` waits before answering with the row as it is.
const MAX_ACTOR_WAIT_MS: u64 = 60_000;
/// Most actors one `WatchActors` stream follows at once (a process's handles; each is a
/// task at the head until its actor is DEAD or unfollowed). Past it the process asks by
/// `GetActor` for the rest.
const MAX_FOLLOWED_PER_STREAM: usize = 100_000;
/// Rows a `WatchActors` stream holds for a slow reader before its actors' followers wait.
const FOLLOWED_ROWS_BUFFERED: usize = 1024;

fn wants(channels: &[Channel], event: &ClusterEvent) -> bool {
    if channels.is_empty() {
        return true;
    }
    let channel = match event.event {
        Some(cluster_event::Event::NodeAdded(_))
        | Some(cluster_event::Event::NodeDead(_))
        | Some(cluster_event::Event::NodeDrained(_)) => Channel::Nodes,
        Some(cluster_event::Event::JobStarted(_)) | Some(cluster_event::Event::JobFinished(_)) => Channel::Jobs,
        None => return false,
    };
    channels.contains(&channel)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ClusterEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Gcs for GcsService {
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeReply>, Status> {
        let principal = Principal::of(&request)?;
        let peer = request.remote_addr();
        let request = request.into_inner();
        let node = request.node.ok_or_else(|| Status::invalid_argument("register_node without a node"))?;
        let node_id = node_id_of(&node.node_id)?;
        if let Principal::Node(own) = principal {
            // A node registers itself again; a new node comes with a join token.
            principal.may_act_for_node(&node_id).map_err(|_| {
                Status::permission_denied(format!(
                    "node {} may not register node {}: a new node joins with a join token",
                    own.short(),
                    node_id.short()
                ))
            })?;
        }
        let message = credential::registration_message(&node.node_id, &node.public_key);
        if !credential::verify_signature(&node.public_key, &message, &request.proof) {
            return Err(Status::permission_denied(format!(
                "node {}: the registration is not signed by the key it names (a node proves its key with each registration)",
                node_id.short()
            )));
        }
        self.may_offer_simulated_gpus(&node, &principal, peer)?;
        let public_key = node.public_key.clone();
        let tls_certificate = self.certify(&principal, &node, &request.tls_public_key)?;
        self.state.register_node(node).await?;
        if let Some(peer) = peer {
            self.state.note_registered_from(node_id, peer.ip());
        }
        self.node_credentials.insert(node_id, (std::time::Instant::now(), public_key.clone()));
        // What is kept per node id outlives no node forgotten after its death (checked
        // when it outgrows the table twice over: a node daemon's id is new at each start).
        if self.node_credentials.len() > 2 * self.state.node_count() + 1024 {
            self.node_credentials.retain(|node, _| self.state.knows_node(node));
            self.gpu_checks.forget_unknown(|node| self.state.knows_node(node));
        }
        Ok(Response::new(RegisterNodeReply {
            heartbeat_interval_ms: self.state.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.state.config.heartbeat_timeout_ms,
            incarnation: self.state.incarnation(),
            node_credential: self.issuer.issue_node(node_id.as_bytes(), &public_key, NODE_CREDENTIAL_TTL),
            head_key: self.issuer.verifier().to_bytes().to_vec(),
            tls_certificate,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let principal = Principal::of(&request)?;
        self.answer_heartbeat(&principal, request.into_inner()).await.map(Response::new)
    }

    type HeartbeatStreamStream = Pin<Box<dyn Stream<Item = Result<HeartbeatReply, Status>> + Send + 'static>>;

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let principal = Principal::of(&request)?;
        let lifetime = Duration::from_millis(self.state.config.heartbeat_stream_lifetime_ms);
        let until = tokio::time::Instant::now() + lifetime;
        self.state.note_heartbeat_stream();
        // Each heartbeat answered in turn, but one the node sent `quiet` only if the reply
        // has something in it (the unfunded jobs count as new when they differ from the
        // set this stream last carried); the first refused ends the stream with its
        // status. It ends cleanly once its time is up, when the head stops (a server
        // stopping waits for its streams), and after a reply that carried many rows (a
        // whole table, or a large delta: the stream's buffer keeps the size of its largest
        // message, so the node's next heartbeat opens a fresh one; a sampled view's whole
        // read is small, and keeps the stream).
        let state = HeartbeatStreamState {
            service: self.clone(),
            principal,
            incoming: request.into_inner(),
            ended: false,
            unfunded_sent: None,
        };
        let replies = futures::stream::unfold(state, move |mut stream| async move {
            let mut stopped = stream.service.stopped.clone();
            loop {
                if stream.ended || *stopped.borrow() {
                    return None;
                }
                let request = tokio::select! {
                    next = stream.incoming.message() => match next {
                        Ok(Some(request)) => request,
                        Ok(None) => return None,
                        Err(status) => {
                            stream.ended = true;
                            return Some((Err(status), stream));
                        }
                    },
                    _ = tokio::time::sleep_until(until) => return None,
                    _ = stopped.wait_for(|stop| *stop) => return None,
                };
                let quiet = request.quiet;
                let since = (request.view_since_incarnation, request.view_since_version);
                let reply = match stream.service.answer_heartbeat(&stream.principal, request).await {
                    Ok(reply) => reply,
                    Err(status) => {
                        stream.ended = true;
                        return Some((Err(status), stream));
                    }
                };
                if quiet && !has_news(&reply, since, stream.unfunded_sent.as_ref()) {
                    // Heartbeats buffered on the stream are taken in turn, not all at once.
                    tokio::task::coop::consume_budget().await;
                    continue;
                }
                stream.unfunded_sent = Some(reply.unfunded_jobs.clone());
                stream.ended = reply
                    .view
                    .as_ref()
                    .is_some_and(|view| view.nodes.iter().map(|row| row.len()).sum::<usize>() > LARGE_HEARTBEAT_REPLY);
                return Some((Ok(reply), stream));
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn objects_moved(
        &self,
        request: Request<ObjectsMovedRequest>,
    ) -> Result<Response<ObjectsMovedReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let node = node_id_of(&request.node_id)?;
        principal.may_act_for_node(&node)?;
        let objects = request
            .moves
            .iter()
            .map(|moved| ObjectId::from_bytes(&moved.object_id))
            .collect::<ionet_common::IonetResult<Vec<_>>>()?;
        if request.forget {
            self.state.forget_moves(&node, objects).await?;
        } else {
            let moves = objects.into_iter().zip(request.moves.into_iter().map(|moved| moved.holder_address)).collect();
            self.state.objects_moved(&node, moves).await?;
        }
        Ok(Response::new(ObjectsMovedReply {}))
    }

    async fn get_object_moves(
        &self,
        request: Request<GetObjectMovesRequest>,
    ) -> Result<Response<GetObjectMovesReply>, Status> {
        let request = request.into_inner();
        let objects = request
            .object_ids
            .iter()
            .map(|id| ObjectId::from_bytes(id))
            .collect::<ionet_common::IonetResult<Vec<_>>>()?;
        let holder_addresses = self.state.object_moves(&request.from_address, &objects);
        Ok(Response::new(GetObjectMovesReply { holder_addresses }))
    }

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<DrainNodeReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.may_act_for_node(&node_id_of(&request.node_id)?)?;
        self.state.drain_node(&request.node_id, &request.reason, request.exiting).await?;
        Ok(Response::new(DrainNodeReply {}))
    }

    async fn start_gpu_check(
        &self,
        request: Request<StartGpuCheckRequest>,
    ) -> Result<Response<StartGpuCheckReply>, Status> {
        let principal = Principal::of(&request)?;
        let node_id = node_id_of(&request.get_ref().node_id)?;
        principal.may_act_for_node(&node_id)?;
        let node = self.state.node(&node_id).ok_or_else(|| {
            Status::not_found(format!("node {} is not registered with this control store", node_id.short()))
        })?;
        let gap = Duration::from_millis(self.state.config.gpu_check_min_gap_ms);
        // Its latest check's state alone (an untrusted node that passed gains nothing by
        // checking again and again).
        let not_passing = node
            .gpu_check
            .as_ref()
            .is_some_and(|check| check.state != ionet_common::rpc::proto::common::GpuCheckState::Passed as i32);
        let leased = || self.metering.gpus_leased_on(&node_id);
        self.gpu_checks.may_start(node_id, not_passing, leased, gap).map_err(Status::failed_precondition)?;
        if let Some(reason) = self.gpu_checks.abandon(node_id) {
            self.gpu_check_outcome(node_id, crate::gpu_checks::Outcome::Failed(reason)).await?;
        }
        let allowance = Duration::from_millis(self.state.config.gpu_check_deadline_ms);
        let reply = self.gpu_checks.start(&node, allowance).map_err(Status::failed_precondition)?;
        Ok(Response::new(reply))
    }

    async fn commit_gpu_check(
        &self,
        request: Request<CommitGpuCheckRequest>,
    ) -> Result<Response<CommitGpuCheckReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let node_id = node_id_of(&request.node_id)?;
        principal.may_act_for_node(&node_id)?;
        let outcome =
            self.gpu_checks.commit(node_id, request.check_id, &request.commits).map_err(Status::failed_precondition)?;
        if let crate::gpu_checks::Outcome::Sampled(samples) = outcome {
            return Ok(Response::new(CommitGpuCheckReply { samples }));
        }
        let check = self.gpu_check_outcome(node_id, outcome).await?.unwrap_or_default();
        Err(Status::failed_precondition(format!("node {} failed its GPU check: {}", node_id.short(), check.reason)))
    }

    async fn reveal_gpu_check(
        &self,
        request: Request<RevealGpuCheckRequest>,
    ) -> Result<Response<RevealGpuCheckReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let node_id = node_id_of(&request.node_id)?;
        principal.may_act_for_node(&node_id)?;
        let outcome = self
            .gpu_checks
            .reveal(node_id, request.check_id, request.reveals)
            .await
            .map_err(Status::failed_precondition)?;
        let check = self.gpu_check_outcome(node_id, outcome).await?;
        Ok(Response::new(RevealGpuCheckReply { check }))
    }

    async fn clear_untrusted(
        &self,
        request: Request<ClearUntrustedRequest>,
    ) -> Result<Response<ClearUntrustedReply>, Status> {
        let node_id = node_id_of(&request.into_inner().node_id)?;
        let check = self.state.clear_untrusted(&node_id).await?;
        // Its latest check failed: the next is asked for at once, not an interval away.
        if check.state != ionet_common::rpc::proto::common::GpuCheckState::Passed as i32 {
            self.gpu_checks.due_now(node_id);
        }
        Ok(Response::new(ClearUntrustedReply { check: Some(check) }))
    }

    async fn get_all_nodes(&self, request: Request<GetAllNodesRequest>) -> Result<Response<GetAllNodesReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A node's sample is its own to read (or the operator's): a caller testing ids for
        // the bucket they fall in could place nodes in a victim's view.
        let viewer = if request.sample_for.is_empty() { None } else { Some(node_id_of(&request.sample_for)?) };
        if let Some(viewer) = viewer {
            if principal != Principal::Node(viewer) && principal != Principal::Admin {
                return Err(Status::permission_denied(format!(
                    "{principal} may not read node {}'s sample of the table: a node reads its own",
                    viewer.short()
                )));
            }
        }
        Ok(Response::new(self.nodes_read(request, viewer)?))
    }

    async fn find_nodes(&self, request: Request<FindNodesRequest>) -> Result<Response<FindNodesReply>, Status> {
        let mut request = request.into_inner();
        if request.limit == 0 || request.limit > MAX_NODES_FOUND {
            return Err(Status::invalid_argument(format!(
                "limit {} is not between 1 and {MAX_NODES_FOUND}",
                request.limit
            )));
        }
        if request.avoid.len() > MAX_NODES_LOOKED_UP {
            return Err(Status::invalid_argument(format!("at most {MAX_NODES_LOOKED_UP} nodes may be avoided")));
        }
        if request.label_selectors.len() > MAX_SELECTORS_SEARCHED
            || request.label_selectors.iter().any(|selector| selector.len() > MAX_SELECTOR_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_SELECTORS_SEARCHED} label selectors of {MAX_SELECTOR_BYTES} bytes each may be searched for"
            )));
        }
        let resources = request.resources.clone().unwrap_or_default().to_set().map_err(Status::from)?;
        let mut demand = ionet_scheduler::Demand::new(resources)
            .with_label_selectors(&request.label_selectors)
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        if request.min_reliability_bps > 0 {
            demand = demand.with_min_reliability_bps(request.min_reliability_bps);
        }
        let avoid = request.avoid.iter().map(|id| node_id_of(id)).collect::<Result<HashSet<_>, _>>()?;
        let (limit, free_now) = (request.limit as usize, request.free_now);
        // What was asked, whoever asked it: a search that found nothing is not made again
        // at once. The asker is among those avoided, so they are left out of what names
        // the search, and a search that left out a node that fits is not remembered.
        request.avoid.clear();
        let asked: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(request.encode_to_vec()).into();
        let found = self.state.find_nodes(asked, limit, |row| {
            let Ok(view) = crate::placement_groups::node_view(row) else { return Fit::No };
            let fits = if free_now { demand.fits_now(&view) } else { demand.fits_when_idle(&view) };
            match (fits, avoid.contains(&view.node_id)) {
                (false, _) => Fit::No,
                (true, false) => Fit::Yes,
                (true, true) => Fit::Avoided,
            }
        });
        Ok(Response::new(FindNodesReply { nodes: found }))
    }

    async fn add_job(&self, request: Request<AddJobRequest>) -> Result<Response<AddJobReply>, Status> {
        let principal = Principal::of(&request)?;
        let mut request = request.into_inner();
        if request.min_reliability_bps > ionet_common::reliability::FULL {
            return Err(Status::invalid_argument(format!(
                "min_reliability_bps {} is above {} (a share of 1)",
                request.min_reliability_bps,
                ionet_common::reliability::FULL
            )));
        }
        let mut submission_id = String::new();
        // The payer is the account of the credential, never a field a tenant chooses.
        match &principal {
            Principal::Account(account) => {
                if !request.payer_account.is_empty() && request.payer_account != **account {
                    return Err(Status::permission_denied(format!(
                        "account {account} may not start a job paid by {:?}: an account's jobs are paid by it",
                        request.payer_account
                    )));
                }
                request.payer_account = account.to_string();
            }
            // A submitted job's entrypoint starts jobs for its account, while it runs.
            Principal::Submission { id, nonce, account } => {
                if !self.submissions.is_live(id, nonce) {
                    return Err(Status::permission_denied(format!(
                        "submission {id} has ended: its credential starts no more jobs"
                    )));
                }
                if !request.payer_account.is_empty() && request.payer_account != **account {
                    return Err(Status::permission_denied(format!(
                        "submission {id} of account {account} may not start a job paid by {:?}",
                        request.payer_account
                    )));
                }
                request.payer_account = account.to_string();
                submission_id = id.to_string();
            }
            Principal::Admin if request.payer_account.is_empty() => request.payer_account = "default".into(),
            Principal::Admin => {}
            other => return Err(Status::permission_denied(format!("{other} may not start a job"))),
        }
        let worker_command = checked_worker_command(request.worker_command)?;
        // The packages a job ships are ones its account uploaded, and a submission's
        // drivers (whose credential a provider's node holds) ship their submission's only:
        // a node fetches what the job ships with the job's credential.
        if let Some(packages) = &worker_command.packages {
            let uris =
                Some(&packages.working_dir).into_iter().filter(|uri| !uri.is_empty()).chain(&packages.py_modules);
            for uri in uris {
                let name = ionet_common::jobs::package_name_of_uri(uri)?;
                let shipped = match &principal {
                    Principal::Submission { id, nonce, .. } => self.submissions.ships(id, nonce, name),
                    _ => self.submissions.packages().exists(&request.payer_account, name)?,
                };
                if !shipped {
                    return Err(Status::failed_precondition(match &principal {
                        Principal::Submission { id, .. } => format!(
                            "package {name} is not one submission {id} ships: a submitted job's drivers ship their \
                             submission's packages only"
                        ),
                        _ => format!(
                            "package {name} was not uploaded by account {}: upload it first (init's runtime_env \
                             uploads local directories)",
                            request.payer_account
                        ),
                    }));
                }
            }
        }
        let job = self
            .state
            .add_job(JobInfo {
                driver_address: request.driver_address,
                driver_pid: request.driver_pid,
                namespace: request.namespace,
                entrypoint: request.entrypoint,
                payer_account: request.payer_account,
                worker_command: Some(worker_command),
                submission_id,
                min_reliability_bps: request.min_reliability_bps,
                ..Default::default()
            })
            .await?;
        // A submission that ended meanwhile ends the job it just started too.
        if let Principal::Submission { id, nonce, .. } = &principal {
            if !self.submissions.is_live(id, nonce) {
                self.state.finish_job(&job.job_id).await?;
                return Err(Status::permission_denied(format!("submission {id} has ended: it starts no more jobs")));
            }
        }
        let payer = payer_account(&job);
        let job_credential = self.issuer.issue_job(&job.job_id, payer, JOB_CREDENTIAL_TTL);
        Ok(Response::new(AddJobReply {
            job: Some(job),
            job_credential,
            head_key: self.issuer.verifier().to_bytes().to_vec(),
        }))
    }

    async fn get_job_worker_command(
        &self,
        request: Request<GetJobWorkerCommandRequest>,
    ) -> Result<Response<GetJobWorkerCommandReply>, Status> {
        let principal = Principal::of(&request)?;
        let job_id = JobId::from_bytes(&request.into_inner().job_id)?;
        // A job's command is its own (a node asks with the job's credential).
        principal.may_act_for_job(&job_id)?;
        let job = self.state.job(&job_id).ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
        Ok(Response::new(GetJobWorkerCommandReply {
            worker_command: job.worker_command,
            min_reliability_bps: job.min_reliability_bps,
        }))
    }

    async fn mark_job_finished(
        &self,
        request: Request<MarkJobFinishedRequest>,
    ) -> Result<Response<MarkJobFinishedReply>, Status> {
        let principal = Principal::of(&request)?;
        let job_id = request.into_inner().job_id;
        principal.may_act_for_job(&job_id_of(&job_id)?)?;
        self.state.finish_job(&job_id).await?;
        self.placement_groups.remove_groups_of_job(&job_id).await;
        Ok(Response::new(MarkJobFinishedReply {}))
    }

    async fn get_all_jobs(&self, request: Request<GetAllJobsRequest>) -> Result<Response<GetAllJobsReply>, Status> {
        // A tenant sees its own account's jobs; the operator all.
        let principal = Principal::of(&request)?;
        let mut jobs = self.state.jobs();
        jobs.retain(|job| principal.sees_account(payer_account(job)));
        // How a job's workers start (its environment may hold secrets) is the account's
        // and the operator's to read; a job reads its own with GetJobWorkerCommand.
        if !matches!(principal, Principal::Admin | Principal::Account(_)) {
            for job in &mut jobs {
                job.worker_command = None;
            }
        }
        Ok(Response::new(GetAllJobsReply { jobs }))
    }

    async fn kv_put(&self, request: Request<KvPutRequest>) -> Result<Response<KvPutReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let scope = KvScope::of(&principal, &request.namespace)?;
        let added =
            self.state.kv_put(&scope, &request.namespace, &request.key, request.value, request.overwrite).await?;
        Ok(Response::new(KvPutReply { added }))
    }

    async fn kv_get(&self, request: Request<KvGetRequest>) -> Result<Response<KvGetReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let scope = KvScope::of(&principal, &request.namespace)?;
        let value = self.state.kv_get(&scope, &request.namespace, &request.key).await?;
        Ok(Response::new(KvGetReply { value }))
    }

    async fn kv_del(&self, request: Request<KvDelRequest>) -> Result<Response<KvDelReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let scope = KvScope::of(&principal, &request.namespace)?;
        let deleted = self.state.kv_del(&scope, &request.namespace, &request.key, request.by_prefix).await?;
        Ok(Response::new(KvDelReply { deleted }))
    }

    async fn kv_keys(&self, request: Request<KvKeysRequest>) -> Result<Response<KvKeysReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let scope = KvScope::of(&principal, &request.namespace)?;
        let keys = self.state.kv_keys(&scope, &request.namespace, &request.prefix).await?;
        Ok(Response::new(KvKeysReply { keys }))
    }

    type GetPackageStream = Pin<Box<dyn Stream<Item = Result<PackageChunk, Status>> + Send + 'static>>;

    async fn get_package(
        &self,
        request: Request<GetPackageRequest>,
    ) -> Result<Response<Self::GetPackageStream>, Status> {
        // A package of the caller's own account (a node asks with the job's or the
        // submission's credential it was given).
        let principal = Principal::of(&request)?;
        let name = request.into_inner().name;
        let account = principal
            .account()
            .ok_or_else(|| Status::permission_denied(format!("{principal} has no account's packages to read")))?
            .to_string();
        // A job or a submission (whose credential a provider's node holds) reads only the
        // packages it ships; the account's key, any of the account's.
        let shipped = match &principal {
            Principal::Job { job, .. } => self.state.job(job).is_some_and(|info| {
                info.worker_command.and_then(|command| command.packages).is_some_and(|packages| {
                    Some(&packages.working_dir)
                        .into_iter()
                        .chain(&packages.py_modules)
                        .any(|uri| ionet_common::jobs::package_name_of_uri(uri).is_ok_and(|shipped| shipped == name))
                })
            }),
            Principal::Submission { id, nonce, .. } => self.submissions.ships(id, nonce, &name),
            _ => true,
        };
        if !shipped {
            return Err(Status::permission_denied(format!(
                "{principal} does not ship package {name}: a job reads the packages it runs with only"
            )));
        }
        let bytes = self.submissions.packages().read(&account, &name).await?;
        const CHUNK: usize = 1024 * 1024;
        let chunks: Vec<Result<PackageChunk, Status>> =
            bytes.chunks(CHUNK).map(|chunk| Ok(PackageChunk { data: chunk.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn has_package(&self, request: Request<GetPackageRequest>) -> Result<Response<HasPackageReply>, Status> {
        let account = crate::packages::own_account(&Principal::of(&request)?)?;
        let exists = self.submissions.packages().exists(&account, &request.into_inner().name)?;
        Ok(Response::new(HasPackageReply { exists }))
    }

    async fn put_package(
        &self,
        request: Request<tonic::Streaming<PutPackageRequest>>,
    ) -> Result<Response<PutPackageReply>, Status> {
        let account = crate::packages::own_account(&Principal::of(&request)?)?;
        let mut chunks = request.into_inner();
        let mut name = None;
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            if name.is_none() {
                ionet_common::jobs::checked_package_name(&chunk.name)?;
            }
            let named = name.get_or_insert_with(|| chunk.name.clone());
            if !chunk.name.is_empty() && chunk.name != *named {
                return Err(Status::invalid_argument(format!(
                    "an upload of package {named} went on as {}: one package per upload",
                    chunk.name
                )));
            }
            if (bytes.len() + chunk.data.len()) as u64 > ionet_common::jobs::MAX_PACKAGE_BYTES {
                return Err(ionet_common::IonetError::InvalidArgument(format!(
                    "package {named} is larger than {} MiB, the most a package may be: leave large files out \
                     (runtime_env excludes) and fetch them in the job",
                    ionet_common::jobs::MAX_PACKAGE_BYTES / (1024 * 1024)
                ))
                .into());
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let name = name.ok_or_else(|| Status::invalid_argument("an upload of a package carried no chunk"))?;
        self.submissions.packages().put(&account, &name, bytes.into()).await?;
        Ok(Response::new(PutPackageReply {}))
    }

    async fn add_task_events(
        &self,
        request: Request<AddTaskEventsRequest>,
    ) -> Result<Response<AddTaskEventsReply>, Status> {
        let principal = Principal::of(&request)?;
        let Principal::Job { job, account } = &principal else {
            return Err(Status::permission_denied(format!("{principal} owns no tasks to report")));
        };
        let request = request.into_inner();
        let batch = request.events.unwrap_or_default();
        let count = batch.task_ids.len() / ionet_common::TaskId::LEN;
        if count > crate::task_events::MAX_EVENTS_PER_REPORT {
            return Err(Status::invalid_argument(format!(
                "a report carries at most {} task events, not {count}",
                crate::task_events::MAX_EVENTS_PER_REPORT,
            )));
        }
        // A job reports its own tasks only.
        if !batch.task_ids.is_empty() && batch.job_id != job.as_bytes() {
            return Err(Status::permission_denied(format!(
                "job {job} may report its own tasks only, not those of job {}",
                hex::encode(&batch.job_id)
            )));
        }
        // Actors' creations are the head's to record (it places them): a report may not
        // speak for one.
        if let Some(at) = batch
            .task_ids
            .chunks_exact(ionet_common::TaskId::LEN)
            .position(ionet_common::TaskId::names_an_actor_creation)
        {
            return Err(Status::invalid_argument(format!(
                "event {at} names an actor's creation task (its id ends in eight 0xff bytes): the head records those"
            )));
        }
        // What a sender says it dropped is its word: bounded, so one report cannot make the
        // counter mean nothing.
        let dropped = request.dropped.min(crate::task_events::MAX_DROPPED_PER_REPORT);
        self.tasks.add(account, &batch, dropped).map_err(|why| {
            Status::invalid_argument(format!("a report of task events that does not hold together: {why}"))
        })?;
        Ok(Response::new(AddTaskEventsReply {}))
    }

    async fn list_tasks(&self, request: Request<ListTasksRequest>) -> Result<Response<ListTasksReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let state = TaskState::try_from(request.state).unwrap_or(TaskState::Unspecified);
        let limit = if request.limit == 0 { 10_000 } else { (request.limit as usize).min(10_000) };
        // A job's credential (a provider's node holds it) reads its own job's tasks only.
        let mut job_filter = request.job_id.clone();
        if let Principal::Job { job, .. } = &principal {
            if !job_filter.is_empty() && job_filter != job.as_bytes() {
                return Ok(Response::new(ListTasksReply::default()));
            }
            job_filter = job.to_vec();
        }
        let listing =
            self.tasks.list(|account| principal.sees_account(account), &job_filter, state, &request.name, limit);
        Ok(Response::new(ListTasksReply {
            tasks: listing.rows,
            total: listing.total,
            dropped_events: listing.dropped_events,
            forgotten_tasks: listing.forgotten_tasks,
        }))
    }

    async fn list_objects(&self, request: Request<ListObjectsRequest>) -> Result<Response<ListObjectsReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let mut job = match request.job_id.as_slice() {
            [] => None,
            bytes => Some(JobId::from_bytes(bytes)?),
        };
        let scope = match &principal {
            Principal::Admin => crate::objects::Scope::All,
            other => match other.account() {
                Some(account) if lists_for(other, account) => crate::objects::Scope::Account(account.to_string()),
                _ => return Ok(Response::new(ListObjectsReply::default())),
            },
        };
        // A job's credential (a provider's node holds it) reads its own job's objects only.
        if let Principal::Job { job: own, .. } = &principal {
            if job.is_some_and(|job| job != *own) {
                return Ok(Response::new(ListObjectsReply::default()));
            }
            job = Some(*own);
        }
        let limit = if request.limit == 0 { crate::objects::MAX_ROWS } else { request.limit as usize };
        Ok(Response::new(self.objects.list(&scope, job, limit).await))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = Principal::of(&request)?;
        let channels: Vec<Channel> =
            request.into_inner().channels.into_iter().filter_map(|raw| Channel::try_from(raw).ok()).collect();
        // A job's events (its driver, entrypoint, payer) reach its own account only.
        let visible = move |event: &ClusterEvent| match &event.event {
            Some(cluster_event::Event::JobStarted(job)) | Some(cluster_event::Event::JobFinished(job)) => {
                principal.sees_account(payer_account(job))
            }
            _ => true,
        };
        let stream = BroadcastStream::new(self.state.subscribe()).filter_map(move |item| match item {
            Ok(event) if wants(&channels, &event) && visible(&event) => Some(Ok(event)),
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Status::data_loss(format!(
                "subscriber fell behind and missed {missed} events: subscribe again and re-read the tables"
            )))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_cluster_info(
        &self,
        _request: Request<GetClusterInfoRequest>,
    ) -> Result<Response<GetClusterInfoReply>, Status> {
        Ok(Response::new(GetClusterInfoReply {
            cluster_id: self.state.cluster_id().to_string(),
            started_at_ms: self.state.started_at_ms(),
            heartbeat_interval_ms: self.state.config.heartbeat_interval_ms,
            heartbeat_timeout_ms: self.state.config.heartbeat_timeout_ms,
            incarnation: self.state.incarnation(),
        }))
    }

    async fn create_placement_group(
        &self,
        request: Request<CreatePlacementGroupRequest>,
    ) -> Result<Response<CreatePlacementGroupReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A group is reserved for (and billed to) the caller's own job.
        principal.may_act_for_job(&job_id_of(&request.job_id)?)?;
        let bundles =
            request.bundles.iter().map(|bundle| bundle.to_set()).collect::<ionet_common::IonetResult<Vec<_>>>()?;
        let strategy = strategy_from_wire(request.strategy)?;
        let order = if request.cheapest_first { NodeOrder::Cheapest } else { NodeOrder::Utilisation };
        let id = self
            .placement_groups
            .create_with_lifetime(bundles, strategy, request.name, request.job_id, request.detached, order)
            .await?;
        Ok(Response::new(CreatePlacementGroupReply { placement_group_id: id.to_vec() }))
    }

    async fn get_placement_group(
        &self,
        request: Request<GetPlacementGroupRequest>,
    ) -> Result<Response<GetPlacementGroupReply>, Status> {
        let principal = Principal::of(&request)?;
        let id = ionet_common::PlacementGroupId::from_bytes(&request.into_inner().placement_group_id)?;
        let group = self.placement_groups.get(&id)?;
        // Where a tenant's bundles are is its account's to know (and the operator's).
        principal.may_act_for_account(&self.account_of_group(&id))?;
        Ok(Response::new(group))
    }

    async fn list_placement_groups(
        &self,
        request: Request<ListPlacementGroupsRequest>,
    ) -> Result<Response<ListPlacementGroupsReply>, Status> {
        let principal = Principal::of(&request)?;
        let mut groups = self.placement_groups.list();
        groups.retain(|group| {
            ionet_common::PlacementGroupId::from_bytes(&group.placement_group_id)
                .is_ok_and(|id| lists_for(&principal, &self.account_of_group(&id)))
        });
        Ok(Response::new(ListPlacementGroupsReply { groups }))
    }

    async fn remove_placement_group(
        &self,
        request: Request<RemovePlacementGroupRequest>,
    ) -> Result<Response<RemovePlacementGroupReply>, Status> {
        let principal = Principal::of(&request)?;
        let id = ionet_common::PlacementGroupId::from_bytes(&request.into_inner().placement_group_id)?;
        // A tenant's jobs remove the tenant's groups only (a detached named group is
        // shared between one account's drivers, as in Ray).
        let owner = self
            .placement_groups
            .job_of(&id)
            .ok_or_else(|| Status::not_found(format!("placement group {} does not exist", id.short())))?;
        principal.may_act_for_account(&self.state.payer_of(&job_id_of(&owner)?))?;
        // What a submitted job's entrypoint holds (metered) ends with its submission only.
        if self.placement_groups.is_pinned(&id) && principal != Principal::Admin {
            return Err(Status::permission_denied(format!(
                "placement group {} holds a submitted job's entrypoint: it ends with the submission",
                id.short()
            )));
        }
        self.placement_groups.remove(&id).await?;
        Ok(Response::new(RemovePlacementGroupReply {}))
    }

    async fn create_actor(&self, request: Request<CreateActorRequest>) -> Result<Response<CreateActorReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let spec = request.spec.ok_or_else(|| Status::invalid_argument("CreateActor without a spec"))?;
        // An actor is created for the caller's own job (and billed to it).
        principal.may_act_for_job(&job_id_of(&spec.job_id)?)?;
        let actor = self.actors.create(spec, request.get_if_exists).await?;
        // `get_if_exists` finds a live actor by name: only one of the caller's account.
        principal.may_act_for_account(&self.account_of_actor(&actor))?;
        Ok(Response::new(CreateActorReply { actor: Some(actor) }))
    }

    async fn get_actor(&self, request: Request<GetActorRequest>) -> Result<Response<GetActorReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // Where an actor runs is its account's to know (and the operator's).
        principal.may_act_for_account(&self.account_of_actor(&self.actors.get(&request.actor_id)?))?;
        let actor = if request.timeout_ms == 0 {
            self.actors.get(&request.actor_id)?
        } else {
            let timeout = std::time::Duration::from_millis(request.timeout_ms.min(MAX_ACTOR_WAIT_MS));
            self.actors.wait(&request.actor_id, request.wait_newer_than, timeout).await?
        };
        Ok(Response::new(GetActorReply { actor: Some(actor) }))
    }

    type WatchActorsStream = Pin<Box<dyn Stream<Item = Result<WatchActorsReply, Status>> + Send + 'static>>;

    async fn watch_actors(
        &self,
        request: Request<tonic::Streaming<WatchActorsRequest>>,
    ) -> Result<Response<Self::WatchActorsStream>, Status> {
        let principal = Principal::of(&request)?;
        // Admitted by the credential it opened with: ended once its time is up, and opened
        // again (with that process's credential as it is then).
        let until = tokio::time::Instant::now() + Duration::from_millis(self.state.config.heartbeat_stream_lifetime_ms);
        let mut incoming = request.into_inner();
        let (replies, rows) = tokio::sync::mpsc::channel(FOLLOWED_ROWS_BUFFERED);
        let service = self.clone();
        // Reads what to follow; each actor followed is a task sending its rows, which says
        // when it ends (by its number: a task replaced by a later follow of the same actor
        // must not drop the new one). The stream ending (its time up, or the head
        // stopping) ends them all.
        tokio::spawn(async move {
            let mut followed: HashMap<Vec<u8>, (u64, tokio::task::AbortHandle)> = HashMap::new();
            let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, u64)>();
            let mut stopped = service.stopped.clone();
            let mut started = 0u64;
            loop {
                let request = tokio::select! {
                    next = incoming.message() => match next {
                        Ok(Some(request)) => request,
                        Ok(None) | Err(_) => break,
                    },
                    Some((actor_id, ending)) = endings.recv() => {
                        if followed.get(&actor_id).is_some_and(|(current, _)| *current == ending) {
                            followed.remove(&actor_id);
                        }
                        continue;
                    }
                    _ = stopped.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep_until(until) => break,
                };
                if let Some((_, following)) = followed.remove(&request.actor_id) {
                    following.abort();
                }
                if request.stop {
                    continue;
                }
                let allowed = if followed.len() >= MAX_FOLLOWED_PER_STREAM {
                    Err(Status::resource_exhausted(format!(
                        "a stream follows at most {MAX_FOLLOWED_PER_STREAM} actors at once"
                    )))
                } else {
                    // Where an actor runs is its account's to know (and the operator's).
                    service.actors.get(&request.actor_id).map_err(Status::from).and_then(|actor| {
                        principal.may_act_for_account(&service.account_of_actor(&actor))?;
                        ActorId::from_bytes(&request.actor_id).map_err(Status::from)
                    })
                };
                let id = match allowed {
                    Ok(id) => id,
                    Err(status) => {
                        if replies.send(Ok(refused(request.actor_id, &status))).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                started += 1;
                let number = started;
                let (actors, replies, ended) = (service.actors.clone(), replies.clone(), ended.clone());
                let following = tokio::spawn(async move {
                    actors
                        .follow(id, |row| {
                            let reply = match row {
                                Ok(actor) => {
                                    WatchActorsReply { actor_id: id.to_vec(), actor: Some(actor), error: String::new() }
                                }
                                Err(err) => refused(id.to_vec(), &Status::from(err)),
                            };
                            let replies = replies.clone();
                            async move { replies.send(Ok(reply)).await.is_ok() }
                        })
                        .await;
                    let _ = ended.send((id.to_vec(), number));
                });
                followed.insert(request.actor_id, (number, following.abort_handle()));
            }
            for (_, following) in followed.into_values() {
                following.abort();
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rows))))
    }

    async fn get_named_actor(&self, request: Request<GetNamedActorRequest>) -> Result<Response<GetActorReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A tenant finds its own account's names; the operator any.
        let account = match &principal {
            Principal::Job { account, .. } => Some(account.as_ref()),
            _ => None,
        };
        let actor = self.actors.get_named(account, &request.name, &request.namespace)?;
        principal.may_act_for_account(&self.account_of_actor(&actor))?;
        Ok(Response::new(GetActorReply { actor: Some(actor) }))
    }

    async fn list_actors(&self, request: Request<ListActorsRequest>) -> Result<Response<ListActorsReply>, Status> {
        let principal = Principal::of(&request)?;
        let mut actors = self.actors.list(request.into_inner().include_dead);
        actors.retain(|actor| lists_for(&principal, &self.account_of_actor(actor)));
        Ok(Response::new(ListActorsReply { actors }))
    }

    async fn create_token(&self, request: Request<CreateTokenRequest>) -> Result<Response<CreateTokenReply>, Status> {
        let request = request.into_inner();
        let role: Role = request.role.parse().map_err(|err: ionet_common::IonetError| Status::from(err))?;
        let (default_ttl, max_ttl) = match role {
            Role::Join => (DEFAULT_JOIN_TTL, MAX_JOIN_TTL),
            Role::Account | Role::Metrics | Role::NodeMetrics => (DEFAULT_ACCOUNT_TTL, MAX_ACCOUNT_TTL),
            other => {
                return Err(Status::invalid_argument(format!(
                    "tokens are made for joining nodes (`node`), accounts (`account`) and metrics scrapers (`metrics`, `node-metrics`); the {other} credential is the head's to write"
                )))
            }
        };
        let ttl = match request.ttl_seconds {
            0 => default_ttl,
            seconds => Duration::from_secs(seconds),
        };
        if ttl > max_ttl {
            return Err(Status::invalid_argument(format!(
                "a {role} token lives at most {} days; asked for {} s",
                max_ttl.as_secs() / 86_400,
                ttl.as_secs()
            )));
        }
        let token = match role {
            Role::Account => {
                let account = request.account.trim();
                if account == "default" {
                    return Err(Status::invalid_argument(
                        "the account `default` is the operator's own jobs' payer; name the tenant's account",
                    ));
                }
                if account.is_empty() || account.len() > 128 || account.chars().any(char::is_control) {
                    return Err(Status::invalid_argument(format!(
                        "an account is named by printable text of 1 to 128 bytes, not {:?}",
                        request.account
                    )));
                }
                self.issuer.issue_account(account, ttl)
            }
            _ => self.issuer.issue(role, ttl),
        };
        let claims = self.issuer.verifier().verify(token.as_bytes()).map_err(Status::internal)?;
        tracing::info!(role = %role, expires_at = claims.expires_at, "issued a token");
        Ok(Response::new(CreateTokenReply { token, expires_at: claims.expires_at }))
    }

    async fn kill_actor(&self, request: Request<KillActorRequest>) -> Result<Response<KillActorReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A tenant's jobs kill the tenant's actors only (its named actors are shared
        // between its drivers, as in Ray; another tenant's are not reachable).
        let actor = self.actors.get(&request.actor_id)?;
        let owner = job_id_of(&actor.spec.unwrap_or_default().job_id)?;
        principal.may_act_for_account(&self.state.payer_of(&owner))?;
        self.actors.kill(&request.actor_id, request.no_restart).await?;
        Ok(Response::new(KillActorReply {}))
    }
}

#[cfg(test)]
mod news_tests {
    use super::*;

    fn reply(unfunded: &[&[u8]], version: u64) -> HeartbeatReply {
        HeartbeatReply {
            incarnation: 7,
            unfunded_jobs: unfunded
                .iter()
                .map(|job| UnfundedJob { job_id: job.to_vec(), reason: "its account is empty".into() })
                .collect(),
            view: Some(NodeRows { version, incarnation: 7, delta: true, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_quiet_heartbeat_is_answered_only_with_news() {
        let none: &[&[u8]] = &[];
        let quiet = reply(none, 3);
        let empty = Vec::new();
        assert!(!has_news(&quiet, (7, 3), Some(&empty)), "nothing new");
        assert!(has_news(&quiet, (7, 3), None), "the stream's first reply carries the set");
        assert!(has_news(&quiet, (7, 2), Some(&empty)), "the table moved on");
        assert!(has_news(&quiet, (6, 3), Some(&empty)), "another incarnation's view");
        let listed = reply(&[b"job-1"], 3);
        assert!(has_news(&listed, (7, 3), Some(&empty)), "a job newly unfunded");
        assert!(!has_news(&listed, (7, 3), Some(&listed.unfunded_jobs)), "the same set again");
        assert!(has_news(&quiet, (7, 3), Some(&listed.unfunded_jobs)), "funded again: the empty set");
        let reason = reply(&[b"job-1"], 3).unfunded_jobs;
        let mut other = reason.clone();
        other[0].reason = "another reason".into();
        assert!(has_news(&listed, (7, 3), Some(&other)), "a new reason is news");
        let check = HeartbeatReply { gpu_check_due: true, ..quiet.clone() };
        assert!(has_news(&check, (7, 3), Some(&empty)), "a GPU check");
        let renewed = HeartbeatReply { node_credential: "renewed".into(), ..quiet.clone() };
        assert!(has_news(&renewed, (7, 3), Some(&empty)), "a credential");
        let whole = HeartbeatReply {
            view: Some(NodeRows { version: 3, incarnation: 7, delta: false, ..Default::default() }),
            ..quiet
        };
        assert!(has_news(&whole, (7, 3), Some(&empty)), "a whole table");
    }
}
