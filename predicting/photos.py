"""Which photos to predict and how each becomes the model's input, the way training saw it: ingest's own
conversion (ingest.validate.stored_photo: the header checks, libjpeg-turbo's reduced-size decode (draft) down to
the store size, EXIF upright, RGB, the store-size resize), then the torch backend's test transform at the run's
res (loaders.torch_loader.TestCrop) and the loaders' normalisation (loaders.common.Normalizer). Nothing of it is
written here a second time. A photo that cannot be used is a reason (the one ingest's quarantine gives), never an
exception.

`prepared` runs the CPU work in a pool of processes, in input order. On a GPU, JPEGs that need no conversion
(RGB or grey, upright) travel as bytes and are decoded in batches with nvJPEG (`decode_on_gpu`), then resized to
the store size with antialiasing on the device: near the CPU path's pixels, not identical (no draft, torch's
resize in place of PIL's).
"""
import functools
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from cli import UsageError
from ingest.scan import readable, walk
from ingest.validate import Rejected, opened, read_source, stored_photo
from loaders.torch_loader import TestCrop, decode_jpegs_on_gpu

LISTS = (".txt",)  # a PHOTOS argument with this suffix is a text file of paths, one a line


def find_photos(args):
    """PHOTOS arguments -> [(path, reason)] in order: a file is itself, a folder is walked as ingest walks its
    class folders (hidden names skipped, linked folders not followed, links leaving it quarantined), a .txt file
    lists paths (one a line, relative to its own folder; blank lines and # comments skipped). reason: "" for a
    photo to read, else why it will not be."""
    found = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            errors = []
            found += [(path_, reason) for path_, _, reason in walk(path, path.resolve(), errors) if reason is not None]
            found += [(err.filename, f"unreadable folder: {err.strerror} (its files are not counted)")
                      for err in errors]
        elif path.suffix.lower() in LISTS and path.is_file():
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"{path} cannot be read as a list of photo paths: {err}") from None
            found += [(str(path.parent / line.strip()), "") for line in lines
                      if line.strip() and not line.lstrip().startswith("#")]
        elif path.exists() or path.is_symlink():
            found.append((str(path), ""))
        else:
            raise UsageError(f"{arg}: no such file or folder")
    return [(readable(str(p)), reason) for p, reason in found]


@functools.cache
def _test_crop(res):
    return TestCrop(res).transform


def prepare(path, ingested, res):
    """One photo -> (uint8 res x res x 3 array (HWC), "") as the test transform makes it, or (None, reason)."""
    try:
        image = stored_photo(read_source(path), ingested)
    except Rejected as why:
        return None, str(why)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy, as torch wants
    return _test_crop(res)(pixels).permute(1, 2, 0).numpy(), ""


def gpu_ready(path, ingested):
    """(JPEG bytes, "") where nvJPEG can decode the photo as training saw it (a JPEG in RGB or grey, no EXIF
    turn), (None, "") where the CPU must convert it, (None, reason) where it is unusable."""
    try:
        data = read_source(path)
        image = opened(data, ingested)
    except Rejected as why:
        return None, str(why)
    upright = image.getexif().get(0x0112, 1) == 1  # EXIF orientation
    return (data if image.format == "JPEG" and image.mode in ("RGB", "L") and upright else None), ""


def _prepare_task(task):
    path, reason, ingested, res, gpu = task
    if reason:
        return None, reason
    if gpu:
        data, reason = gpu_ready(path, ingested)
        if data is not None or reason:
            return data, reason
    return prepare(path, ingested, res)


def _one_thread():
    torch.set_num_threads(1)  # each worker is one core's worth: torch's own threads would fight the others


def prepared(photos, ingested, res, workers, gpu=False):
    """(array or JPEG bytes or None, reason) of every (path, reason) of `photos`, in order; `workers` processes
    (0: in this one). With `gpu`, JPEGs nvJPEG can take come back as bytes (see gpu_ready)."""
    tasks = [(path, reason, ingested, res, gpu) for path, reason in photos]
    if workers == 0:
        yield from map(_prepare_task, tasks)
        return
    # spawn, not fork: this process holds torch's threads, which a forked child would inherit broken
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        yield from pool.imap(_prepare_task, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 8))))


def decode_on_gpu(data, ingested, res, device):
    """JPEG byte strings -> uint8 N x 3 x res x res on the device: nvJPEG in one batch behind the torch backend's
    stream guard, each photo shrunk to the store size (never enlarged, antialiased) and test-cropped there."""
    crop, out = _test_crop(res), []
    decoded = decode_jpegs_on_gpu([torch.frombuffer(d, dtype=torch.uint8) for d in data], device)
    for image in decoded:
        h, w = image.shape[1:]
        if min(h, w) > ingested.store_size:
            image = v2.functional.resize(image, ingested.store_size, antialias=True)
        out.append(crop(image))
    return torch.stack(out)
