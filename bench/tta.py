"""Time to accuracy: `train.py --recipe study` and `--recipe fast` side by side on the same data and machine.

    python -m bench.tta [--data DIR] [--seeds 0,1] [--epochs 5] [--res 128] [--target ACC] [--ablation-seeds 0]

Every run trains its full schedule in its own process (the bench's convention: peak RSS and failures stay
per run), study and fast interleaved per seed. The target of a seed is the accuracy the study recipe reaches
in its full run with that seed, unless --target gives one for all; a run's time to target is its wall time
(train + evaluation, summed over epochs) up to the first epoch whose test accuracy reaches it. The ablation trains
fast with each piece off in turn. Output in one results folder: table.md, results.json (rows + exact config
+ versions + machine), tta.png (test accuracy against wall-clock time, one colour per recipe), logs/, runs/.
"""
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from bench import train_config
from bench.results_folder import (environment, fmt, fmt_ci, held, machine_label, markdown_table, new_results_dir,
                                  write_config)
from cli import Parser, UsageError, add_options, check_options, config_from, names, option
from files import read_json, write_json, write_text
from ingest.layout import DEFAULT_OUT, read_manifest
from loaders import BACKENDS
from report.runlog import read_metrics


def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None


@dataclass
class TtaConfig:
    """Every option of the time-to-accuracy bench, each declared once with its flag (`cli.option`)."""
    data: Path = option(DEFAULT_OUT, "ingested dataset (python ingest/build.py)")
    net: str = option("flat", "the net both recipes train")
    loader: str = option("resident", "loader of every run (resident: decoded once, so the recipes, not the "
                         "decoding, are what differ)", choices=tuple(BACKENDS))
    epochs: int = option(5, "epochs of every run", minimum=1)
    batch_size: int = option(64, "images per step (the study's defaults scaled for a CPU, as bench.study)")
    res: int = option(128, "resolution (fast: its test res; its train res rises to it, or to res / 1.15 with "
                      "fixres)")
    lr: float = option(0.01, "peak learning rate of both recipes")
    seeds: tuple = option((0, 1), "seeds of study and fast, >= 2 for a claim", parse=int_tuple)
    target: float | None = option(None, "test accuracy to reach (default: per seed, the study recipe's final test "
                                  "accuracy)")
    ablation_seeds: tuple = option((0,), "seeds of the ablation runs (fast, each piece off in turn); empty: no "
                                   "ablation", parse=int_tuple)
    ablate: tuple | None = option(None, "pieces the ablation turns off in turn (default: every piece of the fast "
                                  "recipe)", parse=names)
    device: str = option("auto", "auto, cpu or cuda")
    amp: str = option("auto", "auto, bf16, fp16 or off")
    workers: int | None = option(None, "loader workers (default: the loader's)", minimum=0)
    out: Path | None = option(None, "results folder (default results/tta-<time>)")


def run_label(recipe, without=None):
    return f"fast - {without}" if without else recipe


# ---------------------------------------------------------------- one run (in its own process)

def run_one(cfg, recipe, without, seed, out_dir):
    """Train one run; its row: the accuracy curve against cumulative wall time, and the summary figures."""
    import train
    pieces = None if without is None else tuple(p for p in train.FAST_DEFAULT if p != without)
    name = f"{run_label(recipe, without).replace(' - ', '-no-')}-seed{seed}"
    summary = train.train(train_config(cfg, seed=seed, recipe=recipe, pieces=pieces, name=name,
                                       runs_dir=str(Path(out_dir) / "runs")))
    (Path(summary["run_dir"]) / train.CHECKPOINT).unlink(missing_ok=True)  # ~600 MB of weights per run
    if summary["stopped"] is not None:  # a partial run has no time to target: it is a failed row
        raise UsageError(f"{name} stopped early ({summary['stopped']}) after {summary['epochs']} epochs")
    _, epochs = read_metrics(summary["run_dir"])
    wall, curve = 0.0, []
    for e in epochs:
        wall += e["epoch_s"] + e["eval_s"]
        curve.append({"epoch": e["epoch"], "wall_s": wall, "test_acc": e["test_acc"], "res": e["res"]})
    return {"recipe": recipe, "without": without, "label": run_label(recipe, without), "seed": seed,
            "curve": curve, "wall_s": wall, "images_per_sec": summary["images_per_sec"],
            "test_acc": summary["test_acc"], "test_acc_ci": summary["test_acc_ci"], "amp": summary["amp"],
            "run_dir": summary["run_dir"]}


