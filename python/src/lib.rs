//! `ionet._ionet`: the native half of the Python package.
//!
//! Python values travel as raw objects of the Rust runtime (`ionet::raw`): the Python side
//! (`ionet/_serialization.py`) turns a value into parts (pickle protocol 5 plus out-of-band
//! buffers) that [`put_parts`] copies once into shared memory, and reads objects back as
//! [`Buffer`]s it can view without copying.
//!
//! Python functions and classes run in Python workers (`python -m ionet._worker`, which
//! calls [`run_worker`]). Two registrations make the Rust runtime able to run them: the
//! remote function `ionet.python.task` (first argument: the key under which the pickled
//! function was exported to the control store's KV) and the actor class
//! `ionet.python.actor` (first constructor argument: the class's key). Both call into
//! `ionet._worker_runtime` with the GIL held.
//!
//! The GIL is released whenever Rust waits (gets, waits, submissions, cluster calls), and
//! blocking gets poll for signals so Ctrl-C interrupts them.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ionet::actor::{ActorClass, ActorHandle, ActorInstance, ActorOptions, MethodCall};
use ionet::raw::{self, Raw};
use ionet::rpc::proto::node::WorkerCommand;
use ionet::task::{ArgBytes, Failure};
use ionet::{Arg, InitConfig, IonetError, IonetResult, ObjectBytes, ObjectRef, SchedulingStrategy, TaskOptions};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

/// The registered name of the Rust remote function that runs Python functions.
const PYTHON_TASK: &str = "ionet.python.task";
/// The registered name of the Rust actor class that hosts Python actors.
const PYTHON_ACTOR: &str = "ionet.python.actor";
/// Longest a blocking get waits before checking for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(200);

mod options;

use options::Options;

/// An error as the Python side raises it: `ionet.exceptions._native_error(kind, message)`.
fn to_py(error: IonetError) -> PyErr {
    let (kind, message) = match &error {
        // The worker's own failure text (it embeds the pickled exception).
        IonetError::TaskFailed { message, .. } => ("task_failed", message.clone()),
        IonetError::WorkerCrashed { .. } => ("worker_crashed", error.to_string()),
        IonetError::ActorDied(_) => ("actor_died", error.to_string()),
        IonetError::Timeout(_) => ("timeout", error.to_string()),
        IonetError::ObjectLost(_) => ("object_lost", error.to_string()),
        IonetError::Infeasible(_) => ("infeasible", error.to_string()),
        IonetError::Cancelled(_) => ("cancelled", error.to_string()),
        IonetError::ResourceExhausted(_) => ("object_store_full", error.to_string()),
        IonetError::InvalidArgument(_) => ("invalid_argument", error.to_string()),
        IonetError::NotFound(_) => ("not_found", error.to_string()),
        IonetError::AlreadyExists(_) => ("already_exists", error.to_string()),
        IonetError::Unauthenticated(_) => ("unauthenticated", error.to_string()),
        IonetError::Unavailable(_) => ("unavailable", error.to_string()),
        _ => ("other", error.to_string()),
    };
    Python::attach(|py| {
        let built =
            py.import("ionet.exceptions").and_then(|module| module.call_method1("_native_error", (kind, &message)));
        match built {
            Ok(exception) => PyErr::from_value(exception),
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for IonetResult<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// A reference to an object in the cluster (Ray's `ObjectRef`).
#[pyclass(module = "ionet._ionet", name = "ObjectRef", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyObjectRef {
    inner: ObjectRef<Raw>,
}

#[pymethods]
impl PyObjectRef {
    fn hex(&self) -> String {
        self.inner.id().hex()
    }

    fn __repr__(&self) -> String {
        format!("ObjectRef({})", self.inner.id().hex())
    }

    /// Refs inside values travel as (id, owner); they resolve through the owner.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let wire = ionet::task::encode_value(&self.inner).map_err(PyValueError::new_err)?;
        let rebuild = py.import("ionet._ionet")?.getattr("_object_ref_from_wire")?;
        Ok((rebuild, (PyBytes::new(py, &wire),)))
    }

    /// Calls `callback()` once, from a runtime thread, when the object is ready or failed.
    fn _on_ready(&self, callback: Py<PyAny>) -> PyResult<()> {
        raw::on_ready(&self.inner, move || {
            Python::attach(|py| {
                if let Err(err) = callback.call0(py) {
                    err.print(py);
                }
            })
        })
        .or_raise()
    }

    /// `await ref` in asyncio (see `ionet._private.object_ref_await`).
    fn __await__(slf: Py<Self>, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py.import("ionet._private")?.call_method1("object_ref_await", (slf,))?.unbind())
    }

    /// Ray's `ObjectRef.future()` (see `ionet._private.object_ref_future`).
    fn future(slf: Py<Self>, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py.import("ionet._private")?.call_method1("object_ref_future", (slf,))?.unbind())
    }
}

