"""The native module (pyo3): the core worker, object store client and embedded cluster.

Errors are raised as the exception `ionet.exceptions._native_error(kind, message, payload)`
returns. Calls that wait release the GIL, and Ctrl-C interrupts them.
"""

from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple, Union

# A part of an object's bytes: bytes, or (address, length, keepalive) naming memory the
# native side may read while it holds `keepalive`.
Part = Union[bytes, Tuple[int, int, Any]]
# A call argument: a serialized value, or a ref whose object's bytes the worker receives.
Argument = Union[bytes, Tuple[bytes, "HeldRefs"], "ObjectRef"]
# None / "DEFAULT", "SPREAD", ("node", node_id_hex, soft), ("placement_group", pg_id_hex, index)
SchedulingStrategy = Union[None, str, Tuple[str, str, Union[bool, int]]]

class ObjectRef:
    """A reference to an object (a task's result or a put value); picklable."""

    def hex(self) -> str: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __await__(self) -> Any:
        """Delegates to `ionet._private.object_ref_await(self)`."""
    def future(self) -> Any:
        """Delegates to `ionet._private.object_ref_future(self)`."""
    def _on_ready(self, callback: Callable[[], None]) -> None:
        """Calls `callback()` once, from a native thread with the GIL, when the object is
        ready or failed."""

class ActorHandle:
    """A reference to an actor; picklable."""

    def call(self, method: str, args: List[Argument], options: Dict[str, Any]) -> ObjectRef: ...
    def hex(self) -> str:
        """The actor's id."""
    def info(self) -> Dict[str, Any]:
        """state, name, namespace, restarts, death_cause, node_id, class_key (bytes)."""

class Buffer:
    """The bytes of an object, possibly mapped from shared memory: valid while alive."""

    address: int
    size: int
    def tobytes(self) -> bytes: ...

def init(
    address: Optional[str],
    num_cpus: Optional[float],
    num_gpus: Optional[int],
    gpu_type: Optional[str],
    resources: Optional[Dict[str, float]],
    namespace: str,
    session_dir: Optional[str],
    object_store_memory: Optional[int],
    worker_argv: List[str],
    worker_env: Dict[str, str],
    worker_cwd: str,
    payer_account: str = "",
    log_to_driver: bool = True,
    runtime_env_json: Optional[str] = None,
    min_reliability: Optional[float] = None,
    worker_forks: bool = False,
) -> None:
    """Joins the cluster at `address` ("auto" or "host:port"), or starts an embedded one
    (None). Node daemons start this job's workers with `worker_argv` in `worker_cwd`,
    with `worker_env` added to their environment. With `log_to_driver`, what the job's
    workers print is printed here, prefixed with the task, pid and node. The job's
    workers start inside `runtime_env_json` (Ray's runtime_env, as JSON). With
    `worker_forks`, each node forks them from a forkserver of the job (`ionet._forkserver`)."""

def shutdown() -> None: ...
def is_initialized() -> bool:
    """True in a driver after `init`, and in a worker."""

def settle_forkserver() -> None:
    """In a forkserver, first: it dies with its node daemon, and what it creates is its
    user's alone."""

def run_worker() -> NoReturn:
    """Serves tasks in a worker process started by a node daemon, until stopped."""

def cli_main(argv: List[str]) -> int:
    """Runs the `ionet` command line with `argv` (no program name); the exit code."""

def kv_put(namespace: str, key: bytes, value: bytes, overwrite: bool) -> bool: ...
def kv_get(namespace: str, key: bytes) -> Optional[bytes]: ...
class HeldRefs:
    """Refs found inside a serialised value, held by whatever carries the value."""

def name_output(name: str) -> None:
    """In a worker: names the task or actor whose lines follow in its output."""

def _deserialize_holding(deserialize: Any, buffer: Any) -> Any:
    """`deserialize(buffer)` for a value read by `get`: refs inside it to other processes'
    objects are then lent to this process by their owners."""

def _serialize_holding(serialize: Any, value: Any) -> Tuple[List[Part], Optional[HeldRefs]]:
    """`serialize(value)`, and the refs owned by this process that it wrote (None if none)."""

def put_parts(parts: List[Part], held: Optional[HeldRefs] = None) -> ObjectRef:
    """Stores one object whose bytes are the parts concatenated (one copy); it holds the
    refs in `held` as long as it lives."""

def get_objects(refs: List[ObjectRef], timeout: Optional[float]) -> List[Buffer]: ...
def wait(refs: List[ObjectRef], num_returns: int, timeout: Optional[float]) -> Tuple[List[int], List[int]]:
    """Indices of the ready refs (in order of readiness, at most num_returns) and of the others."""

def submit_task(function_key: bytes, args: List[Argument], options: Dict[str, Any]) -> ObjectRef:
    """options: num_cpus, num_gpus, memory, resources, accelerator_type, max_retries,
    retry_exceptions, scheduling_strategy (all optional)."""

def create_actor(class_key: bytes, args: List[Argument], options: Dict[str, Any]) -> ActorHandle:
    """options: the resource options of `submit_task`, name, namespace, lifetime,
    get_if_exists, max_restarts, max_task_retries, max_concurrency (all optional)."""

def get_actor(name: str, namespace: Optional[str]) -> ActorHandle: ...
def kill(handle: ActorHandle, no_restart: bool) -> None: ...
def cancel(ref: ObjectRef, force: bool = False, recursive: bool = True) -> None: ...
def nodes() -> List[Dict[str, Any]]:
    """NodeID, Alive, NodeManagerAddress, Resources, Labels per node."""

def package_directory(path: str, excludes: List[str], under_own_name: bool) -> Tuple[str, bytes]:
    """A directory packed for a job: its package's name (by content) and the zip."""

def job_server_defaults(session_dir: Optional[str] = None) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """This machine's session's job server address, operator credential and cluster CA."""

def cluster_resources() -> Dict[str, float]: ...
def available_resources() -> Dict[str, float]: ...
def get_gpu_ids() -> List[int]: ...
def runtime_context() -> Dict[str, Any]:
    """job_id, node_id, task_id, actor_id, gpu_ids, namespace."""

def placement_group(
    bundles: List[Dict[str, float]], strategy: str, name: str, detached: bool = False, cheapest_first: bool = False
) -> str:
    """Asks for a group; its id (hex)."""

def placement_group_wait(pg_id: str, timeout: Optional[float]) -> bool: ...
def placement_group_ready(pg_id: str, value: bytes) -> ObjectRef:
    """A ref that becomes ready, holding `value` (serialized), when the group is created."""

def remove_placement_group(pg_id: str) -> None: ...
def placement_group_table(pg_id: Optional[str]) -> Dict[str, Any]: ...
def exit_actor() -> NoReturn:
    """Ends the actor this worker hosts for good (no restart); the process exits."""
def is_canceled() -> bool:
    """Whether the caller cancelled the task or actor call running on this thread."""
def current_task_id() -> Optional[str]:
    """The id (hex) of the task or actor call running on this thread, if any."""
def generator_open(backpressure: int) -> Tuple[str, str]:
    """Opens a stream this process consumes: (its id, this process's address)."""
def generator_next(id: str, task: ObjectRef, position: int, timeout: Optional[float] = None) -> Optional[ObjectRef]:
    """Item `position` of the stream, None at its end; raises the task's error after its items."""
def generator_close(id: str) -> None: ...
def generator_flush(id: str) -> bool: ...
def generator_send(owner: str, id: str, index: int, parts: List[Part]) -> bool:
    """Sends item `index` to the stream's consumer; False once it is gone."""
