"""`torch` backend: torchvision alone over the ingested webdataset shards, no DALI or FFCV needed.

(Not named loaders/torch.py: `from loaders import torch`, or any import of that submodule, would rebind the
name `torch` in the importing namespace, the loaders package's included, to this module instead of PyTorch.)

The shards' DALI index files give the byte offset of each JPEG (ingest.shards.ShardIndex), so a map-style
Dataset reads any sample with one pread and the per-epoch order is an ordinary Sampler. On the CPU,
DataLoader workers decode with libjpeg-turbo (torchvision.io.decode_jpeg; a train crop only its own region, see
TrainCrop) and crop with torchvision.transforms.v2 on uint8 tensors; with a GPU the workers only read bytes,
decode_jpeg(device="cuda") decodes a whole batch with nvJPEG (after
draining the caller's stream: see decode_jpegs_on_gpu) and one grid_sample crops the batch (no per-image
kernels; the crop boxes follow torchvision's distribution, drawn from (seed, epoch): loaders.common). The
test transform (the test split, and train with augment flip or none) resizes with antialiasing image by
image on the GPU too: photos differ in size, and grid_sample does not antialias.
Normalisation always runs on the loader's device, after the (small, uint8) batch got there.

Ranks get a contiguous block of shard positions (loaders.common.rank_ids), as DALI's shard_id/num_shards.
"""
import functools
import io
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2

from ingest.shards import ShardIndex
from loaders.base import Loader
from loaders.common import (RRC_RATIO, RRC_SCALE, EpochSampler, Normalizer, PerRes, WorkerLoader,
                            batched_resized_crop, drawing_from, epoch_seed, padded_canvas, random_flips, resized_crop,
                            sample_crops, sample_seed, test_resize, undecodable)


READS = ("webdataset",)  # the formats loaders.base.prepare checks at start-up


def build(block, *, batch_size, res, seed, workers, augment, with_ids=False):
    """A torchvision loader over `<split>-*.tar` for this rank's block of samples."""
    # With a GPU the workers hand over JPEG bytes and the GPU decodes and crops, else the workers do it all.
    on_gpu = block.device.type == "cuda"
    transform = None if on_gpu else PerRes(functools.partial(image_transform, augment), res)
    samples = ShardSamples(ShardIndex(block.data_dir, block.split), transform, block.manifest_sha256)
    return TorchLoader(block, samples, augment=augment, batch_size=batch_size, res=res, seed=seed, workers=workers,
                       with_ids=with_ids)


def image_transform(augment, res):
    """(JPEG bytes, stored height, width) -> uint8 3 x res x res, as `augment` says (loaders.common)."""
    return TrainCrop(res) if augment == "rrc" else TestCrop(res, flip=augment == "flip")


def decode(data):
    """JPEG bytes (uint8 tensor) -> uint8 3 x H x W, libjpeg-turbo through torchvision.io."""
    return decode_jpeg(data, mode=ImageReadMode.RGB)


@functools.cache
def region_codec():
    """nvImageCodec (DALI's dependency), imported on first use rather than with this module (importing a loader
    changes nothing), its log silenced (read at its import: a photo that fails is our one line, not its log);
    None on a stack without DALI (the GPU machine's, .ci/compat), where decode_region decodes the whole photo."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    return nvimgcodec


@functools.cache
def roi_decoder(pid):
    """This process's nvImageCodec decoder, CPU only (libjpeg-turbo) and in the calling thread, and its
    parameters: one per pid, as a forked DataLoader worker must not use its parent's."""
    nvimgcodec = region_codec()
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False,  # as decode_jpeg: stored photos are upright
                                     color_spec=nvimgcodec.ColorSpec.SRGB, sample_format=nvimgcodec.SampleFormat.I_RGB)
    return nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                              backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)]), params


