"""Write a split's webdataset tar shards and the DALI index of each (the layout is in ingest/layout.py).

DALI's reader shuffles only within a buffer, so train samples are shuffled here, once, from the seed.
Tar headers carry a fixed mtime and owner so the same input gives byte-identical shards.
"""
import struct

import numpy as np

from ingest import layout
from ingest.atomic import atomic_path


def shard_order(n, split, seed):
    """Sample ids in the order they go to tar: shuffled for train, id order for test."""
    return np.random.default_rng(seed).permutation(n) if split == "train" else np.arange(n)


def write_shards(out, split, samples, seed, shard_size):
    """samples (Checked, in id order) -> [{"tar": name, "count": n}] of the shards written to `out`."""
    from webdataset import TarWriter
    from wds2idx import IndexCreator  # DALI's own indexer, installed with nvidia-dali

    order = shard_order(len(samples), split, seed)
    shards = []
    for index, start in enumerate(range(0, len(order), shard_size)):
        name = layout.shard_name(split, index)
        ids = order[start:start + shard_size]
        with atomic_path(out / name) as tmp_tar, atomic_path(out / layout.index_name(name)) as tmp_idx:
            with TarWriter(str(tmp_tar), encoder=False, mtime=0, user="fastpix", group="fastpix") as tar:
                for i in ids:
                    s = samples[i]
                    with open(s.cached, "rb") as f:
                        jpeg = f.read()
                    tar.write({"__key__": f"{i:08d}", "jpg": jpeg, "cls": str(s.label).encode("ascii"),
                               "lbl": struct.pack("<q", s.label)})
            with IndexCreator(str(tmp_tar), str(tmp_idx), verbose=False) as indexer:
                indexer.create_index()
        shards.append({"tar": name, "count": len(ids)})
    return shards
