"""The README's first command, `python -m bench.demo`, end to end on a small demo (4 photos per class): it
generates and ingests the photos, trains, and benches against the folder baseline. Run as a user would, in a
fresh folder (its runs/ and results/ go there)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from bench.demo import main
from cli import run

REPO = Path(train.__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("small_flat_head")  # the demo's flat, and its bench's, with a small head


def demo(cwd, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.demo", "--data", "data/demo", "--per-class", "4",
                           "--res", "64", "--loader", "resident", "--bench-loaders", "folder,resident", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_demo_generates_ingests_trains_and_benches(tmp_path):
    first = demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "demo done in" in first.stdout
    assert (tmp_path / "data" / "demo" / "manifest.json").is_file()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "last.pt").is_file() and (run_dir / "loss.png").is_file()
    (bench_dir,) = (tmp_path / "results").glob("bench-*")
    table = (bench_dir / "table.md").read_text()
    assert "flat/folder" in table and "flat/resident" in table


def test_the_demo_rejects_a_too_small_demo_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # in this process: the demo above is the run as a user's
        run(main, ["--data", str(tmp_path / "demo"), "--per-class", "2"])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: --per-class must be >= 4 (a test share and a batch of each class), got 2"]
    assert not (tmp_path / "demo").exists()
