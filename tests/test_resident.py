"""The resident loader's own promises (loaders/resident.py), beyond what tests/test_loaders.py checks of every
backend: augmentation determined by (seed, epoch), a batched RandomResizedCrop that samples what torchvision's
does, a test path that is the PIL resize + center crop, the memory guard, and the disk cache.

Loaders here use workers=0 (the decode runs in-process: tiny data, no worker start-up) and cache=False unless
the cache is what is tested, so the shared `ingested` fixture stays as it was.
"""
import io
import shutil
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cli import UsageError
from ingest import layout
from ingest.shards import ShardIndex
from loaders import common, make_loader, resident, torch_loader
from loaders.base import Block
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, RRC_RATIO, RRC_SCALE, Normalizer


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


RAMP_SIZES = [(64, 112), (112, 64), (64, 80), (64, 250)]  # photo (height, width): 16:9 both ways up, 5:4, and
# 1:3.9, where torchvision's fallback (the centre, aspect clamped) takes ~1 crop in 5


def ramp(height, width):
    """uint8 photo whose channel 0 is each pixel's column and channel 1 its row."""
    x, y = torch.arange(width).expand(height, width), torch.arange(height)[:, None].expand(height, width)
    return torch.stack([x, y, torch.zeros_like(x)]).to(torch.uint8)


