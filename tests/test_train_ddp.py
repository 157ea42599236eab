"""DDP under torchrun with gloo on the CPU: 2 processes evaluate every test sample exactly once and give the
same test metrics as 1 process; only rank 0 writes.

The model must be the same in both runs for the metrics to be comparable, so the run cannot change it:
ResNet-18 with a frozen backbone (FrozenBatchNorm2d keeps even the running statistics) and lr 0 for the head.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import train
from report.runlog import read_metrics


def test_two_gloo_processes_cover_the_test_set_once_and_agree_with_one(ingested, tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "imagenet.pt")
    common = ["--net", "resnet18", "--pretrained", str(tmp_path / "imagenet.pt"), "--freeze", "--lr", "0",
              "--loader", "resident", "--data", str(ingested), "--res", "32", "--batch-size", "16", "--epochs", "1",
              "--workers", "1", "--amp", "off", "--bootstrap", "200", "--runs-dir", str(tmp_path)]
    one = train.train(train.parse(common + ["--name", "one"]))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           train.__file__, *common, "--name", "two"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's summary; the other rank prints none

    for key in ("test_acc", "test_acc_ci", "macro_precision", "macro_precision_ci"):
        assert two[key] == json.loads(json.dumps(one[key])), key  # JSON turns the intervals into lists
    a, b = (np.load(Path(r["run_dir"]) / "test_predictions.npz") for r in (one, two))
    with open(Path(ingested) / "test.csv") as f:
        labels = [int(row["label"]) for row in csv.DictReader(f)]
    assert b["y_true"].tolist() == a["y_true"].tolist() == labels  # every test sample once, in id order
    assert np.array_equal(a["y_pred"], b["y_pred"])

    run_dir = Path(two["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["world"] == 2
    steps, epochs = read_metrics(run_dir)
    train_count = json.loads((Path(ingested) / "manifest.json").read_text())["splits"]["train"]["count"]
    per_rank_steps = (train_count // 2) // 16
    assert len(steps) == per_rank_steps and len(epochs) == 1  # one writer: nothing logged twice
    assert epochs[0]["train_samples"] == 2 * per_rank_steps * 16
