"""Cross-backend agreement on the test split: dali, ffcv and torch give every sample, in id order, with the
same label, and pixels that match a PIL reference of the stored JPEG (resize shorter side to
test_resize(res) with PIL's antialiased bilinear filter, center crop res, normalise).

The backends are not bit-identical to that reference. Their decoders agree (DALI's CPU decode equals PIL's
on these files), but the geometry is rounded differently: DALI rounds the longer side after the resize
(94 px where PIL and torchvision floor to 93), a 1 % stretch along that axis; FFCV crops a whole-pixel
0.875 square first and shrinks it with OpenCV's INTER_AREA; and each library has its own antialiasing
filter. torchvision mirrors PIL and lands within a level.
Measured on the `ingested` fixture (6 test images, stored at 64 px, textured and noisy, the hard case for
resampling): mean absolute error over the split, in levels of the 0-255 scale after undoing the
normalisation, torch 0.0, dali 3.4, ffcv 4.8; worst single pixel 1, 56, 57. For scale, on the same images:
the right picture shifted by one pixel gives 9.8 and up to 144, flipped 38, not resized (crop only) 16.5,
resized to 56 instead of 55 px 4.8. So the bounds, MEAN_BOUND 7 and MAX_BOUND 80 levels, catch a flip,
a channel swap, a wrong or missing resize, a one-pixel misplaced crop and wrong normalisation, but not a
resize one pixel off: that is what the resamplers' own rounding looks like.

On the train split, the torch backend's own crop code is checked against torchvision's transforms, and the
dali backend's crop windows against torchvision's sampling and its ROI decode against PIL on the same windows.
With augment="none" every backend's train batches are the test transform, against the same PIL reference, and
with "flip" that transform mirrored or not.
"""
import gc
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import require, slow_backends
from ingest import layout
from loaders import make_loader
from loaders.common import IMAGENET_MEAN, IMAGENET_STD
from loaders.common import test_resize as shorter_side  # a test_ name would be collected as a test
from test_loaders import csv_labels

AGREEING = ["dali", "ffcv", "torch", "resident"]
RES = 48  # from the stored shorter side 64: resize to 55, then crop 48, a real downscale
MEAN_BOUND = 7.0  # levels, mean absolute error over the whole split
MAX_BOUND = 80.0  # levels, any one pixel and channel
TRAIN_MEAN_BOUND, TRAIN_MAX_BOUND = 1.0, 16.0  # the dali train path against PIL on the same window, see there

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")


def stored_jpegs(data_dir, split):
    """{sample id: JPEG bytes} read straight from the split's tar shards."""
    jpegs = {}
    for tar in layout.shard_paths(data_dir, split)[0]:
        with tarfile.open(tar) as archive:
            for member in archive:
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    jpegs[int(key)] = archive.extractfile(member).read()
    return jpegs


def pil_reference(jpeg, res):
    """The test transform done the plain way, uint8 res x res x 3."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    short = shorter_side(res)
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # torchvision's rounding
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - res) / 2)), int(round((size[1] - res) / 2))
    return np.asarray(image.crop((left, top, left + res, top + res)))


def levels(images):
    """Normalised NCHW float batch -> N x H x W x 3 on the 0-255 scale."""
    images = images.permute(0, 2, 3, 1).numpy()
    return images * np.array(IMAGENET_STD, dtype=np.float32) + np.array(IMAGENET_MEAN, dtype=np.float32)


@pytest.fixture(scope="module")
def reference(ingested):
    return {i: pil_reference(jpeg, RES).astype(np.float32) for i, jpeg in stored_jpegs(ingested, "test").items()}


@pytest.mark.parametrize("name", slow_backends(AGREEING))
def test_test_split_agrees_with_pil_reference(name, ingested, reference):
    require(name)
    loader = make_loader(name, ingested, "test", batch_size=4, res=RES, device="cpu", workers=1, with_ids=True)
    ids, labels, errors = [], [], []
    for images, batch_labels, batch_ids in loader:
        for i, image in zip(batch_ids.tolist(), levels(images)):
            errors.append(np.abs(image - reference[i]))
        ids += batch_ids.tolist()
        labels += batch_labels.tolist()
    truth = csv_labels(ingested, "test")
    assert ids == list(range(len(truth))) and labels == truth
    del loader
    gc.collect()  # FFCV's finalizers run here, under this module's warning filter
    errors = np.stack(errors)
    assert errors.mean() <= MEAN_BOUND and errors.max() <= MAX_BOUND, \
        f"{name}: mean abs error {errors.mean():.2f} levels, max {errors.max():.0f}"


def torch_train_crops(ingested, res):
    """(TrainCrop's crop, v2.RandomResizedCrop + v2.RandomHorizontalFlip's crop, whether the box allowed a
    reduced decode) for each stored train JPEG, both from the same random draws."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from loaders.common import RRC_RATIO, RRC_SCALE
    from loaders.torch_loader import TrainCrop

    reference = v2.Compose([v2.RandomResizedCrop(res, scale=RRC_SCALE, ratio=RRC_RATIO, antialias=True),
                            v2.RandomHorizontalFlip()])
    crop = TrainCrop(res)
    for seed, jpeg in enumerate(stored_jpegs(ingested, "train").values()):
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
        torch.manual_seed(seed)
        box = v2.RandomResizedCrop.get_params(image, RRC_SCALE, RRC_RATIO)
        torch.manual_seed(seed)
        ours = crop(data, *image.shape[1:])
        torch.manual_seed(seed)
        theirs = reference(image)
        assert ours.shape == theirs.shape == (3, res, res)
        yield ours.int(), theirs.int(), min(box[2], box[3]) >= 2 * res


