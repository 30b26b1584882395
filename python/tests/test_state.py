"""The state API (`ionet.util.state`, as Ray's): a job's tasks as the head heard of
them, with their names, states, nodes and errors."""

import pytest

import ionet
from ionet.util.state import list_actors, list_jobs, list_nodes, list_tasks, summarize_actors, summarize_tasks

from conftest import wait_for

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
def measured(x):
    return x * 2


@ionet.remote
def exploding():
    raise ValueError("the batch was empty")


def test_tasks_are_listed_with_rays_fields():
    assert ionet.get([measured.remote(i) for i in range(20)]) == [i * 2 for i in range(20)]
    with pytest.raises(Exception, match="the batch was empty"):
        ionet.get(exploding.remote())
    named = measured.options(name="renamed").remote(1)
    assert ionet.get(named) == 2

    def heard():
        rows = list_tasks(filters=[("name", "=", "measured")])
        return len(rows) == 20 and all(row["state"] == "FINISHED" for row in rows)

    wait_for(heard, timeout=30, what="20 finished tasks listed")
    rows = list_tasks(filters=[("name", "=", "measured")])
    node = ionet.get_runtime_context().get_node_id()
    assert {row["node_id"] for row in rows} == {node}
    assert all(row["type"] == "NORMAL_TASK" and row["end_time_ms"] >= row["start_time_ms"] for row in rows)
    failed = list_tasks(filters=[("state", "=", "FAILED"), ("name", "=", "exploding")])
    assert len(failed) == 1 and "the batch was empty" in failed[0]["error_message"], failed
    assert [row["name"] for row in list_tasks(filters=[("name", "=", "renamed")])] == ["renamed"]
    assert list_tasks(filters=[("name", "!=", "measured")], limit=1)[0]["name"] != "measured"
    summary = summarize_tasks()["cluster"]["summary"]
    assert summary["measured"]["state_counts"]["FINISHED"] == 20
    assert summary["exploding"]["state_counts"] == {"FAILED": 1}
    assert len(list_tasks(filters=[("state", "!=", "finished"), ("name", "=", "measured")])) == 0
    with pytest.raises(ValueError, match="cannot be filtered on 'colour'"):
        list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(Exception, match="is no task state"):
        list_tasks(filters=[("state", "=", "SLEEPING")])


@ionet.remote
class Counter:
    def __init__(self):
        self.count = 0

    def add(self):
        self.count += 1
        return self.count


def test_actors_nodes_and_jobs_are_listed_with_rays_fields():
    counters = [Counter.options(name=f"counter-{i}").remote() for i in range(3)]
    assert ionet.get([counter.add.remote() for counter in counters]) == [1, 1, 1]
    ionet.kill(counters[0])
    wait_for(lambda: len(list_actors(filters=[("state", "=", "DEAD"), ("class_name", "=", "Counter")])) == 1,
             what="the killed actor listed dead")  # fmt: skip
    alive = list_actors(filters=[("state", "=", "alive"), ("class_name", "=", "Counter")])
    assert sorted(row["name"] for row in alive) == ["counter-1", "counter-2"]
    node = ionet.get_runtime_context().get_node_id()
    assert {row["node_id"] for row in alive} == {node}
    assert summarize_actors()["cluster"]["summary"]["Counter"]["state_counts"]["ALIVE"] >= 2
    # Their calls are tasks too, named by class and method, each naming its actor.
    ids = {counter._native.hex() for counter in counters}

    def calls():
        return [row for row in list_tasks(filters=[("name", "=", "Counter.add")]) if row["actor_id"] in ids]

    wait_for(lambda: [row["state"] for row in calls()] == ["FINISHED"] * 3, what="the actors' calls listed finished")
    assert {row["actor_id"] for row in calls()} == ids
    assert all(row["type"] == "ACTOR_TASK" and row["node_id"] == node for row in calls()), calls()
    (only,) = list_nodes()
    assert only["node_id"] == node and only["state"] == "ALIVE" and only["resources_total"]["GPU"] == 2
    job = ionet.get_runtime_context().get_job_id()
    mine = list_jobs(filters=[("job_id", "=", job)])
    assert len(mine) == 1 and mine[0]["status"] == "RUNNING" and mine[0]["type"] == "DRIVER", mine
    with pytest.raises(ValueError, match="cannot be filtered on 'colour'"):
        list_actors(filters=[("colour", "=", "red")])


def test_objects_are_listed_with_their_holder_and_why_they_live():
    import os

    from ionet.util.state import list_objects, summarize_objects

    weights = ionet.put(b"w" * (3 << 20))
    small = ionet.put("a small value")
    rows = list_objects(filters=[("object_id", "=", weights.hex())])
    assert len(rows) == 1, rows
    (row,) = rows
    assert row["type"] == "DRIVER" and row["pid"] == os.getpid(), row
    assert row["reference_type"] == "LOCAL_REFERENCE" and row["task_status"] == "IN_STORE", row
    assert row["object_size"] >= 3 << 20 and row["store_node_ids"] == [ionet.get_runtime_context().get_node_id()], row
    inline = list_objects(filters=[("object_id", "=", small.hex())])
    assert [item["task_status"] for item in inline] == ["INLINE"], inline
    summary = summarize_objects()["cluster"]
    assert summary["summary"]["LOCAL_REFERENCE"]["total_size"] >= 3 << 20, summary
    del weights
    wait_for(lambda: not list_objects(filters=[("object_id", "=", row["object_id"])]), what="the freed object gone")


def test_placement_groups_are_listed_with_their_bundles():
    from ionet.util.placement_group import placement_group, remove_placement_group
    from ionet.util.state import list_placement_groups

    group = placement_group([{"CPU": 1}, {"GPU": 1}], strategy="PACK", name="listed-group")
    assert group.wait(60)
    (row,) = list_placement_groups(filters=[("name", "=", "listed-group")])
    assert row["state"] == "CREATED" and row["strategy"] == "PACK", row
    assert row["creator_job_id"] == ionet.get_runtime_context().get_job_id()
    node = ionet.get_runtime_context().get_node_id()
    assert [(b["node_id"], b["unit_resources"]) for b in row["bundles"]] == [(node, {"CPU": 1.0}), (node, {"GPU": 1.0})]
    remove_placement_group(group)
    wait_for(lambda: list_placement_groups(filters=[("name", "=", "listed-group")])[0]["state"] == "REMOVED",
             what="the removed group listed so")  # fmt: skip
