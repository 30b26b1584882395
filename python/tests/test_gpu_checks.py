"""The head checks a node's GPUs again at random idle times, never while one is leased:
an actor holding both GPUs of a node holds its checks off, which resume once it is gone."""

from __future__ import annotations

import json
import time

import pytest

import ionet
from conftest import joined_cluster, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def checked_cluster(tmp_path_factory, monkeypatch):
    # Checks due every ~0.4 s (each takes a fraction of that), as often as heartbeats come.
    monkeypatch.setenv("IONET_GPU_CHECK_INTERVAL_MS", "400")
    monkeypatch.setenv("IONET_GPU_CHECK_IDLE_SHARE_BPS", "10000")
    yield from joined_cluster(tmp_path_factory, "gpu-checks", head_cpus=1, cpu_nodes=0, gpu_price=1.0)


def gpu_node(cluster) -> dict:
    nodes = json.loads(cluster.command("status", "--json"))
    (node,) = [node for node in nodes if node["gpus"]]
    return node


def gpu_check(cluster) -> dict:
    return gpu_node(cluster)["gpu_check"]


def test_checks_recur_at_idle_times_and_wait_while_a_gpu_is_leased(checked_cluster):
    assert gpu_check(checked_cluster)["state"] == "passed"
    wait_for(lambda: gpu_check(checked_cluster)["passes"] >= 3, timeout=60, what="checks to recur while idle")

    @ionet.remote(num_gpus=2)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    assert ionet.get(holder.ping.remote(), timeout=60) == 1
    # Once a heartbeat has told the head both GPUs are leased, no check starts: watch for
    # several heartbeats (1 s apart).
    wait_for(lambda: gpu_node(checked_cluster)["resources_available"].get("GPU", 0) == 0, what="the lease to show")
    held = gpu_check(checked_cluster)["passes"]
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert gpu_check(checked_cluster)["passes"] == held, "a check ran while both GPUs were leased"
        time.sleep(0.2)
    ionet.kill(holder)
    wait_for(lambda: gpu_check(checked_cluster)["passes"] > held, timeout=60, what="checks to resume")
    assert gpu_check(checked_cluster)["state"] == "passed"


@pytest.fixture
def deferring_cluster(tmp_path_factory, monkeypatch):
    # Checks due every ~0.4 s; a lease may put a due one off for 3 s at most.
    monkeypatch.setenv("IONET_GPU_CHECK_INTERVAL_MS", "400")
    monkeypatch.setenv("IONET_GPU_CHECK_IDLE_SHARE_BPS", "10000")
    monkeypatch.setenv("IONET_GPU_CHECK_MAX_DEFER_MS", "3000")
    yield from joined_cluster(tmp_path_factory, "gpu-checks-defer", head_cpus=1, cpu_nodes=0, gpu_price=1.0)


def test_a_lease_puts_a_check_off_only_so_long_then_the_node_takes_no_new_work(deferring_cluster):
    # A provider leasing a sliver of its own GPU to itself would never be checked again:
    # past the longest deferral its node is overdue and takes no new work until checked.
    wait_for(lambda: gpu_check(deferring_cluster)["state"] == "passed", timeout=60, what="the first check")

    @ionet.remote(num_gpus=1)
    class Holder:
        def ping(self) -> int:
            return 1

    @ionet.remote(num_gpus=1)
    def on_a_gpu() -> int:
        return 2

    holder = Holder.remote()
    assert ionet.get(holder.ping.remote(), timeout=60) == 1
    wait_for(lambda: gpu_check(deferring_cluster)["state"] == "overdue", timeout=60, what="the node to be overdue")
    table = deferring_cluster.command("status")
    assert "OVERDUE" in table, table
    # The other GPU is free, yet no new lease lands on an overdue node.
    waiting = on_a_gpu.remote()
    ready, _ = ionet.wait([waiting], timeout=3)
    assert not ready, "an overdue node took new work"
    # Its lease ended, the check runs at once, and the waiting task with it.
    ionet.kill(holder)
    assert ionet.get(waiting, timeout=60) == 2
    wait_for(lambda: gpu_check(deferring_cluster)["passes"] >= 2, timeout=60, what="the overdue check to pass")


def test_a_job_may_run_on_reliable_nodes_only():
    with pytest.raises(ValueError, match="min_reliability must be a share between 0 and 1"):
        ionet.init(num_cpus=1, min_reliability=1.5)
    assert not ionet.is_initialized()
    # A fresh node has failed nobody: it scores 1.0 and takes the job's work.
    ionet.init(num_cpus=1, min_reliability=0.99)
    try:

        @ionet.remote
        def one() -> int:
            return 1

        assert ionet.get(one.remote(), timeout=60) == 1
        from ionet.util.state import list_jobs

        (job,) = [job for job in list_jobs() if job["status"] == "RUNNING"]
        assert job["min_reliability"] == 0.99, job
    finally:
        ionet.shutdown()
