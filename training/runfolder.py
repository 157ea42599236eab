"""A run's folder and the files in it: which files a run writes (RUN_FILES), making and deleting run folders
(only ever train.py's own), the checkpoint written atomically and read with one line on damage, a full disk
as one line that says what was kept, and the checks that resumed or transferred weights meet the data they
were trained on."""
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import torch

from cli import UsageError
from digests import hash_tensor
from files import WRITER_NOTE, as_read_back, atomic_path, one_writer, temp_of
from ingest.layout import MANIFEST
from ingest.remote import is_url

CHECKPOINT = "last.pt"
RUN_MARKER = ".fastpix-run"  # {"finished": bool}: train.py made this folder, the only kind it writes into
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "test_predictions.npz", "loss.png", "accuracy.png",
             "confusion.png", "grad_norms.png", "lr_find.json", "lr_find.png", "layers.md", "filters.png",
             "feature_maps.png", "samples.png", "predictions.png", "per_class.md", "suspects.csv",
             RUN_MARKER)  # everything a run writes (marker last); nothing else there is touched


RESTART_FILES = ("config.json", "metrics.jsonl", "test_predictions.npz", "lr_find.json", "lr_find.png",
                 RUN_MARKER)  # what a run writes before its first checkpoint: all a restart may delete
RESUMED_ANEW = ("resume", "init_from", "max_steps", "allow_other_data", "name", "runs_dir", "data")  # the options
# a --resume sets itself (config_from_resume); every other one must be the run's own, in config.json and last.pt


def check_ours(run_dir):
    """A folder train.py may hold and write: missing, empty, or made by train.py (the marker); refused in one
    line otherwise. Reads only: called before holding a folder, so that the holder's note is never written
    into someone else's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file: pick another --name or --runs-dir")
    if run_dir.is_dir() and listing(run_dir) and not (run_dir / RUN_MARKER).is_file():
        raise UsageError(f"{run_dir} is not empty and was not made by train.py: pick another --name or --runs-dir")


def check_new_run_dir(run_dir):
    """Whether the folder of a new run must be cleared first (True: a restartable run); refuses a folder
    train.py did not make, a run worth keeping, and a restartable run holding files it never writes."""
    check_ours(run_dir)
    if not Path(run_dir).is_dir() or not listing(run_dir):
        return False
    if not restartable(run_dir):
        raise UsageError(f"{run_dir} already holds a run: pick another --name, or --resume {run_dir}")
    later = [n for n in listing(run_dir) if n in RUN_FILES and n not in RESTART_FILES]
    if later:  # a run that got further, whose checkpoint is gone (or someone's files under our names)
        raise UsageError(f"{run_dir} has no {CHECKPOINT} but holds {', '.join(later[:3])}, which a run writes only "
                         f"after its first checkpoint: nothing was deleted; put its {CHECKPOINT} back to --resume it, "
                         "or pick another --name")
    check_only_ours(run_dir, RESTART_FILES, "pick another --name")
    return True


def new_run_dir(run_dir):
    """Clear the folder of a new run when it holds a restartable run (call it holding the folder)."""
    if check_new_run_dir(run_dir):
        print(f"{run_dir} stopped before its first checkpoint: starting it again from step 0", file=sys.stderr)
        delete_run_files(run_dir)


def listing(run_dir):
    """The names in a run folder, less the note of whoever holds it."""
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name != WRITER_NOTE)


def read_marker(run_dir):
    """The marker's {"finished": bool}; an empty or damaged one is one line: with it, whether train.py made the
    folder cannot be told, so nothing there is deleted or overwritten."""
    path = Path(run_dir) / RUN_MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        marker = err
    if not isinstance(marker, dict) or not isinstance(marker.get("finished"), bool):
        raise UsageError(f"{path} is damaged (train.py writes {{\"finished\": false}} there), so it cannot tell "
                         f"whether train.py made {run_dir}: nothing there was changed; move the folder away, or "
                         "rewrite the marker if it is a run of yours")
    return marker


def restartable(run_dir):
    """A run train.py made that died before its first checkpoint: nothing in it is worth keeping, so it starts
    again from step 0, under the same --name or by --resume. (A finished run whose checkpoint was deleted, as
    the bench does, is not restartable: its metrics and plots are results.)"""
    return not (Path(run_dir) / CHECKPOINT).exists() and not read_marker(run_dir)["finished"]


def check_only_ours(run_dir, names, fix):
    """Before deleting a run: the folder holds only `names` of train.py's (and their temp files), and its
    config.json is train.py's, else one line and nothing is deleted. A marker alone proves little: anyone can
    write {"finished": false} beside their own config.json and plots."""
    foreign = [n for n in listing(run_dir) if n not in names and temp_of(n) not in RUN_FILES]
    if foreign:
        raise UsageError(f"{run_dir} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                         f"train.py did not write there: nothing was deleted; move it out of {run_dir} or {fix}")
    if (Path(run_dir) / "config.json").is_file():
        read_run_config(run_dir, f"nothing was deleted; move it out of {run_dir} or {fix}")


def remove_run(run_dir):
    """Delete a run train.py made, for callers (bench, the study) that replace a run of theirs with a new one of
    the same name: its own files only, then the folder if nothing else is left in it; refused, with nothing
    deleted, when the folder holds anything else. The run folder is held meanwhile (files.one_writer): holding
    only their results folder, they deleted the files of a train.py --resume writing that run; now one of the
    two is refused in one line (files.Busy) naming the other."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_MARKER).is_file():  # before holding it: the holder's note goes into runs only
        raise UsageError(f"{run_dir} was not made by train.py: move it away, it will not be deleted")
    with one_writer(run_dir):
        check_only_ours(run_dir, RUN_FILES, "rerun with another --out")
        delete_run_files(run_dir)
    with contextlib.suppress(OSError):  # only when empty (someone may have taken it since)
        run_dir.rmdir()