def cell_main(argv):
    """`python -m bench.tta --cell CONFIG.json RECIPE WITHOUT SEED OUT.json`: the child side of run_all."""
    cfg_path, recipe, without, seed, out = argv
    cfg = TtaConfig(**read_json(cfg_path))
    write_json(out, run_one(cfg, recipe, without or None, int(seed), Path(out).parent.parent))
    return 0


# ---------------------------------------------------------------- the runs

def plan(cfg, pieces):
    """(recipe, piece off, seed) of every run: study and fast interleaved per seed, then the ablation."""
    runs = [(recipe, None, seed) for seed in cfg.seeds for recipe in ("study", "fast")]
    return runs + [("fast", piece, seed) for seed in cfg.ablation_seeds for piece in pieces]


def run_all(cfg, out_dir, progress=True):
    """Every run in a child process; a failed one becomes a row with `error` (its log's last line)."""
    import train
    out_dir = Path(out_dir)
    cfg_path = out_dir / "tta-config.json"
    write_json(cfg_path, {**asdict(cfg), "data": str(cfg.data), "out": str(out_dir)})
    rows = []
    pieces = train.FAST_DEFAULT if cfg.ablate is None else cfg.ablate
    for recipe, without, seed in tqdm(plan(cfg, pieces), desc="tta", unit="run", disable=not progress):
        stem = f"{run_label(recipe, without).replace(' - ', '-no-')}-seed{seed}"
        result, log = out_dir / "cells" / f"{stem}.json", out_dir / "logs" / f"{stem}.log"
        for folder in (result.parent, log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            code = subprocess.call([sys.executable, "-m", "bench.tta", "--cell", str(cfg_path), recipe,
                                    without or "", str(seed), str(result)], stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if code == 0 and result.is_file():
            rows.append(read_json(result))
        else:
            lines = log.read_text(errors="replace").strip().splitlines()
            rows.append({"recipe": recipe, "without": without, "label": run_label(recipe, without), "seed": seed,
                         "error": (lines[-1] if lines else f"exit {code}")[:300]})
    return rows


def time_to(row, target):
    """Wall seconds (train + eval) to the first epoch at or above target; None if the run never got there."""
    return next((point["wall_s"] for point in row.get("curve", ()) if point["test_acc"] >= target), None)


def summarize(rows, targets):
    """One line per label (study, fast, each ablation): means over its seeds; a label with a run that never
    reached its seed's target has no time to target (the mean would flatter it)."""
    lines = []
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label and not r.get("error")]
        times = [time_to(r, targets[r["seed"]]) for r in runs]
        mean = lambda values: statistics.fmean(values) if values else None  # noqa: E731
        lines.append({"label": label, "seeds": [r["seed"] for r in runs],
                      "errors": [r["error"] for r in rows if r["label"] == label and r.get("error")],
                      "time_to_target_s": None if None in times else mean(times),
                      "reached": sum(t is not None for t in times), "wall_s": mean([r["wall_s"] for r in runs]),
                      "images_per_sec": mean([r["images_per_sec"] for r in runs]),
                      "test_acc": mean([r["test_acc"] for r in runs]),
                      "final": [(r["seed"], r["test_acc"], r["test_acc_ci"]) for r in runs]})
    study = next((s for s in lines if s["label"] == "study"), None)
    for s in lines:
        ok = study and study["time_to_target_s"] and s["time_to_target_s"] is not None
        s["time_ratio_to_study"] = s["time_to_target_s"] / study["time_to_target_s"] if ok else None
    return lines


def seed_targets(cfg, rows):
    """{seed: target accuracy}: --target for every seed, else each seed's study final."""
    if cfg.target is not None:
        return {seed: cfg.target for seed in cfg.seeds}
    finals = {r["seed"]: r["test_acc"] for r in rows if r["recipe"] == "study" and not r.get("error")}
    if set(finals) != set(cfg.seeds):
        raise UsageError("a study run failed, so its seed has no target: see the logs in the results folder, or "
                         "give --target")
    return finals


# ---------------------------------------------------------------- outputs

COLUMNS = [
    ("recipe", lambda s: s["label"]),
    ("seeds reaching target", lambda s: f"{s['reached']}/{len(s['seeds'])}"),
    ("time to target s (train + eval)", lambda s: fmt(s["time_to_target_s"], 1)),
    ("× study", lambda s: fmt(s["time_ratio_to_study"], 2)),
    ("full run s", lambda s: fmt(s["wall_s"], 1)),
    ("train img/s", lambda s: fmt(s["images_per_sec"], 1)),
    ("final test acc (mean)", lambda s: fmt(s["test_acc"], 3)),
    ("final test acc per seed [95 % CI]", lambda s: "; ".join(f"{seed}: {fmt_ci(acc, ci)}" for seed, acc, ci in
                                                             s["final"]) or "–"),
    ("error", lambda s: "; ".join(s["errors"])),
]


def plot_curves(rows, targets, path, title):
    """Test accuracy against wall-clock time, a colour per recipe (one line per seed); the ablation dotted."""
    from bench.comparison_plots import plt, save
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in (r for r in rows if not r.get("error")):
        first = r["label"] not in colours  # one legend entry per label
        colour = colours.setdefault(r["label"], f"C{len(colours)}")
        main = r["without"] is None
        ax.plot([p["wall_s"] for p in r["curve"]], [p["test_acc"] for p in r["curve"]], "o-" if main else ":",
                color=colour, ms=3, lw=2 if main else 1, label=r["label"] if first else None)
    for seed, target in targets.items():
        ax.axhline(target, color="0.4", ls="--", lw=1, label=f"target, seed {seed}: {target:.3f}")
    ax.set(xlabel="wall-clock s (train + evaluation)", ylabel="test accuracy", title=title)
    ax.legend(fontsize=7)
    save(fig, path)


def write_outputs(cfg, rows, targets, out_dir, env):
    out_dir = Path(out_dir)
    lines = summarize(rows, targets)
    where = machine_label(env)
    setting = (f"{cfg.net}, loader {cfg.loader}, {cfg.epochs} epochs, batch {cfg.batch_size}, res {cfg.res}, "
               f"lr {cfg.lr}, amp {cfg.amp}, seeds {','.join(map(str, cfg.seeds))}")
    main = [s for s in lines if s["label"] in ("study", "fast")]
    ablation = [s for s in lines if s["label"] not in ("study", "fast")]
    given = "given" if cfg.target is not None else "the study recipe's final test acc with that seed"
    table = (f"Time to accuracy on {where} — {setting}; target per seed ({given}): "
             f"{', '.join(f'{seed}: {t:.3f}' for seed, t in targets.items())}\n\n"
             + markdown_table(main, COLUMNS))
    if ablation:
        table += (f"\nAblation (fast with one piece off, seeds {','.join(map(str, cfg.ablation_seeds))}; "
                  "× study: time to target against the study's)\n\n" + markdown_table(ablation, COLUMNS))
    write_text(out_dir / "table.md", table)
    write_json(out_dir / "results.json", {"config": cfg, **env, "targets": targets, "summary": lines, "rows": rows})
    plot_curves(rows, targets, out_dir / "tta.png", f"time to accuracy, {where}")
    return table


def tta(cfg, progress=True):
    """Run everything and write every output; returns (results folder, summary lines)."""
    read_manifest(cfg.data)  # a one-line UsageError before anything starts when the data is not ingested
    with held(cfg.out or new_results_dir("tta"), "tta") as out_dir:  # a second tta into it: one line
        env = environment()
        write_config(out_dir, cfg)
        rows = run_all(cfg, out_dir, progress)
        targets = seed_targets(cfg, rows)
        print(write_outputs(cfg, rows, targets, out_dir, env))
    print(f"tta: results in {out_dir}")
    return out_dir, summarize(rows, targets)


def config_from_args(argv):
    p = Parser(prog="python -m bench.tta", description=__doc__.split("\n\n")[0])
    cfg = config_from(TtaConfig, add_options(p, TtaConfig).parse_args(argv))
    check_options(cfg)
    import train
    unknown = [p for p in cfg.ablate or () if p not in train.FAST_DEFAULT]
    if unknown:
        raise UsageError(f"--ablate {unknown[0]!r} is not a piece of the fast recipe: choose among "
                         f"{', '.join(train.FAST_DEFAULT)}")
    if not cfg.seeds or not (cfg.target is None or 0 < cfg.target <= 1):
        raise UsageError("need at least one seed and --target in (0, 1]")
    if not set(cfg.ablation_seeds) <= set(cfg.seeds):
        raise UsageError("--ablation-seeds must be among --seeds (an ablation run is compared with its seed's "
                         "target)")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cell"]:
        return cell_main(argv[1:])
    tta(config_from_args(argv))
    return 0


if __name__ == "__main__":
    from cli import run
    run(main)
