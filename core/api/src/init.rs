//! `ionet::init` and `ionet::shutdown`: joining a cluster, or starting an embedded one,
//! and the worker-process entry that `init` diverts to.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::config::ClusterConfig;
use ionet_common::credential::Verifier;
use ionet_common::rpc::proto::common::NodeState;
use ionet_common::rpc::proto::common::WorkerCommand;
use ionet_common::rpc::proto::gcs::{AddJobRequest, GetAllNodesRequest, MarkJobFinishedRequest};
use ionet_common::rpc::proto::node::{IssueCertificateRequest, RegisterWorkerRequest};
use ionet_common::rpc::proto::worker::core_worker_server::CoreWorkerServer;
use ionet_common::rpc::{self, NodeManagerClient};
use ionet_common::tls::{self, ServerCert};
use ionet_common::worker_env::WorkerEnv;
use ionet_common::{IonetError, IonetResult, JobId, NodeId, Quantity, ResourceSet};
use ionet_gcs::{GcsServer, GcsServerOptions};
use ionet_worker::lease::WorkerPoolOptions;
use ionet_worker::node_daemon::{NodeDaemon, NodeDaemonOptions};
use ionet_worker::node_spec::{Declared, NodeSpec};
use ionet_worker::session::SessionDir;

use crate::runtime::{self, block_on, CoreWorker, DEFAULT_INLINE_THRESHOLD};
use crate::service::CoreWorkerService;

/// How `ionet::init` joins or makes a cluster.
#[derive(Clone, Debug, Default)]
pub struct InitConfig {
    /// `None`: the head in `IONET_ADDRESS` if set (as Ray's `RAY_ADDRESS`: a submitted
    /// job's entrypoint is given it), else start an embedded local cluster for this
    /// program. `"auto"`: the head of this machine's session. Otherwise `host:port` of a
    /// head.
    pub address: Option<String>,
    /// The API key of the account this job is paid by (`ionet account create`; default:
    /// `IONET_API_KEY`, then, on the operator's machine, the admin credential in the
    /// session directory). The job then speaks with a credential of its own.
    pub api_key: Option<String>,
    /// Embedded cluster only: CPUs and GPUs to offer (default: detected).
    pub num_cpus: Option<f64>,
    pub num_gpus: Option<u32>,
    pub gpu_type: Option<String>,
    pub resources: BTreeMap<String, f64>,
    pub namespace: String,
    /// Account billed for this job's usage.
    pub payer_account: String,
    /// Session directory used to find a head with `address: "auto"`.
    pub session_dir: Option<PathBuf>,
    /// Values up to this many bytes travel inline (default 100 KiB).
    pub inline_threshold: Option<usize>,
    /// Bytes of task specs kept to rebuild lost objects (default 256 MiB); past it the
    /// oldest are dropped and their objects, if lost, are not rebuilt.
    pub lineage_budget_bytes: Option<usize>,
    /// Print what this job's workers print, each line prefixed with the task or actor,
    /// pid and node, repeats folded (Ray's `log_to_driver`; default true).
    pub log_to_driver: Option<bool>,
    /// Embedded cluster only: bytes of shared memory for the object store (default 30%
    /// of the machine's memory); beyond it objects spill to disk.
    pub object_store_memory: Option<u64>,
    /// How node daemons start this job's worker processes (default: this binary,
    /// re-executed with the same arguments). Language bindings set their own (Python:
    /// `python -m ionet._worker`).
    pub worker_command: Option<WorkerCommand>,
    /// Ray's `runtime_env` for every worker of this job (`serde_json::json!({"working_dir":
    /// "./project", "env_vars": {...}, "pip": [...]})`): local directories are uploaded to
    /// the head (with the account's key) and unpacked on each node that runs the job's
    /// workers. Keys: `working_dir`, `py_modules`, `env_vars`, `pip`, `uv`, `excludes`.
    pub runtime_env: Option<serde_json::Value>,
    /// Joining only: the node daemon this driver works through (its `host:port` as the
    /// cluster lists it). Default: the head's when the head runs on this machine, else
    /// one on this machine. A driver on a worker machine names that machine's daemon, so
    /// it keeps working while the head restarts. A submitted job's entrypoint is given
    /// its node's in `IONET_DRIVER_NODE`, the default then.
    pub node_address: Option<String>,
    /// The least reliability score (a share, 0 to 1) a node must have to run this job's
    /// tasks and actors: the head's score of its uptime, GPU checks and leases lost to its
    /// death (`ionet status`). Schedulers pass other nodes by and the head bills no lease
    /// of the job on one. Default: any node (or `IONET_MIN_RELIABILITY`).
    pub min_reliability: Option<f64>,
}