def delete_run_files(run_dir):
    """Every file of a run and the temp files a killed write left, the marker last: a crash midway leaves a
    folder that is still a run of ours. Call it holding the folder, its contents checked (check_only_ours)."""
    for path in own_temp_files(run_dir):
        path.unlink()
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def own_temp_files(run_dir):
    """Temp files (files.atomic_path's) of this run's files that a killed write left behind."""
    return [p for p in Path(run_dir).iterdir() if temp_of(p.name) in RUN_FILES]


def read_run_config(run_dir, fix):
    """config.json of a run: {"config": {...}, ...} as train.py wrote it, or one line naming it and `fix`."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        saved = err
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UsageError(f"{path} is damaged or not train.py's (no \"config\" object in it): {fix}")
    return saved


def config_from_resume(cfg):
    """The interrupted run's own config (so its schedule continues), with this call's max_steps,
    allow_other_data and --data (when given: the same dataset elsewhere, checked by fingerprint). A run that died
    before its first checkpoint starts again from step 0."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there, so no run to continue")
    if not (run_dir / CHECKPOINT).is_file() and not restartable(run_dir):
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT} there to continue from")
    saved = read_run_config(run_dir, "put back the run's own config.json (its settings are needed to continue)")
    saved = saved["config"]
    default_data = next(f.default for f in fields(cfg) if f.name == "data")
    data = cfg.data if cfg.data != default_data else saved.get("data", default_data)
    if is_url(data):
        pass  # fetched (and its manifest checked) by the loaders, like a new run's
    elif Path(data).is_dir() and not (Path(data) / MANIFEST).is_file():
        raise UsageError(f"--resume {run_dir}: {Path(data) / MANIFEST} is missing: rerun python ingest/build.py "
                         f"--out {data} to rewrite it, or pass --data where the run's dataset is now")
    elif not (Path(data) / MANIFEST).is_file():
        where = "" if Path(data).is_absolute() else f" (relative to {Path.cwd()})"
        raise UsageError(f"--resume {run_dir}: its dataset {data}{where} is not there: pass --data where that "
                         "dataset is now (its fingerprint is checked)")
    # The weights come from the checkpoint now, not from where the run first started.
    saved.update(resume=str(run_dir) if (run_dir / CHECKPOINT).is_file() else "", init_from="",
                 max_steps=cfg.max_steps, allow_other_data=cfg.allow_other_data, name=run_dir.name,
                 runs_dir=str(run_dir.parent), data=str(data))
    return type(cfg)(**{f.name: saved[f.name] for f in fields(cfg) if f.name in saved})


