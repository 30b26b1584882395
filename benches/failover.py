"""Failover: how long after a node is SIGKILLed its tasks run elsewhere.

Two worker nodes of 2 CPUs each run one task of 2 CPUs each (8 s, `max_retries=-1`); a
third node joins idle (and every node learns of it); one of the first two is then
SIGKILLed while its task runs, and the time from the kill to that task starting again on
the idle node is measured (each start leaves a marker file stamped with the time). Three
rounds (`FAILOVER_ROUNDS`), the killed node replaced each time; prints each delay and
the median.

    python benches/failover.py ionet       # python/.venv (bash python/test.sh builds it)
    ~/.cache/ionet-ray-baseline/bin/python benches/failover.py ray

The clusters are `benches/chaos.py`'s: ionet through its CLI (node daemons SIGKILLed,
their workers dying with them), Ray through `ray.cluster_utils.Cluster`
(`remove_node(allow_graceful=False)`). Run both on the same machine in the same sitting.
"""

import os
import statistics
import sys
import tempfile
import time

from chaos import IonetNodes, RayNodes

ROUNDS, TASK_SECONDS = int(os.environ.get("FAILOVER_ROUNDS", "3")), 8.0


def starts(marks, index):
    """The times task `index` started, in order."""
    return sorted(float(name.split("-")[1]) for name in os.listdir(marks) if name.startswith(f"{index}-"))


def wait_for(what, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def main():
    runtime = sys.argv[1] if len(sys.argv) > 1 else "ionet"
    cluster = {"ionet": IonetNodes, "ray": RayNodes}[runtime]()
    nodes = [cluster.add(), cluster.add()]
    rt = cluster.connect()
    marks = tempfile.mkdtemp(prefix="failover-")
    # Workers may run as users of their own: anyone may leave a marker.
    os.chmod(marks, 0o1777)

    @rt.remote(max_retries=-1, num_cpus=2)
    def work(index, marks):
        open(os.path.join(marks, f"{index}-{time.time():.6f}-{os.getpid()}"), "w").close()
        time.sleep(TASK_SECONDS)
        return index

    cpus = lambda: rt.cluster_resources().get("CPU", 0)  # noqa: E731
    try:
        delays = measure(rt, cluster, nodes, work, marks, cpus)
    finally:
        cluster.stop(nodes)
    print(
        f"{runtime} failover: SIGKILL to running elsewhere "
        + ", ".join(f"{delay:.3f}" for delay in delays)
        + f" s (median {statistics.median(delays):.3f} s)"
    )


def measure(rt, cluster, nodes, work, marks, cpus):
    """The rounds: each delay (`nodes` kept to the ones running, for the caller to stop)."""
    wait_for("two nodes", lambda: cpus() >= 4)
    delays = []
    for round_ in range(ROUNDS):
        indices = [2 * round_, 2 * round_ + 1]
        refs = [work.remote(index, marks) for index in indices]
        wait_for("both tasks to start", lambda: all(starts(marks, index) for index in indices))
        nodes.append(cluster.add())
        wait_for("the idle node to join", lambda: cpus() >= 6)
        # Every node learns of the newcomer with its next heartbeat: a node that died
        # the moment another joined is not what is measured.
        time.sleep(2.0)
        killed_at = time.time()
        cluster.kill(nodes.pop(0))
        wait_for("the killed node's task to start again", lambda: any(len(starts(marks, i)) > 1 for i in indices))
        again = max(starts(marks, i)[1] for i in indices if len(starts(marks, i)) > 1)
        delays.append(again - killed_at)
        assert rt.get(refs) == indices, "wrong results"
        wait_for("the killed node to be gone", lambda: cpus() <= 4)
    return delays


if __name__ == "__main__":
    main()