def test_torch_train_crops_are_torchvisions(ingested):
    """Where the box is under twice the output side (always, at RES from 64 px), TrainCrop decodes the box
    alone (the full decode's pixels there) and gives the pixels of torchvision's transforms from the same
    draws, within a level."""
    for ours, theirs, reduced in torch_train_crops(ingested, RES):
        assert not reduced
        assert (ours - theirs).abs().max() <= 1  # the same box, flip and resampling filter


@pytest.mark.parametrize("roi", [True, False])  # False: a stack without nvImageCodec (no DALI)
def test_torch_roi_decode_is_the_full_decode_in_its_box(roi, ingested, monkeypatch):
    """decode_region (libjpeg-turbo's crop and skip of scanlines) gives exactly decode's pixels in the box, for
    boxes at the corners, edges and odd offsets and the whole photo."""
    import torch

    from loaders import torch_loader
    from loaders.torch_loader import decode, decode_region

    if roi:
        pytest.importorskip("nvidia.nvimgcodec")
    else:
        monkeypatch.setattr(torch_loader, "region_codec", lambda: None)

    for jpeg in list(stored_jpegs(ingested, "train").values())[:12]:
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        full = decode(data)
        _, H, W = full.shape
        for top, left, h, w in [(0, 0, H, W), (0, 0, 1, 1), (H - 9, W - 13, 9, 13), (1, 3, H // 2 + 1, W - 5),
                                (H // 3, W // 3, H // 3, W // 3), (5, 0, 17, W), (0, 7, H, 19)]:
            region = decode_region(data, (top, left, h, w))
            assert region.shape == (3, h, w)
            assert torch.equal(region, full[:, top:top + h, left:left + w]), (top, left, h, w)


REDUCED_MEAN_BOUND = 3.0  # levels, mean absolute error over the crops that took the reduced decode
REDUCED_CROP_BOUND = 8.0  # levels, mean absolute error of any one such crop


def test_torch_reduced_decode_crops_stay_close_to_torchvisions(ingested):
    """At res 16 from 64 px most boxes are >= 2x the output side, so libjpeg-turbo decodes at 1/2 or 1/4 scale
    in the IDCT before the resize. That is not the full decode resized, so the pixels differ a little: on
    the fixture's noisy photos 1.6 levels on average, 3.7 for the worst crop, single pixels up to 21; on the
    demo's photos at res 16-100, 0.75-1.2 on average (measured). The same crops flipped the wrong way differ
    by 31 levels on average, and a wrong box, channel order or scale by more still."""
    errors = [(ours - theirs).abs().float().mean() for ours, theirs, reduced in torch_train_crops(ingested, 16)
              if reduced]
    assert len(errors) > 20  # the reduced decode did run
    errors = np.array(errors)
    assert errors.mean() <= REDUCED_MEAN_BOUND and errors.max() <= REDUCED_CROP_BOUND, (errors.mean(), errors.max())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_gpu_decode_keeps_memory_that_queued_work_still_reads(ingested):
    """pytorch/vision PR #9606: nvJPEG (hardware engine, seen on H100) can write its outputs, which come from
    blocks just freed on the caller's stream, before kernels queued there have read them. decode_jpegs_on_gpu
    drains the stream first: reductions queued before the decode give their exact values, and the decoded
    images are the CPU decode's (nvJPEG's IDCT differs from libjpeg-turbo's by a level or two)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from loaders.torch_loader import decode_jpegs_on_gpu

    jpegs = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in stored_jpegs(ingested, "train").values()]
    cpu = [decode_jpeg(j, mode=ImageReadMode.RGB) for j in jpegs]
    device = torch.device("cuda")
    slow = torch.randn(2048, 2048, device=device)
    for _ in range(20):
        filled = [torch.full((image.numel(),), 7, dtype=torch.uint8, device=device) for image in cpu]
        torch.cuda.synchronize()
        for _ in range(20):  # ~tens of ms queued ahead of the reductions
            slow = slow @ slow / 2048
        sums = [t.sum(dtype=torch.int64) for t in filled]
        del filled  # freed while the reductions are queued: the decoder's outputs may reuse these blocks
        decoded = decode_jpegs_on_gpu(jpegs, device)
        assert [int(s) for s in sums] == [7 * image.numel() for image in cpu]
        for gpu_image, cpu_image in zip(decoded, cpu):
            assert (gpu_image.cpu().int() - cpu_image.int()).abs().float().mean() < 1.0


def test_dali_crop_windows_are_torchvisions_random_resized_crop():
    """The dali backend draws its crop windows itself (loaders.dali.crop_windows): over many draws the area
    share and aspect match torchvision's get_params, every window lies inside its image, and an image no
    draw fits gets torchvision's fallback (the central crop, aspect clamped) exactly."""
    require("dali")  # loaders.dali imports DALI
    import torch
    from torchvision.transforms import RandomResizedCrop

    from loaders.common import RRC_RATIO, RRC_SCALE
    from loaders.dali import crop_windows

    n, (width, height) = 4000, (300, 200)
    anchors, sizes = crop_windows(np.full(n, width), np.full(n, height), np.random.default_rng(0))
    assert (anchors >= 0).all() and (anchors + sizes <= (width, height)).all() and (sizes > 0).all()
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), RRC_SCALE, RRC_RATIO)
                       for _ in range(n)])[:, [3, 2]]  # (top, left, h, w) -> (w, h)
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    for stat in (lambda s: s[:, 0] * s[:, 1] / (width * height), lambda s: np.log(s[:, 0] / s[:, 1])):
        assert np.abs(np.quantile(stat(sizes), quantiles) - np.quantile(stat(theirs), quantiles)).max() < 0.05
    anchors, sizes = crop_windows(np.array([1000, 10]), np.array([10, 1000]), np.random.default_rng(0))
    for (x, y), (w, h), (W, H) in zip(anchors, sizes, [(1000, 10), (10, 1000)]):
        top, left, th, tw = RandomResizedCrop.get_params(torch.empty(3, H, W), RRC_SCALE, RRC_RATIO)
        assert (x, y, w, h) == (left, top, tw, th)


