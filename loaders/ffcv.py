"""FFCV backend: crop-decode the `.beton` in numba-compiled, multithreaded code, then hand torch a batch.

The decoders crop before they resize (train with augment rrc: RandomResizedCrop; test, and train with flip or
none: a center crop of 0.875 of the shorter side resized to res, the same picture as resize-then-crop). The
first epoch of each Loader spends seconds compiling with numba; benches absorb it in a warm-up epoch. The file
stays in the page cache (`os_cache=True`), which suits datasets that fit in RAM and several loaders reading
one file.

Ranks get a contiguous block of sample ids through `indices=` (loaders.common.rank_ids) instead of FFCV's
`distributed=True`, which pads ranks to equal length by repeating samples. Train order is FFCV's RANDOM,
seeded per epoch from loaders.common.epoch_seed(seed, epoch); test order is SEQUENTIAL. FFCV hands over
uint8 batches and loaders.common.Normalizer normalises them, like every backend: on the CPU it was 1.6x the
train images/s of FFCV's NormalizeImage in the loader's threads (measured side by side), and on a GPU
FFCV's NormalizeImage needs cupy, which we do not ship.
"""
import contextlib

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
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder, get_center_crop, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.pipeline_spec import PipelineSpec
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    from numba import carray, types
    from numba.core import cgutils
    from numba.extending import intrinsic

from ingest import layout
from loaders import base
from loaders.common import RRC_RATIO, RRC_SCALE, TEST_CROP_RATIO, Normalizer, epoch_seed, sample_seed, undecodable


READS = ("ffcv",)  # the formats loaders.base.prepare checks at start-up


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False):
    """An FFCV loader over `<split>.beton` for this rank's block of samples."""
    return FfcvLoader(block, augment=augment, batch_size=batch_size, res=res, seed=seed, workers=max(workers, 1),
                      with_ids=with_ids)


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a void pointer, so compiled code can read and write an array we keep."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


class CheckedCropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's crop-decode (RandomResizedCrop + flip, or the center crop with or without flip: `augment` as in
    loaders.common) with two changes.

    Draws (crop box, flip) come from loaders.common.sample_seed per sample. FFCV's own decoder and flip
    draw from numba's per-thread generators, which nothing seeds and whose threads share a batch out by
    chance: no two runs, and no resume, got the same crops. And a JPEG that libjpeg-turbo reports as
    corrupt is recorded, where FFCV ignores the return code and hands the noise on. Both pass through
    `shared` (int64 [epoch key, failed sample id + 1]), which the compiled code reaches by its address:
    numba freezes the arrays a function captures into constants."""

    def __init__(self, res, augment):
        super().__init__((res, res))
        self.random_crop, self.flip = augment == "rrc", augment != "none"
        self.scale, self.ratio = (np.array(RRC_SCALE), np.array(RRC_RATIO)) if self.random_crop else \
            (None, TEST_CROP_RATIO)
        self.shared = np.zeros(2, np.int64)

    @property
    def get_crop_generator(self):
        return get_random_crop if self.random_crop else get_center_crop

    def generate_code(self):
        mem_read, flip, scale, ratio, address = self.memory_read, self.flip, self.scale, self.ratio, \
            self.shared.ctypes.data
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, seed_of = Compiler.compile(self.get_crop_generator), Compiler.compile(sample_seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            shared = carray(_pointer(address), 2, np.int64)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = np.int64(batch_indices[dst_ix])
                field = metadata[source_ix]  # the beton's images are all JPEG (ingest/layout.py)
                height, width = np.uint32(field['height']), np.uint32(field['width'])
                image = temp_storage[dst_ix]
                if imdecode_c(mem_read(field['data_ptr'], storage_state), image,
                              height, width, height, width, 0, 0, 1, 1, False, False) != 0:
                    shared[1] = source_ix + 1
                image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                if flip:  # every augment that draws also flips
                    np.random.seed(seed_of(shared[0], source_ix))  # this thread's generator, this sample
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                if flip and np.random.random() < 0.5:
                    destination[dst_ix] = destination[dst_ix][:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SampleIdDecoder(IntDecoder):
    """Decodes the id of each sample instead of a field value: the with_ids check of what came out."""

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix, sample_id in enumerate(indices):
                destination[ix] = sample_id
            return destination[:len(indices)]

        return decoder


class FfcvLoader(base.Loader):
    """FFCV's Loader over this rank's ids of the beton, decoding with CheckedCropDecoder."""

    def __init__(self, block, *, augment, batch_size, res, seed, workers, with_ids):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        if self.device.type == "cuda" and self.device.index is None:  # FFCV allocates its buffers on this device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.beton = str(layout.beton_path(block.data_dir, block.split))
        self.normalize = Normalizer(self.device)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        # set_res changes its output_size: FFCV sizes its buffers from it at every epoch (ffcv-imagenet's
        # progressive resizing does the same), and the compiled decode code does not depend on it.
        self.decoder = decoder = CheckedCropDecoder(res, augment)
        self.shared = decoder.shared
        pipelines = {
            "image": [decoder, ToTensor()] + to_device + [ToTorchImage(channels_last=True)],
            "label": [IntDecoder(), ToTensor(), Squeeze(1)] + to_device,  # Squeeze() makes a batch of 1 0-d
        }
        if with_ids:
            pipelines["id"] = PipelineSpec("label", decoder=SampleIdDecoder(), transforms=[ToTensor(), Squeeze(1)])
        with keep_torch_threads():
            self.loader = Loader(self.beton, batch_size=batch_size, num_workers=workers, os_cache=True,
                                 order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL, seed=seed,
                                 indices=np.array(block.positions), pipelines=pipelines, drop_last=False)

    def set_res(self, res):
        self.decoder.output_size = (res, res)

    def __iter__(self):
        # FFCV draws a RANDOM order from seed + epoch, so seed 1's epoch 0 would be seed 0's epoch 1 and runs
        # with consecutive seeds would share orders: each epoch gets its own hashed seed instead.
        self.loader.traversal_order.seed = self.shared[0] = epoch_seed(self.seed, self.epoch)
        self.shared[1] = 0
        self.loader.next_epoch = 0
        with keep_torch_threads():
            batches = iter(self.loader)
        for images, labels, *ids in batches:
            if self.shared[1]:  # checked before the batch is used; a failure may be in a batch decoded ahead
                raise undecodable(self.block.data_dir, self.block.split, self.shared[1] - 1, self.beton,
                                  self.block.manifest_sha256)
            # FFCV reuses its output buffers batches_ahead (3) batches later: the Normalizer copies the images
            # out; labels are often kept for metrics and cost nothing to copy.
            yield self.batch(self.normalize(images), labels.clone(), ids[0].clone() if self.with_ids else None)