#[pyfunction]
fn _object_ref_from_wire(wire: &[u8]) -> PyResult<PyObjectRef> {
    let inner: ObjectRef<Raw> = ionet::task::decode_value(wire).map_err(PyValueError::new_err)?;
    Ok(PyObjectRef { inner })
}

enum BufferBytes {
    Object(ObjectBytes),
    Arg(ArgBytes),
}

/// An object's bytes, possibly a read-only view of the node's shared memory. Python makes
/// zero-copy views of it from `address` and `size`, keeping this object alive beside them.
#[pyclass(module = "ionet._ionet", name = "Buffer", frozen)]
pub struct Buffer {
    bytes: BufferBytes,
}

impl Buffer {
    fn slice(&self) -> &[u8] {
        match &self.bytes {
            BufferBytes::Object(bytes) => bytes,
            BufferBytes::Arg(arg) => arg.as_slice(),
        }
    }
}

#[pymethods]
impl Buffer {
    #[getter]
    fn address(&self) -> usize {
        self.slice().as_ptr() as usize
    }

    #[getter]
    fn size(&self) -> usize {
        self.slice().len()
    }

    fn __len__(&self) -> usize {
        self.slice().len()
    }

    fn tobytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.slice())
    }
}

/// A handle to an actor (Ray's `ActorHandle`, untyped: methods are named at call time).
#[pyclass(module = "ionet._ionet", name = "ActorHandle", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyActorHandle {
    inner: ActorHandle,
}

#[pymethods]
impl PyActorHandle {
    fn hex(&self) -> String {
        self.inner.id().hex()
    }

    fn __repr__(&self) -> String {
        format!("ActorHandle({})", self.inner.id().hex())
    }

    #[pyo3(signature = (method, args, options = None))]
    fn call(
        &self,
        py: Python<'_>,
        method: &str,
        args: &Bound<'_, PyList>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyObjectRef> {
        let _ = options;
        let args = convert_args(args)?;
        let handle = self.inner.clone();
        let method = method.to_string();
        let inner = py.detach(move || handle.call::<Raw>(&method, args));
        Ok(PyObjectRef { inner })
    }

    /// The actor's row: state, name, namespace, restarts, death_cause, node_id, class_key.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let handle = self.inner.clone();
        let info = py.detach(move || handle.info()).or_raise()?;
        let spec = info.spec.clone().unwrap_or_default();
        let state = ionet::rpc::proto::gcs::ActorState::try_from(info.state)
            .map(|state| state.as_str_name().to_string())
            .unwrap_or_else(|_| "UNKNOWN".into());
        let dict = PyDict::new(py);
        dict.set_item("state", state)?;
        dict.set_item("name", &spec.name)?;
        dict.set_item("namespace", &spec.namespace)?;
        dict.set_item("restarts", info.restarts)?;
        dict.set_item("incarnation", info.incarnation)?;
        dict.set_item("death_cause", &info.death_cause)?;
        dict.set_item("node_id", hex(&info.node_id))?;
        dict.set_item("class_key", PyBytes::new(py, spec.constructor_args.first().map(Vec::as_slice).unwrap_or(&[])))?;
        Ok(dict)
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let wire = ionet::task::encode_value(&self.inner).map_err(PyValueError::new_err)?;
        let rebuild = py.import("ionet._ionet")?.getattr("_actor_handle_from_wire")?;
        Ok((rebuild, (PyBytes::new(py, &wire),)))
    }
}

#[pyfunction]
fn _actor_handle_from_wire(wire: &[u8]) -> PyResult<PyActorHandle> {
    let inner: ActorHandle = ionet::task::decode_value(wire).map_err(PyValueError::new_err)?;
    Ok(PyActorHandle { inner })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Refs found inside a value while it was serialised (`_serialize_holding`): whatever
/// carries the value (a call's argument, a stored object) holds them as long as it lives.
#[pyclass(frozen, name = "HeldRefs")]
pub struct HeldRefs {
    refs: Vec<ObjectRef<()>>,
}

/// `serialize(value)`, and the refs this process owns that it wrote (None if none).
#[pyfunction]
fn _serialize_holding<'py>(
    serialize: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Option<HeldRefs>)> {
    let (serialized, refs) = ionet::collect_contained(|| serialize.call1((value,)));
    Ok((serialized?, (!refs.is_empty()).then_some(HeldRefs { refs })))
}

