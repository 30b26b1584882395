"""Joining a cluster, and moving objects: `init`, `get`, `put`, `wait`, `cancel`, and the
cluster's description.

Every call delegates to the native module `ionet._ionet`; this layer converts Python
values to and from object bytes (`ionet._serialization`) and gives the calls Ray's
signatures.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ionet import _export, _ionet, _options
from ionet._ionet import ObjectRef
from ionet._serialization import deserialize, serialize

# Arguments of Ray's `init` that make no difference here; any other unknown one is refused.
_IGNORED_RAY_ARGUMENTS = frozenset(
    {
        "logging_level",
        "logging_format",
        "configure_logging",
        "include_dashboard",
        "dashboard_host",
        "dashboard_port",
    }
)

_shutdown_registered = False


def init(
    address: Optional[str] = None,
    *,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[int] = None,
    resources: Optional[Dict[str, float]] = None,
    namespace: Optional[str] = None,
    object_store_memory: Optional[int] = None,
    ignore_reinit_error: bool = False,
    _session_dir: Optional[str] = None,
    _gpu_type: Optional[str] = None,
    payer_account: Optional[str] = None,
    log_to_driver: bool = True,
    runtime_env: Optional[Dict[str, Any]] = None,
    min_reliability: Optional[float] = None,
    **kwargs: Any,
) -> None:
    """Joins a cluster, or starts one inside this process, as `ray.init`.

    address: None starts an embedded cluster (a control store and one node) for this
        program, ended by `shutdown()` or at exit; "auto" joins the cluster that
        `ionet start` started on this machine (found in the session directory,
        `_session_dir` or the default); "host:port" joins the head there.
    num_cpus, num_gpus, resources, object_store_memory: what the embedded cluster's node
        offers (default: what the machine has). `_gpu_type` names the declared GPUs'
        type (e.g. "A100-80GB").
    namespace: where actor names live; default a fresh anonymous one, as in Ray.
    ignore_reinit_error: return quietly if already initialized instead of raising.
    payer_account: the account this job's metered usage is billed to (its credits pay
        the providers); default: the account the cluster bills jobs to by default.
    log_to_driver: print what this job's workers print, as Ray does: each line prefixed
        with `(task pid=…, ip=…)`, repeats across workers folded.
    runtime_env: Ray's runtime environment for every worker of this job:
        `working_dir` and `py_modules` (local directories, uploaded once to the head
        with the account's key and unpacked on each node; or `gcs://` URIs already
        uploaded), `excludes`, `env_vars`, `pip` / `uv` (installed once per node per
        set of requirements). In a submitted job it replaces the submission's key by
        key (`env_vars` merged).
    min_reliability: run this job's tasks and actors only on nodes whose reliability
        score (0 to 1: uptime, GPU checks, leases lost to the node's death, as the head
        keeps them; `ionet status`) is at least this; the head bills no lease of the job
        on another. Default: any node (or `IONET_MIN_RELIABILITY`).

    Ray's logging and dashboard arguments are accepted and ignored; unlike Ray, nothing
    is returned.
    """
    unknown = set(kwargs) - _IGNORED_RAY_ARGUMENTS
    if unknown:
        raise TypeError(f"init() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if _ionet.is_initialized():
        if ignore_reinit_error:
            return
        raise RuntimeError("ionet.init() was already called; call ionet.shutdown() first, or pass ignore_reinit_error=True")
    _ionet.init(
        address,
        None if num_cpus is None else float(num_cpus),
        num_gpus,
        _gpu_type,
        None if resources is None else {name: float(amount) for name, amount in resources.items()},
        namespace if namespace is not None else str(uuid.uuid4()),
        _session_dir,
        object_store_memory,
        [sys.executable, "-m", "ionet._worker"],
        # Workers import what the driver can: its modules, tests, scripts' folders.
        {"IONET_PYTHONPATH": os.pathsep.join(sys.path)},
        os.getcwd(),
        payer_account or "",
        log_to_driver,
        _options._runtime_env("runtime_env", runtime_env),
        None if min_reliability is None else float(min_reliability),
        # Workers forked from a forkserver per job and node that has imported ionet
        # (`ionet._forkserver`); IONET_NO_FORKSERVER=1 starts each in an interpreter of
        # its own.
        worker_forks=os.environ.get("IONET_NO_FORKSERVER", "") in ("", "0"),
    )
    _export.forget_exports()
    global _shutdown_registered
    if not _shutdown_registered:
        atexit.register(shutdown)
        _shutdown_registered = True
    for hook in list(_after_init):
        hook()


# Called at the end of every `init` (e.g. tqdm_ray starts the actor its bars report to).
_after_init: List[Any] = []


def shutdown() -> None:
    """Leaves the cluster (ending an embedded one); does nothing if not initialized."""
    if _ionet.is_initialized():
        _ionet.shutdown()
    _export.forget_exports()


def is_initialized() -> bool:
    """Whether this process is part of a cluster (always true in a worker)."""
    return _ionet.is_initialized()


def ensure_initialized() -> None:
    """Starts an embedded cluster if this process has none, as Ray does on first use."""
    if not _ionet.is_initialized():
        init()


def put(value: Any) -> ObjectRef:
    """Stores `value` in the object store and returns its ref."""
    if isinstance(value, ObjectRef):
        raise TypeError("calling put() on an ObjectRef is not allowed; pass the ref itself instead")
    ensure_initialized()
    parts, held = _ionet._serialize_holding(serialize, value)
    return _ionet.put_parts(parts, held)


def get(object_refs: Union[ObjectRef, List[ObjectRef]], *, timeout: Optional[float] = None) -> Any:
    """The value of a ref, or the list of values of a list of refs, waiting for them.

    Raises the task's error when a task failed (`IonetTaskError` derived from the task's
    exception class), and `GetTimeoutError` when `timeout` seconds pass first. A
    `DynamicObjectRefGenerator` (the value of a `num_returns="dynamic"` task) is
    returned as it is; its refs are read with `get` in turn.
    """
    if isinstance(object_refs, ObjectRef):
        return _ionet._deserialize_holding(deserialize, _ionet.get_objects([object_refs], timeout)[0])
    if not isinstance(object_refs, list):
        raise ValueError(f"'object_refs' must be an ObjectRef or a list of ObjectRefs, got {type(object_refs).__name__}")
    return [_ionet._deserialize_holding(deserialize, buffer) for buffer in _ionet.get_objects(object_refs, timeout)]


def wait(
    object_refs: Sequence[ObjectRef],
    *,
    num_returns: int = 1,
    timeout: Optional[float] = None,
    fetch_local: bool = True,
) -> Tuple[List[ObjectRef], List[ObjectRef]]:
    """Waits until `num_returns` of the refs are ready or `timeout` seconds pass.

    Returns (ready, not ready). `fetch_local` is accepted for Ray's sake: `get` fetches
    objects from other nodes itself.
    """
    if isinstance(object_refs, ObjectRef):
        raise TypeError("wait() expects a list of ObjectRefs, got a single ObjectRef")
    refs = list(object_refs)
    if not refs:
        return [], []
    if not 1 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be between 1 and the number of refs ({len(refs)}), got {num_returns}")
    ready, not_ready = _ionet.wait(refs, num_returns, timeout)
    return [refs[index] for index in ready], [refs[index] for index in not_ready]


def cancel(object_ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancels the task producing `object_ref`: its `get` raises `TaskCancelledError`.

    A call already running is told: an async actor method gets `asyncio.CancelledError`
    at its next await (and may clean up in `except`), a sync one sees
    `get_runtime_context().is_canceled()` turn true. `force` kills the worker running a
    task instead. With `recursive` (the default) the tasks the cancelled task submitted
    are cancelled too, and theirs.
    """
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel() expects an ObjectRef, got {type(object_ref).__name__}")
    _ionet.cancel(object_ref, force, recursive)


def nodes() -> List[Dict[str, Any]]:
    """One dict per node: NodeID, Alive, NodeManagerAddress, Resources, Labels."""
    return _ionet.nodes()


def cluster_resources() -> Dict[str, float]:
    """The resources of all alive nodes, summed."""
    return _ionet.cluster_resources()


def available_resources() -> Dict[str, float]:
    """The resources not held by tasks, actors or placement groups, summed over nodes."""
    return _ionet.available_resources()


def get_gpu_ids() -> List[int]:
    """The ids of the GPUs assigned to the current task or actor (empty in a driver)."""
    return _ionet.get_gpu_ids()
