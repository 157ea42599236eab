"""Numbers with their uncertainty: bootstrap intervals of the test metrics, rolling statistics of the loss."""
import numpy as np


def classification_metrics(y_true, y_pred, num_classes, *, resamples=1000, seed=0):
    """Accuracy and macro precision with percentile-bootstrap 95 % intervals, in numpy: every training process
    computes them after each epoch, and importing scikit-learn for them cost each process 1-2 s here (9 s at a
    load of 11); tests/test_report.py checks the figures against scikit-learn's.

    Macro precision averages over all num_classes classes, a class never predicted counting 0, both for
    the point estimate and for every resample, so the interval is about the same quantity."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    (acc,), (prec,) = scores(y_true, y_pred, np.arange(len(y_true))[None], num_classes)
    accs, precs = [], []
    for chunk in np.array_split(np.arange(resamples), max(1, resamples * len(y_true) // 2_000_000)):
        chunk_accs, chunk_precs = scores(y_true, y_pred, rng.integers(0, len(y_true), (len(chunk), len(y_true))),
                                         num_classes)
        accs.append(chunk_accs)
        precs.append(chunk_precs)
    ci = lambda values: tuple(float(v) for v in np.percentile(np.concatenate(values), [2.5, 97.5]))  # noqa: E731
    return {"acc": float(acc), "acc_ci": ci(accs), "macro_precision": float(prec), "macro_precision_ci": ci(precs)}


def scores(y_true, y_pred, idx, num_classes):
    """(accuracy, macro precision) of each row of sample indices `idx` (resamples x samples), in one bincount."""
    pred, hit = y_pred[idx], y_true[idx] == y_pred[idx]
    cell = (pred + num_classes * np.arange(len(idx))[:, None]).ravel()  # (resample, class) bins
    predicted = np.bincount(cell, minlength=len(idx) * num_classes).reshape(len(idx), num_classes)
    correct = np.bincount(cell, weights=hit.ravel(), minlength=predicted.size).reshape(predicted.shape)
    return hit.mean(axis=1), (correct / np.maximum(predicted, 1)).mean(axis=1)


def rolling(values, window):
    """Trailing rolling mean and std (shorter windows at the start), so the curve starts at step 0."""
    values = np.asarray(values, dtype=float)
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.nanmean(windows, axis=1), np.nanstd(windows, axis=1)