/// The arguments of the generic Python task or actor class: the key of the pickled
/// function or class, then the call's own.
fn keyed_args(key: &[u8], args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
    let mut all = Vec::with_capacity(args.len() + 1);
    all.push(Arg::Value(Ok(key.to_vec())));
    all.extend(convert_args(args)?);
    Ok(all)
}

/// Task and constructor arguments: `bytes` travel by value (a `(bytes, HeldRefs)` pair
/// with the refs inside them), `ObjectRef`s by reference.
fn convert_args(args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
    let mut converted = Vec::with_capacity(args.len());
    for (index, arg) in args.iter().enumerate() {
        if let Ok(bytes) = arg.cast::<PyBytes>() {
            converted.push(Arg::Value(Ok(bytes.as_bytes().to_vec())));
        } else if let Ok((bytes, held)) = arg.extract::<(Bound<'_, PyBytes>, Bound<'_, HeldRefs>)>() {
            converted.push(Arg::Holding(bytes.as_bytes().to_vec(), held.get().refs.clone()));
        } else if let Ok(reference) = arg.cast::<PyObjectRef>() {
            converted.push(ionet::IntoArg::<Raw>::into_arg(reference.get().inner.clone()));
        } else {
            return Err(PyTypeError::new_err(format!(
                "argument {index} must be bytes or an ObjectRef, not {}",
                arg.get_type().name()?
            )));
        }
    }
    Ok(converted)
}

#[pyfunction]
#[pyo3(signature = (address, num_cpus, num_gpus, gpu_type, resources, namespace, session_dir, object_store_memory, worker_argv, worker_env, worker_cwd, payer_account = String::new()))]
#[allow(clippy::too_many_arguments)]
fn init(
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
) -> PyResult<()> {
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
        worker_command: Some(WorkerCommand { argv: worker_argv, env: worker_env, cwd: worker_cwd }),
        payer_account,
        ..InitConfig::default()
    };
    py.detach(move || ionet::init(config)).or_raise()
}

#[pyfunction]
fn shutdown(py: Python<'_>) {
    py.detach(ionet::shutdown);
}

#[pyfunction]
fn is_initialized() -> bool {
    ionet::is_initialized()
}

/// In a worker process started by a node daemon: serves tasks until killed.
#[pyfunction]
fn run_worker(py: Python<'_>) -> PyResult<()> {
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
fn current_task_id() -> Option<String> {
    ionet::current_task_id().map(|id| id.hex())
}

/// Whether the caller cancelled the task or actor call running on this thread.
#[pyfunction]
fn is_canceled() -> bool {
    ionet::is_canceled()
}

/// The `ionet` command line; returns its exit code.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
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

#[pyfunction]
fn kv_put(py: Python<'_>, namespace: &str, key: &[u8], value: &[u8], overwrite: bool) -> PyResult<bool> {
    let value = value.to_vec();
    py.detach(move || raw::kv_put(namespace, key, value, overwrite)).or_raise()
}

#[pyfunction]
fn kv_get<'py>(py: Python<'py>, namespace: &str, key: &[u8]) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let value = py.detach(move || raw::kv_get(namespace, key)).or_raise()?;
    Ok(value.map(|value| PyBytes::new(py, &value)))
}

/// A part of a value: its bytes, and whatever keeps them alive while they are copied.
enum Part {
    Bytes(Py<PyBytes>),
    Memory { address: usize, length: usize, _keepalive: Py<PyAny> },
}

fn parts_of(parts: &Bound<'_, PyList>) -> PyResult<Vec<Part>> {
    let mut out = Vec::with_capacity(parts.len());
    for (index, part) in parts.iter().enumerate() {
        if let Ok(bytes) = part.cast::<PyBytes>() {
            out.push(Part::Bytes(bytes.clone().unbind()));
        } else if let Ok(tuple) = part.cast::<PyTuple>() {
            let (address, length, keepalive): (usize, usize, Py<PyAny>) = tuple.extract()?;
            out.push(Part::Memory { address, length, _keepalive: keepalive });
        } else {
            return Err(PyTypeError::new_err(format!("part {index} must be bytes or (address, length, owner)")));
        }
    }
    Ok(out)
}

fn part_slice<'a>(part: &'a Part, py: Python<'a>) -> &'a [u8] {
    match part {
        Part::Bytes(bytes) => bytes.bind(py).as_bytes(),
        // SAFETY: the Python side hands the address and length of a live buffer and keeps
        // its owner in `_keepalive` for as long as this part exists.
        Part::Memory { address, length, .. } => unsafe { std::slice::from_raw_parts(*address as *const u8, *length) },
    }
}

