"""`resident` backend: decode the split once into memory, so every later epoch runs at memory speed.
(Over 300 lines: the store, its memory guard, its disk copy and the crops cut from it read as one.)

Every photo is stored whole, resized so that its shorter side is S = test_resize(res) (256 for res 224), as
the test path's resize does: its central res x res is then exactly the other backends' test crop, and train
RandomResizedCrop sees the photo's whole field of view, as the streaming backends do. The store is ragged
(Store): one flat uint8 buffer, each photo's H x W x 3 pixels at its offset, no padding, so memory is the sum
of H x W x 3 (the seed's 25,199 train + 2,800 test photos at S = 256: 7.9 GB, where a canvas padded to the
widest photo took 9.8 GB). The guard budgets the train and test splits together (a run holds both), before
any decoding: too big is one clear error naming the --res that would fit, never an out-of-memory crash.

The buffer lives on the GPU when the device is one, in host memory otherwise. A checked copy is kept on disk
next to the shards (loaders.resident_cache: one per split and S, replacing our older ones, never where it
would leave the disk short), so the next run skips decoding; on the CPU it is memory-mapped, not copied.

Train batches: a permutation drawn from (seed, epoch), then RandomResizedCrop + flip with torchvision's
box distribution over each whole photo (loaders.common.sample_crops, drawn per batch from the same
generator). On the CPU each crop is one antialiased resize of a copy of its box in the store, written into
its slot of the batch and normalised there, spread over a thread pool whose threads run torch on one core each
(torch releases the GIL): ~3.5x the batched grid_sample over a float canvas there (2 threads, interleaved in
one process on shared cores). On a GPU every output pixel's four neighbours are gathered from the store's flat
buffer at once (Store.resized_crops): no per-sample kernels or copies, no host sync, bilinear without
antialiasing (a box is at most ~1.5x the output side at this store size).

With augment flip or none the train batches are the test crops (+ random flips): every photo's crop at the
current res is cut from the store once, as one uint8 N x 3 x res x res tensor (again after a set_res to
another res, from the same store: no decode), so an epoch is an index gather + normalise, at memory speed.
The guard counts that tensor too.
"""
import warnings
import weakref
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from torchvision.transforms import v2
from tqdm import tqdm

from cli import UsageError
from ingest.layout import SPLITS
from ingest.shards import ShardIndex, csv_columns
from loaders import resident_cache
from loaders.base import Loader
from loaders.common import (Normalizer, WorkerLoader, crop_coordinates, epoch_seed, manifest_digest,
                            one_thread_pool, random_flips, rank_ids, resized_crop, sample_crops, test_resize)
from loaders.torch_loader import ShardSamples, collate_bytes, decode, decode_jpegs_on_gpu

MEMORY_SHARE = 0.8  # the data may take this share of free memory; the rest is for the model and the OS
DECODE_BATCH = 64
CROP_CHUNK = 16  # crops per task of the CPU pool: a free thread takes the next, so one that other work preempts
# holds up 16 crops, not its share of the batch
CACHE_LAYOUT = "ragged-v2"  # part of the disk copy's key: copies of older store layouts are stale
_HELD = weakref.WeakValueDictionary()  # (dataset, split, rank, world, device) -> images of live loaders
READS = ("webdataset",)  # the formats loaders.base.prepare checks at start-up


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False, cache=True, memory_limit=None):
    """A resident loader for this rank's block of samples; `memory_limit` (bytes) replaces the measured free
    memory (to check the guard), `cache=False` neither reads nor writes the disk copy."""
    data_dir, positions, device = Path(block.data_dir), block.positions, block.device
    size = test_resize(res)
    fit = FitShorter(size)
    samples = ShardSamples(ShardIndex(block.data_dir, block.split), None if device.type == "cuda" else fit,
                           block.manifest_sha256)
    stored = torch.tensor(samples.sizes[positions.start:positions.stop])
    store = Store.plan(stored, size)
    held_key = (str(data_dir.resolve()), block.split, block.rank, block.world, str(device))
    squares = block.train and augment != "rrc"  # the train crops are cut once, see the module docstring
    check_memory(block, stored, batch_size, res, memory_limit, held_key, squares)
    path = resident_cache.path_for(data_dir, block.split, size, positions)
    key = f"{manifest_digest(data_dir)}:{size}:{CACHE_LAYOUT}"  # resident_cache.derived_from reads its first part
    saved = resident_cache.read(path, key) if cache else None
    if saved is not None and torch.equal(saved["sizes"], store.sizes):
        store.pixels = saved["pixels"].to(device)
    else:
        decode_split(samples, positions, store.allocate(device), fit, workers)
        if cache:
            save_cache(path, key, store)
    _HELD[held_key] = store.pixels
    loader = ResidentLoader(block, store, samples.labels[positions.start:positions.stop].to(device),
                            samples.ids[positions.start:positions.stop], augment=augment, batch_size=batch_size,
                            res=res, seed=seed, with_ids=with_ids)
    loader.from_cache = saved is not None
    return loader


