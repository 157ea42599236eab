"""DDP under torchrun with gloo on the CPU (`--device cpu`, so the test means the same on a GPU machine).

1. 2 processes evaluate every test sample exactly once and give the same test metrics as 1 process; only rank
   0 writes. The model must be the same in both runs for the metrics to be comparable, so the run cannot
   change it: ResNet-18 with a frozen backbone (FrozenBatchNorm2d keeps even the running statistics) and lr 0.
2. With a real learning rate, gradients are synced: both ranks end with the same weights although they
   trained on different samples; and a 2-process run cut mid-epoch resumes to the uninterrupted run exactly.
3. One process under torchrun still makes the process group (the 1-GPU NCCL check depends on it).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from report.runlog import read_metrics
from training.resume import seed_everything

# Runs train.py's CLI under torchrun and saves each rank's final parameters to <prefix><rank>.pt, so the test
# can compare ranks (only rank 0 writes the run folder).
RANK_DUMP = """
import sys
import torch
import train

prefix, argv = sys.argv[1], sys.argv[2:]

class Dumped(train.Run):  # after every epoch: the last one's parameters stay
    def train_epoch(self, stop):
        super().train_epoch(stop)
        torch.save({k: v for k, v in self.model.named_parameters()}, f"{prefix}{self.rank}.pt")

train.Run = Dumped
train.run(train.main, argv + ["--no-report"])
"""
# What the shared 2-process run (conftest.two_process_run) and the runs compared with it train.
DDP_OPTIONS = ["--net", "resnet18", "--loader", "resident", "--res", "32", "--batch-size", "8", "--epochs", "2",
               "--lr", "0.05", "--workers", "1", "--amp", "off", "--device", "cpu", "--bootstrap", "20",
               "--log-every", "1"]


def torchrun(script, *args):
    repo = str(Path(train.__file__).resolve().parent)  # the script may live elsewhere: import this checkout
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get(
        "PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's summary; the other rank prints none


@pytest.mark.slow
def test_two_gloo_processes_cover_the_test_set_once_and_agree_with_one(ingested, tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "imagenet.pt")
    common = ["--net", "resnet18", "--pretrained", str(tmp_path / "imagenet.pt"), "--freeze", "--lr", "0",
              "--loader", "resident", "--data", str(ingested), "--res", "32", "--batch-size", "16", "--epochs", "1",
              "--workers", "1", "--amp", "off", "--device", "cpu", "--bootstrap", "200", "--runs-dir", str(tmp_path)]
    one = train.train(train.parse(common + ["--name", "one"]))
    two = torchrun(train.__file__, *common, "--name", "two", "--no-report")

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


@pytest.mark.slow
def test_two_processes_sync_gradients_and_resume_exactly(two_process_run, ingested, tmp_path):
    full_dir, full_prefix, script = two_process_run
    rank0, rank1 = (torch.load(f"{full_prefix}{r}.pt", weights_only=True) for r in (0, 1))
    common = [*DDP_OPTIONS, "--data", str(ingested), "--runs-dir", str(tmp_path)]
    cfg = train.parse(common)
    seed_everything(cfg.seed)  # the weights both runs started from
    classes = json.loads((Path(ingested) / "manifest.json").read_text())["classes"]
    start = dict(train.make_model(cfg, len(classes), torch.device("cpu")).named_parameters())
    assert any(not torch.equal(rank0[k], start[k]) for k in rank0), "the run did not train"
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged: gradients were not synced"

    steps_per_epoch = len(read_metrics(full_dir)[0]) // 2
    cut = torchrun(script, tmp_path / "cut-rank", *common, "--name", "cut", "--max-steps", steps_per_epoch + 1)
    assert cut["stopped"] == "max_steps"
    resumed = torchrun(script, tmp_path / "resumed-rank", "--resume", cut["run_dir"])
    assert resumed["epochs"] == 2
    full_steps, resumed_steps = (read_metrics(d)[0] for d in (full_dir, resumed["run_dir"]))
    assert [s["loss"] for s in resumed_steps] == [s["loss"] for s in full_steps]
    for r in (0, 1):
        a, b = (torch.load(f"{prefix}{r}.pt", weights_only=True)
                for prefix in (full_prefix, tmp_path / "resumed-rank"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_process_under_torchrun_brings_up_the_process_group(ingested, tmp_path):
    """The 1-GPU NCCL check of `bench.gpu check` runs this with NCCL; here gloo stands in for it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           train.__file__, "--net", "resnet18", "--loader", "resident", "--data", str(ingested),
                           "--res", "32", "--batch-size", "16", "--max-steps", "1", "--workers", "1", "--amp", "off",
                           "--runs-dir", str(tmp_path), "--name", "one", "--no-report"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["world"] == 1 and config["process_group"] == "gloo"


def test_two_ranks_test_every_sample_exactly_once(ingested):
    """The fast tier's part of 1.: each rank's test loader reads its own block of the split, the two together
    every sample once (the reduction of their counts is what the runs above check)."""
    from loaders import make_loader
    ids = [int(i) for rank in (0, 1) for _, _, batch in make_loader(
        "torch", ingested, "test", batch_size=16, res=32, device="cpu", rank=rank, world=2, workers=0,
        with_ids=True) for i in batch]
    count = json.loads((Path(ingested) / "manifest.json").read_text())["splits"]["test"]["count"]
    assert sorted(ids) == list(range(count))
