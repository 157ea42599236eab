"""One results folder per bench or study run: the figures together with the exact config and versions that
produced them, written atomically (files.py) so that a killed run never leaves a half-written table behind;
and the tables' figures as they are written there (formats, each figure with the spread of its rounds).
"""
import contextlib
import csv
import io
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from cli import UsageError
from files import WRITER_NOTE, one_writer, temp_of, write_json, write_text

RESULTS_ROOT = Path("results")
PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "ffcv", "numpy", "scikit-learn", "pillow", "webdataset")


def new_results_dir(kind, root=RESULTS_ROOT):
    """results/<kind>-YYYYmmdd-HHMMSS (claimed for `kind`), unique even when two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{kind}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{kind}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return claim(path, kind)


def claim(folder, kind):
    """`folder` as a results folder of `kind` ("bench", "study"): created with the marker .fastpix-<kind>
    when missing or empty, reused when it holds that marker, refused (one line) when it holds anything else,
    so that results never mix with, or replace, files this tool did not write."""
    folder, marker = check_claim(folder, kind)
    if not (folder / marker).is_file():
        write_text(folder / marker, "")
    return folder


def check_claim(folder, kind):
    """claim's refusals, reading only; returns (folder, marker name)."""
    folder, marker = Path(folder), f".fastpix-{kind}"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file: pick another --out")
    ours = {WRITER_NOTE, marker}  # and atomic_path's temps of them: a writer mid-claim is busy, not foreign
    if folder.is_dir() and any(p.name not in ours and temp_of(p.name) not in ours for p in folder.iterdir()) \
            and not (folder / marker).is_file():
        raise UsageError(f"--out {folder} is not empty and was not made by the {kind}: pick another --out")
    return folder, marker


@contextlib.contextmanager
def held(folder, kind):
    """`folder` claimed for `kind` and held by this process as its one writer (files.one_writer) for the block:
    a second bench or study into the same --out is refused in one line (files.Busy) instead of interleaving
    its runs and tables with ours. Checked before holding, so that a folder that is not ours is refused
    without the holder's note ever being written into it."""
    check_claim(folder, kind)
    with one_writer(folder):
        yield claim(folder, kind)


def environment():
    """Package versions and the machine, read from metadata so that nothing heavy is imported."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    machine = {"python": platform.python_version(), "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "gpu": None}
    try:
        import torch
        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name(0)
            machine["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return {"versions": versions, "machine": machine}


def machine_label(env):
    """'2-core CPU, no GPU' or '16-core CPU, NVIDIA H200': how tables say where they were measured."""
    m = env["machine"]
    return f"{m['cpu_count']}-core CPU, {m['gpu'] or 'no GPU'}"


def write_config(out_dir, config, **extra):
    """config.json: the exact config, versions and machine, written first so that partial results are labelled."""
    write_json(Path(out_dir) / "config.json", {"config": config, **environment(), **extra})


def fmt(value, digits=3):
    """A table cell: numbers rounded, missing values as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_ci(value, ci):
    """0.412 [0.351, 0.470]: a metric with its 95 % interval."""
    if value is None:
        return "–"
    if not ci:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (header, function row -> cell text)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell(row)) for _, cell in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path, rows, fields):
    """Flat CSV of the chosen fields; intervals are split into _lo/_hi columns so spreadsheets can use them."""
    buf = io.StringIO()
    header = []
    for f in fields:
        header += [f"{f}_lo", f"{f}_hi"] if f.endswith("_ci") else [f]
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        line = []
        for f in fields:
            v = row.get(f)
            if f.endswith("_ci"):
                line += list(v) if v else ["", ""]
            else:
                line.append("" if v is None else v)
        writer.writerow(line)
    write_text(path, buf.getvalue())


# ---------------------------------------------------------------- noise: every figure with the spread of its rounds

MIN_ROUNDS = 3  # fewer rounds give no idea of the noise
MIN_BATCHES = 50  # timed epochs shorter than this do not hold (issue 20: 5-batch epochs read 0.69x, then 1.63x)


def spread(values):
    """A figure measured once per round: {median, lo, hi, rounds}."""
    values = sorted(values)
    return {"median": statistics.median(values), "lo": values[0], "hi": values[-1], "rounds": len(values)}


def ratio(a, b):
    """a / b of two spreads, with the range of every value the ratio can take between them: lo = a.lo / b.hi,
    hi = a.hi / b.lo. It spans 1.0 exactly when the two rows' ranges overlap."""
    if not a or not b or not b["lo"]:
        return None
    return {"median": a["median"] / b["median"], "lo": a["lo"] / b["hi"], "hi": a["hi"] / b["lo"]}


def within_noise(r):
    return r["lo"] <= 1.0 <= r["hi"]


def fmt_spread(s, digits=0):
    """'3,396 (3,236-3,512)': a median and its rounds' range."""
    if not s:
        return "–"
    return f"{s['median']:,.{digits}f} ({s['lo']:,.{digits}f}-{s['hi']:,.{digits}f})"


def fmt_ratio(r):
    """'1.12× (1.05-1.20)', or '1.01× (0.95-1.08) within noise' when the range spans 1.0: never a win."""
    if not r:
        return "–"
    text = f"{r['median']:.2f}× ({r['lo']:.2f}-{r['hi']:.2f})"
    return text + " within noise" if within_noise(r) else text
