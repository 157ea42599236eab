"""The entry scripts are modules too: importing one (a notebook, a test, bench.train_config) changes nothing
outside it, and each still runs by its path from any folder."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every module that is a command or holds one; bench.__main__ runs `python -m bench` when imported, by design.
COMMANDS = ("train", "predict", "ingest.build", "ingest.demo", "bench.run", "bench.demo", "bench.ingest",
            "bench.loaders", "bench.predict", "bench.scale", "bench.study", "bench.tta", "bench.gpu.__main__",
            "bench.gpu.check", "bench.gpu.probes", "bench.gpu.suite", "bench.gpu.wheels", "report.__main__")
SCRIPTS = ("train.py", "predict.py", "ingest/build.py", "ingest/demo.py")  # run by path, as the docs say

# Imports each module in turn in a fresh interpreter and lists what each import changed, putting back what it
# changed before the next, so that no module hides another's change. The libraries' own import-time settings
# are theirs (torchvision sets TORCHINDUCTOR_CACHE_DIR): they are imported first.
PROBE = """
import importlib, json, os, sys
import torch, torchvision
def state():
    return {"sys.path": list(sys.path), "cwd": os.getcwd(), "environ": dict(os.environ), "argv": list(sys.argv),
            "files": sorted(os.listdir("."))}
changed = {}
for name in sys.argv[1:]:
    before = state()
    importlib.import_module(name)
    after = state()
    changed.update({name: [k for k in before if before[k] != after[k]]} if before != after else {})
    sys.path[:], sys.argv[:] = before["sys.path"], before["argv"]
    os.chdir(before["cwd"])
    os.environ.clear()
    os.environ.update(before["environ"])
print(json.dumps(changed))
"""


def test_importing_an_entry_module_changes_no_path_folder_or_environment(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, *COMMANDS], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {}


@pytest.mark.slow
def test_each_entry_script_runs_by_its_path_from_another_folder_with_its_own_checkout(tmp_path):
    """Its own checkout's modules, not those of whichever fastpix the venv has installed editable (python -v
    names the file each module came from)."""
    procs = [subprocess.Popen([sys.executable, "-v", str(REPO / script), "--help"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in SCRIPTS]
    ours = re.compile(rf"^# (code object from '|\S+ matches ){re.escape(str(REPO))}/cli\.py", re.M)
    for script, proc in zip(SCRIPTS, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, f"{script}: {err[-2000:]}"
        assert ours.search(err), f"{script} imported another checkout's cli.py"