def crop_boxes(images, res):
    """(left, top, width, height, flipped) of each output crop of a ramp photo, read back from its pixels:
    inside the crop a linear ramp stays linear under both resamplers (their edges clamp, so read 2 px in)."""
    levels = images * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    x, y = levels[:, 0, res // 2], levels[:, 1, :, res // 2]
    a, b = 2, res - 3
    step_x, step_y = (x[:, b] - x[:, a]) / (b - a), (y[:, b] - y[:, a]) / (b - a)
    flipped = step_x < 0
    width, height = step_x.abs() * res, step_y * res
    left = torch.where(flipped, x[:, a] - (res - a - 0.5) * width / res, x[:, a] - (a + 0.5) * width / res) + 0.5
    top = y[:, a] - (a + 0.5) * height / res + 0.5
    return left, top, width, height, flipped


def torchvision_boxes(size, draws):
    torch.manual_seed(0)
    image = torch.empty(3, *size)
    boxes = torch.tensor([T.RandomResizedCrop.get_params(image, RRC_SCALE, RRC_RATIO) for _ in range(draws)])
    top, left, height, width = boxes.double().unbind(1)
    return left, top, width, height


def crops_by_path(path, photos, res):
    """All crops of `photos` (one epoch), through one of the three implementations of the shared crop code,
    with the photo each came from."""
    if path == "torch-gpu-batched":  # the torch backend's GPU path, on CPU tensors here
        images = torch_loader.crop_on_gpu(photos, res, torch.Generator().manual_seed(0))
        return Normalizer("cpu")(images), torch.arange(len(photos))
    store = resident.Store(torch.tensor([photo.shape[1:] for photo in photos])).allocate("cpu")
    for k, photo in enumerate(photos):
        store.put(k, photo)
    block = Block("ramps", "train", {"splits": {"train": {"count": len(photos)}}}, 0, 1, torch.device("cpu"))
    ramps = resident.ResidentLoader(block, store, torch.zeros(len(photos), dtype=torch.long),
                                    torch.arange(len(photos)), batch_size=256, res=res, seed=0, with_ids=True)
    ramps.on_gpu = path == "resident-gpu-batched"  # the GPU path's grid_sample, on CPU tensors here
    images, _, ids = epoch(ramps, 0)
    return images, ids


@pytest.mark.parametrize("path", ["resident-cpu", *(pytest.param(p, marks=pytest.mark.slow)
                                                    for p in ("resident-gpu-batched", "torch-gpu-batched"))])
def test_crop_boxes_follow_torchvision_over_the_whole_photo(path):
    """The crop boxes, read back from crops of coordinate ramps, have torchvision's RandomResizedCrop
    distribution relative to the whole photo (area share, aspect, position; flips half the time), for wide,
    tall and extreme photos, whichever implementation crops. Quantiles over 600 draws per shape agree within
    0.07 (two samples of 600 differ by ~0.03 at these quantiles); a store holding only the central square
    caps a 16:9 photo's area share at 0.56 and its box centres to the middle, far outside that."""
    res, draws = 16, 600
    photos = [ramp(*size) for size in RAMP_SIZES for _ in range(draws)]
    images, ids = crops_by_path(path, photos, res)
    left, top, width, height, flipped = crop_boxes(images, res)
    assert 0.45 < flipped.float().mean() < 0.55
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for shape, size in enumerate(RAMP_SIZES):
        ours = ids // draws == shape
        theirs = torchvision_boxes(size, draws)
        for name, (l, t, w, h) in {"ours": (left[ours], top[ours], width[ours], height[ours]),
                                   "torchvision": theirs}.items():
            assert (l > -1).all() and (l + w < size[1] + 1).all() and (t > -1).all() and (t + h < size[0] + 1).all()
        features = {
            "area share": lambda l, t, w, h: w * h / (size[0] * size[1]),
            "log aspect": lambda l, t, w, h: torch.log(w / h),
            "centre x": lambda l, t, w, h: (l + w / 2) / size[1],
            "centre y": lambda l, t, w, h: (t + h / 2) / size[0],
        }
        for name, feature in features.items():
            a = torch.quantile(feature(left[ours], top[ours], width[ours], height[ours]).double(), quantiles)
            b = torch.quantile(feature(*theirs).double(), quantiles)
            assert (a - b).abs().max() < 0.07, (size, name, a, b)


def test_crop_threads_run_torch_ops_on_one_core_each(ingested):
    """The CPU crop threads run their own torch ops (a crop's copy, its flip) on one intra-op thread each, and
    the training process keeps its count: with torch's count of 2 in each of 2 crop threads, every such op
    opened an OpenMP team of its own, 4 threads on 2 cores whose barriers took 46 % of py-spy's samples at the
    seed's scale (docs/loaders.md)."""
    import threading
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rrc = loader(ingested, "train")
        everyone = threading.Barrier(rrc.threads)  # so that every thread of the pool answers once
        counts = [rrc.pool.submit(lambda: everyone.wait() * 0 + torch.get_num_threads()) for _ in range(rrc.threads)]
        assert rrc.threads == 2 and [count.result(timeout=60) for count in counts] == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("res", [56, 28, 32])  # S = 64: no resize; 32: a 2x downscale; 37: odd S - res
def test_test_path_is_pil_resize_and_center_crop(ingested, res):
    """Against PIL on the stored JPEG. Tolerance: torchvision's antialiased bilinear resize is PIL's filter,
    rounded differently, and both decode with libjpeg-turbo: 1 level of 255 at most was seen, so <= 3 leaves
    room for other library builds. A crop 1 px off would cost ~6 levels on average, far above the mean bound."""
    images, labels, ids = epoch(loader(ingested, "test", res=res), 0)
    samples = ShardIndex(ingested, "test")
    reference = T.Compose([T.Resize(common.test_resize(res)), T.CenterCrop(res), T.PILToTensor()])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert ids.tolist() == list(range(len(samples)))
    assert labels.tolist() == samples.labels.tolist()
    for position in range(len(samples)):
        pil = Image.open(io.BytesIO(samples.read(position))).convert("RGB")
        diff = (images[position] * std + mean - reference(pil).float()).abs()
        assert diff.mean() < 0.1 and diff.max() <= 3, (position, diff.mean(), diff.max())


def test_memory_guard_refuses_before_decoding(ingested, monkeypatch):
    monkeypatch.setattr(resident, "decode_split", lambda *a, **k: pytest.fail("decoded despite the guard"))
    with pytest.raises(UsageError, match=r"needs [\d,]+ MB .* 0 MB free: use a smaller --res"):
        loader(ingested, "train", res=224, memory_limit=100_000)


def test_memory_guard_names_a_res_that_fits(ingested):
    """Issue 20 item 4: where the splits do not fit, the error says what they need and which --res (store
    size) would fit, and that --res does fit under the same memory."""
    limit = (split_need(ingested, "train", 56, 16)[1] + split_need(ingested, "test", 56, 16)[1]) / resident.MEMORY_SHARE
    with pytest.raises(UsageError) as err:
        loader(ingested, "train", res=112, memory_limit=limit)
    fit = int(str(err.value).split("--res ")[1].split()[0])
    assert 28 <= fit < 112 and f"store size of {common.test_resize(fit)} px" in str(err.value)
    assert loader(ingested, "train", res=fit, memory_limit=limit).num_samples == 65


def split_need(data_dir, split, res, batch_size):
    """Bytes the guard counts for one split: its images plus its batch buffers."""
    manifest = layout.read_manifest(data_dir)
    ids = torch.arange(manifest["splits"][split]["count"])
    store = resident.Store.plan(resident.stored_sizes(data_dir, split, ids), common.test_resize(res))
    return store.nbytes, store.nbytes + resident.working_bytes(store, batch_size, res, torch.device("cpu"))


def test_memory_guard_budgets_train_and_test_together(ingested, monkeypatch):
    """A run holds both splits: MEMORY_SHARE bounds their sum, not each split against what the other left."""
    train_images, train = split_need(ingested, "train", 32, 16)
    test_images, test = split_need(ingested, "test", 32, 16)
    free = {"bytes": (train + test) / resident.MEMORY_SHARE * 0.99}  # train alone fits, both do not
    monkeypatch.setattr(resident, "free_memory", lambda device: free["bytes"])
    with pytest.raises(UsageError, match="for the train and test images"):
        loader(ingested, "train")
    free["bytes"] = (train + test) / resident.MEMORY_SHARE * 1.01  # both fit
    train_loader = loader(ingested, "train")
    free["bytes"] -= train_images  # what the train images now take (the probe sees them as used)
    assert loader(ingested, "test").num_samples == layout.read_manifest(ingested)["splits"]["test"]["count"]
    del train_loader


def test_cache_is_skipped_when_host_memory_cannot_hold_the_copy(tmp_path, monkeypatch):
    """torch.save copies GPU images to the host first: too little host memory skips the cache with a warning
    instead of swapping or dying (a meta tensor stands in for GPU images here)."""
    monkeypatch.setattr(resident, "free_memory", lambda device: 10_000_000)
    with pytest.warns(UserWarning, match="host memory cannot hold"):
        store = resident.Store(torch.tensor([[256, 256]] * 256))
        store.pixels = torch.empty(store.nbytes, dtype=torch.uint8, device="meta")
        resident.save_cache(tmp_path / "cache.pt", "key", store)
    assert not list(tmp_path.iterdir())


def test_disk_cache_is_reused_then_invalidated_by_a_new_manifest(ingested, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))  # other tests' caches
    first = loader(data, "test", cache=True)
    assert not first.from_cache and len(list(data.glob("resident-test-*.pt"))) == 1
    decode = resident.decode_split
    monkeypatch.setattr(resident, "decode_split", lambda *a, **k: pytest.fail("decoded despite the cache"))
    second = loader(data, "test", cache=True)
    assert second.from_cache and torch.equal(second.store.pixels, first.store.pixels)
    assert torch.equal(epoch(second, 0)[0], epoch(first, 0)[0])

    manifest = layout.read_manifest(data)
    manifest["note"] = "ingested again"
    layout.write_manifest(data, manifest)
    monkeypatch.setattr(resident, "decode_split", decode)
    assert not loader(data, "test", cache=True).from_cache  # stale: decoded again and rewritten
    assert loader(data, "test", cache=True).from_cache
    assert loader(data, "test", res=24, cache=True).from_cache is False  # another size: it replaces the copy
    (cached,) = data.glob("resident-test-*.pt")
    cached.write_bytes(cached.read_bytes()[:1000])  # a run killed mid-copy, say
    assert not loader(data, "test", res=24, cache=True).from_cache