fn concatenated(parts: &[Part], py: Python<'_>) -> Vec<u8> {
    let size = parts.iter().map(|part| part_slice(part, py).len()).sum();
    let mut bytes = Vec::with_capacity(size);
    for part in parts {
        bytes.extend_from_slice(part_slice(part, py));
    }
    bytes
}

/// Stores the concatenation of `parts` as one object (one copy into shared memory).
#[pyfunction]
#[pyo3(signature = (parts, held = None))]
fn put_parts(py: Python<'_>, parts: &Bound<'_, PyList>, held: Option<&Bound<'_, HeldRefs>>) -> PyResult<PyObjectRef> {
    let holding = held.map(|held| held.get().refs.clone()).unwrap_or_default();
    let parts = parts_of(parts)?;
    let slices: Vec<(usize, usize)> =
        parts.iter().map(|part| part_slice(part, py)).map(|slice| (slice.as_ptr() as usize, slice.len())).collect();
    let size = slices.iter().map(|(_, length)| length).sum();
    // The parts stay alive (held by `parts`) while the GIL is released for the copy.
    let inner = py
        .detach(move || {
            raw::put_raw_holding(
                size,
                |buffer| {
                    let mut offset = 0;
                    for (address, length) in slices {
                        // SAFETY: each (address, length) is a live part held by `parts` above.
                        let part = unsafe { std::slice::from_raw_parts(address as *const u8, length) };
                        buffer[offset..offset + length].copy_from_slice(part);
                        offset += length;
                    }
                },
                holding,
            )
        })
        .or_raise()?;
    drop(parts);
    Ok(PyObjectRef { inner })
}

fn objects(refs: &Bound<'_, PyList>) -> PyResult<Vec<ObjectRef<Raw>>> {
    refs.iter().map(|reference| Ok(reference.cast::<PyObjectRef>()?.get().inner.clone())).collect()
}

/// Waits for the objects and returns their bytes (GIL released; Ctrl-C interrupts).
#[pyfunction]
#[pyo3(signature = (refs, timeout = None))]
fn get_objects(py: Python<'_>, refs: &Bound<'_, PyList>, timeout: Option<f64>) -> PyResult<Vec<Buffer>> {
    let objects = objects(refs)?;
    let deadline = timeout.map(|seconds| Instant::now() + Duration::from_secs_f64(seconds.max(0.0)));
    // Tasks this one submitted that nobody started yet run here first (see `ionet::inline`).
    let waited = objects.clone();
    py.detach(move || raw::run_waited_tasks(&waited));
    // One wait for the daemon, however many slices it takes.
    let _blocked = raw::waiting_for_objects();
    loop {
        let slice = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK),
            None => SIGNAL_CHECK,
        };
        let list = objects.clone();
        match py.detach(move || raw::get_raw(&list, Some(slice))) {
            Ok(all) => return Ok(all.into_iter().map(|bytes| Buffer { bytes: BufferBytes::Object(bytes) }).collect()),
            Err(IonetError::Timeout(message)) => {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return Err(to_py(IonetError::Timeout(message)));
                }
                py.check_signals()?;
            }
            Err(error) => return Err(to_py(error)),
        }
    }
}

/// Indices of the ready refs (up to `num_returns`) and of the others.
#[pyfunction]
#[pyo3(signature = (refs, num_returns, timeout = None))]
fn wait(
    py: Python<'_>,
    refs: &Bound<'_, PyList>,
    num_returns: usize,
    timeout: Option<f64>,
) -> PyResult<(Vec<usize>, Vec<usize>)> {
    // Borrowed, not copied: a copy of a ref is a count in its owner's table.
    let handles =
        refs.iter().map(|reference| Ok(reference.cast_into::<PyObjectRef>()?)).collect::<PyResult<Vec<_>>>()?;
    let objects: Vec<&ObjectRef<Raw>> = handles.iter().map(|handle| &handle.get().inner).collect();
    let timeout = timeout.map(|seconds| Duration::from_secs_f64(seconds.max(0.0)));
    let flags = py.detach(|| ionet::wait_flags(&objects, num_returns, timeout)).or_raise()?;
    let (mut done, mut rest) = (Vec::new(), Vec::new());
    for (index, ready) in flags.into_iter().enumerate() {
        if ready {
            done.push(index);
        } else {
            rest.push(index);
        }
    }
    Ok((done, rest))
}

