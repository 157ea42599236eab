"""Bring DALI (and webdataset) to the offline GPU machine, 60 MiB at a time.

The GPU machine has torch but no DALI, no webdataset and no network, and each call to it carries at most
64 MiB. DALI's wheels for Python 3.12 are ~250 MiB. So, here, with network:

    python3 -m bench.gpu wheels prepare     # download the exact wheels, cut them into .gpuwheels/dali-1..N

`base/` holds the small wheels ingest needs (webdataset: 0.1 MiB, carried with every `bench.gpu check` run);
`dali-K/` holds piece K of the DALI wheels laid end to end, each folder <= 60 MiB. There, one call per
folder, while the machine stays warm (ignored files and /tmp survive between calls only then):

    python3 -m bench.gpu wheels receive     # stash the pieces carried this call; once all are there,
                                            # reassemble, check every sha256, pip install --target

`receive` installs into --target (default /tmp/fastpix-site) with `pip install --no-index --no-deps`, so the
machine's own torch and numpy are used untouched; put the target on PYTHONPATH (`bench.gpu check` does).
Standard library only: it runs before anything is installed.
"""
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu import REPO
from cli import Parser

FOLDER = REPO / ".gpuwheels"  # git-ignored
STAGE = Path("/tmp/fastpix-wheels")  # where the pieces of earlier calls wait for the rest
TARGET = Path("/tmp/fastpix-site")
PIECE_MIB = 60
MANIFEST = "manifest.json"

# The GPU machine's Python, and the exact wheels it lacks. Versions are requirements.lock's; the DALI set is
# nvidia-dali-cuda130's Requires-Dist minus what that machine already has (numpy, six, packaging, pyyaml),
# with nvimgcodec's nvjpeg extra (JPEG) but not its JPEG 2000 / TIFF extras, which fastpix never decodes.
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BASE = ("webdataset==1.0.2", "braceexpand==0.1.7")
DALI = ("nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-libnvcomp-cu13==5.3.0.16",
        "nvidia-nvjpeg==13.3.2.43", "astunparse==1.6.3", "gast==0.7.0", "optree==0.20.0", "nvtx==0.2.17",
        "makefun==1.16.0", "libcst==1.9.0")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(specs, dest):
    """pip download the exact wheels for the GPU machine's Python and platform, no dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms, "-d", str(dest),
                    *specs], check=True)
    wanted = {tuple(spec.replace("-", "_").lower().split("==")) for spec in specs}
    return sorted(w for w in dest.glob("*.whl") if tuple(w.name.lower().split("-")[:2]) in wanted)


def split(wheels, out, piece_bytes):
    """Lay `wheels` end to end and cut the stream into out/dali-1.. folders of one piece each, every folder
    with the manifest that says how to put the wheels back together. Returns the folders."""
    for old in out.glob("dali-*"):
        shutil.rmtree(old)
    folders, piece, room = [], None, 0
    for block in _blocks(wheels):
        while block:
            if room == 0:
                if piece:
                    piece.close()
                folders.append(out / f"dali-{len(folders) + 1}")
                folders[-1].mkdir(parents=True)
                piece, room = open(folders[-1] / f"piece-{len(folders)}.bin", "wb"), piece_bytes
            piece.write(block[:room])
            block, room = block[room:], room - len(block[:room])
    piece.close()
    pieces = [folder / f"piece-{k}.bin" for k, folder in enumerate(folders, 1)]
    manifest = json.dumps({"files": [_entry(w) for w in wheels], "pieces": [_entry(p) for p in pieces]}, indent=1)
    for folder in folders:
        (folder / MANIFEST).write_text(manifest + "\n")
    return folders


def _entry(path):
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def _blocks(paths, size=1 << 22):
    """The files' bytes, one after the other, in blocks."""
    for path in paths:
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(size), b"")


def stash(carried, stage):
    """Copy the pieces carried this call into `stage`; returns the manifest (None when none was carried)."""
    manifest = None
    for folder in sorted(carried.glob("dali-*")):
        if not (folder / MANIFEST).is_file():
            continue
        manifest = json.loads((folder / MANIFEST).read_text())
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / MANIFEST, stage / MANIFEST)
        for piece in folder.glob("piece-*.bin"):
            if not (stage / piece.name).is_file() or (stage / piece.name).stat().st_size != piece.stat().st_size:
                shutil.copyfile(piece, stage / piece.name)
    if manifest is None and (stage / MANIFEST).is_file():
        manifest = json.loads((stage / MANIFEST).read_text())
    return manifest


