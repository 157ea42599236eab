"""Loader-only bench: images/s of every backend x {train, test}, against the `folder` baseline, each library's
own recommended pipeline and the fastest decoder, all measured in the same run on the same cores.

`python -m bench.loaders [--data DIR|URL] [--res 224] [--batch-size 256] [--epochs 3] [--rounds 3] [--backends ...]
[--augments rrc,none]`
Each (backend, split, augment) runs in a fresh process (so its peak RSS is its own, and a crashing backend costs one
row): build the loader (time reported: DALI pipeline build, resident decode or cache load), one warm-up epoch
(worker start, numba compilation: reported, not counted), then `--epochs` timed epochs, whose median is the
round's figure. Rows are interleaved over `--rounds` rounds (every other one backwards); each row reports the
median and min-max of its rounds, and each ratio the range its two rows' rounds allow, "within noise" when that
spans 1.0 (bench.results_folder.ratio). The table warns of fewer than 3 rounds and of timed epochs under 50 batches:
the 1,259-photo demo's 5-batch epochs gave ffcv 0.69x, then 1.63x its reference (issue 20). Time to first
batch is build + the warm-up epoch's first batch. Beside the backends run the rows of bench/references.py:
`dali-reference` and `ffcv-reference` (the libraries' own example pipelines, added with their backend;
"× reference" is a backend's ratio to its library's) and decode-only rates of torchvision, PIL and DALI, the
fastest of which is the decode ceiling ("of ceiling"). The train split runs once per
`--augments` value (make_loader's augment; the libraries' rows only as rrc): with `none` an epoch needs no
random work, so the resident row shows memory-copy speed. Output under the results folder: table.md,
results.json (+ config.json), throughput.png and, per backend and augment, samples-<backend>[-<augment>].png:
its first train batch de-normalised, a visual check of what each loader feeds the model.

Over 300 lines: one measurement and everything its table says (the isolated child process, workers' memory,
rounds, ratios to the baseline, reference and ceiling, the plot, the sample sheets); the reference pipelines
themselves live in bench/references.py.
"""
import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from cli import Parser, UsageError, run

REPO = Path(__file__).resolve().parent.parent

BASELINE = "folder"
SPLITS = ("train", "test")
AUGMENTS = ("rrc", "none")  # the train split's, by default; the test split is always the test transform


# ---------------------------------------------------------------- measuring (in this process)

def measure(backend, data_dir, split="train", *, batch_size=256, res=224, device="auto", workers=None, epochs=3,
            seed=0, threads=None, augment="rrc", samples_png=None):
    """Loader-only throughput of one backend in this process: {images_per_sec (median of `epochs` timed epochs
    after a warm-up epoch), epoch_images_per_sec, warmup_s, build_s, samples, peak_rss_mb, peak_worker_rss_mb}.

    backend may also be a row of bench/references.py (which ignore `augment`). Peak RSS is this process's
    high-water mark so far, so it is the backend's own only in a fresh process (see isolated). `threads` sets
    torch's intra-op threads here. `samples_png`: where to draw the warm-up epoch's first batch (untimed)."""
    import torch
    from bench.references import LIBRARY, ROWS
    from loaders import BACKENDS, make_loader
    from loaders.common import resolve_device

    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1 (got {epochs})")
    device = resolve_device(device)
    if threads and threads != torch.get_num_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure(backend, data_dir, split, batch_size=batch_size, res=res, device=device,
                           workers=workers, epochs=epochs, seed=seed, augment=augment, samples_png=samples_png)
        finally:
            torch.set_num_threads(before)
    importlib.import_module(BACKENDS.get(backend) or LIBRARY[backend])  # import (seconds) is not build time
    started = time.perf_counter()
    if backend in ROWS:
        loader = ROWS[backend](data_dir, split, batch_size=batch_size, res=res, device=device, seed=seed,
                               workers=workers)
    else:
        loader = make_loader(backend, data_dir, split, batch_size=batch_size, res=res, device=str(device),
                             seed=seed, workers=workers, augment=augment)
    build_s = time.perf_counter() - started
    seconds, counts, batch, first_batch_s, first = [], [], None, None, None
    with WorkerRss() as workers_rss:
        for epoch in range(epochs + 1):
            loader.set_epoch(epoch)
            started, count = time.perf_counter(), 0
            for batch in loader:
                count += batch[1].numel()  # the labels: what the loader really gave, not what it claims
                if first_batch_s is None:  # loader only: each batch is ready (on the device) when handed over
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    first_batch_s = build_s + time.perf_counter() - started
                    if samples_png:  # in the untimed warm-up epoch; a copy, as loaders reuse their buffers
                        first = [t.to("cpu", copy=True) for t in batch[:2]]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
            counts.append(count)
    del loader, batch
    gc.collect()
    rates = [n / s for n, s in zip(counts[1:], seconds[1:])]
    row = {"backend": backend, "split": split, "augment": augment, "images_per_sec": statistics.median(rates),
           "epoch_images_per_sec": rates, "warmup_s": seconds[0], "build_s": build_s,
           "first_batch_s": first_batch_s, "samples": counts[-1],
           "device": str(device), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_worker_rss_mb": workers_rss.peak_mb or None}
    if first is not None:  # after the peak RSS is read: drawing is no part of the loader
        from ingest.layout import read_manifest
        from report.images import plot_samples
        plot_samples(*first, read_manifest(data_dir)["classes"], Path(samples_png))
    return row


class WorkerRss:
    """Peak summed RSS of this process's children (DataLoader workers), sampled every `interval` s.

    getrusage(RUSAGE_CHILDREN) cannot say it: importing torch already runs a large child. Reading
    /proc/<pid>/statm is cheap enough not to disturb the timing; pages shared between workers count once
    per worker, so this is an upper bound."""

    def __init__(self, interval=0.2):
        self.interval, self.peak_mb, self._stop = interval, 0.0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        import psutil
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)