impl InitConfig {
    pub fn min_reliability(mut self, share: f64) -> Self {
        self.min_reliability = Some(share);
        self
    }

    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    pub fn num_cpus(mut self, cpus: f64) -> Self {
        self.num_cpus = Some(cpus);
        self
    }

    pub fn num_gpus(mut self, gpus: u32) -> Self {
        self.num_gpus = Some(gpus);
        self
    }

    pub fn gpu_type(mut self, model: impl Into<String>) -> Self {
        self.gpu_type = Some(model.into());
        self
    }

    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    pub fn runtime_env(mut self, runtime_env: serde_json::Value) -> Self {
        self.runtime_env = Some(runtime_env);
        self
    }

    pub fn node_address(mut self, address: impl Into<String>) -> Self {
        self.node_address = Some(address.into());
        self
    }
}

/// What starts a job: `config.api_key`, else `IONET_API_KEY`, else the operator's
/// credential in `session` (a driver on the head's own machine).
fn job_starter(config: &InitConfig, session: &SessionDir) -> IonetResult<Bearer> {
    match config.api_key.clone().or_else(|| std::env::var("IONET_API_KEY").ok().filter(|key| !key.is_empty())) {
        Some(key) => Bearer::new(&key),
        None => session.admin_credential().ok_or_else(|| {
            IonetError::Unauthenticated(
                "no account API key: a job is started with its account's key (`ionet account create NAME` on the \
                 head; pass InitConfig::api_key or set IONET_API_KEY)"
                    .into(),
            )
        }),
    }
}

/// The account a job credential belongs to (the head signed it: checked here too).
fn account_of(credential: &Bearer, head_key: &Verifier) -> IonetResult<String> {
    let claims = head_key
        .verify(credential.as_str().as_bytes())
        .map_err(|why| IonetError::Unauthenticated(format!("this process's job credential does not verify: {why}")))?;
    claims.account.ok_or_else(|| IonetError::Unauthenticated("this process's job credential names no account".into()))
}

struct Embedded {
    gcs: GcsServer,
    node: NodeDaemon,
}

static EMBEDDED: Mutex<Option<Embedded>> = Mutex::new(None);

/// Connects this program to a cluster (or starts an embedded one) as a driver.
///
/// Call it first in `main`: worker processes are this same binary re-executed, and in
/// them `init` never returns: it serves tasks until the node daemon stops the worker.
pub fn init(config: InitConfig) -> IonetResult<()> {
    if WorkerEnv::is_worker() {
        run_worker();
    }
    if runtime::current().is_ok() {
        return Err(IonetError::FailedPrecondition(
            "ionet is already initialised; call ionet::shutdown() first".into(),
        ));
    }
    block_on(async {
        let started = init_driver(config).await;
        if started.is_err() {
            // A cluster this call started ends with it (a bad runtime_env, say).
            let embedded = EMBEDDED.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(embedded) = embedded {
                embedded.node.shutdown("the driver failed to start").await;
                embedded.gcs.shutdown().await;
            }
        }
        started
    })
}

/// Whether `init` has run (and `shutdown` has not).
pub fn is_initialized() -> bool {
    runtime::current().is_ok()
}

/// Set in a worker's environment by a language binding: the JSON argv that starts a
/// worker of that language (a worker's own nested tasks and actors need it).
pub const WORKER_ARGV_ENV: &str = "IONET_WORKER_ARGV";

/// The job's namespace, in a worker's environment.
const NAMESPACE_ENV: &str = "IONET_NAMESPACE";