def test_store_holds_whole_photos_resized_like_pil_in_no_more_memory_than_their_pixels(ingested):
    """Each stored photo is the whole stored JPEG, shorter side resized to S (PIL's antialiased bilinear, within
    a level or so), portrait ones too: nothing of the field of view is cut. The store is ragged: its one buffer
    is exactly the sum of H x W x 3 of the photos (issue 20 item 4), no padding to the widest."""
    resident_loader = loader(ingested, "train", res=32)
    size, store, samples = common.test_resize(32), resident_loader.store, ShardIndex(ingested, "train")
    assert store.pixels.dtype == torch.uint8 and store.pixels.dim() == 1
    assert store.pixels.numel() == sum(h * w * 3 for h, w in store.sizes.tolist())
    portrait = store.sizes[:, 0] > store.sizes[:, 1]
    assert portrait.any() and not portrait.all()  # the fixture has photos both ways up
    for k in range(resident_loader.num_samples):
        pil = Image.open(io.BytesIO(samples.read(k))).convert("RGB")
        reference = T.PILToTensor()(T.Resize(size)(pil))
        photo = store.photo(k)
        assert photo.shape == reference.shape
        diff = (photo.int() - reference.int()).abs()
        assert diff.float().mean() < 0.1 and diff.max() <= 3, (k, diff.float().mean(), diff.max())


