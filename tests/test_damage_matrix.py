"""The damage matrix (issue 19): every file kind fastpix writes x five damages x every reader of that kind.

A reader must repair the damaged file, or stop with one line naming it and the fix (exit 2 / UsageError); it
must never use the file silently (an `ok` outcome is checked against an undamaged reference: the loaders'
decoded pixels and labels, the exact bytes an ingest rerun restores, a resumed run's losses, the study's
cached result, the report) and never raise a traceback (anything but UsageError fails the cell).

READERS_OF (below) is the matrix: for each kind, where it lives and the readers that read it; a pair not
listed is a reader that never reads that kind. Every cell works on one world of pristine copies (a dataset,
two run folders, a study) restored before the cell at fixed paths, since runs and the study record their
paths. The "other" damage takes the same file from a second world made with seed 1 (another split, other
weights); for the ingest cache, whose files are the same for any seed, it is another photo's cache file.
"""
import contextlib
import gc
import io
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import cli
from ingest.build import build
from ingest.build import main as ingest_main
from ingest.config import IngestConfig
from ingest.remote import PUBLISH_MARKER
from loaders import BACKENDS, make_loader

from conftest import TINY_STORE, import_error

LOADERS = ("dali", "ffcv", "torch", "folder", "resident")
SHARD_READERS = ("dali", "torch", "resident")  # the loaders that read the webdataset shards
DAMAGES = ("flip", "truncate", "zero", "delete", "other")
RES, BATCH = 32, 16

# kind: (world folder it lives in, its path there, the readers that read it)
READERS_OF = {
    "tar": ("data", "train-00001.tar", SHARD_READERS + ("verify", "ingest", "resume")),
    "idx": ("data", "train-00001.idx", SHARD_READERS + ("verify", "ingest", "resume")),
    "beton": ("data", "train.beton", ("ffcv", "verify", "ingest")),
    "csv": ("data", "train.csv", LOADERS + ("verify", "ingest", "resume")),
    "manifest": ("data", "manifest.json", LOADERS + ("verify", "ingest", "resume", "study", "report")),
    "journal": ("data", ".ingest-journal.json", ("ingest",)),
    "ingest-cache": ("data", None, ("ingest",)),  # a train photo's cached JPEG: found by its bytes (cache_photo)
    "resident-cache": ("data", None, ("resident", "verify")),  # resident-train-<S>px-<first>-<stop>.pt
    "verified": ("data", ".verified.json", LOADERS + ("resume",)),
    "checkpoint": ("run", "last.pt", ("resume", "render")),
    "metrics": ("run", "metrics.jsonl", ("resume", "render")),
    "config": ("run", "config.json", ("resume", "render")),
    "predictions": ("run", "test_predictions.npz", ("render",)),
    "lr-find": ("run", "lr_find.json", ("render",)),  # the LR range test's sweep (--find-lr)
    "marker": ("run", ".fastpix-run", ("train", "render")),
    "study-cache": ("study", "runs/flat.json", ("study", "report")),
    "fetch-marker": ("cache", ".fastpix-cache.json", ("url",)),  # --data URL's node-local cache: whose files
    "fetch-record": ("cache", ".verified.json", ("url",)),  # ... and its record of the files it checked
    "sidecar": ("export", "model.onnx.json", ("example",)),  # predict.py --export's; docs/predict.md's example
    "publish-marker": ("publish", ".fastpix-publish.json", ("publish",)),  # left at a --publish target by a
    # publish that died (a pid that no longer runs on this host)
}
# derived files whose absence is normal: rebuilt on use
REBUILT = ("ingest-cache", "resident-cache", "verified", "fetch-record")
# files a reader goes without, drawing less (kind: what it no longer draws); the publish marker is gone when no
# publish runs
OPTIONAL = {"lr-find": "lr_find.png"}
CELLS = [(kind, damage, reader) for kind, (_, _, readers) in READERS_OF.items() for reader in readers
         for damage in DAMAGES]

