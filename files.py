"""Writing files, one way, for every stage: a reader, a rerun after a crash, or a machine after a power cut sees
each output complete or not at all, never half.

A file is written to a temp sibling `.<name>.tmp<pid>`, flushed to the disk (fsync) and renamed over its
name. Only fastpix makes names of that form, so a rerun can tell the temp files a killed write left
(`temp_of`) from anything else in the folder, and delete only those. The flush costs ~40 ms a file on this
machine's virtual disk, so the many small files a rerun derives again (ingest's per-photo cache, the demo
photos) are written with `durable=False`: atomic, not flushed. Standard library only: the GPU machine's bare
python3 imports it too (bench/gpu/check.py).
"""
import contextlib
import hashlib
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


def as_read_back(obj):
    """`obj` as read_json reads back what write_json wrote (tuples as lists, Paths and anything unknown as str):
    how a saved config and one in memory compare equal."""
    return json.loads(json.dumps(_plain(obj), default=str))


def checksum_of(obj):
    """sha256 of a JSON object's canonical form without its own `checksum` field: derived JSON files carry it
    (`seal`) so that a damaged, hand-edited or foreign copy is noticed rather than trusted."""
    body = json.dumps(_plain({k: v for k, v in obj.items() if k != "checksum"}), sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def seal(obj):
    """`obj` (a dict) with its checksum added."""
    return {**obj, "checksum": checksum_of(obj)}


def sealed(obj):
    """Whether `obj` is a dict carrying its own, matching checksum."""
    return isinstance(obj, dict) and obj.get("checksum") == checksum_of(obj)


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


WRITER_NOTE = ".fastpix-writer"  # inside a held folder: who holds it (pid, command, since); never data


class Busy(Exception):
    """Another live process writes the folder. str(): one line naming it and how to stop it."""


@contextlib.contextmanager
def one_writer(folder, wait=False, say=None, every=5.0):
    """Hold `folder` as its only writer for the block. The lock is flock on the folder itself, which the kernel
    releases when the holder dies, even by kill -9, so nothing stale is ever left to clean by hand; who holds it
    is written to `WRITER_NOTE` inside it for the next comer to name. By default a second writer is refused at
    once (Busy); with `wait=True` it waits, saying through `say` (default: stderr) every `every` seconds whom it
    waits for. Readers of the folder skip WRITER_NOTE."""
    import fcntl
    import sys
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        started, told = time.monotonic(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                note = _read_note(folder)
                for _ in range(20):  # the holder writes its note right after taking the lock: give it a moment
                    if note is not None:
                        break
                    time.sleep(0.05)
                    note = _read_note(folder)
                holder, pid = _describe(note), note.get("pid") if note else None
                if not wait:
                    raise Busy(f"{folder} is being written by {holder}: wait for it to end, or stop it "
                               f"(kill {pid or 'PID'}) and rerun") from None
                if told is None or time.monotonic() - told >= every:
                    told = time.monotonic()
                    (say or (lambda m: print(m, file=sys.stderr, flush=True)))(
                        f"waiting {time.monotonic() - started:.0f} s for {folder}, held by {holder} "
                        f"(stop it with kill {pid or 'PID'})")
                time.sleep(0.2)
        note = folder / WRITER_NOTE
        write_text(note, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv) or sys.executable,
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        try:
            yield
        finally:
            note.unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing releases the lock


def _read_note(folder):
    """The holder's note as a dict, or None (none yet, or unreadable)."""
    try:
        note = json.loads((Path(folder) / WRITER_NOTE).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _describe(note):
    """`pid 42 (python train.py ..., since 2026-12-06 07:00:00)`, or `another process` if it left no note yet."""
    if note is None:
        return "another process"
    return f"pid {note.get('pid')} ({str(note.get('command'))[:120]}, since {note.get('since')})"
