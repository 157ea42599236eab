"""What every loader backend shares: the batch contract, normalisation constants, device choice and the
split of sample ids across ranks.

Every backend yields `(images, labels)`: images float32 NCHW (channels_last memory format), normalised
with the ImageNet mean/std, on the loader's device; labels int64 on the same device. Train batches are
RandomResizedCrop(res) + random horizontal flip, reshuffled every epoch from (seed, epoch); test batches
are resize(shorter side = res / 0.875) + center crop(res), each of this rank's samples exactly once, in
id order, last batch partial. Train epochs also give each of this rank's samples exactly once (last batch
partial). The order of an epoch is a function of (seed, epoch) alone, where epoch is the last value given
to set_epoch (default 0): iterating twice without set_epoch repeats the order, like DistributedSampler.

Option `with_ids=True` (a check for tests and debugging, not the hot path) makes a backend yield
`(images, labels, ids)`, ids being int64 sample ids (row numbers of `<split>.csv`) on the CPU, so that tests
can see which samples came out rather than infer it.

Labels and ids belong to the caller; on the CPU images may be views of a loader's buffers that it rewrites
a few batches later (a fresh buffer per batch costs more than filling it; see Normalizer): clone images to
keep them.
"""
import numpy as np
import torch

from cli import UsageError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # on the 0-255 scale the decoders produce
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
TEST_CROP_RATIO = 0.875  # resize shorter side to res / 0.875, then center-crop res (the usual ImageNet eval)
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop area share and aspect ratio, torchvision's defaults
RRC_RATIO = (3 / 4, 4 / 3)


def test_resize(res):
    """Shorter side before the center crop of the test path."""
    return round(res / TEST_CROP_RATIO)


def epoch_seed(seed, epoch):
    """A 31-bit seed for one epoch, hashed from (seed, epoch): seed + epoch would repeat across runs."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


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
    reuses memory, so every batch gets its own."""

    def __init__(self, device, ring=3):
        self.device, self.ring = torch.device(device), ring
        self._buffers, self._turn, self._rows = [], 0, {}

    def _output(self, shape):
        if self.device.type != "cpu":
            return torch.empty(shape, device=self.device, memory_format=torch.channels_last)
        n, rest = shape[0], tuple(shape[1:])
        if self._buffers and (len(self._buffers[0]) < n or self._buffers[0].shape[1:] != rest):
            self._buffers = []
        if len(self._buffers) < self.ring:
            self._buffers.append(torch.empty(shape, memory_format=torch.channels_last))
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
        n, c, h, w = images.shape
        out = self._output(images.shape)
        out.permute(0, 2, 3, 1).copy_(images.permute(0, 2, 3, 1))  # cast + layout in one pass
        rows = out.permute(0, 2, 3, 1).view(n * h, w * c)  # a view: out is channels_last
        scale, shift = self._constants(w)
        torch.addcmul(shift, rows, scale, out=rows)
        return out


class EpochSampler(torch.utils.data.Sampler):
    """This rank's sample positions: shuffled from (seed, epoch) for train, in order for test.

    A Sampler (rather than a list) so one DataLoader with persistent workers serves every epoch: the order is
    drawn in the main process when an epoch starts, after `set_epoch`."""

    def __init__(self, positions, seed, shuffle):
        self.positions, self.seed, self.shuffle, self.epoch = torch.as_tensor(list(positions)), seed, shuffle, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.positions)

    def __iter__(self):
        if not self.shuffle:
            return iter(self.positions.tolist())
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(self.positions[torch.randperm(len(self.positions), generator=gen)].tolist())
