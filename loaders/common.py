"""What every loader backend shares: the batch contract, normalisation constants, device choice and the
split of sample ids across ranks.

Every backend yields `(images, labels)`: images float32 NCHW (channels_last memory format), normalised with
the ImageNet mean/std, on the loader's device; labels int64 on the same device. Test batches are the test
transform, resize(shorter side = res / 0.875) + center crop(res), each of this rank's samples exactly once, in
id order, last batch partial. Train batches are reshuffled every epoch from (seed, epoch) and transformed as
`augment` says (AUGMENTS): `rrc` (the default) RandomResizedCrop(res) + random horizontal flip; `flip` the
test transform + random horizontal flip; `none` the test transform alone (the 500px study's own pipeline), so
every epoch gives the very same images, only in another order. Random draws are a function of (seed, epoch,
sample) alone, so a resumed run draws what the uninterrupted one drew. Train epochs also give each of this
rank's samples exactly once (last batch partial). The order of an epoch is a function of (seed, epoch) alone,
where epoch is the last value given to set_epoch (default 0): iterating twice without set_epoch repeats the
order, like DistributedSampler. `set_res(res)` changes the side of the batches from the next pass on
(progressive resizing, a test pass at another resolution) without rebuilding what need not be rebuilt: no
re-decode, no worker restart.

`workers` means the same to every backend: None (the default) is this process's share of the cores, the
CPUs it may run on divided by the processes of a DDP run on this machine (LOCAL_WORLD_SIZE), at least 1, so
that ranks do not oversubscribe the CPU; 0 is in the training process (torch, folder, resident; DALI and FFCV
have no such mode and run one thread); n is n worker processes (torch, folder, resident) or threads (DALI,
FFCV). A negative count is a UsageError.

Option `with_ids=True` (a check for tests and debugging, not the hot path) makes a backend yield
`(images, labels, ids)`, ids being int64 sample ids (row numbers of `<split>.csv`) on the CPU, so that tests
can see which samples came out rather than infer it.

Labels and ids belong to the caller; on the CPU images may be views of a loader's buffers that it rewrites
a few batches later (a fresh buffer per batch costs more than filling it; see Normalizer): clone images to
keep them.

Over 300 lines: the contract above and the pieces that keep every backend to it (seeded draws, crops, rank
blocks, normalisation) sit together, so a backend imports them from the one place that defines them.
"""
import contextlib
import gc
import hashlib
import math
import multiprocessing
import os
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import UsageError
from ingest.layout import MANIFEST

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # on the 0-255 scale the decoders produce
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
TEST_CROP_RATIO = 0.875  # resize shorter side to res / 0.875, then center-crop res (the usual ImageNet eval)
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop area share and aspect ratio, torchvision's defaults
RRC_RATIO = (3 / 4, 4 / 3)
RRC_TRIES = 10  # torchvision's attempts at a crop that fits before its fallback
AUGMENTS = ("rrc", "flip", "none")  # train transforms, see the module docstring


def check_augment(augment):
    if augment not in AUGMENTS:
        raise UsageError(f"unknown augment {augment!r}: choose one of {', '.join(AUGMENTS)}")


def random_flips(images, generator):
    """A batch (N x C x H x W) with each image mirrored left-right on a fair coin from `generator`: one
    batched op, for the GPU paths and resident's gathered batches."""
    flips = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flips[:, None, None, None], images.flip(-1), images)


def test_resize(res):
    """Shorter side before the center crop of the test path."""
    return round(res / TEST_CROP_RATIO)


