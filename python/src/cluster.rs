//! The process and its cluster: init, shutdown, the worker entry, the command line, KV,
//! nodes and resources, the runtime context.

use super::*;

#[pyfunction]
#[pyo3(signature = (address, num_cpus, num_gpus, gpu_type, resources, namespace, session_dir, object_store_memory, worker_argv, worker_env, worker_cwd, payer_account = String::new(), log_to_driver = true, runtime_env_json = None, min_reliability = None, worker_forks = false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn init(
    py: Python<'_>,
    address: Option<String>,
    num_cpus: Option<f64>,
    num_gpus: Option<u32>,
    gpu_type: Option<String>,
    resources: Option<BTreeMap<String, f64>>,
    namespace: String,
    session_dir: Option<String>,
    object_store_memory: Option<u64>,
    worker_argv: Vec<String>,
    mut worker_env: HashMap<String, String>,
    worker_cwd: String,
    payer_account: String,
    log_to_driver: bool,
    runtime_env_json: Option<String>,
    min_reliability: Option<f64>,
    worker_forks: bool,
) -> PyResult<()> {
    let runtime_env = runtime_env_json
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|err| PyValueError::new_err(format!("runtime_env is not JSON: {err}")))?;
    // Workers start workers too (nested tasks and actors): they need the command.
    let argv_json = serde_json::to_string(&worker_argv).map_err(|err| PyValueError::new_err(err.to_string()))?;
    worker_env.insert(ionet::WORKER_ARGV_ENV.to_string(), argv_json);
    let config = InitConfig {
        address,
        num_cpus,
        num_gpus,
        gpu_type,
        resources: resources.unwrap_or_default(),
        namespace,
        session_dir: session_dir.map(Into::into),
        object_store_memory,
        worker_command: Some(WorkerCommand {
            argv: worker_argv,
            env: worker_env,
            cwd: worker_cwd,
            packages: None,
            forks: worker_forks,
        }),
        payer_account,
        log_to_driver: Some(log_to_driver),
        runtime_env,
        min_reliability,
        ..InitConfig::default()
    };
    py.detach(move || ionet::init(config)).or_raise()
}

#[pyfunction]
pub(crate) fn shutdown(py: Python<'_>) {
    py.detach(ionet::shutdown);
}

#[pyfunction]
pub(crate) fn is_initialized() -> bool {
    ionet::is_initialized()
}

/// In a forkserver a node daemon started: what a worker sets first, before any thread
/// (it dies with its daemon, creates files for its user alone, and its memory is not
/// readable by other processes of its user).
#[pyfunction]
pub(crate) fn settle_forkserver() {
    let _ = ionet::worker_env::settle_worker_process(|name| std::env::var(name).ok());
    // Every worker's credential pipe passes through it: not for other processes to read.
    ionet::worker_env::keep_memory_private();
}

/// In a worker process started by a node daemon: serves tasks until killed.
#[pyfunction]
pub(crate) fn run_worker(py: Python<'_>) -> PyResult<()> {
    // A cancelled call is interrupted where Python can: a coroutine at its next await.
    ionet::set_cancel_hook(Box::new(|task_id| {
        Python::attach(|py| {
            let cancelled = py
                .import("ionet._worker_runtime")
                .and_then(|runtime| runtime.call_method1("cancel_task", (task_id.hex(),)).map(|_| ()));
            if let Err(err) = cancelled {
                err.print(py);
            }
        })
    }));
    py.detach(|| ionet::init(InitConfig::default())).or_raise()
}

/// The id (hex) of the task or actor call running on this thread, if any.
#[pyfunction]
pub(crate) fn current_task_id() -> Option<String> {
    ionet::current_task_id().map(|id| id.hex())
}

/// Whether the caller cancelled the task or actor call running on this thread.
#[pyfunction]
pub(crate) fn is_canceled() -> bool {
    ionet::is_canceled()
}

/// The `ionet` command line; returns its exit code.
#[pyfunction]
pub(crate) fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    use clap::Parser;
    py.detach(move || {
        let cli = match ionet_worker::cli::Cli::try_parse_from(std::iter::once("ionet".to_string()).chain(argv)) {
            Ok(cli) => cli,
            Err(err) => {
                let _ = err.print();
                return err.exit_code();
            }
        };
        match ionet_worker::cli::run(cli) {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("error: {err:#}");
                1
            }
        }
    })
}

/// A directory packed for a job (`ionet.job_submission`): its package's name and bytes.
#[pyfunction]
#[pyo3(signature = (path, excludes, under_own_name))]
pub(crate) fn package_directory(
    py: Python<'_>,
    path: String,
    excludes: Vec<String>,
    under_own_name: bool,
) -> PyResult<(String, Py<PyBytes>)> {
    let package = py
        .detach(move || {
            ionet_worker::packages::package_directory(std::path::Path::new(&path), &excludes, under_own_name)
        })
        .or_raise()?;
    Ok((package.name, PyBytes::new(py, &package.bytes).unbind()))
}

