"""Exact duplicates, by the source bytes' hash: the same photo in two classes has no true label, and a copy
within a class would leak between train and test, so only the first of a class's copies is kept."""
from collections import defaultdict


def dedup(checked, classes):
    """Accepted Checked results -> (kept, [(relative path, reason)]); `checked` in any order."""
    by_hash = defaultdict(list)
    for c in checked:
        by_hash[c.sha256].append(c)
    kept, dropped = [], []
    for copies in by_hash.values():
        copies.sort(key=lambda c: c.rel)
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            names = ", ".join(classes[i] for i in labels)
            dropped += [(c.rel, f"ambiguous: the same content is in classes {names}") for c in copies]
        else:
            kept.append(copies[0])
            dropped += [(c.rel, f"duplicate of {copies[0].rel}") for c in copies[1:]]
    return kept, dropped