def missing_pieces(manifest, stage):
    return [p["name"] for p in manifest["pieces"]
            if not (stage / p["name"]).is_file() or (stage / p["name"]).stat().st_size != p["bytes"]]


def reassemble(manifest, stage, dest):
    """The wheels back from the pieces in `stage`, each checked against its sha256; ValueError on a mismatch."""
    for p in manifest["pieces"]:
        if sha256(stage / p["name"]) != p["sha256"]:
            raise ValueError(f"{p['name']} is damaged (sha256 differs): carry its folder again")
    stream, block, wheels = _blocks([stage / p["name"] for p in manifest["pieces"]]), b"", []
    for entry in manifest["files"]:
        path = dest / entry["name"]
        with open(path, "wb") as f:
            left = entry["bytes"]
            while left:
                block = block or next(stream)
                f.write(block[:left])
                block, left = block[left:], left - len(block[:left])
        if sha256(path) != entry["sha256"]:
            raise ValueError(f"{entry['name']} reassembled with a different sha256")
        wheels.append(path)
    return wheels


def pip_install(wheels, target):
    """Install `wheels` into `target` offline, without touching the interpreter's own packages."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, wheels)],
                   check=True)


def receive(carried, stage, target):
    """Install what the carried folders allow; returns one line on where base and DALI stand."""
    done = target / ".fastpix-installed"
    installed = set(done.read_text().split()) if done.is_file() else set()

    def install(wheels):
        pip_install(wheels, target)
        installed.update(w.name for w in wheels)
        done.write_text("\n".join(sorted(installed)) + "\n")

    base = sorted((carried / "base").glob("*.whl"))
    if base and not {w.name for w in base} <= installed:
        install(base)
    said = "base: " + (f"installed in {target}" if base else "not carried (ingest needs webdataset: carry "
                                                                 ".gpuwheels/base)")
    manifest = stash(carried, stage)
    if manifest is None:
        return f"{said}; DALI: no pieces carried"
    if {f["name"] for f in manifest["files"]} <= installed:
        return f"{said}; DALI: installed in {target}"
    missing = missing_pieces(manifest, stage)
    if missing:
        folders = ", ".join(".gpuwheels/dali-" + m.split("-")[1].split(".")[0] for m in missing)
        here = len(manifest["pieces"]) - len(missing)
        return f"{said}; DALI: {here}/{len(manifest['pieces'])} pieces here, carry next: {folders}"
    with tempfile.TemporaryDirectory(prefix="fastpix-wheels-") as tmp:
        install(reassemble(manifest, stage, Path(tmp)))
    for piece in stage.glob("piece-*.bin"):  # 250 MiB of /tmp back: the installed copy is what counts now
        piece.unlink()
    return f"{said}; DALI: reassembled, sha256 checked and installed in {target}"


def main(argv=None):
    p = Parser(prog="python3 -m bench.gpu wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "receive"))
    p.add_argument("--folder", type=Path, default=FOLDER, help="the carried folders (default %(default)s)")
    p.add_argument("--stage", type=Path, default=STAGE, help="receive: where pieces wait (default %(default)s)")
    p.add_argument("--target", type=Path, default=TARGET, help="receive: pip --target (default %(default)s)")
    p.add_argument("--piece-mib", type=float, default=PIECE_MIB, help="prepare: folder size (default %(default)s)")
    args = p.parse_args(argv)
    if args.action == "prepare":
        cache = args.folder / "cache"
        base = args.folder / "base"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        for wheel in download(BASE, cache):
            shutil.copyfile(wheel, base / wheel.name)
        # Each folder holds one piece and a manifest of a few KiB: the piece leaves room for it.
        folders = split(download(DALI, cache), args.folder, int(args.piece_mib * 2**20) - 2**16)
        sizes = ", ".join(f"{f.name} {sum(x.stat().st_size for x in f.iterdir()) / 2**20:.1f} MiB" for f in folders)
        print(f"base: {sum(w.stat().st_size for w in base.iterdir()) / 2**20:.2f} MiB; {sizes}")
        return 0
    try:
        print(receive(args.folder, args.stage, args.target))
    except (ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

