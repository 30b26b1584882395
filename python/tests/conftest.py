"""Clusters for the tests, and helpers.

- `local_cluster`: an embedded cluster in the test process (4 CPUs, 2 declared
  A100-80GB GPUs, 4 units of a custom resource), for one test module.
- `process_cluster`: a head and two nodes started as daemons with the `ionet` command
  (three nodes of 2 CPUs, one session directory), joined with `init(address="auto")`,
  for one test module; `joined_cluster` makes others (a provider's priced GPU node, a
  head that runs nothing or speaks TLS).

A process holds one cluster at a time, so each module uses one of them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import pytest

import ionet

GPU_TYPE = "A100-80GB"
CUSTOM_RESOURCE = "custom"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.05)


def process_state(pid: int):
    """A process's state letter ("Z" a zombie), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def local_cluster():
    ionet.init(
        num_cpus=4,
        num_gpus=2,
        _gpu_type=GPU_TYPE,
        resources={CUSTOM_RESOURCE: 4},
        namespace="tests",
    )
    yield
    ionet.shutdown()


class ProcessCluster:
    """Daemons started with `python -m ionet start`, sharing `session_dir`."""

    def __init__(self, session_dir: Path):
        self.session_dir = session_dir

    def command(self, *args: str) -> str:
        """Runs `python -m ionet ARGS --temp-dir SESSION`; its output. Fails with the
        daemons' logs if the command fails."""
        argv = [sys.executable, "-m", "ionet", *args, "--temp-dir", str(self.session_dir)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited with {done.returncode}\n{done.stdout}\n{done.stderr}\n{self.logs()}"
            )
        return done.stdout

    def start_head(self, num_cpus: int) -> None:
        self.command("start", "--head", "--port", "0", "--num-cpus", str(num_cpus))

    def add_node(self, num_cpus: int) -> None:
        self.command("start", "--address", self.head_address, "--num-cpus", str(num_cpus))

    @property
    def head_address(self) -> str:
        return (self.session_dir / "head_address").read_text().strip()

    def stop(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "ionet", "stop", "--temp-dir", str(self.session_dir)],
            capture_output=True,
            timeout=120,
        )

    def logs(self) -> str:
        texts: List[str] = []
        for log in sorted((self.session_dir / "logs").glob("*")):
            lines = log.read_text(errors="replace").splitlines()[-40:]
            texts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(texts)


def joined_cluster(tmp_path_factory, namespace, head_cpus=2, cpu_nodes=2, gpu_price=None, head_args=()):
    """Yields a cluster of daemons this process has joined: a head with `head_cpus` CPUs
    (`head_args` added to its start), `cpu_nodes` nodes of 2 CPUs, and with `gpu_price`
    (USD per GPU-hour) a provider's node of 2 CPUs and 2 simulated GPUs at that price,
    with credit for the operator's jobs. Stopped after."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("session"))
    try:
        cluster.command("start", "--head", "--port", "0", "--num-cpus", str(head_cpus), *head_args)
        nodes = 1 + cpu_nodes
        if gpu_price is not None:
            cluster.command(
                "start", "--address", cluster.head_address, "--num-cpus", "2", "--num-gpus", "2",
                "--gpu-type", GPU_TYPE, "--price-per-gpu-hour", str(gpu_price),
            )  # fmt: skip
            cluster.command("credits", "add", "--account", "default", "--amount", "100")
            nodes += 1
        for _ in range(cpu_nodes):
            cluster.add_node(num_cpus=2)
        ionet.init(address="auto", _session_dir=str(cluster.session_dir), namespace=namespace)
        wait_for(lambda: sum(node["Alive"] for node in ionet.nodes()) == nodes, what=f"{nodes} alive nodes")
        yield cluster
    finally:
        ionet.shutdown()
        cluster.stop()


@pytest.fixture(scope="module")
def process_cluster(tmp_path_factory):
    yield from joined_cluster(tmp_path_factory, "tests")
