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

from bench import train_config
from bench.results_folder import (environment, fmt, fmt_ci, held, machine_label, markdown_table, new_results_dir,
                           write_config, write_csv)
from cli import Parser, UsageError, add_options, check_options, config_from, names, option, seed_option
from files import read_json, write_json, write_text
from ingest.layout import DEFAULT_OUT, read_manifest
from ingest.remote import local_folder
from loaders import BACKENDS
from training.device import DEVICES

BASELINE = "folder"


@dataclass
class BenchConfig:
    """Every option of a bench, each declared once with its flag (`cli.option`)."""
    data: str = option(str(DEFAULT_OUT), "ingested dataset (python ingest/build.py), or its URL (s3://, gs://, "
                       "https://, file://: fetched into --cache-dir once, then every cell reads the cache)")
    cache_dir: str = option("", "node-local cache of --data URLs (default ~/.cache/fastpix)")
    loaders: tuple = option(tuple(BACKENDS), "comma-separated backends (default: all); the baseline is always "
                            "added", parse=names)
    nets: tuple = option(("flat",), "comma-separated nets", parse=names)
    epochs: int = option(3, "epochs per cell, >= 2 (e2e images/s is the median of epochs 2+)", minimum=2)
    batch_size: int = option(64, "images per step (small enough for 2 CPU cores to turn over many steps per "
                             "epoch)", minimum=1)
    res: int = option(128, "training resolution (the study trained at 224; 128 keeps a CPU bench in minutes)",
                      minimum=8)
    device: str = option("auto", "auto, cpu or cuda", choices=DEVICES)
    amp: str = option("auto", "auto, bf16, fp16 or off")
    workers: int | None = option(None, "loader workers (default: the backend's; 0: in the training process)",
                                 minimum=0)
    seed: int = seed_option("seed of every cell")
    loader_epochs: int = option(2, "loader-only epochs measured after a warm-up", minimum=1)
    out: Path | None = option(None, "results folder (default results/bench-<time>)")


QUICK = dict(epochs=2, res=96, loader_epochs=1)  # --quick: about 3 min for all five loaders on 2 idle CPU cores


def cell_name(net, loader):
    return f"{net}/{loader}"


# ---------------------------------------------------------------- one cell (in its own process)

def run_cell(cfg, net, loader, out_dir):
    """Train one cell, then measure its loader alone; returns the row (all numbers, no formatting)."""
    import train
    from bench.loaders import measure
    from training.runfolder import remove_run

    name = f"{net}-{loader}"
    runs_dir = Path(out_dir) / "runs"
    if (runs_dir / name).exists():  # this cell's run from an earlier bench into the same --out
        remove_run(runs_dir / name)
    summary = train.train(train_config(cfg, net=net, loader=loader, workers=cfg.workers, name=name,
                                       runs_dir=str(runs_dir)))
    # A bench keeps each run's metrics, not its weights (AlexNet-size checkpoints are ~600 MB each) nor pictures.
    (Path(summary["run_dir"]) / train.CHECKPOINT).unlink(missing_ok=True)
    loader_stats = measure(loader, cfg.data, "train", batch_size=cfg.batch_size, res=cfg.res, device=cfg.device,
                           workers=cfg.workers, epochs=cfg.loader_epochs)
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
    from bench.comparison_plots import throughput_bars
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


def check_cell_runs(cfg, out_dir):
    """A rerun replaces each cell's run of the earlier bench: refused up front, with nothing deleted, when one of
    them holds a file train.py did not write (the user's notes), rather than deleting the run, then failing."""
    from training.runfolder import RUN_FILES, check_only_ours
    for net, loader in ((n, l) for n in cfg.nets for l in cfg.loaders):
        run_dir = Path(out_dir) / "runs" / f"{net}-{loader}"
        if run_dir.is_dir():
            check_only_ours(run_dir, RUN_FILES, "rerun with another --out")


def bench(cfg, progress=True):
    """Run the matrix and write every output, holding the results folder; returns (results folder, rows)."""
    cfg = replace(cfg, data=str(local_folder(cfg.data, cfg.cache_dir or None)))  # a URL: fetched once, here
    read_manifest(cfg.data)  # a one-line UsageError before anything starts when the data is not ingested
    with held(cfg.out or new_results_dir("bench"), "bench") as out_dir:
        check_cell_runs(cfg, out_dir)
        env = environment()
        write_config(out_dir, cfg)
        rows = run_matrix(cfg, out_dir, progress)
        print(write_outputs(cfg, rows, out_dir, env))
    print(f"bench: results in {out_dir}")
    return out_dir, rows


def parse_args(argv):
    p = add_options(Parser(prog="python -m bench", description=__doc__.split("\n\n")[0]), BenchConfig)
    p.add_argument("--quick", action="store_true", help="2 epochs at res 96 (~3 min for all loaders on 2 CPU cores)")
    return p.parse_args(argv)


def config_from_args(args):
    import nets
    cfg = config_from(BenchConfig, args)
    for name in cfg.loaders:
        if name not in BACKENDS:
            raise UsageError(f"unknown loader {name!r}: choose from {', '.join(BACKENDS)}")
    for name in cfg.nets:
        if name not in nets.NETS:
            raise UsageError(f"unknown net {name!r}: choose from {', '.join(nets.NETS)}")
    # The headline is a ratio to the baseline measured in the same run: always there, and first in the table.
    cfg = replace(cfg, loaders=(BASELINE,) + tuple(name for name in cfg.loaders if name != BASELINE))
    if args.quick:
        cfg = replace(cfg, **QUICK)
    check_options(cfg)
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cell"]:
        return cell_main(argv[1:])
    _, rows = bench(config_from_args(parse_args(argv)))
    failed = [r["cell"] for r in rows if r.get("error")]
    if failed:  # each is a row with its reason; the exit code says so too
        print(f"bench: {len(failed)} of {len(rows)} cells failed ({', '.join(failed)}): see the error column",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from cli import run
    run(main)
