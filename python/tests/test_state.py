"""The state API (`ionet.util.state`, as Ray's): a job's tasks as the head heard of
them, with their names, states, nodes and errors."""

import pytest

import ionet
from ionet.util.state import list_tasks, summarize_tasks

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
