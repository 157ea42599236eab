"""Nothing lost, nothing silently wrong (issue 10, ingest side): checksums in the manifest, --verify naming
each damaged file, repair by rerun, deleting only what ingest wrote, and refusing folders that are not ours."""
import os
import shutil
import sys
import tarfile

import pytest

import cli
from conftest import has_beton, require_beton
from ingest import build as build_module
from ingest import layout
from ingest.build import build
from test_ingest_rebuild import SILENT, outputs, tiny_cfg


def copy(ingested, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(ingested, out)
    return out


# --- the manifest records every data file ---------------------------------------------------------------

def test_manifest_records_size_and_sha256_of_every_data_file(ingested):
    m = layout.read_manifest(ingested)
    assert set(m["files"]) == set(outputs(ingested)) - {layout.MANIFEST}  # loaders may add caches of their own
    for name, entry in m["files"].items():
        path = ingested / name
        assert entry == {"bytes": path.stat().st_size, "sha256": layout.file_sha256(path)}
    assert m["formats"] == ["webdataset"] + ([] if build_module._ffcv_error() else ["ffcv"])


def test_ingest_without_ffcv_writes_the_shards_warns_once_and_says_so(tiny_src, ingested, tmp_path, monkeypatch):
    """FFCV's compiled part cannot load on the lent GPU machine: its import fails, here made to fail."""
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith("ffcv.")] + ["ffcv"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: `import ffcv...` raises ImportError
    build_module._ffcv_error.cache_clear()
    out, said = tmp_path / "out", []
    try:
        m = build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    finally:
        build_module._ffcv_error.cache_clear()
    assert m["formats"] == ["webdataset"]
    assert sum("warning: FFCV cannot be imported" in line for line in said) == 1
    assert not list(out.glob("*.beton")) and not any(n.endswith(".beton") for n in m["files"])
    want = {k: v for k, v in outputs(ingested).items() if not k.endswith((".beton", layout.MANIFEST))}
    assert {k: v for k, v in outputs(out).items() if k != layout.MANIFEST} == want
    from ingest.verify import verify

    assert verify(out)[0] == []


# --- a damaged manifest is one line ----------------------------------------------------------------------

@pytest.mark.parametrize("text,why", [("{not json", "not valid JSON"), ('{"classes": []}', "missing fingerprint"),
                                      ("[1, 2]", "not a JSON object")])
def test_invalid_manifest_is_one_line_saying_to_rerun_the_ingest(ingested, tmp_path, text, why):
    out = copy(ingested, tmp_path)
    (out / layout.MANIFEST).write_text(text)
    with pytest.raises(cli.UsageError, match=f"{why}.*rerun python ingest/build.py") as err:
        layout.read_manifest(out)
    assert "\n" not in str(err.value)


# --- cleanup deletes only what ingest wrote ----------------------------------------------------------------

FOREIGN = ("train-photos-2023.tar", "test-notes.idx", ".settings.tmp.bak", ".notes.tmp12", "train-00009.tar")


@pytest.mark.slow
def test_rebuild_keeps_files_ingest_did_not_write(tiny_src, ingested, tmp_path):
    """Before: the stale-shard cleanup matched `train-*.tar`, `test-*.idx` and `.*.tmp*` and deleted these."""
    out = copy(ingested, tmp_path)
    for name in FOREIGN:
        (out / name).write_bytes(b"the user's")
    build(tiny_cfg(tiny_src, out, force=True), **SILENT)
    assert all((out / name).read_bytes() == b"the user's" for name in FOREIGN)


@pytest.mark.slow
def test_stale_shards_and_temp_files_ingest_wrote_are_removed(tiny_src, ingested, tmp_path):
    out = tmp_path / "out"
    bigger = build(tiny_cfg(tiny_src, out, shard_size=8), **SILENT)
    assert len(bigger["splits"]["train"]["shards"]) > 2
    (out / ".train-00005.tar.tmp4242").write_bytes(b"what a kill -9 leaves")
    build(tiny_cfg(tiny_src, out), **SILENT)
    assert outputs(out) == outputs(ingested)
    assert not (out / ".train-00005.tar.tmp4242").exists()


# --- --verify names each damaged file; a plain rerun repairs only those ------------------------------------

def _damage(out):
    """Four kinds of damage, each to its own file; returns the damaged file names."""
    with tarfile.open(out / "train-00000.tar") as tar:
        jpg = next(m for m in tar if m.name.endswith(".jpg"))
    with open(out / "train-00000.tar", "r+b") as f:  # same size: only a checksum can tell
        f.seek(jpg.offset_data + jpg.size // 2)
        f.write(bytes(64))
    with tarfile.open(out / "train-00001.tar") as tar:
        third = [m for m in tar][3 * 3]  # the first member of the fourth sample: mid-file
    with open(out / "train-00001.tar", "r+b") as f:
        f.seek(third.offset + 100)  # inside the header: its checksum no longer fits
        f.write(b"garbage")
    (out / "test-00000.idx").unlink()
    if not has_beton(out):
        return {"train-00000.tar", "train-00001.tar", "test-00000.idx"}
    beton = out / "test.beton"
    os.truncate(beton, beton.stat().st_size // 2)
    return {"train-00000.tar", "train-00001.tar", "test.beton", "test-00000.idx"}


@pytest.mark.slow
def test_verify_names_each_damaged_file_and_a_rerun_repairs_only_those(tiny_src, ingested, tmp_path, capsys):
    out = copy(ingested, tmp_path)
    assert cli_code(["--verify", "--out", str(out), "--workers", "1"]) == 0
    damaged = _damage(out)
    untouched = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in damaged | {layout.JOURNAL}}
    capsys.readouterr()
    assert cli_code(["--verify", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    named = {line.split(":")[0] for line in lines[:-1]}
    assert named == damaged, lines
    assert any("only 3 of" in line for line in lines if line.startswith("train-00001.tar"))  # the header break
    assert "rerun python ingest/build.py" in lines[-1]

    said = []
    build(tiny_cfg(tiny_src, out), progress=False, log=said.append)
    assert "up to date" not in said[0] and all(name in said[0] for name in damaged)
    assert outputs(out) == outputs(ingested)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in untouched} == untouched
    assert cli_code(["--verify", "--out", str(out), "--workers", "2"]) == 0


def cli_code(argv):
    with pytest.raises(SystemExit) as exit_:
        cli.run(build_module.main, argv)
    return exit_.value.code


# --- ingest writes only into folders that are its own ----------------------------------------------------

@pytest.mark.slow
def test_a_non_empty_folder_that_is_not_ours_is_refused_unless_force(tiny_src, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("mine")
    with pytest.raises(cli.UsageError, match="not empty and holds no dataset of fastpix's.*--force"):
        build(tiny_cfg(tiny_src, out), **SILENT)
    assert [p.name for p in out.iterdir()] == ["chapter1.tex"]  # not even a lock or a cache was left
    build(tiny_cfg(tiny_src, out, force=True), **SILENT)
    assert (out / "chapter1.tex").read_text() == "mine" and (out / layout.MANIFEST).is_file()
    build(tiny_cfg(tiny_src, out), progress=False, log=lambda line: None)  # now marked as ours: no --force


# --- a full disk is one line, and a rerun after freeing space completes -----------------------------------

@pytest.mark.slow
def test_disk_full_is_one_line_keeps_what_was_written_and_a_rerun_completes(tiny_src, ingested, tmp_path,
                                                                              monkeypatch):
    """Before: an OSError traceback."""
    import errno

    from webdataset import TarWriter

    out = tmp_path / "out"
    real_write, calls = TarWriter.write, []

    def fills_the_disk(self, sample):
        calls.append(1)
        if len(calls) == 40:  # inside the second train shard, after the csvs, the betons and the first shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, sample)

    monkeypatch.setattr(TarWriter, "write", fills_the_disk)
    with pytest.raises(cli.UsageError) as err:
        build(tiny_cfg(tiny_src, out), **SILENT)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while writing {out / 'train-00001.tar'}: about ")
    assert "MB more is needed" in message and "what was written is kept" in message
    assert (out / "train-00000.tar").is_file() and (out / "train.beton").is_file() == has_beton(ingested)
    monkeypatch.undo()
    build(tiny_cfg(tiny_src, out), **SILENT)
    assert outputs(out) == outputs(ingested)


def test_disk_full_at_the_beton_says_what_its_pages_need_too(tiny_src, ingested, tmp_path, monkeypatch):
    """Before: 'about 0 MB more is needed' where the beton's check wanted ~4 MB (two 2 MB pages)."""
    require_beton(ingested)
    import re
    import shutil as shutil_module

    from ingest import beton

    free = 100_000
    monkeypatch.setattr(beton.shutil, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, free))
    with pytest.raises(cli.UsageError) as err:
        build(tiny_cfg(tiny_src, tmp_path / "out"), **SILENT)
    more = float(re.search(r"about ([0-9.]+) MB more is needed", str(err.value))[1])
    assert more >= 4.0, str(err.value)


def test_beton_checks_the_space_first_instead_of_hanging(ingested, tmp_path, monkeypatch):
    """FFCV's writer waits forever for a child process that a full disk killed; the space is checked first."""
    require_beton(ingested)
    import errno
    import shutil as shutil_module

    from ingest import beton
    from ingest.validate import Checked

    cached = sorted((ingested / ".cache").glob("*/*.jpg"))[:3]
    samples = [Checked(f"a/{i}.jpg", 0, "", width=64, height=64, cached=str(p)) for i, p in enumerate(cached)]
    monkeypatch.setattr(beton.shutil, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(OSError) as err:
        beton.write_beton(tmp_path / "train.beton", samples)
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


def test_a_folder_holding_only_a_killed_runs_journal_temp_is_still_ours(tmp_path):
    from ingest.journal import claim

    (tmp_path / f".{layout.JOURNAL}.tmp4242").write_text("{")  # killed between mkdir and the journal's rename
    assert claim(tmp_path, force=False).files == {}
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / layout.JOURNAL).unlink()
    with pytest.raises(cli.UsageError):
        claim(tmp_path, force=False)
