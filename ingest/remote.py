"""Ingested datasets in object storage or behind HTTP: `--data URL` (s3://, gs://, https://, file://) fetched
into a node-local cache, and `python ingest/build.py --out DIR --publish URL` to put one there.

The loaders only ever see a local folder: `local_folder` turns a URL into one. It reads the manifest from the
URL, then, in the cache folder keyed by the dataset's fingerprint (`--cache-dir`, default ~/.cache/fastpix),
fetches every data file the folder lacks, several at once with a progress bar. Each file is written atomically
(files.atomic_path) and only after its sha256 matched the manifest's, so a kill -9 costs the files in flight
and the rerun fetches just those; a file changed on the server never reaches a loader. The manifest is written
last, and the checked files' stamps go into the loaders' VERIFIED record so they are not hashed twice. One
process per node fetches: the folder's writer lock (files.one_writer) makes the others wait, saying for whom.

Transport is fsspec's, with each scheme's client optional (s3fs, gcsfs, aiohttp): a missing one is one line
naming the package. This module writes no storage client of its own.
"""
import errno
import json
import re
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from cli import UsageError
from files import WRITER_NOTE, atomic_path, one_writer, read_json, temp_of, write_bytes, write_json
from ingest import layout

CLIENTS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
CACHE_MARKER = ".fastpix-cache.json"  # {"fingerprint", "url"}: whose files a cache folder holds
FETCHES = 8  # files in flight at once: enough to hide a store's per-request latency


def default_cache_dir():
    return Path.home() / ".cache" / "fastpix"


def is_url(data):
    """Whether --data names a URL (scheme://...) rather than a local folder."""
    return "://" in str(data)


def filesystem(url):
    """(fsspec filesystem, path inside it) of `url`, or one line naming the package its scheme needs."""
    scheme = str(url).split("://", 1)[0].lower()
    try:
        import fsspec.core
    except ImportError:
        raise UsageError(f"{url}: reading a URL needs the fsspec package: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError:
        package = CLIENTS.get(scheme, f"the fsspec client of {scheme}://")
        raise UsageError(f"{url}: {scheme}:// needs the {package} package: pip install {package}") from None
    except ValueError as err:  # fsspec's "Protocol not known"
        raise UsageError(f"{url}: {err}") from None


def remote_path(root, name):
    return f"{root.rstrip('/')}/{name}"


def read_remote_manifest(fs, root, url):
    """(manifest bytes, manifest) read from the URL, or one line saying why they are not a dataset's."""
    try:
        data = fs.cat_file(remote_path(root, layout.MANIFEST))
    except FileNotFoundError:
        raise UsageError(f"{url} is not an ingested dataset (no {layout.MANIFEST} there): publish one with "
                         f"python ingest/build.py --out DIR --publish {url}") from None
    except OSError as err:
        raise UsageError(f"{url}: cannot read {layout.MANIFEST} ({err})") from None
    problem = layout.manifest_bytes_problem(data)
    if problem or "files" not in json.loads(data):
        raise UsageError(f"{url}/{layout.MANIFEST} is damaged ({problem or 'no files listed'}): publish the "
                         "dataset again")
    return data, json.loads(data)


def local_folder(data, cache_dir=None, progress=True):
    """`data` itself when it is a local folder; for a URL, the cache folder holding the whole dataset, checked
    file by file against the manifest's sha256 (fetching what is missing or damaged first)."""
    if not is_url(data):
        return data
    fs, root = filesystem(data)
    raw, manifest = read_remote_manifest(fs, root, data)
    fingerprint = str(manifest["fingerprint"])
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,128}", fingerprint):  # it names a folder: nothing like ../ from a server
        raise UsageError(f"{data}/{layout.MANIFEST} has a malformed fingerprint: publish the dataset again")
    folder = Path(cache_dir or default_cache_dir()) / fingerprint
    check_owner(folder, fingerprint)

    def say(message):
        print(f"{data}: another process fetches it into the cache; {message}", file=sys.stderr, flush=True)

    with one_writer(folder, wait=True, say=say):
        check_owner(folder, fingerprint)
        if not (folder / CACHE_MARKER).is_file():
            write_json(folder / CACHE_MARKER, {"fingerprint": fingerprint, "url": str(data)})
        for path in folder.iterdir():
            if temp_of(path.name) in manifest["files"]:  # a fetch killed midway: its files start over
                path.unlink()
        missing = missing_files(folder, manifest)
        if missing:
            (folder / layout.MANIFEST).unlink(missing_ok=True)  # incomplete until every file is back
            fetch(fs, root, data, folder, manifest, missing, progress)
        local = folder / layout.MANIFEST
        if not local.is_file() or local.read_bytes() != raw:
            write_bytes(local, raw)  # last: its presence means the folder is whole
    return folder


