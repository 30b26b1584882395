"""Placement groups: sets of resource bundles reserved together across nodes, as Ray's.

A group is PENDING until the head finds room for every bundle at once, then CREATED.
Tasks and actors run in a bundle with
`scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle_index)`.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Dict, List, Optional

from ionet import _ionet
from ionet._ionet import ObjectRef
from ionet._serialization import serialize

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class PlacementGroupID(str):
    """A placement group's id: its hex string, which also answers Ray's `.hex()`."""

    def hex(self) -> str:
        return str(self)


class PlacementGroup:
    """A handle to a placement group: `id` (hex) and the `bundle_specs` it asked for."""

    def __init__(self, id: str, bundle_specs: List[Dict[str, float]]):
        self.id = PlacementGroupID(id)
        self.bundle_specs = bundle_specs

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> ObjectRef:
        """A ref that becomes ready, holding this group, when the group is created."""
        return _ionet.placement_group_ready(self.id, b"".join(serialize(self)))

    def wait(self, timeout_seconds: Optional[float] = 30) -> bool:
        """Whether the group is created within `timeout_seconds` (None: no limit)."""
        return _ionet.placement_group_wait(self.id, timeout_seconds)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"PlacementGroup({self.id}, {self.bundle_specs})"


def placement_group(
    bundles: List[Dict[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: Optional[str] = None,
    cheapest_first: bool = False,
    **ignored: Any,
) -> PlacementGroup:
    """Asks for a group of `bundles` (each a dict of resource name to quantity).

    strategy: PACK (as few nodes as possible), SPREAD (as many as possible),
    STRICT_PACK (one node), STRICT_SPREAD (one node per bundle).
    name: found again with `get_placement_group(name)`, from any driver.
    lifetime: None (removed when this job ends) or "detached" (kept until removed).
    cheapest_first (ionet's own): a group asking for GPUs goes on the cheapest nodes per
        GPU-hour that keep its strategy, rather than the least utilised.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if not isinstance(bundles, list) or not bundles:
        raise ValueError("bundles must be a non-empty list of dicts")
    specs = [_bundle(index, bundle) for index, bundle in enumerate(bundles)]
    return PlacementGroup(_ionet.placement_group(specs, strategy, name, lifetime == "detached", cheapest_first), specs)


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live group named `placement_group_name` (made by this or any other driver).

    Raises `ValueError` when there is none.
    """
    for group_id, state in _ionet.placement_group_table(None).items():
        if state.get("name") == placement_group_name and state.get("state") != "REMOVED":
            bundles = state.get("bundles") or {}
            specs = [dict(bundles[index]) for index in sorted(bundles)]
            return PlacementGroup(group_id, specs)
    raise ValueError(f"no placement group named {placement_group_name!r}")


def get_current_placement_group() -> Optional[PlacementGroup]:
    """The group the running task or actor was scheduled in, if it captures its child
    tasks (Ray's rule); None in a driver or outside a group."""
    from ionet import _context

    context = _context.current() or {}
    return context.get("placement_group") if context.get("capture") else None


def _bundle(index: int, bundle: Any) -> Dict[str, float]:
    if not isinstance(bundle, dict) or not bundle:
        raise ValueError(f"bundle {index} must be a non-empty dict of resource name to quantity, got {bundle!r}")
    for resource, amount in bundle.items():
        if isinstance(amount, bool) or not isinstance(amount, Real) or amount < 0:
            raise ValueError(f"bundle {index}: {resource!r} must be a non-negative number, got {amount!r}")
    return {str(resource): float(amount) for resource, amount in bundle.items()}


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Releases the group's bundles; tasks and actors running in them are stopped."""
    _ionet.remove_placement_group(placement_group.id)


def placement_group_table(placement_group: Optional[PlacementGroup] = None) -> Dict[str, Any]:
    """The state of one group, or of all (a dict id -> state) when none is given.

    A group's state: placement_group_id, name, strategy, state (PENDING, CREATED or
    REMOVED), bundles (index -> resources), bundles_to_node_id (index -> node id).
    """
    return _ionet.placement_group_table(None if placement_group is None else placement_group.id)
