"""`ionet timeline`: the tasks of a job run on two nodes, as a Chrome trace (Perfetto
opens it): one complete slice per task, a process per node."""

from __future__ import annotations

import json
import time

import pytest

import ionet

from conftest import joined_cluster, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from joined_cluster(tmp_path_factory, "timeline", head_cpus=0, cpu_nodes=2)


@ionet.remote(scheduling_strategy="SPREAD")
def step(i):
    time.sleep(0.01)
    return ionet.get_runtime_context().get_node_id()


def test_a_timeline_of_100_tasks_on_2_nodes_is_a_chrome_trace_of_100_slices(cluster, tmp_path):
    ran_on = ionet.get([step.remote(i) for i in range(100)], timeout=120)
    assert len(set(ran_on)) == 2, "the tasks ran on both nodes"
    job = ionet.get_runtime_context().get_job_id()
    from ionet.util.state import list_tasks

    wait_for(lambda: len(list_tasks(filters=[("state", "=", "FINISHED"), ("name", "=", "step")])) == 100,
             timeout=30, what="100 finished tasks at the head")  # fmt: skip
    trace_file = tmp_path / "trace.json"
    cluster.command("timeline", "--job", job, "-o", str(trace_file))
    trace = json.loads(trace_file.read_text())
    slices = [event for event in trace["traceEvents"] if event["ph"] == "X"]
    assert len(slices) == 100
    assert all(event["name"] == "step" and event["dur"] >= 10_000 and event["ts"] > 0 for event in slices)
    assert len({event["pid"] for event in slices}) == 2, "a process per node"
    processes = [event for event in trace["traceEvents"] if event["ph"] == "M" and event["name"] == "process_name"]
    assert sorted(event["args"]["name"] for event in processes) == sorted(f"node {node[:8]}" for node in set(ran_on))
