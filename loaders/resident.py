"""`resident` backend: decode the split once into one uint8 tensor, so every later epoch runs at memory speed.

Every image is stored as S x S with S = test_resize(res) (256 for res 224): shorter side resized to S, then
the central S x S square. Why S: the test path becomes a crop of that square, the very pixels of the other
backends' resize + center crop; S is also as small as that allows, so 29k photos at res 224 take 5.7 GB.
The trade-off: train RandomResizedCrop only sees the central square of each photo (the streaming backends
crop from the whole stored image), losing the sides of wide photos. Memory depends on res, not on the store
size, so the guard suggests a smaller --res.

The tensor lives on the GPU when the device is one, in host memory otherwise, and is cached on disk next to
the shards (`resident-<split>-<S>px-<first>-<stop>.pt`, atomic, keyed by a hash of the manifest, S and res)
so the next run skips decoding; on the CPU the cache is memory-mapped rather than copied. A memory guard
runs before any decoding: too big is one clear error, never an out-of-memory crash halfway.

Train batches: a permutation drawn on the device from (seed, epoch), then one batched RandomResizedCrop +
flip per batch: each sample's crop box and flip become an affine transform, applied by one grid_sample
(bilinear). No antialiasing is needed: a crop is at most S/res = 1.14x the output size along an axis, so
aliasing is negligible. No per-sample Python anywhere on the hot path.
"""
import hashlib
import math
import warnings
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from tqdm import tqdm

from cli import UsageError
from ingest.atomic import atomic_path
from ingest.layout import MANIFEST, read_manifest
from loaders.common import RRC_RATIO, RRC_SCALE, Normalizer, epoch_seed, rank_ids, resolve_device, test_resize
from loaders.tvision import ShardSamples, collate_bytes, collate_images

MEMORY_SHARE = 0.8  # the dataset may take this share of free memory; the rest is for the model and the OS
RRC_TRIES = 10  # torchvision's attempts at a crop that fits before falling back to the whole image
DECODE_BATCH = 64


def build(data_dir, split, *, batch_size, res, device, seed, rank, world, workers, with_ids=False, cache=True,
          memory_limit=None):
    """A resident loader for this rank's block of samples; `memory_limit` (bytes) replaces the measured free
    memory (to check the guard), `cache=False` neither reads nor writes the disk cache."""
    read_manifest(data_dir)
    device = resolve_device(device)
    samples = ShardSamples(data_dir, split)
    positions = rank_ids(len(samples), rank, world)
    if not positions:
        raise UsageError(f"rank {rank} of {world} gets no {split} samples: use fewer ranks")
    size = test_resize(res)
    check_memory(len(positions), size, batch_size, res, device, memory_limit, split)
    path = Path(data_dir) / f"resident-{split}-{size}px-{positions.start}-{positions.stop}.pt"
    key = f"{hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()}:{size}:{res}"
    images = load_cache(path, key) if cache else None
    from_cache = images is not None
    if images is None:
        images = decode_split(samples, positions, FitSquare(size, res), device, workers, split)
        if cache:
            save_cache(path, key, images)
    loader = ResidentLoader(images.to(device), samples.labels[positions.start:positions.stop].to(device),
                            samples.ids[positions.start:positions.stop], train=split == "train",
                            batch_size=batch_size, res=res, seed=seed, with_ids=with_ids)
    loader.from_cache = from_cache
    return loader


def check_memory(n, size, batch_size, res, device, limit, split):
    """UsageError unless the images and one batch's working buffers fit in MEMORY_SHARE of free memory."""
    # per sample: the gathered image (uint8 + float copy); floats per output pixel: the grid (2), grid_sample's
    # output (3) and the Normalizer's ring of 3 outputs (3 each)
    working = batch_size * (3 * size * size * 5 + res * res * 4 * (2 + 3 + 3 * 3))
    need = n * 3 * size * size + working
    if limit is None:
        limit = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if need > MEMORY_SHARE * limit:
        where = "GPU" if device.type == "cuda" else "host"
        raise UsageError(f"the resident loader needs {need / 1e6:,.0f} MB for {n} {split} images at {size}x{size} "
                         f"px but {where} memory has {limit / 1e6:,.0f} MB free: use a smaller --res, more ranks, "
                         "or a streaming loader (--loader dali or ffcv)")


def load_cache(path, key):
    """The cached images if `path` holds them for this manifest and size, else None (stale or unreadable)."""
    if not path.is_file():
        return None
    try:  # mmap: no second copy in memory on the CPU
        cached = torch.load(path, mmap=True, weights_only=True)
        return cached["images"] if cached["key"] == key else None
    except Exception:  # a truncated or foreign file is a miss like a stale one: decode and overwrite it
        return None


def save_cache(path, key, images):
    """Write the cache atomically; a read-only data folder costs the next run a decode, not this run."""
    try:
        with atomic_path(path) as tmp:
            torch.save({"key": key, "images": images.cpu()}, tmp)
    except OSError as err:
        warnings.warn(f"resident cache not written ({err}); the next run decodes again")


