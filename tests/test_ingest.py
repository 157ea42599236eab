"""Ingest on the session's tiny demo: accounting, quarantine, normalisation, split, and both formats read back
by their own libraries. Over 300 lines: each of those promises gets a few short tests on the one shared
dataset; the integrity and rerun promises have their own modules (test_ingest_integrity, test_ingest_rebuild)."""
import csv
import io
import json
import math
import os
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import UsageError
from conftest import TINY_DEMO, TINY_STORE, require, require_beton
from ingest import demo, layout
from ingest.config import IngestConfig
from ingest.scan import scan
from ingest.split import split
from ingest.validate import Checked, Rejected, normalise


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def junk(tiny_src):
    return json.loads((tiny_src / demo.MARKER).read_text())["junk"]


def stored(ingested):
    """{relative source path: (split, id, label, stored JPEG bytes)}, read from the tar shards."""
    out = {}
    for split_name in layout.SPLITS:
        table = rows(layout.csv_path(ingested, split_name))
        tars, _ = layout.shard_paths(ingested, split_name)
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".jpg"):
                        i = int(member.name.split(".")[0])
                        out[table[i]["path"]] = (split_name, i, int(table[i]["label"]),
                                                 tar.extractfile(member).read())
    return out


# --- accounting ---------------------------------------------------------------------------------------

def test_every_source_file_is_accounted_for(tiny_src, ingested):
    m = layout.read_manifest(ingested)
    on_disk = sum(len(files) for _, _, files in os.walk(tiny_src))
    quarantine = rows(ingested / layout.QUARANTINE)
    written = sum(len(rows(layout.csv_path(ingested, s))) for s in layout.SPLITS)
    assert m["found"] == on_disk
    assert (m["written"], m["quarantined"]) == (written, len(quarantine))
    assert m["written"] + m["quarantined"] + m["ignored"] == m["found"]
    assert m["classes"] == sorted(TINY_DEMO.classes)
    assert len(stored(ingested)) == written  # each written sample is in the shards once


# --- quarantine: one test per reason --------------------------------------------------------------------

@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("empty", "empty file"),
                                         ("not_an_image", "not an image")])
def test_broken_files_are_quarantined(tiny_src, ingested, kind, reason):
    quarantine = {r["path"]: r["reason"] for r in rows(ingested / layout.QUARANTINE)}
    (rel,) = junk(tiny_src)[kind]
    assert quarantine[rel].startswith(reason)


def test_duplicate_within_a_class_keeps_the_first(tiny_src, ingested):
    original, copy = junk(tiny_src)["duplicate"]
    quarantine = {r["path"]: r["reason"] for r in rows(ingested / layout.QUARANTINE)}
    assert quarantine[copy] == f"duplicate of {original}"
    assert original in stored(ingested)


def test_same_content_in_two_classes_is_ambiguous(tiny_src, ingested):
    quarantine = {r["path"]: r["reason"] for r in rows(ingested / layout.QUARANTINE)}
    for rel in junk(tiny_src)["cross_class"]:
        assert quarantine[rel].startswith("ambiguous")
        assert rel not in stored(ingested)


def test_hidden_files_are_ignored_not_quarantined(tiny_src, ingested):
    (rel,) = junk(tiny_src)["hidden"]
    assert rel not in {r["path"] for r in rows(ingested / layout.QUARANTINE)}
    assert layout.read_manifest(ingested)["ignored"] == 2  # .DS_Store and the demo's own .demo.json


def _cfg(tmp_path, **kw):
    return IngestConfig(src=tmp_path, out=tmp_path / "out", **kw)


def _jpeg(size, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "JPEG")
    return buf.getvalue()


