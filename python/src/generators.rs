//! Streams of items (generator tasks): opening, reading, sending, flushing and closing them.

use super::*;

pub(crate) fn stream_id(id: &str) -> PyResult<ionet::ObjectId> {
    id.parse().map_err(|err: IonetError| PyValueError::new_err(err.to_string()))
}

/// Opens a stream for a generator task this process consumes: (its id, this process's
/// address), which the task's sink names.
#[pyfunction]
pub(crate) fn generator_open(backpressure: u64) -> PyResult<(String, String)> {
    let (id, owner) = ionet::generator::open_stream(backpressure).or_raise()?;
    Ok((id.hex(), owner))
}

/// Item `position` of the stream (waiting, GIL released), None at its end; raises the
/// task's error after its items if it failed, `GetTimeoutError` past `timeout`.
#[pyfunction]
#[pyo3(signature = (id, task, position, timeout = None))]
pub(crate) fn generator_next(
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
pub(crate) fn generator_close(id: &str) -> PyResult<()> {
    ionet::generator::close_stream(&stream_id(id)?);
    Ok(())
}

/// Sends item `index` (the concatenation of `parts`) of stream `id` to its consumer at
/// `owner`, waiting while the consumer is too far behind; False: the consumer is gone.
#[pyfunction]
pub(crate) fn generator_send(
    py: Python<'_>,
    owner: String,
    id: &str,
    index: u64,
    parts: &Bound<'_, PyList>,
) -> PyResult<bool> {
    let id = stream_id(id)?;
    let parts = parts_of(parts)?;
    let bytes = concatenated(&parts, py);
    py.detach(move || ionet::generator::send_item(&owner, &id, index, bytes)).or_raise()
}

/// Waits until every item this process sent on stream `id` reached its consumer (a
/// generator task does before it returns); False: the consumer is gone.
#[pyfunction]
pub(crate) fn generator_flush(py: Python<'_>, id: &str) -> PyResult<bool> {
    let id = stream_id(id)?;
    py.detach(move || ionet::generator::flush_stream(&id)).or_raise()
}