def decode_region(data, box):
    """The (top, left, height, width) box of JPEG bytes (uint8 tensor) -> uint8 3 x height x width (HWC in
    memory, as decode's images), the pixels of decode(data) in that box.

    libjpeg-turbo skips the rows above the box (jpeg_skip_scanlines: entropy-decoded, no IDCT), decodes only
    the box's columns (jpeg_crop_scanline) and stops after its last row; torchvision.io has no such call and
    this machine's libturbojpeg (2.1) lacks tj3SetCroppingRegion, so the call is nvImageCodec's (a dependency
    of DALI, its libjpeg-turbo 3.1 linked in; without it, the whole photo is decoded and cut). Damage outside
    the box goes unseen, as with DALI's ROI decode. Raises RuntimeError where the bytes do not decode."""
    top, left, height, width = box
    nvimgcodec = region_codec()
    if nvimgcodec is None:
        return decode(data)[:, top:top + height, left:left + width]
    stream = nvimgcodec.CodeStream(data.numpy()).get_sub_code_stream(
        region=nvimgcodec.Region(start=(top, left), end=(top + height, left + width)))
    decoder, params = roi_decoder(os.getpid())
    image = decoder.decode(stream, params=params)
    if image is None:
        raise RuntimeError("the JPEG does not decode")
    return torch.from_numpy(np.asarray(image.cpu())).permute(2, 0, 1)  # the array holds the Image's buffer


class TestCrop:
    """Resize the shorter side to test_resize(res), center crop res: the other backends' test transform; with
    `flip`, then a random horizontal flip (drawn from torch's default generator, which ShardSamples seeds)."""

    def __init__(self, res, flip=False):
        self.transform = v2.Compose([v2.Resize(test_resize(res), antialias=True), v2.CenterCrop(res),
                                     *([v2.RandomHorizontalFlip()] if flip else [])])

    def __call__(self, data, height, width):
        return self.transform(decode(data))


