"""`python ingest/build.py [--src DIR] [--out DIR]`: a folder of labelled photos -> a validated, split dataset
in both FFCV and DALI webdataset form (the format is ingest/layout.py).

scan -> validate in worker processes (cached per file) -> drop duplicates -> split -> write, manifest last.
Every file found is accounted for as written, quarantined or ignored. A rerun over an unchanged source is
a no-op if every data file still has the manifest's size and checksum, and otherwise rewrites just the
damaged files; a run killed at any point is finished by the next one with the same result, and a child
process's death stops it with one line (ingest/children.py). It writes only into a folder of its own
(ingest/journal.py). Without --src the 500px-like demo is generated (once) into
data/demo-500px and ingested. `--verify` only reads: ingest/verify.py.

Over 300 lines because it holds the one order of the stages and the rerun logic (up to date, repair the
damaged files, or rebuild) that ties them together; every stage itself is its own module (scan, validate,
dedup, split, shards, beton, journal, verify).
"""
import csv
import errno
import functools
import io
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

if __name__ == "__main__" and not __package__:  # run by its path: import from the repo root, not ingest/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cli import Parser, UsageError, add_options, config_from, run  # noqa: E402
from files import Busy, one_writer, read_json, write_text  # noqa: E402
from ingest import cache, layout  # noqa: E402
from ingest.children import process_pool, watch_children  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.dedup import dedup  # noqa: E402
from ingest.journal import claim  # noqa: E402
from ingest.scan import scan, source_path  # noqa: E402
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
    with one_writer(cfg.out):  # a second ingest into it is refused, naming this one
        journal = claim(cfg.out, cfg.force)
        doing = {"what": f"the validated images to {cfg.cache_dir}", "bytes_left": _image_bytes(cfg.store_size)
                 * len(found.candidates) * 3}  # the cache, then a tar and a beton copy of it
        try:
            return _build(cfg, found, journal, clock, progress, log, doing)
        except cache.Damaged as err:
            raise UsageError(f"{err}: rerun to make it again from the source") from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(cfg.out).free
            needed = doing["bytes_left"] + getattr(err, "overhead", 0)
            raise UsageError(f"disk full while writing {doing['what']}: about {_megabytes(needed)} more is needed "
                             f"({_megabytes(free)} free); what was written is kept: free space and rerun to "
                             "finish") from None


def _megabytes(n):
    """Bytes as MB, never rounded down to a misleading 0."""
    return f"{n / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:.0f} MB"


def _image_bytes(store_size):
    """Rough size of one stored JPEG before any is made: ~0.3 byte per pixel at quality 90, 4:3 photos."""
    return int(0.4 * store_size ** 2)


