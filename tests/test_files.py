"""files.py, the one way every stage writes: complete or not at all, flushed to the disk before the rename,
under temp names that a rerun recognises as fastpix's own."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import files


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.json"
    files.write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_the_data_reaches_the_disk_before_the_new_name_points_at_it(tmp_path, monkeypatch):
    """Before: os.replace alone; after a power cut the new name could hold no data."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    files.write_bytes(tmp_path / "x.bin", b"data")
    temp = str(tmp_path / f".x.bin.tmp{os.getpid()}")
    assert events == [("fsync", temp), ("replace", temp)]
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    events.clear()
    files.write_bytes(tmp_path / "cache.jpg", b"data", durable=False)  # what a rerun derives again: not flushed
    assert events == [("replace", str(tmp_path / f".cache.jpg.tmp{os.getpid()}"))]


def test_temp_of_knows_only_the_names_atomic_path_gives(tmp_path):
    with files.atomic_path(tmp_path / "train-00000.tar") as tmp:
        assert files.temp_of(tmp.name) == "train-00000.tar"
        tmp.write_bytes(b"")
    for foreign in (".settings.tmp.bak", "notes.tmp12", ".notes.tmp", "train-00000.tar", ".last.pt.tmp-backup"):
        assert files.temp_of(foreign) is None, foreign


def test_json_writes_dataclasses_paths_and_tuples_and_reads_back(tmp_path):
    @dataclass
    class Cfg:
        data: Path
        sizes: tuple

    files.write_json(tmp_path / "c.json", {"config": Cfg(Path("/d"), (1, 2)), "b": 1})
    assert (tmp_path / "c.json").read_text() == (
        '{\n  "config": {\n    "data": "/d",\n    "sizes": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n')
    files.write_json(tmp_path / "m.json", {"b": 1, "a": [1]}, indent=1, sort_keys=True)
    assert (tmp_path / "m.json").read_text() == '{\n "a": [\n  1\n ],\n "b": 1\n}\n'  # the manifest's form
    assert files.read_json(tmp_path / "m.json") == {"a": [1], "b": 1}
