"""What a run leaves when it ends (rank 0): the plots, per-class quality, pictures of what the net learnt,
all from the run folder's files, so that --resume of a finished run redraws them; and the summary that
callers (bench, the study) compare runs by."""
import resource
import statistics

import numpy as np
import torch

from files import write_json, write_text
from report.images import plot_feature_maps, plot_filters, plot_predictions, plot_samples
from report.layers import layer_table, layers_markdown
from report.plots import plot_confusion, plot_run
from report.quality import per_class_markdown, write_suspects
from training.evaluate import test_examples
from training.runfolder import RUN_MARKER


def finish(run):
    """The marker (finished or stopped), the plots and the reports, from the files alone, on rank 0."""
    if not run.writer:
        return
    with run.writing("the plots and reports"):
        write_json(run.dir / RUN_MARKER, {"finished": run.stopped is None})
        plot_run(run.dir)
        if (run.dir / "test_predictions.npz").is_file():
            last = np.load(run.dir / "test_predictions.npz")
            y_true, y_pred, confidence = last["y_true"], last["y_pred"], last["confidence"]
            plot_confusion(y_true, y_pred, run.classes, run.dir / "confusion.png")
            write_text(run.dir / "per_class.md", per_class_markdown(y_true, y_pred, run.classes))
            write_suspects(run.dir / "suspects.csv", run.test_loader.block.data_dir, y_true, y_pred, confidence, run.classes)
        write_pictures(run)


def write_pictures(run):
    """What the net learnt and how it sees (report/): layers.md, filters.png, samples.png (the first train
    batch of epoch 0 as the model receives it), feature_maps.png and predictions.png (first test batches)."""
    cfg, model = run.cfg, run.tested_model()
    title = f"{cfg.net}, {len(run.classes)} classes, {cfg.res}px input"
    write_text(run.dir / "layers.md", layers_markdown(layer_table(model, cfg.res), title))
    plot_filters(model, run.dir / "filters.png")
    run.train_loader.set_epoch(0)
    images, labels = next(iter(run.train_loader))
    plot_samples(images, run.relabel(labels), run.classes, run.dir / "samples.png")
    images, y_true, y_pred, confidence = test_examples(model, run.test_loader, run.autocast, run.relabel)
    plot_feature_maps(model, images[0].to(run.device), run.dir / "feature_maps.png")
    plot_predictions(images, y_true, y_pred, confidence, run.classes, run.dir / "predictions.png")


def summarize(run):
    """The figures a caller (bench, the study) compares runs by."""
    whole = [r for r in run.history if not r["partial"]]
    timed = whole[1:] or whole or run.history  # a process's first epoch pays start-up (compile, caches)
    last = run.history[-1] if run.history else {}
    median = lambda key: statistics.median(r[key] for r in timed) if timed else None  # noqa: E731
    return {
        "run_dir": str(run.dir), "epochs": run.epoch, "stopped": run.stopped, "amp": run.amp,
        "device": str(run.device), "images_per_sec": median("images_per_sec"),
        "data_stall_fraction": median("data_stall_fraction"), "train_acc": last.get("train_acc"),
        "test_acc": last.get("test_acc"), "test_acc_ci": last.get("test_acc_ci"),
        "macro_precision": last.get("macro_precision"), "macro_precision_ci": last.get("macro_precision_ci"),
        "final_loss": last.get("train_loss"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if run.device.type == "cuda" else None,
    }
