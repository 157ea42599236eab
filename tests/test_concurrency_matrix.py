"""The concurrency matrix (issue 19): two of each writer at once, into one folder. Each pair ends with one
winner (exit 0, whole and consistent output) and one clear refusal (exit 2, one stderr line naming the
holder's pid), never an interleaving.

The overlap is made certain, not left to timing: the first writer is started, and once it holds the folder
(its files.WRITER_NOTE appears) it is paused (SIGSTOP) while the second runs to its end, then continued.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from files import WRITER_NOTE

from conftest import TINY_STORE

REPO = Path(__file__).resolve().parent.parent
HOLD_TIMEOUT = 180  # s for the first writer to take its folder (a cold start of torch under load)


def train_argv(data, runs_dir, name, epochs=2):
    return ["train.py", "--net", "resnet18", "--loader", "torch", "--data", str(data), "--runs-dir", str(runs_dir),
            "--name", name, "--res", "32", "--batch-size", "16", "--epochs", str(epochs), "--warmup", "0.5",
            "--amp", "off", "--device", "cpu", "--workers", "0", "--bootstrap", "20", "--log-every", "1", "--no-report"]


def start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def wait_for(proc, ready, what):
    """Poll until `ready()` holds while `proc` runs; fail (ending it) if it ends or times out first."""
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            code, out, err = finish(proc, timeout=5) if proc.poll() is None else (proc.returncode, *proc.communicate())
            pytest.fail(f"the first writer never {what} (exit {code}): {err[-2000:]}")
        time.sleep(0.05)


def overlap(first_argv, second_argv, folder, ready=None):
    """Start the first writer; once it holds `folder` (and `ready()`, if given), pause it, run the second to its
    end, continue the first. Returns the first's pid, its (code, out, err) and the second's."""
    first = start(first_argv)
    try:
        wait_for(first, lambda: (Path(folder) / WRITER_NOTE).is_file() and (ready is None or ready()),
                 f"held {folder}")
        first.send_signal(signal.SIGSTOP)
        try:
            assert (Path(folder) / WRITER_NOTE).is_file(), "the first writer let go of the folder before its pause"
            second = finish(start(second_argv))
        finally:
            first.send_signal(signal.SIGCONT)
        return first.pid, finish(first), second
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()


def assert_one_winner(holder_pid, first, second):
    code, out, err = first
    assert code == 0, f"the first writer failed: {err[-3000:]}"
    code, out, err = second
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"the second writer was not refused in one line (exit {code}): {err[-3000:]}"
    assert lines[0].startswith("error:") and f"pid {holder_pid}" in lines[0], lines[0]


def assert_one_run(run_dir, epochs, checkpoint=True):
    """metrics.jsonl holds one run's steps (each once, in order) and epochs; config.json and last.pt agree."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps)), f"metrics.jsonl interleaves runs: steps {steps}"
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(epochs))
    if not checkpoint:
        return
    config = json.loads((run_dir / "config.json").read_text())
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert json.loads(json.dumps(ckpt["config"])) == config["config"]  # tuples read back as lists
    assert ckpt["global_step"] == len(steps)  # --log-every 1: every step logged


# ----------------------------------------------------------------------------------------------- The pairs
# Each: (tiny_src, ingested, tmp_path) -> (the first writer's argv, the second's, the folder they both write,
# what must exist before the second starts or None, the check of the winner's output).

def ingest_pair(tiny_src, ingested, tmp):
    out = tmp / "data"
    argv = ["ingest/build.py", "--src", str(tiny_src), "--out", str(out), "--store-size", str(TINY_STORE),
            "--shard-size", "32", "--workers", "1", "--quiet"]

    def check():
        verify = subprocess.run([sys.executable, "ingest/build.py", "--verify", "--out", str(out)], cwd=REPO,
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    return argv, argv, out, None, check


def train_pair(tiny_src, ingested, tmp):
    argv = train_argv(ingested, tmp, "same")
    return argv, argv, tmp / "same", None, lambda: assert_one_run(tmp / "same", epochs=2)


def resume_pair(tiny_src, ingested, tmp):
    run_dir = tmp / "run"  # resumed once its first checkpoint exists, while it trains on
    return (train_argv(ingested, tmp, "run", epochs=3), ["train.py", "--resume", str(run_dir), "--no-report"], run_dir,
            lambda: (run_dir / "last.pt").is_file(), lambda: assert_one_run(run_dir, epochs=3))


def bench_pair(tiny_src, ingested, tmp):
    out = tmp / "bench"
    argv = ["-m", "bench", "--data", str(ingested), "--loaders", "folder", "--nets", "resnet18", "--epochs", "2",
            "--batch-size", "32", "--res", "32", "--workers", "1", "--loader-epochs", "1", "--out", str(out)]

    def check():
        results = json.loads((out / "results.json").read_text())
        assert [r["cell"] for r in results["rows"]] == ["resnet18/folder"] and not results["rows"][0].get("error")
        assert_one_run(out / "runs" / "resnet18-folder", epochs=2, checkpoint=False)  # the bench keeps no weights
    return argv, argv, out, None, check


def study_pair(tiny_src, ingested, tmp):
    out = tmp / "study"
    argv = ["-m", "bench.study", "strides", "--strides", "4,1,1", "--data", str(ingested), "--out", str(out),
            "--loader", "torch", "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--res", "64",
            "--workers", "0", "--bootstrap", "20"]

    def check():
        cached = json.loads((out / "runs" / "flat.json").read_text())
        assert cached["config"]["name"] == "flat" and len(cached["epochs"]) == 1
        assert_one_run(out / "train" / "flat", epochs=1)
    return argv, argv, out, None, check


WRITERS = {"ingest": ingest_pair, "train": train_pair, "resume": resume_pair, "bench": bench_pair,
           "study": study_pair}


@pytest.mark.slow
@pytest.mark.parametrize("writer", WRITERS)
def test_two_writers_of_one_folder_end_with_one_winner_and_one_refusal(writer, tiny_src, ingested, tmp_path):
    first, second, folder, ready, check = WRITERS[writer](tiny_src, ingested, tmp_path)
    assert_one_winner(*overlap(first, second, folder, ready))
    check()


def test_an_ingest_into_a_held_folder_is_refused_in_one_line_naming_the_holder(tiny_src, tmp_path, capsys):
    """The fast tier's cell: this process holds the folder, as the paused first writer above does, and a second
    ingest (in this process: the pairs above are the processes) is refused without writing."""
    from cli import run
    from files import one_writer
    from ingest.build import main
    out = tmp_path / "data"
    out.mkdir()
    with one_writer(out):
        with pytest.raises(SystemExit) as exit_:
            run(main, ingest_pair(tiny_src, None, tmp_path)[1][1:])
        assert [p.name for p in out.iterdir()] == [WRITER_NOTE]
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error:") and f"pid {os.getpid()}" in lines[0], lines[0]
