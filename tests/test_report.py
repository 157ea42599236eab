"""report/: the test metrics with their intervals, and the rolling statistics of the loss curves."""
import numpy as np
import pytest

from report.metrics import classification_metrics, rolling


def test_metrics_match_scikit_learn_and_bracket_their_estimate():
    from sklearn.metrics import precision_score
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    m = classification_metrics(y_true, y_pred, 5, resamples=500)
    assert m["acc"] == pytest.approx((y_true == y_pred).mean())
    assert m["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro"))
    assert m["acc_ci"][0] < m["acc"] < m["acc_ci"][1] and m["acc_ci"][1] - m["acc_ci"][0] < 0.15
    assert m["macro_precision_ci"][0] < m["macro_precision"] < m["macro_precision_ci"][1]
    assert classification_metrics(y_true, y_true, 5)["acc_ci"] == (1.0, 1.0)
    never = np.where(y_pred == 3, 0, y_pred)  # class 3 never predicted, class 5 in no sample: both count 0
    assert classification_metrics(y_true, never, 6)["macro_precision"] == pytest.approx(
        precision_score(y_true, never, labels=range(6), average="macro", zero_division=0))


def test_the_test_metrics_import_no_scikit_learn():
    """Every training process computes them after each epoch: importing scikit-learn (and scipy) cost each one
    1-2 s here (9 s under load), as much as a tiny run's training."""
    import subprocess
    import sys
    check = ("import sys; from report.metrics import classification_metrics; "
             "classification_metrics([0, 1, 1], [0, 1, 0], 2, resamples=10); "
             "assert not {'sklearn', 'scipy'} & set(sys.modules), sorted(m for m in sys.modules if 'sk' in m)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rolling_is_trailing_and_starts_at_the_first_value():
    mean, std = rolling([1, 3, 5, 7], 2)
    assert mean.tolist() == [1, 2, 4, 6] and std.tolist() == [0, 1, 1, 1]
