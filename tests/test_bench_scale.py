"""bench.scale on tiny data: every figure of issue 20's item 5 measured on a fresh re-ingest of the dataset's
source, in a scratch copy that is gone afterwards. Timings are not asserted (2 shared cores); what each
figure is made of is."""
import json

import pytest

from bench import scale
from cli import UsageError
from ingest import layout

pytestmark = pytest.mark.usefixtures("small_flat_head")  # its train.py processes' flat, with a small head


@pytest.mark.slow
def test_scale_measures_every_figure_in_a_scratch_copy(ingested, tmp_path):
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    assert scale.main(["--data", str(ingested), "--backends", "folder,resident", "--steps", "7", "--res", "64",
                       "--batch-size", "8", "--workers", "1", "--scratch", str(scratch), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    manifest = layout.read_manifest(ingested)
    photos = sum(s["count"] for s in manifest["splits"].values())
    assert r["ingest"]["photos"] == photos
    assert r["ingest"]["per_worker"] == pytest.approx(photos / r["ingest"]["seconds"])
    assert r["ingest"]["peak_rss_mb"] > 50  # the build's process tree, sampled
    assert r["footprint"]["shards_per_photo"] > 0 and r["footprint"]["cache_per_photo"] > 0
    assert r["footprint"]["per_photo"] > r["footprint"]["shards_per_photo"] + r["footprint"]["cache_per_photo"]
    assert r["verify"]["s_per_gb"] == pytest.approx(r["verify"]["seconds"] / (r["footprint"]["bytes"] / 1e9))
    assert set(r["startup"]) == {"folder", "resident"}
    assert all(c["first_s"] > 0 and c["later_s"] > 0 for c in r["startup"].values())
    assert r["resident"]["build_s"] > 0 and r["resident"]["peak_rss_mb"] > 100
    for backend in ("folder", "resident"):  # 7 steps, the first log window (5) left out
        assert r["train"][backend]["steps"] == 2 and 0 <= r["train"][backend]["data_stall"] <= 1
        assert r["train"][backend]["images_per_sec"] > 0
    table = (out / "table.md").read_text()
    assert "ingest photos/s per worker" in table and "train resident" in table and "load average" in table
    assert not scratch.exists()


def test_train_rates_leave_out_the_first_window_and_weigh_each_step_by_its_time(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    steps = [{"kind": "step", "images_per_sec": 1.0, "data_wait_s": 50.0}] * scale.LOG_EVERY + \
            [{"kind": "step", "images_per_sec": 10.0, "data_wait_s": 0.5}, {"kind": "epoch"},
             {"kind": "step", "images_per_sec": 40.0, "data_wait_s": 0.0}]
    metrics.write_text("".join(json.dumps(s) + "\n" for s in steps))
    rates = scale.train_rates(metrics, batch_size=20)  # the steps took 2 s and 0.5 s, 0.5 s of it waiting
    assert rates == {"images_per_sec": pytest.approx(40 / 2.5), "data_stall": pytest.approx(0.5 / 2.5), "steps": 2}


def test_bad_flags_are_usage_errors(ingested):
    with pytest.raises(UsageError, match="unknown backend"):
        scale.main(["--data", str(ingested), "--backends", "nope"])
    with pytest.raises(UsageError, match="--steps must be > 5"):
        scale.main(["--data", str(ingested), "--steps", "5"])
