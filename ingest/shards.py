"""A split's webdataset tar shards and the DALI index of each (the layout is in ingest/layout.py): written
here by the ingest, and read back by ShardIndex for the loaders that read the shards.

DALI's reader shuffles only within a buffer, so train samples are shuffled here, once, from the seed.
Tar headers carry a fixed mtime and owner so the same input gives byte-identical shards. A tar and its index
are written separately, so a repair rewrites only the one that is damaged.
"""
import csv
import mmap
import os
import struct
import tarfile

import numpy as np

from cli import UsageError
from files import atomic_path
from ingest import cache, layout


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
                tar.write({"__key__": f"{i:08d}", "jpg": cache.payload(s), "cls": str(s.label).encode("ascii"),
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


def csv_columns(data_dir, split, *names):
    """Integer columns of `<split>.csv`, one row per sample id: an int64 array of rows x len(names)."""
    with open(layout.csv_path(data_dir, split), newline="") as f:
        return np.array([[int(row[name]) for name in names] for row in csv.DictReader(f)],
                        dtype=np.int64).reshape(-1, len(names))


class ShardIndex:
    """A split's samples in shard order, as numpy arrays: where each JPEG lies (shard, byte offset, size, from
    the DALI index files), its sample id, and its label and stored size (from `<split>.csv`, whose row number
    is the sample id). The bytes are read on demand (`read`, `views`), so memory does not grow with the
    dataset and forked DataLoader workers share nothing but these arrays. Trusts what the loaders' start-up
    check (layout.check_split) has checked: the index files against the manifest and the tars."""

    def __init__(self, data_dir, split):
        tars, indexes = layout.shard_paths(data_dir, split)
        shard, offset, size, ids = [], [], [], []
        for t, index in enumerate(indexes):
            for line in index.read_text().splitlines()[1:]:  # after the header line: version and sample count
                fields = line.split()  # (extension, offset, size, member name) per file of the sample
                jpg = fields.index("jpg")
                shard.append(t)
                offset.append(int(fields[jpg + 1]))
                size.append(int(fields[jpg + 2]))
                ids.append(int(fields[jpg + 3].partition(".")[0]))
        rows = csv_columns(data_dir, split, "label", "height", "width")
        self.ids = np.array(ids, dtype=np.int64)
        if len(rows) != len(ids) or (len(ids) and self.ids.max() >= len(rows)):
            raise UsageError(f"{data_dir}: the {split} shards index {len(ids)} images but {split}.csv lists "
                             f"{len(rows)}: ingest again with python ingest/build.py")
        self.labels, self.heights, self.widths = rows[self.ids].T
        self.shard, self.offset, self.size = np.array(shard), np.array(offset), np.array(size)
        self.data_dir, self.split, self.tars = data_dir, split, [str(t) for t in tars]
        self._fds, self._maps = {}, None

    def __len__(self):
        return len(self.ids)

    def __getstate__(self):  # file descriptors and maps do not survive pickling (spawned workers reopen them)
        return {**self.__dict__, "_fds": {}, "_maps": None}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def tar(self, position):
        """The shard that holds the sample at `position`."""
        return self.tars[self.shard[position]]

    def read(self, position):
        """The stored JPEG bytes of the sample at `position`, read into a new buffer (one pread); OSError when
        the shard is shorter than its index says (changed after the start-up check)."""
        t, offset, size = int(self.shard[position]), int(self.offset[position]), int(self.size[position])
        if t not in self._fds:
            self._fds[t] = os.open(self.tars[t], os.O_RDONLY)
        data = bytearray(size)
        if os.preadv(self._fds[t], [data], offset) != size:
            raise OSError(f"{self.tars[t]} ends inside sample {self.ids[position]}")
        return data

    def views(self, positions):
        """The stored JPEG bytes of these samples, as uint8 views of the memory-mapped shards (no copy)."""
        if self._maps is None:
            self._maps = []
            for tar in self.tars:
                with open(tar, "rb") as f:
                    self._maps.append(np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                                    dtype=np.uint8))
        return [self._maps[t][o:o + s] for t, o, s in
                zip(self.shard[positions].tolist(), self.offset[positions].tolist(), self.size[positions].tolist())]
