"""The README demo, one command on a fresh set-up: `python -m bench.demo`.

Generates the 500px-like demo photos (ingest/demo.py), ingests them (ingest/build.py), trains flat for a
few epochs with the fastest loader here, then runs a quick bench against the folder baseline. Every stage
reuses what is already there, so a second run skips straight to the training. A few minutes on 2 CPU cores.
"""
import time
from dataclasses import replace
from pathlib import Path

from cli import Parser, UsageError, run
from ingest import layout


def make_demo_data(out, per_class=None, src=None, progress=True, force=False):
    """Generate (once) and ingest (once) the demo dataset; returns the manifest. An `out` holding anything
    but the demo ingested from `src` is refused with one line unless `force`: it may be someone's dataset."""
    from ingest.build import build
    from ingest.config import IngestConfig
    from ingest.demo import DemoConfig, generate
    out = Path(out)
    src = Path(src) if src else (layout.DEFAULT_SRC if per_class is None else out.parent / f"demo-{per_class}")
    if not force:
        _refuse_other_data(out, src)
    generate(src, DemoConfig() if per_class is None else DemoConfig(per_class=per_class), progress=progress)
    return build(IngestConfig(src=src, out=out, force=force), progress=progress)


def _refuse_other_data(out, src):
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        source = layout.read_manifest(out)["source"]
    except UsageError:
        source = None
    if source is None or Path(source) != src.resolve():
        what = f"a dataset ingested from {source}" if source else "files that are not a demo dataset"
        raise UsageError(f"--data {out} holds {what}; the demo never replaces it: choose another --data, or pass "
                         "--force to replace it with the demo")


def main(argv=None):
    p = Parser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=layout.DEFAULT_OUT,
                   help="ingested demo dataset (made if missing; another dataset there is refused)")
    p.add_argument("--force", action="store_true", help="replace whatever --data holds with the demo")
    p.add_argument("--per-class", type=int, default=None,
                   help="photos per class of a smaller or larger demo (default: the demo's 50, in data/demo-500px)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the demo training run")
    p.add_argument("--res", type=int, default=112, help="training resolution (the study used 224)")
    p.add_argument("--loader", default="dali", help="loader of the demo training run")
    p.add_argument("--bench-loaders", default="folder,dali",
                   help="loaders the demo bench compares (python -m bench for all of them)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        raise UsageError("--epochs must be >= 2 (images/s is the median of epochs 2+)")
    if args.per_class is not None and args.per_class < 4:
        raise UsageError(f"--per-class must be >= 4 (a test share and a batch of each class), got {args.per_class}")
    started = time.perf_counter()

    print("== 1/3 demo photos and ingest (skipped when up to date)")
    make_demo_data(args.data, per_class=args.per_class, force=args.force)

    print(f"== 2/3 train flat for {args.epochs} epochs with the {args.loader} loader")
    import train
    summary = train.train(train.Config(net="flat", loader=args.loader, data=str(args.data), epochs=args.epochs,
                                       res=args.res, batch_size=64,
                                       name=f"demo-flat-{args.loader}-{time.strftime('%Y%m%d-%H%M%S')}"))
    print(f"   test accuracy {summary['test_acc']:.3f} [{summary['test_acc_ci'][0]:.3f}, "
          f"{summary['test_acc_ci'][1]:.3f}] (chance ~{1 / 28:.3f}), {summary['images_per_sec']:.0f} img/s; "
          f"plots in {summary['run_dir']}")

    print("== 3/3 quick bench against the folder baseline")
    from bench.run import QUICK, BenchConfig, bench
    cfg = replace(BenchConfig(data=args.data, loaders=tuple(args.bench_loaders.split(","))), **QUICK)
    out_dir, _ = bench(cfg)
    print(f"demo done in {time.perf_counter() - started:.0f} s: training run {summary['run_dir']}, bench {out_dir}")
    return 0


if __name__ == "__main__":
    run(main)
