"""train.py on the tiny ingested demo through make_loader('resident'): it learns, writes its run folder,
resumes exactly, starts from a checkpoint, stops cleanly on SIGTERM and on a non-finite loss, and rejects
bad arguments in one line. ResNet-18 at 32 px is the cheapest net to train here; the AlexNet family's
shapes are pinned in test_nets.py, and the non-finite-loss run goes through the flat net's training path (with
a small head: tests/small_heads.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from cli import UsageError
from report.quality import per_class_markdown
from report.runlog import read_metrics
from training.device import cpu_has_native_bf16, resolve_amp
from training.labels import merge_classes
from training.recipe import lr_factor

REPO = Path(train.__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread", "small_flat_head")


def tiny(ingested, runs, name, **overrides):
    """A config that trains in seconds: ~65 train samples, batch 16 -> 4 steps per epoch; on the CPU even where
    a GPU is present, so every figure below means the same on every machine."""
    options = dict(net="resnet18", loader="resident", data=str(ingested), res=32, batch_size=16, epochs=2,
                   lr=0.01, warmup=0.5, amp="off", device="cpu", runs_dir=str(runs), name=name, workers=1,
                   bootstrap=200, log_every=3)
    options.update(overrides)
    return train.Config(**options)


def split_count(ingested, split):
    return json.loads((Path(ingested) / "manifest.json").read_text())["splits"][split]["count"]


def weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def learned(ingested, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return train.train(tiny(ingested, runs, "learn", epochs=6, amp="bf16"))


@pytest.mark.slow
def test_a_tiny_run_learns_with_bf16_on_the_cpu(learned):
    steps, epochs = read_metrics(learned["run_dir"])
    chance = 1 / len(json.loads((Path(learned["run_dir"]) / "config.json").read_text())["classes"])
    assert learned["amp"] == "bf16" and learned["epochs"] == 6 and learned["stopped"] is None
    assert epochs[-1]["train_loss"] < 0.75 * epochs[0]["train_loss"]
    assert learned["train_acc"] > 2 * chance
    assert learned["final_loss"] == epochs[-1]["train_loss"]


@pytest.mark.slow
def test_the_run_folder_holds_config_metrics_checkpoint_and_predictions_only(learned, ingested):
    run_dir = Path(learned["run_dir"])
    steps_per_epoch = split_count(ingested, "train") // 16  # full batches only
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["net"] == "resnet18" and config["amp"] == "bf16" and len(config["classes"]) == 6
    steps, epochs = read_metrics(run_dir)
    assert [s["step"] for s in steps] == list(range(6 * steps_per_epoch))  # every iteration once, in order
    assert all(np.isfinite(s["loss"]) and s["lr"] > 0 and s["images_per_sec"] > 0 for s in steps)
    assert [e["epoch"] for e in epochs] == list(range(6))
    for e in epochs:
        assert e["test_acc_ci"][0] <= e["test_acc"] <= e["test_acc_ci"][1]
        assert e["macro_precision_ci"][0] <= e["macro_precision"] <= e["macro_precision_ci"][1]
        assert e["train_samples"] == steps_per_epoch * 16 and 0 <= e["data_stall_fraction"] < 1
    predictions = np.load(run_dir / "test_predictions.npz")
    assert len(predictions["y_true"]) == epochs[-1]["test_samples"] == split_count(ingested, "test")
    # train() draws nothing (python -m report does, from these files: test_report_run.py)
    assert sorted(p.name for p in run_dir.iterdir()) == [".fastpix-run", "config.json", "last.pt", "metrics.jsonl",
                                                         "test_predictions.npz"]
    assert json.loads((run_dir / ".fastpix-run").read_text()) == {"finished": True}
    assert learned["images_per_sec"] > 0 and learned["peak_rss_mb"] > 0 and learned["peak_gpu_mb"] is None


@pytest.mark.slow
def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(ingested, tmp_path, learned):
    start = str(Path(learned["run_dir"]) / "last.pt")  # a run that began --init-from resumes too
    full = train.train(tiny(ingested, tmp_path, "full", init_from=start))
    cut = train.train(tiny(ingested, tmp_path, "cut", init_from=start, max_steps=6))  # inside epoch 2 of 4 steps
    assert cut["stopped"] == "max_steps" and cut["epochs"] == 1
    resumed = train.train(train.Config(resume=cut["run_dir"]))
    assert resumed["run_dir"] == cut["run_dir"] and resumed["epochs"] == 2
    a, b = weights(full["run_dir"]), weights(resumed["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_steps, _ = read_metrics(full["run_dir"])
    resumed_steps, resumed_epochs = read_metrics(resumed["run_dir"])
    assert [s["loss"] for s in resumed_steps] == [s["loss"] for s in full_steps]  # the curve continues
    assert [e["epoch"] for e in resumed_epochs] == [0, 1]
    assert resumed["test_acc"] == full["test_acc"] and resumed["final_loss"] == full["final_loss"]


@pytest.mark.slow
def test_init_from_starts_from_the_checkpoint_weights(ingested, tmp_path, learned):
    # lr 0 leaves the parameters where they started, so they must equal the checkpoint's.
    run = train.train(tiny(ingested, tmp_path, "init", epochs=1, lr=0.0,
                           init_from=str(Path(learned["run_dir"]) / "last.pt")))
    start, end = weights(learned["run_dir"]), weights(run["run_dir"])
    assert all(torch.equal(start[k], end[k]) for k in start if "running" not in k and "num_batches" not in k)
    with pytest.raises(UsageError, match="does not fit this net"):
        train.train(tiny(ingested, tmp_path, "init-wrong", net="narrow", res=64,
                         init_from=str(Path(learned["run_dir"]) / "last.pt")))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_cleanly(ingested, tmp_path):
    config = tiny(ingested, tmp_path, "term", epochs=100, log_every=1)
    metrics = Path(config.runs_dir) / config.name / "metrics.jsonl"

    def terminate_once_training():
        while not metrics.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_training, daemon=True).start()
    run = train.train(config)
    assert run["stopped"] == "signal" and run["epochs"] < 100
    ckpt = torch.load(Path(run["run_dir"]) / "last.pt", weights_only=True)
    steps, _ = read_metrics(run["run_dir"])
    per_epoch = split_count(ingested, "train") // 16
    assert ckpt["global_step"] == len(steps) and ckpt["epoch"] * per_epoch + ckpt["step_in_epoch"] == len(steps)
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is handed back


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_a_clear_message(ingested, tmp_path):
    with pytest.raises(UsageError, match="loss became non-finite at step"):
        train.train(tiny(ingested, tmp_path, "nan", net="flat", res=64, epochs=2, lr=1e12, warmup=0,
                         log_every=1, momentum=0.0))


def test_lr_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(s, 10, 100) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.001


def test_auto_amp_on_the_cpu_follows_native_bf16_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "off")
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", cpu)


@pytest.mark.parametrize("argv,message", [
    (["--net", "vgg"], "unknown net 'vgg'"),
    (["--loader", "magic"], "unknown loader 'magic'"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "-1"], "must be finite and >= 0"),
    (["--epochs", "two"], "invalid int value"),
    (["--strides", "4,x"], "comma-separated integers"),
    (["--init-from", "/nonexistent.pt"], "no such checkpoint"),
    (["--resume", "/nonexistent-run"], "no config.json there"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--augment", "crop"], "unknown augment 'crop': choose one of rrc, flip, none"),
    (["--data", "/nonexistent-data", "--loader", "resident"], "is not an ingested dataset"),
    (["--warmup", "nan"], "--warmup must be a finite number, got nan"),  # issue 19: tracebacks before
    (["--warmup", "inf"], "--warmup must be a finite number, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),  # trained, then "lower --lr"
    (["--momentum=-inf"], "--momentum must be a finite number, got -inf"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", "99999999999"], "--seed must be <= 4294967295, got 99999999999"),
    (["--device", "foo"], "unknown device 'foo': choose one of auto, cpu, cuda"),
    (["--find-lr-steps", "1"], "--find-lr-steps must be >= 5, got 1"),  # it trained at 1e-8, silently
    (["--recipe", "fast", "--pieces", ""], "--recipe fast with no --pieces is the study recipe"),
])
def test_bad_arguments_are_one_usage_error_line(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        train.main(argv + ["--runs-dir", str(tmp_path)])


@pytest.mark.slow
def test_the_command_line_draws_the_report_unless_no_report(ingested, tmp_path, monkeypatch, capsys):
    import report.render
    drawn = []
    monkeypatch.setattr(report.render, "render", lambda run_dir, device: drawn.append((run_dir, device)))
    argv = ["--net", "resnet18", "--loader", "resident", "--data", str(ingested), "--res", "32", "--batch-size", "16",
            "--max-steps", "1", "--workers", "1", "--amp", "off", "--device", "cpu", "--runs-dir", str(tmp_path)]
    assert train.main(argv + ["--name", "drawn"]) == 0 and drawn == [(str(tmp_path / "drawn"), "cpu")]
    assert train.main(argv + ["--name", "not-drawn", "--no-report"]) == 0 and len(drawn) == 1
    assert train.parse(["--no-report"]) == train.Config()  # not the run's option: config.json never holds it

    def fails(run_dir, device):  # a report that cannot draw (a moved dataset, a full disk) costs the pictures only
        raise UsageError("the disk is full")

    monkeypatch.setattr(report.render, "render", fails)
    capsys.readouterr()
    assert train.main(argv + ["--name", "undrawn"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["run_dir"] == str(tmp_path / "undrawn")
    said = [line for line in err.splitlines() if line.startswith("warning:")]
    assert said == [f"warning: the run is whole, but its report was not drawn: the disk is full; draw it with: "
                    f"python -m report {tmp_path / 'undrawn'}"]


def test_augment_reaches_the_train_loader(ingested, tmp_path, monkeypatch):
    """--augment is make_loader's augment for the train split (the default: rrc); make_loader itself gives the
    test split the test transform whatever it is told (tests/test_loaders_agreement.py checks the pixels)."""
    made = []

    class Built(Exception):
        pass

    def recording(name, data_dir, split, **options):
        made.append((split, options.get("augment", "rrc")))
        if split == "test":
            raise Built  # both loaders asked for: the rest of the run is not what is tested

    monkeypatch.setattr(train, "make_loader", recording)
    for augment in ("none", None):
        with pytest.raises(Built):
            train.train(train.parse(["--net", "resnet18", "--data", str(ingested), "--runs-dir", str(tmp_path)]
                                    + (["--augment", augment] if augment else [])))
    assert [augment for split, augment in made if split == "train"] == ["none", "rrc"]


@pytest.mark.slow
def test_the_cli_reports_a_bad_argument_in_one_line_with_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--net", "vgg"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: unknown net 'vgg': choose one of alexnet, flat, narrow, "
                                                "resnet18"]


@pytest.mark.slow
def test_find_lr_leaves_the_run_bit_identical_and_lr_auto_uses_its_suggestion(ingested, tmp_path):
    plain = train.train(tiny(ingested, tmp_path, "plain", epochs=1))
    swept = train.train(tiny(ingested, tmp_path, "swept", epochs=1, find_lr=True, find_lr_steps=12))
    assert all(torch.equal(a, b) for a, b in zip(weights(plain["run_dir"]).values(),
                                                 weights(swept["run_dir"]).values()))
    losses = [[s["loss"] for s in read_metrics(r["run_dir"])[0]] for r in (plain, swept)]
    assert losses[0] == losses[1]
    found = json.loads((Path(swept["run_dir"]) / "lr_find.json").read_text())
    assert 1e-7 <= found["suggested_lr"] <= 1 and len(found["lr"]) == len(found["loss"]) <= 12
    assert found["lr"] == sorted(found["lr"])
    assert json.loads((Path(swept["run_dir"]) / "config.json").read_text())["lr"] == 0.01
    auto = train.train(tiny(ingested, tmp_path, "auto", epochs=1, lr="auto", find_lr_steps=12))
    suggested = json.loads((Path(auto["run_dir"]) / "lr_find.json").read_text())["suggested_lr"]
    config = json.loads((Path(auto["run_dir"]) / "config.json").read_text())
    assert config["config"]["lr"] == "auto" and config["lr"] == suggested
    assert max(s["lr"] for s in read_metrics(auto["run_dir"])[0]) <= suggested


@pytest.mark.slow
def test_merge_trains_the_merged_classes_as_one(ingested, tmp_path):
    from sklearn.metrics import confusion_matrix
    run = train.train(tiny(ingested, tmp_path, "merged", epochs=1, merge=("People+Celebrities",)))
    run_dir = Path(run["run_dir"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == ["Abstract", "People+Celebrities", "Food", "Landscapes", "Travel"]
    saved = np.load(run_dir / "test_predictions.npz")
    original = [int(line.split(",")[1]) for line in (Path(ingested) / "test.csv").read_text().splitlines()[1:]]
    remap = [0, 1, 2, 3, 1, 4]  # Abstract, Celebrities, Food, Landscapes, People, Travel
    assert saved["y_true"].tolist() == [remap[y] for y in original]
    assert confusion_matrix(saved["y_true"], saved["y_pred"], labels=range(5)).shape == (5, 5)
    assert saved["y_pred"].max() < 5
    assert "| People+Celebrities |" in per_class_markdown(saved["y_true"], saved["y_pred"], config["classes"])
    with pytest.raises(UsageError, match="join two or more"):
        merge_classes(["A", "B"], ["A+C"])
    with pytest.raises(UsageError, match="in two merges"):
        merge_classes(["A", "B", "C"], ["A+B", "B+C"])
    with pytest.raises(UsageError, match="fewer than 2"):
        merge_classes(["A", "B"], ["A+B"])


@pytest.mark.slow
def test_pretrained_takes_a_fastpix_checkpoint_of_another_class_count(ingested, tmp_path, learned):
    from ingest.build import build
    from ingest.config import IngestConfig
    from ingest.demo import DemoConfig, generate
    src, other = tmp_path / "src3", tmp_path / "three"
    generate(src, DemoConfig(per_class=10, seed=1, long_side=(80, 120), classes=("Cats", "Dogs", "Owls"),
                             junk=False), workers=1, progress=False)
    build(IngestConfig(src=src, out=other, store_size=48, shard_size=32, workers=1), progress=False,
          log=lambda *_: None)
    start = Path(learned["run_dir"]) / "last.pt"  # resnet18 on the 6-class tiny set
    tuned = train.train(tiny(other, tmp_path, "tuned", epochs=1, lr=0.0, batch_size=8, pretrained=str(start)))
    before, after = weights(learned["run_dir"]), weights(tuned["run_dir"])
    assert after["fc.weight"].shape == (3, 512) and before["fc.weight"].shape == (6, 512)
    assert all(torch.equal(before[k], after[k]) for k in after if k.endswith("weight") and not k.startswith("fc."))
    with pytest.raises(UsageError, match="holds a resnet18 run: fine-tune it with --net resnet18"):
        train.train(tiny(other, tmp_path, "wrong-net", net="flat", res=64, pretrained=str(start)))
