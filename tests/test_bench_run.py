"""The end-to-end bench in a tiny configuration: every promised output exists with its fields, the headline
is a ratio to the folder baseline of the same run, and a failing cell becomes a row, not a crash."""
import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bench.run import BenchConfig, bench, config_from_args, main, parse_args, with_ratios
from cli import UsageError, run

ROW_FIELDS = ("images_per_sec", "loader_images_per_sec", "data_stall_fraction", "test_acc", "test_acc_ci",
              "macro_precision", "macro_precision_ci", "peak_rss_mb", "peak_gpu_mb", "ratio_to_baseline",
              "loader_ratio_to_baseline")


@pytest.fixture(scope="module")
def benched(ingested, tmp_path_factory):
    """One bench of two cells, shared: each cell is a process that trains (read-only: copy before a rerun)."""
    out = tmp_path_factory.mktemp("benched") / "bench"
    # resnet18 at 32 px, the cheapest training here (test_train.py), so the two cells spend their seconds on the
    # bench, not on the net.
    cfg = BenchConfig(data=ingested, loaders=("folder", "torch"), nets=("resnet18",), epochs=2, batch_size=32,
                      res=32, workers=1, loader_epochs=1, out=out)
    out_dir, rows = bench(cfg, progress=False)
    return cfg, out_dir, rows


