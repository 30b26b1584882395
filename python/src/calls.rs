//! Tasks and actors from Python: submitting a task, creating, finding, calling, killing
//! and leaving an actor.

use super::*;

/// A handle to an actor (Ray's `ActorHandle`, untyped: methods are named at call time).
#[pyclass(module = "ionet._ionet", name = "ActorHandle", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PyActorHandle {
    pub(crate) inner: ActorHandle,
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
        let info = py.detach(move || handle.row()).or_raise()?;
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
pub(crate) fn _actor_handle_from_wire(wire: &[u8]) -> PyResult<PyActorHandle> {
    let inner: ActorHandle = ionet::task::decode_value(wire).map_err(PyValueError::new_err)?;
    Ok(PyActorHandle { inner })
}

#[pyfunction]
pub(crate) fn submit_task(
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
#[pyo3(signature = (class_key, args, options, class_name = None))]
pub(crate) fn create_actor(
    py: Python<'_>,
    class_key: &[u8],
    args: &Bound<'_, PyList>,
    options: &Options,
    class_name: Option<String>,
) -> PyResult<PyActorHandle> {
    let all = keyed_args(class_key, args)?;
    let mut actor = options.actor.clone();
    actor.class_label = class_name.filter(|name| !name.is_empty());
    let inner = py.detach(move || ionet::create_actor(PYTHON_ACTOR, actor, all)).or_raise()?;
    Ok(PyActorHandle { inner })
}

/// The Python handle type of `get_actor` (any Python actor is hosted by one Rust class).
pub(crate) struct PythonActor(ActorHandle);

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
pub(crate) fn get_actor(py: Python<'_>, name: &str, namespace: Option<String>) -> PyResult<PyActorHandle> {
    let found = py.detach(move || ionet::get_actor::<PythonActor>(name, namespace.as_deref())).or_raise()?;
    Ok(PyActorHandle { inner: found.0 })
}

#[pyfunction]
pub(crate) fn kill(py: Python<'_>, handle: &PyActorHandle, no_restart: bool) -> PyResult<()> {
    let handle = handle.inner.clone();
    py.detach(move || ionet::actor::kill_handle(&handle, no_restart)).or_raise()
}

/// Ends the actor this worker hosts for good (Ray's `exit_actor`); the process exits.
#[pyfunction]
pub(crate) fn exit_actor(py: Python<'_>) -> PyResult<()> {
    match py.detach(ionet::exit_actor) {
        Ok(never) => match never {},
        Err(err) => Err(to_py(err)),
    }
}
