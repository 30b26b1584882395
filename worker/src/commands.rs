//! What each `ionet` command does: wiring of the control store, node daemon and
//! session directory. Argument parsing lives in [`crate::cli`].

use std::net::{IpAddr, ToSocketAddrs, UdpSocket};

use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ionet_common::auth::Bearer;
use ionet_common::config::ClusterConfig;
use ionet_common::credential::KeyPair;
use ionet_common::resources::{parse_usd, Quantity, ResourceSet};
use ionet_common::rpc::proto::common::{GpuCheckState, NodeInfo};
use ionet_common::rpc::proto::gcs::{ClearUntrustedRequest, CreateTokenRequest, GetAllNodesRequest};
use ionet_common::rpc::proto::node::node_manager_client::NodeManagerClient;
use ionet_common::rpc::proto::node::{DrainRequest, StreamLogsRequest};
use ionet_common::tls::{self, ClusterCa};
use ionet_common::{rpc, IonetError, JobId};
use ionet_gcs::storage::redis::HeadLease;
use ionet_gcs::storage::StorageLocation;
use ionet_gcs::{GcsServer, GcsServerOptions, HeadTls};
use tokio::net::TcpListener;

use crate::cli::{
    AccountCreateArgs, DrainArgs, HeadArgs, ListActorsArgs, LogsArgs, PayoutArgs, ResourceArgs, StartArgs, StatusArgs,
    StopArgs, TokenCreateArgs, TrustArgs,
};
use crate::identities::WorkerIdentities;
use crate::node_daemon::{NodeDaemon, NodeDaemonOptions};
use crate::node_spec::{parse_labels, parse_size, Declared, NodeSpec};
use crate::session::SessionDir;
use crate::{logging, status};

/// Set in the environment of a daemon that `ionet start` launched in the background.
const DAEMONIZED_ENV: &str = "IONET_DAEMONIZED";
/// How long the admin credential a head writes at start stays valid (a head started
/// again writes a fresh one).
const ADMIN_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

fn declared(args: &ResourceArgs) -> Result<Declared> {
    Ok(Declared {
        num_cpus: args.num_cpus.as_deref().map(str::parse::<Quantity>).transpose()?,
        num_gpus: args.num_gpus,
        gpu_type: args.gpu_type.clone(),
        gpu_memory_bytes: args.gpu_memory.as_deref().map(parse_size).transpose()?,
        memory_bytes: args.memory.as_deref().map(parse_size).transpose()?,
        custom: args.resources.as_deref().map(ResourceSet::from_json).transpose()?.unwrap_or_default(),
        labels: args.labels.as_deref().map(parse_labels).transpose()?.unwrap_or_default(),
        price_per_gpu_hour: args.price_per_gpu_hour.as_deref().map(parse_usd).transpose()?.unwrap_or(0),
        price_per_cpu_hour: args.price_per_cpu_hour.as_deref().map(parse_usd).transpose()?.unwrap_or(0),
        wallet: args.wallet.clone().unwrap_or_default(),
        power_watts: args.power_watts.unwrap_or(0),
        electricity_price_per_kwh: args.electricity_price.as_deref().map(parse_usd).transpose()?.unwrap_or(0),
    })
}

/// `ionet start`: in the foreground with `--block`, else relaunched in the background
/// and returned from once the daemon is ready.
pub fn start(args: StartArgs) -> Result<()> {
    if !args.head && args.address.is_none() {
        bail!("say what to start: --head for the head, or --address HOST:PORT to join one");
    }
    // Refuse bad declarations here, before anything is launched.
    NodeSpec::build(declared(&args.resources)?)?;
    check_payout_args(&args.payout, args.head)?;
    let session = SessionDir::resolve(args.session.temp_dir.as_deref());
    session.create()?;
    if args.block {
        let role = if args.head { "head" } else { "node" };
        let daemonized = std::env::var_os(DAEMONIZED_ENV).is_some();
        let _guard = logging::init_daemon(&session.logs(), &format!("{role}-{}.log", std::process::id()), !daemonized);
        // A connection per node at a head, per worker and peer at a node.
        match rpc::raise_descriptor_limit() {
            Ok(most) => tracing::info!(descriptors = most, "open descriptors allowed"),
            Err(err) => tracing::warn!(error = %err, "cannot raise the limit on open descriptors"),
        }
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return runtime.block_on(async {
            if args.head {
                run_head(args, session).await
            } else {
                run_node(args, session).await
            }
        });
    }
    launch_in_background(&args, &session)
}

/// The program to re-execute as the daemon: argv[0] when it is a path (an interpreter
/// such as a virtualenv's `python`, whose resolved executable would lose the virtualenv),
/// else this executable.
fn this_program() -> Result<std::path::PathBuf> {
    let invoked = std::env::args_os().next().map(std::path::PathBuf::from);
    match invoked {
        Some(path) if path.components().count() > 1 && path.is_file() => Ok(path),
        _ => Ok(std::env::current_exe()?),
    }
}

/// `argv` without `--join-token T` (or `--join-token=T`), and the token it named.
fn without_join_token(
    argv: impl IntoIterator<Item = std::ffi::OsString>,
) -> (Vec<std::ffi::OsString>, Option<std::ffi::OsString>) {
    let (mut kept, mut token) = (Vec::new(), None);
    let mut argv = argv.into_iter();
    while let Some(arg) = argv.next() {
        match arg.to_str() {
            Some("--join-token") => token = argv.next(),
            Some(text) if text.starts_with("--join-token=") => token = Some(text["--join-token=".len()..].into()),
            _ => kept.push(arg),
        }
    }
    (kept, token)
}

