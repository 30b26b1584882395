//! The node daemon: one per machine. It serves its own gRPC endpoint, registers with
//! the control store, heartbeats its available resources, and drains on shutdown.
//!
//! Connection protocol with the control store:
//! 1. `RegisterNode` until it succeeds, backing off (with jitter) from
//!    `reconnect_initial_backoff_ms` up to `reconnect_max_backoff_ms`.
//! 2. A heartbeat each interval its available resources changed, and every quarter of
//!    the head's timeout otherwise, on a `HeartbeatStream` (by `Heartbeat` calls with a
//!    head that has none); sent `quiet`, but for a stream's first and one a timeout, so
//!    the head answers only with news, read as it comes. A heartbeat the head cannot
//!    place (`NOT_FOUND`: a head restarted without storage; `FAILED_PRECONDITION`:
//!    declared dead while away), or whose reply carries another incarnation than the
//!    registration's (the head restarted between two heartbeats), goes straight back to
//!    step 1. A transport failure (head away) also goes back to step 1 after the
//!    backoff, so a restarted head learns the node's current record.
//! 3. On notice to leave ([`NodeDaemon::drain`], SIGTERM): `DrainNode` (no new work; the
//!    daemon grants nothing more, stops its actors' workers, lets running tasks finish
//!    until the deadline), then on shutdown `DrainNode { exiting }` (gone). Both are best
//!    effort: a daemon whose head is away still exits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ionet_common::auth::Bearer;
use ionet_common::auth::SharedCredential;
use ionet_common::authz::{Authorizer, Principal};
use ionet_common::config::ClusterConfig;
use ionet_common::credential::{registration_message, KeyPair, Verifier};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState, ResourceQuantities};
use ionet_common::rpc::proto::gcs::GetAllNodesRequest;
use ionet_common::rpc::proto::gcs::{
    DrainNodeRequest, GetObjectMovesRequest, HeartbeatReply, HeartbeatRequest, ObjectMove, ObjectsMovedRequest,
    RegisterNodeRequest,
};
use ionet_common::rpc::proto::node::node_manager_server::{NodeManager, NodeManagerServer};
use ionet_common::rpc::proto::node::{
    AddObjectLocationReply, AddObjectLocationRequest, CancelBundleReply, CancelBundleRequest, CommitBundleReply,
    CommitBundleRequest, CreateObjectReply, CreateObjectRequest, DrainReply, DrainRequest, EndLeasesReply,
    EndLeasesRequest, EnsureObjectLocalReply, EnsureObjectLocalRequest, FreeObjectsReply, FreeObjectsRequest,
    GetNodeStatsReply, GetNodeStatsRequest, IssueCertificateReply, IssueCertificateRequest, ListNodeObjectsReply,
    ListNodeObjectsRequest, LogBatch, PrepareBundleReply, PrepareBundleRequest, RegisterWorkerReply,
    RegisterWorkerRequest, RequestWorkerLeaseReply, RequestWorkerLeaseRequest, ReturnWorkerLeaseReply,
    ReturnWorkerLeaseRequest, SealObjectReply, SealObjectRequest, SetWorkerBlockedReply, SetWorkerBlockedRequest,
    SetWorkerHoldingReply, SetWorkerHoldingRequest, StreamLogsRequest, TakeObjectsReply, TakeObjectsRequest,
};
use ionet_common::rpc::proto::node::{
    EntrypointEvent, RunEntrypointRequest, StopEntrypointReply, StopEntrypointRequest,
};
use ionet_common::rpc::{self, GcsClient};
use ionet_common::{tls, IonetError, IonetResult, JobId, NodeId, ResourceSet};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use crate::entrypoints::{EntrypointSetting, Entrypoints};
use crate::identities::WorkerIdentities;
use crate::lease::{Leases, WorkerPoolOptions};
use crate::node_spec::NodeSpec;
use crate::objects::NodeObjects;
use crate::packages::PackageCache;

pub struct NodeDaemonOptions {
    pub gcs_address: String,
    /// What the node first registers with: a join token the operator made
    /// (`ionet token create --role node`), or the admin credential on the operator's own
    /// machines. Afterwards the node speaks to the head with the node credential the
    /// head issues it.
    pub join_credential: Bearer,
    /// The node's own key pair: the head binds the node's id to it at registration.
    pub node_key: KeyPair,
    pub config: ClusterConfig,
    pub spec: NodeSpec,
    /// Host the node's own server binds to.
    pub bind_host: String,
    /// Port of the node's own server (0: any free one). A fixed port lets a restarted
    /// daemon come back at the address its drivers and the cluster already know.
    pub port: u16,
    /// Host other processes use to reach this node.
    pub advertise_host: String,
    pub is_head: bool,
    /// Whether the node takes leases at all. The head's own daemon does not when the head
    /// holds the payout keypair, unless the operator allows it (`--allow-head-workloads`):
    /// the process holding the money runs no tenant code.
    pub runs_workloads: bool,
    pub workers: WorkerPoolOptions,
    /// Bytes of shared memory for the object store; 0: 30% of the machine's memory.
    pub object_store_capacity: u64,
    /// Who jobs' workers run as: a uid per job and a gid per account (a daemon running
    /// as root); `None`: as the daemon's own user.
    pub worker_identities: Option<Arc<WorkerIdentities>>,
    /// The cluster CA (PEM) when the cluster speaks TLS: the node then serves TLS only,
    /// under the certificate the head issues it at registration, and its workers too.
    pub cluster_ca: Option<String>,
    /// Serve Prometheus metrics on this port (0: a free one) of `bind_host`
    /// ([`crate::node_metrics`]); `None`: no metrics server.
    pub metrics_port: Option<u16>,
    /// Whether the node keeps a view of the cluster (for spillback; every real node
    /// does). The cluster simulator runs most of its nodes without one: a view is the
    /// size of the cluster, and thousands of them do not fit one machine.
    pub keeps_view: bool,
}

/// How often a job's output is read for a driver following it (`StreamLogs`).
const LOG_PASS: Duration = Duration::from_millis(100);
/// A node serving TLS: what signs its certificates, and what its server presents.
struct NodeTls {
    authority: tls::NodeAuthority,
    certificate: Arc<tls::ServerCert>,
}

/// Shared state of a running node daemon.
struct NodeShared {
    node_id: NodeId,
    info: NodeInfo,
    node_key: KeyPair,
    /// What the node presents to the head: the join credential, then its node credential.
    credential: SharedCredential,
    join_credential: Bearer,
    /// The node's own server's authorizer: it learns the head's key at registration.
    authorizer: Authorizer,
    leases: Arc<Leases>,
    objects: Arc<NodeObjects>,
    started: Instant,
    connected: AtomicBool,
    registrations: AtomicU64,
    /// The last check of the node's GPUs: the head's verdict or why there is none (`None`
    /// until one ends; nodes without GPUs have none).
    gpu_check: std::sync::Mutex<Option<Result<ionet_common::rpc::proto::common::GpuCheck, String>>>,
    gpu_check_running: AtomicBool,
    /// Whether it reads the node table for a view (see [`NodeDaemonOptions::keeps_view`]).
    keeps_view: bool,
    /// Heartbeats the head took (a metric).
    heartbeats_sent: AtomicU64,
    tls: Option<NodeTls>,
    /// Woken when the node starts draining: the membership loop tells the head.
    drain_requested: tokio::sync::Notify,
    /// Set once the head has heard the node is draining.
    drain_told: AtomicBool,
    /// The operator's notice to leave (`Drain`): its deadline (zero: the node's own) and why.
    notice: watch::Sender<Option<(Duration, String)>>,
    /// Submitted jobs' entrypoints running here.
    entrypoints: Entrypoints,
    /// Their directories and the unpacked packages (removed when the daemon ends).
    _scratch: tempfile::TempDir,
    /// Locked while the daemon runs: the scratch directory is in use ([`remove_dead_scratch`]).
    _scratch_lock: std::fs::File,
}

impl NodeShared {
    fn available(&self) -> ResourceSet {
        self.leases.available()
    }
}

