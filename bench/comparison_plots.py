"""The pictures that compare runs, which people would rather look at than read: throughput bars annotated with
accuracy, the study's rolling loss curves, accuracy per epoch and per setting; saved by report.plots.save (Agg
backend). A single run's pictures are report/plots.py's.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from report.metrics import rolling  # noqa: E402
from report.plots import save  # noqa: E402

ROLLING_WINDOW = 50  # the study smoothed per-iteration loss over 50 iterations


def throughput_bars(rows, path, title):
    """End-to-end and loader-only images/s per cell, one panel each (their scales differ by orders of
    magnitude on a CPU), annotated with accuracy and the ratio to the baseline, so speed is never read
    without the accuracy it bought."""
    labels = [r["cell"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.7 * len(rows) + 1.8), sharey=True)
    panels = (("images_per_sec", "ratio_to_baseline", "end-to-end training images / s"),
              ("loader_images_per_sec", "loader_ratio_to_baseline", "loader-only images / s"))
    for ax, (key, ratio_key, xlabel), colour in zip(axes, panels, ("C0", "C1")):
        values = [r.get(key) or 0 for r in rows]
        ax.barh(y, values, 0.6, color=colour)
        right = max(values + [1])
        for i, r in enumerate(rows):
            if r.get("error"):
                note = f"failed: {r['error'][:50]}"
            else:
                ratio = r.get(ratio_key)
                note = f"{ratio:.2f}× baseline" if ratio else ""
                if key == "images_per_sec" and r.get("test_acc") is not None:
                    note = f"acc {r['test_acc']:.3f}   " + note
            ax.text(values[i] + right * 0.02, i, note, va="center", fontsize=8)
        ax.set_xlim(0, right * 1.6)
        ax.set_xlabel(xlabel)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def loss_curves(series, path, title, window=ROLLING_WINDOW):
    """series: {name: (iterations, losses)}. Rolling mean and rolling std, one panel each, as in the study;
    the rolling window is the per-run loss.png's, so these curves match it."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, (x, losses) in series.items():
        mean, std = rolling(losses, window)
        top.plot(x, mean, label=name)
        bottom.plot(x, std, label=name)
    top.set_ylabel(f"loss, rolling mean ({window} it)")
    bottom.set_ylabel(f"loss, rolling std ({window} it)")
    bottom.set_xlabel("iteration")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8)
    save(fig, path)


def accuracy_curves(series, path, title):
    """series: {name: {"train": [...], "test": [...]}} per epoch; test solid, train dashed in the same colour."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, acc) in enumerate(series.items()):
        colour = f"C{i}"
        for split, style in (("train", "--"), ("test", "-")):
            values = [v for v in acc.get(split, []) if v is not None]
            if values:
                ax.plot(range(1, len(values) + 1), values, style, color=colour, marker="o", ms=3,
                        label=f"{name} {split}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    save(fig, path)


def accuracy_panels(series, path, title):
    """series: {name: {"train": [...], "test": [...]}} per epoch: train accuracy in one panel, test in the other,
    same colour per setting, so the gap between them (overfitting) reads across the panels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("train", "test")):
        for i, (name, acc) in enumerate(series.items()):
            values = [v for v in acc.get(split, []) if v is not None]
            ax.plot(range(1, len(values) + 1), values, "o-", color=f"C{i}", ms=3, label=name)
        ax.set(xlabel="epoch", title=f"{split} accuracy")
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def setting_bars(rows, path, title):
    """rows: [{"setting", "test_acc", "test_acc_ci", "images_per_sec"}]: accuracy with its interval and speed
    per setting, side by side, for the stride and filter-size grids."""
    labels = [r["setting"] for r in rows]
    acc = np.array([r.get("test_acc") or 0 for r in rows])
    lo = np.array([(r.get("test_acc_ci") or (a, a))[0] for r, a in zip(rows, acc)])
    hi = np.array([(r.get("test_acc_ci") or (a, a))[1] for r, a in zip(rows, acc)])
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(x, acc, yerr=[np.clip(acc - lo, 0, None), np.clip(hi - acc, 0, None)], capsize=3)
    left.set_ylabel("test accuracy (95 % interval)")
    right.bar(x, [r.get("images_per_sec") or 0 for r in rows], color="C1")
    right.set_ylabel("training images / s")
    for ax in (left, right):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
