//! Placement groups from Python: create, wait, ready, remove, and Ray's table rows.

use super::*;

pub(crate) fn group(id: &str) -> PyResult<ionet::PlacementGroupId> {
    id.parse().map_err(|err: IonetError| PyValueError::new_err(err.to_string()))
}

#[pyfunction]
#[pyo3(signature = (bundles, strategy, name = String::new(), detached = false, cheapest_first = false))]
pub(crate) fn placement_group(
    py: Python<'_>,
    bundles: Vec<BTreeMap<String, f64>>,
    strategy: &str,
    name: String,
    detached: bool,
    cheapest_first: bool,
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
    let options = ionet::PlacementGroupOptions { name, detached, cheapest_first };
    let created = py.detach(move || ionet::placement_group_with(bundles, strategy, options)).or_raise()?;
    Ok(created.id().hex())
}

#[pyfunction]
#[pyo3(signature = (pg_id, timeout = None))]
pub(crate) fn placement_group_wait(py: Python<'_>, pg_id: &str, timeout: Option<f64>) -> PyResult<bool> {
    let id = group(pg_id)?;
    let timeout = Duration::from_secs_f64(timeout.unwrap_or(f64::from(u32::MAX)).max(0.0));
    py.detach(move || ionet::PlacementGroup::from_id(id)?.wait(timeout)).or_raise()
}

#[pyfunction]
pub(crate) fn placement_group_ready(py: Python<'_>, pg_id: &str, value: &[u8]) -> PyResult<PyObjectRef> {
    let id = group(pg_id)?;
    let value = value.to_vec();
    let inner = py.detach(move || ionet::PlacementGroup::from_id(id)?.ready_raw(value)).or_raise()?;
    Ok(PyObjectRef { inner })
}

#[pyfunction]
pub(crate) fn remove_placement_group(py: Python<'_>, pg_id: &str) -> PyResult<()> {
    let id = group(pg_id)?;
    py.detach(move || ionet::remove_placement_group(&ionet::PlacementGroup::from_id(id)?)).or_raise()
}

/// A group's row as Ray's `placement_group_table` shows it.
pub(crate) fn group_row<'py>(py: Python<'py>, group: &ionet::PlacementGroupInfo) -> PyResult<Bound<'py, PyDict>> {
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
pub(crate) fn placement_group_table<'py>(py: Python<'py>, pg_id: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
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
