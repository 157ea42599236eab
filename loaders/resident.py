"""`resident` backend: decode the split once into one uint8 tensor, so every later epoch runs at memory speed.
(Over 300 lines: the store's layout, its memory guard, its disk cache and the crops cut from it read as one.)

Every photo is stored whole, resized so that its shorter side is S = test_resize(res) (256 for res 224), as
the test path's resize does: its central res x res is then exactly the other backends' test crop, and train
RandomResizedCrop sees the photo's whole field of view, as the streaming backends do. Portrait photos are
stored transposed, so every stored image is S rows by its long side L, and the store is one padded canvas
N x 3 x S x W (W ~ the longest L), each photo placed so that its test crop falls on the same columns: the test
path is then one slice. Memory: 29k photos at res 224 take ~5.7 GB x (W / S), 1.8x for photos up to 16:9; it
depends on res, not on the store size, so the guard suggests a smaller --res. The guard budgets the train and
test splits together (a run holds both), before any decoding: too big is one clear error, never an
out-of-memory crash halfway.

The tensor lives on the GPU when the device is one, in host memory otherwise, and is cached on disk next to
the shards (`resident-<split>-<S>px-<first>-<stop>.pt`, atomic, keyed by a hash of the manifest, S and res)
so the next run skips decoding; on the CPU the cache is memory-mapped rather than copied.

Train batches: a permutation drawn from (seed, epoch), then RandomResizedCrop + flip with torchvision's
box distribution over each whole photo (loaders.common.sample_crops, drawn per batch from the same
generator). On the CPU each crop is one antialiased v2 resize of a view of the store, spread over a thread
pool (torch releases the GIL): ~3.5x the batched grid_sample over the float canvas there (2 threads,
interleaved in one process on shared cores). On a GPU one grid_sample crops the whole batch
(loaders.common.batched_resized_crop): no per-sample work, bilinear without antialiasing (a box is at most
~1.5x the output side at this store size).

With augment flip or none the train batches are the test crops (+ random flips): every photo's crop at the
current res is cut from the store once, as one uint8 N x 3 x res x res tensor (again after a set_res to
another res, from the same store: no decode), so an epoch is an index gather + normalise, at memory speed.
The guard counts that tensor too.
"""
import hashlib
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from cli import UsageError
from ingest.layout import MANIFEST, SPLITS
from ingest.shards import ShardIndex, csv_columns
from loaders import resident_cache
from loaders.base import Loader
from loaders.common import (Normalizer, batched_resized_crop, epoch_seed, random_flips, rank_ids, resized_crop,
                            sample_crops, test_resize)
from loaders.torch_loader import ShardSamples, collate_bytes, decode, decode_jpegs_on_gpu

MEMORY_SHARE = 0.8  # the data may take this share of free memory; the rest is for the model and the OS
DECODE_BATCH = 64
CACHE_LAYOUT = "whole-photo-v1"  # part of the cache key: caches of the older central-square layout are stale
_HELD = weakref.WeakValueDictionary()  # (dataset, split, rank, world, device) -> images of live loaders
READS = ("webdataset",)  # the formats loaders.base.prepare checks at start-up


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False, cache=True, memory_limit=None):
    """A resident loader for this rank's block of samples; `memory_limit` (bytes) replaces the measured free
    memory (to check the guard), `cache=False` neither reads nor writes the disk cache."""
    data_dir, positions, device = Path(block.data_dir), block.positions, block.device
    size = test_resize(res)
    fit = FitShorter(size)
    samples = ShardSamples(ShardIndex(block.data_dir, block.split), None if device.type == "cuda" else fit)
    layout = Layout.plan(torch.tensor(samples.sizes[positions.start:positions.stop]), size, res)
    held_key = (str(data_dir.resolve()), block.split, block.rank, block.world, str(device))
    squares = block.train and augment != "rrc"  # the train crops are cut once, see the module docstring
    check_memory(block, layout, batch_size, res, memory_limit, held_key, squares)
    path = resident_cache.path_for(data_dir, block.split, size, positions)
    key = f"{hashlib.sha256((data_dir / MANIFEST).read_bytes()).hexdigest()}:{size}:{res}:{CACHE_LAYOUT}"
    saved = resident_cache.read(path, key) if cache else None
    images = saved["images"] if saved else None
    from_cache = images is not None
    if images is None:
        images = decode_split(samples, positions, layout, fit, device, workers)
        if cache:
            save_cache(path, key, images)
    images = images.to(device)
    _HELD[held_key] = images
    loader = ResidentLoader(block, images, layout, samples.labels[positions.start:positions.stop].to(device),
                            samples.ids[positions.start:positions.stop], augment=augment, batch_size=batch_size,
                            res=res, seed=seed, with_ids=with_ids)
    loader.from_cache = from_cache
    return loader


