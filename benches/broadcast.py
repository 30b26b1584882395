"""Broadcast: one 1 GiB object read by 8 nodes at once, over loopback.

A cluster of `BROADCAST_NODES` (8) node daemons of 2 CPUs each (and a head running
nothing) on this machine; the driver puts a numpy array of `BROADCAST_BYTES` (1 GiB)
and runs one task on every node at once (hard node affinity) that takes it as its
argument, so every node pulls the whole object into its own store. Each node's worker
is started first by a task on a small object, so what is timed is the transfer and the
reads. Three rounds (`BROADCAST_ROUNDS`), a fresh object each; prints each time and the
median.

    python benches/broadcast.py ionet       # python/.venv (bash python/test.sh builds it)
    ~/.cache/ionet-ray-baseline/bin/python benches/broadcast.py ray

The clusters are `benches/chaos.py`'s (ionet through its CLI with TLS, Ray through
`ray.cluster_utils.Cluster`). Run both on the same machine in the same sitting.
"""

import os
import statistics
import sys
import time

import numpy as np

from failover import wait_for
from chaos import IonetNodes, RayNodes

NODES = int(os.environ.get("BROADCAST_NODES", "8"))
SIZE = int(os.environ.get("BROADCAST_BYTES", str(1 << 30)))
ROUNDS = int(os.environ.get("BROADCAST_ROUNDS", "3"))


def main():
    runtime = sys.argv[1] if len(sys.argv) > 1 else "ionet"
    # Ray's head (where the driver puts) needs room for the object; ionet's head store
    # grows to a share of the machine's memory by default.
    cluster = IonetNodes() if runtime == "ionet" else RayNodes(head_object_store_bytes=2 * SIZE + (256 << 20))
    # Room for one object and a spare: a node never spills what it reads.
    nodes = [cluster.add(object_store_bytes=2 * SIZE + (256 << 20)) for _ in range(NODES)]
    rt = cluster.connect()
    try:
        times = measure(rt, runtime)
    finally:
        cluster.stop(nodes)
    print(
        f"{runtime} broadcast of {SIZE / (1 << 30):.2f} GiB to {NODES} nodes: "
        + ", ".join(f"{took:.2f}" for took in times)
        + f" s (median {statistics.median(times):.2f} s)"
    )


def measure(rt, runtime):
    wait_for(f"{NODES} nodes", lambda: rt.cluster_resources().get("CPU", 0) >= 2 * NODES)
    if runtime == "ionet":
        from ionet.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    workers = [node["NodeID"] for node in rt.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    assert len(workers) == NODES, workers

    @rt.remote(num_cpus=1)
    def length(array):
        return int(array.nbytes)

    on = [length.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)) for node in workers]
    small = rt.put(np.zeros(16, dtype=np.uint8))
    assert rt.get([task.remote(small) for task in on], timeout=120) == [16] * NODES
    times = []
    for round_ in range(ROUNDS):
        value = rt.put(np.full(SIZE, round_, dtype=np.uint8))
        started = time.monotonic()
        assert rt.get([task.remote(value) for task in on], timeout=600) == [SIZE] * NODES
        times.append(time.monotonic() - started)
        del value
    return times


if __name__ == "__main__":
    main()