def isolated(backend, data_dir, split, timeout=1800, **kwargs):
    """measure() in a fresh `python -m bench.loaders --child` process; a failure becomes {error: last line}."""
    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        out = Path(tmp) / "row.json"
        params = {"backend": backend, "data_dir": str(Path(data_dir).resolve()), "split": split, **kwargs}
        try:
            done = subprocess.run([sys.executable, "-m", "bench.loaders", "--child", json.dumps(params), str(out)],
                                  capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"backend": backend, "split": split, "augment": kwargs.get("augment"),
                    "error": f"timed out after {timeout} s"}
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        return {"backend": backend, "split": split, "augment": kwargs.get("augment"), "error": lines[-1][:300]}


# ---------------------------------------------------------------- the report

def merge_rounds(runs):
    """One row from a cell's rounds: `rate`, the spread (median, min-max) of the rounds' rates (each the median
    of its round's timed epochs), every timed epoch's rate, the worst peak RSS."""
    from bench.results_folder import spread
    ok = [r for r in runs if not r.get("error")]
    if not ok:
        return runs[-1]
    rate = spread([r["images_per_sec"] for r in ok])
    worst = lambda key: max((r[key] for r in ok if r.get(key) is not None), default=None)  # noqa: E731
    return {**ok[0], "images_per_sec": rate["median"], "rate": rate,
            "epoch_images_per_sec": [e for r in ok for e in r["epoch_images_per_sec"]],
            "warmup_s": statistics.median(r["warmup_s"] for r in ok),
            "build_s": statistics.median(r["build_s"] for r in ok),
            "first_batch_s": statistics.median(r["first_batch_s"] for r in ok), "peak_rss_mb": worst("peak_rss_mb"),
            "peak_worker_rss_mb": worst("peak_worker_rss_mb"), "rounds": len(ok),
            "load_avg_1min": [r["load_avg_1min"] for r in runs]}


def cells(backends, splits, augments):
    """The (backend, split, augment) rows to measure: fastpix's loaders (folder too) on the train split once per
    augment, the libraries' reference pipelines as they are (rrc), decode-only rows with no augment (None);
    the test split is always the test transform (none)."""
    from loaders import BACKENDS
    from bench.references import DECODERS
    return [(b, s, a) for b in backends for s in splits
            for a in ((None,) if b in DECODERS else augments if s == "train" and b in BACKENDS else
                      (DEFAULT_AUGMENT[s],))]


DEFAULT_AUGMENT = {"train": "rrc", "test": "none"}  # the libraries' rows and the targets compare at these


def augment_of(row):
    """A row's augment; decode-only rows (None) stand with their split's default."""
    return row.get("augment") or DEFAULT_AUGMENT[row["split"]]


