"""Every file under --src is accounted for, also behind a symlinked or unreadable folder (issue 10, item 6;
issue 19, item 13: links are followed like torchvision's ImageFolder, loops end).

These tests run as root here, and root reads a folder whatever its permission bits say: unreadability is
therefore simulated in-process, by making os.scandir (which os.walk uses) raise the PermissionError a normal
user gets for that one folder."""
import io
import os

import pytest
from PIL import Image

from cli import UsageError
from ingest.scan import scan, source_path


def _photos(folder, n, green=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (80, 80), (i * 40, green, 0)).save(buf, "JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())


def _unreadable(monkeypatch, *folders):
    real = os.scandir
    denied = {os.fspath(f) for f in folders}

    def scandir(path="."):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_symlinked_class_folders_and_files_are_followed_like_imagefolder(tmp_path):
    """Before: a symlinked class folder was quarantined whole, so its class disappeared from the dataset."""
    src = tmp_path / "src"
    _photos(src / "a", 3)
    _photos(tmp_path / "elsewhere" / "c", 2)
    _photos(tmp_path / "elsewhere" / "more", 2)
    (src / "c").symlink_to(tmp_path / "elsewhere" / "c")  # a class folder kept elsewhere
    (src / "a" / "more").symlink_to(tmp_path / "elsewhere" / "more")  # a subfolder kept elsewhere
    (src / "a" / "far.jpg").symlink_to(tmp_path / "elsewhere" / "c" / "0.jpg")  # and one photo
    found = scan(src)
    assert found.classes == ["a", "c"] and found.quarantined == [] and found.ignored == []
    assert sorted(found.candidates) == [("a/0.jpg", 0), ("a/1.jpg", 0), ("a/2.jpg", 0), ("a/far.jpg", 0),
                                        ("a/more/0.jpg", 0), ("a/more/1.jpg", 0), ("c/0.jpg", 1), ("c/1.jpg", 1)]
    assert source_path(src, "a/0.jpg") == "a/0.jpg"  # what the csvs record: where the bytes are
    assert source_path(src, "c/1.jpg") == str(tmp_path / "elsewhere" / "c" / "1.jpg")
    assert source_path(src, "a/far.jpg") == str(tmp_path / "elsewhere" / "c" / "0.jpg")


def test_link_loops_and_a_folder_linked_twice_end_with_every_entry_counted_once(tmp_path):
    """os.walk(followlinks=True) alone would walk a loop until the path is too long."""
    src = tmp_path / "src"
    _photos(src / "a" / "sub", 2)
    _photos(src / "b", 2)
    (src / "a" / "sub" / "back").symlink_to(src / "a")  # a loop
    (src / "a" / "z").symlink_to(src / "a" / "sub")  # a second way into one folder (walked after a/sub)
    (src / "b" / "self").symlink_to(src / "b" / "self")  # a link to itself
    found = scan(src)
    reasons = dict(found.quarantined)
    assert sorted(rel for rel, _ in found.candidates) == ["a/sub/0.jpg", "a/sub/1.jpg", "b/0.jpg", "b/1.jpg"]
    assert reasons["a/sub/back"].startswith("folder reached again through a symlink") and reasons[
        "a/sub/back"].endswith("counted at a")
    assert reasons["a/z"].endswith("counted at a/sub")
    assert reasons["b/self"] == "unreadable: broken symlink"
    assert found.found == 7


@pytest.mark.slow
def test_a_photo_reached_twice_is_kept_once(tmp_path):
    from ingest.build import build
    from ingest.config import IngestConfig

    src = tmp_path / "src"
    _photos(src / "a", 3)
    _photos(tmp_path / "elsewhere" / "b", 3, green=200)
    (src / "b").symlink_to(tmp_path / "elsewhere" / "b")
    (src / "b" / "x.jpg").symlink_to(tmp_path / "elsewhere" / "b" / "0.jpg")  # b/0.jpg, reached twice
    m = build(IngestConfig(src=src, out=tmp_path / "out", store_size=32, min_side=16, workers=1),
              progress=False, log=lambda *_: None)
    assert (m["found"], m["written"], m["quarantined"]) == (7, 6, 1)
    quarantine = (tmp_path / "out" / "quarantine.csv").read_text()
    assert "b/x.jpg,duplicate of b/0.jpg" in quarantine
    rows = (tmp_path / "out" / "train.csv").read_text() + (tmp_path / "out" / "test.csv").read_text()
    assert f"{tmp_path / 'elsewhere' / 'b' / '1.jpg'},1," in rows and "a/1.jpg,0," in rows


def test_unreadable_subfolder_is_quarantined_not_skipped(tmp_path, monkeypatch):
    """Before: os.walk skipped it silently, so its files were missing from `found`."""
    src = tmp_path / "src"
    _photos(src / "a", 2)
    _photos(src / "a" / "sub", 1)
    _photos(src / "b", 2)
    _unreadable(monkeypatch, src / "a" / "sub")
    found = scan(src)
    assert dict(found.quarantined) == {"a/sub": "unreadable folder: Permission denied (its files are not counted)"}
    assert sorted(rel for rel, _ in found.candidates) == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg"]


def test_unreadable_class_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    """Before: its class came out empty and the error blamed too few valid images."""
    src = tmp_path / "src"
    _photos(src / "a", 2)
    _photos(src / "b", 2)
    _unreadable(monkeypatch, src / "b")
    with pytest.raises(UsageError, match=f"class folder {src / 'b'} cannot be read: Permission denied"):
        scan(src)


def test_unreadable_source_is_one_line(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _photos(src / "a", 2)
    _unreadable(monkeypatch, src)
    with pytest.raises(UsageError, match=f"--src {src} cannot be read: Permission denied"):
        scan(src)