def epoch_seed(seed, epoch):
    """A 31-bit seed for one epoch, hashed from (seed, epoch): seed + epoch would repeat across runs."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


def sample_seed(epoch_key, sample):
    """The seed of one sample's augmentation draws (crop, flip) in the epoch whose epoch_seed is `epoch_key`.

    Draws that are a function of (seed, epoch, sample id) alone do not depend on which worker process or
    thread makes them, nor on what ran before: a resumed run draws what the uninterrupted one drew, and no
    random state has to be checkpointed. Plain integer arithmetic, so FFCV's numba code compiles this very
    function; nearby seeds give unrelated streams (Mersenne Twister seeding mixes them)."""
    return (epoch_key + sample * 0x9E3779B1) % 2**31


@contextlib.contextmanager
def drawing_from(seed):
    """torch's CPU draws inside come from `seed`; the caller's random stream is left as it was."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SampleError(UsageError):
    """A sample that cannot be read or decoded. The run stops on it, with one line naming the split, the
    sample id, the file and the repair: a sample is never skipped, nor trained on as noise (see docs/loaders.md).

    Raised in a DataLoader worker, it reaches the main process re-made from the worker's traceback text:
    the constructor keeps our line of it."""

    def __init__(self, message):
        super().__init__(message.rstrip().splitlines()[-1].rpartition("SampleError: ")[2])


def manifest_digest(data_dir):
    """sha256 of the dataset's manifest bytes, None while there is none (an ingest under way removes it): what
    a loader started with tells data replaced under it (ingested again) from damaged data."""
    try:
        return hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def undecodable(data_dir, split, sample, where, started_with=None):
    """The SampleError of `split`'s sample id `sample`, whose bytes are in `where` (a shard or the beton);
    `started_with`: the manifest_digest the loader started with, to say so when the data was replaced."""
    if started_with is not None and manifest_digest(data_dir) != started_with:
        return SampleError(f"the data in {data_dir} was replaced while this run read it ({split} sample {sample} "
                           f"of {where} changed; ingested again?): restart the run to read the new data")
    return SampleError(f"{split} sample {sample} in {where} does not decode: run python ingest/build.py --verify "
                       f"--out {data_dir} to see what is damaged, then rerun the ingest to repair it")


def resolve_workers(workers):
    """The `workers` of the module docstring as a count: None -> this process's share of the cores."""
    if workers is None:
        return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: load in the training process), not {workers}")
    return workers


