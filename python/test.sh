#!/usr/bin/env bash
# The Python package's tests: makes python/.venv if missing, installs the package from
# this checkout into it (building the native module with maturin), runs pytest.
#   python/test.sh [pytest arguments]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/python/.venv"
# A node daemon running as root starts each job's workers as a user of their own, so the
# interpreter must be one every user may run: the system's, not one under a private
# home (pyenv's in /root, say). A venv made from such a one is made again.
base_python=python3
if [ -x /usr/bin/python3 ]; then base_python=/usr/bin/python3; fi
runnable_by_all='import os, stat, sys
path = os.path.realpath(sys.executable)
while path != "/":
    if not os.stat(path).st_mode & stat.S_IXOTH:
        sys.exit(1)
    path = os.path.dirname(path)'
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c "$runnable_by_all"; then
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$base_python" -m venv "$venv"
fi
# The test dependencies, added to a venv an earlier checkout made too. prometheus_client
# is Prometheus's own parser of the metrics format (test_metrics.py).
if ! "$venv/bin/python" -c "import maturin, cloudpickle, numpy, pyarrow, pytest, pytest_timeout, prometheus_client" 2>/dev/null; then
  "$venv/bin/pip" install -q "maturin==1.16.*" cloudpickle numpy pyarrow pytest pytest-timeout prometheus_client
fi
# Debian's packages the tests run for real: a Prometheus server scraping a cluster
# (test_metrics.py) and a headless Chromium reading the dashboard (test_dashboard.py).
missing=""
command -v prometheus >/dev/null || missing="$missing prometheus"
command -v chromium >/dev/null || missing="$missing chromium fonts-dejavu-core"
if [ -n "$missing" ]; then
  sudo_if_needed=""
  if [ "$(id -u)" != 0 ]; then sudo_if_needed=sudo; fi
  $sudo_if_needed apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -qq --no-install-recommends $missing >/dev/null
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
