"""Placement groups on an embedded cluster (one node of 4 CPUs)."""

import pytest

import ionet
from conftest import wait_for
from ionet.util import placement_group, placement_group_table, remove_placement_group
from ionet.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote(num_cpus=1)
def node_of_task():
    return ionet.get_runtime_context().get_node_id()


def test_group_becomes_ready_and_runs_tasks_in_its_bundles():
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK", name="pair")
    assert group.bundle_specs == [{"CPU": 1.0}, {"CPU": 1.0}] and group.bundle_count == 2
    assert ionet.get(group.ready(), timeout=60) == group
    assert group.wait(60)
    table = placement_group_table(group)
    assert table["placement_group_id"] == group.id == group.id.hex()
    assert table["state"] == "CREATED" and table["strategy"] == "PACK" and table["name"] == "pair"
    assert len(table["bundles"]) == 2 and len(table["bundles_to_node_id"]) == 2
    assert group.id in placement_group_table()

    node = ionet.nodes()[0]["NodeID"]
    refs = [
        node_of_task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
        for index in (0, 1, -1)
    ]
    assert ionet.get(refs, timeout=60) == [node] * 3

    remove_placement_group(group)
    wait_for(lambda: placement_group_table(group)["state"] == "REMOVED", what="group removed")


def test_group_that_cannot_fit_stays_pending():
    group = placement_group([{"CPU": 100}])
    assert not group.wait(0.5)
    assert placement_group_table(group)["state"] == "PENDING"
    remove_placement_group(group)


def test_invalid_groups_are_refused():
    with pytest.raises(ValueError):
        placement_group([{"CPU": 1}], strategy="SIDEWAYS")
    with pytest.raises(ValueError):
        placement_group([])
    with pytest.raises(ValueError):
        placement_group([{}])