def test_too_small_is_quarantined(tmp_path):
    with pytest.raises(Rejected, match="^too small"):
        normalise(_jpeg((200, 40)), _cfg(tmp_path, min_side=64))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """A 20 kB PNG whose header claims 40,000 x 40,000 pixels: refused from the header alone."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(20_000))) + chunk(b"IEND", b""))
    with pytest.raises(Rejected, match="^decompression bomb"):
        normalise(png, _cfg(tmp_path))


def test_broken_links_special_files_and_non_utf8_names_are_quarantined_links_to_files_followed(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(_jpeg((100, 100)))
    (src / "a" / "ok.jpg").write_bytes(_jpeg((100, 100)))
    (src / "a" / "inside.jpg").symlink_to(src / "a" / "ok.jpg")
    (src / "a" / "leaves.jpg").symlink_to(outside)
    (src / "a" / "broken.jpg").symlink_to(src / "a" / "gone.jpg")
    os.mkfifo(src / "a" / "pipe.jpg")
    (src / "a").joinpath(os.fsdecode(b"caf\xe9.jpg")).write_bytes(_jpeg((100, 100)))  # Latin-1, not UTF-8
    found = scan(src)
    assert sorted(rel for rel, _ in found.candidates) == ["a/inside.jpg", "a/leaves.jpg", "a/ok.jpg"]  # ImageFolder's
    reasons = dict(found.quarantined)
    assert reasons["a/broken.jpg"] == "unreadable: broken symlink"
    assert reasons["a/pipe.jpg"] == "not a regular file"
    assert reasons["a/caf\\xe9.jpg"] == "file name is not UTF-8"


# --- normalisation ---------------------------------------------------------------------------------------

def test_stored_images_are_rgb_baseline_jpegs_at_store_size(ingested):
    for rel, (_, _, _, data) in stored(ingested).items():
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB"), rel
            assert "progressive" not in im.info and "progression" not in im.info, rel  # baseline
            assert min(im.size) == TINY_STORE, rel  # every tiny photo is larger, so all were shrunk


@pytest.mark.parametrize("kind", ["gray", "cmyk", "png_alpha", "exif_rotated", "progressive"])
def test_odd_formats_are_accepted_and_normalised(tiny_src, ingested, kind):
    (rel,) = junk(tiny_src)[kind][:1]
    with Image.open(tiny_src / rel) as src_im:
        assert src_im.format == ("PNG" if kind == "png_alpha" else "JPEG")  # the junk is what it claims
    _, _, _, data = stored(ingested)[rel]
    im = Image.open(io.BytesIO(data))
    assert im.mode == "RGB"
    name, index = rel.split("/")[0], int(Path(rel).stem)
    upright, _, _ = demo._photo(TINY_DEMO, name, index)
    assert (im.width > im.height) == (upright.width > upright.height)
    if kind == "png_alpha":  # the transparent top third is composited on white
        top = np.asarray(im)[: im.height // 4]
        assert top.mean() > 245
    if kind == "exif_rotated":  # upright, not merely the right shape: compare with the rendered photo
        small = np.asarray(upright.resize(im.size), np.float32)
        flipped = np.asarray(upright.rotate(180).resize(im.size), np.float32)
        ours = np.asarray(im, np.float32)
        assert np.abs(ours - small).mean() < np.abs(ours - flipped).mean() / 2


def test_never_upscales(tmp_path):
    data, size = normalise(_jpeg((100, 80)), _cfg(tmp_path, store_size=256, min_side=16))
    assert size == (100, 80) == Image.open(io.BytesIO(data)).size


# --- split ---------------------------------------------------------------------------------------------

def _samples(n_per_class, classes=3):
    return [Checked(f"c{c}/{i:03d}.jpg", c, "") for c in range(classes) for i in range(n_per_class)]


def test_split_ignores_input_order_and_depends_on_seed():
    samples = _samples(20)
    names = ["c0", "c1", "c2"]
    ref = split(samples, names, seed=0, test_share=0.1)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    assert split(shuffled, names, seed=0, test_share=0.1) == ref
    assert split(samples, names, seed=1, test_share=0.1)["test"] != ref["test"]


def test_adding_a_photo_moves_at_most_one_other_across():
    samples = _samples(60, classes=1)
    for n in range(2, 60):  # grow one class photo by photo, crossing several test-count steps
        before = {s.rel for s in split(samples[:n], ["c0"], seed=0, test_share=0.1)["test"]}
        after = {s.rel for s in split(samples[:n + 1], ["c0"], seed=0, test_share=0.1)["test"]}
        assert len(before ^ (after - {samples[n].rel})) <= 1


def test_split_is_stratified(ingested):
    m = layout.read_manifest(ingested)
    for name in m["classes"]:
        n_test, n_train = m["splits"]["test"]["per_class"][name], m["splits"]["train"]["per_class"][name]
        assert n_test == min(max(1, round((n_test + n_train) * m["test_share"])), n_test + n_train - 1) >= 1
    for split_name in layout.SPLITS:
        labels = [int(r["label"]) for r in rows(layout.csv_path(ingested, split_name))]
        assert labels == sorted(labels)  # id order is (class, path)
        counts = {name: labels.count(i) for i, name in enumerate(m["classes"])}
        assert counts == m["splits"][split_name]["per_class"]


def test_class_with_fewer_than_two_valid_images_is_named():
    with pytest.raises(UsageError, match="c1 has fewer than 2"):
        split(_samples(5, 2)[:6], ["c0", "c1"], seed=0, test_share=0.1)


# --- both formats, read back by their own libraries ----------------------------------------------------

def test_train_shards_are_shuffled_test_shards_in_id_order(ingested):
    for split_name, shuffled in (("train", True), ("test", False)):
        tars, _ = layout.shard_paths(ingested, split_name)
        ids = [int(m.name.split(".")[0]) for t in tars for m in tarfile.open(t).getmembers()
               if m.name.endswith(".jpg")]
        assert sorted(ids) == list(range(len(ids)))
        assert (ids != sorted(ids)) == shuffled


def test_each_tar_sample_has_jpg_cls_and_int64_lbl_matching_the_csv(ingested):
    for split_name in layout.SPLITS:
        table = rows(layout.csv_path(ingested, split_name))
        tars, idxs = layout.shard_paths(ingested, split_name)
        assert all(i.is_file() for i in idxs)
        for tar_path in tars:
            with tarfile.open(tar_path) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            keys = {name.split(".")[0] for name in files}
            assert set(files) == {f"{k}.{ext}" for k in keys for ext in ("jpg", "cls", "lbl")}
            for key in keys:
                label = int(table[int(key)]["label"])
                assert files[f"{key}.cls"] == str(label).encode("ascii")
                assert struct.unpack("<q", files[f"{key}.lbl"]) == (label,)


def test_beton_holds_the_same_jpeg_bytes_as_the_shards(ingested):
    require_beton(ingested)
    from ffcv.reader import Reader

    by_id = {(s, i): (label, data) for s, i, label, data in stored(ingested).values()}
    for split_name in layout.SPLITS:
        reader = Reader(str(layout.beton_path(ingested, split_name)))
        assert reader.handlers["image"].__class__.__name__ == "RGBImageField"  # readable without custom_fields
        sizes = dict(zip(reader.alloc_table["ptr"], reader.alloc_table["size"]))
        raw = np.fromfile(reader.file_name, np.uint8)
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        for i in range(reader.num_samples):
            ptr = image["data_ptr"][i]
            want_label, want_bytes = by_id[split_name, i]
            assert raw[ptr:ptr + sizes[ptr]].tobytes() == want_bytes
            assert label[i] == want_label
            assert (image["width"][i], image["height"][i]) == Image.open(io.BytesIO(want_bytes)).size


@pytest.mark.slow
def test_ffcv_loader_reads_every_sample_once_with_its_label(ingested):
    require_beton(ingested)
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    split_name = "train"
    want = [int(r["label"]) for r in rows(layout.csv_path(ingested, split_name))]
    loader = Loader(str(layout.beton_path(ingested, split_name)), batch_size=16, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,  # sequential: batch position = sample id
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)], "label": [IntDecoder()]})
    labels, images = [], []
    for image, label in loader:
        images.append(np.array(image))
        labels += np.asarray(label).reshape(-1).tolist()
    assert labels == want
    images = np.concatenate(images)
    assert images.shape == (len(want), 32, 32, 3) and images.std() > 10  # decoded, not blank


@pytest.mark.slow
def test_dali_pipeline_reads_every_sample_once_with_its_label(ingested):
    require("dali")
    from nvidia.dali import fn, pipeline_def, types

    split_name = "train"
    want = [int(r["label"]) for r in rows(layout.csv_path(ingested, split_name))]
    tars, idxs = layout.shard_paths(ingested, split_name)

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs],
                                         ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
                                         missing_component_behavior="error", pad_last_batch=True, name="reader")
        return jpg, fn.decoders.image(jpg, device="cpu"), lbl

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == len(want)
    seen = {}
    for _ in range(math.ceil(len(want) / 16)):
        jpg, img, lbl = p.run()
        for k in range(len(jpg)):
            key = int(jpg[k].source_info().rsplit(":", 1)[1].split(".")[0])  # "<tar>:<offset>:<key>.jpg"
            label = int(lbl.at(k)[0])
            assert seen.setdefault(key, label) == label  # padding repeats a sample, never mislabels it
            assert img.at(k).shape[2] == 3 and min(img.at(k).shape[:2]) == TINY_STORE
    assert [seen[i] for i in range(len(want))] == want and len(seen) == len(want)


def test_file_gone_since_the_scan_is_quarantined_not_a_crash(tmp_path):
    from ingest.validate import check

    cfg = IngestConfig(src=tmp_path / "src", out=tmp_path / "out")
    assert check((cfg, "a/vanished.jpg", 0)).reason == "unreadable: No such file or directory"
