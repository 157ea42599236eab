"""The concurrency matrix (issue 19): two of each writer at once, into one folder. Each pair ends with one
winner (exit 0, whole and consistent output) and one clear refusal (exit 2, one stderr line naming the
holder's pid), never an interleaving.

The overlap is made certain, not left to timing: both writers are started at once (their cold starts of torch
overlap), and once one of them holds the folder (its files.WRITER_NOTE, naming its pid, appears) that one is
paused (SIGSTOP) while the other runs to its end, then continued. A second writer that needs the first's
output (a resume needs a checkpoint) starts only once the first, paused, has it.
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
pytestmark = pytest.mark.usefixtures("small_flat_head")  # the study pair's flat with a small head
HOLD_TIMEOUT = 180  # s for a writer to take its folder (a cold start of torch under load)


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


def holder_of(folder, procs, ready):
    """The one of `procs` whose pid the folder's WRITER_NOTE names, once `ready()` (if given) holds too; fail
    (ending them) if every one of them ends, or the wait times out, first."""
    deadline = time.monotonic() + HOLD_TIMEOUT
    while True:
        try:
            pid = json.loads((Path(folder) / WRITER_NOTE).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        holder = next((p for p in procs if p.pid == pid), None)
        if holder is not None and (ready is None or ready()):
            return holder
        if all(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            ended = [finish(p, timeout=5) for p in procs]
            pytest.fail(f"no writer held {folder}: {[(code, err[-2000:]) for code, _, err in ended]}")
        time.sleep(0.05)


def overlap(first_argv, second_argv, folder, ready=None):
    """Start both writers at once, or, when the second needs `ready()`, the second once the first holds `folder`
    and `ready()`; pause the holder, run the other to its end, continue the holder. Returns the holder's pid, its
    (code, out, err) and the other's."""
    procs = [start(first_argv)] + ([] if ready else [start(second_argv)])
    try:
        holder = holder_of(folder, procs, ready)
        holder.send_signal(signal.SIGSTOP)
        try:
            assert (Path(folder) / WRITER_NOTE).is_file(), "the holder let go of the folder before its pause"
            if ready:
                procs.append(start(second_argv))
            other = finish(next(p for p in procs if p is not holder))
        finally:
            holder.send_signal(signal.SIGCONT)
        return holder.pid, finish(holder), other
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def assert_one_winner(holder_pid, holder, other):
    code, out, err = holder
    assert code == 0, f"the writer that held the folder failed: {err[-3000:]}"
    code, out, err = other
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"the other writer was not refused in one line (exit {code}): {err[-3000:]}"
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
