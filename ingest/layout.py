"""Where ingested data lives and what it looks like: the contract between `ingest/` and `loaders/`.

An ingested folder (default `data/ingested`) holds, for each split in SPLITS:
- `<split>.beton`: FFCV file with fields `image` (RGB JPEG) and `label` (int); record i is sample id i.
- `<split>-NNNNN.tar` + `<split>-NNNNN.idx`: webdataset shards with DALI index files. Each sample has
  key `%08d` % id, `<key>.jpg` (the same JPEG bytes as the beton), `<key>.cls` (ASCII label, the
  webdataset convention) and `<key>.lbl` (label as 8-byte little-endian int64, so DALI yields dense
  int64 labels with `dtypes=[UINT8, INT64]`). Train shards are shuffled at write time (DALI shuffles
  only within a buffer); test shards are in id order.
- `<split>.csv`: one row per sample in id order: path (relative to the source), label, sha256, width,
  height (of the stored image).
- `quarantine.csv` (path, reason) and `manifest.json` (written last: its presence means complete):
  `classes` (sorted names; label = index), `store_size`, `quality`, `seed`, `test_share`, `source`
  (absolute path of the source folder), `fingerprint`, `versions`, `found`/`written`/`quarantined`/
  `ignored` counts, and `splits.<split>` = {`count`, `per_class` {name: n}, `shards` [{`tar`, `count`}]};
  also `shard_size`, `min_side`, `max_pixels` and `pipeline` (what else decided the bytes).
- The stored JPEGs are baseline (nvJPEG's hardware decoder takes no other), RGB, upright (no EXIF), with
  the shorter side = `store_size` unless the photo was smaller (never upscaled).
- Hidden entries (`.cache/`, `.lock`, temp files) belong to ingest; other tools may add files of their own.

The sample id is the row number in `<split>.csv`, so every backend can be checked against the others.
"""
import json
from pathlib import Path

from cli import UsageError

SPLITS = ("train", "test")
DEFAULT_SRC = Path("data/demo-500px")
DEFAULT_OUT = Path("data/ingested")
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"


def beton_path(data_dir, split):
    return Path(data_dir) / f"{split}.beton"


def csv_path(data_dir, split):
    return Path(data_dir) / f"{split}.csv"


def shard_name(split, index):
    return f"{split}-{index:05d}.tar"


def index_name(tar_name):
    return tar_name[: -len(".tar")] + ".idx"


def read_manifest(data_dir):
    """The manifest of an ingested folder, or a UsageError that says how to make one."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{data_dir} is not an ingested dataset (no {MANIFEST}): run python ingest/build.py first")
    return json.loads(path.read_text())


def shard_paths(data_dir, split):
    """(tar paths, index paths) of a split, in manifest order."""
    shards = read_manifest(data_dir)["splits"][split]["shards"]
    tars = [Path(data_dir) / s["tar"] for s in shards]
    return tars, [t.with_suffix(".idx") for t in tars]
