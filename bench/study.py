"""The 500px study, reproducible: each experiment is one command, resumable, and writes its plots and table.

    python -m bench.study nets|strides|kernels|regularization|optimizers|transfer|merge|all [--data DIR] ...

1. nets: alexnet, flat and narrow; loss per iteration (rolling mean and std over 50 iterations), train/test
   accuracy per epoch.  2. strides and 3. kernels of flat: a small grid, accuracy, images/s, feature-map size
   and MACs per setting.  4. regularization of flat: none vs dropout 0.5 vs batch norm vs weight decay x10 vs
augmentation rrc (RandomResizedCrop + flip), each alone.
5. optimizers: one epoch of plain SGD, checkpointed, then continued from that checkpoint with SGD+momentum,
   Adam and RMSprop for the same number of epochs, each at its own LR range test's suggestion (--lr auto).
6. transfer: resnet18 from local ImageNet weights (--pretrained PATH), head only vs full fine-tune; skipped
   with a note when no weights are given.  7. merge: the nets experiment's flat run's most confused pair,
   trained as one class, against flat. `all` also writes <out>/report.md (report/study_report.py).

Every run is cached in <out>/runs/<run>.json with the exact train.Config it ran (its run folder is
<out>/train/<run>/); a rerun reuses a cached run whose config and data (fingerprint) are unchanged, and
continues (train --resume) one that was interrupted. The study writes only into an --out it made (marker
.fastpix-study) and replaces only runs of its own. Experiments share runs: flat with AlexNet's strides and kernels is trained once.
Every run trains on the study's own pipeline, resize + center crop with no augmentation (train.py --augment
none), except the regularization experiment's augmentation row.
The defaults fit the demo data on a 2-core CPU well under an hour; raise --epochs/--res for a GPU.

Over 300 lines: seven experiments, each a short function over the one cached, resumable `run`; their plots
are bench/comparison_plots.py's and the report is report/study_report.py's.
"""
import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from bench import train_config
from bench.results_folder import environment, fmt, fmt_ci, held, machine_label, markdown_table, write_config
from cli import Parser, UsageError, add_options, check_options, config_from, names, option, seed_option
from files import as_read_back, read_json, seal, sealed, write_json, write_text
from ingest.layout import DEFAULT_OUT, read_manifest
from report.runlog import read_metrics
from training.device import DEVICES
from training.labels import merge_spec
from training.lr_find import MIN_SWEEP

EXPERIMENTS = ("nets", "strides", "kernels", "regularization", "optimizers", "transfer", "merge")


