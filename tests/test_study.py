"""The study end to end in a tiny configuration: every experiment writes its table, summary and plots, and
a rerun reuses the finished runs instead of training again."""
import json
import os
import re

import pytest

from bench import study as study_mod
from bench.results_folder import environment, machine_label
from bench.study import StudyConfig, parse_args, study_main
from cli import UsageError
from ingest import layout
from report.study_report import SECTIONS

pytestmark = pytest.mark.usefixtures("small_flat_head")  # the study's flat runs, with a small head


def tiny(ingested, out, **kw):
    return StudyConfig(**{**dict(data=ingested, out=out, loader="torch", device="cpu", epochs=1, batch_size=16,
                                 res=64, workers=0, nets=("flat",), strides=((4, 1, 1),), kernels=((11, 5, 3),),
                                 optimizers=("adam",), regularization=("none", "augmentation rrc"), find_lr_steps=6,
                                 bootstrap=50), **kw})


@pytest.mark.slow
def test_every_experiment_writes_tables_and_plots_and_reruns_are_reused(ingested, tmp_path, monkeypatch):
    cfg = tiny(ingested, tmp_path / "study")
    assert study_main(cfg, study_mod.EXPERIMENTS) == 0
    out = cfg.out
    for exp, plots in {"nets": ["loss.png", "accuracy.png"], "strides": ["grid.png"], "kernels": ["grid.png"],
                       "regularization": ["accuracy.png"], "optimizers": ["loss.png"], "transfer": []}.items():
        summary = json.loads((out / exp / "summary.json").read_text())
        assert (out / exp / "table.md").read_text().startswith("### ")
        for png in plots:
            assert (out / exp / png).read_bytes()[:4] == b"\x89PNG", (exp, png)
        for row in summary["rows"]:
            assert 0 <= row["test_acc"] <= 1 and row["test_acc_ci"][0] <= row["test_acc"] <= row["test_acc_ci"][1]
            assert row["images_per_sec"] > 0 and row["macro_precision_ci"] is not None
    assert [r["setting"] for r in json.loads((out / "optimizers" / "summary.json").read_text())["rows"]] == ["adam"]
    adam = json.loads((out / "runs" / "flat-from-sgd-adam.json").read_text())["config"]
    assert adam["optimizer"] == "adam" and adam["init_from"].endswith("flat-sgd-start/last.pt")
    assert adam["lr"] == "auto" and (out / "train" / "flat-from-sgd-adam" / "lr_find.png").is_file()
    # flat with its own strides and kernels is one run shared by three experiments.
    runs = {p.stem for p in (out / "runs").glob("*.json")}
    merged = [r for r in runs if r.startswith("flat-merge-")]
    assert len(merged) == 1 and sorted(runs - set(merged)) == ["flat", "flat-from-sgd-adam", "flat-rrc",
                                                               "flat-sgd-start"]
    # The study's own pipeline (no augmentation) everywhere but the regularization experiment's augmentation row.
    augments = {r: json.loads((out / "runs" / f"{r}.json").read_text())["config"]["augment"] for r in runs}
    assert augments == {**dict.fromkeys(runs, "none"), "flat-rrc": "rrc"}
    transfer = json.loads((out / "transfer" / "summary.json").read_text())
    assert transfer["rows"] == [] and "no --pretrained" in transfer["note"]
    grid = json.loads((out / "strides" / "summary.json").read_text())["rows"][0]
    assert grid["feature_map"] == "384 x 3 x 3" and grid["macs"] > 0  # flat at 64 px: 15 -> 7 -> 3 after the pools
    assert "feature map" in (out / "strides" / "table.md").read_text()
    regularization = json.loads((out / "regularization" / "summary.json").read_text())["rows"]
    assert [r["setting"] for r in regularization] == ["none", "augmentation rrc"]
    assert all(r["gap"] == pytest.approx(r["train_acc"] - r["test_acc"]) for r in regularization)
    merge = json.loads((out / "merge" / "pair.json").read_text())
    merged_run = json.loads((out / "runs" / f"{merged[0]}.json").read_text())
    assert merged_run["config"]["merge"] == ["+".join(merge["pair"])]
    assert merge["acc_change"] == pytest.approx(merged_run["summary"]["test_acc"] - json.loads(
        (out / "runs" / "flat.json").read_text())["summary"]["test_acc"])
    report = (out / "report.md").read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert [h.split(". ", 1)[1] for h in headings] == list(SECTIONS)
    images = re.findall(r"!\[(.+?)\]\((.+?)\)", report)
    assert len(images) >= 10 and all((out / path).is_file() and not path.startswith("/") for _, path in images)
    summary_md = (out / "summary.md").read_text()
    assert machine_label(environment()) in summary_md.splitlines()[0]  # the tables say where they were measured
    assert all(f"{i}. " in summary_md for i in range(1, 6))

    # A rerun reuses every finished run; a grid with one more setting trains only that one.
    import train
    trained, real = [], train.train
    monkeypatch.setattr(train, "train", lambda c: trained.append(c.name) or real(c))
    assert study_main(cfg, study_mod.EXPERIMENTS) == 0
    assert trained == []
    study_main(tiny(ingested, out, kernels=((11, 5, 3), (7, 5, 3))), ("kernels",))
    assert trained == ["flat-kernels-7-5-3"]

    # The report reads a drawn run's LR range test again: a changed one is one line, not another suggested LR.
    path = out / "train" / "flat-from-sgd-adam" / "lr_find.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "suggested_lr": 1e-9}))
    with pytest.raises(UsageError, match="lr_find.json is damaged or another run's"):
        study_main(cfg, ("optimizers",))


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError):
        parse_args(["nope"])
    with pytest.raises(UsageError, match="groups like 4,1,1"):
        parse_args(["strides", "--strides", "4,x"])
    with pytest.raises(UsageError, match="not an ingested dataset"):
        study_main(StudyConfig(data=tmp_path, out=tmp_path / "o"), ("nets",))


