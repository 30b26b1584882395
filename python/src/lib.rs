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
//!
//! Parts: `objects` (refs, buffers, put/get/wait/cancel), `calls` (tasks and actors),
//! `options` (typed task and actor options), `generators` (streams of items),
//! `placement` (placement groups), `cluster` (init, the worker entry, the command line,
//! nodes and resources), `worker_side` (running Python for the Rust runtime); this file
//! holds the error mapping and the module's table of contents.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ionet::actor::{ActorClass, ActorHandle, ActorInstance, MethodCall};
use ionet::raw::{self, Raw};
use ionet::rpc::proto::common::WorkerCommand;
use ionet::task::{ArgBytes, Failure};
use ionet::{Arg, InitConfig, IonetError, IonetResult, ObjectBytes, ObjectRef};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

/// The registered name of the Rust remote function that runs Python functions.
const PYTHON_TASK: &str = "ionet.python.task";
/// The registered name of the Rust actor class that hosts Python actors.
const PYTHON_ACTOR: &str = "ionet.python.actor";
/// Longest a blocking get waits before checking for Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(200);

mod calls;
mod cluster;
mod generators;
mod objects;
mod options;
mod placement;
mod worker_side;

use calls::*;
use cluster::*;
use generators::*;
use objects::*;
use options::Options;
use placement::*;

/// An error as the Python side raises it:
/// `ionet.exceptions._native_error(kind, message, payload)`.
fn to_py(error: IonetError) -> PyErr {
    let mut payload: &[u8] = &[];
    let (kind, message) = match &error {
        // The worker's own failure text, and its pickled exception apart.
        IonetError::TaskFailed { message, payload: pickled, .. } => {
            payload = pickled;
            ("task_failed", message.clone())
        }
        IonetError::WorkerCrashed { .. } => ("worker_crashed", error.to_string()),
        IonetError::ActorDied(_) => ("actor_died", error.to_string()),
        IonetError::Timeout(_) => ("timeout", error.to_string()),
        IonetError::ObjectLost(_) => ("object_lost", error.to_string()),
        IonetError::OwnerDied(_) => ("owner_died", error.to_string()),
        IonetError::Infeasible(_) => ("infeasible", error.to_string()),
        IonetError::Cancelled(_) => ("cancelled", error.to_string()),
        IonetError::ResourceExhausted(_) => ("object_store_full", error.to_string()),
        IonetError::InvalidArgument(_) => ("invalid_argument", error.to_string()),
        IonetError::NotFound(_) => ("not_found", error.to_string()),
        IonetError::AlreadyExists(_) => ("already_exists", error.to_string()),
        IonetError::Unauthenticated(_) => ("unauthenticated", error.to_string()),
        IonetError::PermissionDenied(_) => ("permission_denied", error.to_string()),
        IonetError::Unavailable(_) => ("unavailable", error.to_string()),
        _ => ("other", error.to_string()),
    };
    Python::attach(|py| {
        let built = py
            .import("ionet.exceptions")
            .and_then(|module| module.call_method1("_native_error", (kind, &message, PyBytes::new(py, payload))));
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
        wrap_pyfunction!(cluster::list_tasks, module)?,
        wrap_pyfunction!(cluster::list_state, module)?,
        wrap_pyfunction!(shutdown, module)?,
        wrap_pyfunction!(is_initialized, module)?,
        wrap_pyfunction!(run_worker, module)?,
        wrap_pyfunction!(settle_forkserver, module)?,
        wrap_pyfunction!(cli_main, module)?,
        wrap_pyfunction!(kv_put, module)?,
        wrap_pyfunction!(kv_get, module)?,
        wrap_pyfunction!(put_parts, module)?,
        wrap_pyfunction!(_serialize_holding, module)?,
        wrap_pyfunction!(_deserialize_holding, module)?,
        wrap_pyfunction!(name_output, module)?,
        wrap_pyfunction!(get_objects, module)?,
        wrap_pyfunction!(objects::wait, module)?,
        wrap_pyfunction!(submit_task, module)?,
        wrap_pyfunction!(create_actor, module)?,
        wrap_pyfunction!(get_actor, module)?,
        wrap_pyfunction!(kill, module)?,
        wrap_pyfunction!(cancel, module)?,
        wrap_pyfunction!(nodes, module)?,
        wrap_pyfunction!(package_directory, module)?,
        wrap_pyfunction!(job_server_defaults, module)?,
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
