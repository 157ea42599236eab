"""Ingest throughput: images/s end to end and per validation worker, for 1 and 2 workers, on demo photos.

Target (issue 2): >= 100 images/s per worker on demo-sized photos (long side 300-1,500 px) on a 2-core
machine, close to linear in workers. Every run starts from an empty per-file cache (--force), so it measures
the full decode-normalise-encode work; runs of 1 and 2 workers alternate so that background load hits both
alike, and each figure is the median of --repeats runs. A warm-up build pays the one-time imports (torch,
numba via FFCV) first. Also timed: the up-to-date rerun as a user meets it (a fresh `python ingest/build.py`).

`python -m bench.ingest [--data SRC | --per-class 20] [--repeats 3]` -> results/ingest-<time>/ (results.json,
table.md, ingest.png). `--data`: a folder of photos (one subfolder per class) instead of the generated demo. The
speed-up over the first worker count comes with the range its repeats allow (bench.results_folder.ratio).
"""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.results_folder import environment, fmt_ratio, machine_label, new_results_dir, ratio, spread
from cli import Parser, UsageError, run
from files import write_json, write_text
from ingest import demo
from ingest.build import build
from ingest.config import IngestConfig

DATA = Path("data")
REPO = Path(__file__).resolve().parent.parent


def measure(src, out, workers, store_size):
    """One cold build: {images, end-to-end s, validate s, write s}."""
    timings = {}
    manifest = build(IngestConfig(src=src, out=out, workers=workers, store_size=store_size, force=True),
                     progress=False, log=lambda *_: None, timings=timings)
    images = manifest["found"] - manifest["ignored"]
    wall = {k: v for k, v in timings.items() if not k.endswith("_cpu")}
    return {"images": images, "total_s": sum(wall.values()), **{f"{k}_s": v for k, v in timings.items()}}


def up_to_date_seconds(src, out, store_size):
    """Wall time of the no-op rerun, interpreter start included, as a user runs it."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "ingest" / "build.py"), "--src", str(src), "--out", str(out),
                    "--store-size", str(store_size), "--workers", "1", "--quiet"], check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv=None):
    p = Parser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="a folder of photos to ingest (default: the demo)")
    p.add_argument("--per-class", type=int, default=20, help="demo photos per class (28 classes), without --data")
    p.add_argument("--repeats", type=int, default=3, help="cold builds per worker count; medians reported")
    p.add_argument("--store-size", type=int, default=256, help="shorter side stored, px")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.workers) < 1:
        raise UsageError("--repeats and every --workers value must be >= 1")
    src = args.data or DATA / f"bench-demo-{args.per_class}"
    if args.data is None:
        demo.generate(src, demo.DemoConfig(per_class=args.per_class))
    elif not src.is_dir():
        raise UsageError(f"--data {src} is not a folder of photos")
    out_dir = new_results_dir("ingest")
    work = out_dir / "ingested"

    load = os.getloadavg()
    build(IngestConfig(src=src, out=work, workers=1, store_size=args.store_size), progress=False,
          log=lambda *_: None)  # warm-up: imports and page cache
    runs = {w: [] for w in args.workers}
    for r in range(args.repeats):
        for w in args.workers:
            runs[w].append(measure(src, work, w, args.store_size))
            print(f"repeat {r + 1}/{args.repeats}, {w} worker(s): {runs[w][-1]['total_s']:.2f} s", flush=True)
    no_op = statistics.median(up_to_date_seconds(src, work, args.store_size) for _ in range(3))

    rows = []
    for w, results in runs.items():
        n = results[0]["images"]
        validate = statistics.median(x["validate_s"] for x in results)
        total = statistics.median(x["total_s"] for x in results)
        cpu = statistics.median(x["validate_workers_cpu_s"] for x in results)
        rows.append({"workers": w, "images": n, "validate_img_s": n / validate, "per_worker_img_s": n / validate / w,
                     "validate_rate": spread([n / x["validate_s"] for x in results]),
                     "img_per_worker_cpu_s": n / cpu,
                     "end_to_end_img_s": n / total, "write_s": statistics.median(x["write_s"] for x in results),
                     "runs": results})
    env = environment()
    photos = f"{rows[0]['images']:,} photos of {src}" if args.data else \
        f"{args.per_class * len(demo.CLASSES)} demo photos + junk"
    lines = [f"Ingest, {photos}, store {args.store_size} px, "
             f"median of {args.repeats} cold runs, {machine_label(env)}", "",
             "| workers | validate img/s | per worker | per worker CPU-s | end to end img/s | write s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['workers']} | {row['validate_img_s']:.0f} | {row['per_worker_img_s']:.0f} | "
                     f"{row['img_per_worker_cpu_s']:.0f} | "
                     f"{row['end_to_end_img_s']:.0f} | {row['write_s']:.2f} | "
                     f"{fmt_ratio(ratio(row['validate_rate'], rows[0]['validate_rate']))} |")
    lines += ["", f"up-to-date rerun (fresh interpreter): {no_op:.2f} s; load average before/after: "
              f"{load[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other load slows wall figures; "
              "CPU-second figures are what a worker does when it has a core)"]
    table = "\n".join(lines) + "\n"
    print(table)
    write_text(out_dir / "table.md", table)
    write_json(out_dir / "results.json", {"config": vars(args), "rows": rows, "up_to_date_s": no_op, **env})
    _plot(rows, out_dir / "ingest.png")
    print(f"-> {out_dir}")


def _plot(rows, path):
    from bench.comparison_plots import plt, save

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["validate_img_s"] for r in rows], 0.4, label="validate")
    ax.bar([i + 0.2 for i in x], [r["end_to_end_img_s"] for r in rows], 0.4, label="end to end")
    for i, r in zip(x, rows):  # the target: 100 img/s per worker, linear in workers
        ax.hlines(100 * r["workers"], i - 0.45, i + 0.45, color="gray", ls="--", lw=1,
                  label="target: 100 img/s per worker" if i == 0 else None)
    ax.set_ylim(0, 1.15 * max(max(100 * r["workers"], r["validate_img_s"]) for r in rows))
    ax.set_xticks(list(x), [f"{r['workers']} worker(s)" for r in rows])
    ax.set_ylabel("images / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


if __name__ == "__main__":
    run(main)