def add_ratios(rows):
    """Each row's ratio to the folder baseline and to its library's reference pipeline of the same split and
    augment (decode-only rows: the split's default augment), and to the decode ceiling (the decode-only row of
    the split with the fastest median, measured in the same rounds); the ceiling row gets `ceiling: True`.
    Every ratio is bench.results_folder.ratio: its median and the range its rows' rounds allow."""
    from bench.references import DECODERS, REFERENCES
    from bench.results_folder import ratio, spread
    ok = {(r["backend"], r["split"], augment_of(r)): r.get("rate") or spread([r["images_per_sec"]])
          for r in rows if not r.get("error")}
    for split in {r["split"] for r in rows}:
        decoders = [(rate["median"], d) for (d, s, _), rate in ok.items() if d in DECODERS and s == split]
        fastest = max(decoders)[1] if decoders else None
        ceiling = ok.get((fastest, split, DEFAULT_AUGMENT[split]))
        for r in (r for r in rows if r["split"] == split):
            key = (split, augment_of(r))
            rate = ok.get((r["backend"], *key))
            r["vs_folder"] = ratio(rate, ok.get((BASELINE, *key)))
            r["vs_reference"] = ratio(rate, ok.get((REFERENCES.get(r["backend"]), *key)))
            r["vs_ceiling"] = ratio(rate, ceiling)
            r["ceiling"] = r["backend"] == fastest
    return rows


def targets(rows, split="train", augment=None):
    """The issue's targets on one split and augment (default: the split's): best backend vs folder and vs the
    ceiling, the slowest vs folder, each backend vs its library's reference."""
    from loaders import BACKENDS
    augment = augment or DEFAULT_AUGMENT[split]
    loaders = [r for r in rows if r["split"] == split and augment_of(r) == augment and r.get("vs_folder")
               and r["backend"] in BACKENDS and r["backend"] != BASELINE]
    if not loaders:
        return {}
    best = max(loaders, key=lambda r: r["vs_folder"]["median"])
    slowest = min(loaders, key=lambda r: r["vs_folder"]["median"])
    resident = next((r["vs_folder"] for r in loaders if r["backend"] == "resident"), None)
    return {"split": split, "best": best["backend"], "best_vs_folder": best["vs_folder"],
            "best_vs_ceiling": best["vs_ceiling"], "slowest": slowest["backend"],
            "slowest_vs_folder": slowest["vs_folder"], "resident_vs_folder": resident,
            "ceiling": next((r["backend"] for r in rows if r["split"] == split and r.get("ceiling")), None),
            "vs_reference": {r["backend"]: r["vs_reference"] for r in loaders if r.get("vs_reference")}}


def table(rows):
    from bench.results_folder import fmt_ratio, fmt_spread, markdown_table, spread

    def number(key, form):
        return lambda r: form.format(r[key]) if r.get(key) is not None else "–"

    columns = [("backend", lambda r: r["backend"] + (" (ceiling)" if r.get("ceiling") else "")),
               ("split", lambda r: r["split"]),
               ("augment", lambda r: r.get("augment") or "–"),
               ("img/s median (min-max of rounds)", lambda r: f"failed: {r['error'][:80]}" if r.get("error") else
                fmt_spread(r.get("rate") or spread([r["images_per_sec"]]))),
               ("× folder", lambda r: "baseline" if r["backend"] == BASELINE else fmt_ratio(r.get("vs_folder"))),
               ("× reference", lambda r: fmt_ratio(r.get("vs_reference"))),
               ("of ceiling", lambda r: fmt_ratio(r.get("vs_ceiling"))),
               ("build s", number("build_s", "{:.2f}")),
               ("first batch s", number("first_batch_s", "{:.2f}")),
               ("warm-up epoch s", number("warmup_s", "{:.2f}")),
               ("peak RSS MB", number("peak_rss_mb", "{:,.0f}")),
               ("workers' RSS MB", number("peak_worker_rss_mb", "{:,.0f}"))]
    return markdown_table(rows, columns)


