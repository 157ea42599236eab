"""Write a split's FFCV .beton from the already encoded JPEGs, without FFCV re-encoding them.

FFCV's RGBImageField encodes pixels with OpenCV; we want the very bytes the tar shards hold. The field's
`encode` is therefore replaced on the instance rather than in a subclass: FFCV records a field's type id
from its exact class, and a subclass would be written as 'unknown', which every reader would then need
`custom_fields` for. The file stays a plain RGBImageField (mode jpg) + IntField beton.
"""
import errno
import functools
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from files import atomic_path
from ingest import cache


class _Encoded:
    """Indexable view FFCV's writer reads: sample i -> ((jpeg bytes, width, height), label)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        data = np.frombuffer(cache.payload(s), np.uint8)
        return (data, s.width, s.height), s.label


def _store_jpeg(destination, value, malloc):
    """RGBImageField.encode for bytes already JPEG: the metadata FFCV's decoders need, then the bytes."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    data, width, height = value
    destination["mode"] = IMAGE_MODES["jpg"]
    destination["width"], destination["height"] = width, height
    destination["data_ptr"], storage = malloc(data.nbytes)
    storage[:] = data


def write_beton(path, samples, progress=True):
    """samples (Checked, in id order) -> FFCV file at `path`, record i = sample i, written atomically."""
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    # a page must hold the biggest sample; beyond that, small pages keep small datasets small
    sizes = [s.stored_bytes for s in samples]
    page_size = max(MIN_PAGE_SIZE, 1 << (4 * max(sizes, default=0)).bit_length())
    # FFCV writes in a child process, and its parent waits for a count that a child killed by a full disk
    # never reaches: it would hang. So make sure of the space first (data, a partial page, the tables).
    needed = sum(sizes) + 2 * page_size + 64 * len(samples)
    free = shutil.disk_usage(Path(path).parent).free
    if free < needed:
        full = OSError(errno.ENOSPC, f"{needed} bytes needed, {free} free")
        full.overhead = needed - sum(sizes)  # beyond the images: what the caller's estimate leaves out
        raise full
    image = RGBImageField(write_mode="jpg")
    image.encode = _store_jpeg
    with atomic_path(path) as tmp:
        # one writer process: records land in id order, so the same input gives the same file
        writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=1, page_size=page_size)
        shows = ffcv.writer.tqdm  # FFCV's own bar, named, and silent under --quiet
        ffcv.writer.tqdm = functools.partial(tqdm, desc=f"writing {Path(path).name}", unit="img", disable=not progress)
        try:
            writer.from_indexed_dataset(_Encoded(samples), chunksize=256)
        except BaseException:  # stopped (its child died, Ctrl-C): free the shared memory FFCV frees only at the end
            sm = getattr(writer, "metadata_sm", None)
            if sm is not None:
                sm.close()
                sm.unlink()
            raise
        finally:
            ffcv.writer.tqdm = shows