class Layout:
    """Where each photo lies in the padded canvas: photo sizes after the resize (height, width), whether it
    is stored transposed, and its canvas column offset (rows start at 0)."""

    def __init__(self, sizes, size, res):
        self.sizes, self.size, self.res = sizes, size, res
        self.transposed = sizes[:, 0] > sizes[:, 1]
        self.long = sizes.max(1).values
        # every photo's test crop (torchvision's center_crop rounding) lands on columns [column, column + res)
        starts = torch.round((self.long - res) / 2.0).long()
        self.column = int(starts.max()) if len(starts) else 0
        self.offsets = torch.stack([torch.zeros_like(starts), self.column - starts], 1)
        self.width = int((self.offsets[:, 1] + self.long).max()) if len(starts) else size

    @classmethod
    def plan(cls, stored, size, res):
        """The layout for stored (height, width) sizes resized to shorter side `size`, as v2's resize rounds."""
        short, long = stored.min(1).values, stored.max(1).values
        long = torch.where(short == size, long, (size * long.double() / short).long())  # int(), as torchvision
        portrait = stored[:, 0] > stored[:, 1]
        sizes = torch.stack([torch.where(portrait, long, size), torch.where(portrait, size, long)], 1)
        return cls(sizes, size, res)

    def nbytes(self):
        return len(self.sizes) * 3 * self.size * self.width

    def store(self, canvas, k, photo):
        """Write photo k (uint8 3 x H x W at its resized size) into its place in `canvas`."""
        if tuple(photo.shape[1:]) != tuple(self.sizes[k].tolist()):
            raise ValueError(f"photo {k} is {tuple(photo.shape[1:])}, its layout says {tuple(self.sizes[k].tolist())}")
        left, long = int(self.offsets[k, 1]), int(self.long[k])
        canvas[k, :, :, left:left + long] = photo.transpose(1, 2) if self.transposed[k] else photo

    def photo(self, canvas, k):
        """Photo k as a uint8 3 x H x W view of `canvas`."""
        left, long = int(self.offsets[k, 1]), int(self.long[k])
        image = canvas[k, :, :, left:left + long]
        return image.transpose(1, 2) if self.transposed[k] else image


def stored_sizes(data_dir, split, ids):
    """(height, width) of the stored JPEG of each sample id, from `<split>.csv` (written by ingest)."""
    return torch.from_numpy(csv_columns(data_dir, split, "height", "width"))[ids]


def free_memory(device):
    """Bytes free on `device` now (GPU memory, or host memory available without swapping)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def working_bytes(layout, batch_size, res, device):
    """Per-batch buffers of ResidentLoader: on the CPU the uint8 crops and the Normalizer's ring of 3 float
    outputs; on a GPU also the gathered batch (uint8 + float copy), the grid (2 floats per output pixel) and
    grid_sample's output (3)."""
    out = batch_size * res * res * (3 + 3 * 3 * 4)
    if device.type == "cuda":
        out += batch_size * (3 * layout.size * layout.width * 5 + res * res * 4 * (2 + 3))
    return out


