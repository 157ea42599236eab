"""`set_res`, the hook of progressive resizing: every backend's batches follow a per-epoch resolution schedule,
train and test, and the resident loader does it from the squares it decoded once. Loaders use workers=1 (the
torch and folder workers persist across epochs, so the new res must reach a running worker)."""
import gc

import pytest
import torch

import loaders
from conftest import require, slow_backends
from loaders import make_loader, resident

BACKENDS = list(loaders.BACKENDS)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")
SCHEDULE = (32, 24, 40, 32)  # per epoch: down, up past the build res, and back


def shapes_per_epoch(loader, schedule):
    """The set of batch image shapes of each epoch, after set_res(res) and set_epoch(epoch)."""
    seen = []
    for epoch, res in enumerate(schedule):
        loader.set_res(res)
        loader.set_epoch(epoch)
        seen.append({tuple(images.shape[1:]) for images, _ in loader})
    return seen


@pytest.mark.parametrize("split", [pytest.param("train", marks=pytest.mark.slow), "test"])
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name == "torch" else name
                                  for name in slow_backends(BACKENDS)])  # torch: 10 s of worker start and stop
def test_batches_follow_the_resolution_schedule(name, split, ingested):
    require(name)
    loader = make_loader(name, ingested, split, batch_size=16, res=32, device="cpu", seed=0, workers=1)
    assert shapes_per_epoch(loader, SCHEDULE) == [{(3, res, res)} for res in SCHEDULE]
    del loader
    gc.collect()  # FFCV's finalizers run under this module's warning filter


@pytest.mark.slow
@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_test_batches_at_the_build_res_are_unchanged_after_a_detour(name, ingested):
    """Back at the res a loader was built with, the test path gives the very pixels it gave first."""
    require(name)
    loader = make_loader(name, ingested, "test", batch_size=16, res=32, device="cpu", seed=0, workers=1)
    first = torch.cat([images.clone() for images, _ in loader])
    loader.set_res(24)
    assert next(iter(loader))[0].shape[-1] == 24
    loader.set_res(32)
    assert torch.equal(torch.cat([images.clone() for images, _ in loader]), first)
    del loader
    gc.collect()


def test_resident_changes_res_without_decoding_again(ingested, monkeypatch):
    train = make_loader("resident", ingested, "train", batch_size=16, res=32, device="cpu", seed=0, workers=0,
                        cache=False)
    test = make_loader("resident", ingested, "test", batch_size=16, res=32, device="cpu", seed=0, workers=0,
                       cache=False)
    stored = (train.store.pixels.data_ptr(), test.store.pixels.data_ptr())

    def decode_again(*args, **kwargs):
        raise AssertionError("set_res decoded the split again")

    monkeypatch.setattr(resident, "decode_split", decode_again)
    assert shapes_per_epoch(train, SCHEDULE) == [{(3, res, res)} for res in SCHEDULE]
    assert shapes_per_epoch(test, SCHEDULE) == [{(3, res, res)} for res in SCHEDULE]
    assert (train.store.pixels.data_ptr(), test.store.pixels.data_ptr()) == stored