fn launch_in_background(args: &StartArgs, session: &SessionDir) -> Result<()> {
    let role = if args.head { "head" } else { "node" };
    // A join token travels to the daemon in its environment (private once it runs), never
    // on its command line, which every process on the machine may read.
    let (argv, join_token) = without_join_token(std::env::args_os().skip(1));
    let env: Vec<_> = join_token.into_iter().map(|token| ("IONET_JOIN_TOKEN", token)).collect();
    let pid = spawn_daemon(role, argv, &env, session, Duration::from_secs(args.connect_timeout + 30))?;
    if args.head {
        let address = session.head_address().unwrap_or_default();
        println!("ionet head started at {address} (pid {pid}); session {}", session.path().display());
        let pin = match session.cluster_ca().filter(|_| rpc::is_tls_address(&address)) {
            Some(pem) => format!(" --ca-hash {}", tls::ca_hash_of_pem(&pem)?),
            None => String::new(),
        };
        match create_token(&address, session, "node", Duration::from_secs(24 * 3600)) {
            Ok((join, _)) => println!(
                "join machines with: ionet start --address {address}{pin} --join-token {join}\n\
                 (the join token is valid 24 h; make more with `ionet token create --role node --ttl 24h`)"
            ),
            Err(err) => println!("could not make a join token ({err}); make one with `ionet token create --role node`"),
        }
    } else {
        println!("ionet node started (pid {pid}); session {}", session.path().display());
    }
    Ok(())
}

