"""The resident loader's disk copy of a decoded split (`resident-<split>-<S>px-<first>-<stop>.pt` in the dataset
folder), so that a later run can skip the decode.

A derived file, so it is checked before use, never trusted: it holds the sha256 of its tensors' bytes (its
content) and the key of what it was derived from (the sha256 of the manifest, which holds every shard's sha256,
the store size and the store's format version). A content mismatch (damage) or a key mismatch (another ingest,
another format) is said in one line and the split is decoded again; `python ingest/build.py --verify` names a
damaged copy too, and a whole one derived from another manifest (another dataset's, copied in: `problems`).
The content check reads the whole file once, which the first epoch would do anyway (the file is memory-mapped,
not copied).

Worth keeping, measured on this 2-core machine (load 11-16): the seed-scale demo's train store (25,199 photos
at S = 256) is 7.15 GB; a checked read costs ~2.1 s per GB (~15 s, file in the page cache), its decode 165 s of
CPU (551 s wall under that load); writing costs ~6 s per GB (hash, save, fsync).
"""
import hashlib
import re
import shutil
import warnings

import torch
from tqdm import tqdm

from digests import hash_tensor
from files import atomic_path

PATTERN = "resident-*.pt"
KEEP_FREE_BYTES = 2e9  # a copy is not written where it would leave less free on the disk (a share of the disk's
# size refused every copy on CI's 271 GB disk with 25 GB free)


def path_for(data_dir, split, size, positions):
    return data_dir / f"resident-{split}-{size}px-{positions.start}-{positions.stop}.pt"


def content_digest(tensors, desc=None):
    """Hex sha256 of the bytes of a {name: tensor} dict, in name order (names and shapes included)."""
    digest = hashlib.sha256()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if desc else True) as progress:
        for name in sorted(tensors):
            tensor = tensors[name]
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            hash_tensor(digest, tensor, progress)
    return digest.hexdigest()


def open_copy(path):
    """(tensors, key, problem): the copy's tensors (memory-mapped) and the key it was made for, or a problem
    phrase where the file is unreadable or its content does not match its own hash."""
    try:
        saved = torch.load(path, mmap=True, weights_only=True)
        if "sha256" not in saved:  # an older fastpix's copy: stale, not damaged
            return None, None, None
        tensors, key, digest = saved["tensors"], saved["key"], saved["sha256"]
    except Exception as err:  # a truncated or foreign file: whatever torch.load or the lookups raise
        return None, None, f"unreadable ({type(err).__name__})"
    if content_digest(tensors, desc=f"resident: checking {path.name}") != digest:
        return None, key, "its pixels changed since it was written (sha256 differs)"
    return tensors, key, None


def read(path, key):
    """The tensors saved at `path` for `key`, checked; None (said in one line unless there is no file) when
    there is nothing usable to read."""
    if not path.is_file():
        return None
    tensors, saved_key, problem = open_copy(path)
    if problem:
        warnings.warn(f"resident: {path} is damaged, {problem}: decoding the split again", stacklevel=2)
        return None
    if saved_key != key:
        warnings.warn(f"resident: {path} was made from other data or settings: decoding the split again",
                      stacklevel=2)
        return None
    return tensors


def write(path, key, tensors):
    """Write the copy atomically, with its content hash, in place of our copies of the same split and rank
    block at other store sizes (one copy each, never a pile); not at all where it would leave the disk with
    less than KEEP_FREE. A failure costs the next run a decode, not this run."""
    tensors = {name: t.cpu() for name, t in tensors.items()}
    ours = re.fullmatch(r"resident-(\w+)-\d+px-(\d+)-(\d+)\.pt", path.name)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    try:  # a read-only dataset folder: nothing pruned, nothing written, this run goes on
        for older in path.parent.glob("resident-{}-*px-{}-{}.pt".format(*ours.groups())) if ours else ():
            if older != path:
                older.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free + (path.stat().st_size if path.exists() else 0)
        if free - nbytes < KEEP_FREE_BYTES:
            warnings.warn(f"resident cache not written: its {nbytes / 1e9:.1f} GB would leave less than "
                          f"{KEEP_FREE_BYTES / 1e9:.1f} GB free on the disk of {path.parent}; "
                          "the next run decodes again")
            return
        with atomic_path(path) as tmp:
            torch.save({"key": key, "sha256": content_digest(tensors), "tensors": tensors}, tmp)
    except OSError as err:
        warnings.warn(f"resident cache not written ({err}); the next run decodes again")


def derived_from(key):
    """The sha256 of the manifest a copy was made from: the first part of its key (loaders.resident.build)."""
    return str(key).split(":")[0]


def problems(data_dir):
    """--verify's lines for the copies in `data_dir` that are damaged, or whole but derived from another
    manifest than the folder's (another dataset's copy, copied in). An older fastpix's copy is stale, not
    damage, and so is one of another store size or layout: the loader rebuilds those unasked."""
    from loaders.common import manifest_digest

    ours, lines = manifest_digest(data_dir), []
    for path in sorted(data_dir.glob(PATTERN)):
        _, key, problem = open_copy(path)
        if problem:
            lines.append(f"{path.name}: {problem}: the resident loader rebuilds it")
        elif key is not None and derived_from(key) != ours:
            lines.append(f"{path.name}: derived from another dataset, or an earlier ingest of this one (its key is "
                         "not this folder's manifest.json): delete it, or let the resident loader rebuild it")
    return lines
