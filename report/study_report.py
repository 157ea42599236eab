"""results/study/report.md: the whole study as one document, in the study's own order, written from what the
experiments left in the study folder (tables, summaries, run folders), so rerunning regenerates it.

Every figure is embedded with a relative path (any Markdown viewer renders it) and a one-line caption that
states what it shows and its numbers; a section whose experiment has not run says so."""
import csv
import json
import re
from collections import Counter
from pathlib import Path

from cli import UsageError
from files import write_text
from ingest import layout
from report.render import read_sweep
from training.runfolder import read_run_config

SECTIONS = ("Data", "Sample sheet", "Nets", "Strides", "Filter sizes", "Regularisation", "Learning rate",
            "Optimizers", "Transfer", "Predictions and suspects", "Merged classes", "Throughput",
            "Machine, versions and configs")


class Report:
    def __init__(self, out):
        self.out, self.lines = Path(out), []

    def add(self, *lines):
        self.lines += lines

    def figure(self, path, caption):
        """The image with its caption, or nothing if the run that draws it has not happened."""
        path = self.out / path
        if path.is_file():
            self.add(f"![{caption}]({path.relative_to(self.out).as_posix()})", "", f"*{caption}*", "")

    def table(self, exp):
        """An experiment's table.md without its own heading (the report numbers its sections)."""
        path = self.out / exp / "table.md"
        if not path.is_file():
            self.add(f"Not run yet: `python -m bench.study {exp}`.", "")
            return None
        self.add(*path.read_text().splitlines()[2:], "")
        try:
            return json.loads((self.out / exp / "summary.json").read_text())
        except (OSError, ValueError):
            raise UsageError(f"{self.out / exp / 'summary.json'} is missing or damaged: rerun python -m bench.study "
                             f"{exp} --out {self.out} to write it again") from None

    def runs(self, fingerprint):
        """The study's cached runs, each checked against the checksum it carries and the study's dataset
        (`fingerprint`); a damaged, foreign or missing one is one line naming it and the repair."""
        from bench.study import read_cached_run
        rebuild = "rerun python -m bench.study with the same options to rebuild it from its run"
        try:  # the dataset the study ran on, as it recorded it; else the one it reads now
            data = json.loads((self.out / "config.json").read_text()).get("data_fingerprint") or fingerprint
        except (OSError, ValueError, AttributeError):
            data = fingerprint
        runs = {}
        for path in sorted((self.out / "runs").glob("*.json")):
            runs[path.stem] = read_cached_run(path)
            if runs[path.stem] is None:
                raise UsageError(f"{path} is damaged (not readable JSON, or its checksum does not match its content): "
                                 f"{rebuild}")
            if runs[path.stem].get("data_fingerprint") != data:
                raise UsageError(f"{path} is a run on another dataset than this study's: {rebuild}")
        # Every run trained in this study has its cached result: a missing one would drop out of the tables unsaid.
        for run_dir in sorted((self.out / "train").glob("*/config.json")):
            if run_dir.parent.name not in runs:
                raise UsageError(f"{self.out / 'runs' / (run_dir.parent.name + '.json')} is missing: {rebuild}")
        return runs


def _accs(summary, key="test_acc"):
    return ", ".join(f"{r['setting']} {r[key]:.3f}" for r in summary["rows"] if r.get(key) is not None)


