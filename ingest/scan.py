"""Find every file under the source and sort it into candidates, ignored and quarantined, cheaply:
only directory listings and stat calls, so an unchanged source is recognised in well under a second."""
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cli import UsageError


@dataclass
class Scan:
    classes: list  # sorted class names; label = index
    candidates: list = field(default_factory=list)  # (relative path, label) of regular files to validate
    ignored: list = field(default_factory=list)  # relative paths: hidden files, files outside class folders
    quarantined: list = field(default_factory=list)  # (relative path, reason) decided without reading
    stats: list = field(default_factory=list)  # (relative path, size, mtime_ns): what the fingerprint covers

    @property
    def found(self):
        return len(self.candidates) + len(self.ignored) + len(self.quarantined)

    def fingerprint(self, params):
        """A hash of every entry's path, size and mtime plus the params: equal means nothing to do."""
        blob = json.dumps([params, sorted(self.stats)]).encode()
        return hashlib.sha256(blob).hexdigest()


def _hidden(name):
    return name.startswith(".")


def scan(src):
    """Scan `src` (absolute): class = immediate non-hidden subfolder (or link to one); files below it (any
    depth) are its, links followed as `walk` says. A photo reached in two places is then a duplicate
    (ingest/dedup.py). An unreadable subfolder is quarantined; an unreadable class folder or source stops
    the scan with one line."""
    src = Path(src)
    try:
        entries = list(os.scandir(src))
    except OSError as err:
        raise UsageError(f"--src {src} cannot be read: {err.strerror}") from None
    classes = sorted(e.name for e in entries if _is_dir(e) and not _hidden(e.name))
    if not classes:
        raise UsageError(f"--src {src} has no class folders: put each class's photos in a subfolder named after it")
    result = Scan(classes)
    for entry in entries:
        if not _is_dir(entry):
            result.ignored.append(entry.name)
            result.stats.append((entry.name, *_size_mtime(entry.path)))
    for label, name in enumerate(classes):
        errors = []
        for path, rel, reason in walk(src / name, src, errors):
            result.stats.append((rel, *_size_mtime(path)))
            if reason is None:
                result.ignored.append(rel)
            elif reason:
                result.quarantined.append((readable(rel), reason))
            else:
                result.candidates.append((rel, label))
        for err in errors:  # folders os.walk could not list
            if os.path.samefile(err.filename, src / name):
                raise UsageError(f"class folder {src / name} cannot be read: {err.strerror}: fix its permissions "
                                 "or move it out of --src")
            rel = os.path.relpath(err.filename, src)
            result.quarantined.append((rel, f"unreadable folder: {err.strerror} (its files are not counted)"))
            result.stats.append((rel, *_size_mtime(err.filename)))
    return result


def walk(top, src, errors):
    """Every file below `top` as (path, rel, reason): any depth, in sorted order, hidden folders skipped; rel is
    relative to `src`. reason: None for a hidden file (ignored), "" for a candidate to read, else why it is
    quarantined unread. Links to folders and files are followed wherever they point, like torchvision's
    ImageFolder (`os.walk(followlinks=True)`); a folder reached a second time below `top` (a link loop, or two
    links to one folder) is one quarantined entry instead of being walked again, so the walk ends and every
    file is counted once. Folders os.walk cannot list are appended to `errors`."""
    walked = {_folder_id(top): os.path.relpath(top, src)}  # folder identity -> where it was walked
    for root, dirs, files in os.walk(top, onerror=errors.append, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for d in list(dirs):
            path = os.path.join(root, d)
            rel = os.path.relpath(path, src)
            first = walked.setdefault(_folder_id(path), rel)
            if first != rel:
                dirs.remove(d)
                yield path, rel, ("folder reached again through a symlink (a loop, or two links to one folder): "
                                  f"its files are counted at {first}")
        for fname in sorted(files):
            path = os.path.join(root, fname)
            rel = os.path.relpath(path, src)
            if _hidden(fname):
                yield path, rel, None
            elif not _utf8(rel):  # the csv files are UTF-8: keep it out (`readable` names it)
                yield path, rel, "file name is not UTF-8"
            else:
                yield path, rel, _special(path) or ""


def source_path(src, rel):
    """Where the bytes of the file found at `rel` are: `rel` itself, or where its links lead (relative to
    `src` when inside it, else absolute): what the csvs record, so that a photo can be found again."""
    path = os.path.join(src, rel)
    real = os.path.realpath(path)
    if real == path:
        return rel
    return os.path.relpath(real, src) if Path(real).is_relative_to(src) else real


def readable(name):
    """A file name as UTF-8 text: undecodable bytes as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if not _utf8(name) else name


def _is_dir(entry):
    try:
        return entry.is_dir()  # follows a link
    except OSError:  # a link loop
        return False


def _folder_id(path):
    try:
        st = os.stat(path)
    except OSError:  # gone since it was listed: os.walk reports it as unreadable
        return path
    return st.st_dev, st.st_ino


def _utf8(name):
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes arrive as surrogate escapes
        return False


def _size_mtime(path):
    try:
        st = os.stat(path)
    except OSError:  # a broken link: its own lstat still changes when it is re-pointed
        st = os.lstat(path)
    return st.st_size, st.st_mtime_ns


def _special(path):
    """A reason to quarantine without reading: a broken link, a non-regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return "unreadable: broken symlink" if os.path.islink(path) else f"unreadable: {err.strerror}"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None
