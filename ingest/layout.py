"""Where ingested data lives and what it looks like: the contract between `ingest/` and `loaders/`.

An ingested folder (default `data/ingested`) holds, for each split in SPLITS:
- `<split>.beton`: FFCV file with fields `image` (RGB JPEG) and `label` (int); record i is sample id i.
- `<split>-NNNNN.tar` + `<split>-NNNNN.idx`: webdataset shards with DALI index files. Each sample has
  key `%08d` % id, `<key>.jpg` (the same JPEG bytes as the beton), `<key>.cls` (ASCII label, the
  webdataset convention) and `<key>.lbl` (label as 8-byte little-endian int64, so DALI yields dense
  int64 labels with `dtypes=[UINT8, INT64]`). Train shards are shuffled at write time (DALI shuffles
  only within a buffer); test shards are in id order.
- `<split>.csv`: one row per sample in id order: path (where the photo's bytes are: relative to the source,
  or, reached through a link leading outside it, absolute), label, sha256, width, height (of the stored image).
- `quarantine.csv` (path, reason) and `manifest.json` (written last: its presence means complete):
  `classes` (sorted names; label = index), `store_size`, `quality`, `seed`, `test_share`, `source`
  (absolute path of the source folder), `fingerprint`, `versions`, `found`/`written`/`quarantined`/
  `ignored` counts, and `splits.<split>` = {`count`, `per_class` {name: n}, `shards` [{`tar`, `count`}]};
  also `shard_size`, `min_side`, `max_pixels` and `pipeline` (what else decided the bytes);
  `checksum`: sha256 of the manifest's canonical JSON without it (`files.checksum_of`; absent in manifests of
  a fastpix before it, which load unchecked); `formats`: `["webdataset", "ffcv"]`, or `["webdataset"]` when
  FFCV could not be imported at ingest (then there is no `.beton`); `files`: {name relative to the folder:
  {`bytes`, `sha256`}} of every data file ingest wrote (betons, tars, idx files, the csvs and quarantine.csv;
  not the manifest itself), what `python ingest/build.py --verify` and the loaders' start-up check compare
  against.
- The stored JPEGs are baseline (nvJPEG's hardware decoder takes no other), RGB, upright (no EXIF), with
  the shorter side = `store_size` unless the photo was smaller (never upscaled).
- Hidden entries (`.cache/`, `.ingest-journal.json`, temp files `.<name>.tmp<pid>`) belong to ingest; other tools
  may add files of their own, and ingest deletes only files its journal says it wrote (ingest/journal.py).
  The loaders add `.verified.json` (VERIFIED: which file versions' sha256 they checked, with its own checksum
  and the manifest's fingerprint, see verify_digests).

The sample id is the row number in `<split>.csv`, so every backend can be checked against the others.
"""
import csv
import hashlib
import json
from pathlib import Path

from cli import UsageError
from files import read_json, seal, sealed, write_json

SPLITS = ("train", "test")
DEFAULT_SRC = Path("data/demo-500px")
DEFAULT_OUT = Path("data/ingested")
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
JOURNAL = ".ingest-journal.json"  # ingest's marker and record of what it wrote (ingest/journal.py)


def beton_path(data_dir, split):
    return Path(data_dir) / f"{split}.beton"


def csv_path(data_dir, split):
    return Path(data_dir) / f"{split}.csv"


def shard_name(split, index):
    return f"{split}-{index:05d}.tar"


def index_name(tar_name):
    return tar_name[: -len(".tar")] + ".idx"


def file_sha256(path):
    """Hex sha256 of a file's bytes, read in chunks (about 2 s per GB on these shared cores)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(data_dir):
    """The manifest of an ingested folder, or a UsageError that names manifest.json and how to repair it.
    Every reader of a dataset comes through here, so a hand edit (swapped or dropped classes) is caught."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{data_dir} is not an ingested dataset (no {MANIFEST}): run python ingest/build.py first")
    problem = manifest_problem(path)
    if problem:
        try:
            source = read_json(path)["source"]
        except Exception:  # whatever is left of it: the message still says what to run
            source = "<photos>"
        raise UsageError(f"{path} is damaged ({problem}): rerun python ingest/build.py --src {source} --out "
                         f"{data_dir} to rewrite it")
    return read_json(path)


