"""Every Python example (`examples/python/`) at its small size, run as a user runs it: a
fresh interpreter, an embedded cluster of its own. Each checks its own answer and exits
non-zero when it is wrong; what it printed is checked here too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "python"


def run(argv, tmp_path, cwd=ROOT) -> str:
    env = {**os.environ, "IONET_SESSION_DIR": str(tmp_path / "session")}
    for name in ("IONET_ADDRESS", "IONET_API_KEY"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.parametrize(
    "example, checked",
    [
        ("pi.py", r"π ≈ 3\.1\d+ from 10000000 darts in 100 tasks"),
        ("sweep.py", r"checked: every trial's answer matches training it here"),
        ("parameter_server.py", r"checked: the weights are those the same steps give here"),
        ("batch_inference.py", r"checked: every score matches the model run here"),
        ("map_reduce.py", r"checked: the histogram, mean and std are numpy's over the whole array"),
        ("async_service.py", r"checked: every answer is the text's encoding, and requests were served in batches"),
    ],
)
def test_each_example_runs_and_checks_its_answer(example, checked, tmp_path):
    out = run([str(EXAMPLES / example)], tmp_path)
    assert re.search(checked, out), out
    if example == "sweep.py":
        assert len(re.findall(r"^  trial +\d+/18 ", out, re.M)) == 18, "progress is shown as trials finish"
        assert "best: lr 0.01 l2 0.0:" in out, "the known best trial wins"
