"""The resident loader's own promises (loaders/resident.py), beyond what tests/test_loaders.py checks of every
backend: augmentation determined by (seed, epoch), a batched RandomResizedCrop that samples what torchvision's
does, a test path that is the PIL resize + center crop, the memory guard, and the disk cache.

Loaders here use workers=0 (the decode runs in-process: tiny data, no worker start-up) and cache=False unless
the cache is what is tested, so the shared `ingested` fixture stays as it was.
"""
import io
import json
import math
import shutil

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cli import UsageError
from ingest import layout
from loaders import common, make_loader, resident
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE
from loaders.tvision import ShardSamples


def loader(data_dir, split, res=32, **options):
    options = {"cache": False, "workers": 0, "batch_size": 16, "seed": 0, **options}
    return make_loader("resident", data_dir, split, res=res, device="cpu", with_ids=True, **options)


def epoch(resident_loader, number):
    resident_loader.set_epoch(number)
    # images are views of the loader's reused buffers (loaders.common): keep copies
    images, labels, ids = zip(*((images.clone(), labels, ids) for images, labels, ids in resident_loader))
    return torch.cat(images), torch.cat(labels), torch.cat(ids)


def test_augmentation_and_order_follow_seed_and_epoch(ingested):
    first = loader(ingested, "train")
    e0, e1 = epoch(first, 0), epoch(first, 1)
    again = epoch(loader(ingested, "train"), 0)
    assert torch.equal(e0[0], again[0]) and torch.equal(e0[2], again[2])  # same crops, flips and order
    assert sorted(e0[2].tolist()) == sorted(e1[2].tolist()) == list(range(first.num_samples))
    assert not torch.equal(e0[2], e1[2])
    other_seed = epoch(loader(ingested, "train", seed=1), 0)
    assert not torch.equal(e0[2], other_seed[2])


def test_batched_crops_sample_like_random_resized_crop():
    """Crop a coordinate ramp: each output's corners tell the box it came from, and the flip."""
    size, res, n = 64, 16, 400
    ramp = torch.arange(size, dtype=torch.float32) + 0.5
    images = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.zeros(size, size)])
    out = resident.random_resized_crop_flip(images.expand(n, 3, size, size), res, torch.Generator().manual_seed(0))
    x, y = out[:, 0], out[:, 1]
    step_x = (x[:, 0, -1] - x[:, 0, 0]) / (res - 1)  # source pixels per output pixel, signed by the flip
    step_y = (y[:, -1, 0] - y[:, 0, 0]) / (res - 1)
    width, height = step_x.abs() * res, step_y * res  # the crop box in source pixels
    flipped = (step_x < 0).float().mean()
    assert 0.4 < flipped < 0.6
    area = width * height / size ** 2
    assert area.min() > RRC_SCALE[0] * 0.95 and area.max() < RRC_SCALE[1] * 1.05
    ratio = width / height
    assert ratio.min() > RRC_RATIO[0] * 0.97 and ratio.max() < RRC_RATIO[1] * 1.03
    assert math.log(ratio.max() / ratio.min()) > 0.9 * math.log(RRC_RATIO[1] / RRC_RATIO[0])  # spans the range
    assert area.max() - area.min() > 0.7  # spans the scale range, not a fixed crop
    left = torch.minimum(x[:, 0, 0], x[:, 0, -1]) - step_x.abs() / 2
    assert left.min() >= -0.01 and (left + width).max() <= size + 0.01  # boxes stay inside the image


@pytest.mark.parametrize("res", [56, 28, 32])  # S = 64: no resize; 32: a 2x downscale; 37: odd S - res
def test_test_path_is_pil_resize_and_center_crop(ingested, res):
    """Against PIL on the stored JPEG. Tolerance: torchvision's antialiased bilinear resize is PIL's filter,
    rounded differently, and both decode with libjpeg-turbo: 1 level of 255 at most was seen, so <= 3 leaves
    room for other library builds. A crop 1 px off would cost ~6 levels on average, far above the mean bound."""
    images, labels, ids = epoch(loader(ingested, "test", res=res), 0)
    samples = ShardSamples(ingested, "test")
    reference = T.Compose([T.Resize(common.test_resize(res)), T.CenterCrop(res), T.PILToTensor()])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert ids.tolist() == list(range(len(samples)))
    assert torch.equal(labels, samples.labels)
    for position in range(len(samples)):
        pil = Image.open(io.BytesIO(samples.read(position).numpy().tobytes())).convert("RGB")
        diff = (images[position] * std + mean - reference(pil).float()).abs()
        assert diff.mean() < 0.1 and diff.max() <= 3, (position, diff.mean(), diff.max())


def test_memory_guard_refuses_before_decoding(ingested, monkeypatch):
    monkeypatch.setattr(resident, "decode_split", lambda *a, **k: pytest.fail("decoded despite the guard"))
    with pytest.raises(UsageError, match=r"needs [\d,]+ MB .* 0 MB free: use a smaller --res"):
        loader(ingested, "train", res=224, memory_limit=100_000)


def test_disk_cache_is_reused_then_invalidated_by_a_new_manifest(ingested, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))  # other tests' caches
    first = loader(data, "test", cache=True)
    assert not first.from_cache and len(list(data.glob("resident-test-*.pt"))) == 1
    decode = resident.decode_split
    monkeypatch.setattr(resident, "decode_split", lambda *a, **k: pytest.fail("decoded despite the cache"))
    second = loader(data, "test", cache=True)
    assert second.from_cache and torch.equal(second.images, first.images)
    assert torch.equal(epoch(second, 0)[0], epoch(first, 0)[0])

    manifest = layout.read_manifest(data)
    manifest["note"] = "ingested again"
    (data / layout.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(resident, "decode_split", decode)
    assert not loader(data, "test", cache=True).from_cache  # stale: decoded again and rewritten
    assert loader(data, "test", cache=True).from_cache
    assert loader(data, "test", res=24, cache=True).from_cache is False  # another size, another file
    (cached,) = data.glob(f"resident-test-{common.test_resize(32)}px-*.pt")
    cached.write_bytes(cached.read_bytes()[:1000])  # a run killed mid-copy, say
    assert not loader(data, "test", cache=True).from_cache


def test_resident_images_are_s_by_s_channels_last_uint8(ingested):
    resident_loader = loader(ingested, "test", res=32)
    size = common.test_resize(32)
    assert resident_loader.images.shape[1:] == (3, size, size) and resident_loader.images.dtype == torch.uint8
    assert resident_loader.images.is_contiguous(memory_format=torch.channels_last)
    assert resident_loader.images.float().std() > 5  # decoded photos, not an empty buffer
