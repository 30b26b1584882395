"""Utilities beyond the core API, as `ray.util`: placement groups and scheduling strategies."""

from ionet.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = [
    "PlacementGroup",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
]
