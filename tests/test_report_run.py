"""python -m report on a tiny run: each artifact exists and holds what it claims, and a run folder that is
missing, damaged, not the checkpoint's or still being written is one line and exit 2."""
import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import nets
import train
from files import one_writer
from report.__main__ import main as report_main
from report.layers import formula_size, layer_table, layers_markdown
from report.runlog import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG"
RUN_FILES = (".fastpix-run", "config.json", "last.pt", "lr_find.json", "metrics.jsonl", "test_predictions.npz")
DRAWN = ("loss.png", "grad_norms.png", "accuracy.png", "lr_find.png", "confusion.png", "per_class.md", "suspects.csv",
         "layers.md", "filters.png", "samples.png", "feature_maps.png", "predictions.png")


@pytest.fixture(scope="module", autouse=True)
def small_narrow_head():
    """The run below is the narrow net's with a small head (tests/small_heads.py): a ~10 MB checkpoint to copy for
    each damage, not ~290 MB. flat's layer tables below keep flat's own head."""
    from small_heads import small_heads
    with small_heads("narrow"):
        yield


@pytest.fixture(scope="module")
def trained(ingested, tmp_path_factory):
    """The run as train() leaves it (with an LR range test, so that lr_find.png is drawn too), kept pristine:
    tests that damage it work on copies."""
    cfg = train.Config(net="narrow", loader="torch", data=str(ingested), res=64, batch_size=16, epochs=1, lr=0.01,
                       amp="off", runs_dir=str(tmp_path_factory.mktemp("runs")), name="art", workers=0,
                       bootstrap=50, log_every=2, find_lr=True, find_lr_steps=5)
    return Path(train.train(cfg)["run_dir"])


@pytest.fixture(scope="module")
def run_dir(trained, tmp_path_factory):
    """The run drawn once by python -m report."""
    drawn = tmp_path_factory.mktemp("drawn") / "art"
    shutil.copytree(trained, drawn)
    code, out, err = call(["--device", "cpu", "--quiet", str(drawn)])
    assert code == 0 and out.strip() == f"report: {len(DRAWN)} files in {drawn}", err
    assert sorted(p.name for p in drawn.iterdir()) == sorted(RUN_FILES + DRAWN)
    return drawn


