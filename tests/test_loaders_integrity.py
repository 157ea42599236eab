"""What a loader does with damaged data: the cheap start-up check (ingest.layout.check_split) names the file
that does not match the manifest, damage that keeps sizes is caught when it is read, and nothing is ever
trained on silently. Each test damages its own copy of the tiny dataset."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli import UsageError
from conftest import has_beton, require, require_beton, slow_backends
from ingest import layout
from ingest.shards import ShardIndex
from loaders import make_loader
from tests.test_loaders import BACKENDS


def dataset_copy(ingested, tmp_path):
    """A private copy of the tiny dataset (data files and manifest only), and its manifest."""
    out = tmp_path / "data"
    shutil.copytree(ingested, out, ignore=shutil.ignore_patterns(".*", "resident-*"))
    manifest = json.loads((out / layout.MANIFEST).read_text())
    if "files" not in manifest:  # an ingest that predates `files` and `formats`: add them as ingest writes them
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                             for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx", ".beton", ".csv")}
        manifest["formats"] = ["webdataset", "ffcv"]
        write_manifest(out, manifest)
    return out, manifest


def write_manifest(out, manifest):
    layout.write_manifest(out, manifest)  # sealed with its checksum, as ingest writes it


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def test_an_intact_split_passes_the_check(ingested, tmp_path):
    data, manifest = dataset_copy(ingested, tmp_path)
    for split in layout.SPLITS:
        layout.check_split(data, split, manifest, reads=manifest["formats"])


def test_a_manifest_without_files_asks_for_a_new_ingest(ingested, tmp_path):
    data, manifest = dataset_copy(ingested, tmp_path)
    del manifest["files"]
    with pytest.raises(UsageError, match=f"ingested by an older fastpix: rerun python ingest/build.py --src "
                                         f".* --out {data}$"):
        layout.check_split(data, "train", manifest)


def shard_count(manifest):
    manifest["splits"]["test"]["shards"][0]["count"] += 1
    manifest["splits"]["test"]["count"] += 1


DAMAGE = {  # what is damaged -> (the damage, the file the error names, what it says)
    "truncated tar": (lambda d, m: truncate(d / "test-00000.tar"), "test-00000.tar", "bytes where the manifest"),
    "missing index": (lambda d, m: (d / "test-00000.idx").unlink(), "test-00000.idx", "is missing"),
    "truncated beton": (lambda d, m: truncate(d / "test.beton"), "test.beton", "bytes where the manifest"),
    "csv rows": (lambda d, m: m["splits"]["test"].update(count=1), "test.csv", "rows where the manifest says 1"),
    "index count": (lambda d, m: (m["splits"]["test"]["shards"][0].update(count=1),
                                  m["splits"]["test"].update(count=1),
                                  (d / "test.csv").write_text("".join((d / "test.csv").open().readlines()[:2])),
                                  m["files"]["test.csv"].update(bytes=(d / "test.csv").stat().st_size)),
                    "test-00000.idx", "samples where the manifest says 1"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_one_line_naming_the_file_and_the_repair(damage, ingested, tmp_path):
    data, manifest = dataset_copy(ingested, tmp_path)
    harm, name, says = DAMAGE[damage]
    if name.endswith(".beton"):
        require_beton(data)
    harm(data, manifest)
    with pytest.raises(UsageError) as err:
        layout.check_split(data, "test", manifest, reads=manifest["formats"])
    line = str(err.value)
    assert "\n" not in line and str(data / name) in line and says in line
    assert f"python ingest/build.py --verify --out {data}" in line and f"--out {data} to repair" in line


def test_an_index_pointing_past_its_tar_is_damage(ingested, tmp_path):
    data, manifest = dataset_copy(ingested, tmp_path)
    idx = data / "test-00000.idx"
    lines = idx.read_text().splitlines(keepends=True)
    fields = lines[-1].split(" ")
    fields[1] = str(10 ** len(fields[1]) - 1)  # same digit count: the file keeps its size
    idx.write_text("".join(lines[:-1]) + " ".join(fields))
    manifest["files"][idx.name]["bytes"] = idx.stat().st_size
    with pytest.raises(UsageError, match="points past the end of test-00000.tar"):
        layout.check_split(data, "test", manifest)


def break_a_header_in_the_middle(tar):
    """Zero the tar header of the middle sample's first member; the file keeps its size and its index."""
    samples = layout.read_index(tar.with_suffix(".idx"))
    header = min(offset for offset, _ in samples[len(samples) // 2].values()) - 512
    with open(tar, "r+b") as f:
        f.seek(header)
        f.write(bytes(512))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_cut_short_after_the_start_up_check_is_one_line(workers, ingested, tmp_path):
    """The shards are read at the offsets of their DALI index (ingest.shards.ShardIndex): a tar that loses its
    end after the start-up check stops the run at the sample past the cut, with one line naming it."""
    data, _ = dataset_copy(ingested, tmp_path)
    loader = make_loader("torch", data, "test", batch_size=4, res=32, device="cpu", workers=workers)
    tar = data / "test-00000.tar"
    samples = layout.read_index(tar.with_suffix(".idx"))  # test shards are in id order, from id 0
    offset, size = samples[-1]["jpg"]
    os.truncate(tar, offset + size // 2)
    with pytest.raises(UsageError) as err:
        sum(len(labels) for _, labels in loader)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"test sample {len(samples) - 1} in {tar} does not decode")


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_every_loader_refuses_a_manifest_without_files(name, ingested, tmp_path):
    require(name)
    data, manifest = dataset_copy(ingested, tmp_path)
    del manifest["files"]
    write_manifest(data, manifest)
    with pytest.raises(UsageError, match="ingested by an older fastpix: rerun python ingest/build.py"):
        make_loader(name, data, "test", batch_size=4, device="cpu")


def test_ffcv_refuses_a_dataset_ingested_without_ffcv_in_one_line(ingested, tmp_path):
    require("ffcv")
    data, manifest = dataset_copy(ingested, tmp_path)
    write_manifest(data, {**manifest, "formats": ["webdataset"]})
    with pytest.raises(UsageError, match="has no FFCV files .*: use another --loader"):
        make_loader("ffcv", data, "test", batch_size=4, device="cpu")


def test_a_truncated_beton_is_one_line_not_a_crash(ingested, tmp_path):
    require("ffcv")
    data, _ = dataset_copy(ingested, tmp_path)
    truncate(data / "train.beton", 0.7)
    with pytest.raises(UsageError, match=f"{data / 'train.beton'} has .* bytes where the manifest says"):
        make_loader("ffcv", data, "train", batch_size=4, device="cpu")


@pytest.mark.parametrize("name", slow_backends(["dali", "torch", "resident", "ffcv"]))
@pytest.mark.parametrize("damage", ["header", "jpeg"])
def test_bytes_damaged_in_place_are_found_by_their_digest(name, damage, ingested, tmp_path):
    """Same-size damage that a decoder may take for a JPEG (libjpeg-turbo warns and carries on) or that
    hides samples (a broken tar header): the first start after it reads the file's sha256."""
    require(name)
    data, _ = dataset_copy(ingested, tmp_path)
    break_a_header_in_the_middle(data / "test-00000.tar") if damage == "header" else corrupt_jpeg(data, 3, "zeros")
    damaged = "test.beton" if name == "ffcv" else "test-00000.tar"
    if name == "ffcv" and damage == "header":
        pytest.skip("the beton has no tar headers")
    with pytest.raises(UsageError, match=f"^{data / damaged} does not match its sha256 in the manifest: run "
                                         f"python ingest/build.py --verify --out {data}"):
        make_loader(name, data, "test", batch_size=4, device="cpu")


def test_digests_are_read_once_per_file_version(ingested, tmp_path, monkeypatch):
    data, manifest = dataset_copy(ingested, tmp_path)
    hashed, sha256 = [], layout.file_sha256
    monkeypatch.setattr(layout, "file_sha256", lambda path: hashed.append(path.name) or sha256(path))
    layout.check_split(data, "test", manifest)
    assert hashed == ["test.csv", "test-00000.tar", "test-00000.idx"]
    hashed.clear()
    layout.check_split(data, "test", manifest)
    assert hashed == []  # the stamps in .verified.json vouch for them
    (data / "test-00000.tar").write_bytes((data / "test-00000.tar").read_bytes())  # rewritten: a new ctime
    layout.check_split(data, "test", manifest)
    assert hashed == ["test-00000.tar"]


def corrupt_jpeg(data, sample, pattern, split="test"):
    """Overwrite a quarter of `split` sample `sample`'s JPEG bytes, in its shard and in the beton alike; every
    file keeps its size, so only reading the bytes can tell. "noise" breaks the entropy-coded data so that
    libjpeg gives up; "zeros" only makes it warn and carry on with a grey smear; "garbage" overwrites all of
    them (header included: no decoder carries on). Returns the shard."""
    index = ShardIndex(data, split)
    position = int(np.flatnonzero(index.ids == sample)[0])
    tar, offset, size = Path(index.tar(position)), int(index.offset[position]), int(index.size[position])
    raw = tar.read_bytes()
    jpeg = raw[offset:offset + size]
    start, stop = (0, size) if pattern == "garbage" else (size // 3, size // 3 + size // 4)
    bad = jpeg[:start] + (np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
                          if pattern in ("noise", "garbage") else bytes(stop - start))
    bad += jpeg[stop:]
    tar.write_bytes(raw[:offset] + bad + raw[offset + size:])
    if has_beton(data):
        beton = data / f"{split}.beton"
        raw = beton.read_bytes()
        at = raw.index(jpeg)
        beton.write_bytes(raw[:at] + bad + raw[at + size:])
    return tar


def past_the_digest(data, manifest, split="test"):
    """Record the damaged files' digests in the manifest, as if the damage came after the start-up check read
    them: what is left to catch it is the decoder."""
    for name in (f"{split}-00000.tar", f"{split}.beton")[:2 if has_beton(data) else 1]:
        manifest["files"][name]["sha256"] = layout.file_sha256(data / name)
    write_manifest(data, manifest)


def read_all(name, data, split="test", workers=1):
    options = {"cache": False} if name == "resident" else {}
    loader = make_loader(name, data, split, batch_size=4, res=32, device="cpu", workers=workers, **options)
    return sum(len(labels) for _, labels in loader)


@pytest.mark.parametrize("name,workers", slow_backends([("torch", 0), ("ffcv", 1), ("dali", 1)]) + [
    pytest.param("torch", 1, marks=pytest.mark.slow), pytest.param("resident", 1, marks=pytest.mark.slow)])
def test_a_jpeg_that_does_not_decode_stops_the_run_with_one_line(name, workers, ingested, tmp_path):
    require(name)
    data, manifest = dataset_copy(ingested, tmp_path)
    corrupt_jpeg(data, 3, "garbage" if name == "dali" else "noise")  # DALI's libjpeg-turbo carries on over noise
    past_the_digest(data, manifest)
    with pytest.raises(UsageError) as err:  # from a DataLoader worker too, where it is re-made from a traceback
        read_all(name, data, workers=workers)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"test sample 3 in {data / ('test.beton' if name == 'ffcv' else 'test-00000.tar')} does not decode: run python ingest/build.py --verify --out {data}")


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_train_crop_that_does_not_decode_stops_the_run_with_one_line(workers, ingested, tmp_path):
    """torch's train crops decode their region alone (loaders.torch_loader.decode_region), with a decoder that
    answers bytes it cannot read with nothing rather than an exception: the same one line all the same."""
    data, manifest = dataset_copy(ingested, tmp_path)
    sample = int(ShardIndex(data, "train").ids[0])
    tar = corrupt_jpeg(data, sample, "garbage", split="train")
    past_the_digest(data, manifest, split="train")
    # res 48 from the 64 px store: no box is twice the output side, so every crop takes the region decode
    loader = make_loader("torch", data, "train", batch_size=4, res=48, device="cpu", workers=workers)
    with pytest.raises(UsageError) as err:
        sum(len(labels) for _, labels in loader)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"train sample {sample} in {tar} does not decode: run python "
                                                f"ingest/build.py --verify --out {data}")


# resident reads the shards only while it is built
@pytest.mark.slow  # each case stops a loader mid-pass: torch waits up to 5 s for its worker to end
@pytest.mark.parametrize("name", ["torch", "ffcv", "dali"])
def test_data_ingested_again_under_a_running_loader_is_said_to_be_replaced_not_damaged(name, ingested, tmp_path):
    """Issue 19 item 16: a loader that meets bytes that no longer decode after the manifest changed under it
    says the data was replaced (and to restart), not that a shard is damaged."""
    require(name)
    data, manifest = dataset_copy(ingested, tmp_path)
    # workers=2: forked workers, which hung here in the whole suite until WorkerLoader collected the garbage
    # (an earlier test's DALI pipeline) before forking them
    loader = make_loader(name, data, "test", batch_size=4, res=32, device="cpu", workers=2)
    corrupt_jpeg(data, 3, "garbage")
    past_the_digest(data, {**manifest, "note": "ingested again"})
    with pytest.raises(UsageError) as err:
        sum(len(labels) for _, labels in loader)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"the data in {data} was replaced while this run read it")
    assert "restart" in line and "damaged" not in line


@pytest.mark.slow
def test_ffcv_stops_on_a_jpeg_that_libjpeg_only_warns_about(ingested, tmp_path):
    require("ffcv")
    data, manifest = dataset_copy(ingested, tmp_path)
    corrupt_jpeg(data, 3, "zeros")
    past_the_digest(data, manifest)
    with pytest.raises(UsageError, match="test sample 3 in .*test.beton does not decode"):
        read_all("ffcv", data)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: a DataLoader worker starts
def test_an_unreadable_photo_stops_the_folder_baseline_with_one_line(workers, ingested, tiny_src, tmp_path):
    data, manifest = dataset_copy(ingested, tmp_path)
    source = tmp_path / "src"
    shutil.copytree(tiny_src, source)
    write_manifest(data, {**manifest, "source": str(source)})
    photo = source / (data / "test.csv").read_text().splitlines()[1 + 2].split(",")[0]  # test sample 2
    photo.write_bytes(photo.read_bytes()[:40])
    with pytest.raises(UsageError) as err:
        read_all("folder", data, workers=workers)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"test sample 2: photo {photo} cannot be read") and "restore it" in line
