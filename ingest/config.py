"""The one typed config of an ingest run, checked up front so that bad numbers fail before anything is written."""
import os
from dataclasses import dataclass
from pathlib import Path

from cli import UsageError, option
from ingest.layout import DEFAULT_OUT

# Bump when the validation/normalisation changes what bytes a source file turns into: it keys the cache.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class IngestConfig:
    """Every option of an ingest, each declared once with its flag (`cli.option`); checked() is their check."""
    src: Path | None = option(None, "folder with one subfolder per class (default: the generated demo)")
    out: Path = option(DEFAULT_OUT, "ingested dataset folder")
    store_size: int = option(256, "shorter side of stored images, px; never upscaled")
    quality: int = option(90, "JPEG quality of the one re-encode")
    seed: int = option(0, "seed of the split and the write-time shuffle of the train shards")
    test_share: float = option(0.1, "share of each class held out (the study's 0.9/0.1 split)")
    shard_size: int = option(500, "samples per tar shard: big enough for sequential reads, small enough to "
                             "spread")
    min_side: int = option(64, "smaller photos are quarantined as too small, px")
    max_pixels: int = option(100_000_000, "a header with more pixels is a decompression bomb: quarantined, never "
                             "decoded")
    workers: int = option(0, "validation processes (0 = all cores)")
    force: bool = option(False, "rebuild even if up to date, without the file cache; also write into a non-empty "
                         "folder that holds no fastpix dataset")

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


