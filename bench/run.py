"""End-to-end bench: images/s alongside the accuracy they bought, for a matrix of loaders x nets, against the
`folder` baseline measured in the same run on the same cores.

Each cell runs in its own process (so peak RSS is the cell's own, and one crashing backend costs one row):
a short training run (train.train) on a fixed schedule, then the loader alone (bench.loaders.measure).
Output, in one results folder: table.md, results.json (+ exact config and versions), results.csv and
throughput.png (bars annotated with accuracy and the ratio to the baseline). The bench writes only into a
folder it made (marker .fastpix-bench): a rerun into it replaces its own results, any other --out that is
not empty is refused.
"""
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from bench.results import (claim, environment, fmt, fmt_ci, machine_label, markdown_table, new_results_dir,
                           write_config, write_csv)
from cli import Parser, UsageError
from files import read_json, write_json, write_text
from ingest.layout import DEFAULT_OUT, read_manifest
from loaders import BACKENDS

BASELINE = "folder"


@dataclass
class BenchConfig:
    data: Path = DEFAULT_OUT  # an ingested dataset (python ingest/build.py)
    loaders: tuple = tuple(BACKENDS)  # every backend; the baseline is always added
    nets: tuple = ("flat",)
    epochs: int = 3  # e2e images/s is the median of epochs 2+, so at least 2
    batch_size: int = 64  # small enough for 2 CPU cores to turn over many steps per epoch
    res: int = 128  # the study trained at 224; 128 keeps a CPU bench in minutes
    device: str = "auto"
    amp: str = "auto"
    workers: int = 0  # loader workers; 0 = the loader's own default
    seed: int = 0
    loader_epochs: int = 2  # loader-only: epochs measured after the warm-up epoch
    out: Path = None  # results folder; default results/bench-<time>


QUICK = dict(epochs=2, res=96, loader_epochs=1)  # --quick: about 3 min for all five loaders on 2 idle CPU cores


def cell_name(net, loader):
    return f"{net}/{loader}"


# ---------------------------------------------------------------- one cell (in its own process)

def run_cell(cfg, net, loader, out_dir):
    """Train one cell, then measure its loader alone; returns the row (all numbers, no formatting)."""
    import train
    from bench.loaders import measure

    name = f"{net}-{loader}"
    runs_dir = Path(out_dir) / "runs"
    if (runs_dir / name).exists():  # this cell's run from an earlier bench into the same --out
        train.remove_run(runs_dir / name)
    summary = train.train(train.Config(
        net=net, loader=loader, data=str(cfg.data), epochs=cfg.epochs, batch_size=cfg.batch_size, res=cfg.res,
        device=cfg.device, amp=cfg.amp, seed=cfg.seed, workers=cfg.workers or None, name=name,
        runs_dir=str(runs_dir)))
    # A bench keeps each run's metrics and plots, not its weights: AlexNet-size checkpoints are ~600 MB each.
    (Path(summary["run_dir"]) / train.CHECKPOINT).unlink(missing_ok=True)
    loader_stats = measure(loader, cfg.data, "train", batch_size=cfg.batch_size, res=cfg.res, device=cfg.device,
                           workers=cfg.workers or None, epochs=cfg.loader_epochs)
    keys = ("images_per_sec", "data_stall_fraction", "test_acc", "test_acc_ci", "macro_precision",
            "macro_precision_ci", "peak_rss_mb", "peak_gpu_mb", "amp", "run_dir")
    row = {"cell": cell_name(net, loader), "net": net, "loader": loader, **{k: summary.get(k) for k in keys}}
    row["loader_images_per_sec"] = loader_stats["images_per_sec"]
    return row


def cell_main(argv):
    """`python -m bench.run --cell CONFIG.json NET LOADER OUT.json`: the child side of run_matrix."""
    cfg_path, net, loader, out = argv
    cfg = BenchConfig(**read_json(cfg_path))
    write_json(out, run_cell(cfg, net, loader, Path(out).parent.parent))
    return 0


# ---------------------------------------------------------------- the matrix

def run_matrix(cfg, out_dir, progress=True):
    """Every cell in a child process; a failing cell becomes a row with `error` (the log's last line)."""
    out_dir = Path(out_dir)
    cfg_path = out_dir / "bench-config.json"
    write_json(cfg_path, {**asdict(cfg), "data": str(cfg.data), "out": str(out_dir)})
    cells = [(n, l) for n in cfg.nets for l in cfg.loaders]
    rows = []
    bar = tqdm(cells, desc="bench", unit="cell", disable=not progress)
    for net, loader in bar:
        bar.set_postfix_str(cell_name(net, loader))
        result = out_dir / "cells" / f"{net}-{loader}.json"
        log = out_dir / "logs" / f"{net}-{loader}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        result.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            code = subprocess.call([sys.executable, "-m", "bench.run", "--cell", str(cfg_path), net, loader,
                                    str(result)], stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if code == 0 and result.is_file():
            rows.append(read_json(result))
        else:
            lines = log.read_text(errors="replace").strip().splitlines()
            rows.append({"cell": cell_name(net, loader), "net": net, "loader": loader,
                         "error": (lines[-1] if lines else f"exit {code}")[:300]})
    return with_ratios(rows)


def with_ratios(rows):
    """Ratios to the baseline loader of the same net, from this run only."""
    base = {r["net"]: r for r in rows if r["loader"] == BASELINE and not r.get("error")}
    for r in rows:
        b = base.get(r["net"])
        ok = b and not r.get("error")
        r["ratio_to_baseline"] = r["images_per_sec"] / b["images_per_sec"] if ok and b["images_per_sec"] else None
        r["loader_ratio_to_baseline"] = (r["loader_images_per_sec"] / b["loader_images_per_sec"]
                                         if ok and b.get("loader_images_per_sec") else None)
    return rows