def pil_train_reference(jpeg, window, flip, res):
    """A train crop done the plain way: decode all, crop the window, resize with PIL's antialiased bilinear."""
    (x, y), (w, h) = window
    image = Image.open(io.BytesIO(jpeg)).convert("RGB").crop((x, y, x + w, y + h)).resize((res, res), Image.BILINEAR)
    return np.asarray(image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image)


def test_dali_train_roi_decode_agrees_with_pil_reference(ingested):
    """The dali train path decodes only each crop window (ROI decode) and resizes it: against decoding the whole
    JPEG with PIL, cropping the same window (from the loader's own plan) and resizing. Measured here: mean
    0.17 levels, worst pixel 3 (both resize an integer window with an antialiased bilinear filter). The
    reference's own window moved and narrowed by one pixel gives mean 3.1, a wrong flip 34: the bounds, mean 1
    and worst pixel 16, catch both."""
    require("dali")
    loader = make_loader("dali", ingested, "train", batch_size=16, res=RES, device="cpu", workers=1,
                         with_ids=True)
    loader.set_epoch(3)
    positions, (anchors, sizes, flips) = loader.plan()
    jpegs, errors, seen = stored_jpegs(ingested, "train"), [], []
    for images, _, ids in loader:
        for i, image in zip(ids.tolist(), levels(images)):
            k = len(seen)
            seen.append(i)
            reference = pil_train_reference(jpegs[i], (anchors[k], sizes[k]), flips[k], RES)
            errors.append(np.abs(image - reference.astype(np.float32)))
    assert seen == loader.samples.ids[positions].tolist()
    errors = np.stack(errors)
    assert errors.mean() <= TRAIN_MEAN_BOUND and errors.max() <= TRAIN_MAX_BOUND, \
        f"dali train: mean abs error {errors.mean():.2f} levels, max {errors.max():.0f}"