def call(argv):
    """python -m report as its user meets it (cli.run), in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        cli.run(report_main, argv)
    return stop.value.code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_every_artifact_is_written(run_dir):
    for name in DRAWN:
        assert (run_dir / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (run_dir / name).read_bytes()[:4] == PNG, name


def refusal(argv):
    code, out, err = call(argv)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.slow
def test_a_missing_or_damaged_run_is_one_line_and_exit_2(trained, ingested, tmp_path):
    assert "no run there" in refusal([str(tmp_path / "nowhere")])
    assert not (tmp_path / "nowhere").exists()  # nothing made where no run was
    assert "no run there" in refusal([str(ingested)])  # a folder that is not a run
    for i, (name, damage, says) in enumerate([
            ("test_predictions.npz", lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged or not this run's"),
            ("metrics.jsonl", lambda p: p.write_text(p.read_text() + p.read_text().splitlines()[0] + "\n"),
             "is not the log of"),
            ("last.pt", lambda p: p.unlink(), "no last.pt there"),
            ("config.json", lambda p: p.write_text("{}"), "config.json is damaged"),
            ("config.json", lambda p: p.write_text(p.read_text().replace('"seed": 0', '"seed": 1')),
             "config.json does not match last.pt (seed is 1 in config.json, 0 in last.pt)"),
            ("test_predictions.npz", lambda p: p.unlink(), "test_predictions.npz is missing (epoch 1 wrote it)")]):
        run = tmp_path / f"{i}-{name}"
        shutil.copytree(trained, run)
        damage(run / name)
        line = refusal(["--quiet", str(run)])
        assert says in line and name in line, line


@pytest.mark.slow
def test_a_full_disk_is_one_line_that_says_the_run_is_intact(trained, tmp_path, monkeypatch):
    import report.render
    monkeypatch.setattr(report.render, "plot_run", lambda run_dir: enospc())
    run = tmp_path / "full"
    shutil.copytree(trained, run)
    line = refusal(["--quiet", str(run)])
    assert f"disk full writing the report of {run}" in line and "the run itself is intact" in line


def enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_run_being_written_is_named_and_left_alone(trained, tmp_path):
    run = tmp_path / "busy"
    shutil.copytree(trained, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with one_writer(run):
        line = refusal(["--quiet", str(run)])
    assert "is being written by" in line and str(run) in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


@pytest.mark.slow
def test_grad_norms_are_logged_per_layer_with_every_loss_read(run_dir):
    steps, _ = read_metrics(run_dir)
    logged = [s for s in steps if "grad_norms" in s]
    # One per window of --log-every 2 (the epoch's 4 steps), on the window's last step.
    assert [s["step"] for s in logged] == [1, 3]
    names = list(logged[0]["grad_norms"])
    assert names == ["features.0", "features.3", "features.6", "features.8", "features.10",
                     "classifier.1", "classifier.4", "classifier.6"]
    assert all(v > 0 and np.isfinite(v) for s in logged for v in s["grad_norms"].values())


@pytest.mark.slow
def test_per_class_and_suspects_agree_with_the_test_predictions(run_dir, ingested):
    saved = np.load(run_dir / "test_predictions.npz")
    y_true, y_pred, conf = saved["y_true"], saved["y_pred"], saved["confidence"]
    assert ((conf > 0) & (conf <= 1)).all()
    classes = json.loads((run_dir / "config.json").read_text())["classes"]
    text = (run_dir / "per_class.md").read_text()
    for c, name in enumerate(classes):
        support = int(re.search(rf"^\| {name} \|.*\| (\d+) \|$", text, re.M).group(1))
        assert support == (y_true == c).sum()
    assert "## Most confused pairs" in text
    rows = list(csv.DictReader(open(run_dir / "suspects.csv")))
    wrong = (y_true != y_pred).sum()
    assert len(rows) == min(wrong, 50) and wrong > 0
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    assert confidences[0] == pytest.approx(conf[y_true != y_pred].max(), abs=1e-4)
    source = Path(json.loads((Path(ingested) / "manifest.json").read_text())["source"])
    test_csv = list(csv.DictReader(open(Path(ingested) / "test.csv")))
    for r in rows:
        i = int(r["id"])
        assert Path(r["path"]) == source / test_csv[i]["path"] and Path(r["path"]).is_file()
        assert r["label"] == classes[y_true[i]] == classes[int(test_csv[i]["label"])]
        assert r["predicted"] == classes[y_pred[i]] != r["label"]


def sizes_by_forward(model, res):
    """Spatial side after every conv and pool layer, by running model.features one module at a time."""
    x, sides = torch.zeros(1, 3, res, res), []
    with torch.no_grad():
        for module in model.features:
            x = module(x)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
                sides.append(x.shape[-1])
    return sides


@pytest.mark.parametrize("strides,kernels,res", [
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [(None, None, 224), ((2, 1, 1), (7, 5, 3), 96),
                                                               ((6, 2, 1), (15, 3, 3), 224)]),
    ((1, 1, 1), (3, 3, 3), 40)])
def test_layers_md_output_sizes_equal_a_real_forward(strides, kernels, res):
    model = nets.build("flat", 5, strides=strides, kernels=kernels)
    text = layers_markdown(layer_table(model, res), "flat")
    table = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| features.")]
    formula = [int(cells[7]) for cells in table]
    assert formula == sizes_by_forward(model, res)
    assert [int(cells[6].split(" x ")[-1]) for cells in table] == formula
    assert "equals the real forward" in text


def test_layer_table_counts_parameters_and_macs():
    model = nets.build("flat", 5)
    rows = layer_table(model, 224)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    first = rows[0]
    assert (first["kernel"], first["stride"], first["padding"], first["output"]) == (11, 4, 3, (96, 55, 55))
    assert first["macs"] == 96 * 55 * 55 * 3 * 11 * 11
    assert formula_size(224, 11, 4, 3) == 55
