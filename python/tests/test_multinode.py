"""A cluster of three daemons started with the `ionet` command: placement across nodes,
node affinity, objects moving between nodes, and a second driver."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import ionet
from conftest import process_state, wait_for
from ionet.util import placement_group, placement_group_table, remove_placement_group
from ionet.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)


pytestmark = pytest.mark.usefixtures("process_cluster")


def run_second_driver(script, process_cluster):
    """Runs `script` as another driver of the cluster (its argv[1] is the session
    directory); its standard output, stripped. Fails the test with its errors."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(process_cluster.session_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@ionet.remote(num_cpus=1)
def node_of_task():
    return ionet.get_runtime_context().get_node_id()


@ionet.remote
def make_array(megabytes):
    import numpy as np

    return ionet.get_runtime_context().get_node_id(), np.full(megabytes * 1024 * 1024, 7, dtype=np.uint8)


@ionet.remote
class Registry:
    def __init__(self):
        self.entries = {}

    def put(self, key, value):
        self.entries[key] = value

    def get(self, key):
        return self.entries.get(key)


def alive_node_ids():
    return sorted(node["NodeID"] for node in ionet.nodes() if node["Alive"])


def test_three_nodes_joined():
    assert len(alive_node_ids()) == 3
    assert ionet.cluster_resources()["CPU"] == 6.0


def test_strict_spread_places_each_bundle_on_its_own_node():
    group = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert group.wait(60)
    table = placement_group_table(group)
    assert sorted(table["bundles_to_node_id"].values()) == alive_node_ids()
    refs = [
        node_of_task.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
        for index in range(3)
    ]
    nodes = ionet.get(refs, timeout=60)
    assert sorted(nodes) == alive_node_ids()
    assert nodes == [table["bundles_to_node_id"][index] for index in range(3)]
    remove_placement_group(group)


def test_node_affinity_runs_on_the_named_node():
    for node_id in alive_node_ids():
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        assert ionet.get(node_of_task.options(scheduling_strategy=strategy).remote(), timeout=60) == node_id


def test_arrays_made_on_other_nodes_are_read_here():
    np = pytest.importorskip("numpy")
    refs = [
        make_array.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(16)
        for node_id in alive_node_ids()
    ]
    results = ionet.get(refs, timeout=120)
    assert sorted(node for node, _ in results) == alive_node_ids()
    for _, array in results:
        assert array.nbytes == 16 * 1024 * 1024 and np.all(array == 7)


def test_detached_actor_is_reached_from_another_driver(process_cluster):
    registry = Registry.options(name="registry", namespace="shared", lifetime="detached").remote()
    ionet.get(registry.put.remote("greeting", "hello from the first driver"), timeout=60)
    script = textwrap.dedent(
        """
        import sys
        import ionet

        ionet.init(address="auto", _session_dir=sys.argv[1])
        registry = ionet.get_actor("registry", namespace="shared")
        print(ionet.get(registry.get.remote("greeting"), timeout=60))
        ionet.shutdown()
        """
    )
    assert run_second_driver(script, process_cluster) == "hello from the first driver"
    ionet.kill(registry)


def test_detached_named_placement_group_is_found_from_a_second_driver(process_cluster):
    # A first driver makes a detached group and a plain one, then ends its job.
    script = textwrap.dedent(
        """
        import sys
        import ionet
        from ionet.util import placement_group

        ionet.init(address="auto", _session_dir=sys.argv[1])
        kept = placement_group([{"CPU": 1}], name="kept-group", lifetime="detached")
        gone = placement_group([{"CPU": 1}], name="job-group")
        assert kept.wait(60) and gone.wait(60)
        print(kept.id)
        ionet.shutdown()
        """
    )
    kept_id = run_second_driver(script, process_cluster)
    found = ionet.util.get_placement_group("kept-group")
    assert str(found.id) == kept_id
    assert found.bundle_specs == [{"CPU": 1.0}]
    assert placement_group_table(found)["state"] == "CREATED"
    strategy = PlacementGroupSchedulingStrategy(found, 0)
    assert ionet.get(node_of_task.options(scheduling_strategy=strategy).remote(), timeout=60)
    # The first driver's other group ended with its job.
    def job_group_gone():
        try:
            ionet.util.get_placement_group("job-group")
            return False
        except ValueError:
            return True

    wait_for(job_group_gone, what="the finished job's group to be removed")
    remove_placement_group(found)
    with pytest.raises(ValueError):
        ionet.util.get_placement_group("kept-group")


