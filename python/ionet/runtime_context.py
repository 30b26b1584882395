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
