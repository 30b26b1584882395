"""The head's dashboard in a real browser (Debian's headless Chromium): each page renders
the cluster's real nodes, jobs, costs and a failed task's error; the overview and the job
page are saved as screenshots (test artifacts, `target/test-artifacts/`), the job page
at half a screen's width."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import ionet
from ionet import _ionet

from conftest import GPU_TYPE, joined_cluster, wait_for

pytestmark = pytest.mark.timeout(300)

ARTIFACTS = Path(os.environ.get("IONET_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "target" / "test-artifacts"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from joined_cluster(tmp_path_factory, "dashboard", head_cpus=0, cpu_nodes=1, gpu_price="2.50")


@ionet.remote(num_gpus=1)
def train(step):
    time.sleep(0.05)
    return step


@ionet.remote
class ParameterServer:
    def ping(self):
        return "pong"


@ionet.remote
def load_batch():
    raise ValueError("the batch was empty")


def browse(cluster, fragment, width=1280, screenshot=None):
    """The page at `fragment` as Chromium renders it once its script ran: its DOM."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is installed by python/test.sh"
    address, operator, _ = _ionet.job_server_defaults(str(cluster.session_dir))
    assert address.startswith("http://127.0.0.1:"), address
    url = f"{address}/#{fragment}&key={operator}"
    # As root in a container Chromium runs only without its own sandbox.
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},1000",
            "--virtual-time-budget=5000"]  # fmt: skip
    if screenshot:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        subprocess.run(argv + [f"--screenshot={ARTIFACTS / screenshot}", url], capture_output=True, timeout=120, check=True)
        assert (ARTIFACTS / screenshot).stat().st_size > 10_000
    done = subprocess.run(argv + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return rendered(done.stdout)


def rendered(dom):
    """What the page shows: its header and main part as the script left them (not the
    script's own text)."""
    return dom.split("<script")[0]


def test_each_page_shows_the_clusters_nodes_jobs_costs_and_failures(cluster):
    assert ionet.get([train.remote(step) for step in range(20)], timeout=120) == list(range(20))
    with pytest.raises(Exception, match="the batch was empty"):
        ionet.get(load_batch.remote(), timeout=120)
    job = ionet.get_runtime_context().get_job_id()
    nodes = [node["NodeID"] for node in ionet.nodes()]
    # The tasks' events reach the head within a second or two.
    wait_for(lambda: "the batch was empty" in browse(cluster, "/tasks?state=FAILED"), timeout=60, what="the failure listed")

    overview = browse(cluster, "/", screenshot="dashboard-overview.png")
    assert "updated" in overview and "Sign in" not in overview, overview[-2000:]
    for node in nodes:
        assert node[:8] in overview, (node, overview[-3000:])
    assert GPU_TYPE in overview and "$2.50" in overview, "the GPU node's model and price"
    assert "GPU check" in overview and "passed (simulated)" in overview, "the head's check of the GPU node"
    assert job in overview and "the batch was empty" in overview, "the job and the alert of its failed task"

    page = browse(cluster, f"/job/{job}", width=640, screenshot="dashboard-job.png")
    assert f"Job <span class=\"mono\">{job}</span>" in page, page[-3000:]
    assert "the batch was empty" in page and "load_batch" in page
    assert "FINISHED</span> 20" in page, "tasks by state"
    assert "cost so far" in page and "$0.0000<" not in page.split("cost so far")[0][-80:], "a cost was billed"

    tasks = browse(cluster, "/tasks?name=train")
    assert "Tasks (20 matching)" in tasks, tasks[-2000:]
    market = browse(cluster, "/market")
    assert GPU_TYPE in market and "Protocol fees so far" in market and "default" in market
    jobs = browse(cluster, "/jobs")
    assert job in jobs
    server = ParameterServer.options(name="ps").remote()
    assert ionet.get(server.ping.remote(), timeout=60) == "pong"
    actors = browse(cluster, "/actors")
    assert "ParameterServer" in actors and ">ps<" in actors and "ALIVE" in actors, actors[-3000:]


def test_what_tenants_name_is_shown_as_text_never_run(cluster):
    # A task's name and error are a tenant's words: markup in them stays text.
    attack = '<img src=x onerror="document.title=\'owned\'">'
    evil = load_batch.options(name=attack)
    with pytest.raises(Exception):
        ionet.get(evil.remote(), timeout=120)
    wait_for(lambda: "&lt;img src=x" in browse(cluster, "/tasks?state=FAILED"), timeout=60, what="the task listed")
    shown = browse(cluster, "/tasks?state=FAILED")
    assert "<img" not in shown.split("<main")[1], shown[-3000:]
    assert "<title>ionet dashboard</title>" in shown


def test_without_a_credential_the_page_asks_for_one_and_shows_nothing(cluster):
    chromium = shutil.which("chromium")
    address, _, _ = _ionet.job_server_defaults(str(cluster.session_dir))
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom"]
    shown = rendered(subprocess.run(argv + [f"{address}/#/"], capture_output=True, text=True, timeout=120, check=True).stdout)
    assert "Sign in" in shown
    forged = subprocess.run(argv + [f"{address}/#/&key=ionet1.forged"], capture_output=True, text=True, timeout=120, check=True)
    forged = rendered(forged.stdout)
    assert "Sign in" in forged and "401" in forged, forged[-2000:]


def test_the_placement_groups_and_objects_pages_show_what_the_job_holds(cluster):
    import os

    from ionet.util.placement_group import placement_group

    group = placement_group([{"CPU": 0.5}, {"GPU": 1}], strategy="SPREAD", name="trainers")
    assert group.wait(60)
    weights = ionet.put(b"w" * (6 << 20))
    groups = browse(cluster, "/placement_groups")
    assert ">trainers<" in groups and "CREATED" in groups and "SPREAD" in groups, groups[-3000:]
    assert "GPU 1 on" in groups, "each bundle with its resources and node"
    objects = browse(cluster, "/objects")
    assert weights.hex()[:8] in objects and "6.0 MiB" in objects, objects[-3000:]
    assert f"<td>{os.getpid()}</td>" in objects and "LOCAL_REFERENCE" in objects and "DRIVER" in objects
