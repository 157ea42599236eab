"""train.py with the streaming loaders: its default `--loader dali`, and `ffcv`, through the command line as a
user runs it (test_train.py trains through `resident`, the cheapest). On the CPU, skipped with the reason
where the library is not installed (the lent GPU machine has neither)."""
import json
from pathlib import Path

import numpy as np
import pytest

import train
from conftest import require
from report.runlog import read_metrics

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")]  # FFCV's numba


@pytest.mark.slow
@pytest.mark.parametrize("loader", [None, "ffcv"])  # None: train.py's default, dali
def test_a_tiny_run_trains_every_step_and_tests_every_sample(loader, ingested, tmp_path):
    cfg = train.parse(["--data", str(ingested), "--net", "resnet18", "--res", "32", "--batch-size", "16",
                       "--epochs", "2", "--amp", "off", "--device", "cpu", "--workers", "1", "--bootstrap", "100",
                       "--runs-dir", str(tmp_path), "--name", "run"] + (["--loader", loader] if loader else []))
    assert cfg.loader == (loader or "dali")
    require(cfg.loader)
    summary = train.train(cfg)
    manifest = json.loads((Path(ingested) / "manifest.json").read_text())
    steps_per_epoch = manifest["splits"]["train"]["count"] // 16  # full batches only
    steps, epochs = read_metrics(summary["run_dir"])
    assert [s["step"] for s in steps] == list(range(2 * steps_per_epoch))
    assert all(np.isfinite(s["loss"]) for s in steps) and summary["stopped"] is None
    assert [e["test_samples"] for e in epochs] == [manifest["splits"]["test"]["count"]] * 2
    assert [e["train_samples"] for e in epochs] == [steps_per_epoch * 16] * 2


def test_the_default_run_reads_both_splits_through_dali(ingested, tmp_path):
    """The fast tier's check, without training: a run of train.py's defaults builds its loaders with DALI."""
    import torch
    cfg = train.parse(["--data", str(ingested), "--net", "resnet18", "--res", "32", "--batch-size", "16",
                       "--device", "cpu", "--workers", "1", "--runs-dir", str(tmp_path), "--name", "run"])
    require(cfg.loader)
    train.check(cfg)
    run = train.Run(cfg, 0, 1, torch.device("cpu"))
    manifest = json.loads((Path(ingested) / "manifest.json").read_text())
    assert cfg.loader == "dali" and type(run.train_loader).__module__ == "loaders.dali"
    assert run.train_loader.num_samples == manifest["splits"]["train"]["count"]
    assert run.test_loader.num_samples == manifest["splits"]["test"]["count"]
