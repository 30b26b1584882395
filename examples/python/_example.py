"""What the Python examples share: how each starts (an embedded cluster of its own, or
joining one with `--address`) and its size (`--large`).

Run any of them as written, from the repository's root with the `ionet` package
installed (`pip install ./python`, or `python/.venv` after `bash python/test.sh`):

    python examples/python/pi.py                       # an embedded cluster, small size
    python examples/python/pi.py --large               # the larger size
    IONET_API_KEY=<key> python examples/python/pi.py --address HEAD:6380   # a real cluster

Each checks its own answer and exits non-zero when it is wrong;
`python/tests/test_examples.py` runs every one at its small size.
"""

from __future__ import annotations

import argparse

import ionet


def start(description: str, **embedded) -> argparse.Namespace:
    """Parses `--address` and `--large`, then joins the cluster at `--address`, or starts
    an embedded one shaped by `embedded` (`num_cpus`, `num_gpus`, `_gpu_type`: GPUs a
    laptop may only declare)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--address", help="join the cluster whose head is HEAD:PORT ('auto': this machine's)")
    parser.add_argument("--large", action="store_true", help="the larger size")
    args = parser.parse_args()
    if args.address:
        ionet.init(address=args.address)
    else:
        ionet.init(**embedded)
    return args


def size(args: argparse.Namespace, small, large):
    return large if args.large else small


def fail(message: str) -> None:
    """The example's answer is wrong: say why and exit non-zero."""
    ionet.shutdown()
    raise SystemExit(f"wrong answer: {message}")