def manifest_problem(path):
    """Why the file at `path` is not a readable manifest (a short phrase), or None if it is one. A manifest
    without a checksum (a fastpix before it wrote one) passes unchecked; ingest adds one on its next run."""
    try:
        return manifest_bytes_problem(Path(path).read_bytes())
    except OSError as err:
        return f"unreadable: {err.strerror}"


def manifest_bytes_problem(data):
    """Why `data` (a manifest's bytes, from a file or a URL) is not a readable manifest, or None."""
    try:
        manifest = json.loads(data)
    except ValueError:  # JSON errors and undecodable bytes alike
        return "not valid JSON"
    if not isinstance(manifest, dict):
        return "not a JSON object"
    missing = [k for k in ("classes", "fingerprint", "splits") if k not in manifest]
    missing += [f"splits.{s}.{k}" for s in SPLITS for k in ("count", "shards")
                if not isinstance(manifest.get("splits"), dict) or k not in manifest["splits"].get(s, {})]
    if missing:
        return f"missing {', '.join(missing)}"
    if "checksum" in manifest and not sealed(manifest):
        return "edited since ingest: its content does not match its checksum"
    return None


def write_manifest(data_dir, manifest):
    """Write `manifest` (a dict) with its checksum, atomically, as the last file of an ingest; returns it."""
    manifest = seal(manifest)
    write_json(Path(data_dir) / MANIFEST, manifest, indent=1, sort_keys=True)
    return manifest


def shard_paths(data_dir, split):
    """(tar paths, index paths) of a split, in manifest order."""
    shards = read_manifest(data_dir)["splits"][split]["shards"]
    tars = [Path(data_dir) / s["tar"] for s in shards]
    return tars, [t.with_suffix(".idx") for t in tars]


def read_index(path):
    """A DALI index (wds2idx v1.2: a `v1.2 <samples>` line, then per sample `<ext> <offset> <size> <name>` for
    each member) -> [{ext: (offset, size)}] in tar order; ValueError when it is not one."""
    with open(path) as f:
        version, count = f.readline().split()
        samples = []
        for line in f:
            fields = line.split()
            samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)})
    if not version.startswith("v1.") or int(count) != len(samples):
        raise ValueError(f"says {count} samples but lists {len(samples)}")
    return samples


def damaged_file(data_dir, manifest, path, problem):
    """The one-line error for a data file that does not match the manifest: what is wrong, how to repair."""
    return UsageError(f"{path} {problem}: run python ingest/build.py --verify --out {data_dir} to see what is "
                      f"damaged, then rerun python ingest/build.py --src {manifest.get('source', 'SRC')} "
                      f"--out {data_dir} to repair it")


