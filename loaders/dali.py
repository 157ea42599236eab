"""NVIDIA DALI backend: decode and augment the webdataset shards with DALI, on the GPU when there is one.

One pipeline per loader, built once and fed by `fn.external_source` from our own EpochSampler: the order of
an epoch is a function of (seed, epoch) with no per-epoch rebuild (rebuilding DALI's pipeline every epoch,
which its reader's history-dependent shuffle buffer needed, cost ~10 % of the train rate). The source hands
over the JPEG bytes (read from the shards at the offsets of their DALI index files), the labels and, for
train, the RandomResizedCrop window and flip of every sample, drawn here with torchvision's algorithm from a
generator seeded by (seed, epoch): the augmentation of epoch e is the same whatever came before it, like the
order. `decoders.image_slice` decodes only the window (ROI decode: libjpeg-turbo on the CPU, nvJPEG with
`device="mixed"`), `resize` scales it to res and `crop_mirror_normalize` flips, normalises and writes HWC,
which torch sees as NCHW channels_last for free. Test, and train with augment flip or none: full decode,
resize shorter side, center crop (crop_mirror_normalize), mirrored by the source's flips with flip.

On a GPU `hw_decoder_load` sends HW_DECODER_LOAD of the JPEGs to the hardware JPEG decoder (A100, H100/H200)
and the rest to nvJPEG's CUDA decoder with CPU Huffman decoding; with few CPU threads per GPU the hardware
engines are the larger share (DALI's own default is 0.65 for its classic decoder, 0.9 for nvImageCodec).
"""
import collections

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from torchvision.io import ImageReadMode, decode_jpeg

from ingest.shards import ShardIndex
from loaders.base import Loader
from loaders.common import (IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE, EpochSampler, SampleError,
                            test_resize, undecodable)

HW_DECODER_LOAD = 0.9  # share of JPEGs for the GPU's hardware decoder (see the module docstring)
READS = ("webdataset",)  # the formats loaders.base.prepare checks at start-up


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False):
    """A DALI loader over `<split>-*.tar` for this rank's block of samples."""
    return DaliLoader(block, ShardIndex(block.data_dir, block.split), augment=augment, batch_size=batch_size,
                      res=res, seed=seed, threads=max(workers, 1), with_ids=with_ids)


def crop_windows(widths, heights, rng, scale=RRC_SCALE, ratio=RRC_RATIO, attempts=10):
    """torchvision's RandomResizedCrop.get_params for many images at once: int (x, y) anchors and (w, h) sizes.

    Up to `attempts` draws of area share and log-uniform aspect per image, the first that fits wins; an image
    where none fits gets torchvision's fallback, the central crop with the aspect clamped to `ratio`."""
    n = len(widths)
    area = (widths * heights)[:, None]
    target = area * rng.uniform(scale[0], scale[1], (n, attempts))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, attempts)))
    w, h = np.round(np.sqrt(target * aspect)).astype(np.int64), np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.argmax(1)
    w, h = w[np.arange(n), first], h[np.arange(n), first]
    fallback = ~fits.any(1)
    W, H = widths[fallback], heights[fallback]
    w[fallback] = np.where(W / H > ratio[1], np.round(H * ratio[1]), W)
    h[fallback] = np.where(W / H < ratio[0], np.round(W / ratio[0]), H)
    x, y = rng.integers(0, widths - w + 1), rng.integers(0, heights - h + 1)
    x[fallback], y[fallback] = (W - w[fallback]) // 2, (H - h[fallback]) // 2
    return np.stack([x, y], 1).astype(np.int32), np.stack([w, h], 1).astype(np.int32)


