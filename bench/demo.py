"""The README demo, one command on a fresh set-up: `python -m bench.demo`.

Generates the 500px-like demo photos (ingest/demo.py), ingests them (ingest/build.py), trains flat for a
few epochs with the fastest loader here, then runs a quick bench against the folder baseline. Every stage
reuses what is already there, so a second run skips straight to the training. A few minutes on 2 CPU cores.
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench import train_config
from cli import Parser, UsageError, add_options, config_from, names, option, run
from ingest import layout


@dataclass
class DemoRun:
    """Every option of the demo, each declared once with its flag (`cli.option`); checked in `main`."""
    data: Path = option(layout.DEFAULT_OUT, "ingested demo dataset (made if missing; another dataset there is "
                        "refused)")
    force: bool = option(False, "replace whatever --data holds with the demo")
    per_class: int | None = option(None, "photos per class of a smaller or larger demo (default: the demo's 50, "
                                   "in data/demo-500px)")
    epochs: int = option(2, "epochs of the demo training run")
    res: int = option(112, "training resolution (the study used 224)")
    loader: str = option("dali", "loader of the demo training run")
    bench_loaders: tuple = option(("folder", "dali"), "loaders the demo bench compares (default: folder,dali; "
                                  "python -m bench for all of them)", parse=names)


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
    args = config_from(DemoRun, add_options(p, DemoRun).parse_args(argv))
    if args.epochs < 2:
        raise UsageError("--epochs must be >= 2 (images/s is the median of epochs 2+)")
    if args.per_class is not None and args.per_class < 4:
        raise UsageError(f"--per-class must be >= 4 (a test share and a batch of each class), got {args.per_class}")
    started = time.perf_counter()

    print("== 1/3 demo photos and ingest (skipped when up to date)")
    make_demo_data(args.data, per_class=args.per_class, force=args.force)

    print(f"== 2/3 train flat for {args.epochs} epochs with the {args.loader} loader")
    import train
    summary = train.train(train_config(args, net="flat", batch_size=64,
                                       name=f"demo-flat-{args.loader}-{time.strftime('%Y%m%d-%H%M%S')}"))
    from report.render import render
    render(summary["run_dir"])
    print(f"   test accuracy {summary['test_acc']:.3f} [{summary['test_acc_ci'][0]:.3f}, "
          f"{summary['test_acc_ci'][1]:.3f}] (chance ~{1 / 28:.3f}), {summary['images_per_sec']:.0f} img/s; "
          f"plots in {summary['run_dir']}")

    print("== 3/3 quick bench against the folder baseline")
    from bench.run import QUICK, BenchConfig, bench
    cfg = replace(BenchConfig(data=args.data, loaders=args.bench_loaders), **QUICK)
    out_dir, _ = bench(cfg)
    print(f"demo done in {time.perf_counter() - started:.0f} s: training run {summary['run_dir']}, bench {out_dir}")
    return 0


if __name__ == "__main__":
    run(main)
