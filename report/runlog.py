"""A run's metrics.jsonl: one JSON record per line, kind "step" (every logged step) or "epoch"."""
import json
from pathlib import Path

from files import write_text

METRICS = "metrics.jsonl"


def read_metrics(run_dir):
    """(step records, epoch records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (Path(run_dir) / METRICS).read_text().splitlines() if line]
    return [r for r in records if r["kind"] == "step"], [r for r in records if r["kind"] == "epoch"]


def append_jsonl(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def trim_metrics(run_dir, step, epoch):
    """Drop what was logged after the checkpoint we resume from, so the curves continue without overlap."""
    path = Path(run_dir) / METRICS
    keep = [line for line in path.read_text().splitlines() if line and (
        (r := json.loads(line))["kind"] == "step" and r["step"] < step or r["kind"] == "epoch" and r["epoch"] < epoch)]
    write_text(path, "".join(line + "\n" for line in keep))
