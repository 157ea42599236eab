"""A run folder's pictures and tables, drawn from its files alone (`python -m report RUN_DIR`): train.py writes
the run (config.json, metrics.jsonl, last.pt, test_predictions.npz), this reads it, so a run is drawn again at
any time, by any process, and training pays nothing for pictures nobody looks at (they took 81 % of a tiny run).

What it draws (all beside the run's files): loss.png, accuracy.png, grad_norms.png, lr_find.png (with
--find-lr), confusion.png, per_class.md, suspects.csv, layers.md, filters.png, samples.png, feature_maps.png and
predictions.png. The model is the one the test metrics describe (predicting.tested: the EMA's with --recipe
fast), rebuilt from last.pt and config.json; the loaders are rebuilt from config.json (its data, loader, res,
batch, augment, seed and rank 0's share), so samples.png is rank 0's first train batch of epoch 0 as the model
received it. Every file it reads is checked first: a damaged or foreign one is one line naming it."""
import contextlib
import csv
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from cli import UsageError
from files import checksum_of, one_writer, write_text
from ingest import layout
from loaders import make_loader
from loaders.common import resolve_device
from predicting.tested import load_run
from report.images import plot_feature_maps, plot_filters, plot_predictions, plot_samples
from report.layers import layer_table, layers_markdown
from report.plots import plot_confusion, plot_lr_find, plot_run
from report.quality import per_class_markdown, write_suspects
from report.runlog import METRICS, metrics_digest, read_metrics
from training.evaluate import test_examples
from training.labels import merge_classes
from training.recipe import train_res
from training.runfolder import CHECKPOINT, RUN_MARKER, read_marker

PREDICTIONS = "test_predictions.npz"
STAGES = 5  # curves, predictions, layers and filters, samples, feature maps and predictions.png


