"""`python ingest/build.py [--src DIR] [--out DIR]`: a folder of labelled photos -> a validated, split dataset
in both FFCV and DALI webdataset form (the format is ingest/layout.py).

scan -> validate in worker processes (cached per file) -> drop duplicates -> split -> write, manifest last.
Every file found is accounted for as written, quarantined or ignored. A rerun over an unchanged source is
a no-op; a run killed at any point is finished by the next one with the same result. Without --src the
500px-like demo is generated (once) into data/demo-500px and ingested.
"""
import csv
import io
import json
import multiprocessing
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: import from the repo root, never from ingest/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cli import Parser, UsageError, run  # noqa: E402
from ingest import layout  # noqa: E402
from ingest.atomic import exclusive, write_text  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.dedup import dedup  # noqa: E402
from ingest.scan import scan  # noqa: E402
from ingest.split import split  # noqa: E402
from ingest.validate import check  # noqa: E402

def build(cfg, progress=True, log=print, timings=None):
    """Ingest cfg.src into cfg.out; returns the manifest (dict). Raises UsageError for bad input.
    `timings`, a dict if given, receives the seconds spent per stage (for bench/ingest.py)."""
    clock = _Clock(timings)
    cfg = cfg.checked()
    found = scan(cfg.src)  # before creating --out: a source without classes leaves nothing behind
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {cfg.out} cannot be created: {err.strerror}") from None
    with exclusive(cfg.out / ".lock"):
        return _build(cfg, found, clock, progress, log)


