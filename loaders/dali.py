"""NVIDIA DALI backend: decode and augment the webdataset shards with DALI, on the GPU when there is one.

On a GPU the JPEGs are decoded by nvJPEG (`device="mixed"`, hardware decoder where present) and resize,
flip and normalise run on the GPU; without one the same graph runs on DALI's CPU operators
(`device_id=None`). Train decoding is fused with the random crop (`image_random_crop` decodes only the
region it keeps), and the flip is the `mirror` argument of `crop_mirror_normalize`, so one kernel does
flip + normalise + layout.

Epoch order: DALI's reader shuffles within a buffer (`initial_fill`) from the pipeline seed and carries its
state from epoch to epoch, so an order would depend on history. We build a fresh pipeline for every train
epoch, seeded from (seed, epoch): epoch e is the same whatever came before it (a resume gives the same order).
Train shards were shuffled at write time, so the buffer only needs to mix within its reach.
"""
import os

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from cli import UsageError
from ingest import layout
from loaders.common import (IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE, epoch_seed, rank_ids,
                            resolve_device, test_resize)

READER = "reader"  # the name DALIGenericIterator uses to read the shard size and padding from the reader


def build(data_dir, split, *, batch_size, res, device, seed, rank, world, workers, shuffle_buffer=4096,
          with_ids=False):
    """A DALI loader over `<split>-*.tar`; `shuffle_buffer` is DALI's initial_fill (train only)."""
    manifest = layout.read_manifest(data_dir)
    tars, indexes = layout.shard_paths(data_dir, split)
    missing = [p for p in tars + indexes if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]} is missing: run python ingest/build.py again")
    num_samples = len(rank_ids(manifest["splits"][split]["count"], rank, world))
    if num_samples == 0:
        raise UsageError(f"rank {rank} of {world} gets no {split} samples: use fewer ranks")
    return DaliLoader([str(p) for p in tars], [str(p) for p in indexes], train=split == "train",
                      batch_size=batch_size, res=res, device=resolve_device(device), seed=seed, rank=rank,
                      world=world, threads=workers or os.cpu_count(), shuffle_buffer=shuffle_buffer,
                      with_ids=with_ids, num_samples=num_samples)


def _sample_ids(source_info):
    """Sample ids from the padded `source_info` strings ("<tar>:<offset>:<%08d id>.jpg"); debug only."""
    return torch.tensor([int(bytes(row).rstrip(b"\0").rsplit(b":", 1)[1].split(b".")[0])
                         for row in source_info.cpu().numpy()], dtype=torch.int64)


class DaliLoader:
    """Iterates (images, labels) batches, or (images, labels, ids) with with_ids; see loaders.common."""

    def __init__(self, tars, indexes, *, train, batch_size, res, device, seed, rank, world, threads,
                 shuffle_buffer, with_ids, num_samples):
        self.tars, self.indexes, self.train = tars, indexes, train
        self.batch_size, self.res, self.device, self.seed = batch_size, res, device, seed
        self.rank, self.world, self.threads = rank, world, threads
        self.shuffle_buffer, self.with_ids = shuffle_buffer, with_ids
        self.num_samples = num_samples
        self.epoch = 0
        self._test_batches, self._finished = None, False

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _pipeline(self, seed):
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None

        # Prefetching two batches overlaps DALI with the consumer on a GPU; on the CPU they share the cores, and
        # what a train pipeline runs ahead at the end of its epoch is thrown away with it: one batch ahead was
        # 1.2x the train images/s of two on the demo data (measured side by side).
        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id, seed=seed,
                      prefetch_queue_depth=2 if on_gpu else 1)
        def graph():
            jpegs, labels = fn.readers.webdataset(
                paths=self.tars, index_paths=self.indexes, ext=["jpg", "lbl"],
                dtypes=[types.UINT8, types.INT64], name=READER, shard_id=self.rank, num_shards=self.world,
                random_shuffle=self.train, initial_fill=self.shuffle_buffer,
                pad_last_batch=True)  # never mixes the next epoch into this one; the iterator trims the pad
            decoder = "mixed" if on_gpu else "cpu"
            if self.train:
                images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                       random_area=RRC_SCALE, random_aspect_ratio=RRC_RATIO)
                images = fn.resize(images, resize_x=self.res, resize_y=self.res)
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=test_resize(self.res))
                mirror = 0
            # HWC: permuting it to NCHW in torch is a free view that is already channels_last.
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                              crop=(self.res, self.res), mean=list(IMAGENET_MEAN),
                                              std=list(IMAGENET_STD), mirror=mirror)
            outputs = [images, labels.gpu() if on_gpu else labels]
            if self.with_ids:
                outputs.append(fn.pad(fn.get_property(jpegs, key="source_info")))
            return tuple(outputs)

        return graph()

    def _batches(self):
        pipe = self._pipeline(epoch_seed(self.seed, self.epoch))
        pipe.build()
        names = ["images", "labels"] + (["ids"] if self.with_ids else [])
        return DALIGenericIterator(pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL)

    def __iter__(self):
        # Train: a fresh pipeline per epoch (build ~20 ms), so the order follows (seed, epoch) alone; the
        # price is the batches the old one decoded ahead (prefetch_queue_depth) and the wait for them
        # when it is freed. Test order never changes: a finished pass's pipeline is reset, and its run-ahead
        # is the next pass's start. A pass left early (a break) is never resumed mid-epoch.
        if self.train or not self._finished:
            self._test_batches = None  # let the previous pipeline's threads go before new ones start
            batches = self._batches()
        else:
            batches = self._test_batches
            batches.reset()
        self._test_batches, self._finished = (None if self.train else batches), False
        for (batch,) in batches:
            if len(batch["labels"]) == 0:
                # The reader pads every shard to the batch count of the largest one; PARTIAL trims a
                # rank's all-padding batch to nothing.
                continue
            images = batch["images"].permute(0, 3, 1, 2)
            labels = batch["labels"].view(-1)
            yield (images, labels, _sample_ids(batch["ids"])) if self.with_ids else (images, labels)
        self._finished = True
