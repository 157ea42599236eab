"""A run's metrics.jsonl: one JSON record per line, kind "step" (every logged step) or "epoch"; read whole or
refused in one line naming the damage, never half-used."""
import hashlib
import json
import os
from pathlib import Path

from cli import UsageError
from files import write_text

METRICS = "metrics.jsonl"
FIX = "put back the run's own file, or delete the damaged lines (the curves then miss them)"


def read_records(run_dir):
    """Every record of a run's metrics.jsonl, in order; a missing file or a line that is not a record is one
    line (a torn last line, which a kill leaves, is cut by --resume first: runfolder.drop_torn_line)."""
    path = Path(run_dir) / METRICS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: put back the run's own file") from None
    except ValueError:  # not UTF-8
        raise UsageError(f"{path} is damaged (not text): {FIX}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line else {"kind": "blank"}
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("kind") not in ("step", "epoch", "blank"):
            raise UsageError(f"{path} is damaged at line {number} (not a metrics record): {FIX}")
        if line:
            records.append(record)
    return records


def read_metrics(run_dir):
    """(step records, epoch records) of a run's metrics.jsonl."""
    records = read_records(run_dir)
    return [r for r in records if r["kind"] == "step"], [r for r in records if r["kind"] == "epoch"]


def append_jsonl(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def trim_metrics(run_dir, step, epoch):
    """Drop what was logged after the checkpoint we resume from, so the curves continue without overlap."""
    keep = [r for r in read_records(run_dir)
            if r["kind"] == "step" and r["step"] < step or r["kind"] == "epoch" and r["epoch"] < epoch]
    write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in keep))


def metrics_digest(run_dir):
    """sha256 of metrics.jsonl as it is, flushed to the disk first: each checkpoint records it, so that a resume
    can tell the run's own log, cut back to that checkpoint, from one that lost steps or is another run's."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # the checkpoint is flushed; the log it vouches for must be on the disk before it
        return hashlib.sha256(f.read()).hexdigest()


def check_resumed_metrics(run_dir, digest):
    """After trim_metrics, the log must be exactly what it was when the checkpoint was saved (`digest`; None for
    checkpoints from before it was recorded, which are not checked)."""
    if digest is not None and metrics_digest(run_dir) != digest:
        raise UsageError(f"{Path(run_dir) / METRICS} is not the log of the checkpoint it resumes (steps are missing "
                         "or it is another run's): put back the run's own file; the checkpoint itself is intact")
