"""The AlexNet family with a small head, for tests that train or build those nets without examining the head.

flat's 4,096-wide head is 73.4M of its 75.0M parameters (narrow's, 35.7M of 36.6M): each build spent seconds in
kaiming init, each step in the head's backward and update, and each checkpoint (weights + momentum: ~600 MB for
flat, ~290 MB for narrow) in writing, hashing and copying. With a head of FC the conv layers are the net's own, so
feature-map sizes, grid tables, filters and per-layer gradient norms read the same. flat's own shapes are pinned in
test_nets.py and its layer tables in test_report_run.py, which keep flat's own head.

`small_heads(*names)` shrinks their heads in this process and, through PYTHONPATH, in every process started under
it (small_heads_site/sitecustomize.py shrinks them there when nets.alexnet is imported): the demo, the bench's
cells and the concurrency matrix's study pair train flat in processes of their own.
"""
import contextlib
import os
from dataclasses import replace
from pathlib import Path

FC = 64  # still far wider than the 6 classes it separates; flat then has 2.4M parameters, a ~19 MB checkpoint
SITE = Path(__file__).resolve().parent / "small_heads_site"
NAMES = "FASTPIX_TESTS_SMALL_HEADS"  # the nets whose heads a child shrinks, comma-separated


def shrink(layouts, names):
    for name in names:
        layouts[name] = replace(layouts[name], fc=FC)


@contextlib.contextmanager
def small_heads(*names):
    from nets import alexnet
    saved_layouts, saved_env = dict(alexnet.LAYOUTS), {k: os.environ.get(k) for k in ("PYTHONPATH", NAMES)}
    shrink(alexnet.LAYOUTS, names)
    path = saved_env["PYTHONPATH"]
    os.environ.update({NAMES: ",".join(names), "PYTHONPATH": os.pathsep.join(
        [str(SITE), str(SITE.parent), *([path] if path else [])])})
    try:
        yield
    finally:
        alexnet.LAYOUTS.update(saved_layouts)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