class Store:
    """The decoded photos, ragged: one flat uint8 buffer `pixels` holding photo k's H x W x 3 values (HWC, as the
    decoders write them) from offsets[k], its (H, W) in sizes[k]. No padding: the buffer is exactly the sum of
    H x W x 3 of the photos."""

    def __init__(self, sizes, pixels=None):
        self.sizes = sizes.long()
        counts = self.sizes[:, 0] * self.sizes[:, 1] * 3
        self.offsets = torch.cumsum(counts, 0) - counts
        self.nbytes = int(counts.sum())
        self._spans = list(zip(self.offsets.tolist(), self.sizes.tolist()))  # python ints: no tensor ops per photo
        self._on_device = None  # (pixel starts, sizes) where the pixels are, for resized_crops
        self.pixels = pixels

    @classmethod
    def plan(cls, stored, size):
        """The store for stored (height, width) sizes resized to shorter side `size`, as v2's resize rounds."""
        short, long = stored.min(1).values, stored.max(1).values
        long = torch.where(short == size, long, (size * long.double() / short).long())  # int(), as torchvision
        portrait = stored[:, 0] > stored[:, 1]
        return cls(torch.stack([torch.where(portrait, long, size), torch.where(portrait, size, long)], 1))

    def allocate(self, device):
        self.pixels = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        return self

    def hwc(self, k):
        """Photo k as an H x W x 3 view of the buffer."""
        offset, (height, width) = self._spans[k]
        return self.pixels[offset:offset + height * width * 3].view(height, width, 3)

    def photo(self, k):
        """Photo k as a uint8 3 x H x W view (HWC in memory, as a decoded image)."""
        return self.hwc(k).permute(2, 0, 1)

    def put(self, k, photo):
        """Write photo k (uint8 3 x H x W at its resized size) into its place."""
        if tuple(photo.shape[1:]) != tuple(self._spans[k][1]):
            raise ValueError(f"photo {k} is {tuple(photo.shape[1:])}, the store says {tuple(self._spans[k][1])}")
        self.photo(k).copy_(photo)

    def resized_crops(self, index, boxes, flips, res):
        """The crop boxes of photos `index` (a tensor on the store's device) resized to res x res (bilinear, no
        antialiasing, as batched_resized_crop samples a canvas) and maybe flipped, as float N x 3 x res x res:
        four gathers from the flat buffer, with no per-photo copy and nothing read back to the host (the GPU
        path; a padded canvas cost a copy per photo and a host sync per batch)."""
        device = self.pixels.device
        if self._on_device is None or self._on_device[0].device != device:
            self._on_device = self.offsets.to(device) // 3, self.sizes.to(device)
        starts, sizes = self._on_device[0][index], self._on_device[1][index]
        x, y = crop_coordinates(boxes, flips, res, device)
        x0, y0 = x.floor(), y.floor()
        wx, wy = (x - x0)[:, None, :, None], (y - y0)[:, :, None, None]
        x0, y0 = x0.long(), y0.long()  # inside the photo: the coordinates are clamped to its box
        x1 = torch.minimum(x0 + 1, sizes[:, 1:] - 1)  # where x0 is the last column, its weight wx is 0
        y1 = torch.minimum(y0 + 1, sizes[:, :1] - 1)
        pixels = self.pixels.view(-1, 3)  # offsets are multiples of 3: a photo starts at a pixel

        def at(rows, columns):  # N x res x res x 3 pixels of the given rows and columns of each photo
            where = starts[:, None, None] + (rows * sizes[:, 1:])[:, :, None] + columns[:, None, :]
            return pixels[where].float()

        top = torch.lerp(at(y0, x0), at(y0, x1), wx)
        return torch.lerp(top, torch.lerp(at(y1, x0), at(y1, x1), wx), wy).permute(0, 3, 1, 2)

    def center_crops(self, ks, res):
        """The res x res centre crops (torchvision's rounding) of photos `ks`, as one uint8 N x 3 x res x res
        batch (channels_last: HWC crops stacked as they lie)."""
        crops = []
        for k in ks:
            image = self.hwc(k)
            top, left = int(round((image.shape[0] - res) / 2.0)), int(round((image.shape[1] - res) / 2.0))
            crops.append(image[top:top + res, left:left + res])
        return torch.stack(crops).permute(0, 3, 1, 2)


