"""Ingest's per-photo cache in `--out/.cache`: what validating one source file gave (the stored JPEG, or the
reason it was quarantined), so that a rerun or a run after a crash never decodes that photo again.

It is derived data, so it is never trusted unchecked: an entry holds the sha256 of the source bytes it was
made from and of its own payload, and one that does not match both (a zero-filled file after a power cut,
flipped bytes, a truncation, an entry copied from another dataset) is ignored and made again from the source.
Writers of the shards read the payload through `payload`, which checks it again.

An entry is `.cache/<k[:2]>/<k>.entry`, k = sha256(source sha256 + ':' + the pipeline's params): one JSON line
{"source", "sha256", "kind": "jpeg" | "rejected", "width", "height"}, then the payload (JPEG bytes, or the
reason as UTF-8). Only names of exactly that form, those of the cache format before it (`<k>.jpg`, `<k>.bad`)
and their temp files are ever deleted: other tools' files under `.cache` (pip's, thumbnails) are left alone.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from files import temp_of, write_bytes

MAGIC = b"fastpix-cache-1 "
_PREFIX = re.compile(r"[0-9a-f]{2}")
_ENTRY = re.compile(r"[0-9a-f]{64}\.(entry|jpg|bad)")  # .jpg and .bad: the unchecked cache of fastpix before


class Damaged(Exception):
    """A cache entry no longer holds what was checked a moment ago (changed during the ingest)."""


@dataclass(frozen=True)
class Entry:
    kind: str  # "jpeg" or "rejected"
    payload: bytes
    width: int = 0
    height: int = 0


def entry_path(cache_dir, source_sha256, params):
    key = hashlib.sha256(f"{source_sha256}:{params}".encode()).hexdigest()
    return Path(cache_dir) / key[:2] / f"{key}.entry"


def write(path, source_sha256, entry):
    """Store `entry`, atomically but not flushed (a cache: see files.py; a torn one fails its check)."""
    head = {"source": source_sha256, "sha256": hashlib.sha256(entry.payload).hexdigest(), "kind": entry.kind,
            "width": entry.width, "height": entry.height}
    write_bytes(path, MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + entry.payload, durable=False)


def read(path, source_sha256):
    """The entry at `path` if it is whole and was made from the source with this sha256, else None."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if not data.startswith(MAGIC) or b"\n" not in data:
        return None
    line, _, payload = data[len(MAGIC):].partition(b"\n")
    try:
        head = json.loads(line)
        entry = Entry(head["kind"], payload, int(head["width"]), int(head["height"]))
        ok = head["source"] == source_sha256 and head["sha256"] == hashlib.sha256(payload).hexdigest()
    except (ValueError, KeyError, TypeError):
        return None
    return entry if ok and entry.kind in ("jpeg", "rejected") else None


def payload(sample):
    """The stored JPEG bytes of a validated sample (a validate.Checked), checked again against its entry."""
    entry = read(sample.cached, sample.sha256)
    if entry is None or entry.kind != "jpeg" or len(entry.payload) != sample.stored_bytes:
        raise Damaged(f"{sample.cached} (the cached image of {sample.rel}) changed during the ingest")
    return entry.payload


def prune(cache_dir, keep=()):
    """Delete the cache's own entries that are not in `keep` (all of them by default), and their temp files."""
    keep = {str(p) for p in keep}
    try:
        folders = [e for e in os.scandir(cache_dir) if _PREFIX.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for folder in folders:
        for entry in os.scandir(folder.path):
            ours = _ENTRY.fullmatch(entry.name) or _ENTRY.fullmatch(temp_of(entry.name) or "")
            if ours and entry.path not in keep and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