def test_the_gpu_paths_gathered_crops_equal_one_grid_sample_over_a_padded_canvas(ingested):
    """The GPU path's crops (Store.resized_crops: four gathers from the flat buffer, no per-photo copy, no host
    sync) are the crops that one grid_sample over a zero-padded canvas of the batch's photos gives, portrait
    and landscape photos, flipped or not, boxes touching the photos' edges included; run here on the CPU."""
    store = loader(ingested, "train", res=32).store
    index = torch.randperm(len(store.sizes), generator=torch.Generator().manual_seed(0))[:24]
    sizes = store.sizes[index]
    boxes, flips = common.sample_crops(sizes[:, 0], sizes[:, 1], torch.Generator().manual_seed(1))
    boxes[:4, :2], boxes[:4, 2:] = 0, sizes[:4]  # whole photos: the last row and column are sampled
    flips[:2] = True
    canvas = common.padded_canvas([store.photo(k) for k in index.tolist()])
    for res in (32, 57):
        expected = common.batched_resized_crop(canvas, boxes, flips, res, offsets=torch.zeros_like(boxes[:, :2]))
        gathered = store.resized_crops(index, boxes, flips, res)
        assert gathered.shape == expected.shape == (24, 3, res, res)
        assert (gathered - expected).abs().max() < 1e-3


PADDED = "1cf3333"  # the last commit of the padded store: N x 3 x S x W, portrait photos transposed


def padded_resident():
    """loaders/resident.py as it was at PADDED, imported from git as the reference of the ragged store."""
    import importlib.util
    import subprocess
    import sys
    try:
        code = subprocess.run(["git", "show", f"{PADDED}:loaders/resident.py"], capture_output=True, check=True,
                              cwd=Path(__file__).parent).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git cannot show commit {PADDED} here (a copy without the project's history)")
    spec = importlib.util.spec_from_loader("padded_resident", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("padded_resident", module)
    exec(compile(code, "padded_resident.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("split,augment", [("train", "rrc"), ("train", "flip"), ("train", "none"), ("test", "none")])
def test_the_ragged_store_gives_exactly_the_padded_stores_crops(split, augment, ingested):
    """Issue 20 item 4: the same seed gives the very same batches, sample id by sample id, from the ragged
    store as from the padded one it replaced, for every augment, over two epochs."""
    from loaders.base import prepare
    old = padded_resident()
    block = prepare(ingested, split, rank=0, world=1, device="cpu", reads=resident.READS)
    padded = old.build(block, batch_size=16, res=32, seed=3, workers=0, augment=augment, with_ids=True, cache=False)
    ragged = loader(ingested, split, augment=augment, seed=3)
    for number in (0, 1):
        for before, now in zip(epoch(padded, number), epoch(ragged, number)):
            assert torch.equal(before, now)


def test_without_augmentation_the_crops_are_cut_once_per_res_and_epochs_only_gather(ingested, monkeypatch):
    """augment="none": the first epoch cuts every photo's test crop from the store into one uint8 tensor; later
    epochs only gather from it (neither crop nor decode again), and a set_res cuts them anew from the same store
    (no decode), giving back the very same batches at the first res."""
    none = loader(ingested, "train", augment="none")

    def fail(*args, **kwargs):
        raise AssertionError("cut or decoded again")

    monkeypatch.setattr(resident, "decode_split", fail)
    images, _, ids = epoch(none, 0)
    squares = none._squares
    assert squares.dtype == torch.uint8 and squares.shape == (none.num_samples, 3, 32, 32)
    by_id = dict(zip(ids.tolist(), images))
    test_crops = none.normalize(none._center_crops(range(none.num_samples)))  # the test path's crops, of the train photos
    assert all(torch.equal(by_id[int(i)], crop) for i, crop in zip(none.ids, test_crops))

    with monkeypatch.context() as m:
        m.setattr(none, "_center_crops", fail)
        again, _, ids_again = epoch(none, 1)
    assert none._squares is squares and not torch.equal(ids, ids_again)
    assert all(torch.equal(by_id[int(i)], image) for i, image in zip(ids_again, again))
    none.set_res(24)
    assert epoch(none, 2)[0].shape[1:] == (3, 24, 24)
    none.set_res(32)
    assert torch.equal(epoch(none, 0)[0], images)


def test_a_damaged_disk_cache_is_noticed_said_in_one_line_and_rebuilt(ingested, tmp_path):
    """Issue 19 item 4: bytes flipped inside the cache at the same size (the pixels, which torch.load does not
    check) are found by the cache's content hash; the loader says so in one line and decodes again, and the
    rewritten cache is whole again. --verify names the damaged cache too."""
    from ingest.verify import verify
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))
    fresh = loader(data, "train", cache=True)
    (cached,) = data.glob("resident-train-*.pt")
    raw = bytearray(cached.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 2000] = bytes(b ^ 0xFF for b in raw[middle:middle + 2000])
    cached.write_bytes(bytes(raw))
    problems, _ = verify(data)
    assert [p for p in problems if cached.name in p] == [f"{cached.name}: its pixels changed since it was "
                                                         "written (sha256 differs): the resident loader rebuilds it"]
    with pytest.warns(UserWarning) as said:
        again = loader(data, "train", cache=True)
    assert [str(w.message) for w in said if "resident" in str(w.message)] == [f"resident: {cached} is damaged, its pixels changed since it was "
                                              "written (sha256 differs): decoding the split again"]
    assert not again.from_cache and torch.equal(again.store.pixels, fresh.store.pixels)
    assert loader(data, "train", cache=True).from_cache and verify(data)[0] == []


def test_the_disk_copy_replaces_our_older_ones_and_never_fills_the_disk(ingested, tmp_path, monkeypatch):
    """Issue 20 item 4: one copy per split and rank block (another store size replaces it; another rank's copy
    is left alone), and none where it would leave the disk with less than KEEP_FREE."""
    from loaders import resident_cache
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))
    other_rank = data / "resident-test-37px-0-3.pt"  # rank 0 of 2's block: not ours to replace
    other_rank.write_text("rank 0 of 2")
    loader(data, "test", res=32, cache=True)
    loader(data, "test", res=24, cache=True)
    assert sorted(p.name for p in data.glob("resident-test-*.pt")) == sorted([
        other_rank.name, resident_cache.path_for(data, "test", common.test_resize(24), range(0, 6)).name])
    free = shutil.disk_usage(data).free
    monkeypatch.setattr(resident_cache, "KEEP_FREE_BYTES", free)  # any copy would go below it
    with pytest.warns(UserWarning, match="resident cache not written: its .* GB would leave less than"):
        loader(data, "train", res=32, cache=True)
    assert not list(data.glob("resident-train-*.pt"))