def check_memory(block, layout, batch_size, res, limit, held_key, squares=False):
    """UsageError unless this split and the other (a run holds both) fit in MEMORY_SHARE of free memory,
    counting the other split's images as free when a live loader already holds them; `squares`: this split
    also keeps its res x res crops (augment flip or none)."""
    device = block.device
    need = layout.nbytes() + working_bytes(layout, batch_size, res, device) + squares * len(layout.sizes) * 3 * res**2
    other = next(s for s in SPLITS if s != block.split)
    other_key = held_key[:1] + (other,) + held_key[2:]
    held = _HELD.get(other_key)
    if held is not None:
        held = held.numel()
    else:
        count = block.manifest["splits"].get(other, {}).get("count", 0)
        ids = rank_ids(count, block.rank, block.world)
        if len(ids):
            # its block's ids stand in for its shard positions (the same where shards are in id order, as
            # test shards are, or with one rank): indexing the other split's shards here would cost seconds
            other_layout = Layout.plan(stored_sizes(block.data_dir, other, torch.arange(ids.start, ids.stop)),
                                       layout.size, res)
            need += other_layout.nbytes() + working_bytes(other_layout, batch_size, res, device)
    free = (free_memory(device) if limit is None else limit) + (held or 0)
    if need + (held or 0) > MEMORY_SHARE * free:
        where = "GPU" if device.type == "cuda" else "host"
        raise UsageError(f"the resident loader needs {(need + (held or 0)) / 1e6:,.0f} MB for the train and test "
                         f"images at shorter side {layout.size} px but {where} memory has {free / 1e6:,.0f} MB free: "
                         "use a smaller --res, more ranks, or a streaming loader (--loader dali or ffcv)")


def save_cache(path, key, images):
    """Write the disk copy (loaders.resident_cache) unless host memory cannot hold the copy of GPU images that
    torch.save needs: then the next run decodes again."""
    host = torch.device("cpu")
    if images.device != host and images.numel() > MEMORY_SHARE * free_memory(host):
        warnings.warn(f"resident cache not written (host memory cannot hold a {images.numel() / 1e6:,.0f} MB copy "
                      "of the images); the next run decodes again")
        return
    resident_cache.write(path, key, {"images": images})


class FitShorter:
    """uint8 CHW photo (or JPEG bytes, stored height, width) -> resized to shorter side S, as the test path."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, height=None, width=None):
        return v2.functional.resize(image if height is None else decode(image), self.size, antialias=True)


def collate_list(batch):
    images, labels, ids = zip(*batch)
    return list(images), labels, ids


def decode_split(samples, positions, layout, fit, device, workers):
    """The photos at `positions`, resized by `fit` and placed as `layout` says, as one uint8 N x 3 x S x W
    canvas (channels_last, the layout of decoded images) on `device`.

    On a GPU, nvJPEG decodes each batch in one call; on the CPU, DataLoader workers decode (libjpeg-turbo): the
    samples' transform is `fit` there."""
    on_gpu = device.type == "cuda"
    batches = DataLoader(Subset(samples, positions), batch_size=DECODE_BATCH,
                         num_workers=workers,
                         collate_fn=collate_bytes if on_gpu else collate_list)
    canvas = torch.empty(len(positions), 3, layout.size, layout.width, dtype=torch.uint8, device=device,
                         memory_format=torch.channels_last).zero_()  # padding: never read, but cached
    done = 0
    with tqdm(total=len(positions), desc=f"resident: decoding {samples.index.split}", unit="img",
              disable=None) as progress:
        for data, _, _ in batches:
            if on_gpu:
                data = [fit(image) for image in decode_jpegs_on_gpu(data, device)]
            for k, image in enumerate(data, done):
                try:
                    layout.store(canvas, k, image)
                except ValueError as err:
                    raise UsageError(f"{samples.index.tar(positions[k])}: a stored image's size differs "
                                     f"from its csv row ({err}): ingest again with python ingest/build.py") from None
            done += len(data)
            progress.update(len(data))
    return canvas


