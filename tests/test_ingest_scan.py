"""Every file under --src is accounted for, also behind a symlinked or unreadable folder (issue 10, item 6).

These tests run as root here, and root reads a folder whatever its permission bits say: unreadability is
therefore simulated in-process, by making os.scandir (which os.walk uses) raise the PermissionError a normal
user gets for that one folder."""
import io
import os

import pytest
from PIL import Image

from cli import UsageError
from ingest.scan import scan


def _photos(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (80, 80), (i * 40, 0, 0)).save(buf, "JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())


def _unreadable(monkeypatch, *folders):
    real = os.scandir
    denied = {os.fspath(f) for f in folders}

    def scandir(path="."):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_symlinked_class_folders_are_quarantined_with_where_they_point(tmp_path):
    """Before: both links were dropped from the classes without a word (counted as ignored)."""
    src = tmp_path / "src"
    _photos(src / "a", 3)
    _photos(src / "b", 3)
    _photos(tmp_path / "elsewhere" / "c", 2)
    (src / "c").symlink_to(tmp_path / "elsewhere" / "c")
    (src / "d").symlink_to(src / "a")
    found = scan(src)
    assert found.classes == ["a", "b"]
    reasons = dict(found.quarantined)
    assert reasons["c"] == f"symlink leaves the source: points to {tmp_path / 'elsewhere' / 'c'}"
    assert reasons["d"] == "symlinked folder, not followed: points to a"
    assert (found.found, len(found.candidates), found.ignored) == (8, 6, [])


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
