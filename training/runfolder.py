"""A run's folder and the files in it: which files a run writes (RUN_FILES), making and deleting run folders
(only ever train.py's own), the checkpoint written atomically and read with one line on damage, a full disk
as one line that says what was kept, and the checks that resumed or transferred weights meet the data they
were trained on."""
import contextlib
import errno
import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch

from cli import UsageError
from files import atomic_path, temp_of

CHECKPOINT = "last.pt"
RUN_MARKER = ".fastpix-run"  # {"finished": bool}: train.py made this folder, the only kind it writes into
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "test_predictions.npz", "loss.png", "accuracy.png",
             "confusion.png", "grad_norms.png", "lr_find.json", "lr_find.png", "layers.md", "filters.png",
             "feature_maps.png", "samples.png", "predictions.png", "per_class.md", "suspects.csv",
             RUN_MARKER)  # everything a run writes (marker last); nothing else there is touched


def new_run_dir(cfg):
    """The folder of a new run: missing, empty, or a restartable run; a folder train.py did not make is
    never written into."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise UsageError(f"{run_dir} is not empty and was not made by train.py: pick another --name or --runs-dir")
        if not restartable(run_dir):
            raise UsageError(f"{run_dir} already holds a run: pick another --name, or --resume {run_dir}")
        print(f"{run_dir} stopped before its first checkpoint: starting it again from step 0", file=sys.stderr)
        remove_run(run_dir)
    elif run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file: pick another --name or --runs-dir")
    return run_dir


def restartable(run_dir):
    """A run train.py made that died before its first checkpoint: nothing in it is worth keeping, so it starts
    again from step 0, under the same --name or by --resume. (A finished run whose checkpoint was deleted, as
    the bench does, is not restartable: its metrics and plots are results.)"""
    marker = run_dir / RUN_MARKER
    return marker.is_file() and not (run_dir / CHECKPOINT).exists() and not json.loads(marker.read_text())["finished"]


def remove_run(run_dir):
    """Delete a run train.py made: its own files only, then the folder if nothing else is left in it. For
    callers (bench, the study) that replace a run of theirs with a new one of the same name."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_MARKER).is_file():
        raise UsageError(f"{run_dir} was not made by train.py: move it away, it will not be deleted")
    for path in own_temp_files(run_dir):
        path.unlink()
    for name in RUN_FILES:  # the marker last: a crash midway leaves a folder that is still a run of ours
        (run_dir / name).unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def own_temp_files(run_dir):
    """Temp files (files.atomic_path's) of this run's files that a killed write left behind."""
    return [p for p in Path(run_dir).iterdir() if temp_of(p.name) in RUN_FILES]


def config_from_resume(cfg):
    """The interrupted run's own config (so its schedule continues), with this call's max_steps and
    allow_other_data. A run that died before its first checkpoint starts again from step 0."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there, so no run to continue")
    if not (run_dir / CHECKPOINT).is_file() and not restartable(run_dir):
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT} there to continue from")
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    # The weights come from the checkpoint now, not from where the run first started.
    saved.update(resume=str(run_dir) if (run_dir / CHECKPOINT).is_file() else "", init_from="",
                 max_steps=cfg.max_steps, allow_other_data=cfg.allow_other_data, name=run_dir.name,
                 runs_dir=str(run_dir.parent))
    return type(cfg)(**{f.name: saved[f.name] for f in fields(cfg) if f.name in saved})


class KeepsWriteError:
    """A file for torch.save that remembers why a write failed: torch's zip writer turns a full disk into an
    opaque RuntimeError ("unexpected pos"), to a path or to a Python file alike (seen on a full tmpfs)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.file.flush()


def save_checkpoint(path, **state):
    """Atomically; a failed write raises its own OSError (ENOSPC on a full disk)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = KeepsWriteError(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def tensor_bytes(obj):
    """Bytes of every tensor in a (nested) state: a checkpoint's size on disk, to within its zip headers.
    fp32 weights plus SGD's momentum are 8 bytes per parameter: 600 MB for flat (75.1M parameters), 470 MB
    for alexnet, 90 MB for resnet18; Adam keeps two moments, 12 bytes per parameter (900 MB for flat)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def read_checkpoint(flag, path):
    """A checkpoint's contents, or one line saying it cannot be read (truncated, not a checkpoint at all)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user mistake
        raise UsageError(f"{flag} {path} is not a readable checkpoint ({type(err).__name__}): it is damaged or "
                         "not a fastpix checkpoint") from None


def load_weights(model, path, state):
    """--init-from: a fastpix checkpoint or a bare state dict of the same net and classes."""
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise UsageError(f"--init-from {path} does not fit this net and class count: {first}") from None


def check_same_data(flag, source, saved, manifest, cfg):
    """Weights continue on the data they were trained on: --resume and --init-from refuse a dataset with
    another fingerprint (ingest's hash of the source and its settings) unless --allow-other-data. The
    classes must match even then, or label i would silently change meaning."""
    theirs, ours = list(saved.get("classes") or []), manifest["classes"]
    if theirs and theirs != ours:
        if len(theirs) != len(ours):
            diff = f"{len(theirs)} classes, {cfg.data} has {len(ours)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            diff = f"label {i} is {theirs[i]!r}, in {cfg.data} it is {ours[i]!r}"
        raise UsageError(f"{flag} {source} was trained on other classes ({diff}): its classes must match the data's")
    saved_print, data_print = saved.get("data_fingerprint"), manifest["fingerprint"]
    if saved_print != data_print and not cfg.allow_other_data:
        raise UsageError(f"{flag} {source} was trained on dataset {(saved_print or 'unrecorded')[:12]}, but "
                         f"{cfg.data} is dataset {data_print[:12]}: use the data it was trained on, or pass "
                         "--allow-other-data")


def drop_torn_line(path):
    """A metrics line cut short by a kill or a full disk ends the file without its newline: cut it off, so that
    a resume reads only whole records."""
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with open(path, "r+b") as f:
            f.truncate(whole)


def megabytes(n):
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


@contextlib.contextmanager
def writing(run_dir, what, saved_step, need=None):
    """A full disk while writing `what` becomes one line: what, how much it needs, what is kept (the checkpoint
    of `saved_step`, if any) and how to go on. With `need` (bytes), the free space is checked first, so a 600 MB
    checkpoint is not written in vain. Any other OSError stays a traceback: it is not the user's to fix."""
    free = shutil.disk_usage(run_dir).free
    try:
        if need is not None and free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        needs = f"needs {megabytes(need)}, " if need is not None else ""
        if saved_step is not None:
            kept = (f"kept {run_dir / CHECKPOINT} (step {saved_step}) and the metrics; free some space, "
                    f"then: python train.py --resume {run_dir}")
        else:
            kept = f"no checkpoint yet; free some space, then rerun with --name {run_dir.name} (it starts again)"
        raise UsageError(f"disk full writing {what} in {run_dir} ({needs}{megabytes(free)} free): {kept}") from None
