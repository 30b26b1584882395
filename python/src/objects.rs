//! Objects from Python: refs, buffers that view shared memory, values put as parts, gets,
//! waits and cancels.

use super::*;

/// A reference to an object in the cluster (Ray's `ObjectRef`).
#[pyclass(module = "ionet._ionet", name = "ObjectRef", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct PyObjectRef {
    pub(crate) inner: ObjectRef<Raw>,
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
pub(crate) fn _object_ref_from_wire(wire: &[u8]) -> PyResult<PyObjectRef> {
    let inner: ObjectRef<Raw> = ionet::task::decode_value(wire).map_err(PyValueError::new_err)?;
    Ok(PyObjectRef { inner })
}

pub(crate) enum BufferBytes {
    Object(ObjectBytes),
    Arg(ArgBytes),
}

/// An object's bytes, possibly a read-only view of the node's shared memory. Python makes
/// zero-copy views of it from `address` and `size`, keeping this object alive beside them.
#[pyclass(module = "ionet._ionet", name = "Buffer", frozen)]
pub(crate) struct Buffer {
    pub(crate) bytes: BufferBytes,
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Refs found inside a value while it was serialised (`_serialize_holding`): whatever
/// carries the value (a call's argument, a stored object) holds them as long as it lives.
#[pyclass(frozen, name = "HeldRefs")]
pub(crate) struct HeldRefs {
    pub(crate) refs: Vec<ObjectRef<()>>,
}

/// Names the task or actor whose lines follow in this worker's output.
#[pyfunction]
pub(crate) fn name_output(name: &str) {
    raw::name_output(name);
}

/// `deserialize(buffer)` for a value read by `get` (whose ref the caller still holds):
/// the refs inside it to other processes' objects are then lent to this process by their
/// owners, so they outlive the value (GIL released while the owners answer).
#[pyfunction]
pub(crate) fn _deserialize_holding<'py>(
    py: Python<'py>,
    deserialize: &Bound<'py, PyAny>,
    buffer: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let (value, decoded) = raw::collect_decoded(|| deserialize.call1((buffer,)));
    py.detach(move || raw::borrow_decoded(decoded));
    value
}

/// `serialize(value)`, and the refs that it wrote whose objects this process holds
/// (None if none).
#[pyfunction]
pub(crate) fn _serialize_holding<'py>(
    serialize: &Bound<'py, PyAny>,
    value: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Option<HeldRefs>)> {
    let (serialized, refs) = ionet::collect_contained(|| serialize.call1((value,)));
    Ok((serialized?, (!refs.is_empty()).then_some(HeldRefs { refs })))
}

/// The arguments of the generic Python task or actor class: the key of the pickled
/// function or class, then the call's own.
pub(crate) fn keyed_args(key: &[u8], args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
    let mut all = Vec::with_capacity(args.len() + 1);
    all.push(Arg::Value(Ok(key.to_vec())));
    all.extend(convert_args(args)?);
    Ok(all)
}

/// Task and constructor arguments: `bytes` travel by value (a `(bytes, HeldRefs)` pair
/// with the refs inside them), `ObjectRef`s by reference.
pub(crate) fn convert_args(args: &Bound<'_, PyList>) -> PyResult<Vec<Arg>> {
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

/// A part of a value: its bytes, and whatever keeps them alive while they are copied.
pub(crate) enum Part {
    Bytes(Py<PyBytes>),
    Memory { address: usize, length: usize, _keepalive: Py<PyAny> },
}

pub(crate) fn parts_of(parts: &Bound<'_, PyList>) -> PyResult<Vec<Part>> {
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

pub(crate) fn part_slice<'a>(part: &'a Part, py: Python<'a>) -> &'a [u8] {
    match part {
        Part::Bytes(bytes) => bytes.bind(py).as_bytes(),
        // SAFETY: the Python side hands the address and length of a live buffer and keeps
        // its owner in `_keepalive` for as long as this part exists.
        Part::Memory { address, length, .. } => unsafe { std::slice::from_raw_parts(*address as *const u8, *length) },
    }
}

pub(crate) fn concatenated(parts: &[Part], py: Python<'_>) -> Vec<u8> {
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
pub(crate) fn put_parts(
    py: Python<'_>,
    parts: &Bound<'_, PyList>,
    held: Option<&Bound<'_, HeldRefs>>,
) -> PyResult<PyObjectRef> {
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

pub(crate) fn objects(refs: &Bound<'_, PyList>) -> PyResult<Vec<ObjectRef<Raw>>> {
    refs.iter().map(|reference| Ok(reference.cast::<PyObjectRef>()?.get().inner.clone())).collect()
}

/// Waits for the objects and returns their bytes (GIL released; Ctrl-C interrupts).
#[pyfunction]
#[pyo3(signature = (refs, timeout = None))]
pub(crate) fn get_objects(py: Python<'_>, refs: &Bound<'_, PyList>, timeout: Option<f64>) -> PyResult<Vec<Buffer>> {
    let objects = objects(refs)?;
    let deadline = timeout.map(|seconds| Instant::now() + Duration::from_secs_f64(seconds.max(0.0)));
    // Tasks this one submitted that nobody started yet run here first (see `ionet::inline`),
    // unless the get has a deadline: such a task could outlast it.
    if deadline.is_none() {
        let waited = objects.clone();
        py.detach(move || raw::run_waited_tasks(&waited));
    }
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
pub(crate) fn wait(
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
#[pyo3(signature = (reference, force = false, recursive = true))]
pub(crate) fn cancel(reference: &PyObjectRef, force: bool, recursive: bool) -> PyResult<()> {
    raw::cancel(&reference.inner, force, recursive).or_raise()
}