/// The longest notice to leave a node takes.
const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// A running node daemon.
pub struct NodeDaemon {
    shared: Arc<NodeShared>,
    address: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct NodeManagerService {
    shared: Arc<NodeShared>,
    /// Turns true when the daemon stops: its streams end then.
    stopped: watch::Receiver<bool>,
}

impl NodeManagerService {
    /// Where the head says object `id` went from the node at `from` (one that left),
    /// when that is a node of this cluster.
    async fn moved_to(&self, from: &str, id: &[u8]) -> Option<String> {
        let mut head = self.shared.leases.control_store()?;
        let request = GetObjectMovesRequest { from_address: from.to_string(), object_ids: vec![id.to_vec()] };
        let reply = head.get_object_moves(request).await.ok()?.into_inner();
        let holder = reply.holder_addresses.into_iter().next().filter(|holder| !holder.is_empty())?;
        self.shared.leases.is_node_address(&holder).await.then_some(holder)
    }
}

#[tonic::async_trait]
impl NodeManager for NodeManagerService {
    async fn get_node_stats(
        &self,
        _request: Request<GetNodeStatsRequest>,
    ) -> Result<Response<GetNodeStatsReply>, Status> {
        let mut node = self.shared.info.clone();
        node.available = Some(ResourceQuantities::from_set(&self.shared.available()));
        node.state = NodeState::Alive as i32;
        Ok(Response::new(GetNodeStatsReply {
            node: Some(node),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            connected_to_gcs: self.shared.connected.load(Ordering::SeqCst),
            registrations: self.shared.registrations.load(Ordering::SeqCst),
            object_store_dir: self.shared.objects.dir(),
            nodes_in_view: self.shared.leases.nodes_in_view() as u32,
            view_sampled: self.shared.leases.view_is_sampled(),
        }))
    }

    async fn create_object(
        &self,
        request: Request<CreateObjectRequest>,
    ) -> Result<Response<CreateObjectReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        self.shared.objects.create(&request.object_id, request.size, &principal, &request.owner_address).await?;
        Ok(Response::new(CreateObjectReply {}))
    }

    async fn seal_object(&self, request: Request<SealObjectRequest>) -> Result<Response<SealObjectReply>, Status> {
        let principal = Principal::of(&request)?;
        self.shared.objects.seal(&request.into_inner().object_id, &principal).await?;
        Ok(Response::new(SealObjectReply {}))
    }

