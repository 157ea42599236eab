"""bench/loaders.py on tiny data: every row measured, ratios against the folder baseline and the decode ceiling
of the same run, and the three promised outputs (table, JSON, plot). Timings themselves are not asserted:
they belong to the bench, not to a test on 2 shared cores."""
import json

import pytest

from bench import loaders as bench
from cli import UsageError
from ingest import layout

TINY = ["--res", "32", "--batch-size", "16", "--epochs", "2", "--workers", "0", "--threads", "1"]


def test_tiny_run_writes_table_json_and_plot(ingested, tmp_path):
    out = tmp_path / "results"
    assert bench.main(["--data", str(ingested), "--backends", "resident", "--in-process", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {(r["backend"], r["split"]): r for r in report["rows"]}
    assert set(rows) == {(b, s) for b in ("decode", "folder", "resident") for s in ("train", "test")}
    for (backend, split), row in rows.items():
        assert "error" not in row, row
        assert row["images_per_sec"] > 0 and len(row["epoch_images_per_sec"]) == 2
        assert row["samples"] == layout.read_manifest(ingested)["splits"][split]["count"]
        assert row["warmup_s"] >= 0 and row["build_s"] >= 0 and row["peak_rss_mb"] > 100
        folder, ceiling = rows[("folder", split)], rows[("decode", split)]
        assert row["vs_folder"] == pytest.approx(row["images_per_sec"] / folder["images_per_sec"])
        assert row["vs_ceiling"] == pytest.approx(row["images_per_sec"] / ceiling["images_per_sec"])
    assert report["targets"]["train"]["best"] == "resident"
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 6 and "× folder" in table and "of ceiling" in table
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file()


def test_a_row_in_a_fresh_process_reports_its_own_numbers(ingested):
    """The default mode: one process per row, so peak RSS is the row's own (the slowest test here: an import)."""
    row = bench.isolated("decode", ingested, "test", batch_size=16, res=32, device="cpu", workers=0, epochs=1,
                         threads=1)
    assert "error" not in row, row
    assert row["samples"] > 0 and row["images_per_sec"] > 0 and row["peak_rss_mb"] > 100


def test_bad_flags_are_usage_errors(ingested):
    with pytest.raises(UsageError, match="unknown backend"):
        bench.main(["--data", str(ingested), "--backends", "nope"])
    with pytest.raises(UsageError, match="--splits"):
        bench.main(["--data", str(ingested), "--splits", "val"])
