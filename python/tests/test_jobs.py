"""Submitted jobs: a Python program with its working dir and environment, submitted to
the head's job server (`ionet job submit` and `ionet.job_submission`), runs on the
cluster's nodes; its output, with each worker's prefix, comes back; stop ends it."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import pytest

from conftest import ProcessCluster, wait_for
from ionet.job_submission import JobStatus, JobSubmissionClient

MAIN = textwrap.dedent(
    """
    import os
    import ionet
    import helper

    ionet.init()  # no address: the job server told the entrypoint where its cluster is

    @ionet.remote(num_cpus=2)
    def work(i, rendezvous):
        import helper, time
        # Both run at once: each holds a whole node's CPUs, so they run on both nodes.
        open(os.path.join(rendezvous, str(i)), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with open("data.txt") as data:
            payload = data.read().strip()
        print(f"task {i} says {helper.greet()} with {payload} and {os.environ['GREETING']}")
        return ionet.get_runtime_context().get_node_id()

    print("driver reads", open("data.txt").read().strip(), "and", os.environ["GREETING"])
    import tempfile
    rendezvous = tempfile.mkdtemp()
    os.chmod(rendezvous, 0o1777)
    nodes = ionet.get([work.remote(i, rendezvous) for i in range(2)], timeout=120)
    print("tasks ran on", len(set(nodes)), "nodes")
    if os.environ.get("LINGER"):
        @ionet.remote
        def linger():
            print("lingering in pid", os.getpid())
            import time
            time.sleep(600)
        ionet.get(linger.remote())
    ionet.shutdown()
    """
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = ProcessCluster(tmp_path_factory.mktemp("session"))
    try:
        # The head runs no tasks: they go to the two nodes, one each (2 CPUs a task).
        cluster.start_head(num_cpus=0)
        cluster.add_node(num_cpus=2)
        cluster.add_node(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def api_key(cluster):
    return json.loads(cluster.command("account", "create", "acme", "--json"))["api_key"]


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "main.py").write_text(MAIN)
    (tmp_path / "helper.py").write_text("def greet():\n    return 'hello from helper'\n")
    (tmp_path / "data.txt").write_text("payload 42\n")
    return tmp_path


PIP_MAIN = textwrap.dedent(
    """
    import os
    import ionet
    import tinypkg

    ionet.init()

    @ionet.remote(num_cpus=2)
    def work(rendezvous):
        import time
        import tinypkg
        open(os.path.join(rendezvous, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return tinypkg.VALUE, ionet.get_runtime_context().get_node_id()

    import tempfile
    rendezvous = tempfile.mkdtemp()
    os.chmod(rendezvous, 0o1777)
    results = ionet.get([work.remote(rendezvous) for _ in range(2)], timeout=120)
    print("tasks import tinypkg", sorted(value for value, _ in results), "on", len({node for _, node in results}), "nodes")
    print("env", os.path.dirname(os.path.dirname(tinypkg.__file__)))
    ionet.shutdown()
    """
)


@pytest.fixture(scope="module")
def wheels():
    """A directory holding one small pure-Python wheel, readable by every user (a node
    installs as a user of its own), so pip needs no network."""
    directory = tempfile.mkdtemp(prefix="ionet-wheels-")
    os.chmod(directory, 0o755)
    wheel = os.path.join(directory, "tinypkg-1.0-py3-none-any.whl")
    files = {
        "tinypkg/__init__.py": "VALUE = 42\n",
        "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        record = "".join(f"{name},,\n" for name in files) + "tinypkg-1.0.dist-info/RECORD,,\n"
        archive.writestr("tinypkg-1.0.dist-info/RECORD", record)
    os.chmod(wheel, 0o644)
    return directory


def job_cli(cluster, api_key, *args, check=True):
    argv = [sys.executable, "-m", "ionet", "job", *args]
    # The session and key go before `--` (what follows is the entrypoint).
    at = argv.index("--") if "--" in argv else len(argv)
    argv[at:at] = ["--temp-dir", str(cluster.session_dir), "--api-key", api_key]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if check and done.returncode != 0:
        raise AssertionError(f"ionet job {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}\n{cluster.logs()}")
    return done


def test_a_submitted_python_job_runs_on_both_nodes_with_its_working_dir(cluster, api_key, project):
    env = json.dumps({"env_vars": {"GREETING": "bonjour"}})
    done = job_cli(
        cluster, api_key, "submit", "--submission-id", "py-1", "--working-dir", str(project),
        "--runtime-env-json", env, "--", sys.executable, "main.py",
    )
    assert "driver reads payload 42 and bonjour" in done.stdout, done.stdout
    assert "tasks ran on 2 nodes" in done.stdout, done.stdout
    logs = job_cli(cluster, api_key, "logs", "py-1").stdout
    lines = [line for line in logs.splitlines() if "says hello from helper with payload 42 and bonjour" in line]
    assert len(lines) == 2, logs
    for line in lines:
        assert line.startswith("(work pid=") and ", ip=127.0.0.1) task " in line, line
    status = job_cli(cluster, api_key, "status", "py-1").stdout
    assert "SUCCEEDED" in status, status


def test_the_python_client_submits_follows_and_stops_a_job(cluster, api_key, project):
    client = JobSubmissionClient(api_key=api_key, _session_dir=str(cluster.session_dir))
    assert client.get_version() == "4"
    job = client.submit_job(
        entrypoint=f"{sys.executable} main.py",
        runtime_env={"working_dir": str(project), "env_vars": {"GREETING": "hola", "LINGER": "1"}},
        metadata={"owner": "tests"},
    )
    wait_for(lambda: "lingering in pid" in client.get_job_logs(job), timeout=120, what="the job's lingering task")
    info = client.get_job_info(job)
    assert info.status == JobStatus.RUNNING and info.metadata == {"owner": "tests"}, info
    assert info.account == "acme" and info.driver_info is not None, info
    worker = int(client.get_job_logs(job).split("lingering in pid")[1].split()[0])
    driver = int(info.driver_info.pid)

    asked = time.monotonic()
    assert client.stop_job(job) is True

    def gone(pid):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True

    wait_for(lambda: gone(driver) and gone(worker), timeout=5 - (time.monotonic() - asked), what="the job's end")
    wait_for(lambda: client.get_job_status(job) == JobStatus.STOPPED, timeout=5, what="STOPPED")
    assert client.stop_job(job) is False, "a stopped job is not running"
    assert [details.submission_id for details in client.list_jobs() if details.submission_id == job] == [job]
    assert client.delete_job(job) is True
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_info(job)


INIT_MAIN = textwrap.dedent(
    """
    import os, sys, tempfile
    import ionet

    session, project, modules = sys.argv[1:4]
    ionet.init(
        address="auto",
        _session_dir=session,
        runtime_env={
            "working_dir": project,
            "py_modules": [modules],
            "excludes": ["*.secret"],
            "env_vars": {"GREETING": "hello from init"},
        },
    )

    @ionet.remote(num_cpus=2)
    def work(rendezvous):
        import time
        import helper, shared_mod
        open(os.path.join(rendezvous, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with open("data.txt") as data:
            payload = data.read().strip()
        shipped = sorted(os.listdir("."))
        return helper.greet(), shared_mod.NAME, payload, os.environ["GREETING"], shipped, os.getcwd(), ionet.get_runtime_context().get_node_id()

    rendezvous = tempfile.mkdtemp()
    os.chmod(rendezvous, 0o1777)
    for result in ionet.get([work.remote(rendezvous) for _ in range(2)], timeout=120):
        print("task", *result, sep=" | ")
    ionet.shutdown()
    """
)


def test_init_runtime_env_ships_the_working_dir_modules_and_env_vars(cluster, api_key, project, tmp_path_factory):
    (project / "key.secret").write_text("not shipped\n")
    modules = tmp_path_factory.mktemp("libs") / "shared_mod"
    modules.mkdir()
    (modules / "__init__.py").write_text("NAME = 'shared module'\n")
    # The driver runs elsewhere: its tasks find the project only through the runtime_env.
    elsewhere = tmp_path_factory.mktemp("driver")
    (elsewhere / "driver.py").write_text(INIT_MAIN)
    env = dict(os.environ, IONET_API_KEY=api_key)
    try:
        done = subprocess.run(
            [sys.executable, "driver.py", str(cluster.session_dir), str(project), str(modules)],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=100,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"OUT {err.stdout} ERR {err.stderr[-5000:] if err.stderr else ''} " + cluster.command("status") + cluster.logs())
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    tasks = [line.split(" | ")[1:] for line in done.stdout.splitlines() if line.startswith("task | ")]
    assert len(tasks) == 2, done.stdout
    for greeting, module, payload, env_var, shipped, cwd, _ in tasks:
        assert (greeting, module, payload, env_var) == ("hello from helper", "shared module", "payload 42", "hello from init")
        assert "key.secret" not in shipped and "data.txt" in shipped, shipped
        assert cwd != str(project), "the task ran in the node's unpacked copy"
    assert len({node for *_, node in tasks}) == 2, "tasks ran on both nodes"

    # Bad input is refused before the job starts, naming what is wrong.
    for runtime_env, expected in [
        ({"colour": "blue"}, 'unknown runtime_env key "colour"'),
        ({"working_dir": str(project / "main.py")}, "not a directory to pack"),
        ({"env_vars": {"A": 1}}, "must be a string"),
    ]:
        bad = textwrap.dedent(
            f"""
            import ionet
            try:
                ionet.init(address="auto", _session_dir={str(cluster.session_dir)!r}, runtime_env={runtime_env!r})
            except Exception as err:
                print("refused:", type(err).__name__, err)
            """
        )
        done = subprocess.run([sys.executable, "-c", bad], env=env, capture_output=True, text=True, timeout=60)
        assert "refused:" in done.stdout and expected in done.stdout, (runtime_env, done.stdout, done.stderr)


PER_TASK_MAIN = textwrap.dedent(
    """
    import json, os, sys
    import ionet

    session, wheels = sys.argv[1:3]
    ionet.init(address="auto", _session_dir=session, runtime_env={"env_vars": {"A": "job", "B": "job"}})

    @ionet.remote
    def seen():
        return os.environ.get("A"), os.environ.get("B"), os.getpid()

    @ionet.remote
    def parent():
        # What a task starts inherits its environment.
        return ionet.get(seen.remote())

    @ionet.remote
    def imports():
        import tinypkg
        return tinypkg.VALUE

    @ionet.remote
    class Holder:
        def read(self):
            return os.environ.get("B")

    own = {"env_vars": {"B": "task"}}
    pip = {"pip": {"packages": ["tinypkg"], "pip_install_options": ["--no-index", "--find-links", wheels]}}
    plain = ionet.get(seen.remote(), timeout=60)
    again = ionet.get(seen.remote(), timeout=60)
    result = {
        "plain": plain[:2],
        "own": ionet.get(seen.options(runtime_env=own).remote(), timeout=60),
        "nested": ionet.get(parent.options(runtime_env=own).remote(), timeout=60)[:2],
        "actor": ionet.get(Holder.options(runtime_env={"env_vars": {"B": "actor"}}).remote().read.remote(), timeout=60),
        "pip": ionet.get(imports.options(runtime_env=pip).remote(), timeout=120),
        "plain_pids": [plain[2], again[2]],
    }
    try:
        ionet.get(imports.remote(), timeout=60)
        result["isolated"] = False
    except Exception as err:
        result["isolated"] = "tinypkg" in str(err)
    for bad in [{"working_dir": "."}, {"colour": "blue"}, {"env_vars": {"A": 1}}]:
        try:
            seen.options(runtime_env=bad).remote()
        except Exception as err:
            result.setdefault("refused", []).append(str(err))
    print("RESULT", json.dumps(result))
    ionet.shutdown()
    """
)


def test_tasks_and_actors_run_inside_their_own_runtime_env(cluster, api_key, wheels, tmp_path):
    (tmp_path / "driver.py").write_text(PER_TASK_MAIN)
    done = subprocess.run(
        [sys.executable, "driver.py", str(cluster.session_dir), wheels],
        cwd=tmp_path, env=dict(os.environ, IONET_API_KEY=api_key), capture_output=True, text=True, timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    result = json.loads(lines[0][len("RESULT "):])
    assert result["plain"] == ["job", "job"]
    # Its own env_vars over the job's, in a worker of its own (not the job's idle one).
    own_a, own_b, own_pid = result["own"]
    assert (own_a, own_b) == ("job", "task") and own_pid not in result["plain_pids"], result
    assert result["nested"] == ["job", "task"], "a nested task inherits its parent's environment"
    assert result["actor"] == "actor"
    assert result["pip"] == 42 and result["isolated"], "the requirement is the task's alone"
    refused = result["refused"]
    assert len(refused) == 3, refused
    assert "working_dir is the job's" in refused[0], refused
    assert 'unknown runtime_env key "colour"' in refused[1], refused
    assert "must be a string" in refused[2], refused


def test_bad_runtime_envs_are_refused_clearly(cluster, api_key, project):
    client = JobSubmissionClient(api_key=api_key, _session_dir=str(cluster.session_dir))
    with pytest.raises(RuntimeError, match='unknown runtime_env key "colour"'):
        client.submit_job(entrypoint="true", runtime_env={"colour": "blue"})
    with pytest.raises(ValueError, match="not a directory to pack"):
        client.submit_job(entrypoint="true", runtime_env={"working_dir": str(project / "main.py")})
    done = job_cli(cluster, api_key, "submit", "--", "/no/such/program", check=False)
    assert done.returncode != 0 and "exit code 127" in done.stderr, done.stderr


def test_a_jobs_requirements_are_installed_once_per_node_and_shared(cluster, api_key, tmp_path, wheels):
    (tmp_path / "main.py").write_text(PIP_MAIN)
    env = json.dumps({"pip": {"packages": ["tinypkg"], "pip_install_options": ["--no-index", "--find-links", wheels]}})
    env_dirs = []
    between = None
    for _ in range(2):
        done = job_cli(
            cluster, api_key, "submit", "--working-dir", str(tmp_path), "--runtime-env-json", env,
            "--", "python3", "main.py",
        )
        assert "tasks import tinypkg [42, 42] on 2 nodes" in done.stdout, done.stdout
        env_dirs += [line.split("env ", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("env ")]
        between = between or time.time() * 1000
    # One environment per requirements (the same name on every node; the first job's tasks
    # ran on both nodes, so both built it then).
    assert len(env_dirs) == 2 and os.path.basename(env_dirs[0]) == os.path.basename(env_dirs[1]), env_dirs
    # Built once: the second job's driver found an environment built before it started.
    marker = json.loads(open(os.path.join(env_dirs[1], ".ionet-env.json")).read())
    assert marker["packages"] == ["tinypkg"] and marker["built_at_ms"] < between, (marker, between)
    mode = os.stat(env_dirs[1]).st_mode & 0o777
    assert mode == 0o755 and os.stat(env_dirs[1]).st_uid == os.geteuid(), "nobody but the daemon may change it"


def test_a_requirement_that_fails_to_install_fails_the_job_clearly(cluster, api_key, wheels):
    started = time.time()
    env = json.dumps({"pip": {"packages": ["doesnotexist"], "pip_install_options": ["--no-index", "--find-links", wheels]}})
    done = job_cli(cluster, api_key, "submit", "--runtime-env-json", env, "--", "python3", "-c", "print(1)", check=False)
    assert done.returncode != 0, done.stdout
    assert "runtime_env setup failed" in done.stderr and "doesnotexist" in done.stderr, done.stderr
    # No half-built environment is left for a later job to use.
    leftovers = [path for path in glob.glob("/tmp/ionet-node-*/envs/.building-*") if os.stat(path).st_mtime >= started]
    assert leftovers == [], leftovers
    client = JobSubmissionClient(api_key=api_key, _session_dir=str(cluster.session_dir))
    with pytest.raises(RuntimeError, match="is not allowed"):
        client.submit_job(entrypoint="true", runtime_env={"pip": {"packages": ["x"], "pip_install_options": ["--target", "/etc"]}})
