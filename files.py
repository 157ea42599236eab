"""Writing files, one way, for every stage: a reader, a rerun after a crash, or a machine after a power cut sees
each output complete or not at all, never half.

A file is written to a temp sibling `.<name>.tmp<pid>`, flushed to the disk (fsync) and renamed over its
name. Only fastpix makes names of that form, so a rerun can tell the temp files a killed write left
(`temp_of`) from anything else in the folder, and delete only those. The flush costs ~40 ms a file on this
machine's virtual disk, so the many small files a rerun derives again (ingest's per-photo cache, the demo
photos) are written with `durable=False`: atomic, not flushed. Standard library only: the GPU machine's bare
python3 imports it too (bench/gpu_check.py).
"""
import contextlib
import json
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path

_TEMP = re.compile(r"\.(?P<name>.+)\.tmp\d+")


@contextlib.contextmanager
def atomic_path(path, durable=True):
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)  # else a power cut after the rename can leave the new name with no data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_of(name):
    """The file name a temp file of `atomic_path` stands in for (`.a.json.tmp42` -> `a.json`), else None."""
    match = _TEMP.fullmatch(name)
    return match["name"] if match else None


def write_bytes(path, data, durable=True):
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    write_bytes(path, text.encode())


def write_json(path, obj, indent=2, sort_keys=False):
    """`obj` as JSON and a newline; dataclasses become objects, Paths strings, anything else unknown its str."""
    write_text(path, json.dumps(_plain(obj), indent=indent, sort_keys=sort_keys, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def _plain(obj):
    """Dataclasses, Paths and tuples -> what json writes."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextlib.contextmanager
def exclusive(lock_path):
    """Hold an exclusive lock on `lock_path`, a folder or a file (created if needed): two builds of one folder
    take turns, and the second then finds the work done instead of racing the first. Locking a folder itself
    leaves no lock file behind in it, so a folder can be locked before it is known to be ours."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDONLY if lock_path.is_dir() else os.O_RDWR | os.O_CREAT
    fd = os.open(lock_path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
