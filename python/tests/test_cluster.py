"""The cluster's description, runtime context and GPUs, on an embedded cluster with 4
CPUs and 2 declared GPUs."""

import os

import pytest

import ionet
from conftest import CUSTOM_RESOURCE, GPU_TYPE

pytestmark = pytest.mark.usefixtures("local_cluster")


@ionet.remote
def context_in_task():
    context = ionet.get_runtime_context()
    return context.get_job_id(), context.get_node_id(), context.get_task_id(), context.get_actor_id()


@ionet.remote(num_gpus=1)
def gpu_task():
    return (
        ionet.get_gpu_ids(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        ionet.get_runtime_context().get_accelerator_ids(),
    )


@ionet.remote
def cpu_task():
    return ionet.get_gpu_ids()


@ionet.remote(num_gpus=1)
class GpuActor:
    def gpus(self):
        return ionet.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_nodes_describe_the_node():
    (node,) = ionet.nodes()
    assert node["Alive"] is True
    assert isinstance(node["NodeID"], str) and len(node["NodeID"]) > 0
    assert isinstance(node["NodeManagerAddress"], str)
    resources = node["Resources"]
    assert resources["CPU"] == 4.0 and resources["GPU"] == 2.0 and resources[CUSTOM_RESOURCE] == 4.0
    assert resources[f"accelerator_type:{GPU_TYPE}"] > 0
    assert isinstance(node["Labels"], dict)


def test_cluster_and_available_resources():
    total = ionet.cluster_resources()
    assert {"CPU", "GPU", "memory"} <= set(total)
    assert total["CPU"] == 4.0 and total["GPU"] == 2.0 and total["memory"] > 0
    available = ionet.available_resources()
    assert all(available.get(name, 0.0) <= amount for name, amount in total.items())


def test_runtime_context_in_driver_and_task():
    context = ionet.get_runtime_context()
    job_id, node_id = context.get_job_id(), context.get_node_id()
    assert job_id and node_id == ionet.nodes()[0]["NodeID"]
    assert context.job_id == job_id and context.node_id == node_id
    assert context.get_task_id() is None and context.get_actor_id() is None
    assert context.namespace == "tests"
    task_job, task_node, task_id, actor_id = ionet.get(context_in_task.remote(), timeout=60)
    assert (task_job, task_node) == (job_id, node_id)
    assert task_id and actor_id is None


def test_task_gets_its_gpu():
    ids, visible, accelerators = ionet.get(gpu_task.remote(), timeout=60)
    assert len(ids) == 1 and ids[0] in (0, 1)
    assert visible == str(ids[0])
    assert accelerators == {"GPU": [str(ids[0])]}
    assert ionet.get(gpu_task.options(accelerator_type=GPU_TYPE).remote(), timeout=60)[0][0] in (0, 1)


def test_task_without_gpus_gets_none():
    assert ionet.get(cpu_task.remote(), timeout=60) == []
    assert ionet.get_gpu_ids() == []


def test_two_gpu_actors_get_distinct_gpus():
    first, second = GpuActor.remote(), GpuActor.remote()
    (first_ids, first_visible), (second_ids, second_visible) = ionet.get(
        [first.gpus.remote(), second.gpus.remote()], timeout=60
    )
    assert sorted(first_ids + second_ids) == [0, 1]
    assert {first_visible, second_visible} == {"0", "1"}
    ionet.kill(first)
    ionet.kill(second)