def plot(rows, path, title):
    """Horizontal bars, one per pass (train with each augment, test) side by side per backend, each labelled
    with its ratio to folder."""
    import numpy as np
    from bench.comparison_plots import plt, save

    def pass_of(r):
        return r["split"] if augment_of(r) == DEFAULT_AUGMENT[r["split"]] else f"{r['split']} {augment_of(r)}"

    names = list(dict.fromkeys(r["backend"] for r in rows))
    passes = list(dict.fromkeys(pass_of(r) for r in sorted(rows, key=lambda r: r["split"] != "train")))
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(passes) * len(names) + 1.5))
    y, width = np.arange(len(names)), 0.8 / len(passes)
    right = max([r.get("images_per_sec") or 0 for r in rows] + [1])
    for k, label in enumerate(passes):
        shift = (k - (len(passes) - 1) / 2) * width
        by_name = {r["backend"]: r for r in rows if pass_of(r) == label}
        rates = [by_name.get(n, {}).get("images_per_sec") or 0 for n in names]
        ax.barh(y + shift, rates, width, label=label)
        for i, n in enumerate(names):
            row = by_name.get(n, {})
            note = "failed" if row.get("error") else \
                f"{row['vs_folder']['median']:.1f}× folder" if row.get("vs_folder") else ""
            ax.text(rates[i] + right * 0.01, i + shift, note, va="center", fontsize=8)
    ceilings = {r["backend"] for r in rows if r.get("ceiling")}
    ax.set_yticks(y, [n + (" (ceiling)" if n in ceilings else "") for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, right * 1.3)
    ax.set_xlabel("images / s (loader only, median over epochs)")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    save(fig, path)


def warnings(rows, args):
    """What makes this table's figures not hold (--quick says so itself): too few rounds, short timed epochs."""
    from bench.results_folder import MIN_BATCHES, MIN_ROUNDS
    if args.quick:
        return ["--quick: 1 timed epoch, 1 round, a smoke run: not a measurement"]
    said = []
    if args.rounds < MIN_ROUNDS:
        said.append(f"{args.rounds} round(s): fewer than {MIN_ROUNDS} give no idea of the noise")
    short = sorted({(r["split"], -(-r["samples"] // args.batch_size)) for r in rows if r.get("samples")
                    and r["samples"] < MIN_BATCHES * args.batch_size})
    if short:
        said.append("timed epochs of " + ", ".join(f"{n} batches ({s})" for s, n in short)
                    + f", fewer than {MIN_BATCHES}: figures from epochs this short do not hold "
                    "(use the 28,000-photo demo: ingest/demo.py --per-class 1000)")
    return said


def summary_line(split, t):
    """The targets of one split and augment in one line, every ratio with its range."""
    from bench.results_folder import fmt_ratio
    return (f"- {split}: best {t['best']} {fmt_ratio(t['best_vs_folder'])} folder, "
            f"{fmt_ratio(t['best_vs_ceiling'])} the decode ceiling ({t['ceiling']}); slowest {t['slowest']} "
            f"{fmt_ratio(t['slowest_vs_folder'])} folder"
            + (f"; resident {fmt_ratio(t['resident_vs_folder'])} folder" if t.get("resident_vs_folder") else "")
            + "".join(f"; {b} {fmt_ratio(v)} its reference" for b, v in t["vs_reference"].items()) + "\n")


# ---------------------------------------------------------------- command line

def parse(argv):
    from bench.references import DECODERS, REFERENCES
    from bench.results_folder import MIN_ROUNDS
    from ingest.layout import DEFAULT_OUT
    from loaders import BACKENDS
    from loaders.common import check_augment
    p = Parser(prog="python -m bench.loaders", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DEFAULT_OUT),
                   help="an ingested dataset: a folder, or the URL of a published one (fetched into --cache-dir)")
    p.add_argument("--cache-dir", default=None, help="where a URL's dataset is cached (default ~/.cache/fastpix)")
    p.add_argument("--res", type=int, default=224, help="output resolution, px")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up one")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated; folder and the decoders are always added, dali-reference and "
                        "ffcv-reference with dali and ffcv (default: all)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated")
    p.add_argument("--augments", default=",".join(AUGMENTS),
                   help="comma-separated make_loader augments of the train split's loader rows (rrc, flip, none)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="loader workers/threads (default: each backend's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads of the measuring process (default torch's: one per core); 1 avoids "
                        "stalls at every parallel op when other processes share the cores")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/loaders-<time>)")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                   help=f"repeat the whole matrix, alternating the order; each row reports the median and min-max of "
                        f"its rounds (fewer than {MIN_ROUNDS}: a warning in the table)")
    p.add_argument("--quick", action="store_true", help="1 timed epoch, 1 round: a smoke run, not a measurement")
    p.add_argument("--in-process", action="store_true",
                   help="no fresh process per row: faster, but peak RSS then accumulates over rows")
    p.add_argument("--child", nargs=2, metavar=("PARAMS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [b for b in args.backends.split(",") if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(BACKENDS)}")
    args.backends = [*DECODERS, BASELINE] + [row for b in names if b != BASELINE
                                             for row in (b, REFERENCES.get(b)) if row]
    args.splits = [s for s in args.splits.split(",") if s]
    if not args.splits or set(args.splits) - set(SPLITS):
        raise UsageError(f"--splits must be a comma-separated subset of {', '.join(SPLITS)}")
    args.augments = [a for a in args.augments.split(",") if a]
    for augment in args.augments or [""]:
        check_augment(augment)
    if args.quick:
        args.epochs = args.rounds = 1
    if min(args.epochs, args.batch_size, args.rounds) < 1 or args.res < 8:
        raise UsageError("--epochs, --batch-size and --rounds must be >= 1 and --res >= 8")
    return args


def main(argv=None):
    args = parse(argv)
    if args.child:
        from files import write_json
        write_json(args.child[1], measure(**json.loads(args.child[0])))
        return 0
    from tqdm import tqdm

    from bench.results_folder import environment, machine_label, new_results_dir, write_config
    from files import write_json, write_text
    from ingest.layout import read_manifest
    from ingest.remote import local_folder
    from loaders import BACKENDS
    from loaders.common import resolve_device

    data = Path(local_folder(args.data, args.cache_dir))  # a URL: fetched once, here, then read locally
    manifest = read_manifest(data)
    device = str(resolve_device(args.device))
    out = args.out or new_results_dir("loaders")
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(batch_size=args.batch_size, res=args.res, device=device, workers=args.workers, epochs=args.epochs,
                    threads=args.threads)
    write_config(out, {**settings, "data": str(args.data), "backends": args.backends, "rounds": args.rounds,
                       "in_process": args.in_process, "augments": args.augments})
    rows_to_run = cells(args.backends, args.splits, args.augments)
    # Every other round runs the rows backwards, so a load that drifts during the run (a shared machine)
    # weighs on all backends alike instead of on the last ones.
    order = [cell for r in range(args.rounds) for cell in (rows_to_run if r % 2 == 0 else rows_to_run[::-1])]
    runs = {cell: [] for cell in rows_to_run}
    for backend, split, augment in tqdm(order, desc="bench.loaders", unit="row", disable=None):
        sheet = out / f"samples-{backend}{'' if augment == 'rrc' else f'-{augment}'}.png" \
            if split == "train" and backend in BACKENDS else None
        options = dict(settings, augment=augment, samples_png=sheet and str(sheet))
        if args.in_process:
            try:
                row = measure(backend, data, split, **options)
            except Exception as err:  # one failing backend costs one row, as in a fresh process
                row = {"backend": backend, "split": split, "augment": augment, "error": f"{type(err).__name__}: {err}"}
        else:
            row = isolated(backend, data, split, **options)
        runs[(backend, split, augment)].append({**row, "load_avg_1min": os.getloadavg()[0]})
    rows = add_ratios([merge_rounds(runs[cell]) for cell in rows_to_run])
    env = environment()
    loads = [r["load_avg_1min"] for cell in runs.values() for r in cell]
    title = (f"loader only, res {args.res}, batch {args.batch_size}, {manifest['splits']['train']['count']} train "
             f"images stored at {manifest['store_size']} px, {machine_label(env)}, device {device}, {args.rounds} "
             f"round(s), 1-min load average {min(loads):.1f}-{max(loads):.1f} (2 cores: above 2, others ran too)")
    summary = {s: targets(rows, s) for s in args.splits}
    if "train" in args.splits:
        summary.update({f"train-{a}": targets(rows, "train", a) for a in args.augments if a != "rrc"})
    write_json(out / "results.json", {"title": title, "settings": settings, "rows": rows, "targets": summary})
    text = f"# {title}\n\n" + "".join(f"**warning:** {w}\n\n" for w in warnings(rows, args)) + table(rows) + \
        "\n" + "".join(summary_line(s, t) for s, t in summary.items() if t and t.get("best_vs_ceiling"))
    write_text(out / "table.md", text)
    plot(rows, out / "throughput.png", title)
    print(text + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    run(main)