# ---------------------------------------------------------------- outputs

COLUMNS = [
    ("cell", lambda r: r["cell"]),
    ("e2e img/s", lambda r: fmt(r.get("images_per_sec"), 1)),
    ("× folder", lambda r: fmt(r.get("ratio_to_baseline"), 2)),
    ("loader img/s", lambda r: fmt(r.get("loader_images_per_sec"), 1)),
    ("loader × folder", lambda r: fmt(r.get("loader_ratio_to_baseline"), 2)),
    ("data stall", lambda r: fmt(r.get("data_stall_fraction"), 2)),
    ("test acc [95 % CI]", lambda r: fmt_ci(r.get("test_acc"), r.get("test_acc_ci"))),
    ("macro precision [95 % CI]", lambda r: fmt_ci(r.get("macro_precision"), r.get("macro_precision_ci"))),
    ("peak RSS MB", lambda r: fmt(r.get("peak_rss_mb"), 0)),
    ("peak GPU MB", lambda r: fmt(r.get("peak_gpu_mb"), 0)),
    ("error", lambda r: r.get("error", "")),
]
CSV_FIELDS = ["cell", "net", "loader", "images_per_sec", "ratio_to_baseline", "loader_images_per_sec",
              "loader_ratio_to_baseline", "data_stall_fraction", "test_acc", "test_acc_ci", "macro_precision",
              "macro_precision_ci", "peak_rss_mb", "peak_gpu_mb", "amp", "error"]


def write_outputs(cfg, rows, out_dir, env):
    from bench.plots import throughput_bars
    out_dir = Path(out_dir)
    where = machine_label(env)
    title = (f"{where}: {cfg.epochs} epochs, batch {cfg.batch_size}, res {cfg.res}, amp {cfg.amp} "
             f"(e2e = median of epochs 2+)")
    table = f"Bench on {where} — {title.split(': ', 1)[1]}\n\n" + markdown_table(rows, COLUMNS)
    write_text(out_dir / "table.md", table)
    write_json(out_dir / "results.json", {"config": cfg, **env, "rows": rows})
    write_csv(out_dir / "results.csv", rows, CSV_FIELDS)
    throughput_bars(rows, out_dir / "throughput.png", title)
    return table


def bench(cfg, progress=True):
    """Run the matrix and write every output; returns (results folder, rows)."""
    read_manifest(cfg.data)  # a one-line UsageError before anything starts when the data is not ingested
    out_dir = claim(cfg.out, "bench") if cfg.out else new_results_dir("bench")
    env = environment()
    write_config(out_dir, cfg)
    rows = run_matrix(cfg, out_dir, progress)
    print(write_outputs(cfg, rows, out_dir, env))
    print(f"bench: results in {out_dir}")
    return out_dir, rows


def parse_args(argv):
    d = BenchConfig()
    p = Parser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=d.data, help="ingested dataset")
    p.add_argument("--loaders", default=",".join(d.loaders), help="comma-separated backends (default: all)")
    p.add_argument("--nets", default=",".join(d.nets), help="comma-separated nets")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per cell, >= 2")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--res", type=int, default=d.res, help="training resolution")
    p.add_argument("--device", default=d.device, help="auto|cpu|cuda")
    p.add_argument("--amp", default=d.amp, help="auto|bf16|fp16|off")
    p.add_argument("--workers", type=int, default=d.workers, help="loader workers, 0 = loader default")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--loader-epochs", type=int, default=d.loader_epochs,
                   help="loader-only epochs measured after a warm-up")
    p.add_argument("--out", type=Path, help="results folder (default results/bench-<time>)")
    p.add_argument("--quick", action="store_true", help="2 epochs at res 96 (~3 min for all loaders on 2 CPU cores)")
    return p.parse_args(argv)


def config_from_args(args):
    import nets
    loaders = tuple(x for x in args.loaders.split(",") if x)
    net_names = tuple(x for x in args.nets.split(",") if x)
    for name in loaders:
        if name not in BACKENDS:
            raise UsageError(f"unknown loader {name!r}: choose from {', '.join(BACKENDS)}")
    for name in net_names:
        if name not in nets.NETS:
            raise UsageError(f"unknown net {name!r}: choose from {', '.join(nets.NETS)}")
    # The headline is a ratio to the baseline measured in the same run: always there, and first in the table.
    loaders = (BASELINE,) + tuple(name for name in loaders if name != BASELINE)
    cfg = BenchConfig(data=args.data, loaders=loaders, nets=net_names, epochs=args.epochs,
                      batch_size=args.batch_size, res=args.res, device=args.device, amp=args.amp,
                      workers=args.workers, seed=args.seed, loader_epochs=args.loader_epochs, out=args.out)
    if args.quick:
        cfg = replace(cfg, **QUICK)
    if cfg.epochs < 2 or cfg.loader_epochs < 1 or cfg.batch_size < 1 or cfg.res < 8 or cfg.workers < 0:
        raise UsageError("need --epochs >= 2 (e2e is the median of epochs 2+), --loader-epochs >= 1, "
                         "--batch-size >= 1, --res >= 8, --workers >= 0")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cell"]:
        return cell_main(argv[1:])
    bench(config_from_args(parse_args(argv)))
    return 0


if __name__ == "__main__":
    from cli import run
    run(main)
