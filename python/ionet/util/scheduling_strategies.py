"""Scheduling strategies for the `scheduling_strategy` option, as Ray's.

Besides these objects, the option takes the strings "DEFAULT" (pack onto nodes until they
are busy, then spread) and "SPREAD" (spread tasks over the nodes).
"""

from __future__ import annotations

from typing import Any, Optional


class PlacementGroupSchedulingStrategy:
    """Run in a bundle of a placement group.

    `placement_group_bundle_index` -1 (the default) runs in any bundle with room.
    With `placement_group_capture_child_tasks`, the tasks and actors the task submits
    without a scheduling strategy of their own run in the same group (any bundle).
    """

    def __init__(
        self,
        placement_group: Any,
        placement_group_bundle_index: int = -1,
        placement_group_capture_child_tasks: Optional[bool] = None,
    ):
        self.placement_group = placement_group
        self.placement_group_bundle_index = placement_group_bundle_index
        self.placement_group_capture_child_tasks = placement_group_capture_child_tasks


class NodeAffinitySchedulingStrategy:
    """Run on the node `node_id` (hex); with `soft`, elsewhere when it cannot."""

    def __init__(self, node_id: str, soft: bool):
        self.node_id = node_id
        self.soft = soft
