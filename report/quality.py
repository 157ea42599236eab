"""Predictions and data quality from a run's test predictions: per-class precision/recall/F1 (per_class.md),
the most confused class pairs, and the likely mislabelled photos (suspects.csv: wrong with the highest
confidence, with the source path a person can open)."""
import csv
import io
from pathlib import Path

import numpy as np

from files import write_text
from ingest import layout


def confused_pairs(y_true, y_pred, num_classes, top=5):
    """[(a, b, count)] of the class pairs mixed up most, either way round (a < b), most first."""
    from sklearn.metrics import confusion_matrix
    cm = confusion_matrix(y_true, y_pred, labels=range(num_classes))
    both = np.triu(cm + cm.T, k=1)
    order = np.argsort(both, axis=None)[::-1][:top]
    return [(int(a), int(b), int(both[a, b])) for a, b in zip(*np.unravel_index(order, both.shape)) if both[a, b]]


def per_class_markdown(y_true, y_pred, classes, top=5):
    """per_class.md: scikit-learn's classification_report as a table, then the most confused pairs."""
    from sklearn.metrics import classification_report
    report = classification_report(y_true, y_pred, labels=range(len(classes)), target_names=classes,
                                   output_dict=True, zero_division=0)
    lines = ["# Per class (test split)", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name in list(classes) + ["macro avg", "weighted avg"]:
        r = report[name]
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | {int(r['support'])} |")
    lines += ["", f"Accuracy {report['accuracy']:.3f} over {len(y_true)} test images.", "",
              "## Most confused pairs", "", "| class A | class B | A as B | B as A | both |", "|---|---|---|---|---|"]
    for a, b, count in confused_pairs(y_true, y_pred, len(classes), top):
        a_as_b = int(((y_true == a) & (y_pred == b)).sum())
        lines.append(f"| {classes[a]} | {classes[b]} | {a_as_b} | {count - a_as_b} | {count} |")
    return "\n".join(lines) + "\n"


def write_suspects(path, data_dir, y_true, y_pred, confidence, classes, top=50):
    """suspects.csv: the test photos predicted wrong with the highest confidence, most confident first; `path`
    is the photo in the source folder (manifest `source`), sample id its row in test.csv."""
    manifest = layout.read_manifest(data_dir)
    with open(layout.csv_path(data_dir, "test"), newline="") as f:
        sources = [row["path"] for row in csv.DictReader(f)]
    wrong = np.flatnonzero(y_true != y_pred)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:top]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "path", "label", "predicted", "confidence"])
    for i in wrong:
        writer.writerow([int(i), str(Path(manifest["source"]) / sources[i]), classes[y_true[i]], classes[y_pred[i]],
                         f"{confidence[i]:.4f}"])
    write_text(path, out.getvalue())
    return len(wrong)
