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


def _try_writer(folder, wait=False):
    """A second process asks for `folder`; returns its stdout and stderr."""
    import subprocess
    import sys
    code = ("import sys, files\n"
            "try:\n"
            f"    with files.one_writer({str(folder)!r}, wait={wait}, every=0.2): print('got it')\n"
            "except files.Busy as err: print('busy:', err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(files.__file__).parent)
    return done.stdout, done.stderr


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    folder = tmp_path / "out"
    with files.one_writer(folder):
        assert (folder / files.WRITER_NOTE).is_file()
        out, _ = _try_writer(folder)
    assert out.startswith("busy: ") and f"pid {os.getpid()}" in out and f"kill {os.getpid()}" in out
    assert list(folder.iterdir()) == []  # the note goes with the holder
    assert _try_writer(folder)[0] == "got it\n"


def test_a_dead_holder_releases_the_folder_and_its_stale_note_is_ignored(tmp_path):
    import subprocess
    import sys
    folder = tmp_path / "out"
    code = f"import os, files\nwith files.one_writer({str(folder)!r}): os._exit(0)"  # dies without cleaning up
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(files.__file__).parent)
    assert (folder / files.WRITER_NOTE).is_file()
    assert _try_writer(folder)[0] == "got it\n"


@pytest.mark.slow
def test_a_waiting_writer_says_whom_it_waits_for_then_gets_the_folder(tmp_path):
    import threading
    folder = tmp_path / "out"
    held = threading.Event()

    def hold():
        with files.one_writer(folder):
            held.set()
            import time
            time.sleep(1.5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    out, err = _try_writer(folder, wait=True)
    holder.join()
    assert out == "got it\n" and f"held by pid {os.getpid()}" in err


def test_as_read_back_is_what_read_json_gives_for_what_write_json_wrote(tmp_path):
    """How the study's cache and --resume compare a config in memory with the one saved: tuples, Paths and
    anything else json does not know (a dtype) come back as read_json reads them."""
    @dataclass
    class Settings:
        strides: tuple = ((4, 1, 1), (2, 1, 1))
        data: Path = Path("/data/x")
        dtype: object = float
        merge: tuple = ()

    files.write_json(tmp_path / "settings.json", {"config": Settings()})
    assert files.as_read_back({"config": Settings()}) == files.read_json(tmp_path / "settings.json")
    assert files.as_read_back(Settings())["strides"] == [[4, 1, 1], [2, 1, 1]]
