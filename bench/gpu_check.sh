#!/usr/bin/env bash
# Run every fastpix GPU check on a machine with one NVIDIA GPU and no internet; see README "GPU machine".
# usage: bench/gpu_check.sh OUTDIR [--wheels DIR] [--data DIR] [--only a,b] [--skip-setup] [--cpu-dry-run]
# Writes OUTDIR/report.json (each check ok/failed/skipped + message + seconds) and OUTDIR/logs/.
# Exit 0: every check ok or skipped; 1: some check failed (the report says which); 2: bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "error: usage: bench/gpu_check.sh OUTDIR [--wheels DIR] [--data DIR] [--only a,b] [--cpu-dry-run]" >&2
  exit 2
fi

# The interpreter: the repo's venv when set up; otherwise a venv that sees the machine's own torch
# (--system-site-packages), so a preinstalled CUDA torch is used instead of carrying 3 GB of wheels.
if [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  venv=${FASTPIX_GPU_VENV:-/tmp/fastpix-gpu-venv}
  if [ ! -x "$venv/bin/python" ] && ! python3 -m venv --system-site-packages "$venv" >/dev/null 2>&1; then
    echo "gpu_check: cannot create a venv at $venv (python3-venv missing?); using python3 itself" >&2
    venv=""
  fi
  py=${venv:+$venv/bin/python}
  py=${py:-python3}
fi
exec "$py" bench/gpu_check.py "$@" --python "$py"