class DaliLoader(Loader):
    """One DALI pipeline, fed each pass's JPEGs and crop windows by external_source (the module docstring)."""

    DRAWS = {"rrc": 3, "flip": 1, "none": 0}  # per-sample arrays plan() draws: (anchors, sizes,) flips

    def __init__(self, block, samples, *, augment, batch_size, res, seed, threads, with_ids):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        self.samples, self.res, self.threads, self.augment = samples, res, threads, augment
        self.sampler = EpochSampler(block.positions, seed, shuffle=self.train)
        self._feed, self._iterator, self._finished, self._fed = iter(()), None, False, collections.deque()

    def set_res(self, res):
        """res is part of the pipeline's graph: the next pass builds one anew, only when res changes."""
        if res != self.res:
            self.res, self._finished = res, False

    def plan(self):
        """This epoch's sample positions in order and each one's random draws: with augment rrc its crop window
        (anchors, sizes) and flip, with flip its flip, with none nothing. Everything random about the epoch, a
        function of (seed, epoch)."""
        self.sampler.set_epoch(self.epoch)
        positions = np.fromiter(self.sampler, dtype=np.int64, count=len(self.sampler))
        if self.augment == "none":
            return positions, ()
        rng = np.random.default_rng([self.seed, self.epoch, 1])  # the order drew from epoch_seed
        crops = crop_windows(self.samples.widths[positions], self.samples.heights[positions], rng) \
            if self.augment == "rrc" else ()
        return positions, (*crops, (rng.random(len(positions)) < 0.5).astype(np.int32))

    def _batches(self):
        """What external_source feeds, one tuple per batch: jpegs, labels[, ids][, anchors, sizes][, flips]; each
        batch's positions are kept in `_fed` until DALI hands it over (to name a sample that fails to decode)."""
        positions, draws = self.plan()
        for start in range(0, len(positions), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = positions[part]
            self._fed.append(batch)
            ids = (self.samples.ids[batch],) if self.with_ids else ()  # an unused output is a DALI warning
            yield (self.samples.views(batch), self.samples.labels[batch], *ids, *(d[part] for d in draws))

    def _next_batch(self):
        return next(self._feed)  # StopIteration ends DALI's epoch

    def _pipeline(self):
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        decoder = dict(device="mixed", hw_decoder_load=HW_DECODER_LOAD) if on_gpu else dict(device="cpu")

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                      seed=self.seed, prefetch_queue_depth=2)
        def graph():
            types_ = [types.UINT8, types.INT64] + [types.INT64] * self.with_ids \
                + [types.INT32] * self.DRAWS[self.augment]
            jpegs, labels, *draws = fn.external_source(self._next_batch, num_outputs=len(types_), batch=True,
                                                       dtype=types_)
            ids = draws.pop(0) if self.with_ids else None
            mirror = draws[-1] if draws else 0
            if self.augment == "rrc":
                anchors, sizes, _ = draws
                images = fn.decoders.image_slice(jpegs, anchors, sizes, output_type=types.RGB, **decoder)
                images = fn.resize(images, resize_x=self.res, resize_y=self.res)
            else:
                images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
                images = fn.resize(images, resize_shorter=test_resize(self.res))
            # HWC: permuting it to NCHW in torch is a free view that is already channels_last.
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC",
                                              crop=(self.res, self.res), mean=list(IMAGENET_MEAN),
                                              std=list(IMAGENET_STD), mirror=mirror)
            return (images, labels.gpu() if on_gpu else labels) + ((ids,) if self.with_ids else ())

        pipe = graph()
        pipe.build()
        names = ["images", "labels"] + (["ids"] if self.with_ids else [])
        return DALIGenericIterator(pipe, names, last_batch_policy=LastBatchPolicy.PARTIAL,
                                   prepare_first_batch=False)  # nothing is fed before the epoch is set

    def __iter__(self):
        # The source is set to this epoch before DALI asks it for anything (a reset prefetches at once). A pass
        # left early (a break) leaves batches in flight that DALI cannot drop: the next pass builds anew.
        self._feed = self._batches()
        self._fed.clear()
        if self._iterator is not None and self._finished:
            self._iterator.reset()
        else:
            self._iterator = None  # let the previous pipeline's threads go before new ones start
            self._iterator = self._pipeline()
        self._finished = False
        for (batch,) in self.handed_over():
            images = batch["images"].permute(0, 3, 1, 2)
            labels = batch["labels"].view(-1)
            yield self.batch(images, labels, batch["ids"].view(-1).cpu() if self.with_ids else None)
        self._finished = True

    def handed_over(self):
        """DALI's batches, in feed order; a decode error (DALI's multi-line RuntimeError, raised for a batch it
        prefetched) becomes the one-line SampleError of the first fed sample that does not decode."""
        batches = iter(self._iterator)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError:
                self._iterator, self._finished = None, False  # a failed pipeline is not reused
                raise self.first_undecodable() from None
            self._fed.popleft()
            yield batch

    def first_undecodable(self):
        """The SampleError of the first sample fed to DALI but not handed back that torchvision cannot decode
        either; else one line saying DALI failed on one of them."""
        index = self.samples
        for position in (int(p) for batch in self._fed for p in batch):
            try:
                decode_jpeg(torch.frombuffer(index.read(position), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except (RuntimeError, OSError):
                return undecodable(self.block.data_dir, self.block.split, int(index.ids[position]), index.tar(position),
                                   self.block.manifest_sha256)
        return SampleError(f"DALI could not decode a {self.block.split} sample of {self.block.data_dir} that "
                           f"torchvision decodes: run python ingest/build.py --verify --out {self.block.data_dir}")
