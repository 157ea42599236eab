"""The train/test split: stratified per class and decided by (seed, relative path) alone.

Within each class, files are ranked by a hash of seed and path and the first share go to test. So the
split does not depend on file system order, worker count or machine, each class gets its exact share
(at least one image on each side), and adding a photo moves at most one other across.
"""
import hashlib
from collections import defaultdict

from cli import UsageError


def _rank(seed, rel):
    return hashlib.sha256(f"{seed}:{rel}".encode()).digest()


def split(samples, classes, seed, test_share):
    """samples (with .rel and .label) -> {"train": [...], "test": [...]}, each sorted by (label, path): the
    position in that list is the sample id."""
    per_class = defaultdict(list)
    for s in samples:
        per_class[s.label].append(s)
    few = [classes[i] for i in range(len(classes)) if len(per_class[i]) < 2]
    if few:
        many = len(few) > 1
        raise UsageError(f"class{'es' if many else ''} {', '.join(few)} {'have' if many else 'has'} fewer than 2 "
                         "valid images: add photos or remove the folder")
    out = {"train": [], "test": []}
    for members in per_class.values():
        members.sort(key=lambda s: _rank(seed, s.rel))
        n_test = min(max(1, round(len(members) * test_share)), len(members) - 1)
        out["test"] += members[:n_test]
        out["train"] += members[n_test:]
    for part in out.values():
        part.sort(key=lambda s: (s.label, s.rel))
    return out