def check_same_run(named, config, saved):
    """--resume, predict and the report: the config (config.json's, settled) is the one the checkpoint was
    trained with (`saved`, the checkpoint's), else one line starting with `named`: an edited config.json or another
    run's last.pt would otherwise fail deep inside load_state_dict, or worse, go on with settings the weights
    never saw."""
    theirs, ours = as_read_back(saved), as_read_back(config)
    for key in sorted(ours.keys() & theirs.keys() - set(RESUMED_ANEW)):
        if ours[key] != theirs[key]:
            raise UsageError(f"{named}: config.json does not match {CHECKPOINT} ({key} is {ours[key]!r} "
                             f"in config.json, {theirs[key]!r} in {CHECKPOINT}): config.json was edited or "
                             f"{CHECKPOINT} is another run's; put back the run's own file")


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


def state_digest(obj, h=None):
    """sha256 over a (nested) state's values, tensors by their bytes: what a checkpoint records of itself, so that
    bytes flipped inside a tensor (which torch.load reads without complaint) are noticed. 1.2-1.9 s for
    flat's 573 MB of weights and momentum here (sha256 at 300-500 MB/s on 2 shared cores), at each save and resume."""
    h = hashlib.sha256() if h is None else h
    if torch.is_tensor(obj):
        h.update(f"tensor {obj.dtype} {tuple(obj.shape)};".encode())
        hash_tensor(h, obj.cpu())  # on the host already when saved (on_host) or read (map_location)
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)};".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}:".encode())
            state_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            state_digest(value, h)
    else:
        h.update(f"{obj!r};".encode())
    return h.hexdigest()


def on_host(obj):
    """A (nested) state with its tensors in host memory: one copy of a GPU's tensors that the digest and torch.save
    both read (each copied them before, twice the device-to-host traffic of every checkpoint). A tensor already
    there is itself (Tensor.cpu), so a CPU run's checkpoint is written byte for byte as before."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: on_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_host(value) for value in obj)
    return obj


def save_checkpoint(path, **state):
    """Atomically, with the digest of its own content (state_digest); a failed write raises its own OSError
    (ENOSPC on a full disk)."""
    state = on_host(state)
    state["sha256"] = state_digest(state)
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
    """A checkpoint's contents, or one line saying it cannot be read (truncated, not a checkpoint at all) or that
    its content no longer matches the digest it was saved with (checkpoints from before digests load as they
    are)."""
    named = f"{flag} {path}".strip()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user mistake
        raise UsageError(f"{named} is not a readable checkpoint ({type(err).__name__}): it is damaged or "
                         "not a fastpix checkpoint") from None
    return check_digest(state, named)


def check_digest(state, named):
    """A checkpoint's contents without its digest, or one line when they no longer match it (a state without
    one, from before digests or not fastpix's, is returned as it is)."""
    if isinstance(state, dict) and "sha256" in state:
        saved = state.pop("sha256")
        if saved != state_digest(state):
            raise UsageError(f"{named} is damaged: its content no longer matches the digest it was saved "
                             "with; put back an intact copy, or start the run again")
    return state


def load_weights(model, path, state):
    """--init-from: a fastpix checkpoint or a bare state dict of the same net and classes."""
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UsageError(f"--init-from {path} does not fit this net and class count: {last_line(err)}") from None


def last_line(err):
    """The line of a load_state_dict error that names the mismatch (its first only says which module)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()[:160]


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
    a resume reads only whole records. Only the start of a record is cut; any other tail (zeros a power cut left,
    say) stays for report.runlog to refuse by name."""
    if not path.is_file():
        return
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data) and data[whole:whole + 1] == b"{" and b"\0" not in data[whole:]:
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
