"""Utilities beyond the core API, as `ray.util`: placement groups, scheduling strategies,
`ActorPool`, accelerator names; `ionet.util.queue.Queue` and
`ionet.util.multiprocessing.Pool` are modules of their own, as in Ray."""

import socket as _socket

from ionet.util import accelerators
from ionet.util.actor_pool import ActorPool
from ionet.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)


def get_node_ip_address() -> str:
    """The IP address of this machine as the cluster reaches it (its node daemon's)."""
    from ionet import _ionet

    if _ionet.is_initialized():
        for node in _ionet.nodes():
            if node["NodeID"] == _ionet.runtime_context()["node_id"]:
                return node["NodeManagerAddress"]
    try:
        return _socket.gethostbyname(_socket.gethostname())
    except OSError:
        return "127.0.0.1"


__all__ = [
    "ActorPool",
    "PlacementGroup",
    "accelerators",
    "get_current_placement_group",
    "get_node_ip_address",
    "get_placement_group",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
