//! Serving the control store on a socket: the authorization layer, message size caps,
//! the health task, and an orderly shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::authz::Authorizer;
use ionet_common::clock::{Clock, SystemClock};
use ionet_common::config::ClusterConfig;
use ionet_common::credential::{Issuer, Role};
use ionet_common::rpc::proto::gcs::gcs_server::GcsServer as GeneratedGcsServer;
use ionet_common::rpc::proto::metering::metering_server::MeteringServer as GeneratedMeteringServer;
use ionet_common::tls::ServerCert;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::actors::Actors;
use crate::error::{GcsError, GcsResult};
use crate::metering::{Metering, MeteringOptions};
use crate::metering_service::MeteringService;
use crate::metrics::HeadMetrics;
use crate::placement_groups::{GrpcBundleAgent, PlacementGroups};
use crate::service::{GcsService, HeadTls};
use crate::state::GcsState;
use crate::storage::redis::HeadLease;
use crate::storage::{GcsStorage, MemoryStorage, RedbStorage, RedisStorage, StorageLocation};
use crate::submissions::{EntrypointRunner, Submissions};
use ionet_common::IonetError;

/// How long the head's control credential (its bundle calls into daemons) lasts.
const CONTROL_CREDENTIAL_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub struct GcsServerOptions {
    pub config: ClusterConfig,
    /// Where the tables live (default: in memory only).
    pub storage: StorageLocation,
    /// On Redis: the head lease this head holds; its writes are fenced by it.
    pub head_lease: Option<Arc<HeadLease>>,
    pub clock: Arc<dyn Clock>,
    /// The settlement ledger's file; `None`: the ledger in memory only.
    pub ledger_path: Option<PathBuf>,
    /// Usage records are also appended to this file as JSON lines.
    pub usage_export_path: Option<PathBuf>,
    /// The head's credential signing key (created there, mode 0600, on first start);
    /// `None`: a fresh key in memory, so credentials end with this process.
    pub signing_key_path: Option<PathBuf>,
    /// Serve TLS only (the cluster CA, the hosts the head's certificate names); `None`:
    /// plain, which only a listener on loopback may be.
    pub tls: Option<HeadTls>,
    /// Where the job server keeps what submitted jobs print (`logs/`) and the packages
    /// tenants upload (`packages/`); `None`: a directory of the process's own, removed
    /// when it ends.
    pub job_dir: Option<PathBuf>,
    /// Pay each settled epoch out on Solana.
    #[cfg(feature = "solana")]
    pub payouts: Option<crate::payouts::PayoutSettings>,
}

impl GcsServerOptions {
    pub fn new(config: ClusterConfig) -> Self {
        Self {
            config,
            storage: StorageLocation::Memory,
            head_lease: None,
            clock: Arc::new(SystemClock),
            ledger_path: None,
            usage_export_path: None,
            signing_key_path: None,
            tls: None,
            job_dir: None,
            #[cfg(feature = "solana")]
            payouts: None,
        }
    }
}

/// A running control store. Dropping it does not stop it: call [`GcsServer::shutdown`].
pub struct GcsServer {
    address: SocketAddr,
    state: Arc<GcsState>,
    metering: Arc<Metering>,
    background_tasks: Vec<JoinHandle<()>>,
    issuer: Issuer,
    stop: watch::Sender<bool>,
    serve_task: JoinHandle<Result<(), tonic::transport::Error>>,
    health_task: JoinHandle<()>,
    placement_task: JoinHandle<()>,
    placement_groups: Arc<PlacementGroups>,
    submissions: Arc<Submissions>,
    /// What `/metrics` reads.
    metrics: Arc<HeadMetrics>,
    /// Writes task rows to storage (a head with storage); stopped after the server.
    persist_task: Option<JoinHandle<()>>,
    persist_stop: watch::Sender<bool>,
    /// What the control store's server presents (TLS), and the job server's too.
    certificate: Option<Arc<ServerCert>>,
    /// Turns true when the server stops.
    stopped: watch::Receiver<bool>,
    /// The job server's own directory, when the options named none.
    _job_logs: Option<tempfile::TempDir>,
}

