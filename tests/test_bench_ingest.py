"""bench.ingest on a folder of photos given with --data (issue 20: every benchmark takes --data): every worker
count measured --repeats times, the speed-up with the range of its repeats."""
import json
import os

import pytest

from bench import ingest as bench_ingest
from cli import UsageError


@pytest.mark.slow
def test_ingest_bench_takes_data_and_states_the_speed_up_range(tiny_src, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # its results/ and nothing else go here
    bench_ingest.main(["--data", str(tiny_src), "--repeats", "2", "--workers", "1", "--store-size", "64"])
    (out,) = (tmp_path / "results").glob("ingest-*")
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    rates = sorted(r["images"] / r["validate_s"] for r in row["runs"])
    assert row["validate_rate"] == {"median": sum(rates) / 2, "lo": rates[0], "hi": rates[1], "rounds": 2}
    table = (out / "table.md").read_text()
    assert f"photos of {tiny_src}" in table
    assert f"1.00× ({rates[0] / rates[1]:.2f}-{rates[1] / rates[0]:.2f}) within noise" in table  # against itself
    assert not (tmp_path / "data").exists() and os.listdir(tiny_src)  # the given photos, no demo generated


def test_bad_flags_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--repeats and every --workers value must be >= 1"):
        bench_ingest.main(["--data", str(tmp_path), "--workers", "0"])
    with pytest.raises(UsageError, match="is not a folder of photos"):
        bench_ingest.main(["--data", str(tmp_path / "nope")])
