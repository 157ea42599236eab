"""The one typed config of an ingest run, checked up front so that bad numbers fail before anything is written."""
import os
from dataclasses import dataclass
from pathlib import Path

from cli import UsageError

# Bump when the validation/normalisation changes what bytes a source file turns into: it keys the cache.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class IngestConfig:
    src: Path
    out: Path
    store_size: int = 256  # shorter side of the stored images, px; never upscaled
    quality: int = 90  # JPEG quality of the one re-encode
    seed: int = 0  # drives the split and the write-time shuffle of the train shards
    test_share: float = 0.1  # the study's 0.9/0.1 split, per class
    shard_size: int = 500  # samples per tar shard: big enough for sequential reads, small enough to spread
    min_side: int = 64  # px; a smaller photo is quarantined as too small
    max_pixels: int = 100_000_000  # w*h from the header above this is a decompression bomb, never decoded
    workers: int = 0  # validation processes; 0 = all usable cores
    force: bool = False  # rebuild even when up to date, and forget the per-file cache

    def checked(self):
        """This config with absolute paths and a worker count, or a UsageError naming what to fix."""
        bad = [f"{name} must be {rule}" for name, ok, rule in (
            ("--store-size", 16 <= self.store_size <= 8192, "16..8192"),
            ("--quality", 1 <= self.quality <= 100, "1..100"),
            ("--test-share", 0 < self.test_share < 1, "between 0 and 1"),
            ("--shard-size", self.shard_size >= 1, ">= 1"),
            ("--min-side", 1 <= self.min_side, ">= 1"),
            ("--max-pixels", self.max_pixels >= self.min_side ** 2, ">= min-side squared"),
            ("--workers", self.workers >= 0, ">= 0 (0 = all cores)"),
            ("--seed", self.seed >= 0, ">= 0"),
        ) if not ok]
        if bad:
            raise UsageError("; ".join(bad))
        src, out = Path(self.src).resolve(), Path(self.out).resolve()
        if not src.exists():
            raise UsageError(f"--src {self.src} does not exist")
        if not src.is_dir():
            raise UsageError(f"--src {self.src} is not a directory")
        if out == src or out.is_relative_to(src):
            raise UsageError(f"--out {self.out} is inside --src {self.src}: it would ingest its own output")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a directory")
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir():
            raise UsageError(f"--out {self.out} cannot be created: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--out {self.out} is not writable ({existing} denies it)")
        workers = self.workers or len(os.sched_getaffinity(0))
        return IngestConfig(**{**self.__dict__, "src": src, "out": out, "workers": workers})

    @property
    def cache_dir(self):
        """Per-file results, hidden inside --out: what makes reruns after a crash cheap."""
        return self.out / ".cache"

    def cache_params(self):
        """What decides the bytes a source file becomes (not the split, not the sharding)."""
        return f"v{PIPELINE_VERSION}:{self.store_size}:{self.quality}:{self.min_side}:{self.max_pixels}"


