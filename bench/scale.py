"""What fastpix costs at a dataset's scale, in one table: how each figure grows from the 1,259-photo demo to
the 28,000-photo one (issue 20, item 5).

`python -m bench.scale --data DIR [--workers 2] [--steps 60] [--backends ...] [--keep]`
On the dataset's source photos (its manifest's `source`), in a scratch copy that it deletes at the end:
- ingest: `ingest/build.py` into the scratch folder from nothing, timed: photos/s and photos/s per worker
  (per core: one worker process per core), peak RSS of the build's process tree;
- bytes per photo of the dataset folder, its per-photo cache included, and per part (shards, betons, cache);
- each loader's start-up check (loaders.base.prepare, both splits): first (no record of verified files, so
  every file of its formats is hashed) and later (the record is there);
- `--verify` (ingest/build.py --verify, a fresh process): seconds per GB of the dataset;
- the resident build: `resident` built in a fresh process (bench.loaders.isolated): build s, peak RSS;
- training: `train.py --epochs 1 --max-steps STEPS` per backend (net flat): img/s and data-stall share over the
  steps after the first log window (worker start, compilation), from the run's metrics.jsonl.
Writes table.md and results.json under the results folder; the table names data, machine and load.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cli import Parser, UsageError, run

REPO = Path(__file__).resolve().parent.parent

PARTS = {"shards": ("*.tar", "*.idx"), "betons": ("*.beton",), "cache": (".cache/**/*",)}  # bytes per part
LOG_EVERY = 5  # training steps per log window; the first window (start-up) is left out of the rates


def timed_process(argv, **kwargs):
    """(seconds, peak MB of the process tree's summed RSS) of a command run to the end; UsageError if it fails."""
    from bench.loaders import WorkerRss
    started = time.perf_counter()
    with WorkerRss() as rss:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, **kwargs)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        raise UsageError(f"{' '.join(map(str, argv[1:4]))} failed: {last[-1]}")
    return seconds, rss.peak_mb


def ingest(src, out, workers, store_size):
    """Ingest `src` into the empty folder `out`: {seconds, photos, photos_per_s, per_worker, peak_rss_mb}."""
    from ingest.layout import read_manifest
    seconds, peak = timed_process([sys.executable, "ingest/build.py", "--src", str(src), "--out", str(out),
                                   "--workers", str(workers), "--store-size", str(store_size), "--quiet"])
    photos = sum(s["count"] for s in read_manifest(out)["splits"].values())
    return {"seconds": seconds, "photos": photos, "photos_per_s": photos / seconds,
            "per_worker": photos / seconds / workers, "workers": workers, "peak_rss_mb": peak}


def footprint(data_dir, photos):
    """Bytes of the dataset folder per photo, in all and per part (PARTS; the rest is csv, manifest, indexes)."""
    data_dir = Path(data_dir)
    total = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    parts = {name: sum(p.stat().st_size for g in globs for p in data_dir.glob(g) if p.is_file())
             for name, globs in PARTS.items()}
    return {"bytes": total, "per_photo": total / photos, **{f"{k}_per_photo": v / photos for k, v in parts.items()}}


def startup_checks(data_dir, backends):
    """Each backend's start-up check of both splits, first (no record of verified files) and later, in s."""
    import importlib

    from ingest.layout import VERIFIED, read_manifest
    from loaders import BACKENDS
    from loaders.base import prepare
    seconds = {}
    for backend in backends:
        reads = importlib.import_module(BACKENDS[backend]).READS
        (Path(data_dir) / VERIFIED).unlink(missing_ok=True)
        read_manifest(data_dir)  # in the page cache for both: the check, not the first read, is measured
        times = []
        for _ in range(2):
            started = time.perf_counter()
            for split in ("train", "test"):
                prepare(data_dir, split, rank=0, world=1, device="cpu", reads=reads)
            times.append(time.perf_counter() - started)
        seconds[backend] = {"first_s": times[0], "later_s": times[1]}
    return seconds


def verify(data_dir, total_bytes):
    """`ingest/build.py --verify` in a fresh process: {seconds, s_per_gb}."""
    seconds, _ = timed_process([sys.executable, "ingest/build.py", "--out", str(data_dir), "--verify", "--quiet"])
    return {"seconds": seconds, "s_per_gb": seconds / (total_bytes / 1e9)}


def resident_build(data_dir, res, batch_size):
    """The resident loader built and run for one epoch in a fresh process: build s, img/s, peak RSS."""
    from bench.loaders import isolated
    row = isolated("resident", data_dir, "train", res=res, batch_size=batch_size, device="cpu", epochs=1)
    if row.get("error"):
        return {"error": row["error"]}
    return {k: row[k] for k in ("build_s", "images_per_sec", "peak_rss_mb")}


def train_rates(metrics_path, batch_size):
    """{images_per_sec, data_stall} of the step records after the first log window: each step takes
    batch / (its window's img/s) seconds, of which data_wait_s waited for the loader."""
    steps = [r for r in map(json.loads, Path(metrics_path).read_text().splitlines()) if r.get("kind") == "step"]
    steps = steps[LOG_EVERY:]
    if not steps:
        raise UsageError(f"too few training steps to measure: raise --steps above {LOG_EVERY}")
    seconds = sum(batch_size / r["images_per_sec"] for r in steps)
    return {"images_per_sec": batch_size * len(steps) / seconds, "data_stall": sum(r["data_wait_s"] for r in steps)
            / seconds, "steps": len(steps)}


