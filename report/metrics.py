"""Numbers with their uncertainty: bootstrap intervals of the test metrics, rolling statistics of the loss."""
import numpy as np


def classification_metrics(y_true, y_pred, num_classes, *, resamples=1000, seed=0):
    """Accuracy and macro precision (scikit-learn) with percentile-bootstrap 95 % intervals (numpy).

    Macro precision averages over all num_classes classes, a class never predicted counting 0, both for
    the point estimate and for every resample, so the interval is about the same quantity."""
    from sklearn.metrics import accuracy_score, precision_score
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    acc = float(accuracy_score(y_true, y_pred))
    prec = float(precision_score(y_true, y_pred, labels=range(num_classes), average="macro", zero_division=0))
    rng = np.random.default_rng(seed)
    accs, precs = [], []
    for chunk in np.array_split(np.arange(resamples), max(1, resamples * len(y_true) // 2_000_000)):
        idx = rng.integers(0, len(y_true), (len(chunk), len(y_true)))
        pred, hit = y_pred[idx], y_true[idx] == y_pred[idx]
        cell = (pred + num_classes * np.arange(len(chunk))[:, None]).ravel()  # (resample, class) bins
        predicted = np.bincount(cell, minlength=len(chunk) * num_classes).reshape(len(chunk), num_classes)
        correct = np.bincount(cell, weights=hit.ravel(), minlength=predicted.size).reshape(predicted.shape)
        precs.append((correct / np.maximum(predicted, 1)).mean(axis=1))
        accs.append(hit.mean(axis=1))
    ci = lambda values: tuple(float(v) for v in np.percentile(np.concatenate(values), [2.5, 97.5]))  # noqa: E731
    return {"acc": acc, "acc_ci": ci(accs), "macro_precision": prec, "macro_precision_ci": ci(precs)}


def rolling(values, window):
    """Trailing rolling mean and std (shorter windows at the start), so the curve starts at step 0."""
    values = np.asarray(values, dtype=float)
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    return np.nanmean(windows, axis=1), np.nanstd(windows, axis=1)