#[pyfunction]
fn submit_task(
    py: Python<'_>,
    function_key: &[u8],
    args: &Bound<'_, PyList>,
    options: &Options,
) -> PyResult<PyObjectRef> {
    let all = keyed_args(function_key, args)?;
    let task = options.task();
    let generator = options.generator;
    let inner = py.detach(move || {
        let submit = move || ionet::task::submit_kind::<Raw>(PYTHON_TASK, function_key, task, all);
        if generator {
            ionet::inline::kept_apart(submit)
        } else {
            submit()
        }
    });
    Ok(PyObjectRef { inner })
}

#[pyfunction]
fn create_actor(
    py: Python<'_>,
    class_key: &[u8],
    args: &Bound<'_, PyList>,
    options: &Options,
) -> PyResult<PyActorHandle> {
    let all = keyed_args(class_key, args)?;
    let actor = options.actor.clone();
    let inner = py.detach(move || ionet::create_actor(PYTHON_ACTOR, actor, all)).or_raise()?;
    Ok(PyActorHandle { inner })
}

/// The Python handle type of `get_actor` (any Python actor is hosted by one Rust class).
struct PythonActor(ActorHandle);

impl ionet::ActorClassHandle for PythonActor {
    const CLASS: &'static str = PYTHON_ACTOR;

    fn from_handle(handle: ActorHandle) -> Self {
        PythonActor(handle)
    }

    fn handle(&self) -> &ActorHandle {
        &self.0
    }
}

#[pyfunction]
#[pyo3(signature = (name, namespace = None))]
fn get_actor(py: Python<'_>, name: &str, namespace: Option<String>) -> PyResult<PyActorHandle> {
    let found = py.detach(move || ionet::get_actor::<PythonActor>(name, namespace.as_deref())).or_raise()?;
    Ok(PyActorHandle { inner: found.0 })
}

#[pyfunction]
fn kill(py: Python<'_>, handle: &PyActorHandle, no_restart: bool) -> PyResult<()> {
    let handle = handle.inner.clone();
    py.detach(move || ionet::actor::kill_handle(&handle, no_restart)).or_raise()
}

#[pyfunction]
#[pyo3(signature = (reference, force = false, recursive = true))]
fn cancel(reference: &PyObjectRef, force: bool, recursive: bool) -> PyResult<()> {
    raw::cancel(&reference.inner, force, recursive).or_raise()
}

fn resources_dict<'py>(py: Python<'py>, set: &ionet::ResourceSet) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, quantity) in set.iter() {
        dict.set_item(name.to_string(), quantity.as_f64())?;
    }
    Ok(dict)
}

fn node_table(py: Python<'_>) -> PyResult<Vec<ionet::Node>> {
    py.detach(ionet::nodes).or_raise()
}

#[pyfunction]
fn nodes<'py>(py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let mut rows = Vec::new();
    for node in node_table(py)? {
        let row = PyDict::new(py);
        row.set_item("NodeID", node.node_id.hex())?;
        row.set_item("Alive", node.is_alive())?;
        row.set_item(
            "NodeManagerAddress",
            node.address.rsplit_once(':').map(|(host, _)| host).unwrap_or(&node.address),
        )?;
        row.set_item("NodeManagerHostname", &node.hostname)?;
        row.set_item("Resources", resources_dict(py, &node.total)?)?;
        row.set_item("Labels", node.labels.clone())?;
        rows.push(row);
    }
    Ok(rows)
}

fn summed<'py>(py: Python<'py>, available: bool) -> PyResult<Bound<'py, PyDict>> {
    let mut sum = ionet::ResourceSet::new();
    for node in node_table(py)? {
        if node.is_alive() {
            sum.add(if available { &node.available } else { &node.total });
        }
    }
    resources_dict(py, &sum)
}

#[pyfunction]
fn cluster_resources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    summed(py, false)
}

#[pyfunction]
fn available_resources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    summed(py, true)
}

#[pyfunction]
fn get_gpu_ids() -> Vec<u32> {
    ionet::get_gpu_ids()
}