fn worker_command() -> WorkerCommand {
    let inherited =
        std::env::var(WORKER_ARGV_ENV).ok().and_then(|json| serde_json::from_str::<Vec<String>>(&json).ok());
    let argv = inherited.unwrap_or_else(|| {
        let mut argv: Vec<String> = std::env::args().collect();
        if let Ok(exe) = std::env::current_exe() {
            if let Some(first) = argv.first_mut() {
                *first = exe.to_string_lossy().into_owned();
            } else {
                argv.push(exe.to_string_lossy().into_owned());
            }
        }
        argv
    });
    // What a worker must inherit: logging, and a binding's module path and worker command.
    let env = std::env::vars()
        .filter(|(name, _)| {
            ["IONET_LOG", "RUST_LOG", "RUST_BACKTRACE", "IONET_PYTHONPATH", WORKER_ARGV_ENV, NAMESPACE_ENV]
                .contains(&name.as_str())
        })
        .collect();
    let cwd = std::env::current_dir().map(|dir| dir.to_string_lossy().into_owned()).unwrap_or_default();
    // A Rust worker is a process of its own (a forkserver is for interpreters' starts).
    WorkerCommand { argv, env, cwd, packages: None, forks: false }
}

/// Binds this process's own server at its node's host: TLS (`https://`) when its node's
/// is.
async fn serve_core_worker(node_address: &str) -> IonetResult<(tokio::net::TcpListener, String)> {
    let host = tls::host_of(node_address);
    let listener = rpc::listen(&host, 0).await?;
    let scheme = if rpc::is_tls_address(node_address) { "https://" } else { "" };
    let address = format!("{scheme}{host}:{}", listener.local_addr()?.port());
    Ok((listener, address))
}

/// The certificate this process's server presents when its node serves TLS: a leaf for
/// a key made here, which the node certifies for its own host. `None` on a plain node.
async fn certificate_from(node_address: &str, node: &mut NodeManagerClient) -> IonetResult<Option<Arc<ServerCert>>> {
    if !rpc::is_tls_address(node_address) {
        return Ok(None);
    }
    let key = tls::generate_key()?;
    let request = IssueCertificateRequest { public_key: key.public_key_raw().to_vec() };
    let chain = node.issue_certificate(request).await?.into_inner().chain;
    Ok(Some(ServerCert::new(Some(tls::identity(&key, chain)?))))
}

