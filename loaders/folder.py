"""`folder` backend: the baseline every figure is measured against, i.e. what a user writes without fastpix.

ImageFolder-style: the split's ORIGINAL source files (manifest `source` + the paths of `<split>.csv`), opened
with PIL (EXIF orientation applied, converted to RGB), the classic torchvision transforms on PIL images
(ToTensor + Normalize per image, in the workers) and a DataLoader with workers and pinned memory on a GPU.
It deliberately ignores the ingested shards, so its cost is the one ingesting removes.

Ranks get a contiguous block of sample ids (loaders.common.rank_ids) instead of a DistributedSampler,
which would pad ranks by repeating samples.
"""
import csv
import functools
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from cli import UsageError
from ingest.layout import csv_path
from loaders.base import Loader
from loaders.common import (IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE, EpochSampler, PerRes,
                            SampleError, WorkerLoader, drawing_from, sample_seed, test_resize)


READS = ()  # the csv only: the baseline reads the photos themselves


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False):
    """A PIL + DataLoader loader over this rank's block of the split's source files."""
    source = Path(block.manifest["source"])
    with open(csv_path(block.data_dir, block.split), newline="") as f:
        rows = [(source / row["path"], int(row["label"])) for row in csv.DictReader(f)]
    missing = next((path for path, _ in rows if not path.is_file()), None)
    if missing is not None:
        raise UsageError(f"source file {missing} of {block.data_dir} is gone: the folder baseline reads the "
                         "original photos, so restore them or ingest again")
    transform = PerRes(functools.partial(source_transform, augment), res)
    return FolderLoader(block, SourceFiles(rows, transform, block.split), batch_size=batch_size, seed=seed,
                        workers=workers, with_ids=with_ids)


def source_transform(augment, res):
    """The usual ImageNet recipe on PIL images, ending in a normalised float tensor; `augment` as in
    loaders.common."""
    scale = (T.ToTensor(), T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]))
    if augment == "rrc":
        return T.Compose([T.RandomResizedCrop(res, scale=RRC_SCALE, ratio=RRC_RATIO), T.RandomHorizontalFlip(),
                          *scale])
    flip = [T.RandomHorizontalFlip()] if augment == "flip" else []
    return T.Compose([T.Resize(test_resize(res)), T.CenterCrop(res), *flip, *scale])


def open_rgb(path):
    """A photo as the user sees it: EXIF rotation applied, RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


class SourceFiles(Dataset):
    """(path, label) rows -> (transformed image, label, sample id)."""

    def __init__(self, rows, transform, split):
        self.rows, self.transform, self.split = rows, transform, split

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        """item: a sample id, or (sample id, epoch key) from a train EpochSampler."""
        i, key = item if isinstance(item, tuple) else (item, None)
        path, label = self.rows[i]
        try:
            image = open_rgb(path)
        except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for unreadable or broken photos
            raise SampleError(f"{self.split} sample {i}: photo {path} cannot be read ({err}): restore it, or "
                              "rerun the ingest (it quarantines unreadable photos)") from None
        if key is None:
            return self.transform(image), label, i
        with drawing_from(sample_seed(key, i)):  # the same draws in any worker, after a resume too
            return self.transform(image), label, i


class FolderLoader(Loader):
    """A DataLoader over SourceFiles, the classic torchvision recipe in its workers."""

    def __init__(self, block, files, *, batch_size, seed, workers, with_ids):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        self.files = files
        self.sampler = EpochSampler(block.positions, seed, shuffle=self.train, keyed=True)
        self.loader = WorkerLoader(files, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(seed))  # leaves the caller's RNG alone

    def set_res(self, res):
        self.files.transform.set_res(res)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)  # the DataLoader draws this pass's order from it
        for images, labels, ids in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield self.batch(images, labels.to(self.device, non_blocking=True), ids)
