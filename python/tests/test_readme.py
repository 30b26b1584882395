"""The README's code, so that it cannot drift from the product. Its Rust block is built and
run by the `ionet-examples` crate (`src/bin/readme.rs`); here:

- each ```python block runs as written, in a fresh interpreter;
- each ```bash block runs as written (with this environment's `python` and `ionet` first
  on the PATH), except
  - ```bash ci, the two commands of a fresh machine, which must be the ones `.ci/run`
    runs (CI runs them: running them here would run the tests inside the tests);
  - ```bash synopsis, a reference with placeholders (HEAD, J, <key>): each `ionet`
    command in it must exist, with every flag it shows (asked of `ionet … --help`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def blocks(info: str) -> list[str]:
    """The README's blocks fenced exactly ```{info}."""
    return re.findall(rf"^```{re.escape(info)}\n(.*?)^```\n", README, re.M | re.S)


def environment(tmp_path) -> dict:
    env = {**os.environ, "IONET_SESSION_DIR": str(tmp_path / "session"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("IONET_ADDRESS", "IONET_API_KEY", "IONET_CREDENTIAL"):
        env.pop(name, None)
    return env


def test_every_block_is_of_a_kind_this_file_checks():
    fences = re.findall(r"^```(.*)$", README, re.M)
    openings = fences[0::2]
    assert set(openings) <= {"rust", "python", "bash", "bash ci", "bash synopsis"}, openings
    assert openings.count("rust") == 1, "examples/build.rs runs one Rust block"


def test_the_python_blocks_run_as_written(tmp_path):
    assert blocks("python"), "the README has Python"
    for number, block in enumerate(blocks("python")):
        script = tmp_path / f"readme_{number}.py"
        script.write_text(block)
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=environment(tmp_path),
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, f"block {number}:\n{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if "square.remote(i) for i in range(4)" in block:
            assert done.stdout.startswith("[0, 1, 4, 9]\n1 {"), done.stdout


def test_the_bash_blocks_run_as_written(tmp_path):
    assert blocks("bash"), "the README has commands to run"
    for number, block in enumerate(blocks("bash")):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=environment(tmp_path),
                              capture_output=True, text=True, timeout=800)  # fmt: skip
        assert done.returncode == 0, f"block {number}:\n{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "checked:" in done.stdout or "π ≈" in done.stdout, done.stdout


def test_the_first_two_commands_are_the_ones_ci_runs():
    (first,) = blocks("bash ci")
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.split("  #")[0].strip() for line in first.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job in ci, main_job
    for part in tests.split(" && "):
        assert part in ci, part


def synopsis_commands() -> list[str]:
    """Each `ionet …` command of the synopsis blocks, continuation lines joined, comments
    and placeholders' values left in."""
    found = []
    for block in blocks("bash synopsis"):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip()
            for part in command.split("; "):
                if part.startswith("ionet "):
                    found.append(part)
    return found


def subcommands(command: str) -> list[list[str]]:
    """The subcommand paths a synopsis line names: words up to the first flag, option or
    placeholder, `a|b` alternatives expanded."""
    paths = [[]]
    for word in command.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", word):
            break
        paths = [path + [choice] for path in paths for choice in word.split("|")]
    return paths


def test_the_synopsis_names_commands_and_flags_that_exist():
    ionet = BIN / "ionet"
    commands = synopsis_commands()
    assert len(commands) > 30, commands
    helps: dict[tuple, str] = {}
    for command in commands:
        texts = []
        for path in subcommands(command):
            if tuple(path) not in helps:
                done = subprocess.run([str(ionet), *path, "--help"], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, f"`ionet {' '.join(path)}` does not exist ({command}): {done.stderr}"
                helps[tuple(path)] = done.stdout
            texts.append(helps[tuple(path)])
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", command):
            assert any(re.search(rf"{flag}\b", text) for text in texts), f"{command}: no {flag} in its --help"