PRINTING_DRIVER = textwrap.dedent(
    """
    import os
    import sys
    import tempfile
    import time
    import ionet
    from ionet.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ionet.init(address="auto", _session_dir=sys.argv[1])

    @ionet.remote
    def shout(which):
        print("hello from the", which, "node")

    @ionet.remote
    def chant(rendezvous, expected):
        open(os.path.join(rendezvous, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(rendezvous)) < expected:
            assert time.monotonic() < deadline, "the chants did not all run at once"
            time.sleep(0.01)
        print("the same line")
        return os.getpid()

    @ionet.remote
    def count_epochs():
        for epoch in range(1, 4):
            print(f"epoch {epoch} done")

    for node, which in zip(ionet.nodes(), ["first", "second", "third"]):
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ionet.get(shout.options(scheduling_strategy=strategy).remote(which), timeout=60)
    # The job's workers may run as a user of their own: they check in there too.
    rendezvous = tempfile.mkdtemp()
    os.chmod(rendezvous, 0o1777)
    pids = ionet.get([chant.remote(rendezvous, 4) for _ in range(4)], timeout=120)
    assert len(set(pids)) == 4, pids
    ionet.get(count_epochs.remote(), timeout=60)
    ionet.shutdown()
    """
)


def test_what_tasks_print_reaches_the_driver_prefixed_and_folded(process_cluster):
    # Lines that differ only in words with digits (ids, counters) are of one kind, as in
    # Ray: the nodes are told apart by words.
    output = run_second_driver(PRINTING_DRIVER, process_cluster)
    for which in ["first", "second", "third"]:
        lines = [line for line in output.splitlines() if line.endswith(f"hello from the {which} node")]
        assert lines, f"the {which} node's line is missing:\n{output}"
        assert lines[0].startswith("(shout pid=") and ", ip=" in lines[0], lines[0]
    assert ":ionet_task:" not in output
    # Printed by four workers at once: shown once, its repeats counted.
    chants = [line for line in output.splitlines() if "the same line" in line]
    shown = [line for line in chants if "[repeated" not in line]
    repeated = sum(int(line.split("[repeated ")[1].split("x")[0]) for line in chants if "[repeated" in line)
    assert (len(shown), repeated) == (1, 3), output
    # One worker's own lines of one kind all show.
    epochs = [line for line in output.splitlines() if line.startswith("(count_epochs pid=") and line.endswith(" done")]
    assert len(epochs) == 3, output


def _parent(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


@ionet.remote(resources={"doomed": 1})
class OnTheDoomedNode:
    def pid(self):
        return os.getpid()


def test_a_forked_worker_dies_with_its_node_daemon(process_cluster):
    # Last in this module: it kills a node of its own.
    process_cluster.command(
        "start", "--address", process_cluster.head_address, "--num-cpus", "1", "--resources", '{"doomed": 1}'
    )
    actor = OnTheDoomedNode.remote()
    worker = ionet.get(actor.pid.remote(), timeout=60)
    server = _parent(worker)
    daemon = _parent(server)
    with open(f"/proc/{server}/cmdline") as cmdline:
        assert "ionet._worker" in cmdline.read(), "forked by the job's forkserver"
    # Its daemon killed outright: the worker (not the daemon's child) goes too.
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: process_state(worker) in (None, "Z"), timeout=30, what="the forked worker died with its daemon")