def stored_sizes(data_dir, split, ids):
    """(height, width) of the stored JPEG of each sample id, from `<split>.csv` (written by ingest)."""
    return torch.from_numpy(csv_columns(data_dir, split, "height", "width"))[ids]


def free_memory(device):
    """Bytes free on `device` now (GPU memory, or host memory available without swapping)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def working_bytes(store, batch_size, res, device):
    """Per-batch buffers of ResidentLoader: on the CPU the uint8 crops and the Normalizer's ring of 3 float
    outputs; on a GPU also the batch's float canvas of its photos (at most the largest photo each), the grid
    (2 floats per output pixel) and grid_sample's output (3)."""
    out = batch_size * res * res * (3 + 3 * 3 * 4)
    if device.type == "cuda" and len(store.sizes):
        out += batch_size * (3 * int(store.sizes[:, 0].max()) * int(store.sizes[:, 1].max()) * 4
                             + res * res * 4 * (2 + 3))
    return out


def check_memory(block, stored, batch_size, res, limit, held_key, squares=False):
    """UsageError unless this split and the other (a run holds both) fit in MEMORY_SHARE of free memory,
    counting the other split's images as free when a live loader already holds them; `stored`: this split's
    stored (height, width) sizes; `squares`: this split also keeps its res x res crops (augment flip or none).
    The error names the largest --res that would fit."""
    device = block.device
    other = next(s for s in SPLITS if s != block.split)
    held = _HELD.get(held_key[:1] + (other,) + held_key[2:])
    held = 0 if held is None else held.numel()
    other_stored = None
    if not held:
        ids = rank_ids(block.manifest["splits"].get(other, {}).get("count", 0), block.rank, block.world)
        if len(ids):
            # its block's ids stand in for its shard positions (the same where shards are in id order, as
            # test shards are, or with one rank): indexing the other split's shards here would cost seconds
            other_stored = stored_sizes(block.data_dir, other, torch.arange(ids.start, ids.stop))

    def need(res):
        stores = [Store.plan(s, test_resize(res)) for s in (stored, other_stored) if s is not None]
        return sum(s.nbytes + working_bytes(s, batch_size, res, device) for s in stores) + held + \
            squares * len(stored) * 3 * res**2

    free = (free_memory(device) if limit is None else limit) + held
    if need(res) > MEMORY_SHARE * free:
        where = "GPU" if device.type == "cuda" else "host"
        fits = next((r for r in range(res - 1, 7, -1) if need(r) <= MEMORY_SHARE * free), None)
        hint = f"--res {fits} or lower (a store size of {test_resize(fits)} px) would fit, or use " if fits else \
            "use a smaller --res, "
        raise UsageError(f"the resident loader needs {need(res) / 1e6:,.0f} MB for the train and test images at a "
                         f"store size (shorter side) of {test_resize(res)} px but {where} memory has "
                         f"{free / 1e6:,.0f} MB free: {hint}more ranks, or a streaming loader (--loader dali or ffcv)")


def save_cache(path, key, store):
    """Write the disk copy (loaders.resident_cache) unless host memory cannot hold the copy of GPU pixels that
    torch.save needs: then the next run decodes again."""
    host = torch.device("cpu")
    if store.pixels.device != host and store.nbytes > MEMORY_SHARE * free_memory(host):
        warnings.warn(f"resident cache not written (host memory cannot hold a {store.nbytes / 1e6:,.0f} MB copy "
                      "of the images); the next run decodes again")
        return
    resident_cache.write(path, key, {"pixels": store.pixels, "sizes": store.sizes})


class FitShorter:
    """uint8 CHW photo (or JPEG bytes, stored height, width) -> resized to shorter side S, as the test path."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, height=None, width=None):
        return v2.functional.resize(image if height is None else decode(image), self.size, antialias=True)


def collate_list(batch):
    images, labels, ids = zip(*batch)
    return list(images), labels, ids


def decode_split(samples, positions, store, fit, workers):
    """Decode the photos at `positions`, resized by `fit`, into `store` (allocated on its device).

    On a GPU, nvJPEG decodes each batch in one call; on the CPU, DataLoader workers decode (libjpeg-turbo): the
    samples' transform is `fit` there."""
    device = store.pixels.device
    on_gpu = device.type == "cuda"
    batches = WorkerLoader(Subset(samples, positions), batch_size=DECODE_BATCH, num_workers=workers,
                         collate_fn=collate_bytes if on_gpu else collate_list)
    done = 0
    with tqdm(total=len(positions), desc=f"resident: decoding {samples.index.split}", unit="img",
              disable=None) as progress:
        for data, _, _ in batches:
            if on_gpu:
                data = [fit(image) for image in decode_jpegs_on_gpu(data, device)]
            for k, image in enumerate(data, done):
                try:
                    store.put(k, image)
                except ValueError as err:
                    raise UsageError(f"{samples.index.tar(positions[k])}: a stored image's size differs "
                                     f"from its csv row ({err}): ingest again with python ingest/build.py") from None
            done += len(data)
            progress.update(len(data))


