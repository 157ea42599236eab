"""Write a split's webdataset tar shards and the DALI index of each (the layout is in ingest/layout.py).

DALI's reader shuffles only within a buffer, so train samples are shuffled here, once, from the seed.
Tar headers carry a fixed mtime and owner so the same input gives byte-identical shards. A tar and its index
are written separately, so a repair rewrites only the one that is damaged.
"""
import struct
import tarfile

import numpy as np

from ingest import layout
from ingest.atomic import atomic_path


def shard_order(n, split, seed):
    """Sample ids in the order they go to tar: shuffled for train, id order for test."""
    return np.random.default_rng(seed).permutation(n) if split == "train" else np.arange(n)


def plan_shards(split, n, seed, shard_size):
    """[(tar name, sample ids in tar order)] of a split of n samples."""
    order = shard_order(n, split, seed)
    return [(layout.shard_name(split, index), order[start:start + shard_size])
            for index, start in enumerate(range(0, n, shard_size))]


def write_tar(path, samples, ids):
    """The samples `ids` (Checked, indexed by id) as one webdataset tar at `path`, written atomically."""
    from webdataset import TarWriter

    with atomic_path(path) as tmp:
        with TarWriter(str(tmp), encoder=False, mtime=0, user="fastpix", group="fastpix") as tar:
            for i in ids:
                s = samples[i]
                with open(s.cached, "rb") as f:
                    jpeg = f.read()
                tar.write({"__key__": f"{i:08d}", "jpg": jpeg, "cls": str(s.label).encode("ascii"),
                           "lbl": struct.pack("<q", s.label)})


def index_lines(tar_path):
    """DALI's webdataset index (format v1.2, as its wds2idx writes it) of a tar, as text lines: one line
    per sample, `ext offset size name` per component. Read with the standard library in this process:
    wds2idx comes with DALI, which the machine that ingests may not have, and runs GNU tar twice per shard.
    Raises tarfile.TarError or OSError for a damaged tar."""
    samples = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if m.isreg():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return [f"v1.2 {len(samples)}"] + [" ".join(parts) for parts in samples.values()]


def write_index(tar_path, idx_path):
    with atomic_path(idx_path) as tmp:
        tmp.write_text("\n".join(index_lines(tar_path)) + "\n")