def training(data_dir, backends, *, steps, res, batch_size, runs_dir):
    """train.py for `steps` steps per backend in a fresh process: {backend: {images_per_sec, data_stall, ...}}."""
    rates = {}
    for backend in backends:
        argv = [sys.executable, "train.py", "--data", str(data_dir), "--loader", backend, "--net", "flat",
                "--res", str(res), "--batch-size", str(batch_size), "--epochs", "1", "--max-steps", str(steps),
                "--log-every", str(LOG_EVERY), "--runs-dir", str(runs_dir), "--name", backend, "--device", "cpu",
                "--no-report"]
        try:
            seconds, peak = timed_process(argv)
        except UsageError as err:
            rates[backend] = {"error": str(err)}
            continue
        rates[backend] = {**train_rates(Path(runs_dir) / backend / "metrics.jsonl", batch_size), "process_s": seconds,
                          "peak_rss_mb": peak}
    return rates


def report(r):
    """The scale table (markdown): one line per figure."""
    from bench.results_folder import fmt, markdown_table
    lines = [("ingest photos/s per worker", fmt(r["ingest"]["per_worker"], 1) +
              f" ({r['ingest']['photos']:,} photos in {r['ingest']['seconds']:.0f} s on {r['ingest']['workers']} "
              f"workers, peak RSS {r['ingest']['peak_rss_mb']:,.0f} MB)"),
             ("dataset bytes per photo", f"{r['footprint']['per_photo']:,.0f} (shards "
              f"{r['footprint']['shards_per_photo']:,.0f}, betons {r['footprint']['betons_per_photo']:,.0f}, cache "
              f"{r['footprint']['cache_per_photo']:,.0f}; {r['footprint']['bytes'] / 1e9:.2f} GB in all)"),
             ("--verify s per GB", fmt(r["verify"]["s_per_gb"], 1) + f" ({r['verify']['seconds']:.1f} s)")]
    lines += [(f"start-up check {b}, first / later s", f"{c['first_s']:.2f} / {c['later_s']:.3f}")
              for b, c in r["startup"].items()]
    res = r["resident"]
    if res:
        lines.append(("resident build", f"failed: {res['error']}" if res.get("error") else
                      f"{res['build_s']:.1f} s, peak RSS {res['peak_rss_mb']:,.0f} MB, then "
                      f"{res['images_per_sec']:,.0f} img/s"))
    lines += [(f"train {b}: img/s, data stall", f"failed: {t['error']}" if t.get("error") else
               f"{t['images_per_sec']:,.0f}, {t['data_stall']:.0%} ({t['steps']} steps)")
              for b, t in r["train"].items()]
    return markdown_table(lines, [("figure", lambda line: line[0]), ("value", lambda line: line[1])])


def parse(argv):
    from ingest.layout import DEFAULT_OUT
    from loaders import BACKENDS
    p = Parser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_OUT, help="an ingested dataset (its source is re-ingested)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="ingest worker processes")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated loaders to check and train with")
    p.add_argument("--steps", type=int, default=60, help="training steps per backend (> 5: the first 5 are start-up)")
    p.add_argument("--res", type=int, default=112, help="training and resident resolution, px")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--scratch", type=Path, default=None,
                   help="where the re-ingested copy goes (default: beside --data)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/scale-<time>)")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if set(args.backends) - set(BACKENDS):
        raise UsageError(f"unknown backend(s) in --backends: choose from {', '.join(BACKENDS)}")
    if args.steps <= LOG_EVERY or args.workers < 1:
        raise UsageError(f"--steps must be > {LOG_EVERY} and --workers >= 1")
    return args


def main(argv=None):
    from bench.results_folder import environment, machine_label, new_results_dir, write_config
    from files import write_json, write_text
    from ingest.layout import read_manifest
    args = parse(argv)
    manifest = read_manifest(args.data)
    src = Path(manifest["source"])
    if not src.is_dir():
        raise UsageError(f"the source of {args.data}, {src}, is gone: bench.scale re-ingests it")
    scratch = args.scratch or args.data.resolve().with_name(f".{args.data.resolve().name}.scale")
    if scratch.exists():
        raise UsageError(f"{scratch} exists (a bench.scale left it?): delete it or pass another --scratch")
    out = args.out or new_results_dir("scale")
    write_config(out, {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    load = [os.getloadavg()[0]]
    try:
        data = scratch / "data"
        r = {"ingest": ingest(src, data, args.workers, manifest["store_size"])}
        r["footprint"] = footprint(data, r["ingest"]["photos"])
        r["verify"] = verify(data, r["footprint"]["bytes"])
        r["startup"] = startup_checks(data, args.backends)
        load.append(os.getloadavg()[0])
        r["resident"] = resident_build(data, args.res, args.batch_size) if "resident" in args.backends else {}
        r["train"] = training(data, args.backends, steps=args.steps, res=args.res, batch_size=args.batch_size,
                              runs_dir=scratch / "runs")
        load.append(os.getloadavg()[0])
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    title = (f"bench.scale on {args.data} ({r['ingest']['photos']:,} photos from {src}, stored at "
             f"{manifest['store_size']} px), {machine_label(environment())}, 1-min load average "
             f"{min(load):.1f}-{max(load):.1f}; train: net flat, res {args.res}, batch {args.batch_size}, "
             f"{args.steps} steps (the first {LOG_EVERY} left out)")
    text = f"# {title}\n\n{report(r)}"
    write_json(out / "results.json", {"title": title, **r})
    write_text(out / "table.md", text)
    print(text + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    run(main)
