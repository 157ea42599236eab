"""The per-photo ingest cache is derived data, checked before use (issue 19, items 1 and 5): a damaged or
foreign entry is made again from its source, never written into the shards; and ingest deletes only the
cache's own entries, never other tools' files under `.cache`."""
import shutil

import pytest

from ingest import layout
from ingest.build import build
from test_ingest_rebuild import SILENT, outputs, tiny_cfg


def copy(ingested, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(ingested, out)
    return out


def cached_images(out):
    """The cache files that hold a stored image (not a quarantine reason), largest first."""
    found = [p for p in (out / ".cache").glob("*/*") if p.is_file() and p.suffix != ".bad"
             and b"rejected" not in p.read_bytes()[:200]]
    return sorted(found, key=lambda p: -p.stat().st_size)


def flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def zero_fill(path):  # what an unflushed file can hold after a power cut
    path.write_bytes(bytes(path.stat().st_size))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def foreign(path):  # another photo's entry under this one's name
    other = next(p for p in cached_images(path.parent.parent.parent) if p != path)
    path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("damage", [flip, *(pytest.param(d, marks=pytest.mark.slow)
                                             for d in (zero_fill, truncate, foreign))])
def test_a_damaged_cache_entry_is_made_again_from_its_source(tiny_src, ingested, tmp_path, damage):
    """Before: flipped or foreign bytes went into the shards with a fresh, matching sha256; a zero-filled
    entry was an UnidentifiedImageError traceback on every rerun."""
    out = copy(ingested, tmp_path)
    for path in cached_images(out)[:3]:
        damage(path)
    (out / layout.MANIFEST).unlink()  # a rebuild from the cache (as after a changed source)
    build(tiny_cfg(tiny_src, out), **SILENT)
    assert outputs(out) == outputs(ingested)
    build(tiny_cfg(tiny_src, out), **SILENT)  # and the entries were rewritten whole
    assert all(p.read_bytes() == (ingested / p.relative_to(out)).read_bytes() for p in cached_images(out))


THEIRS = {".cache/pip/selfcheck.json": b"pip's", ".cache/thumbnails/large/a.png": b"a thumbnail",
          ".cache/ab/photo.jpg": b"someone's photo", ".cache/ab/" + "c" * 64 + ".txt": b"notes",
          ".cache/ab/.notes.tmp.txt": b"a name containing .tmp", "backup.tmp": b"mine", ".cache/x.tmp9": b"mine"}


@pytest.mark.slow
@pytest.mark.parametrize("force", [True, False])
def test_force_and_reruns_delete_only_the_caches_own_entries(tiny_src, ingested, tmp_path, force):
    """Before: --force deleted .cache/pip/selfcheck.json, then an IsADirectoryError traceback on the
    thumbnails folder; a plain rebuild deleted every .cache/*/*.jpg and any name containing .tmp."""
    out = copy(ingested, tmp_path)
    for name, data in THEIRS.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    stale = out / ".cache" / "cd" / ("cd" + "0" * 62 + ".entry")  # an entry of a photo no longer in --src
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"fastpix-cache-1 {}\n")
    temp = stale.with_name(f".{stale.name}.tmp4242")  # what a killed write of an entry leaves
    temp.write_bytes(b"partial")
    (out / layout.MANIFEST).unlink()  # a plain rerun that rebuilds
    build(tiny_cfg(tiny_src, out, force=force), **SILENT)
    assert {name: (out / name).read_bytes() for name in THEIRS} == THEIRS
    assert not stale.exists() and not temp.exists()
    assert outputs(out) == outputs(ingested)