pytestmark = [pytest.mark.usefixtures("one_thread", "small_flat_head"), pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")]


# ----------------------------------------------------------------------------------------------- Worlds

def ingest_argv(src, out, seed):
    return ["--src", str(src), "--out", str(out), "--store-size", str(TINY_STORE), "--shard-size", "32",
            "--workers", "1", "--seed", str(seed), "--quiet"]


def train_argv(data, runs_dir, name, seed):
    return ["--net", "resnet18", "--loader", "torch", "--data", str(data), "--runs-dir", str(runs_dir), "--name",
            name, "--seed", str(seed), "--res", str(RES), "--batch-size", str(BATCH), "--epochs", "2",
            "--warmup", "0.5", "--amp", "off", "--device", "cpu", "--workers", "0", "--bootstrap", "20",
            "--log-every", "1", "--no-report", "--find-lr", "--find-lr-steps", "5"]


def publish_argv(world):
    return ["--out", str(world.data), "--publish", f"file://{world.publish}", "--quiet"]


def study_argv(data, out, seed):
    return ["strides", "--strides", "4,1,1", "--data", str(data), "--out", str(out), "--seed", str(seed),
            "--loader", "torch", "--device", "cpu", "--epochs", "1", "--batch-size", str(BATCH), "--res", "64",
            "--workers", "0", "--bootstrap", "20"]


class World:
    """A dataset (`data`, with every derived file made: the resident cache, the memoised checks), a run of 2
    epochs (`run`; seed 0's stopped 1 step into its second epoch, resumable), a study with one cached run
    (`study`), the dataset fetched as a file:// URL into a node-local cache (`cache`), the run exported to ONNX
    (`export`) and the dataset published to a file:// URL (`publish`) by a publish that died there, leaving its
    marker, all in `root`, made with `seed`; `snapshot`/`restore` keep a pristine copy beside it."""

    def __init__(self, root, src, seed):
        self.root, self.src, self.seed = Path(root), src, seed
        self.data, self.runs, self.study = self.root / "data", self.root / "runs", self.root / "study"
        self.run = self.runs / "r"
        self.cache, self.export, self.url = self.root / "cache", self.root / "export", f"file://{self.data}"
        self.publish = self.root / "publish"
        self.saved = self.root.with_name(self.root.name + "-pristine")

    def make(self, ingested):
        import predict
        import train
        from bench.study import main as study_main
        from ingest.remote import local_folder

        if self.seed == 0:
            shutil.copytree(ingested, self.data)
        else:
            build(IngestConfig(src=self.src, out=self.data, store_size=TINY_STORE, shard_size=32, workers=1,
                               seed=self.seed), progress=False, log=lambda *_: None)
        # the references the loaders are checked against; the other world needs only its derived files
        self.epochs = {name: read_epoch(name, self.data) for name in (LOADERS if self.seed == 0 else ("resident",))
                       if not import_error(BACKENDS[name])}
        # seed 0's run stops 1 step into epoch 2 (epoch 1 has 4 steps and wrote test_predictions.npz), resumable;
        # the other world's run is finished: another marker
        stop = ["--max-steps", "5"] if self.seed == 0 else []
        code, _, err = call(train.main, train_argv(self.data, self.runs, "r", self.seed) + stop)
        assert code == 0, err[-3000:]
        assert call(study_main, study_argv(self.data, self.study, self.seed))[0] == 0
        local_folder(self.url, self.cache, progress=False)
        code, _, err = call(predict.main, ["--run", str(self.run), "--export", str(self.export / "model.onnx")])
        assert code == 0, err[-3000:]
        code, _, err = call(ingest_main, publish_argv(self))
        assert code == 0, err[-3000:]
        dead = subprocess.Popen(["true"])
        dead.wait()  # its pid runs no more: the marker is that of a publish that died
        (self.publish / PUBLISH_MARKER).write_text(json.dumps({
            "pid": dead.pid, "host": socket.gethostname(), "command": "python ingest/build.py --publish",
            "since": "2026-12-06 12:00:00", "token": f"{self.seed}" * 32}))
        self.snapshot()
        return self

    def path(self, kind):
        where, rel, _ = READERS_OF[kind]
        folder = {"data": self.data, "run": self.run, "study": self.study, "export": self.export,
                  "publish": self.publish,
                  "cache": self.cache / json.loads((self.data / "manifest.json").read_text())["fingerprint"]}[where]
        if kind == "resident-cache":
            return next(self.data.glob("resident-train-*.pt"))
        if kind == "ingest-cache":
            return cache_photo(self.data)
        return folder / rel

    def snapshot(self):
        shutil.rmtree(self.saved, ignore_errors=True)
        shutil.copytree(self.root, self.saved, symlinks=True)

    def restore(self):
        """Back to the pristine copy, copying only what differs: the checkpoints are most of the world's bytes."""
        saved = {p.relative_to(self.saved): p for p in self.saved.rglob("*") if p.is_file()}
        for path in sorted(self.root.rglob("*"), reverse=True):  # files before their folders
            if path.is_file() and path.relative_to(self.root) not in saved:
                path.unlink()
            elif path.is_dir() and not (self.saved / path.relative_to(self.root)).is_dir():
                path.rmdir()
        for rel, source in saved.items():
            target, want = self.root / rel, source.stat()
            try:
                have = target.stat()
            except FileNotFoundError:
                have = None
            if have is None or (have.st_size, have.st_mtime_ns) != (want.st_size, want.st_mtime_ns):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)