/// Relaunches this program with `argv --block` as a detached daemon of `session` and
/// returns its pid once it has written its pid file (`<role>-<pid>.pid`), which it does
/// when ready; its raw output goes to `logs/<role>.out`.
pub(crate) fn spawn_daemon(
    role: &str,
    argv: Vec<std::ffi::OsString>,
    env: &[(&str, std::ffi::OsString)],
    session: &SessionDir,
    timeout: Duration,
) -> Result<u32> {
    let out_path = session.logs().join(format!("{role}.out"));
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&out_path)?;
    let mut command = std::process::Command::new(this_program()?);
    command.envs(env.iter().map(|(name, value)| (name, value)));
    command
        .args(argv)
        .arg("--block")
        .arg("--temp-dir")
        .arg(session.path())
        .env(DAEMONIZED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(out));
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from this terminal's
    // session so that closing the terminal does not end it.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("cannot launch the daemon")?;
    let pid = child.id();
    let ready = session.pid_file(role, pid);
    let deadline = Instant::now() + timeout;
    while !ready.exists() {
        if let Some(exit) = child.try_wait()? {
            let log = std::fs::read_to_string(&out_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("the {role} exited during start-up ({exit}); its last output:\n{}", tail.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("the {role} (pid {pid}) did not become ready; see {}", session.logs().display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

/// The host other machines should use to reach this one.
fn advertise_host(explicit: Option<&str>, bind_host: &str, peer: Option<&str>) -> String {
    if let Some(host) = explicit {
        return host.to_string();
    }
    if bind_host != "0.0.0.0" && bind_host != "::" {
        return bind_host.to_string();
    }
    // The local address of the route to the head; connecting a UDP socket sends nothing.
    let route = peer.and_then(|peer| peer.to_socket_addrs().ok()?.next()).and_then(|peer| {
        let socket = UdpSocket::bind(if peer.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        socket.connect(peer).ok()?;
        socket.local_addr().ok().map(|local| local.ip())
    });
    match route {
        Some(IpAddr::V4(ip)) if !ip.is_unspecified() => ip.to_string(),
        Some(IpAddr::V6(ip)) if !ip.is_unspecified() => format!("[{ip}]"),
        _ => "127.0.0.1".to_string(),
    }
}

pub(crate) async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// Refuses an incomplete payout configuration before anything is launched.
fn check_payout_args(args: &PayoutArgs, head: bool) -> Result<()> {
    if args.rpc_url.is_none() {
        return Ok(());
    }
    if !head {
        bail!("--payout-rpc-url is for the head (--head): nodes do not pay");
    }
    if !cfg!(feature = "solana") {
        bail!("--payout-rpc-url needs an ionet binary built with Solana payouts (cargo feature `solana`)");
    }
    if args.keypair.is_none() || args.asset.is_none() {
        bail!("--payout-rpc-url needs --payout-keypair and --payout-asset");
    }
    Ok(())
}

/// Adds Solana payouts to the head's options when `--payout-rpc-url` is given.
#[cfg(feature = "solana")]
fn configure_payouts(options: &mut GcsServerOptions, args: &PayoutArgs, session: &SessionDir) -> Result<()> {
    let (Some(rpc_url), Some(keypair), Some(asset)) = (&args.rpc_url, &args.keypair, &args.asset) else {
        return Ok(());
    };
    let store = args.store.clone().unwrap_or_else(|| session.path().join("payouts.redb"));
    options.payouts = Some(ionet_gcs::payouts::PayoutSettings::rpc(rpc_url, keypair, asset, store)?);
    Ok(())
}

#[cfg(not(feature = "solana"))]
fn configure_payouts(_options: &mut GcsServerOptions, _args: &PayoutArgs, _session: &SessionDir) -> Result<()> {
    Ok(())
}

/// Stands by until this head holds the head lease on the Redis at `url`, then keeps it
/// renewed in the background: a renewal refused (another head took it) or not confirmed
/// within two thirds of the lease ends the process, before the lease can pass on.
async fn take_head_lease(url: &str, args: &StartArgs) -> Result<Arc<HeadLease>> {
    let ttl = parse_duration(&args.head_lease).with_context(|| format!("--head-lease {:?}", args.head_lease))?;
    if ttl < Duration::from_millis(300) {
        bail!("--head-lease must be at least 300ms, got {}", args.head_lease);
    }
    let label = format!("{}:{}", args.node_ip_address.as_deref().unwrap_or(&args.host), args.port);
    let (url, label_for_open) = (url.to_string(), label.clone());
    let lease = Arc::new(
        tokio::task::spawn_blocking(move || {
            HeadLease::new(&url, &label_for_open, ttl).map(HeadLease::exiting_when_fenced)
        })
        .await
        .context("head lease")??,
    );
    let mut said = false;
    loop {
        let taking = lease.clone();
        let taken = tokio::task::spawn_blocking(move || taking.try_take()).await.context("head lease")?;
        match taken {
            Ok(true) => break,
            Ok(false) => {
                if !said {
                    let holder = lease.holder_now().ok().flatten().unwrap_or_default();
                    tracing::info!(head = %label, active = %holder, "standing by: another head holds the head lease");
                    said = true;
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot reach the head lease's Redis; asking again"),
        }
        // Asked often (one SET a time): the standby takes over a tenth of the lease after
        // it lapses, at most.
        tokio::time::sleep(ttl / 10).await;
    }
    tracing::info!(head = %label, lease = ?ttl, "holding the head lease: this head is active");
    let keeper = lease.clone();
    tokio::spawn(async move {
        let mut confirmed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(ttl / 3).await;
            let renewing = keeper.clone();
            // A renewal that hangs (Redis unreachable) counts as failed once the lease
            // could lapse: waited for no longer than what is left of two thirds of it.
            let left = (ttl * 2 / 3).saturating_sub(confirmed.elapsed());
            match tokio::time::timeout(left, tokio::task::spawn_blocking(move || renewing.renew())).await {
                Ok(Ok(Ok(true))) => confirmed = tokio::time::Instant::now(),
                Ok(Ok(Ok(false))) => {
                    tracing::error!("another head holds the head lease now: this head stops");
                    std::process::exit(1);
                }
                Ok(Ok(Err(err))) => tracing::warn!(error = %err, "could not renew the head lease; trying again"),
                Ok(Err(err)) => tracing::warn!(error = %err, "renewing the head lease failed; trying again"),
                Err(_) => {}
            }
            if confirmed.elapsed() >= ttl * 2 / 3 {
                tracing::error!("the head lease could not be renewed in time: this head stops before it lapses");
                std::process::exit(1);
            }
        }
    });
    Ok(lease)
}

async fn run_head(args: StartArgs, session: SessionDir) -> Result<()> {
    // The head holds the signing key and the operator's credential.
    ionet_common::worker_env::keep_memory_private();
    let mut config = ClusterConfig::load(args.config.as_deref())?;
    if let Some(horizon) = &args.credit_horizon {
        config.credit_horizon_ms = parse_duration(horizon)
            .with_context(|| format!("--credit-horizon {horizon:?}"))?
            .as_millis()
            .try_into()
            .context("--credit-horizon is too long")?;
    }
    let storage = args.storage.as_deref().map(StorageLocation::parse).unwrap_or_default();
    // On Redis, heads share the tables: this one serves only once it holds the head lease.
    let head_lease = match &storage {
        StorageLocation::Redis(url) => Some(take_head_lease(url, &args).await?),
        _ => None,
    };
    let listener = ionet_common::rpc::listen(&args.host, args.port)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let port = listener.local_addr()?.port();
    let mut options = GcsServerOptions::new(config.clone());
    options.storage = storage.clone();
    options.head_lease = head_lease;
    options.ledger_path = Some(args.ledger.clone().unwrap_or_else(|| session.path().join("ledger.redb")));
    options.usage_export_path = args.usage_export.clone();
    options.job_dir = Some(session.jobs());
    // The signing key lives beside a tables file, else with the session (a head on Redis
    // and its standby share a session directory, or the operator copies it).
    options.signing_key_path = Some(match &storage {
        StorageLocation::File(file) => file.with_extension("signing_key"),
        _ => session.signing_key(),
    });
    configure_payouts(&mut options, &args.payout, &session)?;
    let host = advertise_host(args.node_ip_address.as_deref(), &args.host, None);
    // TLS when asked, and always when other machines can reach the head.
    let cluster_ca = if args.tls || !tls::is_loopback_host(&args.host) {
        let (key, certificate) = match &storage {
            StorageLocation::File(file) => (file.with_extension("ca_key"), file.with_extension("ca.pem")),
            _ => session.ca_paths(),
        };
        let ca = Arc::new(ClusterCa::load_or_create(&key, &certificate)?);
        session.write_cluster_ca(&ca.pem())?;
        tls::trust(&ca.pem())?;
        let mut hosts = vec![host.clone(), "127.0.0.1".to_string(), "localhost".to_string()];
        hosts.dedup();
        options.tls = Some(HeadTls { ca: ca.clone(), hosts });
        Some(ca.pem())
    } else {
        None
    };
    let gcs = GcsServer::start(options, listener).await?;
    let scheme = if cluster_ca.is_some() { "https://" } else { "" };
    let address = format!("{scheme}{host}:{port}");
    let admin = gcs.admin_credential(ADMIN_CREDENTIAL_TTL);
    session.write_admin_credential(&admin)?;
    // Drivers and this head's node follow whichever head is active: every head's address.
    let heads = match args.other_heads.as_deref().map(str::trim).filter(|others| !others.is_empty()) {
        // One scheme for all: this head's (every head of a cluster speaks TLS, or none).
        Some(others) => {
            ionet_common::failover::one_scheme(&format!("{address},{others}")).map_err(|err| anyhow!(err))?
        }
        None => address.clone(),
    };
    session.write_head_address(&heads)?;
    let job_server = gcs.serve_jobs(bind_job_server(&args).await?, &heads)?;
    let http_scheme = if cluster_ca.is_some() { "https://" } else { "http://" };
    session.write_job_server_address(&format!("{http_scheme}{host}:{}", job_server.port()))?;
    let node_key = KeyPair::load_or_create(&args.node_key.clone().unwrap_or_else(|| session.node_key()))?;

    let spec = NodeSpec::build(declared(&args.resources)?)?;
    let workers = worker_pool_options(&session, &spec, &config);
    let node = NodeDaemon::start(NodeDaemonOptions {
        gcs_address: heads.clone(),
        // The head's own node registers as the operator's machine.
        join_credential: admin,
        node_key,
        config,
        spec,
        bind_host: args.host.clone(),
        port: args.node_manager_port,
        advertise_host: host,
        is_head: true,
        // The process holding the payout keypair runs no tenant code unless allowed.
        runs_workloads: args.payout.rpc_url.is_none() || args.allow_head_workloads,
        workers,
        object_store_capacity: args.object_store_memory.as_deref().map(parse_size).transpose()?.unwrap_or(0),
        worker_identities: worker_identities(&args, &session)?,
        cluster_ca,
        metrics_port: Some(args.metrics_port),
        keeps_view: true,
    })
    .await?;
    node.wait_registered(Duration::from_secs(args.connect_timeout)).await?;
    let pid_file = session.write_pid("head", std::process::id())?;
    tracing::info!(%address, node = %node.node_id(), "head ready");

    let signal = wait_for_signal().await;
    tracing::info!(signal, "head shutting down");
    node.shutdown(signal).await;
    gcs.shutdown().await;
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

/// Ray's job server port.
const DEFAULT_DASHBOARD_PORT: u16 = 8265;

/// The job server's socket: `--dashboard-port`, else 8265, else (taken: another head on
/// this machine) any free port.
async fn bind_job_server(args: &StartArgs) -> Result<TcpListener> {
    let port = args.dashboard_port.unwrap_or(DEFAULT_DASHBOARD_PORT);
    match ionet_common::rpc::listen(&args.host, port).await {
        Ok(listener) => Ok(listener),
        Err(err) if args.dashboard_port.is_none() && err.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(port, "the job server's default port is taken: serving on a free one");
            Ok(ionet_common::rpc::listen(&args.host, 0).await?)
        }
        Err(err) => Err(anyhow!("cannot listen on {}:{port} for the job server (--dashboard-port): {err}", args.host)),
    }
}

/// The head to talk to: `explicit`, else the one this machine's session started.
/// Trusts its cluster CA if it serves TLS (see [`SessionDir::trust_cluster_ca`]).
pub(crate) fn resolve_head_address(explicit: Option<&str>, session: &SessionDir) -> Result<String> {
    let address = explicit.map(str::to_string).or_else(|| session.head_address()).ok_or_else(|| {
        anyhow!(
            "no head address: pass --address HOST:PORT, or start a head on this machine (none found in {})",
            session.path().display()
        )
    })?;
    session.trust_cluster_ca(&address)?;
    Ok(address)
}

/// Asks the head for a token for `role` (with the session's admin credential): the token
/// and when it expires (seconds since the Unix epoch).
fn create_token(address: &str, session: &SessionDir, role: &str, ttl: Duration) -> Result<(String, u64)> {
    let admin = resolve_admin_credential(None, session)?;
    session.trust_cluster_ca(address)?;
    call_create_token(address, &admin, role, "", ttl)
}

fn call_create_token(address: &str, admin: &Bearer, role: &str, account: &str, ttl: Duration) -> Result<(String, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = rpc::gcs_client(address, admin).await?;
        let request =
            CreateTokenRequest { role: role.to_string(), ttl_seconds: ttl.as_secs(), account: account.to_string() };
        let reply = client.create_token(request).await.map_err(IonetError::from)?.into_inner();
        Ok((reply.token, reply.expires_at))
    })
}

/// What an operator's command needs: the head's address, the admin credential, and the
/// `ttl` it was given, parsed.
fn operator_call(head: &HeadArgs, ttl: &str) -> Result<(String, Bearer, Duration)> {
    logging::init_client();
    let session = SessionDir::resolve(head.session.temp_dir.as_deref());
    let address = resolve_head_address(head.address.as_deref(), &session)?;
    let admin = resolve_admin_credential(head.credential.as_deref(), &session)?;
    Ok((address, admin, parse_duration(ttl)?))
}

/// `ionet logs --job J [--actor A] [--node N] [--follow]`: what the job's workers (or one actor) printed on each
/// live node (or one), each line with its prefix; with `--follow`, what they print next
/// too. Reading another's job needs the admin credential (or the job's own).
pub fn logs(args: LogsArgs) -> Result<()> {
    let session = SessionDir::resolve(args.head.session.temp_dir.as_deref());
    let address = resolve_head_address(args.head.address.as_deref(), &session)?;
    let credential = resolve_reader_credential(args.head.credential.as_deref(), &session)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut gcs = rpc::gcs_client(&address, &credential).await?;
        // An actor's: its job, its node and its worker.
        let (job, actor_node, worker_address) = match &args.actor {
            Some(actor) => {
                let (job, node, worker) = find_actor(&mut gcs, actor).await?;
                if let Some(named) = &args.job {
                    if named.parse::<JobId>()? != job {
                        bail!("actor {actor} is of job {job}, not {named}");
                    }
                }
                (job, Some(node), worker)
            }
            None => (args.job.as_deref().unwrap_or_default().parse::<JobId>()?, None, String::new()),
        };
        let nodes = gcs
            .get_all_nodes(GetAllNodesRequest { include_dead: false, ..Default::default() })
            .await
            .map_err(IonetError::from)?;
        let wanted = args.node.as_deref().map(|node| node.trim().to_ascii_lowercase());
        let nodes: Vec<_> = nodes
            .into_inner()
            .nodes
            .into_iter()
            .filter(|node| wanted.as_ref().is_none_or(|wanted| hex::encode(&node.node_id).starts_with(wanted)))
            .filter(|node| actor_node.as_ref().is_none_or(|actor_node| *actor_node == node.node_id))
            .collect();
        if nodes.is_empty() {
            match &args.actor {
                Some(actor) => bail!("actor {actor} runs on no live node (matching --node)"),
                None => bail!("no live node's id starts with {:?} (see `ionet status`)", args.node.unwrap_or_default()),
            }
        }
        let mut streams = Vec::new();
        for node in nodes {
            let channel = rpc::connect(&node.address, &credential, Duration::from_secs(5)).await?;
            let request = StreamLogsRequest { job_id: job.to_vec(), worker_address: worker_address.clone() };
            let mut client = NodeManagerClient::new(channel).max_decoding_message_size(rpc::DEFAULT_MAX_MESSAGE_BYTES);
            let stream = client.stream_logs(request).await.map_err(IonetError::from)?;
            streams.push((crate::logs::ip_of(&node.address).to_string(), stream.into_inner()));
        }
        // Each node's batches up to the first caught up hold all it has so far; with
        // --follow, the next ones too.
        let printers = streams.into_iter().map(|(ip, mut stream)| async move {
            while let Some(batch) = stream.message().await.map_err(IonetError::from)? {
                let mut out = std::io::stdout().lock();
                for line in &batch.lines {
                    writeln!(out, "{} {}", crate::logs::prefix_of(line, &ip), line.text)?;
                }
                out.flush()?;
                if !args.follow && batch.caught_up {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
        });
        for printed in futures::future::join_all(printers).await {
            printed?;
        }
        Ok(())
    })
}

/// The live actor `wanted` names (its id or a prefix of it, or its name): its job, its
/// node's id and its worker's address.
async fn find_actor(gcs: &mut rpc::GcsClient, wanted: &str) -> Result<(JobId, Vec<u8>, String)> {
    let wanted = wanted.trim();
    let reply = gcs
        .list_actors(ionet_common::rpc::proto::gcs::ListActorsRequest { include_dead: true })
        .await
        .map_err(IonetError::from)?;
    let lowered = wanted.to_ascii_lowercase();
    let matching: Vec<_> = reply
        .into_inner()
        .actors
        .into_iter()
        .filter(|actor| {
            let spec = actor.spec.clone().unwrap_or_default();
            spec.name == wanted || (lowered.len() >= 4 && hex::encode(&spec.actor_id).starts_with(&lowered))
        })
        .collect();
    // A live actor first (a name may have been used by actors that died before it).
    let live: Vec<_> = matching.iter().filter(|actor| !actor.address.is_empty()).cloned().collect();
    let actor = match (live.as_slice(), matching.as_slice()) {
        ([actor], _) | ([], [actor]) => actor.clone(),
        ([], []) => bail!("no actor has the id or name {wanted:?} (see `ionet list actors --all`)"),
        ([], _) => bail!("no actor {wanted:?} is running (see `ionet list actors --all`)"),
        (several, _) => {
            bail!("{} running actors match {wanted:?} (in different namespaces?): give its id", several.len())
        }
    };
    let spec = actor.spec.clone().unwrap_or_default();
    if actor.address.is_empty() {
        let state = ionet_common::rpc::proto::gcs::ActorState::try_from(actor.state)
            .map(|state| state.as_str_name().to_string())
            .unwrap_or_else(|_| actor.state.to_string());
        bail!("actor {wanted} is {state}, not running: what it printed is in its job's logs (--job)");
    }
    Ok((JobId::from_bytes(&spec.job_id)?, actor.node_id, actor.address))
}

/// `ionet drain --node N --deadline 60s`: gives the node notice to leave, then waits
/// until it has left the cluster (its deadline, and a little more).
pub fn drain(args: DrainArgs) -> Result<()> {
    let (address, admin, deadline) = operator_call(&args.head, &args.deadline)?;
    SessionDir::resolve(args.head.session.temp_dir.as_deref()).trust_cluster_ca(&address)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut gcs = rpc::gcs_client(&address, &admin).await?;
        let node = find_node(&mut gcs, &args.node, false).await?;
        let channel = rpc::connect(&node.address, &admin, Duration::from_secs(5)).await?;
        let request = DrainRequest {
            deadline_ms: deadline.as_millis() as u64,
            reason: "notice from the operator (ionet drain)".into(),
        };
        NodeManagerClient::new(channel).drain(request).await.map_err(IonetError::from)?;
        let short = &hex::encode(&node.node_id)[..8];
        eprintln!("node {short} given notice to leave: its running tasks have {deadline:?}");
        let margin = Duration::from_secs(15);
        let until = std::time::Instant::now() + deadline + margin;
        loop {
            let live = gcs
                .get_all_nodes(GetAllNodesRequest { include_dead: false, ..Default::default() })
                .await
                .map_err(IonetError::from)?;
            if !live.into_inner().nodes.iter().any(|live| live.node_id == node.node_id) {
                println!("node {short} left the cluster");
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                bail!("node {short} had not left {margin:?} after its deadline");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The node whose id starts with `prefix` (one only), among the live ones or, with
/// `include_dead`, all.
async fn find_node(gcs: &mut rpc::GcsClient, prefix: &str, include_dead: bool) -> Result<NodeInfo> {
    let nodes =
        gcs.get_all_nodes(GetAllNodesRequest { include_dead, ..Default::default() }).await.map_err(IonetError::from)?;
    let wanted = prefix.trim().to_ascii_lowercase();
    let matching: Vec<_> =
        nodes.into_inner().nodes.into_iter().filter(|node| hex::encode(&node.node_id).starts_with(&wanted)).collect();
    let which = if include_dead { "" } else { "live " };
    match matching.as_slice() {
        [node] => Ok(node.clone()),
        [] => bail!("no {which}node's id starts with {prefix:?} (see `ionet status`)"),
        _ => bail!("{} {which}nodes' ids start with {prefix:?}: give more of the id", matching.len()),
    }
}

/// `ionet trust --node N`: the operator clears a node marked untrusted.
pub fn trust(args: TrustArgs) -> Result<()> {
    let (address, admin, _) = operator_call(&args.head, "0s")?;
    SessionDir::resolve(args.head.session.temp_dir.as_deref()).trust_cluster_ca(&address)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut gcs = rpc::gcs_client(&address, &admin).await?;
        // A dead node may be cleared too, before it comes back.
        let node = find_node(&mut gcs, &args.node, true).await?;
        let request = ClearUntrustedRequest { node_id: node.node_id.clone() };
        let check =
            gcs.clear_untrusted(request).await.map_err(IonetError::from)?.into_inner().check.unwrap_or_default();
        let short = &hex::encode(&node.node_id)[..8];
        if check.state == GpuCheckState::Passed as i32 {
            println!("node {short} is trusted again and takes work: its latest GPU check passed");
        } else {
            println!("node {short} is trusted again: it takes work once it passes the GPU check it is now asked for");
        }
        Ok(())
    })
}

/// `ionet token create`.
pub fn token_create(args: TokenCreateArgs) -> Result<()> {
    let (address, admin, ttl) = operator_call(&args.head, &args.ttl)?;
    let (token, expires_at) = call_create_token(&address, &admin, &args.role, "", ttl)?;
    if args.json {
        println!("{}", serde_json::json!({ "token": token, "role": args.role, "expires_at": expires_at }));
    } else {
        println!("{token}");
        if args.role == "metrics" || args.role == "node-metrics" {
            eprintln!(
                "valid until {expires_at} (Unix seconds); a Prometheus scrape job sends it as its bearer credential \
                 (`authorization: {{credentials_file: …}}`) to the head's /metrics"
            );
        } else {
            eprintln!(
                "valid until {expires_at} (Unix seconds); join with: ionet start --address {address} --join-token <it>"
            );
        }
    }
    Ok(())
}

/// `ionet account create NAME`: the account's API key, for its drivers
/// (`IONET_API_KEY`); their jobs are paid by the account.
pub fn account_create(args: AccountCreateArgs) -> Result<()> {
    let (address, admin, ttl) = operator_call(&args.head, &args.ttl)?;
    let (key, expires_at) = call_create_token(&address, &admin, "account", &args.name, ttl)?;
    if args.json {
        println!("{}", serde_json::json!({ "account": args.name, "api_key": key, "expires_at": expires_at }));
    } else {
        println!("{key}");
        eprintln!("the API key of account {}; its drivers pass it as IONET_API_KEY", args.name);
    }
    Ok(())
}

/// A duration as an operator writes one: seconds, or `30m`, `24h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("duration {text:?}: the unit is s, m, h or d (e.g. 24h)"),
    };
    let number: u64 =
        number.parse().map_err(|_| anyhow!("duration {text:?} is not a whole number with a unit (e.g. 24h)"))?;
    number.checked_mul(seconds_per).map(Duration::from_secs).ok_or_else(|| anyhow!("duration {text:?} is too long"))
}

/// The operator's credential: `explicit` (`--credential` / `IONET_CREDENTIAL`), else the
/// one the head wrote into the session directory.
pub(crate) fn resolve_admin_credential(explicit: Option<&str>, session: &SessionDir) -> Result<Bearer> {
    resolve_credential(explicit, session, "this call is the operator's alone (money, accounts, tokens)")
}

/// A credential to read the cluster with (nodes, prices, usage): `explicit`
/// (`--credential` / `IONET_CREDENTIAL`: a tenant's API key does), else the operator's in
/// the session directory.
pub(crate) fn resolve_reader_credential(explicit: Option<&str>, session: &SessionDir) -> Result<Bearer> {
    resolve_credential(explicit, session, "reading the cluster needs an API key or the admin credential")
}

fn resolve_credential(explicit: Option<&str>, session: &SessionDir, why: &str) -> Result<Bearer> {
    match explicit {
        Some(text) => Ok(Bearer::new(text)?),
        None => session.admin_credential().ok_or_else(|| {
            anyhow!(
                "no credential: {why}; pass --credential or set IONET_CREDENTIAL (on the head's machine, the head \
                 wrote the admin credential to {})",
                session.path().join("admin_credential").display()
            )
        }),
    }
}

async fn run_node(args: StartArgs, session: SessionDir) -> Result<()> {
    // The node holds its key and its credential: not for its workers (same user) to read.
    ionet_common::worker_env::keep_memory_private();
    let config = ClusterConfig::load(args.config.as_deref())?;
    let given = args.address.clone().expect("checked by start");
    // A pinned CA hash means the head serves TLS, whatever the address says.
    let gcs_address = match &args.ca_hash {
        Some(_) => ionet_common::failover::addresses(&given)
            .iter()
            .map(|head| format!("https://{}", head.trim_start_matches("http://").trim_start_matches("https://")))
            .collect::<Vec<_>>()
            .join(","),
        None => ionet_common::failover::one_scheme(&given).map_err(|err| anyhow!(err))?,
    };
    let cluster_ca = join_cluster_ca(&gcs_address, args.ca_hash.as_deref(), &session).await?;
    let join_credential = match args.join_token.as_deref() {
        Some(join) => Bearer::new(join)?,
        None => session.admin_credential().ok_or_else(|| {
            anyhow!(
                "no join token: a node joins with one the operator makes on the head (`ionet token create --role node`); \
                 pass --join-token or set IONET_JOIN_TOKEN"
            )
        })?,
    };
    let node_key = KeyPair::load_or_create(&args.node_key.clone().unwrap_or_else(|| session.node_key()))?;
    let spec = NodeSpec::build(declared(&args.resources)?)?;
    let workers = worker_pool_options(&session, &spec, &config);
    let node = NodeDaemon::start(NodeDaemonOptions {
        advertise_host: advertise_host(
            args.node_ip_address.as_deref(),
            &args.host,
            // The first head's host (every head of a list is on the operator's network).
            ionet_common::failover::addresses(&gcs_address).first().map(|head| head.trim_start_matches("https://")),
        ),
        gcs_address: gcs_address.clone(),
        join_credential,
        node_key,
        config,
        spec,
        bind_host: args.host.clone(),
        port: args.node_manager_port,
        is_head: false,
        runs_workloads: true,
        workers,
        object_store_capacity: args.object_store_memory.as_deref().map(parse_size).transpose()?.unwrap_or(0),
        worker_identities: worker_identities(&args, &session)?,
        cluster_ca,
        metrics_port: Some(args.metrics_port),
        keeps_view: true,
    })
    .await?;
    if let Err(err) = node.wait_registered(Duration::from_secs(args.connect_timeout)).await {
        node.shutdown("could not join").await;
        bail!("could not join the head at {gcs_address}: {err}");
    }
    let pid_file = session.write_pid("node", std::process::id())?;
    let own_deadline = Duration::from_secs(args.drain_deadline);
    let (deadline, reason) = tokio::select! {
        signal = wait_for_signal() => (own_deadline, signal.to_string()),
        (deadline, reason) = node.notice() => (if deadline.is_zero() { own_deadline } else { deadline }, reason),
    };
    tracing::info!(%reason, ?deadline, "node leaving: draining first");
    node.drain(deadline, &reason).await;
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

/// The CA of the cluster a node joins, if its head serves TLS: fetched from the head and
/// trusted only if its hash is `ca_hash`; without a hash, the one in this machine's
/// session (the head's own machine). Written to the session for this machine's commands.
async fn join_cluster_ca(address: &str, ca_hash: Option<&str>, session: &SessionDir) -> Result<Option<String>> {
    if !rpc::is_tls_address(address) {
        return Ok(None);
    }
    let pem = match ca_hash {
        Some(hash) => {
            // The first head of a list that answers (the heads share the cluster's CA).
            let mut fetched = Err(anyhow!("no head address in {address:?}"));
            for head in ionet_common::failover::addresses(address) {
                fetched = tls::fetch_ca(head, hash, Duration::from_secs(10))
                    .await
                    .with_context(|| format!("cannot trust the head at {head}"));
                if fetched.is_ok() {
                    break;
                }
            }
            let pem = fetched?;
            session.write_cluster_ca(&pem)?;
            pem
        }
        None => session.cluster_ca().ok_or_else(|| {
            anyhow!("the head at {address} serves TLS: pass --ca-hash sha256:... as `ionet start --head` printed it")
        })?,
    };
    tls::trust(&pem)?;
    Ok(Some(pem))
}

/// Who jobs' workers run as on this machine (see `crate::identities`): a uid per job when
/// the daemon is root, unless the operator insists on the daemon's own user.
fn worker_identities(args: &StartArgs, session: &SessionDir) -> Result<Option<Arc<WorkerIdentities>>> {
    if args.workers_as_daemon_user {
        tracing::warn!(
            "--insecure-workers-as-daemon-user: jobs' workers run as this daemon's user and can read its key, \
             its session and every job's objects"
        );
        return Ok(None);
    }
    match WorkerIdentities::new(args.worker_uid_base, session.path().join("worker_uids"))? {
        Some(identities) => Ok(Some(Arc::new(identities))),
        None => {
            tracing::warn!(
                "not running as root: jobs' workers run as this daemon's user (start the node daemon as root so \
                 that each job runs as a user of its own and cannot read the node's key or other jobs' objects)"
            );
            Ok(None)
        }
    }
}

fn worker_pool_options(
    session: &SessionDir,
    spec: &NodeSpec,
    config: &ClusterConfig,
) -> crate::lease::WorkerPoolOptions {
    let cpus = spec.total.get(ionet_common::resources::CPU).as_f64();
    crate::lease::WorkerPoolOptions {
        idle_timeout: Duration::from_secs(60),
        max_idle_workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2),
        log_dir: Some(session.logs()),
        max_blocked_workers: config.max_blocked_workers_for(cpus),
    }
}

/// `ionet status`.
pub fn status(args: StatusArgs) -> Result<()> {
    logging::init_client();
    let session = SessionDir::resolve(args.session.temp_dir.as_deref());
    let address = resolve_head_address(args.address.as_deref(), &session)?;
    let credential = resolve_reader_credential(args.credential.as_deref(), &session)?;
    if args.actors {
        return show_actors(&address, &credential, args.all, args.json);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let nodes = runtime.block_on(async {
        let mut client = ionet_common::rpc::gcs_client(&address, &credential).await?;
        let reply = client.get_all_nodes(GetAllNodesRequest { include_dead: true, ..Default::default() }).await?;
        Ok::<_, ionet_common::IonetError>(reply.into_inner().nodes)
    })?;
    let now = ionet_common::clock::now_ms();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status::nodes_json(&nodes, now)?)?);
    } else {
        print!("{}", status::nodes_table(&nodes, now)?);
    }
    Ok(())
}

/// Asks the head `head` names with a reader's credential (an API key, or the operator's
/// from the session directory): `ask` gets a connected client, on a runtime of the
/// command's own. The state API's commands read the head through this.
pub(crate) fn ask_head<T, F>(head: &HeadArgs, ask: impl FnOnce(rpc::GcsClient) -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<T, IonetError>>,
{
    logging::init_client();
    let session = SessionDir::resolve(head.session.temp_dir.as_deref());
    let address = resolve_head_address(head.address.as_deref(), &session)?;
    let credential = resolve_reader_credential(head.credential.as_deref(), &session)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(runtime.block_on(async { ask(rpc::gcs_client(&address, &credential).await?).await })?)
}

/// `ionet list actors`.
pub fn list_actors(args: ListActorsArgs) -> Result<()> {
    let include_dead = args.all;
    let actors = ask_head(&args.head, |mut gcs| async move {
        let request = ionet_common::rpc::proto::gcs::ListActorsRequest { include_dead };
        Ok(gcs.list_actors(request).await?.into_inner().actors)
    })?;
    print_actors(&actors, args.json)
}

fn show_actors(address: &str, credential: &Bearer, include_dead: bool, json: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let actors = runtime.block_on(async {
        let mut client = ionet_common::rpc::gcs_client(address, credential).await?;
        let reply = client.list_actors(ionet_common::rpc::proto::gcs::ListActorsRequest { include_dead }).await?;
        Ok::<_, ionet_common::IonetError>(reply.into_inner().actors)
    })?;
    print_actors(&actors, json)
}

fn print_actors(actors: &[ionet_common::rpc::proto::gcs::ActorInfo], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&status::actors_json(actors)?)?);
    } else {
        print!("{}", status::actors_table(actors)?);
    }
    Ok(())
}

