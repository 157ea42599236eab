"""`python ingest/build.py --verify [--out DIR]`: re-read every data file of an ingested folder and name each
problem in one line: checksums and sizes against the manifest, every tar member, each index against its tar,
every stored JPEG decoded as FFCV decodes it (ingest/jpeg.py; and its size and label against the csv), and
the .beton's records against the tars' bytes. It reads only (build.py notes what it names in the journal),
and a plain rerun of the ingest rewrites what it reports.

The stored JPEGs have no hash of their own: the csv's sha256 is of the source photo (it finds duplicates),
so each image is checked by its shard's checksum, by decoding it, and by the beton holding the same bytes.
Shards are checked in worker processes, one file per task.
"""
import csv
import hashlib
import os
import struct
import tarfile

from cli import UsageError
from ingest import layout
from ingest.children import process_pool
from ingest.jpeg import decode_size

RESIDENT_COPIES = "resident-*.pt"  # loaders.resident_cache.PATTERN, without importing torch when there are none


def verify(out, workers=1):
    """[problem lines] of the ingested folder `out` (empty = no damage found), and the bytes read."""
    manifest = layout.read_manifest(out)
    if "files" not in manifest:
        raise UsageError(f"{out} was ingested by an older fastpix that kept no checksums: rerun python "
                         f"ingest/build.py --src {manifest.get('source', '<photos>')} --out {out}")
    problems = [p for name, want in manifest["files"].items() for p in _file_problems(out, name, want)]
    damaged = {line.split(":")[0] for line in problems}
    tables = {split: _table(out, split, manifest, problems, damaged) for split in layout.SPLITS}
    tar_tasks = [(str(out), split, sh["tar"], sh["count"], tables[split])
                 for split in layout.SPLITS for sh in manifest["splits"][split]["shards"]]
    jpegs = {split: {} for split in layout.SPLITS}
    with _pool(workers, len(tar_tasks)) as pool:
        for (_, split, name, _, _), (found, hashes) in zip(tar_tasks, pool.map(_check_shard, tar_tasks)):
            problems += found
            if name not in damaged:  # the beton is compared with intact tars only, so it is not blamed for them
                jpegs[split].update(hashes)
    if "ffcv" in manifest.get("formats", ["ffcv"]):  # in this process: importing FFCV costs ~10 s of numba
        problems += [p for split in layout.SPLITS for p in _check_beton(
            out, split, manifest["splits"][split]["count"], tables[split], jpegs[split])]
    if any(out.glob(RESIDENT_COPIES)):  # derived by the resident loader: checked by its own content hash
        from loaders import resident_cache
        problems += resident_cache.problems(out)
    return problems, sum(f["bytes"] for f in manifest["files"].values())


def damaged_names(problems):
    """The data files that problem lines of `verify` name as damaged (not those it could not check)."""
    return sorted({line.split(":")[0] for line in problems if UNCHECKED not in line})


UNCHECKED = "cannot be checked here"


def _file_problems(out, name, want):
    path = out / name
    if not path.is_file():
        return [f"{name}: missing"]
    size = path.stat().st_size
    if size != want["bytes"]:
        how = "truncated" if size < want["bytes"] else "grown"
        return [f"{name}: {how}: {size} bytes, the manifest says {want['bytes']}"]
    if layout.file_sha256(path) != want["sha256"]:
        return [f"{name}: its bytes changed since ingest (sha256 differs from the manifest)"]
    return []