def write_report(study, env, machine, done):
    r = Report(study.out)
    r.add("# The 500px study, reproduced by fastpix", "",
          f"{study.epochs} epochs per run, res {study.res}, batch {study.batch_size}, loader {study.loader}, "
          f"amp {study.amp}, seed {study.seed}. Experiments run: {', '.join(done) or 'none'}.", "", "Contents:", "")
    r.add(*(f"{i}. {name}" for i, name in enumerate(SECTIONS, 1)), "")
    manifest = layout.read_manifest(study.data)
    runs = r.runs(manifest["fingerprint"])
    flat_dir = Path("train") / "flat"

    r.add("## 1. Data", "")
    splits = manifest["splits"]
    r.add("| class | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits))
    for c in manifest["classes"]:
        r.add(f"| {c} | " + " | ".join(str(splits[s]["per_class"].get(c, 0)) for s in splits) + " |")
    r.add(f"| total | " + " | ".join(str(splits[s]["count"]) for s in splits) + " |", "")
    quarantine = Path(study.data) / layout.QUARANTINE
    reasons = Counter(re.split(r":| of ", row["reason"])[0] for row in csv.DictReader(open(quarantine))) \
        if quarantine.is_file() else Counter()
    r.add(f"Quarantined at ingest: {sum(reasons.values())} files" + (": " + ", ".join(
        f"{n} {reason}" for reason, n in reasons.most_common()) if reasons else "") + f" (see {quarantine}).", "")

    r.add("## 2. Sample sheet", "")
    r.figure(flat_dir / "samples.png", f"A train batch of flat exactly as the model receives it ({study.res}px, "
             "de-normalised): the study's own resize + center crop, no augmentation.")

    r.add("## 3. Nets", "")
    nets = r.table("nets")
    if nets:
        r.figure("nets/loss.png", "Training loss per iteration, rolling mean and std over 50 iterations; final "
                 "epoch's mean loss: " + _accs(nets, "final_loss") + ".")
        r.figure("nets/accuracy.png", "Train (dashed) and test (solid) accuracy per epoch; final test accuracy: "
                 + _accs(nets) + ".")
        for row in nets["rows"]:
            run_dir = Path("train") / row["setting"]
            layers = r.out / run_dir / "layers.md"
            if layers.is_file():
                r.add(f"#### {row['setting']}: layers", "", *layers.read_text().splitlines()[2:], "")
            r.figure(run_dir / "confusion.png", f"{row['setting']}: row-normalised test confusion matrix, "
                     f"test accuracy {row['test_acc']:.3f}.")
            r.figure(run_dir / "grad_norms.png", f"{row['setting']}: gradient norm of each layer's weights per "
                     "iteration (log scale).")
        r.figure(flat_dir / "filters.png", "flat: the first conv layer's filters after training.")
        r.figure(flat_dir / "feature_maps.png", "flat: one test image through every conv layer (first 8 maps each).")

    for i, (exp, name) in enumerate((("strides", "Strides"), ("kernels", "Filter sizes")), 4):
        r.add(f"## {i}. {name}", "")
        summary = r.table(exp)
        if summary:
            r.figure(f"{exp}/grid.png", f"Test accuracy (95 % interval) and training images/s per setting: "
                     + _accs(summary) + ".")

    r.add("## 6. Regularisation", "")
    reg = r.table("regularization")
    if reg:
        r.figure("regularization/accuracy.png", "Train and test accuracy per epoch, one panel each; train-test "
                 "gap: " + ", ".join(f"{x['setting']} {x['gap']:.3f}" for x in reg["rows"]) + ".")

    r.add("## 7. Learning rate", "")
    found = {n: run for n, run in runs.items() if (r.out / "train" / n / "lr_find.json").is_file()}
    if not found:
        r.add("No LR range test yet (the optimizers experiment runs one per optimizer).", "")
    for name in found:
        run_dir = r.out / "train" / name
        recorded = read_run_config(run_dir, "put back the run's own config.json").get("lr_find_sha256")
        lr = read_sweep(run_dir / "lr_find.json", recorded)["suggested_lr"]  # checked as the run's own drawing is
        r.figure(Path("train") / name / "lr_find.png", f"{name}: LR range test (loss against an exponentially "
                 f"growing LR); suggested LR {lr:.2g} (lowest smoothed loss / 10).")

    r.add("## 8. Optimizers", "")
    opt = r.table("optimizers")
    if opt:
        r.figure("optimizers/loss.png", "Training loss per iteration from the shared SGD checkpoint; test "
                 "accuracy: " + _accs(opt) + ".")

    r.add("## 9. Transfer", "")
    transfer = r.table("transfer")
    if transfer and transfer["rows"]:
        r.figure("transfer/accuracy.png", "resnet18 accuracy per epoch; test accuracy: " + _accs(transfer) + ".")

    r.add("## 10. Predictions and suspects", "")
    r.figure(flat_dir / "predictions.png", "flat: test images with true and predicted class and the model's "
             "confidence; correct in green, wrong in red.")
    per_class = r.out / flat_dir / "per_class.md"
    if per_class.is_file():
        r.add(*[line.replace("## ", "#### ") for line in per_class.read_text().splitlines()[2:]], "")
    suspects = r.out / flat_dir / "suspects.csv"
    if suspects.is_file():
        rows = list(csv.DictReader(open(suspects)))[:10]
        r.add(f"The {len(rows)} test photos flat gets wrong most confidently (likely mislabelled; all in "
              f"[suspects.csv]({(flat_dir / 'suspects.csv').as_posix()})):", "",
              "| photo | label | predicted | confidence |", "|---|---|---|---|",
              *(f"| {x['path']} | {x['label']} | {x['predicted']} | {x['confidence']} |" for x in rows), "")

    r.add("## 11. Merged classes", "")
    r.table("merge")

    r.add("## 12. Throughput", "", "| run | loader | device | amp | train images/s | data stall |",
          "|---|---|---|---|---|---|")
    for name, run in runs.items():
        s = run["summary"]
        stall = s.get("data_stall_fraction")
        speed = s.get("images_per_sec")
        r.add(f"| {name} | {run['config']['loader']} | {s['device']} | {s['amp']} | "
              f"{'–' if speed is None else f'{speed:.1f}'} | {'–' if stall is None else f'{stall:.0%}'} |")
    r.add("")

    r.add("## 13. Machine, versions and configs", "", f"Machine: {machine}, {env['machine']['platform']}, Python {env['machine']['python']}.", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".", "",
          "Study config (`config.json` here); every run's exact train config is its `train/<run>/config.json`:", "",
          "```json", json.dumps(json.loads(json.dumps(study.__dict__, default=str)), indent=2), "```")
    write_text(r.out / "report.md", "\n".join(r.lines) + "\n")

