"""Atomic writes: a reader (or a rerun after a crash) sees an output complete or not at all, never half."""
import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    write_bytes(path, text.encode())


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
