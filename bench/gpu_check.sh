#!/usr/bin/env bash
# Run every fastpix GPU check on the lent GPU machine (one NVIDIA GPU, no network); see docs/gpu.md.
# usage: bench/gpu_check.sh OUTDIR [--python PY] [--wheels DIR] [--data DIR] [--only a,b] [--budget S]
#                                  [--bundle DIR] [--skip-setup] [--tests] [--cpu-dry-run]
# Writes OUTDIR/report.json (versions, results, each check ok/failed/skipped + message + seconds) and OUTDIR/logs/.
# With --tests: the suite's GPU-relevant tests (bench/gpu_tests.py) instead of the checks, in the same report.
# Exit 0: every check ok or skipped; 1: some check failed (the report says which); 2: bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "error: usage: bench/gpu_check.sh OUTDIR [--python PY] [--wheels DIR] [--data DIR] [--only a,b] [--tests] [--cpu-dry-run]" >&2
  exit 2
fi
# gpu_check.py itself needs only the standard library; it picks the interpreter the checks run with (the
# machine's own python3 when its torch sees the GPU) and never makes a venv, which would hide that torch.
for py in python3 .venv/bin/python python; do
  if command -v "$py" >/dev/null 2>&1; then
    exec "$py" -m bench.gpu_check "$@"
  fi
done
echo "error: no python3 on PATH" >&2
exit 2
