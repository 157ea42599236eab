"""--merge: class groups trained as one, by a label map the run applies on the device (no re-ingest)."""
from cli import UsageError


def merge_classes(classes, merges):
    """--merge "A+B": (class names after merging, new label of every old label). A merged class takes the place
    of its first member and is named by its members joined with '+', as given."""
    group = {}
    for spec in merges:
        members = spec.split("+")
        unknown = [m for m in members if m not in classes]
        if len(members) < 2 or unknown:
            raise UsageError(f"--merge {spec!r}: join two or more of these classes with '+': {', '.join(classes)}")
        for m in members:
            if m in group:
                raise UsageError(f"--merge: {m} is in two merges ({group[m]} and {spec})")
            group[m] = spec
    names = list(dict.fromkeys(group.get(c, c) for c in classes))
    if len(names) < 2:
        raise UsageError("--merge leaves fewer than 2 classes: nothing to classify")
    return names, [names.index(group.get(c, c)) for c in classes]