class ResidentLoader(Loader):
    """Batches cut from the decoded `store` (loaders.resident.Store), on the store's device."""

    def __init__(self, block, store, labels, ids, *, batch_size, res, seed, with_ids, augment="rrc", threads=None):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        self.store, self.labels, self.ids, self.res, self.store_res = store, labels, ids, res, res
        self.augment, self._squares, self._work = augment, None, None
        self.from_cache = False
        device = store.pixels.device
        self.normalize = Normalizer(device)
        self.on_gpu = device.type == "cuda"
        self.threads = threads or torch.get_num_threads()
        self.pool = None if self.on_gpu else one_thread_pool(self.threads)
        self._sizes = store.sizes.to(device)

    def set_res(self, res):
        """Later batches at res x res from the same decoded store: train crops are resized to res anyway;
        test batches are the crops of the res the store was made for, resized to res (the field of view of
        the other backends' test path at res)."""
        if res != self.res:
            self.res, self._work, self._squares = res, None, None  # the reused buffers and crops are res x res

    def _buffer(self, n):
        """The uint8 crops, reused from batch to batch (fresh ones are page-faulted in every batch on the CPU,
        which cost as much as the crops, measured)."""
        if self._work is None:
            self._work = torch.empty(min(self.batch_size, self.num_samples), 3, self.res, self.res,
                                     dtype=torch.uint8, device=self.store.pixels.device,
                                     memory_format=torch.channels_last)
        return self._work[:n]

    def _crop_on_cpu(self, index, boxes, flips):
        """The batch, normalised: each crop resized into its slot of the uint8 batch, then normalised into the
        float batch while it is still in cache, the batch split across the thread pool (torch releases the GIL).
        Normalising each crop there rather than the whole batch after gave 8-27 % more img/s at the
        seed's scale (4 interleaved rounds, docs/loaders.md)."""
        crops, out = self._buffer(len(index)), self.normalize.output((len(index), 3, self.res, self.res))
        jobs = list(zip(range(len(index)), index.tolist(), boxes.tolist(), flips.tolist()))

        def crop(part):
            for slot, k, box, flip in part:
                image = resized_crop(self.store.photo(k), box, flip, self.res, out=crops[slot])
                self.normalize.into(out[slot:slot + 1], image[None])

        for done in [self.pool.submit(crop, jobs[i:i + CROP_CHUNK]) for i in range(0, len(jobs), CROP_CHUNK)]:
            done.result()
        return out

    def _center_crops(self, ks):
        """The test crops of photos `ks`, at the res the store was made for (resized after a set_res)."""
        crops = self.store.center_crops(ks, self.store_res)
        if self.res != self.store_res:
            crops = F.interpolate(crops.float(), size=(self.res, self.res), mode="bilinear", antialias=True)
        return crops

    def _gathered_squares(self, index, generator):
        """Augment flip or none: the batch's crops gathered from the squares (cut on first use), maybe
        flipped."""
        if self._squares is None:
            self._squares = torch.empty(self.num_samples, 3, self.res, self.res, dtype=torch.uint8,
                                        device=self.store.pixels.device, memory_format=torch.channels_last)
            for start in range(0, self.num_samples, DECODE_BATCH):  # a float copy of a part at a time
                part = range(start, min(start + DECODE_BATCH, self.num_samples))
                crops = self._center_crops(part)
                self._squares[start:part.stop] = crops.round().clamp(0, 255) if crops.is_floating_point() else crops
        images = torch.index_select(self._squares, 0, index, out=self._buffer(len(index)))
        return random_flips(images, generator) if self.augment == "flip" else images

    def __iter__(self):
        device, n = self.store.pixels.device, self.num_samples
        if self.train:
            generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n, self.batch_size):
            if self.train and self.augment != "rrc":
                index = order[start:start + self.batch_size]
                images = self.normalize(self._gathered_squares(index, generator))
            elif self.train:
                index = order[start:start + self.batch_size]
                sizes = self._sizes[index]
                boxes, flips = sample_crops(sizes[:, 0], sizes[:, 1], generator)
                images = (self.normalize(self.store.resized_crops(index, boxes, flips, self.res)) if self.on_gpu
                          else self._crop_on_cpu(index, boxes, flips))
            else:
                index = slice(start, start + self.batch_size)
                images = self.normalize(self._center_crops(range(n)[index]))
            ids = self.ids[index.cpu() if self.train else index] if self.with_ids else None
            yield self.batch(images, self.labels[index], ids)