def cache_photo(data):
    """The ingest cache's entry for the first sample of train-00000.tar: the one whose payload it stored."""
    import tarfile

    with tarfile.open(data / "train-00000.tar") as tar:
        jpg = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg"))
    return next(p for p in sorted((data / ".cache").rglob("*")) if p.is_file() and p.read_bytes().endswith(jpg))


def other_cache_photo(data, path):
    """Another photo's cache file: the same kind of file, valid, but not this photo's."""
    return next(p for p in sorted((data / ".cache").rglob("*")) if p.is_file() and p.suffix == path.suffix
                and p != path and p.read_bytes() != path.read_bytes())


def read_epoch(name, data):
    """{sample id: (image, label)} of one train epoch of loader `name` (test transform: deterministic)."""
    loader = make_loader(name, data, "train", batch_size=BATCH, res=RES, device="cpu", seed=0,
                         workers=1 if name in ("dali", "ffcv") else 0, augment="none", with_ids=True)
    epoch = {}
    for images, labels, ids in loader:
        epoch.update({int(i): (im.clone(), int(lb)) for i, im, lb in zip(ids, images, labels)})
    return epoch


def call(main, argv):
    """A command as its user meets it (cli.run), in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(main, argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def worlds(tiny_src, ingested, tmp_path_factory, small_flat_head):
    """(the world cells damage, the other world "other" takes its files from) with pristine copies."""
    base = tmp_path_factory.mktemp("damage")
    world = World(base / "w0", tiny_src, 0).make(ingested)
    other = World(base / "w1", tiny_src, 1).make(None)
    world.drawn = drawn(world)
    world.restore()
    world.resumed = resume_record(world)
    world.report = report_text(world)
    world.classified = classified(world)
    world.restore()
    gc.collect()
    gc.freeze()  # the worlds and what making them imported, out of each cell's collection (conftest says why)
    return world, other


# ----------------------------------------------------------------------------------------------- Damage

def damage(path, how, other):
    """Damage the file at `path` in one of DAMAGES; `other` is the same file of the other world."""
    data = path.read_bytes()
    if how == "flip":  # the same size, bytes inverted in the middle
        start, n = len(data) // 2, max(1, min(64, len(data) // 4))
        path.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start:start + n]) + data[start + n:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":  # what an unflushed file can hold after a power cut
        path.write_bytes(bytes(len(data)))
    elif how == "delete":
        path.unlink()
    else:
        assert other.read_bytes() != data, f"{other} is no other file: the cell would test nothing"
        shutil.copyfile(other, path)


# ----------------------------------------------------------------------------------------------- Readers

class Refused(Exception):
    """A reader stopped with one line: the line."""


def refused(code, out, err, what):
    """Raise Refused with the one error line of a command that exited 2; fail on anything less clean."""
    assert "Traceback" not in err, f"{what}: traceback\n{err[-3000:]}"
    if code != 2:
        return
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), f"{what}: not one error line: {err[-2000:]}"
    raise Refused(lines[0])


def read_loader(name, world, kind):
    try:
        epoch = read_epoch(name, world.data)
    except cli.UsageError as err:
        raise Refused(str(err)) from None
    want = world.epochs[name]
    assert epoch.keys() == want.keys(), f"{name} gave other samples"
    for i, (image, label) in epoch.items():
        assert label == want[i][1] and torch.equal(image, want[i][0]), f"{name}: sample {i} differs from the " \
            f"undamaged data: the damaged {kind} was used"


def read_verify(world, kind, damage_how):
    code, out, err = call(ingest_main, ["--verify", "--out", str(world.data), "--workers", "1"])
    refused(code, out, err, "--verify")
    if code == 1:
        raise Refused(out)  # its problem lines name the damaged files
    assert code == 0, err
    assert kind in REBUILT and damage_how == "delete", f"--verify found no damage in a damaged {kind}:\n{out}"


def read_ingest(world, kind, pristine):
    if kind == "ingest-cache":  # the cache is read only when something is written: make the rerun write all
        (world.data / "manifest.json").unlink()
    code, out, err = call(ingest_main, ingest_argv(world.src, world.data, world.seed))
    refused(code, out, err, "ingest rerun")
    assert code == 0, err
    for name in [*json.loads((pristine / "manifest.json").read_text())["files"], "manifest.json"]:
        assert (world.data / name).read_bytes() == (pristine / name).read_bytes(), \
            f"the ingest rerun left {name} other than the undamaged build's: it used the damaged {kind}"


def step_record(run_dir):
    """What a run learnt, without its timings: every step's loss and every epoch's accuracies, and its weights
    (a damaged weight that the data never reaches changes no loss, but stays in the model)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    weights = torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=True)["model"]
    return [(r["kind"], r.get("step"), r.get("loss"), r.get("test_acc")) for r in records], weights