fn spawn_core_worker_server(
    worker: Arc<CoreWorker>,
    listener: tokio::net::TcpListener,
    certificate: Option<Arc<ServerCert>>,
) -> IonetResult<()> {
    let incoming = rpc::incoming(listener, certificate.as_ref())?;
    let service = CoreWorkerServer::new(CoreWorkerService { worker: worker.clone() })
        // One cap for what any peer may send (a batch of calls, a reply): far above what
        // the core worker itself sends (at most 256 calls of inline values of 100 KiB),
        // so a message past it is a peer's, refused with a status naming both sizes.
        .max_decoding_message_size(rpc::DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(rpc::DEFAULT_MAX_MESSAGE_BYTES);
    // Its own job's calls, its account's other jobs' (a detached actor they share), the
    // head's; never a stranger's.
    let authorizer = ionet_common::authz::Authorizer::for_account(worker.head_key.clone(), &worker.account);
    tokio::spawn(async move {
        if let Err(err) = rpc::server(authorizer).add_service(service).serve_with_incoming(incoming).await {
            tracing::error!(error = %err, "core worker server failed");
        }
    });
    tokio::spawn(runtime::upkeep(Arc::downgrade(&worker)));
    Ok(())
}

fn host_of(address: &str) -> String {
    tls::host_of(address).to_string()
}

/// Where a driver finds its cluster: the control store's address, its node daemon's, and
/// the credential that starts its job (and reads the cluster until then).
struct Found {
    gcs_address: String,
    node_address: String,
    starter: Bearer,
    alive: usize,
}

async fn start_embedded(config: &InitConfig) -> IonetResult<Found> {
    ionet_worker::logging::init_when_asked();
    let cluster_config = ClusterConfig::load(None)?;
    let listener = rpc::listen("127.0.0.1", 0).await?;
    let gcs =
        GcsServer::start(GcsServerOptions::new(cluster_config.clone()), listener).await.map_err(IonetError::from)?;
    let gcs_address = gcs.address().to_string();
    let mut custom = ResourceSet::new();
    for (name, quantity) in &config.resources {
        custom.set(name.clone(), Quantity::from_f64(*quantity)?);
    }
    let spec = NodeSpec::build(Declared {
        num_cpus: config.num_cpus.map(Quantity::from_f64).transpose()?,
        num_gpus: config.num_gpus,
        gpu_type: config.gpu_type.clone(),
        custom,
        ..Default::default()
    })?;
    let cpus = spec.total.get(ionet_common::resources::CPU).as_f64().ceil() as usize;
    let max_blocked_workers = cluster_config.max_blocked_workers_for(cpus as f64);
    let node = NodeDaemon::start(NodeDaemonOptions {
        gcs_address: gcs_address.clone(),
        // The embedded cluster's node is the operator's own: it joins as the admin, with
        // a key that lives as long as the process.
        join_credential: gcs.admin_credential(Duration::from_secs(24 * 3600)),
        node_key: ionet_common::credential::KeyPair::generate(),
        config: cluster_config,
        spec,
        bind_host: "127.0.0.1".into(),
        port: 0,
        advertise_host: "127.0.0.1".into(),
        is_head: true,
        runs_workloads: true,
        workers: WorkerPoolOptions {
            idle_timeout: Duration::from_secs(60),
            max_idle_workers: cpus.max(1),
            log_dir: None,
            max_blocked_workers,
        },
        object_store_capacity: config.object_store_memory.unwrap_or(0),
        // The embedded cluster runs the program's own code: as the program's user.
        worker_identities: None,
        cluster_ca: None,
        // The program's own embedded cluster: no metrics server (ionet start serves one).
        metrics_port: None,
        keeps_view: true,
    })
    .await?;
    node.wait_registered(Duration::from_secs(30)).await?;
    let node_address = node.advertised_address().to_string();
    // The embedded cluster is the program's own: its job starts as the operator's.
    let starter = gcs.admin_credential(Duration::from_secs(24 * 3600));
    *EMBEDDED.lock().unwrap_or_else(|p| p.into_inner()) = Some(Embedded { gcs, node });
    Ok(Found { gcs_address, node_address, starter, alive: 1 })
}

async fn join(config: &InitConfig) -> IonetResult<Found> {
    let session = SessionDir::resolve(config.session_dir.as_deref());
    let address = match config.address.as_deref() {
        Some("auto") => session
            .head_address()
            .ok_or_else(|| IonetError::NotFound(format!("no head running in session {}", session.path().display())))?,
        Some(address) => address.to_string(),
        None => unreachable!("join is for a given address"),
    };
    session.trust_cluster_ca(&address)?;
    // The key that starts the job reads the cluster first (an account may read its nodes).
    let starter = job_starter(config, &session)?;
    let mut gcs = rpc::gcs_client(&address, &starter).await?;
    let nodes =
        gcs.get_all_nodes(GetAllNodesRequest { include_dead: false, ..Default::default() }).await?.into_inner().nodes;
    // A list of heads (an active one and its standbys) is on one network: the first's host.
    let host = host_of(ionet_common::failover::addresses(&address).first().copied().unwrap_or(&address));
    let alive: Vec<_> = nodes.into_iter().filter(|node| node.state == NodeState::Alive as i32).collect();
    // The node daemon asked for, else the one on this machine: the head's if the head is
    // here, else any local one.
    if let Some(wanted) = config.node_address.as_deref() {
        let node = alive.iter().find(|node| node.address == wanted).ok_or_else(|| {
            IonetError::NotFound(format!("no alive node of the cluster at {address} listens at {wanted}"))
        })?;
        return Ok(Found { gcs_address: address, node_address: node.address.clone(), starter, alive: alive.len() });
    }
    let local = alive
        .iter()
        .find(|node| node.is_head && host_of(&node.address) == host)
        .or_else(|| alive.iter().find(|node| host_of(&node.address) == host))
        .or_else(|| alive.first())
        .ok_or_else(|| IonetError::Unavailable(format!("the cluster at {address} has no alive node")))?;
    Ok(Found { gcs_address: address, node_address: local.address.clone(), starter, alive: alive.len() })
}

/// Waits (briefly) until the driver's node daemon knows every node the control store
/// listed: its view is refreshed each heartbeat, and until then its spillback decisions
/// would leave out nodes that joined just before this driver. Past the deadline the
/// driver goes on: a node that died meanwhile never appears. A view that is a sample of
/// a large cluster never holds every node: it is not waited for.
async fn wait_for_cluster_view(
    node: &mut NodeManagerClient,
    alive: usize,
) -> IonetResult<ionet_common::rpc::proto::node::GetNodeStatsReply> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = node.get_node_stats(ionet_common::rpc::proto::node::GetNodeStatsRequest {}).await?.into_inner();
        if stats.nodes_in_view as usize >= alive || stats.view_sampled || tokio::time::Instant::now() >= deadline {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the cluster a submitted job's entrypoint runs in is (as Ray's `RAY_ADDRESS`).
pub const ADDRESS_ENV: &str = "IONET_ADDRESS";
/// The node daemon a submitted job's entrypoint's drivers work through.
pub const DRIVER_NODE_ENV: &str = "IONET_DRIVER_NODE";

/// A submitted job's runtime environment (`IONET_RUNTIME_ENV`, set by the node running its
/// entrypoint) reaches its workers: their packages and `env_vars`, as Ray's does.
fn submitted_runtime_env(command: &mut WorkerCommand) -> IonetResult<()> {
    let Some(text) = std::env::var(ionet_worker::entrypoints::RUNTIME_ENV_ENV).ok().filter(|text| !text.is_empty())
    else {
        return Ok(());
    };
    #[derive(serde::Deserialize)]
    struct Submitted {
        #[serde(default)]
        working_dir: String,
        #[serde(default)]
        py_modules: Vec<String>,
        #[serde(default)]
        pip: Vec<String>,
        #[serde(default)]
        pip_options: Vec<String>,
        #[serde(default)]
        pip_tool: String,
        #[serde(default)]
        env_vars: std::collections::HashMap<String, String>,
    }
    let submitted: Submitted = serde_json::from_str(&text).map_err(|err| {
        IonetError::InvalidArgument(format!(
            "{} is not a runtime environment: {err}",
            ionet_worker::entrypoints::RUNTIME_ENV_ENV
        ))
    })?;
    command.env.extend(submitted.env_vars);
    // A program the job ships in its working dir (a Rust binary built elsewhere) is named
    // relative to it: each node starts the job's workers in its own unpacked copy.
    if !submitted.working_dir.is_empty() {
        let working_dir = std::env::var_os(ionet_worker::entrypoints::WORKING_DIR_ENV).map(std::path::PathBuf::from);
        if let (Some(program), Some(here)) = (command.argv.first_mut(), working_dir) {
            if let Ok(inside) = std::path::Path::new(program.as_str()).strip_prefix(&here) {
                *program = format!("./{}", inside.display());
            }
        }
    }
    command.packages = Some(ionet_common::rpc::proto::common::JobPackages {
        working_dir: submitted.working_dir,
        py_modules: submitted.py_modules,
        pip: submitted.pip,
        pip_options: submitted.pip_options,
        pip_tool: submitted.pip_tool,
    });
    Ok(())
}

/// The job's least reliability of a node in basis points: `share`, else
/// `IONET_MIN_RELIABILITY`, else 0 (any node).
fn min_reliability_bps(share: Option<f64>) -> IonetResult<u32> {
    let share = match share {
        Some(share) => share,
        None => match std::env::var("IONET_MIN_RELIABILITY") {
            Ok(text) if !text.trim().is_empty() => text.trim().parse::<f64>().map_err(|_| {
                IonetError::InvalidArgument(format!("IONET_MIN_RELIABILITY={text:?} is not a share such as 0.95"))
            })?,
            _ => return Ok(0),
        },
    };
    ionet_common::reliability::parse_share(share).map_err(IonetError::InvalidArgument)
}

async fn init_driver(mut config: InitConfig) -> IonetResult<()> {
    // Checked before anything starts.
    let min_reliability_bps = min_reliability_bps(config.min_reliability)?;
    let from_env =
        |name: &str| std::env::var(name).ok().map(|value| value.trim().to_string()).filter(|v| !v.is_empty());
    if config.address.is_none() {
        config.address = from_env(ADDRESS_ENV);
    }
    if config.address.is_some() && config.node_address.is_none() {
        config.node_address = from_env(DRIVER_NODE_ENV);
    }
    let Found { gcs_address, node_address, starter, alive } = match config.address {
        None => start_embedded(&config).await?,
        Some(_) => join(&config).await?,
    };
    let (listener, address) = serve_core_worker(&node_address).await?;
    let mut gcs = rpc::gcs_client(&gcs_address, &starter).await?;
    // The job's tasks and actors find named actors in the driver's namespace.
    let mut command = config.worker_command.clone().unwrap_or_else(worker_command);
    command.env.insert(NAMESPACE_ENV.to_string(), config.namespace.clone());
    submitted_runtime_env(&mut command)?;
    if let Some(runtime_env) = &config.runtime_env {
        crate::runtime_env::apply(&mut gcs, runtime_env, &mut command).await?;
    }
    let started = gcs
        .add_job(AddJobRequest {
            driver_address: address.clone(),
            driver_pid: std::process::id(),
            namespace: config.namespace.clone(),
            entrypoint: std::env::args().collect::<Vec<_>>().join(" "),
            // Empty: the account of the key (or, for the operator, `default`).
            payer_account: config.payer_account.clone(),
            // The only command node daemons will start the job's workers with.
            worker_command: Some(command),
            min_reliability_bps,
        })
        .await?
        .into_inner();
    let job =
        started.job.ok_or_else(|| IonetError::Internal("the control store added a job but returned none".into()))?;
    let job_id = JobId::from_bytes(&job.job_id)?;
    let credential = Bearer::new(&started.job_credential)?;
    ionet_common::worker_env::keep_memory_private();
    let head_key = Verifier::from_bytes(&started.head_key)?;
    let account = account_of(&credential, &head_key)?;
    // Node daemons (a provider's, maybe) see the job's credential only, never the key
    // that starts jobs for the account.
    let mut node = NodeManagerClient::new(rpc::connect(&node_address, &credential, Duration::from_secs(5)).await?);
    let stats = wait_for_cluster_view(&mut node, alive).await?;
    let node_id = NodeId::from_bytes(&stats.node.unwrap_or_default().node_id)?;
    let store_dir = stats.object_store_dir;
    let certificate = certificate_from(&node_address, &mut node).await?;
    let worker = CoreWorker::new(
        address,
        node_id,
        node_address,
        job_id,
        credential,
        head_key,
        &account,
        Vec::new(),
        None,
        gcs_address,
        config.namespace.clone(),
        config.inline_threshold.unwrap_or(DEFAULT_INLINE_THRESHOLD),
        &store_dir,
    );
    if let Some(budget) = config.lineage_budget_bytes {
        worker.lineage.set_budget(budget);
    }
    spawn_core_worker_server(worker.clone(), listener, certificate)?;
    if config.log_to_driver.unwrap_or(true) {
        *LOG_FOLLOWER.lock().unwrap_or_else(|p| p.into_inner()) = Some(crate::output::Follower::start(&worker));
    }
    runtime::install(worker);
    tracing::info!(job = %job_id, "driver connected");
    Ok(())
}

/// The driver's following of its job's output (`crate::output`), while it runs.
static LOG_FOLLOWER: std::sync::Mutex<Option<std::sync::Arc<crate::output::Follower>>> = std::sync::Mutex::new(None);
/// How long a stopping driver waits for the last of its workers' output.
const LOG_FLUSH_PATIENCE: Duration = Duration::from_secs(2);

/// Ends this driver's job: returns its leases, marks the job finished, and stops the
/// embedded cluster if `init` started one.
pub fn shutdown() {
    let Some(worker) = runtime::uninstall() else { return };
    // Ends the control store's watch on this driver: its non-detached actors die now.
    worker.stopping.send_replace(true);
    let follower = LOG_FOLLOWER.lock().unwrap_or_else(|p| p.into_inner()).take();
    block_on(async {
        // What the job's tasks printed last reaches this driver's output first.
        if let Some(follower) = follower {
            follower.finish(LOG_FLUSH_PATIENCE).await;
        }
        worker.return_idle_leases(true, Duration::ZERO).await;
        // The head hears how this driver's tasks ended before the job is finished.
        worker.task_events.flush(Duration::from_secs(2)).await;
        // The head hears the returns from the holder before the job is marked finished.
        worker.held.flush(Duration::from_secs(2)).await;
        if let Ok(mut gcs) = rpc::gcs_client(&worker.gcs_address, &worker.credential).await {
            let _ = gcs.mark_job_finished(MarkJobFinishedRequest { job_id: worker.job_id.to_vec() }).await;
        }
        let embedded = EMBEDDED.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(embedded) = embedded {
            embedded.node.shutdown("driver shut down").await;
            embedded.gcs.shutdown().await;
        }
    });
}

/// The worker process: serves tasks for its node daemon until told to stop.
fn run_worker() -> ! {
    // Before any thread: it dies with its daemon, and creates files for its user alone;
    // its credential is read and the variables naming its descriptors forgotten.
    let daemon = ionet_common::worker_env::settle_worker_process(|name| std::env::var(name).ok());
    let credential = ionet_common::worker_env::take_credential(|name| std::env::var(name).ok());
    ionet_common::worker_env::forget_process_vars();
    // A panicking task is reported to its caller with its message; one line here is enough.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("ionet worker {}: task panicked{location}", std::process::id());
    }));
    ionet_worker::logging::init_when_asked();
    let result: IonetResult<()> = block_on(async {
        let told = WorkerEnv::from_process().unwrap_or_else(|err| {
            eprintln!("ionet worker: {err}; worker processes are started by node daemons");
            std::process::exit(2)
        });
        if let Some(daemon) = daemon {
            // Forked by a forkserver: it ends with its daemon, whatever becomes of the server.
            // SAFETY: the pidfd is owned by the `AsyncFd` for as long as it lives.
            let watched = unsafe { tokio::io::unix::AsyncFd::register(daemon) }.map_err(std::io::Error::from)?;
            tokio::spawn(async move {
                let _gone = watched.readable().await;
                std::process::exit(1);
            });
        }
        let (node_address, worker_id) = (told.node_address.clone(), told.worker_id);
        let credential = Bearer::new(&credential?)?;
        // What this process holds (its job's credential) is not for other processes of
        // its user to read.
        ionet_common::worker_env::keep_memory_private();
        let head_key = Verifier::from_hex(&told.head_key)?;
        let account = account_of(&credential, &head_key)?;
        if !told.cluster_ca.is_empty() {
            tls::trust(&told.cluster_ca)?;
        }
        let (listener, address) = serve_core_worker(&node_address).await?;
        let mut node = NodeManagerClient::new(rpc::connect(&node_address, &credential, Duration::from_secs(10)).await?);
        let certificate = certificate_from(&node_address, &mut node).await?;
        let worker = CoreWorker::new(
            address.clone(),
            told.node_id,
            node_address.clone(),
            told.job_id,
            credential.clone(),
            head_key,
            &account,
            told.gpu_ids,
            Some(worker_id),
            told.gcs_address,
            std::env::var(NAMESPACE_ENV).unwrap_or_default(),
            DEFAULT_INLINE_THRESHOLD,
            &told.object_store_dir,
        );
        spawn_core_worker_server(worker.clone(), listener, certificate)?;
        runtime::install(worker);
        node.register_worker(RegisterWorkerRequest { worker_id: worker_id.to_vec(), address, pid: std::process::id() })
            .await?;
        if let Ok(worker) = runtime::current() {
            let lends = worker.borrows.lends_counter();
            let reporter =
                crate::blocked::BlockedReporter::start(&worker.handle, node.clone(), worker_id.to_vec(), lends);
            let _ = worker.blocked.set(reporter);
        }
        // Serve until the daemon kills this process (it dies with the daemon too).
        std::future::pending::<()>().await;
        Ok(())
    });
    match result {
        // The daemon that started this worker stopped before it registered (a cluster
        // shutting down): nobody is left to tell.
        Err(IonetError::Unavailable(_)) => std::process::exit(1),
        Err(err) => {
            eprintln!("ionet worker failed: {err}");
            std::process::exit(1);
        }
        Ok(()) => {}
    }
    std::process::exit(0)
}