/// What this machine's session says about its head's job server: its address, the
/// operator's credential, and the cluster CA to trust (each `None` when absent).
#[pyfunction]
#[pyo3(signature = (session_dir = None))]
pub(crate) fn job_server_defaults(
    session_dir: Option<String>,
) -> PyResult<(Option<String>, Option<String>, Option<String>)> {
    let session = ionet_worker::session::SessionDir::resolve(session_dir.as_deref().map(std::path::Path::new));
    let ca = session.cluster_ca_to_trust().or_raise()?;
    Ok((session.job_server_address(), session.admin_credential().map(|admin| admin.as_str().to_string()), ca))
}

#[pyfunction]
pub(crate) fn kv_put(py: Python<'_>, namespace: &str, key: &[u8], value: &[u8], overwrite: bool) -> PyResult<bool> {
    let value = value.to_vec();
    py.detach(move || raw::kv_put(namespace, key, value, overwrite)).or_raise()
}

#[pyfunction]
pub(crate) fn kv_get<'py>(py: Python<'py>, namespace: &str, key: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let value = py.detach(move || raw::kv_get(namespace, key)).or_raise()?;
    Ok(value.map(|value| PyBytes::new(py, &value)))
}

pub(crate) fn resources_dict<'py>(py: Python<'py>, set: &ionet::ResourceSet) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, quantity) in set.iter() {
        dict.set_item(name.to_string(), quantity.as_f64())?;
    }
    Ok(dict)
}

pub(crate) fn node_table(py: Python<'_>) -> PyResult<Vec<ionet::Node>> {
    py.detach(ionet::nodes).or_raise()
}

#[pyfunction]
pub(crate) fn nodes<'py>(py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let mut rows = Vec::new();
    for node in node_table(py)? {
        let row = PyDict::new(py);
        row.set_item("NodeID", node.node_id.hex())?;
        row.set_item("Alive", node.is_alive())?;
        row.set_item("NodeManagerAddress", ionet::tls::host_of(&node.address))?;
        row.set_item("NodeManagerHostname", &node.hostname)?;
        row.set_item("Resources", resources_dict(py, &node.total)?)?;
        row.set_item("Labels", node.labels.clone())?;
        rows.push(row);
    }
    Ok(rows)
}

pub(crate) fn summed<'py>(py: Python<'py>, available: bool) -> PyResult<Bound<'py, PyDict>> {
    let mut sum = ionet::ResourceSet::new();
    for node in node_table(py)? {
        if node.is_alive() {
            sum.add(if available { &node.available } else { &node.total });
        }
    }
    resources_dict(py, &sum)
}

#[pyfunction]
pub(crate) fn cluster_resources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    summed(py, false)
}

#[pyfunction]
pub(crate) fn available_resources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    summed(py, true)
}

#[pyfunction]
pub(crate) fn get_gpu_ids() -> Vec<u32> {
    ionet::get_gpu_ids()
}

#[pyfunction]
pub(crate) fn runtime_context(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let context = ionet::get_runtime_context().or_raise()?;
    let dict = PyDict::new(py);
    dict.set_item("job_id", context.job_id.hex())?;
    dict.set_item("node_id", context.node_id.hex())?;
    dict.set_item("task_id", context.task_id.map(|id| id.hex()))?;
    dict.set_item("actor_id", context.actor_id.map(|id| id.hex()))?;
    dict.set_item("gpu_ids", context.gpu_ids)?;
    dict.set_item("namespace", context.namespace)?;
    dict.set_item("actor_incarnation", context.actor_incarnation)?;
    dict.set_item("worker_id", context.worker_id)?;
    dict.set_item("is_worker", context.is_worker)?;
    Ok(dict)
}

/// The state API's other listings (`ionet.util.state`): `what` is `actors`, `nodes` or
/// `jobs`; JSON, a list of rows.
#[pyfunction]
pub(crate) fn list_state(py: Python<'_>, what: &str) -> PyResult<String> {
    let what = what.to_string();
    let rows = py
        .detach(move || match what.as_str() {
            "actors" => ionet::state::list_actors(),
            "nodes" => ionet::state::list_nodes(),
            "jobs" => ionet::state::list_jobs(),
            "objects" => ionet::state::list_objects(None, 0),
            "placement_groups" => ionet::state::list_placement_groups(),
            other => Err(ionet::IonetError::InvalidArgument(format!("no listing of {other:?}"))),
        })
        .or_raise()?;
    serde_json::to_string(&rows).map_err(|err| PyValueError::new_err(err.to_string()))
}

/// Tasks of this job's account as the head last heard of them (`ionet.util.state`), as
/// JSON: a list of Ray's `list_tasks` rows.
#[pyfunction]
#[pyo3(signature = (job = None, state = None, name = None, limit = 0))]
pub(crate) fn list_tasks(
    py: Python<'_>,
    job: Option<String>,
    state: Option<String>,
    name: Option<String>,
    limit: u32,
) -> PyResult<String> {
    let rows = py
        .detach(move || {
            let job = job.map(|job| job.parse::<ionet::JobId>()).transpose()?;
            ionet::state::list_tasks(ionet::state::TaskFilter { job, state, name, limit })
        })
        .or_raise()?;
    serde_json::to_string(&rows).map_err(|err| PyValueError::new_err(err.to_string()))
}