def same_record(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def resume_record(world):
    import train

    code, out, err = call(train.main, ["--resume", str(world.run), "--no-report"])
    assert code == 0, err[-3000:]
    return step_record(world.run)


def read_resume(world, kind):
    import train

    code, out, err = call(train.main, ["--resume", str(world.run), "--no-report"])
    refused(code, out, err, "--resume")
    assert code == 0, err[-3000:]
    assert same_record(step_record(world.run), world.resumed), f"the resumed run differs from the undamaged one's: " \
        f"it used the damaged {kind}"


def read_train(world, kind):
    """A new run with the same --name: the folder holds a run, so it is refused, whatever its marker says."""
    import train

    before = {p.name: p.read_bytes() for p in world.run.iterdir() if p.is_file() and p.name != ".fastpix-run"}
    code, out, err = call(train.main, train_argv(world.data, world.runs, "r", world.seed))
    after = {p.name: p.read_bytes() for p in world.run.iterdir() if p.is_file() and p.name in before}
    assert after == before, "a new run with the same --name overwrote the run"
    refused(code, out, err, "train --name")
    raise AssertionError(f"train with the same --name as a run with a damaged marker exited {code}")


def study_result(study):
    """The study's cached run, what its tables come from, without its timings."""
    cached = json.loads((study / "runs" / "flat.json").read_text())
    return cached["config"], cached["data_fingerprint"], cached["epochs"][-1]["test_acc"], cached["loss"]


def read_study(world, kind):
    from bench.study import main as study_main

    pristine = study_result(world.saved / "study")
    code, out, err = call(study_main, study_argv(world.data, world.study, world.seed))
    refused(code, out, err, "study rerun")
    assert code == 0, err[-3000:]
    assert study_result(world.study) == pristine, f"the study's result differs from the undamaged one's: it used " \
        f"the damaged {kind}"


def drawn(world):
    """What python -m report draws from the run, {file: bytes}; None when it refused (Refused raised)."""
    from report.__main__ import main as report_main

    before = {p.name for p in world.run.iterdir()}
    code, out, err = call(report_main, ["--quiet", "--device", "cpu", str(world.run)])
    refused(code, out, err, "python -m report")
    assert code == 0, err[-3000:]
    return {p.name: p.read_bytes() for p in world.run.iterdir() if p.name not in before}


def read_render(world, kind, how):
    want = {name: data for name, data in world.drawn.items() if how != "delete" or name != OPTIONAL.get(kind)}
    assert drawn(world) == want, f"python -m report drew other files than from the undamaged run: it used " \
        f"the damaged {kind}"


def read_publish(world, kind):
    """ingest/build.py --publish to a target where a publish died: what it leaves there is the dataset, whole,
    and no marker."""
    from ingest import layout

    code, out, err = call(ingest_main, publish_argv(world))
    refused(code, out, err, "--publish")
    assert code == 0, err[-3000:]
    manifest = layout.read_manifest(world.data)
    assert sorted(p.name for p in world.publish.iterdir()) == sorted([*manifest["files"], layout.MANIFEST]), \
        f"the publish left other files than the dataset's: it used the damaged {kind}"
    for name, info in manifest["files"].items():
        assert layout.file_sha256(world.publish / name) == info["sha256"], f"{name} at the target is not the " \
            f"dataset's: the publish used the damaged {kind}"


def report_text(world):
    from bench.results_folder import environment, machine_label
    from bench.study import parse_args
    from report.study_report import write_report

    study, _ = parse_args(study_argv(world.data, world.study, world.seed))
    env = environment()
    try:
        write_report(study, env, machine_label(env), ["strides"])
    except cli.UsageError as err:
        raise Refused(str(err)) from None
    return (world.study / "report.md").read_text()


def read_report(world, kind):
    assert report_text(world) == world.report, f"the report differs from the undamaged one's: it used the " \
        f"damaged {kind}"


def read_url(world, kind):
    """--data URL (train, the bench, make_loader): the fetch into the node-local cache; what it leaves there must
    be the dataset's files, each matching the manifest's sha256."""
    from ingest import layout, remote

    try:
        folder = remote.local_folder(world.url, world.cache, progress=False)
    except cli.UsageError as err:
        raise Refused(str(err)) from None
    manifest = layout.read_manifest(world.data)
    for name, info in manifest["files"].items():
        assert layout.file_sha256(folder / name) == info["sha256"], f"{name} in the cache is not the dataset's: " \
            f"the fetch used the damaged {kind}"
    assert json.loads((folder / remote.CACHE_MARKER).read_text())["fingerprint"] == manifest["fingerprint"]


def classified(world):
    """What docs/predict.md's standalone example prints for one photo on the exported model, run in this process
    (its refusal, sys.exit with a line, is Refused)."""
    import re
    import sys

    code = re.search(r"```python\n(.*?)```", (Path(cli.__file__).parent / "docs" / "predict.md").read_text(),
                     re.S).group(1)
    photo = next(p for p in sorted(Path(world.src).rglob("*.jpg")))
    out, argv = io.StringIO(), sys.argv
    sys.argv = ["classify.py", str(world.export / "model.onnx"), str(photo)]
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "classify.py", "exec"), {"__name__": "__main__"})
    except SystemExit as stop:
        assert isinstance(stop.code, str), f"the example exited {stop.code}"
        raise Refused(stop.code) from None
    finally:
        sys.argv = argv
    return out.getvalue()