class TrainCrop:
    """RandomResizedCrop(res) + random horizontal flip of one stored JPEG, decoding only what the crop needs.

    The box and flip are torchvision's draws (RandomResizedCrop.get_params) on the stored size, known from
    `<split>.csv` before decoding. Where the box is at least twice the output side both ways, libjpeg-turbo
    decodes at 1/2, 1/4 or 1/8 scale inside the IDCT (PIL's draft: a quarter of the pixels or fewer) and PIL
    resizes the box from that (antialiased bilinear, the box in fractional pixels of the reduced image). Else
    libjpeg-turbo decodes the box alone (decode_region: the pixels of the full decode there; 0.54 ms of CPU
    per image instead of 0.67 at the seed's 256 px, docs/loaders.md) and loaders.common.resized_crop resizes
    it. The reduced decode is not the full decode resized: tests/test_loaders_agreement.py bounds the
    difference."""

    def __init__(self, res):
        self.res = res

    def __call__(self, data, height, width):
        # get_params reads only the size: a zero-channel tensor carries it without pixels
        box = RandomResizedCrop.get_params(torch.empty(0, height, width), RRC_SCALE, RRC_RATIO)
        flip = bool(torch.rand(1) < 0.5)
        if min(box[2], box[3]) >= 2 * self.res:
            return self.reduced_decode_crop(data, box, flip)
        return resized_crop(decode_region(data, box), (0, 0, *box[2:]), flip, self.res)

    def reduced_decode_crop(self, data, box, flip):
        top, left, height, width = box
        photo = Image.open(io.BytesIO(data.numpy()))
        full_width = photo.size[0]
        # the largest DCT reduction that keeps the box at least res px both ways
        photo.draft("RGB", (-(-photo.size[0] * self.res // width), -(-photo.size[1] * self.res // height)))
        scale = round(full_width / photo.size[0])
        crop = photo.convert("RGB").resize((self.res, self.res), Image.BILINEAR, box=(
            left / scale, top / scale, (left + width) / scale, (top + height) / scale))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(crop)).permute(2, 0, 1)  # HWC in memory, as decode_jpeg's images


class ShardSamples(Dataset):
    """The samples of a ShardIndex (ingest.shards) as a map-style Dataset: item -> (`transform(JPEG bytes,
    stored height, stored width)`, label, sample id), or the JPEG bytes themselves when transform is None."""

    def __init__(self, index, transform, started_with=None):
        self.index, self.transform, self.started_with = index, transform, started_with  # see undecodable
        self.labels, self.ids = torch.from_numpy(index.labels), torch.from_numpy(index.ids)
        self.sizes = np.stack([index.heights, index.widths], 1).tolist()

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        """item: a position, or (position, epoch key) from a train EpochSampler."""
        position, key = item if isinstance(item, tuple) else (item, None)
        try:
            data = torch.frombuffer(self.index.read(position), dtype=torch.uint8)
            if self.transform is not None:
                if key is None:
                    data = self.transform(data, *self.sizes[position])
                else:  # loaders.common.sample_seed: the same draws in any worker, after a resume too
                    with drawing_from(sample_seed(key, int(self.ids[position]))):
                        data = self.transform(data, *self.sizes[position])
        except (RuntimeError, OSError):  # a shard cut short, or what torchvision's and PIL's JPEG decoders raise
            raise undecodable(self.index.data_dir, self.index.split, int(self.ids[position]),
                              self.index.tar(position), self.started_with) from None
        return data, self.labels[position], self.ids[position]


def decode_jpegs_on_gpu(data, device):
    """nvJPEG decode of a list of JPEG byte tensors, safe on Hopper.

    torchvision (0.26-0.29) allocates the outputs on the caller's current stream but decodes on a private
    pooled stream that does not wait for it, and nvJPEG's hardware engine may write before work queued on the
    caller's stream has run: blocks that queued kernels still read get overwritten (pytorch/vision PR #9606,
    seen on H100/H200). Draining the caller's stream first closes that window; torchvision already makes the
    current stream wait for the decode afterwards."""
    torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def collate_images(batch):
    """Stack uint8 CHW images into one channels_last batch. decode_jpeg's and TrainCrop's images are HWC in
    memory, so stacking them as HWC is a plain copy, where torch.stack of the CHW views transposes every
    image (0.25 ms each, measured)."""
    images, labels, ids = zip(*batch)
    return default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2), \
        torch.stack(labels), torch.stack(ids)


def collate_bytes(batch):
    """Keep JPEG byte strings as a list (they differ in length) for one batched GPU decode."""
    data, labels, ids = zip(*batch)
    return list(data), torch.stack(labels), torch.stack(ids)


class TorchLoader(Loader):
    """A DataLoader over ShardSamples: its workers decode and crop on the CPU; with a GPU they read bytes only."""

    def __init__(self, block, samples, *, augment, batch_size, res, seed, workers, with_ids):
        super().__init__(block, batch_size=batch_size, seed=seed, with_ids=with_ids)
        self.res, self.test_transform, self.augment = res, TestCrop(res).transform, augment
        self.sampler = EpochSampler(block.positions, seed, shuffle=self.train, keyed=True)
        self.normalize = Normalizer(self.device)
        on_gpu = self.device.type == "cuda"
        self.loader = WorkerLoader(
            samples, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_bytes if on_gpu else collate_images, pin_memory=on_gpu,
            persistent_workers=workers > 0,  # workers start once, not every epoch
            generator=torch.Generator().manual_seed(seed))  # the workers' base seed leaves the caller's RNG alone

    def set_res(self, res):
        """The CPU workers' transform reads res from shared memory (no restart); the GPU path crops here."""
        self.res, self.test_transform = res, TestCrop(res).transform
        if self.loader.dataset.transform is not None:
            self.loader.dataset.transform.set_res(res)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)  # the DataLoader draws this pass's order from it
        generator = None
        if self.device.type == "cuda" and self.augment != "none":  # crops, flips drawn on the GPU from (seed, epoch)
            generator = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, self.epoch))
        for data, labels, ids in self.loader:
            if self.device.type != "cuda":
                images = data.to(self.device, non_blocking=True)
            elif self.augment == "rrc":
                images = crop_on_gpu(decode_jpegs_on_gpu(data, self.device), self.res, generator)
            else:  # the test transform resizes with antialiasing, image by image
                images = torch.stack([self.test_transform(image) for image in decode_jpegs_on_gpu(data, self.device)])
                images = random_flips(images, generator) if self.augment == "flip" else images
            yield self.batch(self.normalize(images), labels.to(self.device, non_blocking=True), ids)


def crop_on_gpu(decoded, res, generator):
    """A list of decoded uint8 photos (sizes differ) -> float N x 3 x res x res RandomResizedCrop + flip: the
    photos are copied into one zero-padded canvas (one copy each), then one grid_sample crops them all."""
    canvas = padded_canvas(decoded)
    sizes = torch.tensor([image.shape[1:] for image in decoded]).to(canvas.device, non_blocking=True)
    boxes, flips = sample_crops(sizes[:, 0], sizes[:, 1], generator)
    return batched_resized_crop(canvas, boxes, flips, res, offsets=torch.zeros_like(boxes[:, :2]))