def _build(cfg, found, journal, clock, progress, log, doing):
    clock.lap("scan")
    fingerprint = found.fingerprint({**_params(cfg), "source": str(cfg.src)})
    previous = _previous_manifest(cfg.out)
    damaged = None  # None: write everything; else the names to rewrite
    if not cfg.force and _same_build(previous, fingerprint):
        damaged = journal.damaged(previous["files"])
        if not damaged:
            log(f"{cfg.out} is up to date with {cfg.src} (use --force to rebuild)")
            if "checksum" not in previous:  # written by a fastpix before manifests carried one
                previous = layout.write_manifest(cfg.out, previous)
                log(f"added a checksum to {cfg.out / layout.MANIFEST}: hand edits of it are now refused")
            return previous
        log(f"{cfg.out}: {', '.join(damaged)} damaged or missing: rewriting {'it' if len(damaged) == 1 else 'them'}")
    if cfg.force:
        cache.prune(cfg.cache_dir)

    checked = validate_all(cfg, found.candidates, progress)
    clock.lap("validate")
    kept, duplicates = dedup([c for c in checked if not c.reason], found.classes)
    quarantine = sorted(found.quarantined + [(c.rel, c.reason) for c in checked if c.reason] + duplicates)
    splits = split(kept, found.classes, cfg.seed, cfg.test_share)  # may raise: nothing written yet
    formats = _formats(log)
    outputs, shards = _plan(cfg, splits, quarantine, formats, progress)

    if damaged is not None:
        doing["what"] = f"the damaged files ({', '.join(damaged)}) to {cfg.out}"
        if _repaired(journal, outputs, damaged, previous["files"], log):
            clock.lap("write")
            return previous
    (cfg.out / layout.MANIFEST).unlink(missing_ok=True)  # from here the folder is incomplete until the end
    journal.plan(outputs)
    files, images = {}, sum(s.stored_bytes for part in splits.values() for s in part)
    doing["bytes_left"] = images * len(formats) + 2048 * len(kept)  # + tar headers; the csvs are small
    for name, write in outputs.items():
        doing["what"] = str(cfg.out / name)
        write(cfg.out / name)
        files[name] = journal.record(name)
        doing["bytes_left"] = max(0, doing["bytes_left"] - files[name]["bytes"])
    doing["what"] = str(cfg.out / layout.MANIFEST)
    manifest = _manifest(cfg, found, fingerprint, quarantine, splits, shards, formats, files)
    journal.remove_stale(keep=outputs)
    manifest = layout.write_manifest(cfg.out, manifest)
    cache.prune(cfg.cache_dir, keep=[c.cached for c in checked])
    clock.lap("write")

    m = manifest
    log(f"{m['written']} written + {m['quarantined']} quarantined + {m['ignored']} ignored = {m['found']} found; "
        f"train {len(splits['train'])}, test {len(splits['test'])} -> {cfg.out}")
    return manifest


def _previous_manifest(out):
    """The manifest already in `out` if it is readable, else None (then everything is rewritten)."""
    path = out / layout.MANIFEST
    if not path.is_file() or layout.manifest_problem(path):
        return None
    return read_json(path)


def _same_build(manifest, fingerprint):
    """Whether `manifest` is what this build would write, judged without reading the data files: same
    source and settings, made by a fastpix that records `files`, and with the formats this machine can
    write now (a webdataset-only build is redone once FFCV imports)."""
    if manifest is None or manifest.get("fingerprint") != fingerprint or "files" not in manifest:
        return False
    return "ffcv" in manifest.get("formats", []) or _ffcv_error() is not None


def _repaired(journal, outputs, damaged, files, log):
    """Rewrite just the damaged files; True if they came out with the manifest's bytes again (the rest
    was intact, so the folder is whole). False when the writers no longer reproduce them (another library
    version, say): then the caller rebuilds everything, as the files would not fit together."""
    if not set(damaged) <= set(outputs):
        return False
    for name in damaged:
        outputs[name](journal.out / name)
        if journal.record(name) != files[name]:
            log(f"{name} came out different from the manifest's: rebuilding everything")
            return False
    log(f"repaired {', '.join(damaged)} in {journal.out}")
    return True


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
    with process_pool(cfg.workers, "validation") as pool:
        return list(tqdm(pool.map(check, tasks, chunksize=chunk), total=len(tasks), desc="validate",
                         unit="img", disable=not progress))


def _formats(log):
    """The formats this machine can write; FFCV's missing compiled libraries cost only the .beton."""
    error = _ffcv_error()
    if error is None:
        return ["webdataset", "ffcv"]
    log(f"warning: FFCV cannot be imported ({error}): writing the webdataset shards only; "
        "the ffcv loader will not read this dataset")
    return ["webdataset"]


