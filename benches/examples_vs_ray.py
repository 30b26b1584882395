"""The Python examples (`examples/python/`) at their large size on ionet and on Ray, in
the same sitting on this machine: each example's whole run (start, work, checks, stop)
timed as a process, best of `--rounds`, and the ratio.

    python/.venv/bin/python benches/examples_vs_ray.py            # Ray from ../shared/bench/ray-baseline.sh's venv
    python/.venv/bin/python benches/examples_vs_ray.py --small    # their small size

Ray runs the same files unchanged through a shim package named `ionet` that forwards to
`ray` (dropping ionet's own `_gpu_type`). The sweep asks for a `cheapest_first`
placement group, which Ray has not: it runs on ionet alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "python"
ON_RAY = ["pi.py", "parameter_server.py", "batch_inference.py", "map_reduce.py", "async_service.py"]
ONLY_IONET = ["sweep.py"]

SHIM = '''
import ray as _ray
from ray import get_runtime_context, get_gpu_ids, remote, get, put, wait, nodes, shutdown  # noqa: F401
from . import util  # noqa: F401


def init(*args, _gpu_type=None, **kwargs):
    kwargs.setdefault("include_dashboard", False)
    return _ray.init(*args, **kwargs)
'''


def shim_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="ionet-on-ray-"))
    (root / "ionet").mkdir()
    (root / "ionet" / "__init__.py").write_text(SHIM)
    (root / "ionet" / "util").mkdir()
    (root / "ionet" / "util" / "__init__.py").write_text("from ray.util import ActorPool  # noqa: F401\n")
    return root


def timed(python: str, example: str, size: list, env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([python, str(EXAMPLES / example), *size], env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{example} failed ({python}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-python", default=os.path.expanduser("~/.cache/ionet-ray-baseline/bin/python"))
    args = parser.parse_args()
    size = [] if args.small else ["--large"]
    ionet_env = {**os.environ}
    ray_env = {**os.environ, "PYTHONPATH": str(shim_dir()), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_env.pop("RAY_ADDRESS", None)
    print(f"{'example':<22} {'ionet s':>9} {'Ray s':>9} {'Ray / ionet':>12}   (best of {args.rounds}, {'small' if args.small else 'large'} size)")
    for example in ON_RAY + ONLY_IONET:
        ours, theirs = [], []
        for _ in range(args.rounds):
            # Interleaved: the machine's noise falls on both.
            ours.append(timed(sys.executable, example, size, ionet_env))
            if example in ON_RAY:
                theirs.append(timed(args.ray_python, example, size, ray_env))
        mine = min(ours)
        if theirs:
            print(f"{example:<22} {mine:>9.2f} {min(theirs):>9.2f} {min(theirs) / mine:>11.2f}x")
        else:
            print(f"{example:<22} {mine:>9.2f} {'-':>9} {'(ionet only)':>12}")


if __name__ == "__main__":
    main()
