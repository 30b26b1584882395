"""Chaos: 300 nested retriable tasks while worker nodes are SIGKILLed and replaced.

30 parent tasks each run 10 leaf tasks of 50 ms and sum their squares (`max_retries=-1`
everywhere); two worker nodes of 2 CPUs serve them, and every 3-5 s (seeded) one of
them is SIGKILLed and a new one started in its place. Prints the time to all 300 leaves
exact, and how many nodes were killed meanwhile.

    python benches/chaos.py ionet       # python/.venv (bash python/test.sh builds it)
    ~/.cache/ionet-ray-baseline/bin/python benches/chaos.py ray

The same workload runs on both: ionet through its CLI (`ionet start --block` node
daemons, killed with SIGKILL, their workers dying with them), Ray through
`ray.cluster_utils.Cluster` (`remove_node(allow_graceful=False)` SIGKILLs a node's
processes). Run both on the same machine in the same sitting and compare the times.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

PARENTS, LEAVES, LEAF_SECONDS = 30, 10, 0.05
EXPECTED = sum(i * i for i in range(PARENTS * LEAVES))


def workload(rt):
    @rt.remote(max_retries=-1)
    def leaf(i):
        time.sleep(LEAF_SECONDS)
        return i * i

    @rt.remote(max_retries=-1)
    def parent(j):
        return sum(rt.get([leaf.remote(j * LEAVES + k) for k in range(LEAVES)]))

    return lambda: sum(rt.get([parent.remote(j) for j in range(PARENTS)]))


class IonetNodes:
    """An ionet cluster from the CLI: a head running nothing, node daemons in the
    foreground (so that SIGKILL reaches them)."""

    def __init__(self):
        self.session = tempfile.mkdtemp(prefix="ionet-chaos.")
        os.environ["IONET_SESSION_DIR"] = self.session
        self.cli = [sys.executable, "-m", "ionet"]
        started = subprocess.run(
            self.cli + ["start", "--head", "--tls", "--port", "0", "--num-cpus", "0"],
            check=True, capture_output=True, text=True,
        ).stdout
        self.address = open(os.path.join(self.session, "head_address")).read().strip()
        self.ca_hash = started.split("--ca-hash ")[1].split()[0]
        self.join = subprocess.run(
            self.cli + ["token", "create", "--role", "node", "--ttl", "1h"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        self.count = 0

    def add(self, object_store_bytes=None):
        self.count += 1
        memory = ["--object-store-memory", str(object_store_bytes)] if object_store_bytes else []
        key = os.path.join(self.session, f"node-{self.count}.key")
        # The join token travels in the environment, never on a command line (which any
        # process of the machine may read).
        return subprocess.Popen(
            self.cli + ["start", "--block", "--address", self.address, "--ca-hash", self.ca_hash,
                        "--node-key", key, "--num-cpus", "2"] + memory,
            env={**os.environ, "IONET_JOIN_TOKEN": self.join},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def kill(self, node):
        node.send_signal(signal.SIGKILL)
        node.wait()

    def connect(self):
        import ionet

        ionet.init(address="auto")
        return ionet

    def stop(self, nodes):
        # Stopped as an operator stops them (SIGTERM): a daemon killed outright leaves its
        # store in /dev/shm until the next daemon on the machine sweeps it, and a
        # broadcast's is gigabytes the next run (Ray's, in the same sitting) would lack.
        # Longer than a node's drain deadline (30 s) and its shutdown after.
        for node in nodes:
            if node.poll() is None:
                node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill(node)
        subprocess.run(self.cli + ["stop"], capture_output=True)


class RayNodes:
    def __init__(self, head_object_store_bytes=None):
        from ray.cluster_utils import Cluster

        memory = {"object_store_memory": head_object_store_bytes} if head_object_store_bytes else {}
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **memory})

    def add(self, object_store_bytes=None):
        memory = {"object_store_memory": object_store_bytes} if object_store_bytes else {}
        return self.cluster.add_node(num_cpus=2, **memory)

    def kill(self, node):
        self.cluster.remove_node(node, allow_graceful=False)

    def connect(self):
        import ray

        ray.init(address=self.cluster.address)
        return ray

    def stop(self, nodes):
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def main():
    runtime = sys.argv[1] if len(sys.argv) > 1 else "ionet"
    cluster = {"ionet": IonetNodes, "ray": RayNodes}[runtime]()
    nodes = [cluster.add(), cluster.add()]
    rt = cluster.connect()
    run = workload(rt)
    result = {}

    def drive():
        try:
            result["total"] = run()
        except BaseException as error:  # reported below, with the run's time
            result["error"] = error
        result["elapsed"] = time.monotonic() - start

    # The workload runs in a thread; the kills come from the main thread (Ray's node
    # start-up installs signal handlers, which only the main thread may).
    driver = threading.Thread(target=drive, daemon=True)
    chance = random.Random(7)
    kills = 0
    start = time.monotonic()
    driver.start()
    while True:
        driver.join(chance.uniform(3.0, 5.0))
        if not driver.is_alive():
            break
        victim = chance.randrange(len(nodes))
        cluster.kill(nodes[victim])
        nodes[victim] = cluster.add()
        kills += 1
    if "error" in result:
        cluster.stop(nodes)
        raise SystemExit(f"{runtime} chaos failed after {result['elapsed']:.2f} s, {kills} nodes killed: {result['error']!r}")
    total, elapsed = result["total"], result["elapsed"]
    assert total == EXPECTED, f"{runtime}: got {total}, expected {EXPECTED}"
    print(f"{runtime} chaos: {PARENTS * LEAVES} nested tasks exact in {elapsed:.2f} s, {kills} nodes killed")
    cluster.stop(nodes)


if __name__ == "__main__":
    main()