#[pyfunction]
fn runtime_context(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
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

fn stream_id(id: &str) -> PyResult<ionet::ObjectId> {
    id.parse().map_err(|err: IonetError| PyValueError::new_err(err.to_string()))
}

/// Opens a stream for a generator task this process consumes: (its id, this process's
/// address), which the task's sink names.
#[pyfunction]
fn generator_open(backpressure: u64) -> PyResult<(String, String)> {
    let (id, owner) = ionet::generator::open_stream(backpressure).or_raise()?;
    Ok((id.hex(), owner))
}

/// Item `position` of the stream (waiting, GIL released), None at its end; raises the
/// task's error after its items if it failed, `GetTimeoutError` past `timeout`.
#[pyfunction]
#[pyo3(signature = (id, task, position, timeout = None))]
fn generator_next(
    py: Python<'_>,
    id: &str,
    task: &PyObjectRef,
    position: usize,
    timeout: Option<f64>,
) -> PyResult<Option<PyObjectRef>> {
    let id = stream_id(id)?;
    let task = task.inner.clone();
    let deadline = timeout.map(|seconds| Instant::now() + Duration::from_secs_f64(seconds.max(0.0)));
    loop {
        let slice = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()).min(SIGNAL_CHECK),
            None => SIGNAL_CHECK,
        };
        let waited = task.clone();
        match py.detach(move || ionet::generator::next_of_stream(&id, &waited, position, Some(slice))) {
            None => return Ok(None),
            Some(Ok(inner)) => return Ok(Some(PyObjectRef { inner })),
            Some(Err(IonetError::Timeout(message))) => {
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return Err(to_py(IonetError::Timeout(message)));
                }
                py.check_signals()?;
            }
            Some(Err(error)) => return Err(to_py(error)),
        }
    }
}

/// Closes a stream this process consumes: its producer stops at its next item.
#[pyfunction]
fn generator_close(id: &str) -> PyResult<()> {
    ionet::generator::close_stream(&stream_id(id)?);
    Ok(())
}

/// Sends item `index` (the concatenation of `parts`) of stream `id` to its consumer at
/// `owner`, waiting while the consumer is too far behind; False: the consumer is gone.
#[pyfunction]
fn generator_send(py: Python<'_>, owner: String, id: &str, index: u64, parts: &Bound<'_, PyList>) -> PyResult<bool> {
    let id = stream_id(id)?;
    let parts = parts_of(parts)?;
    let bytes = concatenated(&parts, py);
    py.detach(move || ionet::generator::send_item(&owner, &id, index, bytes)).or_raise()
}

/// Waits until every item this process sent on stream `id` reached its consumer (a
/// generator task does before it returns); False: the consumer is gone.
#[pyfunction]
fn generator_flush(py: Python<'_>, id: &str) -> PyResult<bool> {
    let id = stream_id(id)?;
    py.detach(move || ionet::generator::flush_stream(&id)).or_raise()
}

/// Ends the actor this worker hosts for good (Ray's `exit_actor`); the process exits.
#[pyfunction]
fn exit_actor(py: Python<'_>) -> PyResult<()> {
    match py.detach(ionet::exit_actor) {
        Ok(never) => match never {},
        Err(err) => Err(to_py(err)),
    }
}

fn group(id: &str) -> PyResult<ionet::PlacementGroupId> {
    id.parse().map_err(|err: IonetError| PyValueError::new_err(err.to_string()))
}

#[pyfunction]
#[pyo3(signature = (bundles, strategy, name = String::new(), detached = false))]
fn placement_group(
    py: Python<'_>,
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: &str,
    name: String,
    detached: bool,
) -> PyResult<String> {
    use ionet::PlacementStrategy;
    let strategy = match strategy {
        "PACK" => PlacementStrategy::Pack,
        "SPREAD" => PlacementStrategy::Spread,
        "STRICT_PACK" => PlacementStrategy::StrictPack,
        "STRICT_SPREAD" => PlacementStrategy::StrictSpread,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown placement strategy {other:?}: expected PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
            )))
        }
    };
    let created = py
        .detach(move || {
            if detached {
                ionet::detached_placement_group(bundles, strategy, &name)
            } else {
                ionet::named_placement_group(bundles, strategy, &name)
            }
        })
        .or_raise()?;
    Ok(created.id().hex())
}

#[pyfunction]
#[pyo3(signature = (pg_id, timeout = None))]
fn placement_group_wait(py: Python<'_>, pg_id: &str, timeout: Option<f64>) -> PyResult<bool> {
    let id = group(pg_id)?;
    let timeout = Duration::from_secs_f64(timeout.unwrap_or(f64::from(u32::MAX)).max(0.0));
    py.detach(move || ionet::PlacementGroup::from_id(id)?.wait(timeout)).or_raise()
}

#[pyfunction]
fn placement_group_ready(py: Python<'_>, pg_id: &str, value: &[u8]) -> PyResult<PyObjectRef> {
    let id = group(pg_id)?;
    let value = value.to_vec();
    let inner = py.detach(move || ionet::PlacementGroup::from_id(id)?.ready_raw(value)).or_raise()?;
    Ok(PyObjectRef { inner })
}

#[pyfunction]
fn remove_placement_group(py: Python<'_>, pg_id: &str) -> PyResult<()> {
    let id = group(pg_id)?;
    py.detach(move || ionet::remove_placement_group(&ionet::PlacementGroup::from_id(id)?)).or_raise()
}

