"""bench/loaders.py on tiny data: every row measured, ratios against the folder baseline, the libraries' reference
pipelines and the fastest decoder of the same run, and the three promised outputs (table, JSON, plot). Timings
themselves are not asserted: they belong to the bench, not to a test on 2 shared cores."""
import json

import pytest

from bench import loaders as bench
from bench.references import DECODERS, REFERENCES
from cli import UsageError
from conftest import import_error, require, slow_backends
from ingest import layout

TINY = ["--res", "32", "--batch-size", "16", "--epochs", "2", "--workers", "0", "--threads", "1"]
pytestmark = pytest.mark.filterwarnings(  # FFCV's finalizers (DEPENDENCIES.md)
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")


def tiles(png):
    """How many pictures a sample sheet shows: the large, square, non-white blobs (titles are small)."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    pixels = np.asarray(Image.open(png).convert("L"))
    blobs, _ = ndimage.label(pixels < 250)
    boxes = ndimage.find_objects(blobs)
    sides = [(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes]
    return sum(1 for h, w in sides if min(h, w) >= 40 and abs(h - w) <= 2)  # framed squares


@pytest.mark.slow
def test_tiny_run_writes_table_json_plot_and_a_sample_sheet_per_backend(ingested, tmp_path):
    out = tmp_path / "results"
    assert bench.main(["--data", str(ingested), "--backends", "resident", "--in-process", "--out", str(out), *TINY,
                       "--rounds", "1"]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {(r["backend"], r["split"], r["augment"]): r for r in report["rows"]}
    assert set(rows) == ({(d, s, None) for d in DECODERS for s in ("train", "test")}
                         | {(b, "train", a) for b in ("folder", "resident") for a in ("rrc", "none")}
                         | {(b, "test", "none") for b in ("folder", "resident")})
    if import_error("nvidia.dali"):  # DALI's decode row is then a failed row that says why
        for split in ("train", "test"):
            assert "No module named 'nvidia" in rows.pop(("decode-dali", split, None))["error"]
    for (backend, split, augment), row in rows.items():
        assert "error" not in row, row
        assert row["images_per_sec"] > 0 and len(row["epoch_images_per_sec"]) == 2 and row["rate"]["rounds"] == 1
        assert row["samples"] == layout.read_manifest(ingested)["splits"][split]["count"]
        assert row["warmup_s"] >= 0 and row["peak_rss_mb"] > 100
        assert 0 <= row["build_s"] <= row["first_batch_s"] <= row["build_s"] + row["warmup_s"]
        folder = rows[("folder", split, augment or bench.DEFAULT_AUGMENT[split])]
        ceiling = max(rows[(d, split, None)]["images_per_sec"] for d in DECODERS if (d, split, None) in rows)
        assert row["vs_folder"]["median"] == pytest.approx(row["images_per_sec"] / folder["images_per_sec"])
        assert row["vs_ceiling"]["median"] == pytest.approx(row["images_per_sec"] / ceiling)
        assert row["ceiling"] == (row["images_per_sec"] == ceiling and backend in DECODERS)
        assert row["vs_reference"] is None  # resident has no library of its own
    assert report["targets"]["train"]["best"] == report["targets"]["train-none"]["best"] == "resident"
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 12 and "× folder" in table and "× reference" in table
    assert "fewer than 50" in table  # the tiny data's epochs are a few batches: the table says they do not hold
    assert "1 round(s): fewer than 3 give no idea of the noise" in table
    assert table.count("(ceiling)") == 2 and "first batch s" in table
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file()
    # one sheet per loader and augment, of its first train batch (16 images), and none for the other rows
    sheets = {"samples-folder.png", "samples-folder-none.png", "samples-resident.png", "samples-resident-none.png"}
    assert {p.name for p in out.glob("samples-*.png")} == sheets
    assert all(tiles(out / sheet) == 16 for sheet in sheets)


@pytest.mark.parametrize("backend", slow_backends(sorted(REFERENCES)))
@pytest.mark.parametrize("split", ["train", "test"])
def test_reference_pipelines_deliver_exactly_the_split_on_the_cpu(backend, split, ingested):
    """dali-reference and ffcv-reference run like the other rows: every sample id of the split exactly once per
    epoch, in the backends' batch layout (float32 NCHW channels_last, normalised)."""
    require(backend)
    import torch

    from bench.references import ROWS
    count = layout.read_manifest(ingested)["splits"][split]["count"]
    reference = ROWS[REFERENCES[backend]](ingested, split, batch_size=16, res=32, device=torch.device("cpu"),
                                          seed=0, workers=1, with_ids=True)
    assert reference.num_samples == count
    for epoch in range(2):
        reference.set_epoch(epoch)
        ids = []
        for images, labels, batch_ids in reference:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert -3 < images.mean() < 3 and images.std() > 0.1  # normalised, not 0-255
            assert len(labels) == len(batch_ids) <= 16
            ids += batch_ids.tolist()
        assert sorted(ids) == list(range(count)), (epoch, len(ids), count)


def test_references_come_with_their_library_and_get_its_ratio():
    args = bench.parse(["--backends", "dali,torch"])
    assert args.backends == [*DECODERS, "folder", "dali", "dali-reference", "torch"]
    rows = bench.add_ratios([{"backend": b, "split": "train", "images_per_sec": rate} for b, rate in
                             [("decode-pil", 400), ("decode-dali", 500), ("folder", 10), ("dali", 300),
                              ("dali-reference", 200), ("torch", 100)]])
    by_name = {r["backend"]: r for r in rows}
    assert by_name["dali"]["vs_reference"]["median"] == 1.5 and by_name["torch"]["vs_reference"] is None
    assert by_name["dali"]["vs_ceiling"]["median"] == 0.6 and by_name["decode-dali"]["ceiling"]
    assert bench.targets(rows)["vs_reference"]["dali"]["median"] == 1.5


def test_the_train_split_runs_once_per_augment_for_fastpix_loaders_only():
    cells = bench.cells(["decode-pil", "folder", "dali", "dali-reference"], ["train", "test"], ["rrc", "none"])
    assert cells == [("decode-pil", "train", None), ("decode-pil", "test", None),
                     ("folder", "train", "rrc"), ("folder", "train", "none"), ("folder", "test", "none"),
                     ("dali", "train", "rrc"), ("dali", "train", "none"), ("dali", "test", "none"),
                     ("dali-reference", "train", "rrc"), ("dali-reference", "test", "none")]
    rows = bench.add_ratios([{"backend": b, "split": s, "augment": a, "images_per_sec": rate} for (b, s, a), rate in
                             zip(cells, [400, 500, 10, 40, 12, 300, 800, 600, 200, 400])])
    dali_none = next(r for r in rows if r["backend"] == "dali" and r["augment"] == "none")
    assert dali_none["vs_folder"]["median"] == 20 and dali_none["vs_reference"] is None
    assert dali_none["vs_ceiling"]["median"] == 2
    assert bench.targets(rows, "train", "none")["best_vs_folder"]["median"] == 20
    with pytest.raises(UsageError, match="unknown augment"):
        bench.parse(["--augments", "rrc,crop"])


def test_noise_columns_come_from_the_rounds():
    """Each row is the median and min-max of its rounds; a ratio's range runs from the worst to the best pairing
    of the two rows' rounds, and one that spans 1.0 is printed "within noise", never as a win (issue 20)."""
    rounds = {"decode-pil": [500, 520, 480], "folder": [100, 90, 110], "dali": [300, 310, 290],
              "dali-reference": [280, 320, 300], "ffcv": [400, 420, 410], "ffcv-reference": [300, 310, 305]}
    rows = bench.add_ratios([bench.merge_rounds([
        {"backend": b, "split": "train", "augment": None if b == "decode-pil" else "rrc", "images_per_sec": rate,
         "epoch_images_per_sec": [rate], "warmup_s": 1, "build_s": 1, "first_batch_s": 1, "load_avg_1min": 2.0}
        for rate in rates]) for b, rates in rounds.items()])
    by_name = {r["backend"]: r for r in rows}
    assert by_name["dali"]["rate"] == {"median": 300, "lo": 290, "hi": 310, "rounds": 3}
    assert by_name["dali"]["vs_reference"] == pytest.approx({"median": 1.0, "lo": 290 / 320, "hi": 310 / 280})
    assert by_name["ffcv"]["vs_reference"] == pytest.approx({"median": 410 / 305, "lo": 400 / 310, "hi": 420 / 300})
    assert by_name["ffcv"]["vs_ceiling"] == pytest.approx({"median": 410 / 500, "lo": 400 / 520, "hi": 420 / 480})
    lines = {line.split(" | ")[0].strip("| ").split(" ")[0]: line for line in bench.table(rows).splitlines()[2:]}
    assert "300 (290-310)" in lines["dali"] and "1.00× (0.91-1.11) within noise" in lines["dali"]
    assert "1.34× (1.29-1.40) |" in lines["ffcv"]  # a win: its range stays above 1.0
    assert "500 (480-520)" in lines["decode-pil"]


@pytest.mark.slow
def test_a_row_in_a_fresh_process_reports_its_own_numbers(ingested):
    """The default mode: one process per row, so peak RSS is the row's own (the slowest test here: an import)."""
    row = bench.isolated("decode-torchvision", ingested, "test", batch_size=16, res=32, device="cpu", workers=0,
                         epochs=1, threads=1)
    assert "error" not in row, row
    assert row["samples"] > 0 and row["images_per_sec"] > 0 and row["peak_rss_mb"] > 100


def test_bad_flags_are_usage_errors(ingested):
    with pytest.raises(UsageError, match="unknown backend"):
        bench.main(["--data", str(ingested), "--backends", "nope"])
    with pytest.raises(UsageError, match="--splits"):
        bench.main(["--data", str(ingested), "--splits", "val"])
