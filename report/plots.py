"""Every PNG fastpix draws: per-run curves and confusion here, the comparisons of runs in
bench/comparison_plots.py; all saved by `save` (atomic, one dpi). Agg backend: no display needed."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from files import atomic_path  # noqa: E402
from report.metrics import rolling  # noqa: E402
from report.runlog import read_metrics  # noqa: E402

DPI = 110


def save(fig, path, tight=True):
    """Write the figure as a PNG atomically (a reader never sees half a file) and free it. `tight` crops it to what
    it draws, at the cost of drawing it twice: a figure that fills its canvas (a montage) goes without."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)


def plot_loss(steps, losses, path, window=50):
    """Loss per iteration with its rolling mean +- std over `window` iterations, as in the study."""
    mean, std = rolling(losses, window)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="0.75", lw=0.6, label="loss")
    ax.plot(steps, mean, color="C0", label=f"rolling mean ({window})")
    ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.25, label="+- std")
    ax.set(xlabel="iteration", ylabel="training loss")
    ax.legend()
    save(fig, path)


def plot_accuracy(epochs, path):
    """Train and test accuracy per epoch, the test one with its bootstrap 95 % interval."""
    x = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [e["train_acc"] for e in epochs], "o-", label="train")
    ax.plot(x, [e["test_acc"] for e in epochs], "o-", label="test")
    ax.fill_between(x, [e["test_acc_ci"][0] for e in epochs], [e["test_acc_ci"][1] for e in epochs],
                    color="C1", alpha=0.25, label="test 95 % CI")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax.legend()
    save(fig, path)


def plot_confusion(y_true, y_pred, classes, path):
    """Row-normalised confusion matrix with class names (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay
    size = 3 + 0.35 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=range(len(classes)), display_labels=classes,
                                            normalize="true", values_format=".2f", include_values=len(classes) <= 12,
                                            xticks_rotation="vertical", colorbar=True, ax=ax)
    save(fig, path)


def plot_grad_norms(steps, path):
    """Gradient norm of every conv and linear layer's weights over the iterations (log scale): which layers
    learn, and when; steps are the step records that carry `grad_norms`."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in steps[0]["grad_norms"]:
        ax.plot([s["step"] for s in steps], [s["grad_norms"][name] for s in steps], label=name, lw=1)
    ax.set(xlabel="iteration", ylabel="gradient norm (weights)", yscale="log")
    ax.legend(fontsize=6, ncol=2 if len(steps[0]["grad_norms"]) > 8 else 1)
    save(fig, path)


def plot_lr_find(lrs, losses, smoothed, suggested, path):
    """lr_find.png: the LR range test's loss against the LR (log scale), raw and smoothed, with the suggestion."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, color="0.75", lw=0.6, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed")
    ax.axvline(suggested, color="C3", ls="--", label=f"suggested lr {suggested:.2g}")
    finite = [v for v in smoothed if v == v and abs(v) != float("inf")]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss")
    ax.legend()
    save(fig, path)


def plot_run(run_dir):
    """(Re)draw loss.png, accuracy.png and grad_norms.png of a run from its metrics.jsonl."""
    steps, epochs = read_metrics(run_dir)
    if steps:
        plot_loss([s["step"] for s in steps], [s["loss"] for s in steps], Path(run_dir) / "loss.png")
    normed = [s for s in steps if s.get("grad_norms")]
    if normed:
        plot_grad_norms(normed, Path(run_dir) / "grad_norms.png")
    if epochs:
        plot_accuracy(epochs, Path(run_dir) / "accuracy.png")