def check_owner(folder, fingerprint):
    """A cache folder holding another dataset's files is never used: one line saying so."""
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        if folder.is_dir() and any(p.name != WRITER_NOTE for p in folder.iterdir()):
            raise UsageError(f"{folder} holds files that are not a fastpix cache: move them away")
        return
    try:
        owner = read_json(marker).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != fingerprint:
        raise UsageError(f"{folder} holds the files of dataset {str(owner)[:12]}, not {fingerprint[:12]}: it is not "
                         "used; delete it and rerun")


def missing_files(folder, manifest):
    """Names of the manifest's files that the folder lacks or holds with other bytes. A file is hashed once per
    version (its stamp in VERIFIED, shared with the loaders' start-up check): a rerun costs a stat per file."""
    try:
        record = read_json(folder / layout.VERIFIED)
    except (OSError, ValueError):
        record = {}
    missing, verified = [], {}
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            missing.append(name)
            continue
        stamp = layout.file_stamp(path, info["sha256"])
        if record.get(name) == stamp:
            continue
        if layout.file_sha256(path) == info["sha256"]:
            verified[name] = stamp
        else:
            missing.append(name)
    record_verified(folder, verified)
    return missing


def fetch(fs, root, url, folder, manifest, names, progress):
    """Fetch `names` into `folder`, FETCHES at a time, each checked against its sha256 before it is renamed
    into place; a full disk is one line saying how much the dataset needs."""
    files = manifest["files"]
    need = sum(files[n]["bytes"] for n in names)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UsageError(disk_full(url, folder, need, free, manifest))
    bar = tqdm(total=need, unit="B", unit_scale=True, desc=f"fetch {url}", disable=not progress)
    lock = threading.Lock()

    def one(name):
        info = files[name]
        with atomic_path(folder / name) as tmp:
            callback = progress_callback(bar, lock)
            fs.get_file(remote_path(root, name), str(tmp), callback=callback)
            callback.absolute_update(info["bytes"])  # the rest, for clients that report no progress
            if tmp.stat().st_size != info["bytes"] or layout.file_sha256(tmp) != info["sha256"]:
                raise UsageError(f"{url}/{name} does not match its sha256 in the dataset's manifest: it changed on "
                                 "the server or was damaged; it is not used (publish the dataset again)")
        return name, layout.file_stamp(folder / name, info["sha256"])

    stamps = {}
    try:
        with ThreadPoolExecutor(FETCHES) as pool:
            stamps.update(pool.map(one, names))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UsageError(disk_full(url, folder, need, shutil.disk_usage(folder).free, manifest)) from None
    finally:
        bar.close()
    record_verified(folder, stamps)


def progress_callback(bar, lock):
    """An fsspec callback that moves the shared bar by the bytes one file has gained."""
    from fsspec.callbacks import Callback

    class Progress(Callback):
        shown = 0

        def call(self, *args, **kwargs):
            with lock:
                bar.update(self.value - self.shown)
                self.shown = self.value

    return Progress()


def record_verified(folder, stamps):
    """Add `stamps` ({name: layout.file_stamp}) to the folder's VERIFIED record, which the loaders read."""
    if not stamps:
        return
    record_path = folder / layout.VERIFIED
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        record = {}
    write_json(record_path, {**record, **stamps}, indent=None)


def disk_full(url, folder, need, free, manifest):
    total = sum(f["bytes"] for f in manifest["files"].values())
    return (f"not enough space for {url} in {folder}: it needs {need / 1e6:,.1f} MB more ({total / 1e6:,.1f} MB "
            f"in all), {free / 1e6:,.1f} MB is free: free some, or pick another --cache-dir")


def publish(out, url, progress=True):
    """Upload the ingested dataset in `out` to `url`: its data files (several at once), then its manifest, last,
    so that a reader never sees a half-published dataset (an older manifest there is removed first: its files
    are about to be replaced)."""
    fs, root = filesystem(url)
    if {"http", "https"} & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise UsageError(f"--publish {url}: {url.split('://')[0]}:// is read-only here; publish to s3://, gs:// or "
                         "file:// and serve that")
    manifest = layout.read_manifest(out)
    for split in layout.SPLITS:  # what goes out is what the manifest promises
        layout.check_split(out, split, manifest, reads=manifest.get("formats", ["webdataset"]))
    try:
        if fs.exists(remote_path(root, layout.MANIFEST)):
            fs.rm_file(remote_path(root, layout.MANIFEST))
        fs.makedirs(root, exist_ok=True)
        names = list(manifest["files"])
        bar = tqdm(total=sum(manifest["files"][n]["bytes"] for n in names), unit="B", unit_scale=True,
                   desc=f"publish {url}", disable=not progress)

        def one(name):
            fs.put_file(str(Path(out) / name), remote_path(root, name))
            bar.update(manifest["files"][name]["bytes"])

        with ThreadPoolExecutor(FETCHES) as pool:
            list(pool.map(one, names))
        bar.close()
        fs.put_file(str(Path(out) / layout.MANIFEST), remote_path(root, layout.MANIFEST))
    except PermissionError as err:
        raise UsageError(f"--publish {url}: permission denied ({err})") from None
    return len(names) + 1