def render(run_dir, data="", device="auto", progress=True):
    """Draw every picture and table of the run in `run_dir`, holding the folder (a run still training there is
    named and refused); `data`: the run's dataset where it moved. Returns the names written. A missing or damaged
    file is one UsageError line."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / RUN_MARKER).is_file():
        raise UsageError(f"{run_dir}: no run there (train.py leaves config.json and {RUN_MARKER} in a run folder)")
    read_marker(run_dir)
    device = resolve_device(device)
    with one_writer(run_dir), full_disk_is_one_line(run_dir):
        return draw(run_dir, data, device, progress)


def draw(run_dir, data, device, progress):
    tested = load_run(run_dir, data=data, device=device, flag="")  # last.pt checked against config.json, the data
    cfg = SimpleNamespace(**tested.saved["config"])
    epochs = check_metrics(run_dir, tested.metrics_sha256)
    classes, written = tested.classes, []
    label_map = torch.tensor(merge_classes(tested.data_classes, cfg.merge)[1])
    relabel = lambda labels: label_map.to(labels.device)[labels]  # noqa: E731
    bar = tqdm(total=STAGES, desc=f"report {run_dir.name}", leave=False, disable=not progress)

    def stage(name):
        bar.set_postfix_str(name)
        bar.update()

    plot_run(run_dir)
    written += [name for name in ("loss.png", "grad_norms.png", "accuracy.png") if (run_dir / name).is_file()]
    if (run_dir / "lr_find.json").is_file():
        sweep = read_sweep(run_dir / "lr_find.json", tested.saved.get("lr_find_sha256"))
        plot_lr_find(sweep["lr"], sweep["loss"], sweep["smoothed"], sweep["suggested_lr"], run_dir / "lr_find.png")
        written.append("lr_find.png")
    stage("curves")

    if epochs:  # a run stopped before its first test pass has none
        y_true, y_pred, confidence = read_predictions(run_dir, tested.data, label_map.numpy(), epochs[-1])
        plot_confusion(y_true, y_pred, classes, run_dir / "confusion.png")
        write_text(run_dir / "per_class.md", per_class_markdown(y_true, y_pred, classes))
        write_suspects(run_dir / "suspects.csv", tested.data, y_true, y_pred, confidence, classes)
        written += ["confusion.png", "per_class.md", "suspects.csv"]
    stage("predictions")

    model = tested.model.net  # the tested weights without flip TTA: one image through each layer
    title = f"{cfg.net}, {len(classes)} classes, {cfg.res}px input"
    write_text(run_dir / "layers.md", layers_markdown(layer_table(model, cfg.res), title))
    plot_filters(model, run_dir / "filters.png")
    stage("layers and filters")

    loader_args = dict(batch_size=cfg.batch_size, res=cfg.res, device=str(device), seed=cfg.seed, rank=0,
                       world=tested.saved.get("world", 1), workers=cfg.workers, augment=cfg.augment,
                       cache_dir=cfg.cache_dir or None)
    train_loader = make_loader(cfg.loader, tested.data, "train", **loader_args)
    if cfg.pieces:
        train_loader.set_res(train_res(cfg, 0))
    train_loader.set_epoch(0)
    images, labels = next(iter(train_loader))
    plot_samples(images, relabel(labels), classes, run_dir / "samples.png")
    del train_loader, images
    stage("samples")

    test_loader = make_loader(cfg.loader, tested.data, "test", **loader_args)
    images, y_true, y_pred, confidence = test_examples(model, test_loader, lambda: tested.autocast(device), relabel)
    plot_feature_maps(model, images[0].to(device), run_dir / "feature_maps.png")
    plot_predictions(images, y_true, y_pred, confidence, classes, run_dir / "predictions.png")
    stage("feature maps and predictions")
    bar.close()
    return written + ["layers.md", "filters.png", "samples.png", "feature_maps.png", "predictions.png"]


def check_metrics(run_dir, digest):
    """The epoch records of metrics.jsonl, whole and, where last.pt recorded its digest, the log of that
    checkpoint: a log from another run, or one with steps the checkpoint never saw (a run killed between the
    two), would draw other curves."""
    epochs = read_metrics(run_dir)[1]
    if digest is not None and metrics_digest(run_dir) != digest:
        raise UsageError(f"{run_dir / METRICS} is not the log of {run_dir / CHECKPOINT} (steps are missing or "
                         f"added, or it is another run's): put back the run's own file, or python train.py "
                         f"--resume {run_dir} to cut it back to the checkpoint")
    return epochs


def read_sweep(path, recorded):
    """lr_find.json as train.py wrote it for this run, or one line: `recorded` is the checksum config.json keeps of
    it (files.checksum_of), which another run's sweep does not match either (None: a run from before it was kept,
    whose file is checked by its shape alone)."""
    try:
        sweep = json.loads(path.read_text())
        if all(isinstance(sweep[key], list) for key in ("lr", "loss", "smoothed")) and \
                float(sweep["suggested_lr"]) > 0 and recorded in (None, checksum_of(sweep)):
            return sweep
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise UsageError(f"{path} is damaged or another run's: put back the run's own file, or delete it (lr_find.png "
                     "is then not drawn)")


def read_predictions(run_dir, data, label_map, last):
    """(labels, predictions, confidences) of test_predictions.npz, checked against the test split it describes
    and the last epoch's record (`last`): one row per test sample in id order, whose labels are test.csv's (after
    --merge), predictions of a class scoring the record's test accuracy, confidences in (0, 1]; else one line."""
    path = run_dir / PREDICTIONS
    if not path.is_file():
        raise UsageError(f"{path} is missing (epoch {last['epoch'] + 1} wrote it): put back the run's own file")
    with open(layout.csv_path(data, "test"), newline="") as f:
        labels = label_map[[int(row["label"]) for row in csv.DictReader(f)]]
    try:
        with np.load(path) as saved:
            y_true, y_pred, confidence = saved["y_true"], saved["y_pred"], saved["confidence"]
        fits = (y_true.shape == y_pred.shape == confidence.shape == labels.shape and (y_true == labels).all()
                and ((y_pred >= 0) & (y_pred <= label_map.max())).all() and ((confidence > 0) & (confidence <= 1)).all()
                and abs((y_true == y_pred).mean() - last["test_acc"]) < 1e-9)
    except Exception:  # any unreadable file is the same damage
        fits = False
    if not fits:
        raise UsageError(f"{path} is damaged or not this run's (it must hold one prediction per test sample of "
                         f"{data}, scoring the last epoch's test accuracy): put back the run's own file")
    return y_true, y_pred, confidence


@contextlib.contextmanager
def full_disk_is_one_line(run_dir):
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UsageError(f"disk full writing the report of {run_dir}: free some space, then python -m report "
                         f"{run_dir} (the run itself is intact)") from None