class FitSquare:
    """uint8 CHW image -> its S x S square after resizing the shorter side to S.

    The square is placed so that its central res x res crop is exactly the center crop of the test path: a
    plain center crop to S, then to res, rounds twice and lands 1 px off when S - res is odd."""

    def __init__(self, size, res):
        self.size, self.res = size, res

    def __call__(self, image):
        image = v2.functional.resize(image, self.size, antialias=True)
        inner = int(round((self.size - self.res) / 2.0))  # torchvision's center_crop rounding, as below
        top, left = (min(max(int(round((side - self.res) / 2.0)) - inner, 0), side - self.size)
                     for side in image.shape[-2:])
        return image[:, top:top + self.size, left:left + self.size]


def decode_split(samples, positions, fit, device, workers, split):
    """The images at `positions` through `fit` (a FitSquare), as one uint8 N x 3 x S x S tensor on `device`.

    On a GPU, nvJPEG decodes each batch in one call; on the CPU, DataLoader workers decode (libjpeg-turbo)."""
    size = fit.size
    on_gpu = device.type == "cuda"
    samples.transform = None if on_gpu else fit
    batches = DataLoader(Subset(samples, positions), batch_size=DECODE_BATCH,
                         num_workers=(workers if workers is not None else len(psutil.Process().cpu_affinity())),
                         collate_fn=collate_bytes if on_gpu else collate_images)
    # channels_last, the layout of the batches: crops become float without a transposition
    images = torch.empty(len(positions), 3, size, size, dtype=torch.uint8, device=device,
                         memory_format=torch.channels_last)
    done = 0
    with tqdm(total=len(positions), desc=f"resident: decoding {split}", unit="img", disable=None) as progress:
        for data, _, _ in batches:
            if on_gpu:
                data = torch.stack([fit(image) for image in decode_jpeg(data, mode=ImageReadMode.RGB, device=device)])
            images[done:done + len(data)] = data
            done += len(data)
            progress.update(len(data))
    return images


def random_resized_crop_flip(images, res, generator, grid=None):
    """float N x 3 x S x S -> float N x 3 x res x res: RandomResizedCrop + horizontal flip, batched.

    torchvision's sampling (area share, log-uniform aspect ratio, RRC_TRIES tries, else the whole image), with
    the crop box and flip folded into one affine transform per sample, applied by a single grid_sample. The
    transform has no rotation, so the grid is written from per-row and per-column coordinates (into `grid`,
    N x res x res x 2, when given) instead of affine_grid's batched matmul: 4x less time on the CPU."""
    n, device = len(images), images.device

    def uniform(*shape, low=0.0, high=1.0):
        return torch.empty(shape, device=device).uniform_(low, high, generator=generator)

    area = uniform(n, RRC_TRIES, low=RRC_SCALE[0], high=RRC_SCALE[1])
    ratio = torch.exp(uniform(n, RRC_TRIES, low=math.log(RRC_RATIO[0]), high=math.log(RRC_RATIO[1])))
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # as shares of the (square) side
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits, as torchvision takes it
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), 1.0)
    h = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
    cx, cy = w / 2 + (1 - w) * uniform(n), h / 2 + (1 - h) * uniform(n)
    flip = torch.where(uniform(n) < 0.5, -1.0, 1.0)
    centres = (torch.arange(res, device=device) * 2 + 1) / res - 1  # output pixel centres, align_corners=False
    grid = torch.empty(n, res, res, 2, device=device) if grid is None else grid[:n]
    grid[..., 0] = ((w * flip)[:, None] * centres + (2 * cx - 1)[:, None])[:, None, :]
    grid[..., 1] = (h[:, None] * centres + (2 * cy - 1)[:, None])[:, :, None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ResidentLoader:
    """Iterates (images, labels) batches, or (images, labels, ids) with with_ids; see loaders.common."""

    def __init__(self, images, labels, ids, *, train, batch_size, res, seed, with_ids):
        self.images, self.labels, self.ids = images, labels, ids
        self.train, self.batch_size, self.res, self.seed, self.with_ids = train, batch_size, res, seed, with_ids
        self.num_samples, self.epoch, self.from_cache = len(labels), 0, False
        self.normalize = Normalizer(images.device)
        self._work = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-self.num_samples // self.batch_size)

    def _train_buffers(self):
        """The gathered uint8 batch, its float copy and the sampling grid, reused from batch to batch: fresh
        ones are page-faulted in every batch on the CPU, which cost as much as the crops (measured)."""
        if self._work is None:
            n, shape, device = min(self.batch_size, self.num_samples), self.images.shape[1:], self.images.device
            self._work = (torch.empty(n, *shape, dtype=torch.uint8, device=device, memory_format=torch.channels_last),
                          torch.empty(n, *shape, device=device, memory_format=torch.channels_last),
                          torch.empty(n, self.res, self.res, 2, device=device))
        return self._work

    def __iter__(self):
        device, n, res = self.images.device, self.num_samples, self.res
        if self.train:
            generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator, device=device)
            gathered, floats, grid = self._train_buffers()
        offset = int(round((self.images.shape[-1] - res) / 2.0))  # torchvision's center_crop rounding
        for start in range(0, n, self.batch_size):
            if self.train:
                index = order[start:start + self.batch_size]
                images = torch.index_select(self.images, 0, index, out=gathered[:len(index)])
                images = random_resized_crop_flip(floats[:len(index)].copy_(images), res, generator, grid)
            else:
                index = slice(start, start + self.batch_size)
                images = self.images[index, :, offset:offset + res, offset:offset + res]
            batch = (self.normalize(images), self.labels[index])
            yield batch + (self.ids[index.cpu() if self.train else index],) if self.with_ids else batch
