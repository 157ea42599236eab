"""predict.py's throughput against the plain per-photo loop a user writes first: PIL open + EXIF upright + RGB,
the classic torchvision test transform (loaders.folder's, the baseline of every loader figure), the model on one
photo at a time. Both classify the same demo photos (long side 500-1,100 px, as the 500px study's), rounds
interleaved so that background load hits both alike; medians and ranges over the rounds. predict's figure
includes starting its worker pool, as a user meets it.

`python -m bench.predict --run runs/<name> [--per-class 30] [--rounds 3] [--batch-size 16]` -> results/predict-
<time>/ (results.json, table.md).
"""
import os
import statistics
import time
from pathlib import Path

import torch

from bench.results_folder import environment, machine_label, new_results_dir
from cli import Parser, UsageError, run
from files import write_json, write_text
from ingest import demo
from loaders.common import resolve_workers
from loaders.folder import open_rgb, source_transform
from predict import predict_photos
from predicting.photos import find_photos
from predicting.tested import load_run

DATA = Path("data")


def plain_loop(tested, paths):
    """img/s of the per-photo loop: open, transform, model, one photo at a time, under the run's autocast."""
    transform = source_transform("none", tested.res)
    started = time.perf_counter()
    with torch.no_grad(), tested.autocast(torch.device("cpu")):
        for path in paths:
            tested.model(transform(open_rgb(path))[None]).float().softmax(1)
    return len(paths) / (time.perf_counter() - started)


def predict_rate(tested, photos, batch_size, workers):
    started = time.perf_counter()
    done = sum(1 for _, probs, _ in predict_photos(tested, photos, batch_size=batch_size, workers=workers,
                                                   progress=False) if probs is not None)
    if done != len(photos):
        raise RuntimeError(f"predict read {done} of {len(photos)} bench photos")
    return len(photos) / (time.perf_counter() - started)


def main(argv=None):
    p = Parser(prog="python -m bench.predict", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the trained run folder whose model classifies")
    p.add_argument("--per-class", type=int, default=30, help="demo photos per class (28 classes)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both ways")
    p.add_argument("--batch-size", type=int, default=16, help="predict's photos per forward pass")
    p.add_argument("--workers", type=int, default=None, help="predict's pool (default: one per core)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.per_class < 1 or args.batch_size < 1:
        raise UsageError("--rounds, --per-class and --batch-size must be >= 1")
    torch.set_num_threads(1)  # the model's share; predict's pool has the other cores, the plain loop leaves them idle
    tested = load_run(args.run)
    src = DATA / f"bench-predict-{args.per_class}"
    demo.generate(src, demo.DemoConfig(per_class=args.per_class, long_side=(500, 1100), junk=False))
    photos = find_photos([src])
    paths = [path for path, _ in photos]
    workers = resolve_workers(args.workers)
    load = os.getloadavg()
    rates = {"plain": [], "predict": []}
    for r in range(args.rounds):
        rates["plain"].append(plain_loop(tested, paths))
        rates["predict"].append(predict_rate(tested, photos, args.batch_size, workers))
        print(f"round {r + 1}/{args.rounds}: plain {rates['plain'][-1]:.1f} img/s, predict "
              f"{rates['predict'][-1]:.1f} img/s", flush=True)
    env = environment()
    median = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"predict vs the plain per-photo loop: {len(paths)} demo photos (long side 500-1,100 px, "
             f"{len(paths) / args.batch_size:.0f} batches of {args.batch_size}), run {tested.name} (res {tested.res}, "
             f"store {tested.ingested.store_size}, amp {tested.amp}), {args.rounds} interleaved rounds, "
             f"{machine_label(env)}", "",
             "| way | img/s median | range | speed-up |", "|---|---|---|---|"]
    for way, label in (("plain", "plain loop (PIL open, transform, model per photo)"),
                       ("predict", f"predict.py ({workers} workers, batch {args.batch_size})")):
        lines.append(f"| {label} | {median[way]:.1f} | {min(rates[way]):.1f}-{max(rates[way]):.1f} | "
                     f"{median[way] / median['plain']:.2f}x |")
    lines += ["", f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"]
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = new_results_dir("predict")
    write_text(out_dir / "table.md", table)
    write_json(out_dir / "results.json", {"config": vars(args), "photos": len(paths), "workers": workers,
                                          "img_s": rates, "median_img_s": median, **env})
    print(f"-> {out_dir}")


if __name__ == "__main__":
    run(main)
