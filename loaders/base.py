"""The start and the surface every backend shares, written once: `prepare` turns (data_dir, split, rank,
world, device) into this rank's `Block` of a checked split, and `Loader` is the base class of every backend's
loader (the epoch, the length, what training needs to know of the data, the batch tuple). What a batch holds
is the contract in loaders.common's docstring.
"""
from dataclasses import dataclass

import torch

from cli import UsageError
from ingest.layout import check_split, read_manifest
from ingest.remote import local_folder
from loaders.common import manifest_digest, rank_ids, resolve_device


@dataclass(frozen=True)
class Block:
    """This rank's block of a split whose files passed the start-up check: what a backend builds from."""
    data_dir: object  # as the caller gave it (str or Path), for messages; a URL's cache folder
    split: str
    manifest: dict
    rank: int
    world: int
    device: torch.device
    manifest_sha256: str = None  # of the manifest read (loaders.common.manifest_digest): was the data replaced?

    @property
    def train(self):
        return self.split == "train"

    @property
    def positions(self):
        """Sample positions: in shard order for the shard readers, sample ids for the csv and the beton."""
        return rank_ids(self.manifest["splits"][self.split]["count"], self.rank, self.world)


def prepare(data_dir, split, *, rank, world, device, reads, cache_dir=None):
    """The manifest, the start-up check of the files of the formats in `reads` (ingest.layout.check_split),
    this rank's contiguous block (loaders.common.rank_ids) and the device: one line of UsageError for
    whatever is wrong, before a backend opens anything. A URL is first fetched into the node-local cache
    (ingest.remote): the backends read a local folder."""
    data_dir = local_folder(data_dir, cache_dir)
    started_with = manifest_digest(data_dir)
    manifest = read_manifest(data_dir)
    check_split(data_dir, split, manifest, reads=reads)
    block = Block(data_dir, split, manifest, rank, world, resolve_device(device), started_with)
    if not block.positions:
        raise UsageError(f"rank {rank} of {world} gets no {split} samples: use fewer ranks")
    return block


class Loader:
    """Iterates (images, labels) batches, or (images, labels, ids) with with_ids; see loaders.common.

    A backend's subclass gives `__iter__` (and `set_res`); each pass draws its order from (seed, epoch)."""

    def __init__(self, block, *, batch_size, seed, with_ids):
        self.block, self.batch_size, self.seed, self.with_ids = block, batch_size, seed, with_ids
        self.device, self.train, self.num_samples, self.epoch = block.device, block.train, len(block.positions), 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    @property
    def classes(self):
        """Class names; label i is classes[i]."""
        return self.block.manifest["classes"]

    @property
    def fewest_samples(self):
        """The samples of the smallest rank block of this split: count // world (loaders.common.rank_ids)."""
        return self.block.manifest["splits"][self.block.split]["count"] // self.block.world

    @property
    def steps_per_epoch(self):
        """Full batches that every rank has, so that under DDP all ranks step together and no step sees a
        partial batch (training drops the rest: the next epoch's shuffle drops others)."""
        return self.fewest_samples // self.batch_size

    def batch(self, images, labels, ids):
        """The tuple a pass yields: ids (int64 sample ids on the CPU) only with with_ids."""
        return (images, labels, ids) if self.with_ids else (images, labels)