def int_tuples(text):
    """'4,1,1 2,1,1' -> ((4, 1, 1), (2, 1, 1))."""
    try:
        return tuple(tuple(int(v) for v in part.split(",")) for part in text.split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected space-separated groups like 4,1,1, got {text!r}") from None


@dataclass
class StudyConfig:
    """Every option of the study, each declared once with its flag (`cli.option`)."""
    data: Path = option(DEFAULT_OUT, "ingested dataset")
    out: Path = option(Path("results/study"), "results folder, one folder per experiment below it (runs cached "
                       "there)")
    loader: str = option("dali", "loader backend for every run (fastest CPU backend here; the loader does not "
                         "change what is learnt)")
    epochs: int = option(3, "epochs per run (the 11 runs took 48 min on the demo data on 2 shared CPU cores)",
                         minimum=1)
    batch_size: int = option(64, "batch size (~20 steps per epoch on the demo data: enough iterations for the "
                             "rolling curves)")
    res: int = option(112, "training resolution (the study used 224; 112 keeps the whole study under an hour on "
                      "2 CPU cores)")
    lr: float = option(0.01, "SGD peak learning rate (the optimizers experiment finds its own: --lr auto)")
    find_lr_steps: int = option(200, "steps of each optimizer's LR range test", minimum=MIN_SWEEP)
    device: str = option("auto", "auto, cpu or cuda", choices=DEVICES)
    amp: str = option("auto", "auto, bf16, fp16 or off")
    seed: int = seed_option("seed of every run")
    workers: int | None = option(None, "loader workers (default: the backend's)")
    nets: tuple = ("alexnet", "flat", "narrow")
    strides: tuple = option(((2, 1, 1), (4, 1, 1), (6, 1, 1)), "stride settings of flat to compare (around "
                            "AlexNet's 4)", parse=int_tuples, metavar="'4,1,1 2,1,1'")
    kernels: tuple = option(((7, 5, 3), (11, 5, 3), (15, 5, 3)), "kernel-size settings of flat to compare "
                            "(around AlexNet's 11)", parse=int_tuples, metavar="'11,5,3 7,5,3'")
    warm_epochs: int = option(1, "plain-SGD epochs before the optimizers (every optimizer continues from them)",
                              minimum=1)
    optimizers: tuple = option(("sgd+momentum", "adam", "rmsprop"), "continuations to compare, from "
                               "sgd+momentum,adam,rmsprop", parse=names)
    regularization: tuple = option(("none", "dropout 0.5", "batch norm", "weight decay x10", "augmentation rrc"),
                                   "regularisers to compare, from none,dropout 0.5,batch norm,weight decay x10,"
                                   "augmentation rrc", parse=names)
    pretrained: Path | None = option(None, "resnet18 ImageNet state dict (local file; nothing is downloaded)")
    bootstrap: int = option(1000, "bootstrap resamples for the 95 % intervals")


# The study's options that train.Config also has, but not for every run: strides, kernels and pretrained are
# the grids and the weights of one experiment each, find_lr_steps is the optimizers experiment's.
NOT_EVERY_RUN = ("strides", "kernels", "pretrained", "find_lr_steps")


# ---------------------------------------------------------------- runs (cached, resumable)

def run(study, name, **overrides):
    """One training run, reusing its cached result when the config is unchanged. Runs are shared by all
    experiments (flat with AlexNet's strides is the same run in nets, strides and kernels), so names say
    what a run is, never which experiment asked for it."""
    import train
    from training.runfolder import remove_run
    runs_dir = Path(study.out) / "train"
    cfg = train_config(study, exclude=NOT_EVERY_RUN, name=name, runs_dir=str(runs_dir),
                       **{"augment": "none", **overrides})  # the study's own pipeline, unless a run says otherwise
    train.check(cfg)  # settled as train.py records it, so that the key compares what is trained with what was
    wanted = {"config": as_read_back(cfg), "data_fingerprint": read_manifest(study.data)["fingerprint"]}
    cache = Path(study.out) / "runs" / f"{name}.json"
    cached = read_cache(cache, wanted)
    if cached is not None:
        return cached
    run_dir = runs_dir / name
    try:
        saved = read_json(run_dir / "config.json")
    except (OSError, ValueError):
        saved = {}
    if (run_dir / train.CHECKPOINT).is_file() and {k: saved.get(k) for k in wanted} == wanted:
        summary = train.train(replace(cfg, resume=str(run_dir)))  # interrupted earlier: continue it exactly
    else:
        if run_dir.exists():  # another config, other data, or a checkpoint-less attempt: start it afresh
            remove_run(run_dir)
        summary = train.train(cfg)
    steps, epochs = read_metrics(summary["run_dir"])
    result = {**wanted, "summary": summary,
              "loss": {"step": [s["step"] for s in steps], "loss": [s["loss"] for s in steps]},
              "epochs": [{k: e[k] for k in ("epoch", "train_acc", "test_acc", "test_acc_ci", "images_per_sec")}
                         for e in epochs]}
    write_json(cache, seal(result))
    return result


def read_cache(path, wanted):
    """A cached run's result when it is intact and made for `wanted` (its settled config and the data's
    fingerprint, sealed in it; older entries also hold their sha256 as "key", which is not needed); None when
    missing or stale, or damaged: that is said in one line, and the caller rebuilds it from its run folder, never
    trusting it."""
    entry = read_cached_run(path)
    if entry is None and Path(path).is_file():
        tqdm.write(f"study: {path} is damaged (not JSON, or its checksum does not match its content): rebuilding it "
                   "from its run")
    return entry if entry is not None and all(entry.get(k) == v for k, v in wanted.items()) else None


def read_cached_run(path):
    """A cached run whose checksum matches its content, else None (missing, not JSON, damaged, or from before
    entries had checksums)."""
    try:
        entry = read_json(path)
    except (OSError, ValueError):
        return None
    return entry if sealed(entry) else None


def row(setting, result):
    s = result["summary"]
    return {"setting": setting, "epochs": s["epochs"], "images_per_sec": s["images_per_sec"],
            "train_acc": s["train_acc"], "test_acc": s["test_acc"], "test_acc_ci": s["test_acc_ci"],
            "macro_precision": s["macro_precision"], "macro_precision_ci": s["macro_precision_ci"],
            "final_loss": s["final_loss"], "run_dir": s["run_dir"]}


COLUMNS = [
    ("setting", lambda r: r["setting"]),
    ("epochs", lambda r: r["epochs"]),
    ("train img/s", lambda r: fmt(r["images_per_sec"], 1)),
    ("final loss", lambda r: fmt(r["final_loss"], 3)),
    ("train acc", lambda r: fmt(r["train_acc"], 3)),
    ("test acc [95 % CI]", lambda r: fmt_ci(r["test_acc"], r["test_acc_ci"])),
    ("macro precision [95 % CI]", lambda r: fmt_ci(r["macro_precision"], r["macro_precision_ci"])),
]


def write_experiment(study, exp, title, rows, note="", columns=COLUMNS):
    """table.md + summary.json of one experiment; returns the table's markdown (with its heading)."""
    folder = Path(study.out) / exp
    text = f"### {title}\n\n" + (f"{note}\n\n" if note else "") + (markdown_table(rows, columns) if rows else "")
    write_text(folder / "table.md", text)
    write_json(folder / "summary.json", {"experiment": exp, "title": title, "note": note, "rows": rows,
                                         "study": study})
    return text


def curves(results):
    """{name: (iterations, losses)} and {name: {train, test}} for the plots."""
    loss = {n: (r["loss"]["step"], r["loss"]["loss"]) for n, r in results.items()}
    acc = {n: {"train": [e["train_acc"] for e in r["epochs"]], "test": [e["test_acc"] for e in r["epochs"]]}
           for n, r in results.items()}
    return loss, acc


# ---------------------------------------------------------------- the five experiments

def exp_nets(study):
    from bench.comparison_plots import accuracy_curves, loss_curves
    results = {net: run(study, net, net=net) for net in tqdm(study.nets, desc="nets", leave=False)}
    loss, acc = curves(results)
    folder = Path(study.out) / "nets"
    loss_curves(loss, folder / "loss.png", "Three nets: training loss per iteration")
    accuracy_curves(acc, folder / "accuracy.png", "Three nets: accuracy per epoch (train dashed, test solid)")
    return write_experiment(study, "nets", "1. Three nets (alexnet, flat, narrow)",
                            [row(n, r) for n, r in results.items()])


GRID_COLUMNS = COLUMNS + [
    ("feature map (C x H x W)", lambda r: r["feature_map"]),
    ("MACs / image", lambda r: f"{r['macs'] / 1e6:,.0f} M"),
]


def _grid(study, exp, param, settings, title):
    """One flat run per setting; each row also gets the last conv layer's feature-map size and the MACs of one
    image, from report.layers on the very net trained (the same numbers as the run's layers.md)."""
    import nets
    from bench.comparison_plots import setting_bars
    from nets.alexnet import LAYOUTS
    from report.layers import feature_map, layer_table
    default = tuple(getattr(LAYOUTS["flat"], param))
    num_classes = len(read_manifest(study.data)["classes"])
    rows = []
    for setting in tqdm(settings, desc=exp, leave=False):
        label = ",".join(map(str, setting))
        if tuple(setting) == default:  # the net's own layout: the very run the nets experiment trains
            result = run(study, "flat", net="flat")
        else:
            result = run(study, f"flat-{param}-{label.replace(',', '-')}", net="flat", **{param: tuple(setting)})
        layers = layer_table(nets.build("flat", num_classes, **{param: tuple(setting)}), study.res)
        rows.append({**row(f"{param} {label}", result), "feature_map": " x ".join(map(str, feature_map(layers))),
                     "macs": sum(r["macs"] for r in layers)})
    setting_bars(rows, Path(study.out) / exp / "grid.png", title)
    return write_experiment(study, exp, title, rows, columns=GRID_COLUMNS)


def exp_strides(study):
    return _grid(study, "strides", "strides", study.strides, "2. Strides of flat's conv layers")


def exp_kernels(study):
    return _grid(study, "kernels", "kernels", study.kernels, "3. Filter sizes of flat's conv layers")


REG_COLUMNS = [
    ("setting", lambda r: r["setting"]),
    ("train acc", lambda r: fmt(r["train_acc"], 3)),
    ("test acc [95 % CI]", lambda r: fmt_ci(r["test_acc"], r["test_acc_ci"])),
    ("macro precision [95 % CI]", lambda r: fmt_ci(r["macro_precision"], r["macro_precision_ci"])),
    ("train - test gap", lambda r: fmt(r["gap"], 3)),
]


def exp_regularization(study):
    """Each regulariser alone on flat against flat itself; the train-test accuracy gap measures overfitting."""
    from bench.comparison_plots import accuracy_panels
    results = {name: run(study, REGULARIZATION[name][0], **REGULARIZATION[name][1]) for name in tqdm(study.regularization, desc="regularization",
                                                                         leave=False)}
    _, acc = curves(results)
    title = "4. Regularisation of flat, one method at a time"
    accuracy_panels(acc, Path(study.out) / "regularization" / "accuracy.png", title)
    rows = [{**row(n, r), "gap": r["summary"]["train_acc"] - r["summary"]["test_acc"]} for n, r in results.items()]
    note = ("Every run but 'augmentation rrc' trains on the study's own pipeline, resize + center crop, no "
            "augmentation (--augment none); 'augmentation rrc' trains on RandomResizedCrop + flip.")
    return write_experiment(study, "regularization", title, rows, note, columns=REG_COLUMNS)


REGULARIZATION = {  # name: (run name, train.Config overrides); "none" is the nets experiment's flat run
    "none": ("flat", dict(net="flat")),
    "dropout 0.5": ("flat-dropout-0.5", dict(net="flat", dropout=0.5)),
    "batch norm": ("flat-batchnorm", dict(net="flat", batchnorm=True)),
    "weight decay x10": ("flat-weight-decay-x10", dict(net="flat", weight_decay=10 * 5e-4)),  # train's 5e-4 x10
    "augmentation rrc": ("flat-rrc", dict(net="flat", augment="rrc")),
}


def exp_optimizers(study):
    import train
    from bench.comparison_plots import loss_curves
    base = run(study, "flat-sgd-start", net="flat", optimizer="sgd", momentum=0.0, epochs=study.warm_epochs)
    start = str(Path(base["summary"]["run_dir"]) / train.CHECKPOINT)
    results = {name: run(study, f"flat-from-sgd-{name.replace('+', '-')}", net="flat", init_from=start, lr="auto",
                         find_lr_steps=study.find_lr_steps, **OPTIMIZERS[name])
               for name in tqdm(study.optimizers, desc="optimizers", leave=False)}
    loss, _ = curves(results)
    loss_curves(loss, Path(study.out) / "optimizers" / "loss.png",
                f"Optimizers, all continuing from {study.warm_epochs} epoch(s) of plain SGD")
    found = {n: read_json(Path(r["summary"]["run_dir"]) / "config.json")["lr"] for n, r in results.items()}
    note = (f"Every optimizer starts from the same checkpoint: {study.warm_epochs} epoch(s) of plain SGD "
            f"(test acc {fmt(base['summary']['test_acc'], 3)}), each at the LR its own range test suggested "
            f"({study.find_lr_steps} steps from that checkpoint): "
            + ", ".join(f"{n} {lr:.2g}" for n, lr in found.items()) + ".")
    return write_experiment(study, "optimizers", "5. Optimizers from one shared checkpoint, each at its own LR",
                            [{**row(n, r), "lr": found[n]} for n, r in results.items()], note)


def exp_transfer(study):
    from bench.comparison_plots import accuracy_curves
    title = "6. Transfer learning: resnet18, head only vs full fine-tune"
    if not study.pretrained:
        return write_experiment(study, "transfer", title, [], "Skipped: no --pretrained PATH given (a local "
                                "resnet18 ImageNet state dict; fastpix never downloads weights).")
    results = {"head only": run(study, "resnet18-head", net="resnet18", pretrained=str(study.pretrained),
                                freeze=True),
               "full fine-tune": run(study, "resnet18-full", net="resnet18", pretrained=str(study.pretrained),
                                     lr=study.lr / 10)}
    _, acc = curves(results)
    accuracy_curves(acc, Path(study.out) / "transfer" / "accuracy.png", title)
    return write_experiment(study, "transfer", title, [row(n, r) for n, r in results.items()],
                            f"Weights: {study.pretrained}; full fine-tune at lr {study.lr / 10}.")


def exp_merge(study):
    """The flat run's most confused pair trained as one class. Merging alone lifts accuracy (one confusion fewer
    to make), so the table also scores flat's own predictions with the pair merged after the fact: the trained
    merge helps only if it beats that."""
    import numpy as np
    from report.metrics import classification_metrics
    from report.quality import confused_pairs
    title = "7. Merged classes: flat's most confused pair as one class"
    flat = run(study, "flat", net="flat")
    run_dir = Path(flat["summary"]["run_dir"])
    classes = read_json(run_dir / "config.json")["classes"]
    saved = np.load(run_dir / "test_predictions.npz")
    pairs = confused_pairs(saved["y_true"], saved["y_pred"], len(classes), top=1)
    if not pairs:
        return write_experiment(study, "merge", title, [], "Skipped: flat confuses no pair of classes.")
    a, b, count = pairs[0]
    spec = merge_spec([classes[a], classes[b]])
    merged = run(study, f"flat-merge-{classes[a]}-{classes[b]}", net="flat", merge=(spec,))
    after = lambda y: np.where(y == b, a, y)  # noqa: E731
    post = classification_metrics(after(saved["y_true"]), after(saved["y_pred"]), len(classes),
                                  resamples=study.bootstrap, seed=study.seed)
    posthoc = {**row(f"flat, {spec} merged after training", flat), "test_acc": post["acc"],
               "test_acc_ci": post["acc_ci"], "macro_precision": None, "macro_precision_ci": None}
    rows = [row(f"flat ({len(classes)} classes)", flat), posthoc, row(f"flat trained with --merge {spec}", merged)]
    change = merged["summary"]["test_acc"] - flat["summary"]["test_acc"]
    note = (f"Most confused pair of flat: {classes[a]} and {classes[b]} ({count} test images either way). "
            f"Training them as one changes test accuracy by {change:+.3f} ({fmt(flat['summary']['test_acc'])} -> "
            f"{fmt(merged['summary']['test_acc'])}); merging flat's own predictions after the fact gives "
            f"{post['acc']:.3f}.")
    write_json(Path(study.out) / "merge" / "pair.json", {"pair": [classes[a], classes[b]], "count": count,
                                                         "acc_change": change, "posthoc_acc": post["acc"]})
    return write_experiment(study, "merge", title, rows, note)


OPTIMIZERS = {  # the continuations compared, each from the shared plain-SGD checkpoint, each at lr auto
    "sgd+momentum": dict(optimizer="sgd", momentum=0.9),
    "adam": dict(optimizer="adam"),
    "rmsprop": dict(optimizer="rmsprop", momentum=0.0),
}

RUNNERS = {"nets": exp_nets, "strides": exp_strides, "kernels": exp_kernels, "regularization": exp_regularization,
           "optimizers": exp_optimizers, "transfer": exp_transfer, "merge": exp_merge}


def study_main(study, which):
    """Run the chosen experiments and write <out>/summary.md (every table, labelled with the machine), holding
    --out as its one writer."""
    fingerprint = read_manifest(study.data)["fingerprint"]
    if study.pretrained and not Path(study.pretrained).is_file():
        raise UsageError(f"--pretrained {study.pretrained} is not a file")
    env = environment()
    with held(study.out, "study"):
        check_one_dataset(study, fingerprint)
        write_config(Path(study.out), study, experiments=which, data_fingerprint=fingerprint)
        start = time.perf_counter()
        tables = [RUNNERS[exp](study) for exp in which]
        done = [e for e in EXPERIMENTS if (Path(study.out) / e / "table.md").is_file()]
        header = (f"## Study results ({machine_label(env)}; {study.epochs} epochs, res {study.res}, batch "
                  f"{study.batch_size}, loader {study.loader}, amp {study.amp})\n\n")
        write_text(Path(study.out) / "summary.md",
                   header + "\n".join((Path(study.out) / e / "table.md").read_text() for e in done))
        draw_shown_runs(study)
        from report.study_report import write_report
        write_report(study, env, machine_label(env), done)
    print("\n".join(tables))
    print(f"study: {', '.join(which)} in {time.perf_counter() - start:.0f} s; tables and plots in {study.out}")
    return 0


def draw_shown_runs(study):
    """Draw (python -m report) the runs whose pictures report.md shows: the nets experiment's, named after their
    net, and those with an LR range test. Each is drawn once: a run retrained loses its pictures with its folder
    (runfolder.remove_run), and the others' pictures are never read. Bench runs are not drawn at all."""
    import nets
    from report.render import render
    runs = Path(study.out) / "train"
    shown = {runs / name for name in nets.NETS} | {path.parent for path in runs.glob("*/lr_find.json")}
    for run_dir in sorted(shown):
        if (run_dir / "config.json").is_file() and not (run_dir / "predictions.png").is_file():
            render(run_dir, device=study.device)


def check_one_dataset(study, fingerprint):
    """One study's tables, summary and report compare runs on one dataset: an --out holding a study of other
    data (by the fingerprint its config.json records, or its cached runs do) is refused in one line."""
    out = Path(study.out)
    try:
        recorded = [(out / "config.json", read_json(out / "config.json").get("data_fingerprint"))]
    except (OSError, ValueError, AttributeError):
        recorded = []  # a damaged file says nothing here
    # cached runs by their checked content only: a damaged one is rebuilt when it is read, never a refusal
    recorded += [(path, (read_cached_run(path) or {}).get("data_fingerprint"))
                 for path in sorted((out / "runs").glob("*.json"))]
    for path, other in recorded:
        if other and other != fingerprint:
            raise UsageError(f"--out {out} holds a study of dataset {other[:12]} ({path} says so), but {study.data} "
                             f"is dataset {fingerprint[:12]} (by its manifest.json): a study compares runs on one "
                             "dataset; pick another --out")


def parse_args(argv):
    p = Parser(prog="python -m bench.study", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=EXPERIMENTS + ("all",), help="which experiment to run")
    args = add_options(p, StudyConfig).parse_args(argv)
    study = config_from(StudyConfig, args)
    check_options(study)
    unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
    if unknown:
        raise UsageError(f"unknown optimizer {unknown[0]!r}: choose from {', '.join(OPTIMIZERS)}")
    unknown = [r for r in args.regularization if r not in REGULARIZATION]
    if unknown:
        raise UsageError(f"unknown regularization {unknown[0]!r}: choose from {', '.join(REGULARIZATION)}")
    return study, (EXPERIMENTS if args.experiment == "all" else (args.experiment,))


def main(argv=None):
    study, which = parse_args(sys.argv[1:] if argv is None else argv)
    return study_main(study, which)


if __name__ == "__main__":
    from cli import run as run_cli
    run_cli(main)