def resolve_device(device="auto"):
    """'auto' -> cuda when present, else cpu; asking for a GPU that is not there is a UsageError."""
    device = torch.device("cuda" if device in (None, "auto") and torch.cuda.is_available() else
                          "cpu" if device in (None, "auto") else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    return device


def rank_ids(num_samples, rank, world):
    """The contiguous block of sample positions that `rank` of `world` owns: disjoint, covering, no padding.

    Contiguous blocks match DALI's shard_id/num_shards, so all backends split the same way."""
    if not 0 <= rank < world:
        raise UsageError(f"rank {rank} is outside world size {world}")
    return range(num_samples * rank // world, num_samples * (rank + 1) // world)


class Normalizer:
    """uint8/float NCHW batches -> normalised float32 channels_last, the batch contract's images.

    Two things made this the limit of CPU loaders at res 224 (a batch of 256 is 154 MB of float): a fresh
    buffer per batch is page-faulted in, which costs more than the arithmetic, and per-channel constants
    broadcast over the innermost 3 values of a channels_last tensor do not vectorise. So on the CPU the
    output cycles through `ring` reused buffers, and the arithmetic runs on rows of W x C values against
    constants tiled along the row: one cast-copy and one addcmul, 21 ms instead of 136 ms per batch on 2
    cores (measured). A buffer is rewritten `ring` batches later; on a GPU the caching allocator already
    reuses memory, so every batch gets its own. `output` + `into` split a call, for a loader that normalises
    each image into its slot of the batch while the image is still in cache (resident's crop threads)."""

    def __init__(self, device, ring=3):
        self.device, self.ring = torch.device(device), ring
        self._buffers, self._turn, self._rows = [], 0, {}

    def output(self, shape):
        """The float channels_last buffer for a batch of `shape` (the next of the ring on the CPU)."""
        if self.device.type != "cpu":
            return torch.empty(shape, device=self.device, memory_format=torch.channels_last)
        n, rest = shape[0], tuple(shape[1:])
        if self._buffers and (len(self._buffers[0]) < n or self._buffers[0].shape[1:] != rest):
            self._buffers = []
        if len(self._buffers) < self.ring:  # all as long as the first: a short last batch must not set the size
            length = len(self._buffers[0]) if self._buffers else n
            self._buffers.append(torch.empty((length, *rest), memory_format=torch.channels_last))
        out = self._buffers[self._turn % len(self._buffers)]
        self._turn += 1
        return out[:n]

    def _constants(self, width):
        """(scale, shift) tiled along a row of `width` pixels x 3 channels."""
        if width not in self._rows:
            scale = 1 / torch.tensor(IMAGENET_STD, device=self.device)
            shift = -torch.tensor(IMAGENET_MEAN, device=self.device) * scale
            self._rows[width] = (scale.repeat(width), shift.repeat(width))
        return self._rows[width]

    def __call__(self, images):
        return self.into(self.output(images.shape), images)

    def into(self, out, images):
        """`images` normalised into `out` (channels_last, their shape), which is returned."""
        n, c, h, w = images.shape
        out.permute(0, 2, 3, 1).copy_(images.permute(0, 2, 3, 1))  # cast + layout in one pass
        rows = out.permute(0, 2, 3, 1).view(n * h, w * c)  # a view: out is channels_last
        scale, shift = self._constants(w)
        torch.addcmul(shift, rows, scale, out=rows)
        return out


class PerRes:
    """A transform made by `make(res)` for the current res, which `set_res` changes between epochs.

    The res lives in shared memory, so DataLoader workers that persist across epochs (forked or spawned with
    the dataset) see the new value without a restart; each process makes the transform for a res once."""

    def __init__(self, make, res):
        self.make, self._res, self._made = make, multiprocessing.RawValue("i", res), {}

    def set_res(self, res):
        self._res.value = res

    def __call__(self, *args):
        res = self._res.value
        if res not in self._made:
            self._made[res] = self.make(res)
        return self._made[res](*args)


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader that collects this process's garbage before it forks its workers. A forked worker's own
    collector otherwise runs the finalizers of garbage it inherited, and a DALI pipeline's (Executor2's
    destructor, waiting on a condition whose threads the child does not have) blocks that worker forever at
    0 % CPU while the training process waits for its batch: the whole-suite hang of issue 19, seen with
    py-spy in both workers. Only a process that has loaded DALI collects: a full collection walks every object
    torch and the rest imported (0.3-1 s here), at every worker start. It overrides DataLoader's
    _get_iterator, where every iterator (and so every fork of workers) is made: a private method, read in
    torch 2.14 (here) and 2.11 (.ci/compat's).

    It also keeps each iterator's index queues alive for as long as the iterator (weakref.finalize holds them
    from outside any garbage): an iterator freed by the cycle collector (a run's loaders, an exception's
    traceback) otherwise found its queues already closed, since the collector calls their finalizers, weak
    references, before the iterator's __del__, so its workers never got their stop and each ran out
    DataLoader's 5 s join timeout (10.4 s for 2 workers in one collection, measured)."""

    def _get_iterator(self):
        if self.num_workers > 0 and "nvidia.dali" in sys.modules:
            gc.collect()
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            weakref.finalize(iterator, tuple, iterator._index_queues)
        return iterator


class EpochSampler(torch.utils.data.Sampler):
    """This rank's sample positions: shuffled from (seed, epoch) for train, in order for test.

    A Sampler (rather than a list) so one DataLoader with persistent workers serves every epoch: the order is
    drawn in the main process when an epoch starts, after `set_epoch`. With `keyed`, train items are
    (position, epoch key) pairs, so that a DataLoader worker, which never sees set_epoch, can seed each
    sample's draws with sample_seed."""

    def __init__(self, positions, seed, shuffle, keyed=False):
        self.positions, self.seed, self.shuffle, self.epoch = torch.as_tensor(list(positions)), seed, shuffle, 0
        self.keyed = keyed

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.positions)

    def __iter__(self):
        if not self.shuffle:
            return iter(self.positions.tolist())
        key = epoch_seed(self.seed, self.epoch)
        order = self.positions[torch.randperm(len(self.positions), generator=torch.Generator().manual_seed(key))]
        return ((position, key) for position in order.tolist()) if self.keyed else iter(order.tolist())


