"""What the current process, task and actor are: `ionet.get_runtime_context()`."""

from __future__ import annotations

from typing import Dict, List, Optional

from ionet import _ionet


class RuntimeContext:
    """Ids of the current job, node, task and actor, as hex strings (Ray's methods).

    Each call reads the current values: in a worker, the task is the one running on the
    calling thread.
    """

    def get_job_id(self) -> str:
        return _ionet.runtime_context()["job_id"]

    def get_node_id(self) -> str:
        return _ionet.runtime_context()["node_id"]

    def get_task_id(self) -> Optional[str]:
        """The running task's id; None in a driver."""
        return _ionet.runtime_context()["task_id"]

    def get_actor_id(self) -> Optional[str]:
        """The actor's id inside an actor; None elsewhere."""
        return _ionet.runtime_context()["actor_id"]

    def get_accelerator_ids(self) -> Dict[str, List[str]]:
        """The accelerators assigned to this task or actor: {"GPU": ["0", ...]}."""
        return {"GPU": [str(gpu) for gpu in _ionet.runtime_context()["gpu_ids"]]}

    def is_canceled(self) -> bool:
        """Whether the caller cancelled the task or actor call running on this thread
        (`ionet.cancel`): a long call may poll this and stop early."""
        return _ionet.is_canceled()

    def get_worker_id(self) -> Optional[str]:
        """This worker process's id (hex); None in a driver."""
        return _ionet.runtime_context()["worker_id"]

    def get_actor_name(self) -> Optional[str]:
        """The name the actor was created with; None outside a named actor."""
        if _ionet.runtime_context()["actor_id"] is None:
            return None
        from ionet import _worker_runtime

        return _worker_runtime._actor_context.get("name")

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """Whether this actor was restarted (its constructor ran again)."""
        return _ionet.runtime_context()["actor_incarnation"] > 0

    def get_assigned_resources(self) -> Dict[str, float]:
        """What the running task or actor was given: its GPUs, and the CPUs and other
        resources it asked for."""
        from ionet import _context

        context = _context.current() or {}
        assigned = context.get("resources")
        in_task = _ionet.runtime_context()["actor_id"] is None and self.get_task_id() is not None
        if assigned is None:
            assigned = {"CPU": 1.0} if in_task else {}  # a task's default; an actor holds none
        assigned = dict(assigned)
        gpus = _ionet.runtime_context()["gpu_ids"]
        if gpus and "GPU" not in assigned:
            assigned["GPU"] = float(len(gpus))
        return assigned

    def get_placement_group_id(self) -> Optional[str]:
        """The placement group the running task or actor was scheduled in, if any."""
        from ionet import _context

        group = (_context.current() or {}).get("placement_group")
        return None if group is None else str(group.id)

    @property
    def namespace(self) -> str:
        return _ionet.runtime_context()["namespace"]

    @property
    def job_id(self) -> str:
        return self.get_job_id()

    @property
    def node_id(self) -> str:
        return self.get_node_id()


def get_runtime_context() -> RuntimeContext:
    """The runtime context of this process."""
    return RuntimeContext()