@functools.cache
def _ffcv_error():
    """None if FFCV's writer imports, else why not (once per process: the import takes seconds)."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as err:  # a missing libturbojpeg or libopencv surfaces as an ImportError too
        return str(err)
    return None


def _plan(cfg, splits, quarantine, formats, progress):
    """({file name: function writing it atomically to a path}, in write order; {split: shard entries})."""
    from ingest.shards import plan_shards, write_tar

    rows = ("path", "label", "sha256", "width", "height")
    outputs = {layout.csv_path("", name).name: _text_writer(_csv(rows, [
        (source_path(cfg.src, s.rel), s.label, s.sha256, s.width, s.height) for s in samples]))
        for name, samples in splits.items()}
    outputs[layout.QUARANTINE] = _text_writer(_csv(("path", "reason"), quarantine))
    shards = {}
    for name, samples in splits.items():
        if "ffcv" in formats:
            outputs[layout.beton_path("", name).name] = functools.partial(_write_beton, samples=samples,
                                                                         progress=progress)
        shards[name] = []
        for tar, ids in plan_shards(name, len(samples), cfg.seed, cfg.shard_size):
            outputs[tar] = functools.partial(write_tar, samples=samples, ids=ids)
            outputs[layout.index_name(tar)] = functools.partial(_write_index, tar=tar)
            shards[name].append({"tar": tar, "count": len(ids)})
    return outputs, shards


def _text_writer(text):
    return lambda path: write_text(path, text)


def _write_beton(path, samples, progress):
    from ingest.beton import write_beton  # imports torch and numba: only when there is work

    with watch_children(f"writing {path}"):
        write_beton(path, samples, progress)


def _write_index(path, tar):
    from ingest.shards import write_index

    write_index(path.with_name(tar), path)


def _params(cfg):
    return {"store_size": cfg.store_size, "quality": cfg.quality, "seed": cfg.seed, "test_share": cfg.test_share,
            "shard_size": cfg.shard_size, "min_side": cfg.min_side, "max_pixels": cfg.max_pixels,
            "pipeline": cfg.cache_params()}


def _manifest(cfg, found, fingerprint, quarantine, splits, shards, formats, files):
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
        "formats": formats, "files": files,
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


def _verify(out, workers, started):
    from ingest.verify import damaged_names, verify

    problems, size = verify(out.resolve(), workers)
    for line in problems:
        print(line)
    took = time.perf_counter() - started
    if problems:
        source = layout.read_manifest(out)["source"]
        try:
            with one_writer(out):  # noted for the rerun: some damage keeps the sha256 (a JPEG stored damaged)
                claim(out, force=False).distrust(damaged_names(problems))
        except (Busy, UsageError, OSError) as err:  # held by an ingest, not ours, or read-only
            print(f"note: the damaged files could not be noted for the rerun ({err})")
        print(f"{len(problems)} problem{'s' * (len(problems) > 1)} in {out}: rerun python ingest/build.py "
              f"--src {source} --out {out} to rewrite the damaged files")
        return 1
    print(f"{out}: {size / 1e6:.1f} MB verified in {took:.1f} s: no damage found")
    return 0


def main(argv=None):
    p = Parser(prog="python ingest/build.py", description="Ingest a folder of labelled photos (one subfolder "
               "per class) into validated, split FFCV and DALI webdataset shards.")
    add_options(p, IngestConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verify", action="store_true",
                   help="only re-read every file of --out and name what is damaged (exit 1 if anything is)")
    p.add_argument("--publish", metavar="URL", help="only upload the ingested dataset in --out to URL (s3://, gs://, "
                   "file://), its manifest last; train from it with --data URL")
    args = p.parse_args(argv)
    cfg = config_from(IngestConfig, args)
    started = time.perf_counter()
    if args.verify:
        return _verify(cfg.out, cfg.workers or len(os.sched_getaffinity(0)), started)
    if args.publish:
        from ingest.remote import publish
        count = publish(cfg.out, args.publish, progress=not args.quiet)
        print(f"{cfg.out}: {count} files published to {args.publish} in {time.perf_counter() - started:.1f} s")
        return 0
    if cfg.src is None:
        from ingest import demo
        demo.generate(layout.DEFAULT_SRC, progress=not args.quiet)
        cfg = replace(cfg, src=layout.DEFAULT_SRC)
    build(cfg, progress=not args.quiet)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run(main)