def read_example(world, kind):
    assert classified(world) == world.classified, f"the example classified otherwise: it used the damaged {kind}"


# ----------------------------------------------------------------------------------------------- The matrix

@pytest.mark.slow
@pytest.mark.parametrize("kind,how,reader", CELLS, ids=[f"{k}-{d}-{r}" for k, d, r in CELLS])
def test_a_damaged_file_is_repaired_or_refused_in_one_line(kind, how, reader, worlds):
    world, other = worlds
    if reader in LOADERS and reader not in world.epochs:
        pytest.skip(f"the {reader} loader cannot be imported here")
    gc.collect()  # finalizers of earlier cells' loaders (FFCV's print a harmless KeyError) run now, not in this one
    world.restore()
    path = world.path(kind)
    damage(path, how, other_cache_photo(world.data, path) if kind == "ingest-cache" else
           other.path(kind))
    names = {path.name}
    if kind == "manifest" and how == "other":  # another dataset's valid manifest: its files disagree with ours
        names |= set(json.loads((world.saved / "data" / "manifest.json").read_text())["files"])
    if kind == "marker":
        names.add(str(world.run))
    try:
        if reader in LOADERS:
            read_loader(reader, world, kind)
        else:
            {"verify": lambda: read_verify(world, kind, how),
             "ingest": lambda: read_ingest(world, kind, world.saved / "data"),
             "resume": lambda: read_resume(world, kind), "train": lambda: read_train(world, kind),
             "study": lambda: read_study(world, kind), "report": lambda: read_report(world, kind),
             "url": lambda: read_url(world, kind), "example": lambda: read_example(world, kind),
             "render": lambda: read_render(world, kind, how), "publish": lambda: read_publish(world, kind)}[reader]()
    except Refused as stop:
        line = str(stop)
        assert any(name in line for name in names), f"{reader} stopped without naming {path.name}: {line}"
        if reader != "verify":
            assert "\n" not in line.strip(), f"{reader} stopped with more than one line: {line}"


def test_the_fast_tiers_cell_a_truncated_csv_is_refused_by_the_torch_loader(ingested, tmp_path):
    """One cell without the worlds, which take minutes to make: on a copy of the tiny dataset."""
    data = tmp_path / "data"
    shutil.copytree(ingested, data)
    damage(data / "train.csv", "truncate", None)
    with pytest.raises(cli.UsageError, match="train.csv") as refusal:
        read_epoch("torch", data)
    assert "\n" not in str(refusal.value).strip()