    async fn ensure_object_local(
        &self,
        request: Request<EnsureObjectLocalRequest>,
    ) -> Result<Response<EnsureObjectLocalReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // The node pulls with its own credential: only from a node of this cluster.
        let source = &request.source_address;
        let known = source.is_empty() || self.shared.leases.is_node_address(source).await;
        let first = if known {
            self.shared.objects.ensure_local(&request.object_id, source, &principal).await
        } else {
            Err(IonetError::InvalidArgument(format!("{source} is not a node of this cluster to pull from")))
        };
        match first {
            // The node that held it may have left, moving it: the head knows where.
            Err(IonetError::ObjectLost(_) | IonetError::InvalidArgument(_)) if !source.is_empty() => {
                let Some(holder) = self.moved_to(source, &request.object_id).await else {
                    return Err(first.unwrap_err().into());
                };
                self.shared.objects.ensure_local(&request.object_id, &holder, &principal).await?;
            }
            result => result?,
        }
        Ok(Response::new(EnsureObjectLocalReply {}))
    }

    async fn add_object_location(
        &self,
        request: Request<AddObjectLocationRequest>,
    ) -> Result<Response<AddObjectLocationReply>, Status> {
        let request = request.into_inner();
        // Freeing the object calls the holder with this node's credential: a node only.
        if !self.shared.leases.is_node_address(&request.holder_address).await {
            return Err(Status::invalid_argument(format!("{} is not a node of this cluster", request.holder_address)));
        }
        self.shared.objects.add_location(&request.object_id, request.holder_address)?;
        Ok(Response::new(AddObjectLocationReply {}))
    }

    async fn list_objects(
        &self,
        request: Request<ListNodeObjectsRequest>,
    ) -> Result<Response<ListNodeObjectsReply>, Status> {
        // The head's ask of this node (minted for it alone), or the operator.
        match Principal::of(&request)? {
            Principal::Admin => {}
            Principal::Inspect(node) if node == self.shared.node_id => {}
            other => {
                return Err(Status::permission_denied(format!(
                    "{other} may not list what node {} holds",
                    self.shared.node_id.short()
                )))
            }
        }
        let request = request.into_inner();
        let account = (!request.account.is_empty()).then_some(request.account.as_str());
        let limit = match request.limit {
            0 => 10_000,
            limit => limit.min(10_000),
        };
        let (objects, truncated) = self.shared.objects.listing(account, limit as usize);
        // Within the head's own bound on this answer.
        let workers = self.shared.leases.worker_references(account, limit, Duration::from_secs(2)).await;
        Ok(Response::new(ListNodeObjectsReply { objects, truncated, workers }))
    }

    async fn free_objects(&self, request: Request<FreeObjectsRequest>) -> Result<Response<FreeObjectsReply>, Status> {
        let principal = Principal::of(&request)?;
        let (freed, taken) = self.shared.objects.free(&request.into_inner().object_ids, &principal).await?;
        if !taken.is_empty() {
            // Objects this node took from one that left: the head forgets where they went.
            if let Some(mut head) = self.shared.leases.control_store() {
                let request = ObjectsMovedRequest {
                    node_id: self.shared.node_id.to_vec(),
                    moves: taken
                        .iter()
                        .map(|id| ObjectMove { object_id: id.to_vec(), holder_address: String::new() })
                        .collect(),
                    forget: true,
                };
                tokio::spawn(async move {
                    let _ = head.objects_moved(request).await;
                });
            }
        }
        Ok(Response::new(FreeObjectsReply { freed }))
    }

    async fn request_worker_lease(
        &self,
        request: Request<RequestWorkerLeaseRequest>,
    ) -> Result<Response<RequestWorkerLeaseReply>, Status> {
        // A job leases workers for itself only (its usage is billed to its account), with
        // its own credential: the workers started for it are given that credential.
        let principal = Principal::of(&request)?;
        let job = JobId::from_bytes(&request.get_ref().job_id)?;
        match &principal {
            Principal::Job { job: own, .. } if *own == job => {}
            other => {
                return Err(Status::permission_denied(format!(
                    "{other} may not lease workers for job {job}: a lease is asked with the job's own credential"
                )))
            }
        }
        let credential =
            Bearer::of(&request).ok_or_else(|| Status::unauthenticated("the call carries no credential"))?;
        let Principal::Job { account, .. } = principal else { unreachable!("checked above") };
        Ok(Response::new(self.shared.leases.request(request.into_inner(), credential, account).await?))
    }

    async fn return_worker_lease(
        &self,
        request: Request<ReturnWorkerLeaseRequest>,
    ) -> Result<Response<ReturnWorkerLeaseReply>, Status> {
        // A job returns its own leases (the head returns actors').
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.may_act_for_job(&self.shared.leases.job_of_lease(&request.lease_id)?)?;
        self.shared.leases.return_lease(&request.lease_id, request.worker_failed)?;
        Ok(Response::new(ReturnWorkerLeaseReply {}))
    }

    async fn take_objects(&self, request: Request<TakeObjectsRequest>) -> Result<Response<TakeObjectsReply>, Status> {
        // A peer node (the authorization table) that is leaving: its objects are pulled
        // from it, so the source is the caller itself, as the cluster knows it.
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let caller = match &principal {
            Principal::Node(node) => self.shared.leases.node_address(node).await,
            _ => None,
        };
        if caller.as_deref() != Some(request.source_address.as_str()) {
            return Err(Status::permission_denied(format!(
                "{principal} may not hand over objects from {}: a node hands over its own",
                request.source_address
            )));
        }
        if request.objects.len() > 100_000 {
            return Err(Status::invalid_argument("at most 100000 objects may be taken in one call"));
        }
        // The view was refreshed for the caller if it needed to be: copies are checked
        // against it as it is (one look-up per copy would outlast a drain's deadline; a
        // sampled view looks up the holders it does not know, a thousand a call).
        let holders = request.objects.iter().flat_map(|object| object.copies.iter());
        self.shared.leases.look_up_addresses(holders).await;
        let leases = self.shared.leases.clone();
        let taken = self
            .shared
            .objects
            .take(&request.source_address, request.objects, |holder| leases.knows_node_address(holder))
            .await;
        Ok(Response::new(TakeObjectsReply { taken: taken.iter().map(|id| id.to_vec()).collect() }))
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        // The operator's admin credential only (the authorization table).
        let request = request.into_inner();
        let reason =
            if request.reason.trim().is_empty() { "notice from the operator".to_string() } else { request.reason };
        // At most a day: a longer notice is no notice (and no instant overflows).
        let deadline = Duration::from_millis(request.deadline_ms).min(MAX_DRAIN_DEADLINE);
        tracing::info!(node = %self.shared.node_id.short(), ?deadline, %reason, "notice to leave");
        self.shared.notice.send_replace(Some((deadline, reason)));
        Ok(Response::new(DrainReply {}))
    }

    async fn end_leases(&self, request: Request<EndLeasesRequest>) -> Result<Response<EndLeasesReply>, Status> {
        // The head's control credential only (the authorization table): it ends leases
        // whose holders gave them back.
        let request = request.into_inner();
        if request.lease_ids.len() > 100_000 {
            return Err(Status::invalid_argument("at most 100000 leases may be ended in one call"));
        }
        let ended = self.shared.leases.end_leases(&request.lease_ids, &request.reason)?;
        Ok(Response::new(EndLeasesReply { ended }))
    }

    async fn prepare_bundle(
        &self,
        request: Request<PrepareBundleRequest>,
    ) -> Result<Response<PrepareBundleReply>, Status> {
        let request = request.into_inner();
        let resources = request.resources.unwrap_or_default().to_set()?;
        self.shared.leases.prepare_bundle(
            &request.placement_group_id,
            request.bundle_index,
            &request.job_id,
            resources,
        )?;
        Ok(Response::new(PrepareBundleReply {}))
    }

    async fn commit_bundle(
        &self,
        request: Request<CommitBundleRequest>,
    ) -> Result<Response<CommitBundleReply>, Status> {
        let request = request.into_inner();
        self.shared.leases.commit_bundle(&request.placement_group_id, request.bundle_index)?;
        Ok(Response::new(CommitBundleReply {}))
    }

    async fn cancel_bundle(
        &self,
        request: Request<CancelBundleRequest>,
    ) -> Result<Response<CancelBundleReply>, Status> {
        let request = request.into_inner();
        self.shared.leases.cancel_bundle(&request.placement_group_id, request.bundle_index)?;
        Ok(Response::new(CancelBundleReply {}))
    }

    async fn set_worker_blocked(
        &self,
        request: Request<SetWorkerBlockedRequest>,
    ) -> Result<Response<SetWorkerBlockedReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.may_act_for_job(&self.shared.leases.job_of_worker(&request.worker_id)?)?;
        self.shared.leases.set_worker_blocked(&request.worker_id, request.blocked)?;
        Ok(Response::new(SetWorkerBlockedReply {}))
    }

    type StreamLogsStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<LogBatch, Status>> + Send>>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let job = JobId::from_bytes(&request.job_id)?;
        principal.may_act_for_job(&job)?;
        let leases = self.shared.leases.clone();
        // One worker's (an actor's) output only: its pid's file.
        let only = if request.worker_address.is_empty() {
            None
        } else {
            Some(leases.pid_of_worker_at(job, &request.worker_address).ok_or_else(|| {
                Status::not_found(format!(
                    "no worker of job {job} serves at {} on this node (it ended, or runs elsewhere)",
                    request.worker_address
                ))
            })?)
        };
        let (batches, stream) = tokio::sync::mpsc::channel(4);
        // The stream ends when the daemon stops (else its server would wait for it).
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let mut tail = crate::logs::JobTail::default();
            let mut pass = tokio::time::interval(LOG_PASS);
            pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if *stopped.borrow() {
                    return;
                }
                tokio::select! {
                    _ = pass.tick() => {}
                    _ = stopped.changed() => return,
                }
                let mut files = leases.job_log_files(job);
                if let Some(pid) = only {
                    files.retain(|(file_pid, _)| *file_pid == pid);
                }
                let Ok((read, (lines, caught_up))) = tokio::task::spawn_blocking(move || {
                    let passed = tail.pass(&files);
                    (tail, passed)
                })
                .await
                else {
                    return;
                };
                tail = read;
                // An empty batch says "nothing new as of this pass" (a driver that stops
                // waits for one).
                if batches.send(Ok(LogBatch { lines, caught_up })).await.is_err() {
                    return; // the driver went away
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }

    async fn set_worker_holding(
        &self,
        request: Request<SetWorkerHoldingRequest>,
    ) -> Result<Response<SetWorkerHoldingReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.may_act_for_job(&self.shared.leases.job_of_worker(&request.worker_id)?)?;
        self.shared.leases.set_worker_holding(&request.worker_id, request.holding)?;
        Ok(Response::new(SetWorkerHoldingReply {}))
    }

    type RunEntrypointStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<EntrypointEvent, Status>> + Send>>;

    async fn run_entrypoint(
        &self,
        request: Request<RunEntrypointRequest>,
    ) -> Result<Response<Self::RunEntrypointStream>, Status> {
        // The head's control credential only (the authorization table).
        let request = request.into_inner();
        if self.shared.info.no_workloads {
            return Err(Status::failed_precondition("this node runs no tenant code (it holds the payout keypair)"));
        }
        let id = request.submission_id.clone();
        let mut events = self.shared.entrypoints.run(request, &self.shared.authorizer).await?;
        let (sender, stream) = tokio::sync::mpsc::channel(16);
        // The stream ends when the daemon stops (the entrypoint dies with it).
        let mut stopped = self.stopped.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                if *stopped.borrow() {
                    shared.entrypoints.stop(&id);
                    let _ = sender.send(Err(Status::unavailable("the node daemon is stopping"))).await;
                    return;
                }
                tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => if sender.send(Ok(event)).await.is_err() { return },
                        None => return,
                    },
                    changed = stopped.changed() => if changed.is_err() {
                        shared.entrypoints.stop(&id);
                        return;
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
    }

    async fn stop_entrypoint(
        &self,
        request: Request<StopEntrypointRequest>,
    ) -> Result<Response<StopEntrypointReply>, Status> {
        // The head's control credential only (the authorization table).
        let stopped = self.shared.entrypoints.stop(&request.into_inner().submission_id);
        Ok(Response::new(StopEntrypointReply { stopped }))
    }

    async fn issue_certificate(
        &self,
        request: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateReply>, Status> {
        let tls = self.shared.tls.as_ref().ok_or_else(|| {
            Status::failed_precondition("this node does not speak TLS: its processes serve plain on loopback")
        })?;
        // Certificates for this node's address go to processes on this machine alone.
        let peer = request.remote_addr().map(|peer| peer.ip());
        if !peer.is_some_and(|peer| tls.authority.is_local(peer)) {
            return Err(Status::permission_denied(format!(
                "a certificate of this node is for the processes on its machine, not for {}",
                peer.map(|peer| peer.to_string()).unwrap_or_else(|| "a caller of unknown address".into())
            )));
        }
        let chain = tls.authority.issue(&request.into_inner().public_key)?;
        Ok(Response::new(IssueCertificateReply { chain }))
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerReply>, Status> {
        // A worker registers as the job it was started for.
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        principal.may_act_for_job(&self.shared.leases.job_of_worker(&request.worker_id)?)?;
        self.shared.leases.register_worker(&request.worker_id, request.address)?;
        Ok(Response::new(RegisterWorkerReply { node_id: self.shared.node_id.to_vec() }))
    }
}

/// Serves the node's metrics ([`crate::node_metrics`]) on `listener` until `stopped`:
/// over TLS with the node's certificate when the cluster speaks TLS.
fn serve_metrics(
    shared: &Arc<NodeShared>,
    listener: TcpListener,
    stopped: watch::Receiver<bool>,
) -> IonetResult<tokio::task::JoinHandle<()>> {
    let local = listener.local_addr()?;
    let incoming = rpc::incoming_http(listener, shared.tls.as_ref().map(|tls| &tls.certificate))?;
    let reader = Arc::downgrade(shared);
    let gpus: Vec<(u32, String)> = shared.info.gpus.iter().map(|gpu| (gpu.index, gpu.model.clone())).collect();
    // The GPUs' own readings where an NVIDIA driver is (opened once; asked each scrape).
    let monitor = match crate::gpu::GpuMonitor::open(&shared.info.gpus) {
        Ok(monitor) => Some(Arc::new(monitor)),
        Err(why) => {
            if !shared.info.gpus.is_empty() {
                tracing::info!(%why, "GPU use is not read from the hardware; each GPU's leased share is shown");
            }
            None
        }
    };
    let read = Arc::new(move || {
        let Some(shared) = reader.upgrade() else { return crate::node_metrics::NodeReadings::default() };
        let indices: Vec<u32> = gpus.iter().map(|(index, _)| *index).collect();
        crate::node_metrics::NodeReadings {
            leases: shared.leases.readings(&indices),
            total: shared.info.total.clone().unwrap_or_default().to_set().unwrap_or_default(),
            store: shared.objects.store.stats(),
            gpus: gpus.clone(),
            gpu_use: monitor.as_ref().map(|monitor| monitor.read()).unwrap_or_default(),
            heartbeats_sent: shared.heartbeats_sent.load(Ordering::Relaxed),
            registrations: shared.registrations.load(Ordering::Relaxed),
            connected: shared.connected.load(Ordering::Relaxed),
            uptime_seconds: shared.started.elapsed().as_secs_f64(),
        }
    });
    let router = crate::node_metrics::router(shared.node_id, read, shared.authorizer.clone());
    tracing::info!(address = %local, "node metrics serving");
    Ok(tokio::spawn(ionet_gcs::http::serve(router, incoming, local, stopped)))
}

impl NodeDaemon {
    /// Binds the node's server and starts the registration/heartbeat loop. Returns once
    /// serving; registration proceeds in the background (see [`NodeDaemon::wait_registered`]).
    pub async fn start(options: NodeDaemonOptions) -> IonetResult<Self> {
        let entrypoint_logs = options.workers.log_dir.clone();
        let listener = ionet_common::rpc::listen(&options.bind_host, options.port).await.map_err(|err| {
            IonetError::Unavailable(format!("cannot bind node server on {}:{}: {err}", options.bind_host, options.port))
        })?;
        let address = listener.local_addr()?;
        let node_id = NodeId::random();
        let node_tls = match &options.cluster_ca {
            Some(_) => Some(NodeTls {
                authority: tls::NodeAuthority::new(&node_id.hex(), &options.advertise_host)?,
                certificate: tls::ServerCert::new(None),
            }),
            None => None,
        };
        let scheme = if node_tls.is_some() { "https://" } else { "" };
        let advertised = format!("{scheme}{}:{}", options.advertise_host, address.port());
        let incoming = rpc::incoming(listener, node_tls.as_ref().map(|tls| &tls.certificate))?;
        let metrics_listener = match options.metrics_port {
            Some(port) => Some(ionet_common::rpc::listen(&options.bind_host, port).await.map_err(|err| {
                IonetError::Unavailable(format!(
                    "cannot bind the metrics server on {}:{port}: {err}",
                    options.bind_host
                ))
            })?),
            None => None,
        };
        let mut info = options.spec.to_node_info(&node_id, &advertised, options.is_head);
        if let Some(listener) = &metrics_listener {
            let http_scheme = if node_tls.is_some() { "https://" } else { "http://" };
            info.metrics_address = format!("{http_scheme}{}:{}", options.advertise_host, listener.local_addr()?.port());
        }
        info.public_key = options.node_key.public_key().to_vec();
        info.no_workloads = !options.runs_workloads;
        let credential = SharedCredential::new(&options.join_credential);
        let leases = Arc::new(Leases::new(
            node_id,
            advertised.clone(),
            options.spec.total.clone(),
            options.spec.gpus.iter().map(|gpu| gpu.index).collect(),
            options.workers,
        ));
        let objects = Arc::new(NodeObjects::new(
            options.object_store_capacity,
            credential.clone(),
            advertised.clone(),
            options.worker_identities.clone(),
        )?);
        if let Some(identities) = &options.worker_identities {
            leases.set_identities(identities.clone());
        }
        leases.set_object_store_dir(objects.dir());
        // A worker's puts go with it: nobody can read an object whose owner is gone.
        let owned = objects.clone();
        leases.on_worker_exit(Arc::new(move |address| {
            let owned = owned.clone();
            tokio::spawn(async move {
                owned.owner_exited(&address).await;
            });
        }));
        if !options.runs_workloads {
            leases.refuse_workloads();
        }
        leases.set_gcs_address(options.gcs_address.clone());
        if let Some(ca) = &options.cluster_ca {
            leases.set_cluster_ca(ca);
        }
        // No credential is accepted until the node learns the head's key (at registration).
        let authorizer = Authorizer::new(None);
        // Entrypoints' directories and unpacked packages: under a directory of the daemon's
        // own, made now with a name nobody can guess, which others may pass through and
        // not write in (so nothing a tenant plants is ever taken for them).
        // Named with the daemon's pid, so a later daemon removes what a killed one left.
        let scratch_root = std::env::temp_dir();
        // Once per process (one holding many daemons, a simulated fleet, sweeps once).
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let swept = scratch_root.clone();
        SWEPT.call_once(|| {
            std::thread::spawn(move || remove_dead_scratch(&swept));
        });
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
            .tempdir_in(&scratch_root)?;
        let work_root = scratch.path().join("entrypoints");
        let package_root = scratch.path().join("packages");
        let env_root = scratch.path().join("envs");
        for dir in [scratch.path(), &work_root, &package_root, &env_root] {
            std::fs::DirBuilder::new().recursive(true).create(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        }
        let scratch_lock = lock_scratch(scratch.path())?;
        let packages = Arc::new(PackageCache::new(package_root));
        let envs = Arc::new(crate::pip_envs::PipEnvs::new(env_root, options.worker_identities.clone()));
        leases.set_package_cache(packages.clone(), envs.clone());
        let entrypoints = Entrypoints::new(
            options.worker_identities.clone(),
            entrypoint_logs.unwrap_or_else(|| scratch.path().to_path_buf()),
            work_root,
            packages,
            envs,
        );
        entrypoints.set_leases(leases.clone());
        entrypoints.set(EntrypointSetting { node_address: advertised.clone(), cluster_ca: options.cluster_ca.clone() });
        let shared = Arc::new(NodeShared {
            node_id,
            info,
            node_key: options.node_key.clone(),
            credential: credential.clone(),
            join_credential: options.join_credential.clone(),
            authorizer: authorizer.clone(),
            leases,
            objects: objects.clone(),
            started: Instant::now(),
            connected: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            gpu_check: std::sync::Mutex::new(None),
            gpu_check_running: AtomicBool::new(false),
            keeps_view: options.keeps_view,
            heartbeats_sent: AtomicU64::new(0),
            tls: node_tls,
            drain_requested: tokio::sync::Notify::new(),
            drain_told: AtomicBool::new(false),
            notice: watch::channel(None).0,
            entrypoints,
            _scratch: scratch,
            _scratch_lock: scratch_lock,
        });
        let (stop, stopped) = watch::channel(false);

        let service = NodeManagerServer::new(NodeManagerService { shared: shared.clone(), stopped: stopped.clone() });
        let mut stop_serving = stopped.clone();
        let object_service = ionet_object_store::ObjectManagerService::new(objects.store.clone())
            .with_owner_check(objects.owner_check())
            .into_server();
        let serve = tokio::spawn(async move {
            let result = rpc::server(authorizer)
                .add_service(service)
                .add_service(object_service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_serving.changed().await;
                })
                .await;
            if let Err(err) = result {
                tracing::error!(error = %err, "node server failed");
            }
        });
        let mut tasks = vec![serve];
        if let Some(listener) = metrics_listener {
            tasks.push(serve_metrics(&shared, listener, stopped.clone())?);
        }
        let channel = rpc::connect_lazy_shared(&options.gcs_address, &credential, Duration::from_secs(2))?;
        shared.leases.attach_control_store(channel);
        // Membership on a connection of its own: a heartbeat never waits behind a burst
        // of the node's other calls to the head (HTTP/2 sends one connection's frames in
        // turn), which a head under load took for a dead node.
        let membership = rpc::connect_lazy_shared(&options.gcs_address, &credential, Duration::from_secs(2))?;
        let client = GcsClient::new(membership);
        let heartbeat = tokio::spawn(run_membership(shared.clone(), client, options.config.clone(), stopped.clone()));
        let reaper = tokio::spawn(reap_idle_workers(shared.leases.clone(), stopped));
        tracing::info!(node = %node_id, address = %advertised, gcs = %options.gcs_address, resources = %options.spec.total, "node daemon serving");
        tasks.extend([heartbeat, reaper]);
        Ok(Self { shared, address, stop, tasks })
    }

    /// How many alive nodes its cluster view (for spillback) holds.
    pub fn nodes_in_view(&self) -> usize {
        self.shared.leases.nodes_in_view()
    }

    /// How many times the node has registered with the head (again after the head lost
    /// it: a restart, or it declared the node dead).
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::SeqCst)
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The address other processes reach this node at.
    pub fn advertised_address(&self) -> &str {
        &self.shared.info.address
    }

    /// Waits until the node has registered at least once and, if it has GPUs, their first
    /// check has ended (passed or not: a node that failed runs, taking no work).
    pub async fn wait_registered(&self, timeout: Duration) -> IonetResult<()> {
        let deadline = Instant::now() + timeout;
        let checking = || {
            !self.shared.info.gpus.is_empty()
                && self.shared.gpu_check.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_none()
        };
        while self.shared.registrations.load(Ordering::SeqCst) == 0 || checking() {
            if Instant::now() >= deadline {
                let what = if self.shared.registrations.load(Ordering::SeqCst) == 0 {
                    "register with the control store"
                } else {
                    "finish the check of its GPUs"
                };
                return Err(IonetError::Timeout(format!(
                    "node {} did not {what} within {timeout:?}",
                    self.shared.node_id.short()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits for the operator's notice to leave (`Drain`): its deadline (zero: the node's
    /// own) and why.
    pub async fn notice(&self) -> (Duration, String) {
        let mut notice = self.shared.notice.subscribe();
        let given = match notice.wait_for(Option::is_some).await {
            Ok(given) => given.clone(),
            Err(_) => None,
        };
        match given {
            Some(given) => given,
            None => std::future::pending().await,
        }
    }

    /// Notice to leave: no new leases from now on (the head hears the node is draining,
    /// so actors restart and tasks go elsewhere), the workers of its actors stop at once
    /// (restartable ones come back on other nodes), and running tasks may finish until
    /// `deadline`; then it stops as [`NodeDaemon::shutdown`] does. Returns how many task
    /// leases were still running at the deadline (and ended with the node).
    pub async fn drain(self, deadline: Duration, reason: &str) -> usize {
        let deadline = deadline.min(MAX_DRAIN_DEADLINE);
        let until = Instant::now() + deadline;
        let leases = self.shared.leases.clone();
        leases.start_draining();
        self.shared.drain_requested.notify_one();
        // The head marks it draining first (bounded), so nothing is placed back here.
        let told_by = Instant::now() + Duration::from_secs(2).min(deadline);
        while !self.shared.drain_told.load(Ordering::SeqCst) && Instant::now() < told_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let actors = leases.stop_actor_workers();
        tracing::info!(node = %self.shared.node_id.short(), actors, ?deadline, "draining: no new leases; running tasks may finish");
        while leases.task_leases() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = leases.task_leases();
        if left > 0 {
            tracing::warn!(node = %self.shared.node_id.short(), left, "drain deadline reached with tasks running: they end with the node");
        }
        let moved = self.move_objects(until).await;
        tracing::info!(node = %self.shared.node_id.short(), moved, "primary copies moved to other nodes");
        self.shutdown(reason).await;
        left
    }

    /// Moves the primary copies held here to other nodes (one that already has a copy
    /// takes it, else the nodes in turn), by `until` at the latest, and tells the head
    /// where each went. Returns how many moved.
    async fn move_objects(&self, until: Instant) -> usize {
        let objects = self.shared.objects.primaries();
        if objects.is_empty() {
            return 0;
        }
        let targets = self.shared.leases.other_alive_nodes();
        if targets.is_empty() {
            tracing::warn!(objects = objects.len(), "no other node to take this node's objects: they leave with it");
            return 0;
        }
        let own = self.advertised_address().to_string();
        let mut batches: std::collections::HashMap<String, Vec<_>> = std::collections::HashMap::new();
        for (index, object) in objects.into_iter().enumerate() {
            let holder = object
                .copies
                .iter()
                .find(|copy| targets.iter().any(|(_, address)| address == *copy))
                .cloned()
                .unwrap_or_else(|| targets[index % targets.len()].1.clone());
            batches.entry(holder).or_default().push(object);
        }
        let mut calls = tokio::task::JoinSet::new();
        for (holder, batch) in batches {
            let (credential, own) = (self.shared.credential.clone(), own.clone());
            calls.spawn(async move {
                let channel = rpc::connect_shared(&holder, &credential, Duration::from_secs(5)).await?;
                let request = TakeObjectsRequest { source_address: own, objects: batch };
                let taken = rpc::NodeManagerClient::new(channel).take_objects(request).await?.into_inner().taken;
                IonetResult::Ok((holder, taken))
            });
        }
        let mut moves = Vec::new();
        let left = until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let gathered = tokio::time::timeout(left, async {
            while let Some(result) = calls.join_next().await {
                match result {
                    Ok(Ok((holder, taken))) => {
                        for id in taken {
                            // Until this node leaves, a free here reaches the taker too.
                            let _ = self.shared.objects.add_location(&id, holder.clone());
                            moves.push(ObjectMove { object_id: id, holder_address: holder.clone() });
                        }
                    }
                    Ok(Err(err)) => tracing::warn!(error = %err, "a node did not take this node's objects"),
                    Err(err) => tracing::warn!(error = %err, "moving objects failed"),
                }
            }
        })
        .await;
        if gathered.is_err() {
            tracing::warn!("the drain deadline came before every object moved");
        }
        let moved = moves.len();
        if let Some(mut head) = self.shared.leases.control_store() {
            // In calls the head takes (at most 100000 moves each).
            for chunk in moves.chunks(50_000) {
                let request =
                    ObjectsMovedRequest { node_id: self.shared.node_id.to_vec(), moves: chunk.to_vec(), forget: false };
                match tokio::time::timeout(Duration::from_secs(5), head.objects_moved(request)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(status)) => {
                        tracing::warn!(error = %status.message(), "the head did not record the moved objects")
                    }
                    Err(_) => tracing::warn!("the head did not answer in time about the moved objects"),
                }
            }
        }
        moved
    }

    /// Drains and stops: tells the control store, then ends the server and loops.
    pub async fn shutdown(self, reason: &str) {
        let _ = self.stop.send(true);
        self.shared.leases.stop_all_workers();
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!(node = %self.shared.node_id.short(), reason, "node daemon stopped");
    }
}

fn backoff(config: &ClusterConfig, attempt: u32) -> Duration {
    let base = config.reconnect_initial_backoff_ms.saturating_mul(1u64 << attempt.min(16));
    let capped = base.min(config.reconnect_max_backoff_ms).max(1);
    // Jitter spreads out a fleet of nodes reconnecting to a head that just came back.
    let jittered = rand::thread_rng().gen_range(capped / 2..=capped);
    Duration::from_millis(jittered)
}

/// Every half second: stops idle workers past their time, and ends the leases of holders
/// that are gone (every other tick).
async fn reap_idle_workers(leases: Arc<Leases>, mut stopped: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut probe = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                leases.reap_idle();
                probe = !probe;
                if probe {
                    leases.end_leases_of_dead_holders(Duration::from_secs(2)).await;
                }
            }
            _ = stopped.changed() => return,
        }
    }
}

/// Runs a check of the node's GPUs against the head in the background, unless one runs.
fn spawn_gpu_check(shared: &Arc<NodeShared>, client: &GcsClient) {
    if shared.gpu_check_running.swap(true, Ordering::SeqCst) {
        return;
    }
    let (shared, mut client) = (shared.clone(), client.clone());
    // No lease is granted while the check runs: it never shares a GPU with one. The flags
    // go down however the check ends (a panic in the prover too).
    struct Checking(Arc<NodeShared>);
    impl Drop for Checking {
        fn drop(&mut self) {
            self.0.leases.set_checking(false);
            self.0.gpu_check_running.store(false, Ordering::SeqCst);
        }
    }
    shared.leases.set_checking(true);
    let checking = Checking(shared.clone());
    tokio::spawn(async move {
        let outcome = crate::gpu_check::prove(&shared.info, &mut client).await;
        // The verdict first, then the end of the check (dropping the guard): a waiting
        // lease never slips in between on a node that just failed.
        if let Ok(check) = &outcome {
            let passed = check.state == ionet_common::rpc::proto::common::GpuCheckState::Passed as i32;
            shared.leases.set_held_back(!passed || check.untrusted_since_ms != 0);
        }
        match &outcome {
            Ok(check) if check.state == ionet_common::rpc::proto::common::GpuCheckState::Passed as i32 => {
                tracing::info!(node = %shared.node_id.short(), tflops = check.tflops, took_ms = check.took_ms, "the node's GPUs passed the head's check")
            }
            Ok(check) => {
                tracing::error!(node = %shared.node_id.short(), reason = %check.reason, "the node's GPUs failed the head's check: it takes no work")
            }
            Err(why) => {
                tracing::error!(node = %shared.node_id.short(), %why, "the node's GPUs could not be checked: it takes no work")
            }
        }
        *shared.gpu_check.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(outcome);
        drop(checking);
    });
}

/// A node's heartbeats on one `HeartbeatStream` (no call, headers or credential check
/// per heartbeat at the head: a head of ten thousand nodes takes ten thousand a second),
/// opened when needed; by calls where the head has no such stream (an older head).
/// Heartbeats go out without waiting for their replies, which come as they come (one
/// sent `quiet` is answered only with something new).
#[derive(Default)]
struct HeartbeatStream {
    open: Option<(tokio::sync::mpsc::Sender<HeartbeatRequest>, tonic::Streaming<HeartbeatReply>)>,
    calls_only: bool,
}

impl HeartbeatStream {
    /// Forgets the stream, and whether the head had none (a head serving the
    /// registration now may be another, newer one).
    fn close(&mut self) {
        self.open = None;
        self.calls_only = false;
    }

    /// Whether a stream is open. The heartbeat that opens one asks for an answer (its
    /// reply carries the incarnation of the head serving the stream).
    fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Sends `request` (on a stream opened within `wait`). By a call, its answer comes
    /// back at once; on a stream, it is queued (answers come from `next_reply`). A stream
    /// found ended is replaced, and the heartbeat sent on the new one asks for an answer
    /// and carries all of `available` (what the old one was sent since its last reply may
    /// be lost). A refusal comes back as the status `Heartbeat` answers with.
    async fn send(
        &mut self,
        client: &mut GcsClient,
        mut request: HeartbeatRequest,
        available: &ResourceSet,
        wait: Duration,
    ) -> Result<Sent, Status> {
        let mut reopened = false;
        for _ in 0..2 {
            if self.calls_only {
                request.quiet = false;
                return client.heartbeat(request).await.map(|reply| Sent::Answered(reply.into_inner()));
            }
            let sender = match &mut self.open {
                Some((sender, _)) => sender,
                None => {
                    let (sender, receiver) = tokio::sync::mpsc::channel(1);
                    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
                    match tokio::time::timeout(wait, client.heartbeat_stream(stream)).await {
                        Ok(Ok(replies)) => &mut self.open.insert((sender, replies.into_inner())).0,
                        Ok(Err(status)) if status.code() == Code::Unimplemented => {
                            self.calls_only = true;
                            continue;
                        }
                        Ok(Err(status)) => return Err(status),
                        Err(_) => {
                            return Err(Status::deadline_exceeded("the head did not open a heartbeat stream in time"))
                        }
                    }
                }
            };
            if sender.send(request.clone()).await.is_ok() {
                return Ok(Sent::Queued { reopened });
            }
            // The stream's sending half is gone (the head ended it): another, and again.
            self.open = None;
            reopened = true;
            request.quiet = false;
            request.available = Some(ResourceQuantities::from_set(available));
        }
        Err(Status::unavailable("the head ended two heartbeat streams in a row"))
    }

    /// The next reply on the stream (never, without one). `Ok(None)`: the head ended the
    /// stream cleanly (its time up, after a large reply, or stopping); it is forgotten, and
    /// heartbeats sent on it since its last reply may be lost. An error ends it too.
    async fn next_reply(&mut self) -> Result<Option<HeartbeatReply>, Status> {
        let Some((_, replies)) = &mut self.open else { return std::future::pending().await };
        // No deadline of its own, as a `Heartbeat` call has none: a head that is gone is
        // found by the connection's keep-alive, and a busy one is waited for.
        let next = replies.message().await;
        if !matches!(next, Ok(Some(_))) {
            self.open = None;
        }
        next
    }
}

/// A heartbeat sent: answered at once (a call), or queued on a stream (another one, if
/// the last had ended).
enum Sent {
    Answered(HeartbeatReply),
    Queued { reopened: bool },
}

/// Heartbeats sent and not yet answered (replies come in order, and a quiet one may never
/// be): what each asked of the node table from; and the one last sent for an answer.
#[derive(Default)]
struct InFlight {
    sent: std::collections::VecDeque<(u64, (u64, u64))>,
    /// The heartbeat awaiting the answer it asked for, and when it went.
    asked: Option<(u64, Instant)>,
    /// When a heartbeat last asked for an answer.
    last_asked: Option<Instant>,
}

impl InFlight {
    /// Most kept: a head that answers nothing for this many heartbeats has long declared
    /// the node dead.
    const MOST: usize = 256;

    /// Whether the next heartbeat should ask for an answer, `every` after the last that
    /// did (and none awaited): how late the head answers is measured on those.
    fn ask_due(&self, every: Duration) -> bool {
        self.asked.is_none() && self.last_asked.is_none_or(|at| at.elapsed() >= every)
    }

    fn sent(&mut self, seq: u64, since: (u64, u64), ask: bool) {
        if self.sent.len() == Self::MOST {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, since));
        if ask {
            self.asked = Some((seq, Instant::now()));
            self.last_asked = Some(Instant::now());
        }
    }

    /// The heartbeat a reply naming `answers` answers (a head that names none answers
    /// the oldest): where its view stood, if it is still known, and how long the answer
    /// took if it was the one asked for. Those before it were answered silently.
    fn answered(&mut self, answers: u64) -> (Option<(u64, u64)>, Option<Duration>) {
        let took = match self.asked {
            Some((seq, at)) if answers == 0 || answers >= seq => {
                self.asked = None;
                Some(at.elapsed())
            }
            _ => None,
        };
        if answers == 0 {
            return (self.sent.pop_front().map(|(_, since)| since), took);
        }
        while let Some((seq, since)) = self.sent.pop_front() {
            if seq == answers {
                return (Some(since), took);
            }
            if seq > answers {
                self.sent.push_front((seq, since));
                break;
            }
        }
        (None, took)
    }

    /// Forgets what was in flight (on a stream that ended: its answers are not coming).
    fn clear(&mut self) {
        self.sent.clear();
        self.asked = None;
    }
}

/// Logs an answer to a heartbeat that took longer than `slow` (once a minute at most, with
/// how many were late meanwhile: a slow head would make a line a second on every node).
fn note_late(shared: &NodeShared, late: &mut (u64, Option<Instant>), took: Duration, slow: Duration, timeout_ms: u64) {
    if took <= slow {
        return;
    }
    late.0 += 1;
    if late.1.is_none_or(|logged| logged.elapsed() >= Duration::from_secs(60)) {
        tracing::warn!(node = %shared.node_id.short(), took_ms = took.as_millis() as u64, timeout_ms, late = late.0, "the head answered a heartbeat late");
        *late = (0, Some(Instant::now()));
    }
}

/// What a heartbeat's reply tells the node to do about its membership.
enum Heard {
    Fine,
    /// The head restarted (another incarnation): register again.
    Restarted,
}

/// How a node reads its heartbeats' replies while a registration lasts: its incarnation,
/// and how late an answer is logged.
#[derive(Clone, Copy)]
struct Hearing {
    incarnation: u64,
    slow: Duration,
    timeout_ms: u64,
}

/// Applies a heartbeat's reply: the node's credential renewed, the unfunded jobs, a GPU
/// check asked for, the cluster view moved on from where the view the heartbeat answered
/// stood (the heartbeat's, as `in_flight` recorded it); an answer it asked for that came
/// late is logged (counted in `late`).
fn hear(
    shared: &Arc<NodeShared>,
    client: &GcsClient,
    reply: HeartbeatReply,
    hearing: Hearing,
    in_flight: &mut InFlight,
    late: &mut (u64, Option<Instant>),
) -> Heard {
    let (since, took) = in_flight.answered(reply.answers);
    if let Some(took) = took {
        note_late(shared, late, took, hearing.slow, hearing.timeout_ms);
    }
    let incarnation = hearing.incarnation;
    if reply.incarnation != incarnation {
        tracing::info!(node = %shared.node_id.short(), "the control store restarted; registering again");
        return Heard::Restarted;
    }
    // The head renews the node's credential before it runs out.
    if let Ok(renewed) = Bearer::new(&reply.node_credential) {
        shared.credential.replace(&renewed);
    }
    let unfunded = reply
        .unfunded_jobs
        .iter()
        .filter_map(|job| Some((JobId::from_bytes(&job.job_id).ok()?, job.reason.clone())))
        .collect();
    shared.leases.set_unfunded(unfunded);
    // The head asks for a check of the GPUs at random idle times.
    if reply.gpu_check_due && !shared.info.gpus.is_empty() {
        spawn_gpu_check(shared, client);
    }
    // The cluster view used for spillback, moved on with what changed since the view the
    // heartbeat held, which came with the heartbeat's reply (the whole table, read by
    // every node every second, would cost the head the square of the cluster's size, and
    // a call of its own per node).
    if let Some(view) = reply.view {
        let at = (view.incarnation, view.version);
        match view.decode_nodes() {
            Ok(nodes) if view.delta => {
                // A reply to a heartbeat the node no longer knows of: dropped (the next
                // asks again from where the view stands).
                if let Some(since) = since {
                    shared.leases.apply_view_delta(&nodes, &view.removed, since, at);
                }
            }
            Ok(nodes) => shared.leases.refresh_view_at(&nodes, at, view.sampled),
            // Kept as it was: the next heartbeat asks again from the same version.
            Err(err) => tracing::warn!(error = %err, "the head sent a node table that does not decode"),
        }
    }
    Heard::Fine
}

/// Registers, heartbeats, re-registers after any loss, and drains on stop.
async fn run_membership(
    shared: Arc<NodeShared>,
    mut client: GcsClient,
    config: ClusterConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(config.heartbeat_interval_ms);
    // Longest the head may take to open a heartbeat stream: by then it has declared the
    // node dead anyway.
    let open_wait = Duration::from_millis(config.heartbeat_timeout_ms.max(config.heartbeat_interval_ms));
    // The head's own timeout (its registration reply says it): what the node's quiet
    // heartbeats are spaced by, and what a late answer is measured against.
    let mut head_timeout_ms = config.heartbeat_timeout_ms;
    let mut late_answers = (0u64, None::<Instant>);
    let mut beats = HeartbeatStream::default();
    let mut in_flight: InFlight;
    let mut seq = 0u64;
    let mut attempt = 0u32;
    let mut incarnation: u64;
    let mut reported: Option<ResourceSet>;
    'membership: loop {
        // Step 1: register.
        loop {
            if *stopped.borrow() {
                break 'membership;
            }
            let mut info = shared.info.clone();
            let available = shared.available();
            info.available = Some(ResourceQuantities::from_set(&available));
            reported = Some(available);
            let proof = shared.node_key.sign(&registration_message(&info.node_id, &info.public_key)).to_vec();
            let tls_public_key = shared.tls.as_ref().map(|tls| tls.authority.public_key()).unwrap_or_default();
            match client.register_node(RegisterNodeRequest { node: Some(info), proof, tls_public_key }).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    incarnation = reply.incarnation;
                    if reply.heartbeat_timeout_ms > 0 {
                        head_timeout_ms = reply.heartbeat_timeout_ms;
                    }
                    if let Some(tls) = &shared.tls {
                        match tls.authority.install(reply.tls_certificate) {
                            Ok(identity) => tls.certificate.set(identity),
                            Err(err) => {
                                tracing::error!(node = %shared.node_id.short(), error = %err, "the head issued no usable certificate")
                            }
                        }
                    }
                    match (Bearer::new(&reply.node_credential), Verifier::from_bytes(&reply.head_key)) {
                        (Ok(node_credential), Ok(head)) => {
                            shared.credential.replace(&node_credential);
                            shared.leases.set_head_key(&head.to_bytes());
                            shared.authorizer.learn_head_key(head);
                        }
                        _ => {
                            tracing::error!(node = %shared.node_id.short(), "the control store sent no usable node credential")
                        }
                    }
                    attempt = 0;
                    shared.connected.store(true, Ordering::SeqCst);
                    let mut checked = false;
                    let request = GetAllNodesRequest {
                        include_dead: false,
                        sample_for: shared.node_id.to_vec(),
                        ..Default::default()
                    };
                    let read = if shared.keeps_view { client.get_all_nodes(request).await.ok() } else { None };
                    if let Some(reply) = read {
                        let reply = reply.into_inner();
                        let nodes = reply.nodes;
                        shared.leases.refresh_view_at(&nodes, (reply.incarnation, reply.version), reply.sampled);
                        checked = nodes.iter().any(|node| {
                            node.node_id == shared.info.node_id
                                && node.gpu_check.as_ref().is_some_and(|check| {
                                    check.state == ionet_common::rpc::proto::common::GpuCheckState::Passed as i32
                                })
                        });
                    }
                    // GPUs the head has not seen pass are checked now, beside the heartbeats.
                    if !shared.info.gpus.is_empty() && !checked {
                        spawn_gpu_check(&shared, &client);
                    } else if checked {
                        let mut last = shared.gpu_check.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        if last.is_none() {
                            *last = Some(Ok(Default::default()));
                        }
                    }
                    let count = shared.registrations.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::info!(node = %shared.node_id.short(), registrations = count, "registered with the control store");
                    break;
                }
                Err(status) if status.code() == Code::Unauthenticated || status.code() == Code::PermissionDenied => {
                    // A head that restarted with a new key does not know the node
                    // credential: register with the join credential again.
                    shared.credential.replace(&shared.join_credential);
                    tracing::error!(node = %shared.node_id.short(), error = %status.message(), "the control store refused this node; retrying");
                }
                Err(status) if status.code() == Code::InvalidArgument => {
                    tracing::error!(node = %shared.node_id.short(), error = %status.message(), "the control store refused this node; retrying");
                }
                Err(status) => {
                    tracing::warn!(node = %shared.node_id.short(), error = %status.message(), "cannot register yet; retrying");
                }
            }
            let wait = backoff(&config, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped.changed() => break 'membership,
            }
        }
        // Step 2: heartbeat until something goes wrong (on a stream of this registration's):
        // each interval if something changed, else every quarter of the head's timeout.
        beats.close();
        let idle_every = config.idle_heartbeat_interval(head_timeout_ms);
        // An answer this late is logged (once a minute at most, with how many were late
        // meanwhile): at the timeout, the head declares the node dead.
        let slow_answer = Duration::from_millis(head_timeout_ms / 4);
        in_flight = InFlight::default();
        let hearing = Hearing { incarnation, slow: slow_answer, timeout_ms: head_timeout_ms };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent: Option<Instant> = None;
        loop {
            let heard = tokio::select! {
                _ = ticker.tick() => None,
                _ = tokio::time::sleep_until(last_sent.map_or_else(tokio::time::Instant::now, |at| (at + idle_every).into())) => None,
                _ = shared.drain_requested.notified() => None,
                _ = stopped.changed() => break 'membership,
                reply = beats.next_reply() => Some(reply),
            };
            let mut refused = None;
            match heard {
                None => {}
                Some(Ok(Some(reply))) => {
                    match hear(&shared, &client, reply, hearing, &mut in_flight, &mut late_answers) {
                        Heard::Fine => continue,
                        Heard::Restarted => continue 'membership,
                    }
                }
                // The head ended the stream: heartbeats on it since its last reply may be
                // lost, so the next (now, on another) carries the resources again.
                Some(Ok(None)) => {
                    in_flight.clear();
                    reported = None;
                    last_sent = None;
                    continue;
                }
                Some(Err(status)) => refused = Some(status),
            }
            if refused.is_none() {
                if shared.leases.is_draining() && !shared.drain_told.load(Ordering::SeqCst) {
                    let request = DrainNodeRequest {
                        node_id: shared.node_id.to_vec(),
                        reason: "the node was given notice to leave".into(),
                        exiting: false,
                    };
                    match tokio::time::timeout(Duration::from_secs(2), client.drain_node(request)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(status)) => {
                            tracing::warn!(error = %status.message(), "the control store did not take the drain")
                        }
                        Err(_) => tracing::warn!("the control store did not answer the drain in time"),
                    }
                    shared.drain_told.store(true, Ordering::SeqCst);
                }
                // Available resources travel only when they changed since the last report
                // (registration carries them too): an idle fleet sends ids, and seldom.
                let available = shared.available();
                let changed = reported.as_ref() != Some(&available);
                let idle_due = last_sent.is_none_or(|at| at.elapsed() >= idle_every);
                if !changed && !idle_due {
                    continue;
                }
                // What changed in the node table since the view the node holds comes back.
                let since = shared.leases.view_at();
                seq += 1;
                // An answer asked for on a stream's first heartbeat, and once a timeout
                // (while none is awaited): the rest are answered only with something new.
                // One that asks carries the resources whatever changed (a report lost with
                // a stream that ended is mended by the next).
                let ask = !beats.is_open() || in_flight.ask_due(Duration::from_millis(head_timeout_ms));
                let request = HeartbeatRequest {
                    node_id: shared.node_id.to_vec(),
                    available: (changed || ask).then(|| ResourceQuantities::from_set(&available)),
                    read_view: shared.keeps_view,
                    view_since_version: since.1,
                    view_since_incarnation: since.0,
                    seq,
                    quiet: !ask,
                    sampled_view: shared.keeps_view,
                };
                last_sent = Some(Instant::now());
                in_flight.sent(seq, since, ask);
                match beats.send(&mut client, request, &available, open_wait).await {
                    Ok(sent) => {
                        reported = Some(available);
                        shared.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                        // On a stream that replaced one the head ended: what was in flight
                        // on that one is not coming, and this one asked.
                        match sent {
                            Sent::Queued { reopened: false } => {}
                            Sent::Queued { reopened: true } => {
                                in_flight.clear();
                                in_flight.sent(seq, since, true);
                            }
                            // By a call (which always asks): answered at once.
                            Sent::Answered(reply) => {
                                let heard = hear(&shared, &client, reply, hearing, &mut in_flight, &mut late_answers);
                                if let Heard::Restarted = heard {
                                    continue 'membership;
                                }
                            }
                        }
                        continue;
                    }
                    Err(status) => refused = Some(status),
                }
            }
            let Some(status) = refused else { continue };
            shared.connected.store(false, Ordering::SeqCst);
            let unknown = matches!(status.code(), Code::NotFound | Code::FailedPrecondition);
            tracing::warn!(node = %shared.node_id.short(), error = %status.message(), "heartbeat failed; registering again");
            if !unknown {
                let wait = backoff(&config, attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => break 'membership,
                }
            }
            continue 'membership;
        }
    }
    // Step 3: drain, best effort and bounded, so a daemon whose head is gone still exits.
    if shared.registrations.load(Ordering::SeqCst) > 0 {
        for exiting in [false, true] {
            let request = DrainNodeRequest {
                node_id: shared.node_id.to_vec(),
                reason: "node daemon shutting down".into(),
                exiting,
            };
            match tokio::time::timeout(Duration::from_secs(2), client.drain_node(request)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    tracing::warn!(error = %status.message(), "could not tell the control store this node is draining");
                    break;
                }
                Err(_) => {
                    tracing::warn!("control store did not answer the drain in time");
                    break;
                }
            }
        }
    }
}