@pytest.mark.slow
def test_the_study_writes_only_into_its_own_folder_and_retrains_on_other_data(ingested, tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.md").write_text("the user's")
    with pytest.raises(UsageError, match="not empty and was not made by the study"):
        study_main(tiny(ingested, foreign), ("nets",))
    assert [p.name for p in foreign.iterdir()] == ["summary.md"]

    import shutil
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))
    cfg = tiny(data, tmp_path / "study", res=32)
    import train
    trained, real = [], train.train
    monkeypatch.setattr(train, "train", lambda c: trained.append(c.name) or real(c))
    first = study_mod.run(cfg, "r18", net="resnet18")
    study_mod.run(cfg, "r18", net="resnet18")
    assert trained == ["r18"]  # unchanged data: the cached run
    manifest = json.loads((data / "manifest.json").read_text())
    layout.write_manifest(data, {**manifest, "fingerprint": "f" * 64})  # re-ingested
    again = study_mod.run(cfg, "r18", net="resnet18")
    assert trained == ["r18", "r18"] and again["summary"]["stopped"] is None
    assert again["data_fingerprint"] == "f" * 64 and first["data_fingerprint"] == manifest["fingerprint"]


# ----------------------------------------------------------------------------------------------- issue 19

@pytest.mark.slow
def test_an_interrupted_run_is_continued_and_a_damaged_cache_entry_rebuilt(ingested, tmp_path, monkeypatch):
    """kill -9 past the first checkpoint, then a rerun continues from last.pt (the cache key compares the
    settled config: pieces null vs [] once differed, and the run started again); a damaged cached run is
    rebuilt from its run folder, never read."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import train
    from files import sealed
    out = tmp_path / "study"
    cfg = tiny(ingested, out, res=32, epochs=4)
    script = (f"from pathlib import Path; from bench import study; study.run(study.StudyConfig(**{{**{vars(cfg)!r}, "
              f"'data': Path({str(ingested)!r}), 'out': Path({str(out)!r})}}), 'r18', net='resnet18')")
    run_dir = out / "train" / "r18"
    child = subprocess.Popen([sys.executable, "-c", script.replace("PosixPath", "Path")],
                             cwd=os.path.dirname(train.__file__), env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # no silent wait: a child stuck before its checkpoint fails the test
        while child.poll() is None and not (run_dir / "last.pt").is_file():
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-500:]}"
    assert not (out / "runs" / "r18.json").exists()

    trained, real = [], train.train
    monkeypatch.setattr(train, "train", lambda c: trained.append(c.resume) or real(c))
    result = study_mod.run(cfg, "r18", net="resnet18")
    assert trained == [str(run_dir)]  # continued, not started again
    assert result["summary"]["epochs"] == 4 and result["summary"]["stopped"] is None
    steps = result["loss"]["step"]
    assert steps == sorted(set(steps)) and steps[0] == 0  # one run's log, continued without overlap

    cache = out / "runs" / "r18.json"
    text = cache.read_text()
    cache.write_text(text.replace('"test_acc": 0', '"test_acc": 1', 1))  # flipped, same size, still JSON
    rebuilt = study_mod.run(cfg, "r18", net="resnet18")  # from the finished run folder: nothing left to train
    assert trained == [str(run_dir), str(run_dir)]
    assert rebuilt["summary"]["test_acc"] == result["summary"]["test_acc"]
    assert sealed(json.loads(cache.read_text()))  # rebuilt with its checksum
    for damaged in ("\0" * len(text), text[: len(text) // 2]):
        cache.write_text(damaged)
        assert study_mod.run(cfg, "r18", net="resnet18")["summary"]["test_acc"] == result["summary"]["test_acc"]

    (run_dir / "NOTES.md").write_text("the user's")  # a changed config would replace the run: refused instead
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(UsageError, match=r"r18 holds NOTES.md, which train.py did not write there: nothing was "
                                         r"deleted"):
        study_mod.run(tiny(ingested, out, res=32, epochs=4, bootstrap=60), "r18", net="resnet18")
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.slow
def test_one_study_per_out_and_one_dataset_per_study(ingested, tmp_path):
    import shutil

    from files import Busy, one_writer
    out = tmp_path / "study"
    with one_writer(out):
        with pytest.raises(Busy, match="study is being written by pid"):
            study_main(tiny(ingested, out), ("transfer",))
    assert study_main(tiny(ingested, out), ("transfer",)) == 0  # trains nothing: no --pretrained
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / "flat.json").write_text("\0" * 100)  # a damaged cached run: the report says so and how to fix it
    with pytest.raises(UsageError, match="flat.json is damaged .*: rerun python -m bench.study with the same options"):
        study_main(tiny(ingested, out), ("transfer",))
    (out / "runs" / "flat.json").unlink()
    assert study_main(tiny(ingested, out), ("transfer",)) == 0
    (out / "nets").mkdir()
    (out / "nets" / "table.md").write_text("### 1. Three nets\n\n| setting |\n")
    (out / "nets" / "summary.json").write_text('{"rows": [')  # another experiment's, torn
    with pytest.raises(UsageError, match="nets/summary.json is missing or damaged: rerun python -m bench.study nets"):
        study_main(tiny(ingested, out), ("transfer",))
    other = tmp_path / "other"
    shutil.copytree(ingested, other, ignore=shutil.ignore_patterns("resident-*"))
    manifest = json.loads((other / "manifest.json").read_text())
    from ingest import layout
    layout.write_manifest(other, {**manifest, "fingerprint": "e" * 64})  # re-ingested from other photos
    with pytest.raises(UsageError, match=f"--out {out} holds a study of dataset {manifest['fingerprint'][:12]} "
                                         r"\(.*config.json says so\), "
                                         f"but {other} is dataset eeeeeeeeeeee .*: .* pick another --out"):
        study_main(tiny(other, out), ("transfer",))
    assert json.loads((out / "config.json").read_text())["data_fingerprint"] == manifest["fingerprint"]


def test_a_run_held_by_its_users_resume_is_not_replaced(ingested, tmp_path):
    """The study replaces a stale run of its own, but not while a train.py --resume holds it: one line naming
    the holder, nothing deleted (it held only --out, and deleted the files the resume was writing)."""
    from files import Busy, one_writer
    from tests.test_train_runs import a_run_folder
    run_dir = a_run_folder(tmp_path / "study" / "train" / "flat")  # another config: the study would start it afresh
    with one_writer(run_dir):
        with pytest.raises(Busy, match=f"train/flat is being written by pid {os.getpid()} "):
            study_mod.run(tiny(ingested, tmp_path / "study"), "flat", net="flat")
        assert (run_dir / "config.json").is_file() and (run_dir / ".fastpix-run").is_file()



def test_a_cached_run_is_reused_by_its_sealed_settings_with_or_without_the_older_key(ingested, tmp_path, monkeypatch):
    """The cache entry holds the settled config and the data's fingerprint, sealed: what it is reused by. The
    sha256 of those two that entries also stored ("key") is derivable, so it is no longer written; an older
    entry that has it is still reused, and one of other settings is not."""
    import train
    from files import checksum_of, read_json, seal, write_json
    trained = []
    monkeypatch.setattr(train, "train", lambda c: trained.append(c.name) or {"run_dir": str(tmp_path), "epochs": 1})
    monkeypatch.setattr(study_mod, "read_metrics", lambda run_dir: (
        [{"step": 0, "loss": 1.5}], [{"epoch": 0, "train_acc": 0.5, "test_acc": 0.4, "test_acc_ci": [0.3, 0.5],
                                      "images_per_sec": 9.0}]))
    cfg = tiny(ingested, tmp_path / "study")
    first = study_mod.run(cfg, "flat", net="flat")
    cache = tmp_path / "study" / "runs" / "flat.json"
    assert "key" not in read_json(cache)
    assert study_mod.run(cfg, "flat", net="flat")["summary"] == first["summary"]
    older = {k: v for k, v in read_json(cache).items() if k != "checksum"}
    write_json(cache, seal({**older, "key": checksum_of({k: older[k] for k in ("config", "data_fingerprint")})}))
    assert study_mod.run(cfg, "flat", net="flat")["summary"] == first["summary"]
    assert trained == ["flat"]
    study_mod.run(tiny(ingested, tmp_path / "study", bootstrap=60), "flat", net="flat")
    assert trained == ["flat", "flat"]