def test_a_read_only_dataset_folder_with_an_older_copy_costs_a_warning_not_the_run(ingested, tmp_path, monkeypatch):
    """Pruning our older copy fails in a read-only folder (faked: this suite may run as root): the loader warns
    that the copy was not written and goes on."""
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))
    loader(data, "test", res=32, cache=True)

    def read_only(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.warns(UserWarning, match="resident cache not written \\(.*Permission denied"):
        assert loader(data, "test", res=24, cache=True).num_samples == 6


def test_verify_names_another_datasets_disk_cache_copied_in(ingested, tmp_path):
    """Issue 19: a copy that is whole (its content hash matches) but was derived from another dataset's manifest
    (its key says so) is not this folder's: --verify names it, as the loader does before decoding again."""
    from ingest.verify import verify
    data, other = tmp_path / "data", tmp_path / "other"
    for folder in (data, other):
        shutil.copytree(ingested, folder, ignore=shutil.ignore_patterns("resident-*"))
    manifest = layout.read_manifest(other)
    manifest["note"] = "another dataset"  # another manifest, as another ingest makes
    layout.write_manifest(other, manifest)
    loader(other, "test", cache=True)
    (copy,) = other.glob("resident-test-*.pt")
    shutil.copyfile(copy, data / copy.name)
    assert verify(data)[0] == [f"{copy.name}: derived from another dataset, or an earlier ingest of this one (its "
                               "key is not this folder's manifest.json): delete it, or let the resident loader "
                               "rebuild it"]
    with pytest.warns(UserWarning, match="was made from other data or settings: decoding the split again"):
        assert not loader(data, "test", cache=True).from_cache
    assert verify(data)[0] == []  # the rebuilt copy is this folder's


def test_the_disk_copys_digest_is_the_one_older_copies_were_written_with():
    """The digest's hashing is shared with the checkpoints' (digests.hash_tensor); a copy written before must
    still verify (this one computed by the code before), strided tensors by their values in C order."""
    from loaders.resident_cache import content_digest
    gen = torch.Generator().manual_seed(0)
    tensors = {"images": torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=gen),
               "labels": torch.tensor([2, 0, 1]), "ids": torch.arange(3)[::2]}
    assert content_digest(tensors) == "e7ab368b2cd80e93e71225961eb500212970292e0df10529ae2a485558fd01bf"