def _build(cfg, found, clock, progress, log):
    clock.lap("scan")
    fingerprint = found.fingerprint({**_params(cfg), "source": str(cfg.src)})
    if not cfg.force and _up_to_date(cfg.out, fingerprint):
        log(f"{cfg.out} is up to date with {cfg.src} (use --force to rebuild)")
        return layout.read_manifest(cfg.out)
    if cfg.force:
        _clear_cache(cfg.cache_dir)

    checked = validate_all(cfg, found.candidates, progress)
    clock.lap("validate")
    kept, duplicates = dedup([c for c in checked if not c.reason], found.classes)
    quarantine = sorted(found.quarantined + [(c.rel, c.reason) for c in checked if c.reason] + duplicates)
    splits = split(kept, found.classes, cfg.seed, cfg.test_share)  # may raise: nothing written yet

    (cfg.out / layout.MANIFEST).unlink(missing_ok=True)  # from here the folder is incomplete until the end
    for name, samples in splits.items():
        write_text(layout.csv_path(cfg.out, name), _csv(
            ("path", "label", "sha256", "width", "height"),
            [(s.rel, s.label, s.sha256, s.width, s.height) for s in samples]))
    write_text(cfg.out / layout.QUARANTINE, _csv(("path", "reason"), quarantine))
    manifest = _manifest(cfg, found, fingerprint, quarantine, splits, shards=_write_formats(cfg, splits))
    _remove_stale(cfg.out, manifest)
    write_text(cfg.out / layout.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _prune_cache(cfg.cache_dir, [s.cached for part in splits.values() for s in part])
    clock.lap("write")

    m = manifest
    log(f"{m['written']} written + {m['quarantined']} quarantined + {m['ignored']} ignored = {m['found']} found; "
        f"train {len(splits['train'])}, test {len(splits['test'])} -> {cfg.out}")
    return manifest


class _Clock:
    """Wall seconds per stage, and CPU seconds of the stage's finished child processes (the workers)."""

    def __init__(self, laps):
        self.laps, self.last, self.last_cpu = laps, time.perf_counter(), _children_cpu()

    def lap(self, name):
        now, cpu = time.perf_counter(), _children_cpu()
        if self.laps is not None:
            self.laps[name] = now - self.last
            self.laps[f"{name}_workers_cpu"] = cpu - self.last_cpu
        self.last, self.last_cpu = now, cpu


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def validate_all(cfg, candidates, progress=True):
    """Check every candidate in cfg.workers processes, one progress bar; results in candidate order."""
    tasks = [(cfg, rel, label) for rel, label in candidates]
    chunk = max(1, min(16, len(tasks) // (cfg.workers * 8)))
    # spawn, not fork: the caller may hold threads (torch, DALI) that a forked child would inherit broken
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(tqdm(pool.map(check, tasks, chunksize=chunk), total=len(tasks), desc="validate",
                         unit="img", disable=not progress))


def _write_formats(cfg, splits):
    """Beton and shards of every split; returns {split: the shards' manifest entries}."""
    from ingest.beton import write_beton  # imports torch and numba: only when there is work
    from ingest.shards import write_shards

    shards = {}
    for name, samples in splits.items():  # FFCV's writer shows its own progress bar
        write_beton(layout.beton_path(cfg.out, name), samples)
        shards[name] = write_shards(cfg.out, name, samples, cfg.seed, cfg.shard_size)
    return shards


def _params(cfg):
    return {"store_size": cfg.store_size, "quality": cfg.quality, "seed": cfg.seed, "test_share": cfg.test_share,
            "shard_size": cfg.shard_size, "min_side": cfg.min_side, "max_pixels": cfg.max_pixels,
            "pipeline": cfg.cache_params()}


def _manifest(cfg, found, fingerprint, quarantine, splits, shards):
    written = sum(len(part) for part in splits.values())
    assert written + len(quarantine) + len(found.ignored) == found.found, "a source file was lost or doubled"
    return {
        "classes": found.classes, **_params(cfg), "source": str(cfg.src), "fingerprint": fingerprint,
        "versions": _versions(), "found": found.found, "written": written, "quarantined": len(quarantine),
        "ignored": len(found.ignored),
        "splits": {name: {"count": len(part),
                          "per_class": {c: sum(s.label == i for s in part) for i, c in enumerate(found.classes)},
                          "shards": shards[name]}
                   for name, part in splits.items()},
    }


def _versions():
    found = {"python": platform.python_version()}
    for dist in ("fastpix", "pillow", "ffcv", "nvidia-dali-cuda130", "webdataset", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _csv(header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _up_to_date(out, fingerprint):
    try:
        manifest = json.loads((out / layout.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = [layout.beton_path(out, s).name for s in layout.SPLITS] + [layout.csv_path(out, s).name
                                                                       for s in layout.SPLITS]
    files += [f for s in layout.SPLITS for sh in manifest["splits"][s]["shards"]
              for f in (sh["tar"], layout.index_name(sh["tar"]))]
    return manifest.get("fingerprint") == fingerprint and all((out / f).is_file() for f in files)


def _remove_stale(out, manifest):
    """Shards of an earlier, bigger build and temp files of a killed one."""
    keep = {f for part in manifest["splits"].values() for sh in part["shards"]
            for f in (sh["tar"], layout.index_name(sh["tar"]))}
    for split_name in layout.SPLITS:
        for path in [*out.glob(f"{split_name}-*.tar"), *out.glob(f"{split_name}-*.idx")]:
            if path.name not in keep:
                path.unlink()
    for tmp in out.glob(".*.tmp*"):
        tmp.unlink()


def _prune_cache(cache, used):
    used = {Path(p) for p in used}
    for path in cache.glob("*/*"):
        if path.suffix == ".jpg" and path not in used or ".tmp" in path.name:
            path.unlink()


def _clear_cache(cache):
    for path in cache.glob("*/*"):
        path.unlink()


def main(argv=None):
    p = Parser(prog="python ingest/build.py", description="Ingest a folder of labelled photos (one subfolder "
               "per class) into validated, split FFCV and DALI webdataset shards.")
    d = IngestConfig
    p.add_argument("--src", type=Path, help="folder with one subfolder per class (default: the generated demo)")
    p.add_argument("--out", type=Path, default=layout.DEFAULT_OUT, help="ingested dataset folder")
    p.add_argument("--store-size", type=int, default=d.store_size, help="shorter side of stored images, px")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality of the one re-encode")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the train shard shuffle")
    p.add_argument("--test-share", type=float, default=d.test_share, help="share of each class held out")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per tar shard")
    p.add_argument("--min-side", type=int, default=d.min_side, help="smaller photos are quarantined, px")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger headers are quarantined as bombs")
    p.add_argument("--workers", type=int, default=d.workers, help="validation processes (0 = all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date, without the file cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    started = time.perf_counter()
    src = args.src
    if src is None:
        from ingest import demo
        src = layout.DEFAULT_SRC
        demo.generate(src, progress=not args.quiet)
    cfg = IngestConfig(src=src, out=args.out, store_size=args.store_size, quality=args.quality, seed=args.seed,
                       test_share=args.test_share, shard_size=args.shard_size, min_side=args.min_side,
                       max_pixels=args.max_pixels, workers=args.workers, force=args.force)
    build(cfg, progress=not args.quiet)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run(main)
