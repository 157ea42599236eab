"""What ingest wrote into an --out folder, kept in its hidden `.ingest-journal.json`.

The journal does three jobs. It is ingest's marker: ingest writes only into a folder it created, an empty
one, or one holding its journal or manifest (anything else needs --force). It lists every file ingest wrote
or is about to write, so a rerun deletes only those (stale shards of a bigger build, its own temp files),
never whatever else matches a name pattern. And it keeps a stamp per file (size, mtime, ctime, inode) taken
right after the file was hashed, so the up-to-date check re-hashes only files whose stamp changed: a full
hash costs about 2 s per GB here, too much for a no-op rerun of a big dataset. A rewrite in place changes
mtime and ctime (ctime cannot be set back), so the stamp catches edits; bit rot that keeps the stamp is
what `python ingest/build.py --verify` is for. The journal carries its own checksum: a damaged one keeps no
stamp (every file is hashed again), and a name outside the folder is never taken from it.
"""
import json
import os

from cli import UsageError
from files import WRITER_NOTE, seal, sealed, temp_of, write_json
from ingest import layout


class Journal:
    def __init__(self, out):
        self.out = out
        self.path = out / layout.JOURNAL
        try:
            saved = json.loads(self.path.read_text())
            self.files = dict(saved["files"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn by hand: files are re-hashed
            saved, self.files = None, {}
        if saved is not None and not sealed(saved):
            # from a fastpix before journals had a checksum: keep the names it wrote, not the stamps (every file
            # is hashed again once); damaged or edited: trust nothing (what it lists might not be ingest's)
            legacy = "checksum" not in saved
            self.files = {name: {} for name in self.files if legacy and "/" not in name and name not in ("", "..")}

    def save(self):
        write_json(self.path, seal({"files": self.files}), indent=1, sort_keys=True)

    def plan(self, names):
        """Note files about to be written, before writing them: a kill then leaves nothing unlisted."""
        new = [n for n in names if n not in self.files]
        if new:
            self.files.update({n: {} for n in new})
            self.save()

    def record(self, name):
        """Hash a file just written (from the OS cache) and note it; returns its manifest entry."""
        path = self.out / name
        entry = {"bytes": path.stat().st_size, "sha256": layout.file_sha256(path)}
        self.files[name] = {**entry, "stamp": _stamp(path)}
        self.save()
        return entry

    def digest(self, name):
        """{bytes, sha256} of a file as it is now, hashing only when its stamp changed; None if missing."""
        path = self.out / name
        try:
            stamp = _stamp(path)
        except OSError:
            return None
        known = self.files.get(name, {})
        if known.get("stamp") != stamp:
            known = {"bytes": stamp[0], "sha256": layout.file_sha256(path), "stamp": stamp}
            self.files[name] = known
        return {"bytes": known["bytes"], "sha256": known["sha256"]}

    def damaged(self, files):
        """Names among `files` ({name: {bytes, sha256}}) missing or different on disk, or found damaged by
        `--verify` (`distrust`); a wrong size needs no hash. Fresh stamps are saved, so the next check is cheap
        again."""
        flagged = {name for name, entry in self.files.items() if isinstance(entry, dict) and entry.get("damaged")}
        bad = [name for name, want in files.items()
               if name in flagged or not (self.out / name).is_file()
               or (self.out / name).stat().st_size != want["bytes"] or self.digest(name) != want]
        self.save()
        return bad

    def distrust(self, names):
        """Note files that `--verify` found damaged although their sha256 may match the manifest (an image
        that does not decode was stored so): the next rerun rewrites them."""
        self.files.update({name: {"damaged": True} for name in names if name in self.files})
        self.save()

    def remove_stale(self, keep):
        """Delete the files this journal lists that are not in `keep`, and temp files of any listed name."""
        ours = set(self.files) | set(keep) | {layout.MANIFEST, layout.JOURNAL}
        for name in [n for n in self.files if n not in keep]:
            if (self.out / name).is_file() and not (self.out / name).is_symlink():
                (self.out / name).unlink()
            del self.files[name]
        for entry in os.scandir(self.out):
            if temp_of(entry.name) in ours and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        self.save()


def _stamp(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def claim(out, force):
    """The journal of `out`, once `out` is known to be ingest's: new or empty (then it is marked), marked
    already, or holding a manifest of an older fastpix (its files are adopted). A folder of someone else's
    is refused with one line unless `force`. Call with `out` locked."""
    journal = Journal(out)
    if journal.path.is_file():
        return journal
    manifest = out / layout.MANIFEST
    if manifest.is_file() and layout.manifest_problem(manifest) is None:
        old = json.loads(manifest.read_text())
        journal.plan(old.get("files") or _older_files(old))
    elif any(not _journal_temp(e.name) and e.name != WRITER_NOTE for e in os.scandir(out)) and not force:
        raise UsageError(f"--out {out} is not empty and holds no dataset of fastpix's: choose a new or empty "
                         "folder, or pass --force to write into it (files of other tools are never deleted)")
    journal.save()
    return journal


def _journal_temp(name):
    """A temp file of the journal itself: all a run killed right after creating the folder leaves in it."""
    return temp_of(name) == layout.JOURNAL


def _older_files(manifest):
    """What a manifest from before `files` existed says ingest wrote."""
    names = [layout.QUARANTINE]
    for split in layout.SPLITS:
        names += [layout.beton_path("", split).name, layout.csv_path("", split).name]
        names += [f for sh in manifest["splits"][split]["shards"] for f in (sh["tar"], layout.index_name(sh["tar"]))]
    return names
