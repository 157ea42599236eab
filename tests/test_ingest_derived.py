"""Derived files of an ingested folder are checked before use (issue 19, item 10): the manifest carries its
own checksum, so a hand edit is one line naming manifest.json and the repair; the journal's stamps and the
loaders' `.verified.json` carry one too, so a damaged or foreign copy is ignored and the files hashed again."""
import json
import os
import shutil

import pytest

import cli
from files import read_json, write_json
from ingest import build as build_module
from ingest import layout
from ingest.build import build
from test_ingest_rebuild import SILENT, outputs, tiny_cfg


def copy(ingested, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(ingested, out)
    return out


def swap_two_classes(m):
    m["classes"][0], m["classes"][1] = m["classes"][1], m["classes"][0]


def drop_the_last_class(m):
    m["classes"].pop()


@pytest.mark.slow
@pytest.mark.parametrize("edit", [swap_two_classes, drop_the_last_class])
def test_a_hand_edited_manifest_is_one_line_and_a_rerun_rewrites_it(tiny_src, ingested, tmp_path, capsys, edit):
    """Before: all loaders, --verify and the ingest's up-to-date check accepted it (wrong class names in every
    report, or an IndexError mid-epoch)."""
    out = copy(ingested, tmp_path)
    manifest = read_json(out / layout.MANIFEST)
    edit(manifest)
    (out / layout.MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(cli.UsageError) as err:
        layout.read_manifest(out)
    assert str(err.value).startswith(f"{out / layout.MANIFEST} is damaged (edited since ingest")
    assert f"rerun python ingest/build.py --src {tiny_src} --out {out}" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        cli.run(build_module.main, ["--verify", "--out", str(out)])
    assert exit_.value.code == 2 and "manifest.json is damaged" in capsys.readouterr().err
    said = []
    build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    assert not any("up to date" in line for line in said)
    assert outputs(out) == outputs(ingested)


def test_a_manifest_without_checksum_loads_and_gets_one_on_the_next_rerun(tiny_src, ingested, tmp_path):
    """Datasets ingested before manifests carried a checksum still load, unchecked; an up-to-date rerun seals it."""
    out = copy(ingested, tmp_path)
    legacy = read_json(out / layout.MANIFEST)
    del legacy["checksum"]
    write_json(out / layout.MANIFEST, legacy, indent=1, sort_keys=True)
    assert layout.read_manifest(out) == legacy
    said = []
    build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    assert "up to date" in said[0] and "added a checksum" in said[1]
    assert outputs(out) == outputs(ingested)


def flip_in_place(path):
    """Flip bytes mid-file at the same size; returns the file's (size, mtime, ctime, inode) afterwards."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00" * 32)
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def test_a_forged_verified_memo_is_ignored(ingested, tmp_path):
    """Before: a `.verified.json` vouching for a file's current stamp was trusted, whatever its state."""
    out = copy(ingested, tmp_path)
    manifest = layout.read_manifest(out)
    layout.check_split(out, "test", manifest)  # writes the memo
    assert read_json(out / layout.VERIFIED)["dataset"] == manifest["fingerprint"]
    tar = out / manifest["splits"]["test"]["shards"][0]["tar"]
    stamp = flip_in_place(tar) + [manifest["files"][tar.name]["sha256"]]
    memo = read_json(out / layout.VERIFIED)
    for forged in ({**memo, "files": {**memo["files"], tar.name: stamp}},  # edited: its checksum no longer fits
                   {"files": {tar.name: stamp}},  # the format before the checksum
                   {tar.name: stamp}):  # the format before that
        write_json(out / layout.VERIFIED, forged)
        with pytest.raises(cli.UsageError, match=f"{tar} does not match its sha256 in the manifest"):
            layout.check_split(out, "test", manifest)


def test_a_verified_memo_of_another_dataset_is_ignored(ingested, tmp_path):
    from files import seal

    out = copy(ingested, tmp_path)
    manifest = layout.read_manifest(out)
    tar = out / manifest["splits"]["test"]["shards"][0]["tar"]
    stamp = flip_in_place(tar) + [manifest["files"][tar.name]["sha256"]]
    write_json(out / layout.VERIFIED, seal({"dataset": "f" * 64, "files": {tar.name: stamp}}))
    with pytest.raises(cli.UsageError, match="does not match its sha256"):
        layout.check_split(out, "test", manifest)


def test_a_damaged_journal_is_not_trusted(tiny_src, ingested, tmp_path):
    """Before: a journal stamp matching a changed file made the rerun say 'up to date' over damaged data."""
    out = copy(ingested, tmp_path)
    journal = read_json(out / layout.JOURNAL)
    tar = "train-00000.tar"
    journal["files"][tar]["stamp"] = flip_in_place(out / tar)
    (out / layout.JOURNAL).write_text(json.dumps(journal))
    said = []
    build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    assert tar in said[0] and "up to date" not in said[0]
    assert outputs(out) == outputs(ingested)


@pytest.mark.slow
def test_a_damaged_journal_deletes_nothing_it_lists(tiny_src, ingested, tmp_path):
    out = copy(ingested, tmp_path)
    (out / "thesis.tex").write_text("mine")
    journal = read_json(out / layout.JOURNAL)
    journal["files"]["thesis.tex"] = {}
    (out / layout.JOURNAL).write_text(json.dumps(journal))
    os.unlink(out / layout.MANIFEST)  # a rebuild, which removes the stale files the journal lists
    build(tiny_cfg(tiny_src, out), **SILENT)
    assert (out / "thesis.tex").read_text() == "mine"


@pytest.mark.slow
def test_a_jpeg_stored_damaged_under_a_matching_sha256_is_found_by_verify_and_repaired_by_a_rerun(
        tiny_src, ingested, tmp_path, capsys):
    """What a damaged cache entry used to leave (item 5): ffcv stopped on the image and said to run --verify,
    which decoded it with PIL (deaf to libjpeg's corrupt-data warnings) and said clean; a rerun said 'up to
    date'. A dead end."""
    import tarfile

    from ingest.journal import Journal

    out = copy(ingested, tmp_path)
    tar = out / "test-00000.tar"
    with tarfile.open(tar) as t:
        jpg = next(m for m in t if m.name.endswith(".jpg"))
    with open(tar, "r+b") as f:  # an end-of-image marker mid-scan: libjpeg warns, PIL decodes it (grey-filled)
        f.seek(jpg.offset_data)
        data = f.read(jpg.size)
        scan = data.index(b"\xff\xda")
        f.seek(jpg.offset_data + (scan + jpg.size) // 2)
        f.write(b"\xff\xd9")
    manifest = read_json(out / layout.MANIFEST)  # the ingest of that time hashed what it wrote
    manifest["files"][tar.name] = {"bytes": tar.stat().st_size, "sha256": layout.file_sha256(tar)}
    layout.write_manifest(out, manifest)
    Journal(out).record(tar.name)
    layout.check_split(out, "test", layout.read_manifest(out))  # the loaders' check passes: the sha256 matches

    with pytest.raises(SystemExit) as exit_:
        cli.run(build_module.main, ["--verify", "--out", str(out), "--workers", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert exit_.value.code == 1
    assert any(line.startswith(f"{tar.name}: sample {jpg.name[:8]}: JPEG does not decode") for line in lines), lines
    said = []
    build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    assert "up to date" not in said[0] and tar.name in said[0]
    assert outputs(out) == outputs(ingested)