/// A group's row as Ray's `placement_group_table` shows it.
fn group_row<'py>(py: Python<'py>, group: &ionet::PlacementGroupInfo) -> PyResult<Bound<'py, PyDict>> {
    use ionet::{PlacementGroupState, PlacementStrategy};
    let row = PyDict::new(py);
    row.set_item("placement_group_id", group.id.hex())?;
    row.set_item("name", &group.name)?;
    let strategy = match group.strategy {
        PlacementStrategy::Pack => "PACK",
        PlacementStrategy::Spread => "SPREAD",
        PlacementStrategy::StrictPack => "STRICT_PACK",
        PlacementStrategy::StrictSpread => "STRICT_SPREAD",
    };
    row.set_item("strategy", strategy)?;
    let state = match group.state {
        PlacementGroupState::Pending => "PENDING",
        PlacementGroupState::Created => "CREATED",
        PlacementGroupState::Removed => "REMOVED",
    };
    row.set_item("state", state)?;
    let bundles = PyDict::new(py);
    for (index, bundle) in group.bundles.iter().enumerate() {
        bundles.set_item(index, resources_dict(py, bundle)?)?;
    }
    row.set_item("bundles", bundles)?;
    let nodes = PyDict::new(py);
    for (index, node) in group.bundle_nodes.iter().enumerate() {
        nodes.set_item(index, node.hex())?;
    }
    row.set_item("bundles_to_node_id", nodes)?;
    Ok(row)
}

#[pyfunction]
#[pyo3(signature = (pg_id = None))]
fn placement_group_table<'py>(py: Python<'py>, pg_id: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
    match pg_id {
        Some(id) => {
            let id = group(id)?;
            group_row(py, &py.detach(move || ionet::placement_group_info(id)).or_raise()?)
        }
        None => {
            let table = PyDict::new(py);
            for group in py.detach(ionet::placement_group_table).or_raise()? {
                table.set_item(group.id.hex(), group_row(py, &group)?)?;
            }
            Ok(table)
        }
    }
}

/// Buffers for a worker-side call's arguments (views of the store for stored ones).
fn arg_buffers(args: Vec<ArgBytes>) -> Vec<Buffer> {
    args.into_iter().map(|arg| Buffer { bytes: BufferBytes::Arg(arg) }).collect()
}