# ---------------------------------------------------------------- RandomResizedCrop + flip, shared by torch and resident

def sample_crops(heights, widths, generator):
    """torchvision's RandomResizedCrop.get_params + a fair flip for a batch of photos, drawn at once.

    heights, widths: int64 tensors, the photos' sizes. Returns (boxes, flips): boxes int64 N x 4 (top, left,
    height, width) in photo pixels, rounded as torchvision rounds them (RRC_TRIES tries of area share and
    log-uniform aspect, the first that fits, else its centred fallback with the aspect clamped), flips bool."""
    n, device = len(heights), heights.device

    def uniform(*shape, low=0.0, high=1.0):
        return torch.empty(shape, device=device).uniform_(low, high, generator=generator)

    H, W = heights[:, None].double(), widths[:, None].double()
    area = uniform(n, RRC_TRIES, low=RRC_SCALE[0], high=RRC_SCALE[1]).double() * H * W
    ratio = torch.exp(uniform(n, RRC_TRIES, low=math.log(RRC_RATIO[0]), high=math.log(RRC_RATIO[1])).double())
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    H, W = H[:, 0], W[:, 0]
    aspect = W / H  # the fallback: the whole photo, cut to the nearest allowed aspect
    fallback_w = torch.where(aspect > RRC_RATIO[1], torch.round(H * RRC_RATIO[1]), W)
    fallback_h = torch.where(aspect < RRC_RATIO[0], torch.round(W / RRC_RATIO[0]), H)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    top = torch.where(found, torch.floor(uniform(n).double() * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(uniform(n).double() * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor"))
    flips = uniform(n) < 0.5
    return torch.stack([top, left, h, w], 1).long(), flips


def resized_crop(image, box, flip, res, out=None):
    """One photo's crop box, resized to res x res (antialiased bilinear, as torchvision) and maybe flipped,
    written into `out` (uint8 3 x res x res, a slot of a batch) when given.

    image: uint8 3 x H x W (any strides). torch's vectorised uint8 resize kernel takes channels_last (2x
    faster than the CHW path of v2.RandomResizedCrop, measured): decoded images are HWC in memory, so a crop
    that is the whole of one is not copied; resizing a strided view instead of a copy of it costs more. The
    flip mirrors the res x res output, which equals mirroring the crop before the resize (the filter is
    symmetric; bit-identical where measured) and copies less. F.interpolate is what v2's resize calls for
    uint8 (the same pixels) without its per-call dispatch, and `out.copy_` is ~0.1 ms per image less than
    `batch[slot] = crop` (measured at res 224)."""
    top, left, height, width = box
    crop = image[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
    crop = F.interpolate(crop, size=(res, res), mode="bilinear", antialias=True)[0]
    crop = crop.flip(-1) if flip else crop
    return crop if out is None else out.copy_(crop)


def one_thread_pool(threads):
    """A thread pool whose threads run torch ops on one intra-op thread each, for work that the pool already
    spreads over the cores (resident's crops). With torch's OpenMP backend the intra-op count is per thread and
    a new thread takes the count set last: so it is 1 while the pool's threads start, then the caller's again.
    A pool thread with the caller's count opens an OpenMP team for each large-enough op (a crop's copy), so 2
    threads ran 4 on 2 cores, spinning at every barrier (docs/loaders.md). Other backends share one count
    across threads: they get a plain pool."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return ThreadPoolExecutor(threads)
    before = torch.get_num_threads()
    started = threading.Barrier(threads + 1)
    torch.set_num_threads(1)
    try:
        pool = ThreadPoolExecutor(threads, initializer=lambda: (torch.get_num_threads(), started.wait()))
        for _ in range(threads):  # a thread starts per task submitted while the others are busy
            pool.submit(int)
        started.wait()
    finally:
        torch.set_num_threads(before)
    return pool


def padded_canvas(photos):
    """uint8 3 x H x W photos of several sizes -> one float N x 3 x Hmax x Wmax canvas, each photo at its top
    left (zero padding, which batched_resized_crop's clamped coordinates never read)."""
    height, width = max(p.shape[1] for p in photos), max(p.shape[2] for p in photos)
    canvas = torch.zeros(len(photos), 3, height, width, device=photos[0].device)
    for k, photo in enumerate(photos):
        canvas[k, :, :photo.shape[1], :photo.shape[2]] = photo
    return canvas


def crop_coordinates(boxes, flips, res, device):
    """The photo coordinates (pixel centres at integers) that each output column (x) and row (y), N x res each,
    samples for the crop boxes resized to res x res, x mirrored where flipped; clamped to the box, as a resize
    of the cropped image clamps at its edges."""
    top, left, height, width = boxes.to(device=device, dtype=torch.float32).unbind(1)
    steps = (torch.arange(res, device=device, dtype=torch.float32) + 0.5) / res  # output pixel centres
    steps_x = torch.where(flips.to(device)[:, None], 1 - steps, steps)
    x = torch.minimum(torch.maximum(left[:, None] + steps_x * width[:, None] - 0.5, left[:, None]),
                      (left + width - 1)[:, None])
    y = torch.minimum(torch.maximum(top[:, None] + steps * height[:, None] - 0.5, top[:, None]),
                      (top + height - 1)[:, None])
    return x, y


def batched_resized_crop(canvas, boxes, flips, res, *, offsets, transposed=None, grid=None):
    """Every photo's crop box resized to res x res and maybe flipped, by one grid_sample (bilinear).

    canvas: float N x 3 x Hc x Wc holding photo k at rows/columns from offsets[k] = (y, x), stored transposed
    (rows = the photo's columns) where transposed[k]. boxes, flips: from sample_crops, in photo pixels. Each
    sample's box is an axis-aligned affine map, so the grid is written from one coordinate vector per output
    row and column (into `grid`, N x res x res x 2, when given): 4x less time than affine_grid on the CPU.
    Coordinates are clamped to the box, so the canvas's padding is never read. No antialiasing: this is the
    GPU path, where a crop is at most ~1.5x the output side at the resident store size."""
    device, (height_c, width_c) = canvas.device, canvas.shape[-2:]
    x, y = crop_coordinates(boxes, flips, res, device)
    oy, ox = offsets.to(device=device, dtype=torch.float32).unbind(1)

    def across(offset, coordinate, side):  # canvas pixels -> grid_sample's [-1, 1], align_corners=False
        return (offset[:, None] + coordinate + 0.5) * (2 / side) - 1

    grid = torch.empty(len(boxes), res, res, 2, device=device) if grid is None else grid[:len(boxes)]
    if transposed is None:
        grid[..., 0] = across(ox, x, width_c)[:, None, :]
        grid[..., 1] = across(oy, y, height_c)[:, :, None]
    else:  # a transposed photo's columns run down the canvas
        t = transposed.to(device)[:, None, None]
        grid[..., 0] = torch.where(t, across(ox, y, width_c)[:, :, None], across(ox, x, width_c)[:, None, :])
        grid[..., 1] = torch.where(t, across(oy, x, height_c)[:, None, :], across(oy, y, height_c)[:, :, None])
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="border", align_corners=False)
