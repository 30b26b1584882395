"""Prometheus metrics: the head's `/metrics`, read by Prometheus's own parser, shows
tasks, nodes and money, its counters moving as tasks run; each node daemon's shows its
workers, leases and object store; a real Prometheus server, configured by
examples/monitoring/prometheus.yml (the head with the metrics token, the nodes it
discovers through the head with the node scraper's token), answers a PromQL query for a
job's cost and every query of examples/monitoring/grafana-dashboard.json."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import ionet
from ionet import _ionet

from conftest import GPU_TYPE, joined_cluster, wait_for

pytestmark = pytest.mark.timeout(300)

# $36 a GPU-hour: a cent a GPU-second, so a second of work shows.
PRICE_PER_GPU_HOUR = "36"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The head (serving TLS, as a cluster across machines does) runs nothing; a
    # provider's node with two priced (simulated) GPUs.
    yield from joined_cluster(tmp_path_factory, "metrics", head_cpus=0, cpu_nodes=0, gpu_price=PRICE_PER_GPU_HOUR,
                              head_args=("--tls",))  # fmt: skip


@pytest.fixture(scope="module")
def scraper_token(cluster):
    """The credential a scraper holds: reads /metrics, nothing else."""
    return json.loads(cluster.command("token", "create", "--role", "metrics", "--json"))["token"]


def job_server(cluster):
    address, _operator, ca = _ionet.job_server_defaults(str(cluster.session_dir))
    return address, ca


def scrape(cluster, credential):
    """{(sample name, sorted labels): value} of the head's /metrics, read by Prometheus's
    OpenMetrics parser (which refuses anything malformed)."""
    address, ca = job_server(cluster)
    context = ssl.create_default_context(cadata=ca) if address.startswith("https://") else None
    request = urllib.request.Request(address + "/metrics", headers={"Authorization": f"Bearer {credential}"})
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@ionet.remote(num_gpus=1)
def train(step):
    time.sleep(0.2)
    return step


@ionet.remote(num_gpus=1)
def diverge():
    raise ValueError("the loss is NaN")


@ionet.remote(num_gpus=64)
def too_big():
    return 0


def test_requests_nothing_fits_read_only_what_changed_of_the_node_table(cluster, scraper_token):
    # A node asked for what no node fits looks at the cluster once more before refusing:
    # it reads what changed since its view, never the whole table (which a tenant could
    # otherwise make every node read, as often as it liked).
    before = scrape(cluster, scraper_token)
    refs = [too_big.remote() for _ in range(20)]
    for ref in refs:
        with pytest.raises(Exception, match="GPU: 64"):
            ionet.get(ref, timeout=60)
    after = scrape(cluster, scraper_token)
    whole = value(after, "ionet_node_table_reads_total", kind="whole") - value(
        before, "ionet_node_table_reads_total", kind="whole"
    )
    delta = value(after, "ionet_node_table_reads_total", kind="delta") - value(
        before, "ionet_node_table_reads_total", kind="delta"
    )
    # The scrapes themselves read nothing; heartbeats read deltas (so `delta` says little).
    assert whole == 0, whole
    assert delta > 0


def test_metrics_show_work_and_money_and_move_as_tasks_run(cluster, scraper_token):
    before = scrape(cluster, scraper_token)
    finished_before = value(before, "ionet_tasks_finished_total", account="default") or 0
    failed_before = value(before, "ionet_tasks_failed_total", account="default") or 0
    node = next(node for node in ionet.nodes() if node["Resources"].get("GPU"))
    node_id = node["NodeID"]
    assert value(before, "ionet_node_gpu_price_usd_per_hour", node_id=node_id, gpu_type=GPU_TYPE) == 36.0
    assert value(before, "ionet_node_resource_total", node_id=node_id, resource="GPU") == 2.0
    assert value(before, "ionet_nodes", state="alive") == 2.0

    assert ionet.get([train.remote(step) for step in range(20)], timeout=120) == list(range(20))
    with pytest.raises(Exception, match="the loss is NaN"):
        ionet.get(diverge.remote(), timeout=120)
    job = ionet.get_runtime_context().get_job_id()

    def moved():
        now = scrape(cluster, scraper_token)
        finished = value(now, "ionet_tasks_finished_total", account="default") or 0
        failed = value(now, "ionet_tasks_failed_total", account="default") or 0
        return finished >= finished_before + 20 and failed >= failed_before + 1

    wait_for(moved, timeout=30, what="the task counters moved")
    after = scrape(cluster, scraper_token)
    # 21 GPU tasks of at least 0.2 s at a cent a GPU-second: at least 4 cents.
    cost = value(after, "ionet_job_cost_usd", job_id=job, account="default")
    assert cost is not None and cost >= 0.04, sorted(key for key in after if key[0] == "ionet_job_cost_usd")
    fee = value(after, "ionet_job_fee_usd", job_id=job, account="default")
    assert fee == pytest.approx(cost * 0.025, rel=0.05, abs=1e-6)
    earned = [v for (name, labels), v in after.items() if name == "ionet_node_earned_usd" and ("node_id", node_id) in labels]
    # The provider earns the whole cost (its node ran every lease); the fee is on top.
    assert earned and earned[0] == pytest.approx(cost, rel=0.05), (earned, cost)
    assert value(after, "ionet_account_credit_usd", account="default") is not None
    assert value(after, "ionet_heartbeats_total") > value(before, "ionet_heartbeats_total")


def test_an_account_reads_its_own_metrics_only(cluster, scraper_token):
    key = json.loads(cluster.command("account", "create", "acme", "--json"))["api_key"]
    mine = scrape(cluster, key)
    assert value(mine, "ionet_nodes", state="alive") == 2.0, "the public face"
    assert not any(dict(labels).get("account") == "default" for _, labels in mine), "nothing of another account"
    # A token that reads metrics starts nothing: the job server refuses it.
    address, ca = job_server(cluster)
    context = ssl.create_default_context(cadata=ca) if address.startswith("https://") else None
    request = urllib.request.Request(address + "/api/jobs/", headers={"Authorization": f"Bearer {scraper_token}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30, context=context)
    assert refused.value.code == 403


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "monitoring"


def node_targets(cluster, credential):
    address, ca = job_server(cluster)
    request = urllib.request.Request(
        address + "/api/prometheus/targets", headers={"Authorization": f"Bearer {credential}"}
    )
    with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cadata=ca)) as response:
        return json.load(response)


def test_each_node_is_scraped_through_the_head_and_never_sent_a_scrapers_token(cluster, scraper_token):
    node_token = json.loads(cluster.command("token", "create", "--role", "node-metrics", "--json"))["token"]
    targets = node_targets(cluster, node_token)
    address, ca = job_server(cluster)
    head = urllib.parse.urlsplit(address).netloc
    assert len(targets) == 2 and all(target["labels"]["__scheme__"] == "https" for target in targets), targets
    assert all(target["targets"] == [head] for target in targets), "every daemon is scraped through the head"
    (gpu_node,) = [target for target in targets if target["labels"]["gpu_type"] == GPU_TYPE]
    url = f"https://{head}{gpu_node['labels']['__metrics_path__']}"
    assert gpu_node["labels"]["__metrics_path__"] == f"/api/nodes/{gpu_node['labels']['node_id']}/metrics"

    def read(credential, at=url):
        request = urllib.request.Request(at, headers={"Authorization": f"Bearer {credential}"})
        with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cadata=ca)) as response:
            samples = {}
            for family in text_string_to_metric_families(response.read().decode()):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            return samples

    def refused(credential, at):
        request = urllib.request.Request(at, headers={"Authorization": f"Bearer {credential}"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cadata=ca))
        return error.value.code, error.value.read().decode()

    before = read(node_token)
    # Tasks of a shape the driver holds no lease for: the node grants new ones.
    half = train.options(num_gpus=0.5)
    assert ionet.get([half.remote(step) for step in range(4)], timeout=120) == list(range(4))
    after = read(node_token)
    assert value(after, "ionet_daemon_leases_granted_total") > value(before, "ionet_daemon_leases_granted_total")
    assert value(after, "ionet_daemon_resources_total", resource="GPU") == 2.0
    assert value(after, "ionet_daemon_object_store_capacity_bytes") > 0
    assert value(after, "ionet_daemon_gpu_leased_ratio", gpu="0", gpu_type=GPU_TYPE) is not None
    assert value(after, "ionet_daemon_heartbeats_sent_total") > 0
    assert any(name == "ionet_daemon_rpc_server_calls_total" for name, _ in after), "the node's gRPC calls are counted"
    # The daemon itself takes no scraper's token (its provider could replay it): the
    # node scraper's nor the head's metrics token, saying where to scrape.
    daemon = f"https://{gpu_node['labels']['instance']}/metrics"
    for token in (node_token, scraper_token):
        code, said = refused(token, daemon)
        assert code == 403 and "scraped through the head" in said, said
    # A tenant's credential reads no node's metrics through the head; an unknown node is none.
    key = json.loads(cluster.command("account", "create", "scrape-tenant", "--json"))["api_key"]
    code, said = refused(key, url)
    assert code == 403 and "may not read node" in said, said
    code, said = refused(node_token, f"https://{head}/api/nodes/{'ab' * 28}/metrics")
    assert code == 404 and "no live node" in said, said


def test_a_prometheus_server_scrapes_the_cluster_and_answers_a_jobs_cost(cluster, scraper_token, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is installed by python/test.sh"
    assert ionet.get([train.remote(step) for step in range(5)], timeout=120) == list(range(5))
    job = ionet.get_runtime_context().get_job_id()
    address, ca = job_server(cluster)
    node_token = json.loads(cluster.command("token", "create", "--role", "node-metrics", "--json"))["token"]
    # An epoch settled (providers' balances), and a call the head refuses (the node
    # scraper's token settles nothing): every panel of the dashboard has data.
    cluster.command("settle")
    with pytest.raises(RuntimeError, match="may not call"):
        cluster.command("settle", "--credential", node_token)
    (tmp_path / "ionet-metrics.token").write_text(scraper_token)
    (tmp_path / "ionet-node-metrics.token").write_text(node_token)
    (tmp_path / "ionet-ca.pem").write_text(ca)
    # The example configuration as an operator fills it in (and scraping every second).
    config = (EXAMPLES / "prometheus.yml").read_text()
    config = config.replace("HEAD_HOST:8265", urllib.parse.urlsplit(address).netloc)
    config = config.replace("/etc/prometheus/", f"{tmp_path}/").replace("15s", "1s").replace("30s", "1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )

    def query(promql):
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except OSError:
            return None
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    try:
        cost = f'ionet_job_cost_usd{{job_id="{job}"}}'
        wait_for(lambda: bool(query(cost)), timeout=60, what=f"Prometheus answering {cost}")
        (series,) = query(cost)
        assert series["metric"]["account"] == "default" and float(series["value"][1]) > 0, series
        # Every target is up: the head (TLS, the metrics token) and both node daemons,
        # found through the head (TLS, the node scraper's token).
        wait_for(lambda: len(query("up == 1") or []) == 3, timeout=60, what="three targets up")
        # A daemon's scrape keeps its own families only: none of the head's names.
        assert query('count({job="ionet-nodes", __name__!~"ionet_daemon_.*|up|scrape_.*"})') == []
        granted = query('sum(ionet_daemon_leases_granted_total{job="ionet-nodes"})')
        assert granted and float(granted[0]["value"][1]) >= 5, granted
        finished = query('sum(ionet_tasks_finished_total{account="default"})')
        assert finished and float(finished[0]["value"][1]) >= 5, finished
        # Every panel of the Grafana dashboard is a query Prometheus takes, over metrics
        # it has, with data (rates need a few scrapes first).
        wait_for(lambda: float((query('count_over_time(up{job="ionet-head"}[1m])') or [{"value": [0, "0"]}])[0]["value"][1]) >= 4,
                 timeout=60, what="four scrapes of the head")  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/label/__name__/values", timeout=5) as response:
            names = set(json.load(response)["data"])
        dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if "real GPU" in panel.get("description", ""):
                    # NVML's readings: none here (declared GPUs); the query must still parse.
                    assert query(target["expr"]) is not None, (panel["title"], target["expr"], "is refused")
                    continue
                assert query(target["expr"]), (panel["title"], target["expr"], "has no data")
                for name in re.findall(r"ionet_[a-z_]+", target["expr"]):
                    assert name in names, (panel["title"], name)
    except AssertionError:
        server.terminate()
        server.wait(timeout=30)
        print((tmp_path / "prometheus.log").read_text()[-4000:])
        raise
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
