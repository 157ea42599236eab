"""Exact resume with every loader: a run killed with SIGKILL in the middle of an epoch and resumed with
--resume logs the very losses of an uninterrupted run. What makes it hold is that a loader's order and
augmentation draws are a function of (seed, epoch, sample) alone (loaders.common.sample_seed), so no
worker process, numba thread or DataLoader state needs to be in the checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import train
from conftest import require
from tests.test_loaders import BACKENDS

REPO = Path(train.__file__).resolve().parent
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")]
OPTIONS = dict(net="resnet18", res=32, batch_size=16, epochs=3, lr=0.01, warmup=0.5, amp="off", workers=1,
               bootstrap=20, log_every=1)  # ~65 train samples -> 4 steps per epoch


def argv(options):
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def step_losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"]


def kill_in_epoch_1(options, run_dir):
    """Run train.py in a child process and SIGKILL it once a step of epoch 1 is logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the threads of the in-process runs: the same float sums
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv(options)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, steps_per_epoch = Path(run_dir) / "metrics.jsonl", 4
    try:
        while child.poll() is None and not (metrics.exists() and len(step_losses(run_dir)) > steps_per_epoch):
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-500:]}"


@pytest.mark.slow
@pytest.mark.parametrize("name,augment", [(name, "rrc") for name in BACKENDS] + [("ffcv", "flip"), ("torch", "flip")])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_losses(name, augment, ingested, tmp_path):
    """Every loader with its default augmentation, and the flip-only one where flips are drawn in worker
    processes (torch) and numba threads (ffcv). The run to be killed starts first and the uninterrupted one trains
    here meanwhile: the child's start (torch's import, FFCV's numba compilation) is most of its time."""
    require(name)
    options = dict(OPTIONS, loader=name, augment=augment, data=str(ingested), runs_dir=str(tmp_path))
    with ThreadPoolExecutor(1) as watcher:
        cut = watcher.submit(kill_in_epoch_1, dict(options, name="cut"), tmp_path / "cut")
        full = train.train(train.Config(**options, name="full"))
        cut.result()
    resumed = train.train(train.Config(resume=str(tmp_path / "cut")))
    assert resumed["epochs"] == 3
    assert step_losses(resumed["run_dir"]) == step_losses(full["run_dir"])


def test_a_fresh_loader_at_epoch_1_gives_the_batches_of_one_that_ran_epoch_0(ingested):
    """What resume rests on, without a run: a new loader's epoch is a function of (seed, epoch, sample) alone,
    augmentation draws included."""
    from loaders import make_loader

    def loader():
        return make_loader("torch", ingested, "train", batch_size=16, res=32, device="cpu", seed=0, workers=0,
                           augment="rrc", with_ids=True)

    ran, fresh = loader(), loader()
    for _ in ran:
        pass
    ran.set_epoch(1)
    fresh.set_epoch(1)
    for (a, la, ia), (b, lb, ib) in zip(ran, fresh, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(a, b)
