"""`python3 -m bench.gpu COMMAND ...`, run from the repository root: the one entry point of the GPU harness.

  check OUTDIR [...]        every GPU check within the budget -> OUTDIR/report.json (bench/gpu/check.py)
  check OUTDIR --tests      the suite's GPU-relevant tests instead, in the same report
  probe NAME [...]          one check, in the process `check` starts for it (bench/gpu/probes.py)
  suite [...]               the suite's GPU-relevant tests, as `check --tests` runs them (bench/gpu/suite.py)
  wheels prepare|receive    DALI to the offline machine, 60 MiB per call (bench/gpu/wheels.py)

`COMMAND --help` says more. Only the command's own module is imported: check and wheels need no torch.
"""
import importlib
import sys

from cli import UsageError, run

COMMANDS = {"check": "bench.gpu.check", "probe": "bench.gpu.probes", "suite": "bench.gpu.suite",
            "wheels": "bench.gpu.wheels"}


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        raise UsageError(f"usage: python3 -m bench.gpu {{{','.join(COMMANDS)}}} ... (--help says more)")
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    run(main, sys.argv[1:])