class ResidentLoader(Loader):
    """Batches cut from the decoded store (`images`, laid out as `layout` says), on the store's device."""

    def __init__(self, block, images, layout, labels, ids, *, batch_size, res, seed, with_ids, augment="rrc",
                 threads=None):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        self.images, self.layout, self.labels, self.ids, self.res = images, layout, labels, ids, res
        self.augment, self._squares = augment, None
        self.from_cache = False
        self.normalize = Normalizer(images.device)
        self.on_gpu = images.device.type == "cuda"
        self.threads = threads or torch.get_num_threads()
        self.pool = None if self.on_gpu else ThreadPoolExecutor(self.threads)
        self._work, self._photos = None, None
        self._sizes = layout.sizes.to(images.device)
        self._offsets, self._transposed = layout.offsets.to(images.device), layout.transposed.to(images.device)

    def set_res(self, res):
        """Later batches at res x res from the same decoded store: train crops are resized to res anyway;
        test batches are the crops of the res the store was laid out for, resized to res (the field of view of
        the other backends' test path at res)."""
        if res != self.res:
            self.res, self._work, self._squares = res, None, None  # the reused buffers and crops are res x res

    def _buffers(self, n):
        """Reused from batch to batch (fresh ones are page-faulted in every batch on the CPU, which cost as
        much as the crops, measured): the uint8 crops on the CPU; the gathered batch, its float copy and the
        sampling grid on a GPU."""
        if self._work is None:
            device, n = self.images.device, min(self.batch_size, self.num_samples)
            if self.on_gpu and self.augment == "rrc":
                self._work = (torch.empty(n, *self.images.shape[1:], dtype=torch.uint8, device=device,
                                          memory_format=torch.channels_last),
                              torch.empty(n, *self.images.shape[1:], device=device, memory_format=torch.channels_last),
                              torch.empty(n, self.res, self.res, 2, device=device))
            else:
                self._work = torch.empty(n, 3, self.res, self.res, dtype=torch.uint8, device=device,
                                         memory_format=torch.channels_last)
        return self._work

    def _crop_on_cpu(self, index, boxes, flips):
        """Each crop resized on its own, the batch split across the thread pool (torch releases the GIL)."""
        out = self._buffers(len(index))[:len(index)]
        if self._photos is None:  # views of the store, one per photo, made once
            self._photos = [self.layout.photo(self.images, k) for k in range(self.num_samples)]
        jobs = list(zip(range(len(index)), index.tolist(), boxes.tolist(), flips.tolist()))

        def crop(part):
            for slot, k, box, flip in part:
                out[slot] = resized_crop(self._photos[k], box, flip, self.res)

        for done in [self.pool.submit(crop, jobs[i::self.threads]) for i in range(self.threads)]:
            done.result()
        return out

    def _crop_on_gpu(self, index, boxes, flips):
        gathered, floats, grid = self._buffers(len(index))
        images = torch.index_select(self.images, 0, index, out=gathered[:len(index)])
        return batched_resized_crop(floats[:len(index)].copy_(images), boxes, flips, self.res,
                                    offsets=self._offsets[index], transposed=self._transposed[index], grid=grid)

    def _center_crops(self, index):
        """The test crops: one slice of the canvas, transposed photos turned back (resized after a set_res)."""
        row, column, res = int(round((self.layout.size - self.layout.res) / 2.0)), self.layout.column, self.layout.res
        crops = self.images[index, :, row:row + res, column:column + res]
        transposed = self._transposed[index]
        crops = torch.where(transposed[:, None, None, None], crops.transpose(2, 3), crops) if transposed.any() \
            else crops
        if self.res != res:
            crops = F.interpolate(crops.float(), size=(self.res, self.res), mode="bilinear", antialias=True)
        return crops

    def _gathered_squares(self, index, generator):
        """Augment flip or none: the batch's crops gathered from the squares (cut on first use), maybe
        flipped."""
        if self._squares is None:
            self._squares = torch.empty(self.num_samples, 3, self.res, self.res, dtype=torch.uint8,
                                        device=self.images.device, memory_format=torch.channels_last)
            for start in range(0, self.num_samples, DECODE_BATCH):  # a float copy of a part at a time
                part = slice(start, start + DECODE_BATCH)
                crops = self._center_crops(part)
                self._squares[part] = crops.round().clamp(0, 255) if crops.is_floating_point() else crops
        out = self._buffers(len(index))[:len(index)]
        images = torch.index_select(self._squares, 0, index, out=out)
        return random_flips(images, generator) if self.augment == "flip" else images

    def __iter__(self):
        device, n = self.images.device, self.num_samples
        if self.train:
            generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n, self.batch_size):
            if self.train and self.augment != "rrc":
                index = order[start:start + self.batch_size]
                images = self._gathered_squares(index, generator)
            elif self.train:
                index = order[start:start + self.batch_size]
                sizes = self._sizes[index]
                boxes, flips = sample_crops(sizes[:, 0], sizes[:, 1], generator)
                images = (self._crop_on_gpu if self.on_gpu else self._crop_on_cpu)(index, boxes, flips)
            else:
                index = slice(start, start + self.batch_size)
                images = self._center_crops(index)
            ids = self.ids[index.cpu() if self.train else index] if self.with_ids else None
            yield self.batch(self.normalize(images), self.labels[index], ids)