@pytest.mark.slow
def test_bench_matrix_writes_table_json_csv_png(benched):
    cfg, out_dir, rows = benched
    out = cfg.out
    assert out_dir == out and [r["cell"] for r in rows] == ["resnet18/folder", "resnet18/torch"]
    for r in rows:
        assert not r.get("error"), r
        assert set(ROW_FIELDS) <= set(r)
        assert r["images_per_sec"] > 0 and r["loader_images_per_sec"] > 0 and 0 <= r["data_stall_fraction"] <= 1
        assert r["test_acc_ci"][0] <= r["test_acc"] <= r["test_acc_ci"][1]
        assert r["peak_rss_mb"] > 100  # torch alone is more than that: a real per-cell measurement
    folder, torch_row = rows
    assert folder["ratio_to_baseline"] == 1.0
    assert torch_row["ratio_to_baseline"] == pytest.approx(torch_row["images_per_sec"] / folder["images_per_sec"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows and saved["config"]["epochs"] == 2 and saved["versions"]["torch"]
    assert json.loads((out / "config.json").read_text())["machine"]["cpu_count"] >= 1
    table = (out / "table.md").read_text()
    assert "| resnet18/torch |" in table and "× folder" in table and "test acc [95 % CI]" in table
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["loader"] for r in csv_rows] == ["folder", "torch"] and "test_acc_ci_lo" in csv_rows[0]
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert list(out.glob("runs/*/metrics.jsonl")) and not list(out.glob("runs/*/last.pt"))  # no weights kept


@pytest.mark.slow
def test_failed_cell_is_a_row_with_the_reason(ingested, tmp_path):
    # res 8 is below what the net accepts: train raises a UsageError in the child, the matrix goes on.
    cfg = BenchConfig(data=ingested, loaders=("folder",), epochs=2, batch_size=32, res=8, out=tmp_path / "b")
    _, rows = bench(cfg, progress=False)
    assert rows[0]["error"] and "res" in rows[0]["error"] and rows[0]["ratio_to_baseline"] is None
    assert rows[0]["error"] in (tmp_path / "b" / "table.md").read_text()


def test_ratios_use_the_same_nets_baseline():
    rows = with_ratios([
        {"net": "flat", "loader": "folder", "images_per_sec": 10.0, "loader_images_per_sec": 100.0},
        {"net": "flat", "loader": "dali", "images_per_sec": 30.0, "loader_images_per_sec": 500.0},
        {"net": "narrow", "loader": "dali", "images_per_sec": 50.0, "loader_images_per_sec": 500.0},
    ])
    assert [r["ratio_to_baseline"] for r in rows] == [1.0, 3.0, None]
    assert rows[1]["loader_ratio_to_baseline"] == 5.0


def test_arguments(tmp_path, capsys):
    cfg = config_from_args(parse_args(["--loaders", "dali", "--quick"]))
    assert cfg.loaders == ("folder", "dali") and cfg.epochs == 2  # baseline always measured alongside
    assert config_from_args(parse_args([])).loaders[0] == "folder"
    with pytest.raises(UsageError, match="unknown loader"):
        config_from_args(parse_args(["--loaders", "nope"]))
    with pytest.raises(UsageError, match="--epochs must be >= 2"):
        config_from_args(parse_args(["--epochs", "1"]))
    with pytest.raises(SystemExit) as exit_:  # the command as python -m bench runs it (bench/__main__.py)
        run(main, ["--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and "ingest/build.py" in err


def test_a_cells_training_config_is_the_benchs_options_over_trains_defaults():
    import train
    from bench import train_config
    cfg = train_config(BenchConfig(data=Path("d"), epochs=5, res=64, seed=3), net="alexnet", name="x")
    assert cfg == replace(train.Config(), data="d", epochs=5, res=64, seed=3, net="alexnet", name="x",
                          batch_size=64)  # the bench's defaults where it has its own


def test_a_folder_a_bench_is_claiming_is_busy_not_foreign(tmp_path):
    """A second bench that looks while the first holds the folder but is still writing its marker (its note and
    the marker's temp file there, the marker not yet) is not told the folder is someone else's: it goes on to
    the lock, which names the holder. Seen in the concurrency matrix on a loaded machine."""
    from bench.results_folder import check_claim
    from files import WRITER_NOTE
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / WRITER_NOTE).write_text("{}")
    (folder / "..fastpix-bench.tmp4242").write_text("")  # atomic_path's temp of the marker
    check_claim(folder, "bench")
    (folder / "table.md").write_text("the user's")
    with pytest.raises(UsageError, match="not made by the bench"):
        check_claim(folder, "bench")


def test_a_foreign_folder_is_refused_with_nothing_written(ingested, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "table.md").write_text("the user's")
    cfg = BenchConfig(data=ingested, loaders=("folder",), nets=("resnet18",), out=foreign)
    with pytest.raises(UsageError, match="not empty and was not made by the bench"):
        bench(cfg, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["table.md"]


@pytest.mark.slow
def test_a_rerun_replaces_its_own_cell_runs_and_refuses_a_users_file(benched, tmp_path):
    out = tmp_path / "bench"  # a copy of a bench that ran: its own folder, holding its cell runs
    shutil.copytree(benched[0].out, out)
    cfg = BenchConfig(data=benched[0].data, loaders=("folder",), nets=("resnet18",), epochs=2, batch_size=32,
                      res=32, workers=1, loader_epochs=1, out=out)
    _, rows = bench(cfg, progress=False)
    assert not rows[0].get("error"), rows[0]
    # ... but a cell run holding a file train.py did not write is refused up front, with nothing deleted (it was
    # deleted, then train.py refused the folder, and the bench exited 0 with an error row).
    run_dir = out / "runs" / "resnet18-folder"
    (run_dir / "NOTES.md").write_text("the user's")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"resnet18-folder holds NOTES.md, which train.py did not write there: "
                                         r"nothing was deleted; move it out of .* or rerun with another --out"):
        bench(cfg, progress=False)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_one_bench_per_results_folder(ingested, tmp_path):
    from files import Busy, one_writer
    cfg = BenchConfig(data=ingested, loaders=("folder",), nets=("resnet18",), out=tmp_path / "bench")
    with one_writer(cfg.out):
        with pytest.raises(Busy, match=r"bench is being written by pid \d+ .*: wait for it to end, or stop it"):
            bench(cfg, progress=False)
    assert not list(cfg.out.iterdir())  # nothing written: not even the marker


def test_a_cell_run_held_by_its_users_resume_is_not_replaced(ingested, tmp_path):
    """A rerun replaces each cell's run of the earlier bench, but not one a train.py --resume holds: the cell
    fails with the one line naming the holder (its row's error), nothing deleted."""
    from bench.run import run_cell
    from files import Busy, one_writer
    from tests.test_train_runs import a_run_folder
    run_dir = a_run_folder(tmp_path / "bench" / "runs" / "flat-folder")
    cfg = BenchConfig(data=ingested, loaders=("folder",), epochs=2, batch_size=32, res=64, out=tmp_path / "bench")
    with one_writer(run_dir):
        with pytest.raises(Busy, match=f"runs/flat-folder is being written by pid {os.getpid()} "):
            run_cell(cfg, "flat", "folder", tmp_path / "bench")
        assert (run_dir / "config.json").is_file() and (run_dir / ".fastpix-run").is_file()

