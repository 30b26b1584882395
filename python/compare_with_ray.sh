#!/usr/bin/env bash
# Runs ionet's Python microbenchmark and Ray's own `ray microbenchmark` on this machine,
# then prints, per benchmark line, ionet's rate, Ray's rate and their ratio.
#   compare_with_ray.sh [FILTER] [--seconds S]
# FILTER selects the benchmarks whose name contains it, for both. ionet runs with
# python/.venv (made by test.sh) when it exists, else python3; Ray in its own venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
baseline="$(dirname "$0")/../../shared/bench/ray-baseline.sh"
python="$here/.venv/bin/python"
[ -x "$python" ] || python=python3
filter=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then filter="$1"; shift; fi

ionet_out=$(mktemp)
ray_out=$(mktemp)
trap 'rm -f "$ionet_out" "$ray_out"' EXIT
"$python" -m ionet.microbenchmark "$filter" "$@" | tee "$ionet_out"
bash "$baseline" ${filter:+"$filter"} | tee "$ray_out"
# The patterns Ray's microbenchmark leaves out, timed on Ray by the same file.
"${RAY_BASELINE_VENV:-$HOME/.cache/ionet-ray-baseline}/bin/python" "$here/ionet/_patterns.py" "$filter" 2>/dev/null | tee -a "$ray_out"

echo
# Lines read "<name> per second <mean> +- <stddev>"; names are joined on the text before " per second ".
awk -F ' per second ' '
  NR == FNR { split($2, value, " "); ray[$1] = value[1]; next }
  FNR == 1  { printf "%-48s %14s %14s %8s\n", "benchmark", "ionet", "ray", "ratio" }
  {
    split($2, value, " ")
    ratio = ($1 in ray && ray[$1] > 0) ? sprintf("%.2f", value[1] / ray[$1]) : "-"
    printf "%-48s %14s %14s %8s\n", $1, value[1], ($1 in ray) ? ray[$1] : "-", ratio
  }
' "$ray_out" "$ionet_out"
