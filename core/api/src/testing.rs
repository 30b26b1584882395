//! Helpers for tests that need a real multi-process cluster from one test binary.
//!
//! A test binary calls [`run_cli_if_requested`] first in `main`: when re-executed with
//! `IONET_TEST_CLI_ARGS` set (a JSON array of arguments), it runs as the `ionet` command
//! line (a head or node daemon) instead, so the test needs no separately built binary.

/// Environment variable carrying the `ionet` arguments for a re-executed test binary.
pub const CLI_ARGS_ENV: &str = "IONET_TEST_CLI_ARGS";

/// Runs the `ionet` command line and exits, if this process was started for that.
pub fn run_cli_if_requested() {
    let Ok(json) = std::env::var(CLI_ARGS_ENV) else { return };
    // Worker processes this daemon starts inherit its environment: they must not become
    // daemons too.
    std::env::remove_var(CLI_ARGS_ENV);
    let args: Vec<String> = match serde_json_lite(&json) {
        Some(args) => args,
        None => {
            eprintln!("{CLI_ARGS_ENV} must be a JSON array of strings");
            std::process::exit(2);
        }
    };
    use clap::Parser;
    let cli = ionet_worker::cli::Cli::parse_from(std::iter::once("ionet".to_string()).chain(args));
    let result = ionet_worker::cli::run(cli);
    match result {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn serde_json_lite(text: &str) -> Option<Vec<String>> {
    serde_json::from_str(text).ok()
}

/// In a worker process (started by a node daemon), serves tasks and never returns.
pub fn run_worker_if_requested() {
    if ionet_common::worker_env::WorkerEnv::is_worker() {
        let _ = crate::init(crate::InitConfig::default());
    }
}

/// The object store statistics of the node daemon at `node_address`.
pub fn object_store_stats(
    node_address: &str,
) -> ionet_common::IonetResult<ionet_common::rpc::proto::object::StatsReply> {
    let worker = crate::runtime::current()?;
    crate::runtime::block_on(async {
        let channel = worker.channel(node_address)?;
        let mut client = ionet_common::rpc::proto::object::object_manager_client::ObjectManagerClient::new(channel);
        Ok(client.stats(ionet_common::rpc::proto::object::StatsRequest {}).await?.into_inner())
    })
}

/// The credential this process calls with (its job's).
pub fn job_credential() -> ionet_common::IonetResult<String> {
    Ok(crate::runtime::current()?.credential.as_str().to_string())
}

/// The directory of this process's node's object store: an object's file there is named
/// by its id in hex.
pub fn object_store_dir() -> ionet_common::IonetResult<String> {
    let worker = crate::runtime::current()?;
    let store = worker
        .store
        .as_ref()
        .ok_or_else(|| ionet_common::IonetError::NotFound("this process has no object store on its node".into()))?;
    Ok(store.dir().to_string_lossy().into_owned())
}

/// The address of this process's own node daemon.
pub fn local_node_address() -> ionet_common::IonetResult<String> {
    Ok(crate::runtime::current()?.node_address.clone())
}

/// The address this process's core worker serves on (streams report to it, cancels
/// reach it there).
pub fn core_worker_address() -> ionet_common::IonetResult<String> {
    Ok(crate::runtime::current()?.address.to_string())
}

/// How this process follows its actors' rows: `WatchActors` streams it opened, and the
/// actors followed on them now.
pub fn actor_rows_followed() -> ionet_common::IonetResult<(usize, usize)> {
    Ok(crate::runtime::current()?.actor_rows.counts())
}

/// What this process's node daemon says of itself.
fn local_node_stats() -> Option<ionet_common::rpc::proto::node::GetNodeStatsReply> {
    let worker = crate::runtime::current().ok()?;
    crate::runtime::block_on(async {
        let mut client = ionet_common::rpc::NodeManagerClient::new(worker.channel(&worker.node_address)?);
        let request = ionet_common::rpc::proto::node::GetNodeStatsRequest {};
        ionet_common::IonetResult::Ok(client.get_node_stats(request).await?.into_inner())
    })
    .ok()
}

/// The CPUs this process's node daemon has free now, as it reports them.
pub fn available_cpus() -> Option<f64> {
    let available = local_node_stats()?.node?.available?.to_set().ok()?;
    Some(available.get(ionet_common::resources::CPU).as_f64())
}

/// This process's node daemon's view of the cluster: the alive nodes in it, and whether
/// it is a sample of the node table (a large cluster's).
pub fn local_view() -> Option<(usize, bool)> {
    let stats = local_node_stats()?;
    Some((stats.nodes_in_view as usize, stats.view_sampled))
}