/// What a node daemon's scratch directory (entrypoints, packages, environments) is
/// named: this, the daemon's pid, `-`, random.
const SCRATCH_PREFIX: &str = "ionet-node-";
/// The file in a scratch directory its daemon holds locked while it runs.
const SCRATCH_LOCK: &str = ".in-use";
/// A scratch directory whose lock file is younger than this is left alone (its daemon may
/// be between making the file and locking it).
const SCRATCH_GRACE: Duration = Duration::from_secs(30);

/// Makes and locks (`flock`, exclusive) the lock file of the scratch directory `dir`;
/// the lock goes with the daemon's process, however it ends.
fn lock_scratch(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::options().write(true).create_new(true).open(dir.join(SCRATCH_LOCK))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Removes the scratch directories under `root` that no daemon uses any more (killed
/// before it could remove its own): this user's, whose lock file nobody holds. One whose
/// lock is held (a running daemon, in this PID namespace or another sharing the
/// directory) or that has no lock file stays.
fn remove_dead_scratch(root: &std::path::Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(root) else { return };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX) {
            continue;
        }
        let ours = std::fs::symlink_metadata(entry.path()).is_ok_and(|meta| meta.is_dir() && meta.uid() == me);
        if !ours {
            continue;
        }
        let lock_path = entry.path().join(SCRATCH_LOCK);
        let Ok(meta) = std::fs::symlink_metadata(&lock_path) else { continue };
        let young = meta.modified().ok().and_then(|at| at.elapsed().ok()).is_none_or(|age| age < SCRATCH_GRACE);
        if !meta.is_file() || young {
            continue;
        }
        let Ok(lock) = std::fs::File::open(&lock_path) else { continue };
        // SAFETY: flock on a descriptor this function owns (released when it closes).
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // held: in use
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::info!(dir = %entry.path().display(), "removed the scratch directory of a dead node daemon")
            }
            Err(err) => {
                tracing::debug!(dir = %entry.path().display(), error = %err, "could not remove a dead daemon's scratch")
            }
        }
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    /// A scratch directory as a daemon leaves it, its lock file made `age` ago.
    fn scratch(root: &std::path::Path, name: &str, age: Duration) -> std::path::PathBuf {
        let dir = root.join(format!("{SCRATCH_PREFIX}{name}"));
        std::fs::create_dir_all(dir.join("envs/x")).unwrap();
        std::fs::write(dir.join("envs/x/file"), "left behind").unwrap();
        let lock = std::fs::File::create(dir.join(SCRATCH_LOCK)).unwrap();
        lock.set_modified(std::time::SystemTime::now() - age).unwrap();
        dir
    }

    #[test]
    fn only_scratch_nobody_holds_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let old = SCRATCH_GRACE * 2;
        let dead = scratch(root.path(), "1-dead", old);
        let live = scratch(root.path(), "2-live", old);
        std::fs::remove_file(live.join(SCRATCH_LOCK)).unwrap();
        let _held = lock_scratch(&live).unwrap();
        std::fs::File::options()
            .write(true)
            .open(live.join(SCRATCH_LOCK))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - old)
            .unwrap();
        let starting = scratch(root.path(), "3-starting", Duration::ZERO);
        let unlocked_format = root.path().join(format!("{SCRATCH_PREFIX}older"));
        std::fs::create_dir(&unlocked_format).unwrap();
        let file = root.path().join(format!("{SCRATCH_PREFIX}a-file"));
        std::fs::write(&file, "not a directory").unwrap();
        remove_dead_scratch(root.path());
        assert!(!dead.exists(), "a dead daemon's scratch goes");
        assert!(live.join("envs/x/file").exists(), "a running daemon's stays");
        assert!(starting.exists() && unlocked_format.exists() && file.exists(), "so does anything else");
    }
}
