"""Time from `job submit` to the entrypoint's first line, for ionet and (optionally) Ray.

    python3 benches/job_submit.py IONET_BINARY [--ray RAY_BINARY] [--runs 3]

Starts a local ionet cluster (a head and one node, a session of its own), then submits
`echo` three times (no package) and a 10 MB working dir of random bytes three times (a
new package each time), printing seconds from starting the CLI to the marker line on its
output. With `--ray`, does the same against `ray start --head` (Ray's own CLI, e.g. from
the venv `shared/bench/ray-baseline.sh` makes). Not a test: the machines are noisy, so
compare the two in one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MARKER = "first-printed-line"
# An interpreter every user may run (a node runs the entrypoint as a user of its own).
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def first_line(argv, env=None) -> float:
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = float("nan")
    for line in process.stdout:
        # The entrypoint's line, not the CLI echoing the command it submits.
        if MARKER in line and "submit" not in line.lower():
            seconds = time.monotonic() - started
            break
    process.wait()
    return seconds


def working_dir(root: str, run: int) -> str:
    path = os.path.join(root, f"wd{run}")
    os.makedirs(path)
    with open(os.path.join(path, "blob.bin"), "wb") as blob:
        blob.write(os.urandom(10 * 1000 * 1000))
    with open(os.path.join(path, "main.py"), "w") as main:
        main.write(f"print({MARKER!r})\n")
    return path


def ionet(binary: str, runs: int, scratch: str) -> None:
    session = os.path.join(scratch, "session")
    run = lambda *args: subprocess.run([binary, *args, "--temp-dir", session], check=True, capture_output=True, text=True)
    run("start", "--head", "--port", "0", "--dashboard-port", "0", "--num-cpus", "1")
    try:
        head = open(os.path.join(session, "head_address")).read().strip()
        run("start", "--address", head, "--num-cpus", "1")
        key = json.loads(run("account", "create", "bench", "--json").stdout)["api_key"]
        submit = [binary, "job", "submit", "--temp-dir", session, "--api-key", key]
        echo = [first_line(submit + ["--", "echo", MARKER]) for _ in range(runs)]
        packed = [
            first_line(submit + ["--working-dir", working_dir(scratch, run), "--", PYTHON, "main.py"])
            for run in range(runs)
        ]
        report("ionet", echo, packed)
    finally:
        subprocess.run([binary, "stop", "--temp-dir", session], capture_output=True)


def ray(binary: str, runs: int, scratch: str) -> None:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PATH=os.path.dirname(binary) + os.pathsep + os.environ["PATH"])
    subprocess.run([binary, "start", "--head", "--num-cpus", "2", "--disable-usage-stats"], check=True, capture_output=True, env=env)
    try:
        submit = [binary, "job", "submit", "--address", "http://127.0.0.1:8265"]
        echo = [first_line(submit + ["--", "echo", MARKER], env) for _ in range(runs)]
        packed = [
            first_line(submit + ["--working-dir", working_dir(scratch, runs + run), "--", PYTHON, "main.py"], env)
            for run in range(runs)
        ]
        report("ray", echo, packed)
    finally:
        subprocess.run([binary, "stop"], capture_output=True, env=env)


def report(name: str, echo, packed) -> None:
    show = lambda values: ", ".join(f"{value:.2f}" for value in values)
    print(f"{name}: no package {show(echo)} s; new 10 MB working dir {show(packed)} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ionet")
    parser.add_argument("--ray")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ionet(args.ionet, args.runs, scratch)
        if args.ray:
            ray(args.ray, args.runs, scratch)


if __name__ == "__main__":
    main()
