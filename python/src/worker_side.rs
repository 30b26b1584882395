//! The worker's side: running Python tasks and actor calls for the Rust runtime, with the
//! GIL held on its threads.

use super::*;

/// Buffers for a worker-side call's arguments (views of the store for stored ones).
pub(crate) fn arg_buffers(args: Vec<ArgBytes>) -> Vec<Buffer> {
    args.into_iter().map(|arg| Buffer { bytes: BufferBytes::Arg(arg) }).collect()
}

/// What `execute_task` / `call_actor` return: parts of the value, or a failure.
pub(crate) fn result_of(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> Result<Vec<u8>, Failure> {
    let value = result.map_err(|err| Failure::error(format!("the Python worker runtime failed: {err}")))?;
    // (text, pickled exception, retryable): the call raised (see `_worker_runtime`).
    if let Ok(tuple) = value.cast::<pyo3::types::PyTuple>() {
        let (text, payload, retryable): (String, Bound<'_, PyBytes>, bool) = tuple
            .extract()
            .map_err(|err| Failure::error(format!("malformed failure from the Python runtime: {err}")))?;
        let failure = if retryable { Failure::error(text) } else { Failure::final_error(text) };
        return Err(failure.with_payload(payload.as_bytes().to_vec()));
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
pub(crate) fn attach_runtime_thread<R>(call: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
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

pub(crate) fn python_task(args: Vec<ArgBytes>) -> Result<Vec<u8>, Failure> {
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
pub(crate) struct PythonInstance(Py<PyAny>);

pub(crate) fn python_actor_construct(args: Vec<ArgBytes>) -> Result<Box<dyn std::any::Any + Send + Sync>, Failure> {
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

pub(crate) fn python_actor_call(
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
