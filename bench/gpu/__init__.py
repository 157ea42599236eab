"""The harness for the lent GPU machine (docs/gpu.md): one command, `python3 -m bench.gpu check|probe|suite|wheels`.

GPU code cannot run in CI, so when a GPU machine is lent for a few minutes, `check` is the one prepared thing
to run there. `check` (the runner and its plan of checks) and `wheels` (DALI carried in 60 MiB folders) need
the standard library alone, since they run before anything is installed; `probe` (one check per process) and
`suite` (the suite's GPU-relevant tests) import torch and pytest, and only `check` starts them.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_EXIT = 3  # a probe that cannot run here, and says why: the report counts it as skipped, not failed
