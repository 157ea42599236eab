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
import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
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
    """A cache folder holding another dataset's files is never used, nor one whose marker is lost or damaged (whose
    files it holds cannot be told): one line naming the marker and the fix."""
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        if folder.is_dir() and any(p.name != WRITER_NOTE for p in folder.iterdir()):
            raise UsageError(f"{folder} holds files but no {CACHE_MARKER}: it is not a fastpix cache, or its marker "
                             "was lost; move the folder away and rerun")
        return
    try:
        owner = read_json(marker).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        owner = None
    if not isinstance(owner, str):
        raise UsageError(f"{marker} is damaged: delete the folder {folder} and rerun (its files are fetched again)")
    if owner != fingerprint:
        raise UsageError(f"{marker} says {folder} holds the files of dataset {owner[:12]}, not {fingerprint[:12]}: "
                         "it is not used; delete the folder and rerun")


def missing_files(folder, manifest):
    """Names of the manifest's files that the folder lacks or holds with other bytes. A file is hashed once per
    version (its stamp in VERIFIED, shared with the loaders' start-up check): a rerun costs a stat per file."""
    record = layout.verified_record(folder, manifest)
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
    layout.record_verified(folder, manifest, verified)
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
    layout.record_verified(folder, manifest, stamps)


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


def disk_full(url, folder, need, free, manifest):
    total = sum(f["bytes"] for f in manifest["files"].values())
    return (f"not enough space for {url} in {folder}: it needs {need / 1e6:,.1f} MB more ({total / 1e6:,.1f} MB "
            f"in all), {free / 1e6:,.1f} MB is free: free some, or pick another --cache-dir")


def publish(out, url, progress=True):
    """Upload the ingested dataset in `out` to `url`: its data files (several at once), then its manifest, last,
    so that a reader never sees a half-published dataset (an older manifest there is removed first: its files
    are about to be replaced). A target that holds anything but a fastpix dataset is not touched; a marker at
    the target keeps a second publish out while this one runs; the sizes there are read back before the
    manifest vouches for them."""
    fs, root = filesystem(url)
    if {"http", "https"} & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise UsageError(f"--publish {url}: {url.split('://')[0]}:// is read-only here; publish to s3://, gs:// or "
                         "file:// and serve that")
    manifest = layout.read_manifest(out)
    for split in layout.SPLITS:  # what goes out is what the manifest promises
        layout.check_split(out, split, manifest, reads=manifest.get("formats", ["webdataset"]))
    names = list(manifest["files"])
    try:
        check_target(fs, root, url, names)
        fs.makedirs(root, exist_ok=True)
        with publish_marker(fs, root, url):
            if fs.exists(remote_path(root, layout.MANIFEST)):
                fs.rm_file(remote_path(root, layout.MANIFEST))
            bar = tqdm(total=sum(manifest["files"][n]["bytes"] for n in names), unit="B", unit_scale=True,
                       desc=f"publish {url}", disable=not progress)

            def one(name):
                fs.put_file(str(Path(out) / name), remote_path(root, name))
                bar.update(manifest["files"][name]["bytes"])

            with ThreadPoolExecutor(FETCHES) as pool:
                list(pool.map(one, names))
            bar.close()
            sizes = {name: info["bytes"] for name, info in manifest["files"].items()}
            check_sizes(fs, root, url, sizes, "the manifest was not written, so no reader uses them")
            fs.put_file(str(Path(out) / layout.MANIFEST), remote_path(root, layout.MANIFEST))
            check_sizes(fs, root, url, {layout.MANIFEST: (Path(out) / layout.MANIFEST).stat().st_size},
                        "it is removed", remove=True)
    except PermissionError as err:
        raise UsageError(f"--publish {url}: permission denied ({err})") from None
    return len(names) + 1


PUBLISH_MARKER = ".fastpix-publish.json"  # at a --publish target while a publish writes it: {pid, host, since}


def listing(fs, root):
    """{name: size} of what is at `root` now (not a client's cached listing); {} where nothing is."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") for entry in entries}


def check_target(fs, root, url, names):
    """A publish overwrites a fastpix dataset (its manifest says so) or the data files of one left half-published;
    a target holding anything else is not touched: one line naming what is there."""
    there = set(listing(fs, root)) - {PUBLISH_MARKER}
    if layout.MANIFEST in there:
        try:
            manifest = json.loads(fs.cat_file(remote_path(root, layout.MANIFEST)))
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict) and {"fingerprint", "splits", "files"} <= set(manifest):
            return
    foreign = sorted(there - set(names))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise UsageError(f"--publish {url}: the target holds {shown} and is not a fastpix dataset (no fastpix "
                         f"{layout.MANIFEST} there): nothing was written; publish to an empty folder or prefix")


@contextlib.contextmanager
def publish_marker(fs, root, url):
    """Hold the target for one publish: PUBLISH_MARKER is created there first, exclusively where the store can
    (S3's If-None-Match, O_EXCL on a local disk, where fsspec only looks first), and removed at the end. A
    marker whose process died on this host is taken over, saying so; any other is a one-line refusal that
    names its holder and how to clear it."""
    path = remote_path(root, PUBLISH_MARKER)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    for _ in range(2):
        try:
            create_exclusively(fs, path, json.dumps(mine).encode())
            break
        except FileExistsError:
            holder = read_marker(fs, path)
            if holder and holder.get("host") == mine["host"] and not alive(holder.get("pid")):
                print(f"--publish {url}: the marker of a publish that no longer runs (pid {holder.get('pid')} on "
                      f"{holder.get('host')}, since {holder.get('since')}) is removed", file=sys.stderr, flush=True)
                fs.rm_file(path)
                continue
            who = (f"pid {holder.get('pid')} on {holder.get('host')}: {holder.get('command')}, since "
                   f"{holder.get('since')}") if holder else "an unreadable marker"
            raise UsageError(f"--publish {url}: another publish writes there ({who}): wait for it to end; if it no "
                             f"longer runs, delete {remote_path(url, PUBLISH_MARKER)} and rerun") from None
    else:
        raise UsageError(f"--publish {url}: another publish took the target first: wait for it to end, then rerun")
    try:
        yield
    finally:
        if (read_marker(fs, path) or {}).get("token") == mine["token"]:  # never another publish's marker
            fs.rm_file(path)


def create_exclusively(fs, path, data):
    """Write a new file `path`, or raise FileExistsError: one atomic step on a local disk (O_EXCL) and on S3
    (s3fs's If-None-Match); fsspec's other filesystems look first, then write."""
    if "file" not in fs.protocol:
        return fs.pipe_file(path, data, mode="create")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_marker(fs, path):
    """A publish marker's content as a dict, or None (gone, or unreadable)."""
    fs.invalidate_cache(path)
    try:
        marker = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def alive(pid):
    """Whether a process `pid` runs on this host."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def check_sizes(fs, root, url, sizes, then, remove=False):
    """The sizes the store reports for `sizes`' files (one listing) are theirs, else one line ending in `then`."""
    there = listing(fs, root)
    wrong = [name for name, size in sizes.items() if there.get(name) != size]
    if wrong:
        name = wrong[0]
        if remove:
            fs.rm_file(remote_path(root, name))
        more = f" ({len(wrong) - 1} more files differ)" if len(wrong) > 1 else ""
        raise UsageError(f"--publish {url}: {name} has {there.get(name, 'no')} bytes there after the upload, the "
                         f"manifest says {sizes[name]}{more}: {then}; rerun the publish")
