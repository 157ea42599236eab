"""The suite's GPU-relevant tests on the machine at hand (`bench.gpu check OUTDIR --tests` runs this there):
the tests whose outcome can depend on a GPU being present, run with whatever the machine lacks (DALI, FFCV)
skipped with the reason, and a summary for the report: counts, each failure's last line, each skip's reason.

    python3 -m bench.gpu suite [--result FILE] [--quick] [pytest args...]

Exit: 0 when every test passed or skipped, else 1. The last line says `OK ...` or `error: ...`, which
`bench.gpu check`'s report takes as the check's message.
"""
import importlib.util
import os

import pytest

from bench.gpu import REPO
from cli import Parser
from files import write_json

# Every test module that takes a device path, asserts what a GPU changes, or drives one of them (loaders,
# training, DDP, the GPU script itself); ingest and reporting run the same everywhere and stay out.
GPU_TESTS = ("test_common.py", "test_loaders.py", "test_loaders_agreement.py", "test_loaders_integrity.py",
             "test_resident.py", "test_recipe_res.py", "test_train.py", "test_train_runs.py", "test_train_ddp.py",
             "test_recipe.py", "test_study.py", "test_gpu.py")
QUICK_TESTS = ("test_common.py",)  # --quick: the plumbing alone (check --cpu-dry-run)
WORKERS_MAX = 8  # pytest-xdist processes where it is installed (the GPU machine has it, and 16 cores)


class Outcomes:
    """A pytest plugin that keeps each test's outcome (with xdist too: the reports reach this process)."""

    def __init__(self):
        self.passed, self.failed, self.skipped = [], {}, {}

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed[report.nodeid] = (report.longreprtext.strip().splitlines() or [""])[-1][:300]
        elif report.skipped:
            self.skipped[report.nodeid] = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        elif report.when == "call":
            self.passed.append(report.nodeid)


def pytest_args(quick, extra):
    """The command line: the chosen modules, in parallel where pytest-xdist is there, each test bounded where
    pytest-timeout is (a hang then costs one test, not the whole check)."""
    # -o addopts: not setup.cfg's -n, which needs pytest-xdist; its workers are chosen here.
    args = ["-q", "-p", "no:cacheprovider", "-rfEs", "--rootdir", str(REPO), "-c", str(REPO / "setup.cfg"),
            "-o", "addopts="]
    cores = len(os.sched_getaffinity(0))
    if importlib.util.find_spec("xdist") and cores >= 4 and not quick:
        args += ["-n", str(min(WORKERS_MAX, cores // 2))]
    if importlib.util.find_spec("pytest_timeout"):
        args += ["--timeout", "300"]
    return args + [str(REPO / "tests" / name) for name in (QUICK_TESTS if quick else GPU_TESTS)] + list(extra)


def main(argv=None):
    p = Parser(prog="python3 -m bench.gpu suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--result", help="write the summary here (JSON)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_TESTS)}: tests the plumbing")
    args, extra = p.parse_known_args(argv)
    outcomes = Outcomes()
    code = int(pytest.main(pytest_args(args.quick, extra), plugins=[outcomes]))
    summary = {"exit": code, "passed": len(outcomes.passed), "failed": outcomes.failed,
               "skipped": outcomes.skipped, "modules": list(QUICK_TESTS if args.quick else GPU_TESTS)}
    if args.result:
        write_json(args.result, summary)
    counts = f"{len(outcomes.passed)} passed, {len(outcomes.failed)} failed, {len(outcomes.skipped)} skipped"
    if code == 0:
        print(f"OK {counts}")
        return 0
    print(f"error: pytest exit {code}: {counts}; first failure: {next(iter(outcomes.failed), 'none (see the log)')}")
    return 1  # never pytest's 3 (internal error), which `check` would read as "skipped" (SKIP_EXIT)