pub(crate) fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc tells it apart.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')).unwrap_or(false)
}

fn is_ionet_daemon(pid: u32) -> bool {
    // Guards against a pid reused by an unrelated process since the file was written.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline.split(|byte| *byte == 0).any(|arg| arg == b"--block")
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid we read and checked; no memory is touched.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// `ionet stop`: nodes first (so they can drain to a live head), then heads.
pub fn stop(args: StopArgs) -> Result<()> {
    logging::init_client();
    let session = SessionDir::resolve(args.session.temp_dir.as_deref());
    let daemons = session.daemons();
    let mut stopped = 0;
    // A local chain (`ionet devnet start`) last: the head may be paying through it.
    for role in ["node", "head", "devnet"] {
        let group: Vec<_> = daemons.iter().filter(|daemon| daemon.role == role).collect();
        for daemon in &group {
            if alive(daemon.pid) && is_ionet_daemon(daemon.pid) {
                signal(daemon.pid, if args.force { libc::SIGKILL } else { libc::SIGTERM });
            }
        }
        let deadline = Instant::now() + Duration::from_secs(args.grace_period);
        for daemon in &group {
            while alive(daemon.pid) && is_ionet_daemon(daemon.pid) {
                if Instant::now() > deadline {
                    eprintln!(
                        "{} (pid {}) did not stop within {}s; killing it",
                        daemon.role, daemon.pid, args.grace_period
                    );
                    signal(daemon.pid, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_file(&daemon.path);
            stopped += 1;
        }
    }
    if stopped == 0 {
        println!("no ionet daemons to stop in {}", session.path().display());
    } else {
        println!("stopped {stopped} ionet daemon(s) of {}", session.path().display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_token_leaves_the_command_line() {
        let argv = |words: &[&str]| words.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (kept, token) = without_join_token(argv(&["start", "--address", "h:1", "--join-token", "ionet1.j.s"]));
        assert_eq!((kept, token), (argv(&["start", "--address", "h:1"]), Some("ionet1.j.s".into())));
        let (kept, token) = without_join_token(argv(&["start", "--join-token=ionet1.j.s", "--num-cpus", "2"]));
        assert_eq!((kept, token), (argv(&["start", "--num-cpus", "2"]), Some("ionet1.j.s".into())));
        assert_eq!(without_join_token(argv(&["start", "--head"])), (argv(&["start", "--head"]), None));
    }
}