def _table(out, split, manifest, problems, damaged):
    """{id: (label, width, height)} from the split's csv, or None if it is damaged or unusable (then noted)."""
    name = layout.csv_path(out, split).name
    if name in damaged:
        return None
    try:
        with open(out / name, newline="") as f:
            table = {i: (int(r["label"]), int(r["width"]), int(r["height"])) for i, r in enumerate(csv.DictReader(f))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems.append(f"{name}: unreadable ({err})")
        return None
    if len(table) != manifest["splits"][split]["count"]:
        problems.append(f"{name}: {len(table)} rows, the manifest says {manifest['splits'][split]['count']}")
    return table


def _check_shard(task):
    """Worker: (out, split, tar name, count, csv table) -> ([problems], {id: sha256 of its JPEG})."""
    out, split, name, count, table = task
    path, problems, hashes, samples = f"{out}/{name}", [], {}, {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
            end = tar.offset
    except (OSError, tarfile.TarError) as err:
        problems.append(f"{name}: unreadable after {len(samples)} samples: {err}")
    else:  # tarfile ends quietly at a damaged header past the first: what loaders would read
        if len(samples) < count:
            problems.append(f"{name}: only {len(samples)} of {count} samples readable: the tar stops at byte "
                            f"{end} of {os.path.getsize(path)} (a damaged header)")
        elif len(samples) > count:
            problems.append(f"{name}: {len(samples)} samples, the manifest says {count}")
    for key, parts in samples.items():
        problems += [f"{name}: sample {key}: {p}" for p in _sample_problems(key, parts, table)]
        if "jpg" in parts and key.isdigit():
            hashes[int(key)] = hashlib.sha256(parts["jpg"]).hexdigest()
    idx = layout.index_name(name)
    if not problems and os.path.isfile(f"{out}/{idx}"):  # a damaged tar is reported already, not its index
        from ingest.shards import index_lines

        with open(f"{out}/{idx}", errors="replace") as f:
            if f.read().splitlines() != index_lines(path):
                problems.append(f"{idx}: does not match {name}")
    return problems, hashes


def _sample_problems(key, parts, table):
    if sorted(parts) != ["cls", "jpg", "lbl"]:
        return [f"has {', '.join(sorted(parts))}, not cls, jpg, lbl"]
    if not key.isdigit():
        return ["key is not a sample id"]
    problems, want = [], table.get(int(key)) if table else None
    if table is not None and want is None:
        return ["id is not in the csv"]
    label = struct.unpack("<q", parts["lbl"])[0] if len(parts["lbl"]) == 8 else None
    if label is None or parts["cls"] != str(label).encode():
        problems.append("cls and lbl disagree")
    elif want and label != want[0]:
        problems.append(f"label {label}, the csv says {want[0]}")
    try:
        size = decode_size(bytes(parts["jpg"]))
        if want and size != want[1:]:
            problems.append(f"image is {size[0]}x{size[1]}, the csv says {want[1]}x{want[2]}")
    except ValueError as err:
        problems.append(f"JPEG does not decode: {err}")
    return problems


def _check_beton(out, split, count, table, jpegs):
    """The beton opens and holds `count` records, each with the tar's JPEG bytes and the csv's label."""
    import numpy as np

    name = layout.beton_path(out, split).name
    try:
        from ffcv.reader import Reader
    except ImportError as err:
        return [f"{name}: {UNCHECKED}: FFCV does not import ({err})"]
    try:
        reader = Reader(f"{out}/{name}")
        image, label = reader.metadata["f0"], reader.metadata["f1"]
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        raw = np.memmap(reader.file_name, np.uint8, mode="r")
        if reader.num_samples != count:
            return [f"{name}: {reader.num_samples} records, the manifest says {count}"]
        problems = []
        for i in range(count):
            ptr = int(image["data_ptr"][i])
            data = raw[ptr:ptr + sizes[ptr]].tobytes()
            if i in jpegs and hashlib.sha256(data).hexdigest() != jpegs[i]:
                problems.append(f"{name}: record {i}: JPEG bytes differ from the tar's")
            if table and i in table and int(label[i]) != table[i][0]:
                problems.append(f"{name}: record {i}: label {int(label[i])}, the csv says {table[i][0]}")
        return problems
    except FileNotFoundError:
        return []  # already reported as missing
    except Exception as err:  # FFCV fails on damaged files with whatever numpy or struct raises
        return [f"{name}: FFCV cannot read it: {type(err).__name__}: {err}"]


class _InProcess:
    """The pool's map without processes, for one worker or one task."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, tasks):
        return map(fn, tasks)


def _pool(workers, tasks):
    if workers <= 1 or tasks <= 1:
        return _InProcess()
    return process_pool(min(workers, tasks), "verify")
