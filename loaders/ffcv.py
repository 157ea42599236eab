"""FFCV backend: crop-decode the `.beton` in numba-compiled, multithreaded code, then hand torch a batch.

The decoders crop before they resize (train: RandomResizedCrop; test: a center crop of 0.875 of the
shorter side resized to res, the same picture as resize-then-crop). The first epoch of each Loader spends
seconds compiling with numba; benches absorb it in a warm-up epoch. The file stays in the page cache
(`os_cache=True`), which suits datasets that fit in RAM and several loaders reading one file.

Ranks get a contiguous block of sample ids through `indices=` (loaders.common.rank_ids) instead of FFCV's
`distributed=True`, which pads ranks to equal length by repeating samples. Train order is FFCV's RANDOM,
seeded per epoch from loaders.common.epoch_seed(seed, epoch); test order is SEQUENTIAL. FFCV hands over
uint8 batches and loaders.common.Normalizer normalises them, like every backend: on the CPU it was 1.6x the
train images/s of FFCV's NormalizeImage in the loader's threads (measured side by side), and on a GPU
FFCV's NormalizeImage needs cupy, which we do not ship.
"""
import contextlib
import os

import numpy as np
import torch


@contextlib.contextmanager
def keep_torch_threads():
    """FFCV sets torch's thread count to its own (1 on import, its workers later), process-wide: the model's
    CPU work keeps the count it had."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


with keep_torch_threads():
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.pipeline_spec import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from cli import UsageError
from ingest import layout
from loaders.common import (RRC_RATIO, RRC_SCALE, TEST_CROP_RATIO, Normalizer, epoch_seed, rank_ids,
                            resolve_device)


def build(data_dir, split, *, batch_size, res, device, seed, rank, world, workers, with_ids=False):
    """An FFCV loader over `<split>.beton` for this rank's block of samples."""
    manifest = layout.read_manifest(data_dir)
    beton = layout.beton_path(data_dir, split)
    if not beton.is_file():
        raise UsageError(f"{beton} is missing: run python ingest/build.py again")
    ids = np.array(rank_ids(manifest["splits"][split]["count"], rank, world))
    if len(ids) == 0:
        raise UsageError(f"rank {rank} of {world} gets no {split} samples: use fewer ranks")
    return FfcvLoader(str(beton), ids, train=split == "train", batch_size=batch_size, res=res,
                      device=resolve_device(device), seed=seed, workers=workers or os.cpu_count(),
                      with_ids=with_ids)


class SampleIdDecoder(IntDecoder):
    """Decodes the id of each sample instead of a field value: the with_ids check of what came out."""

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix, sample_id in enumerate(indices):
                destination[ix] = sample_id
            return destination[:len(indices)]

        return decoder


class FfcvLoader:
    """Iterates (images, labels) batches, or (images, labels, ids) with with_ids; see loaders.common."""

    def __init__(self, beton, ids, *, train, batch_size, res, device, seed, workers, with_ids):
        if device.type == "cuda" and device.index is None:  # FFCV allocates its buffers on this exact device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.with_ids, self.batch_size, self.seed = device, with_ids, batch_size, seed
        self.num_samples = len(ids)
        self.epoch = 0
        self.normalize = Normalizer(device)
        to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        # set_res changes its output_size: FFCV sizes its buffers from it at every epoch (ffcv-imagenet's
        # progressive resizing does the same), and the compiled decode code does not depend on it.
        self.decoder = decoder = (
            RandomResizedCropRGBImageDecoder((res, res), scale=RRC_SCALE, ratio=RRC_RATIO) if train
            else CenterCropRGBImageDecoder((res, res), ratio=TEST_CROP_RATIO))
        pipelines = {
            "image": [decoder] + ([RandomHorizontalFlip()] if train else []) + [ToTensor()] + to_device
                     + [ToTorchImage(channels_last=True)],
            "label": [IntDecoder(), ToTensor(), Squeeze(1)] + to_device,  # Squeeze() makes a batch of 1 0-d
        }
        if with_ids:
            pipelines["id"] = PipelineSpec("label", decoder=SampleIdDecoder(), transforms=[ToTensor(), Squeeze(1)])
        with keep_torch_threads():
            self.loader = Loader(beton, batch_size=batch_size, num_workers=workers, os_cache=True,
                                 order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=seed,
                                 indices=ids, pipelines=pipelines, drop_last=False)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_res(self, res):
        self.decoder.output_size = (res, res)

    def __iter__(self):
        # FFCV draws a RANDOM order from seed + epoch, so seed 1's epoch 0 would be seed 0's epoch 1 and runs
        # with consecutive seeds would share orders: each epoch gets its own hashed seed instead.
        self.loader.traversal_order.seed = epoch_seed(self.seed, self.epoch)
        self.loader.next_epoch = 0
        with keep_torch_threads():
            batches = iter(self.loader)
        for images, labels, *ids in batches:
            # FFCV reuses its output buffers batches_ahead (3) batches later: the Normalizer copies the images
            # out; labels are often kept for metrics and cost nothing to copy.
            batch = (self.normalize(images), labels.clone())
            yield batch + (ids[0].clone(),) if self.with_ids else batch