/// What `execute_task` / `call_actor` return: parts of the value, or a failure text.
fn result_of(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> Result<Vec<u8>, Failure> {
    let value = result.map_err(|err| Failure::error(format!("the Python worker runtime failed: {err}")))?;
    if let Ok(text) = value.cast::<PyString>() {
        return Err(Failure::error(text.to_string()));
    }
    // (text, False): a failure never to be retried (see `_worker_runtime`).
    if let Ok(tuple) = value.cast::<pyo3::types::PyTuple>() {
        let text: String =
            tuple.get_item(0).and_then(|item| item.extract()).map_err(|err| Failure::error(err.to_string()))?;
        return Err(Failure::final_error(text));
    }
    let list = value
        .cast::<PyList>()
        .map_err(|_| Failure::error("the Python worker runtime returned neither parts nor a failure".into()))?;
    let parts = parts_of(list).map_err(|err| Failure::error(err.to_string()))?;
    Ok(concatenated(&parts, py))
}

std::thread_local! {
    static THREAD_STATE_KEPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `Python::attach` for the runtime threads that run tasks and actor calls. Attaching a
/// thread that has no Python thread state creates one and detaching destroys it again,
/// which costs more than a small call itself; so the first attach on a thread makes a
/// state that stays (one `PyGILState_Ensure` never released, the GIL itself released),
/// and later attaches only take the GIL.
fn attach_runtime_thread<R>(call: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    THREAD_STATE_KEPT.with(|kept| {
        // SAFETY: the interpreter runs (this is a Python worker process), and a thread
        // without a thread state cannot hold the GIL, so releasing the GIL right after
        // the ensure leaves the thread as it was, plus a lasting thread state.
        if !kept.get() && unsafe { pyo3::ffi::PyGILState_GetThisThreadState() }.is_null() {
            unsafe {
                let _ = pyo3::ffi::PyGILState_Ensure();
                pyo3::ffi::PyEval_SaveThread();
            }
            kept.set(true);
        }
    });
    Python::attach(call)
}

fn python_task(args: Vec<ArgBytes>) -> Result<Vec<u8>, Failure> {
    let mut args = args.into_iter();
    let key = args.next().ok_or_else(|| Failure::bad_arguments("a Python task needs its function key".into()))?;
    let buffers = arg_buffers(args.collect());
    attach_runtime_thread(|py| {
        let call = py.import("ionet._worker_runtime").and_then(|runtime| {
            let key = PyBytes::new(py, key.as_slice());
            runtime.call_method1("execute_task", (key, buffers))
        });
        result_of(py, call)
    })
}

ionet::inventory::submit! {
    ionet::task::RemoteFunction { name: PYTHON_TASK, invoke: python_task, in_place: false }
}

/// A Python actor instance, as the Rust actor runtime holds it.
struct PythonInstance(Py<PyAny>);

fn python_actor_construct(args: Vec<ArgBytes>) -> Result<Box<dyn std::any::Any + Send + Sync>, Failure> {
    let mut args = args.into_iter();
    let key = args.next().ok_or_else(|| Failure::bad_arguments("a Python actor needs its class key".into()))?;
    let buffers = arg_buffers(args.collect());
    Python::attach(|py| {
        let runtime = py.import("ionet._worker_runtime").map_err(|err| Failure::error(err.to_string()))?;
        let instance = runtime
            .call_method1("create_actor", (PyBytes::new(py, key.as_slice()), buffers))
            .map_err(|err| Failure::error(err.to_string()))?;
        Ok(Box::new(PythonInstance(instance.unbind())) as Box<dyn std::any::Any + Send + Sync>)
    })
}

fn python_actor_call(
    instance: std::sync::Arc<ActorInstance>,
    method: &str,
    args: Vec<ArgBytes>,
) -> Result<MethodCall, Failure> {
    let method = method.to_string();
    let buffers = arg_buffers(args);
    Ok(MethodCall::Blocking(Box::new(move || {
        let state = ionet::actor::read_state::<PythonInstance>(&instance)?;
        let actor = state
            .downcast_ref::<PythonInstance>()
            .ok_or_else(|| Failure::error("this worker's actor is not a Python actor".into()))?;
        attach_runtime_thread(|py| {
            let call = py
                .import("ionet._worker_runtime")
                .and_then(|runtime| runtime.call_method1("call_actor", (actor.0.bind(py), method, buffers)));
            result_of(py, call)
        })
    })))
}

ionet::inventory::submit! {
    ActorClass { name: PYTHON_ACTOR, construct: python_actor_construct, call: python_actor_call, in_place: false }
}

#[pymodule]
fn _ionet(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<PyObjectRef>()?;
    module.add_class::<HeldRefs>()?;
    module.add_class::<PyActorHandle>()?;
    module.add_class::<Buffer>()?;
    module.add_class::<Options>()?;
    for function in [
        wrap_pyfunction!(_object_ref_from_wire, module)?,
        wrap_pyfunction!(_actor_handle_from_wire, module)?,
        wrap_pyfunction!(init, module)?,
        wrap_pyfunction!(shutdown, module)?,
        wrap_pyfunction!(is_initialized, module)?,
        wrap_pyfunction!(run_worker, module)?,
        wrap_pyfunction!(cli_main, module)?,
        wrap_pyfunction!(kv_put, module)?,
        wrap_pyfunction!(kv_get, module)?,
        wrap_pyfunction!(put_parts, module)?,
        wrap_pyfunction!(_serialize_holding, module)?,
        wrap_pyfunction!(get_objects, module)?,
        wrap_pyfunction!(wait, module)?,
        wrap_pyfunction!(submit_task, module)?,
        wrap_pyfunction!(create_actor, module)?,
        wrap_pyfunction!(get_actor, module)?,
        wrap_pyfunction!(kill, module)?,
        wrap_pyfunction!(cancel, module)?,
        wrap_pyfunction!(nodes, module)?,
        wrap_pyfunction!(cluster_resources, module)?,
        wrap_pyfunction!(available_resources, module)?,
        wrap_pyfunction!(get_gpu_ids, module)?,
        wrap_pyfunction!(runtime_context, module)?,
        wrap_pyfunction!(exit_actor, module)?,
        wrap_pyfunction!(is_canceled, module)?,
        wrap_pyfunction!(current_task_id, module)?,
        wrap_pyfunction!(generator_open, module)?,
        wrap_pyfunction!(generator_next, module)?,
        wrap_pyfunction!(generator_close, module)?,
        wrap_pyfunction!(generator_send, module)?,
        wrap_pyfunction!(generator_flush, module)?,
        wrap_pyfunction!(placement_group, module)?,
        wrap_pyfunction!(placement_group_wait, module)?,
        wrap_pyfunction!(placement_group_ready, module)?,
        wrap_pyfunction!(remove_placement_group, module)?,
        wrap_pyfunction!(placement_group_table, module)?,
    ] {
        module.add_function(function)?;
    }
    Ok(())
}