def check_split(data_dir, split, manifest, *, reads=("webdataset",)):
    """Start-up check that what a loader reads matches `manifest`: UsageError naming the first mismatch.

    Cheap, every start: that the ingest wrote each format in `reads` (`formats`); sizes of the split's csv
    and of the files of each format in `reads` ("webdataset": tars + indexes, "ffcv": the beton) against the
    manifest's `files`; each index's sample count against its shard's `count`, and every indexed member inside
    its tar; the csv's rows against the split's count.
    Once per file version: its full sha256 against the manifest's (verify_digests), for the damage that keeps
    sizes, which a JPEG decoder may not notice."""
    data_dir = Path(data_dir)
    if "files" not in manifest:
        raise UsageError(f"{data_dir} was ingested by an older fastpix: rerun python ingest/build.py "
                         f"--src {manifest.get('source', 'SRC')} --out {data_dir}")
    if "ffcv" in reads and "ffcv" not in manifest.get("formats", ["ffcv"]):
        raise UsageError(f"{data_dir} has no FFCV files (FFCV could not be imported when it was ingested): use "
                         "another --loader, or install FFCV and rerun python ingest/build.py")
    part = manifest["splits"][split]

    def damaged(path, problem):
        return damaged_file(data_dir, manifest, path, problem)

    def check_size(path):
        expected = manifest["files"].get(path.name, {}).get("bytes")
        try:
            size = path.stat().st_size
        except OSError:
            raise damaged(path, "is missing or unreadable") from None
        if expected is None:
            raise damaged(path, "is not in the manifest's files")
        if size != expected:
            raise damaged(path, f"has {size:,} bytes where the manifest says {expected:,}")
        checked.append(path)
        return size

    checked = []
    csv_file = csv_path(data_dir, split)
    check_size(csv_file)
    try:
        with open(csv_file, newline="") as f:
            rows = sum(1 for _ in csv.reader(f)) - 1  # the header
    except (UnicodeDecodeError, csv.Error) as err:  # damage that keeps the size: read before its digest is
        raise damaged(csv_file, f"is not a readable csv ({type(err).__name__})") from None
    if rows != part["count"]:
        raise damaged(csv_file, f"has {rows} rows where the manifest says {part['count']}")
    if "ffcv" in reads:
        check_size(beton_path(data_dir, split))
    if "webdataset" in reads:
        for shard in part["shards"]:
            tar, idx = data_dir / shard["tar"], data_dir / index_name(shard["tar"])
            tar_size = check_size(tar)
            check_size(idx)
            try:
                samples = read_index(idx)
            except (OSError, ValueError, IndexError) as err:
                raise damaged(idx, f"is not a readable DALI index ({err})") from None
            if len(samples) != shard["count"]:
                raise damaged(idx, f"lists {len(samples)} samples where the manifest says {shard['count']}")
            if any(offset + size > tar_size for sample in samples for offset, size in sample.values()):
                raise damaged(idx, f"points past the end of {tar.name}")
    verify_digests(data_dir, manifest, checked)


VERIFIED = ".verified.json"  # the loaders' record of file versions whose sha256 matched the manifest


def verify_digests(data_dir, manifest, paths):
    """Each file's full sha256 against the manifest, once per file version (about 2 s per GB here).

    A file whose (size, mtime, ctime, inode) and manifest digest are recorded in VERIFIED as matching is not
    read again: any write changes its ctime, and a new ingest its digest. The record is derived, so checked
    too: it carries its own checksum and the manifest's fingerprint, and one that is damaged, from another
    dataset or from a fastpix before it is ignored (everything is hashed again). It is written atomically; in
    a read-only folder it is not, and the next start hashes again."""
    record = verified_record(data_dir, manifest)
    verified = {}
    for path in paths:
        stamp = file_stamp(path, manifest["files"][path.name]["sha256"])
        if record.get(path.name) != stamp:
            if file_sha256(path) != stamp[-1]:
                raise damaged_file(data_dir, manifest, path, "does not match its sha256 in the manifest")
            verified[path.name] = stamp
    record_verified(data_dir, manifest, verified)


def verified_record(data_dir, manifest):
    """{file name: stamp} of the VERIFIED record, or {} where it is missing, damaged, another dataset's or an older
    fastpix's: then every file is hashed again."""
    try:
        saved = read_json(Path(data_dir) / VERIFIED)
    except (OSError, ValueError):
        saved = None
    ours = sealed(saved) and saved.get("dataset") == manifest.get("fingerprint")
    return saved["files"] if ours and isinstance(saved.get("files"), dict) else {}


def record_verified(data_dir, manifest, stamps):
    """Add `stamps` ({name: file_stamp}) to the VERIFIED record, atomically; in a read-only folder not at all."""
    if not stamps:
        return
    record = {**verified_record(data_dir, manifest), **stamps}
    try:
        write_json(Path(data_dir) / VERIFIED, seal({"dataset": manifest.get("fingerprint"), "files": record}),
                   indent=None)
    except OSError:
        pass


def file_stamp(path, digest):
    """What VERIFIED records of a file whose sha256 matched `digest`: any write changes its ctime."""
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, digest]
