"""One interface over every way to feed batches: `make_loader(name, data_dir, split, ...)`.

Backends are imported lazily so that a user of one never pays the import of the others. What every backend
shares (the start-up check, the rank block, the device, the loader's surface) is loaders.base.
"""
import importlib

from cli import UsageError
from loaders.base import prepare
from loaders.common import check_augment, resolve_workers

BACKENDS = {  # --loader name -> module defining READS (the formats it reads) and `build(block, **kwargs)`
    "dali": "loaders.dali",
    "ffcv": "loaders.ffcv",
    "torch": "loaders.torch_loader",
    "folder": "loaders.folder",
    "resident": "loaders.resident",
}


def make_loader(name, data_dir, split, *, batch_size, res=224, device="auto", seed=0, rank=0, world=1,
                workers=None, augment="rrc", cache_dir=None, **options):
    """An iterable of (images, labels) batches with len(), set_epoch(epoch), set_res(res), `classes` and
    `steps_per_epoch` (loaders.base.Loader); see loaders.common (which also says what `workers` and `augment`
    mean). `augment` is the train split's transform; the test split always gets the test transform.
    `data_dir` may be a URL (s3://, gs://, https://, file://): its files are fetched into `cache_dir` (default
    ~/.cache/fastpix) first, see ingest.remote."""
    if name not in BACKENDS:
        raise UsageError(f"unknown loader {name!r}: choose one of {', '.join(BACKENDS)}")
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}: choose train or test")
    if batch_size < 1 or res < 8:
        raise UsageError(f"batch size ({batch_size}) must be >= 1 and res ({res}) >= 8")
    check_augment(augment)
    backend = importlib.import_module(BACKENDS[name])
    workers = resolve_workers(workers)
    block = prepare(data_dir, split, rank=rank, world=world, device=device, reads=backend.READS, cache_dir=cache_dir)
    return backend.build(block, batch_size=batch_size, res=res, seed=seed, workers=workers,
                         augment=augment if block.train else "none", **options)