impl GcsServer {
    /// Opens storage, loads the tables and serves on `listener`.
    pub async fn start(options: GcsServerOptions, listener: TcpListener) -> GcsResult<Self> {
        let location = options.storage.clone();
        let lease = options.head_lease.clone();
        let storage: Arc<dyn GcsStorage> = tokio::task::spawn_blocking(move || -> GcsResult<Arc<dyn GcsStorage>> {
            Ok(match (location, lease) {
                (StorageLocation::Memory, _) => Arc::new(MemoryStorage::new()),
                (StorageLocation::File(path), _) => Arc::new(RedbStorage::open(&path)?),
                (StorageLocation::Redis(url), Some(lease)) => Arc::new(RedisStorage::open_fenced(&url, &lease)?),
                (StorageLocation::Redis(url), None) => Arc::new(RedisStorage::open(&url)?),
            })
        })
        .await
        .map_err(|err| GcsError::Storage(err.to_string()))??;
        let state = GcsState::open(options.config.clone(), storage, options.clock.clone()).await?;
        let issuer = match &options.signing_key_path {
            Some(path) => Issuer::load_or_create(path)?,
            None => Issuer::generate(),
        };
        // Subscribed before metering sweeps for dead nodes, so no death falls in between.
        let events = state.subscribe();
        let metering = Metering::open(
            state.clone(),
            MeteringOptions {
                ledger_path: options.ledger_path.clone(),
                usage_export_path: options.usage_export_path.clone(),
            },
        )
        .await?;
        let address =
            listener.local_addr().map_err(|err| GcsError::Storage(format!("listener has no address: {err}")))?;
        let (stop, stopped) = watch::channel(false);

        let max_bytes = options.config.max_message_bytes;
        // The head's own calls into node daemons (bundles) carry its control credential,
        // which may reserve bundles and nothing else (a provider's daemon sees it); its
        // calls for an actor carry the actor's job's credential. It lives in memory only.
        let control = Bearer::new(&issuer.issue(Role::Control, CONTROL_CREDENTIAL_TTL))?;
        let nodes = Arc::new(GrpcBundleAgent::new(control.clone()));
        let placement_groups = PlacementGroups::new(state.clone(), nodes.clone());
        metering.set_stopper(nodes);
        metering.set_head_holdings(placement_groups.clone());
        let tasks = Arc::new(crate::task_events::TaskTable::new(
            crate::task_events::MAX_TASKS,
            crate::task_events::MAX_TASKS_PER_ACCOUNT,
        ));
        let actors =
            Actors::new(state.clone(), issuer.clone(), placement_groups.clone(), metering.clone(), tasks.clone());
        // What a previous run of the head left: task rows first (actors' creations add to
        // them), then groups (actors may sit in them), then actors. A head with storage
        // keeps task rows there.
        let persistent = !matches!(options.storage, StorageLocation::Memory);
        if persistent {
            let restored = crate::task_events::load(&tasks, state.storage().clone()).await?;
            // A job that finished while the head was away (or before its rows' last write)
            // ends its open rows, as it would have here.
            for job in state.jobs() {
                if job.state == ionet_common::rpc::proto::common::JobState::Finished as i32 {
                    tasks.end_job(&job.job_id, job.end_time_ms.saturating_mul(1000));
                }
            }
            tracing::info!(rows = restored, "task rows restored from storage");
        }
        placement_groups.restore().await?;
        actors.restore().await?;
        let (job_dir, job_logs) = match options.job_dir.clone() {
            Some(dir) => (dir, None),
            None => {
                let dir = tempfile::Builder::new().prefix("ionet-jobs").tempdir().map_err(IonetError::from)?;
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let submissions = Submissions::open(
            state.clone(),
            placement_groups.clone(),
            issuer.clone(),
            EntrypointRunner::new(control.clone()),
            job_dir.join("logs"),
            job_dir.join("packages"),
        )
        .await?;
        let objects = crate::objects::ObjectListing::new(state.clone(), issuer.clone());
        let metrics = Arc::new(HeadMetrics::new(crate::metrics::HeadTables {
            state: state.clone(),
            metering: metering.clone(),
            tasks: tasks.clone(),
            submissions: submissions.clone(),
            actors: actors.clone(),
            placement_groups: placement_groups.clone(),
            objects: objects.clone(),
            issuer: issuer.clone(),
        }));
        let service = GeneratedGcsServer::new(GcsService::new(
            state.clone(),
            placement_groups.clone(),
            actors.clone(),
            issuer.clone(),
            options.tls.clone(),
            submissions.clone(),
            tasks.clone(),
            objects,
            metering.clone(),
            stopped.clone(),
        ))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
        let metering_service = GeneratedMeteringServer::new(MeteringService::new(metering.clone()))
            .max_decoding_message_size(max_bytes)
            .max_encoding_message_size(max_bytes);
        let mut stop_serving = stopped.clone();
        let certificate = match &options.tls {
            Some(tls) => Some(ServerCert::new(Some(tls.ca.server_identity(&tls.hosts)?))),
            None => None,
        };
        let job_server_stopped = stopped.clone();
        let incoming = ionet_common::rpc::incoming(listener, certificate.as_ref())?;
        let serve_task = tokio::spawn(
            ionet_common::rpc::server(Authorizer::new(Some(issuer.verifier())))
                .add_service(service)
                .add_service(metering_service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_serving.wait_for(|stop| *stop).await;
                }),
        );
        let mut background_tasks = metering.spawn_tasks(events, stopped.clone());
        // Task rows are written a last time once the server has stopped taking calls.
        let (persist_stop, persist_stopped) = watch::channel(false);
        let persist_task = persistent.then(|| {
            tokio::spawn(crate::task_events::persist(tasks.clone(), state.storage().clone(), persist_stopped))
        });
        #[cfg(feature = "solana")]
        if let Some(settings) = options.payouts {
            let payouts = crate::payouts::Payouts::open(settings, metering.clone()).await?;
            background_tasks.push(tokio::spawn(payouts.run(stopped.clone())));
        }
        let placement_task = tokio::spawn(placement_groups.clone().run(stopped.clone()));
        background_tasks.push(tokio::spawn(actors.clone().run(stopped.clone())));
        let health_task = tokio::spawn(run_health_checks(state.clone(), stopped));
        tracing::info!(%address, "control store serving");
        Ok(Self {
            address,
            state,
            metering,
            background_tasks,
            issuer,
            stop,
            serve_task,
            health_task,
            placement_task,
            placement_groups,
            submissions,
            metrics,
            persist_task,
            persist_stop,
            certificate,
            stopped: job_server_stopped,
            _job_logs: job_logs,
        })
    }

    /// Serves the head's HTTP server ([`crate::job_server`]: Ray's Jobs REST API, and
    /// [`crate::metrics`]) on `listener`
    /// until the control store stops: over TLS when the control store speaks it, with its
    /// credentials. `head_address` is where submitted jobs' drivers join (the head's
    /// advertised address, or the list of heads).
    pub fn serve_jobs(&self, listener: TcpListener, head_address: &str) -> GcsResult<SocketAddr> {
        let local = listener.local_addr().map_err(IonetError::from)?;
        let incoming = ionet_common::rpc::incoming_http(listener, self.certificate.as_ref())?;
        self.submissions.set_head_address(head_address);
        let router = crate::job_server::router(
            self.submissions.clone(),
            self.metrics.clone(),
            Authorizer::new(Some(self.issuer.verifier())),
        );
        tokio::spawn(crate::http::serve(router, incoming, local, self.stopped.clone()));
        tracing::info!(address = %local, "job server serving");
        Ok(local)
    }

    pub fn submissions(&self) -> &Arc<Submissions> {
        &self.submissions
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A fresh admin credential (the operator's), valid for `ttl`.
    pub fn admin_credential(&self, ttl: Duration) -> Bearer {
        Bearer::new(&self.issuer.issue(Role::Admin, ttl)).expect("a credential is printable ASCII")
    }

    /// A fresh tenant credential for `account` (what `ionet credentials issue` hands a
    /// tenant), valid for `ttl`.
    pub fn account_credential(&self, account: &str, ttl: Duration) -> Bearer {
        Bearer::new(&self.issuer.issue_account(account, ttl)).expect("a credential is printable ASCII")
    }

    /// A credential of submitted job `submission_id` (the one given `nonce`) of `account`
    /// (what the job server hands the entrypoint's node), valid for `ttl`.
    pub fn submission_credential(&self, submission_id: &str, nonce: &str, account: &str, ttl: Duration) -> Bearer {
        Bearer::new(&self.issuer.issue_submission(submission_id, nonce, account, ttl))
            .expect("a credential is printable ASCII")
    }

    pub fn state(&self) -> &Arc<GcsState> {
        &self.state
    }

    pub fn metering(&self) -> &Arc<Metering> {
        &self.metering
    }

    pub fn placement_groups(&self) -> &Arc<PlacementGroups> {
        &self.placement_groups
    }

    /// Stops accepting calls, ends the background tasks and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.health_task.await;
        let _ = self.placement_task.await;
        for task in self.background_tasks {
            let _ = task.await;
        }
        match self.serve_task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "control store server ended with an error")
            }
            Err(err) => tracing::warn!(error = %err, "control store server task failed"),
        }
        // No call changes a task row any more: the last of them go to storage.
        let _ = self.persist_stop.send(true);
        if let Some(task) = self.persist_task {
            let _ = task.await;
        }
    }

    /// Waits until the server stops on its own (it does not, unless its socket fails).
    pub async fn wait(&mut self) {
        let _ = (&mut self.serve_task).await;
    }
}

/// Checks heartbeat deadlines a few times per interval, so a node is declared dead
/// within timeout + one interval of its last heartbeat (plus any time the head itself
/// stood still meanwhile, which a check running late measures).
async fn run_health_checks(state: Arc<GcsState>, mut stopped: watch::Receiver<bool>) {
    let period = Duration::from_millis((state.config.heartbeat_interval_ms / 4).clamp(10, 1_000));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = tokio::time::Instant::now();
    loop {
        tokio::select! {
            due = ticker.tick() => {
                // A check this late means the head stood still (starved of CPU, its
                // runtime busy): heartbeats were not taken meanwhile either. Counted
                // from when it was due, or from a period after the last check ended (a
                // long check of its own, recording deaths, is no stall).
                let late = tokio::time::Instant::now().saturating_duration_since(due.max(checked + period));
                if late > period {
                    state.note_stall(late.as_millis() as u64);
                }
                if let Err(err) = state.check_heartbeats().await {
                    tracing::error!(error = %err, "health check could not record a dead node");
                }
                checked = tokio::time::Instant::now();
            }
            _ = stopped.changed() => return,
        }
    }
}
