#!/usr/bin/env bash
# The Python package's tests: makes python/.venv if missing, installs the package from
# this checkout into it (building the native module with maturin), runs pytest.
#   python/test.sh [pytest arguments]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/python/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "maturin==1.16.*" cloudpickle numpy pyarrow pytest pytest-timeout
fi
# From the repository root, so that the source tree's python/ionet (without the native
# module) is not on sys.path in place of the installed package.
cd "$root"
# maturin is in the venv already: build without an isolated build environment (pip runs
# the `maturin` on PATH). The tests take the unoptimised build, which shares its compiled
# dependencies with `cargo test`; benchmarks install with `pip install ./python`.
export PATH="$venv/bin:$PATH"
MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/pip" install -q --no-build-isolation ./python
exec "$venv/bin/python" -m pytest -q python/tests "$@"