# ---------------------------------------------------------------- augment="none" and "flip" on the train split

def train_epochs(name, data_dir, augment, epochs, device="cpu"):
    """[(ids in the order they came, {sample id: image in levels})] of each train epoch in `epochs`."""
    loader = make_loader(name, data_dir, "train", batch_size=16, res=RES, device=device, workers=1, augment=augment,
                         with_ids=True)
    seen = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        order, images = [], {}
        for batch, _, ids in loader:
            for i, image in zip(ids.tolist(), levels(batch.cpu())):
                order.append(i)
                images[i] = image.copy()  # loaders reuse their buffers
        seen.append((order, images))
    del loader
    gc.collect()  # FFCV's finalizers run here, under this module's warning filter
    return seen


NONE_EXACT = {"torch": 1.01, "resident": 1.01}  # worst pixel, levels (+ float error of undoing the normalisation)


@pytest.mark.slow
@pytest.mark.parametrize("name", slow_backends(AGREEING + ["folder"]))
def test_train_split_without_augmentation_is_the_test_transform_and_flip_only_mirrors_it(name, ingested):
    """augment="none" has no randomness but the order: two epochs give the very same tensors per sample id, in
    another order, and those are the test transform of the stored JPEG (the PIL reference): torch and resident
    within a level everywhere (measured: worst pixel 1, mean 0.00), dali and ffcv within the test split's mean
    bound (measured: 2.6 and 5.1 levels; their worst pixels, 95 and 99, sit where their geometry rounds
    differently, see the module docstring, so only the mean is bounded, which catches a flip or a one-pixel
    shift). folder reads the original photos, not the stored JPEGs: only its own consistency is checked.
    augment="flip" gives, per sample, exactly none's image or exactly its mirror, each about half the time.
    One test per backend: FFCV compiles each loader for seconds."""
    require(name)
    (order, none), (order_1, none_1) = train_epochs(name, ingested, "none", (0, 1))
    assert sorted(order) == sorted(order_1) == list(range(len(csv_labels(ingested, "train")))) and order != order_1
    assert all(np.array_equal(none[i], none_1[i]) for i in order)
    if name != "folder":
        references = {i: pil_reference(jpeg, RES).astype(np.float32)
                      for i, jpeg in stored_jpegs(ingested, "train").items()}
        errors = np.stack([np.abs(none[i] - references[i]) for i in order])
        assert errors.mean() <= MEAN_BOUND and errors.max() <= NONE_EXACT.get(name, 255), \
            f"{name} none: mean abs error {errors.mean():.2f} levels, max {errors.max():.0f}"
    [(_, flip)] = train_epochs(name, ingested, "flip", (0,))
    mirrored = [np.array_equal(flip[i], none[i][:, ::-1]) for i in order]
    assert all(m or np.array_equal(flip[i], none[i]) for i, m in zip(order, mirrored))
    assert 0.25 < np.mean(mirrored) < 0.75  # a fair coin over ~65 samples


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["torch", "resident"])
def test_gpu_paths_without_augmentation_match_the_cpu_and_flip_only_mirrors(name, ingested):
    """On a GPU, torch decodes with nvJPEG and resizes each image on the device, resident gathers from crops cut
    on the device: none gives the CPU path's images (nvJPEG's IDCT differs from libjpeg-turbo's by a level or
    two: mean under 1 level), and flip exactly those or their mirrors."""
    require(name)
    [(order, gpu)] = train_epochs(name, ingested, "none", (0,), device="cuda")
    [(_, cpu)] = train_epochs(name, ingested, "none", (0,))
    assert np.mean([np.abs(gpu[i] - cpu[i]).mean() for i in order]) < 1.0
    [(_, flip)] = train_epochs(name, ingested, "flip", (0,), device="cuda")
    mirrored = [np.array_equal(flip[i], gpu[i][:, ::-1]) for i in order]
    assert all(m or np.array_equal(flip[i], gpu[i]) for i, m in zip(order, mirrored)) and 0 < np.mean(mirrored) < 1
