"""A run's folder and its data: resume and --init-from refuse another dataset (or other classes) in one line,
train writes only into folders it made, and a run that died before its first checkpoint starts again.
Runs are one step of ResNet-18 at 32 px (see test_train.py), on a private copy of the tiny dataset whenever
the test changes it."""
import errno
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from cli import UsageError
from files import write_json
from ingest import layout
from report.runlog import read_metrics
from tests.test_train import tiny
from training import runfolder
from training.resume import rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_data(ingested, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ingested, data, ignore=shutil.ignore_patterns("resident-*"))
    return data


def edit_manifest(data, **changes):
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(changes)
    return layout.write_manifest(data, manifest)  # as a new ingest writes it, with its checksum


@pytest.fixture(scope="module")
def stopped(ingested, tmp_path_factory):
    """A run stopped after one step (a mid-epoch checkpoint), on the shared tiny data: copy before changing it."""
    runs = tmp_path_factory.mktemp("runs")
    return Path(train.train(tiny(ingested, runs, "stopped", max_steps=1))["run_dir"])


@pytest.mark.slow
def test_config_and_checkpoint_record_the_data_fingerprint(stopped, ingested):
    fingerprint = json.loads((ingested / "manifest.json").read_text())["fingerprint"]
    assert json.loads((stopped / "config.json").read_text())["data_fingerprint"] == fingerprint
    assert torch.load(stopped / "last.pt", weights_only=True)["data_fingerprint"] == fingerprint


@pytest.mark.slow
def test_resume_and_init_from_refuse_another_dataset_unless_allowed(ingested, tmp_path):
    data = copy_data(ingested, tmp_path)
    run_dir = Path(train.train(tiny(data, tmp_path / "runs", "a", max_steps=1))["run_dir"])
    old = json.loads((data / "manifest.json").read_text())["fingerprint"]
    edit_manifest(data, fingerprint="f" * 64)  # re-ingested from other photos of the same classes
    message = f"trained on dataset {old[:12]}, but {data} is dataset ffffffffffff.*--allow-other-data"
    with pytest.raises(UsageError, match=message):
        train.train(train.Config(resume=str(run_dir), max_steps=2))
    with pytest.raises(UsageError, match=message):
        train.train(tiny(data, tmp_path / "runs", "b", init_from=str(run_dir / "last.pt")))
    resumed = train.train(train.Config(resume=str(run_dir), max_steps=2, allow_other_data=True))
    assert resumed["stopped"] == "max_steps"
    assert torch.load(run_dir / "last.pt", weights_only=True)["data_fingerprint"] == "f" * 64


@pytest.mark.slow
def test_resume_refuses_other_classes_in_one_line_even_when_allowed(ingested, tmp_path):
    data = copy_data(ingested, tmp_path)
    run_dir = Path(train.train(tiny(data, tmp_path / "runs", "a", max_steps=1))["run_dir"])
    classes = json.loads((data / "manifest.json").read_text())["classes"]
    edit_manifest(data, classes=classes[:2] + ["Sport"] + classes[3:])
    with pytest.raises(UsageError, match="other classes \\(label 2 is 'Food', in .* it is 'Sport'\\)"):
        train.train(train.Config(resume=str(run_dir), max_steps=2, allow_other_data=True))
    edit_manifest(data, classes=classes + ["Sport"])  # today: a size-mismatch traceback from load_state_dict
    with pytest.raises(UsageError, match="other classes \\(6 classes, .* has 7\\)"):
        train.train(train.Config(resume=str(run_dir), max_steps=2, allow_other_data=True))


@pytest.mark.slow
def test_resume_refuses_a_damaged_checkpoint_in_one_line(stopped, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    (run_dir / "last.pt").write_bytes((stopped / "last.pt").read_bytes()[:5000])
    with pytest.raises(UsageError, match="last.pt is not a readable checkpoint"):
        train.train(train.Config(resume=str(run_dir)))
    torch.save({"fc.weight": torch.zeros(1)}, run_dir / "last.pt")
    with pytest.raises(UsageError, match="not a fastpix training checkpoint"):
        train.train(train.Config(resume=str(run_dir)))


@pytest.mark.slow
def test_a_folder_train_did_not_make_is_never_written_into(ingested, tmp_path):
    foreign = tmp_path / "runs" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty and was not made by train.py"):
        train.train(tiny(ingested, tmp_path / "runs", "mine"))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(UsageError, match="was not made by train.py"):
        runfolder.remove_run(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_a_run_that_died_before_its_first_checkpoint_starts_again(ingested, tmp_path, monkeypatch):
    def killed(path, **state):
        raise RuntimeError("killed while writing the first checkpoint")

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train.train(tiny(ingested, tmp_path / "runs", "died", max_steps=1))
    run_dir = tmp_path / "runs" / "died"
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "last.pt").exists()
    (run_dir / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")  # what kill -9 mid-write leaves
    (run_dir / "notes.txt").write_text("the user's")
    (run_dir / ".last.pt.tmp-backup").write_text("not a name fastpix writes")
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(UsageError, match=r"holds .last.pt.tmp-backup, notes.txt, which train.py did not write "
                                         r"there: nothing was deleted"):  # restarting would delete beside them
        train.train(train.Config(resume=str(run_dir), max_steps=1))
    assert sorted(p.name for p in run_dir.iterdir()) == before
    (run_dir / "notes.txt").unlink()
    (run_dir / ".last.pt.tmp-backup").unlink()

    resumed = train.train(train.Config(resume=str(run_dir), max_steps=1))  # --resume starts it from step 0
    assert resumed["stopped"] == "max_steps" and (run_dir / "last.pt").is_file()
    steps, _ = read_metrics(run_dir)
    assert [s["step"] for s in steps] == [0]  # the dead attempt's steps are gone, not duplicated
    assert not [p.name for p in run_dir.iterdir() if "tmp" in p.name]  # the killed write's temp file too

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train.train(tiny(ingested, tmp_path / "runs", "again", max_steps=1))
    again = train.train(tiny(ingested, tmp_path / "runs", "again", max_steps=1))  # reusing the name restarts it
    assert again["stopped"] == "max_steps"
    with pytest.raises(UsageError, match="already holds a run"):  # once it has a checkpoint it is kept
        train.train(tiny(ingested, tmp_path / "runs", "again", max_steps=1))


@pytest.mark.slow
def test_remove_run_deletes_only_what_train_wrote(stopped, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    (run_dir / "notes.txt").write_text("the user's")
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(UsageError, match="holds notes.txt, which train.py did not write there: nothing was deleted"):
        runfolder.remove_run(run_dir)  # it deleted the run beside them, then train.py refused the folder (issue 19)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    (run_dir / "notes.txt").unlink()
    runfolder.remove_run(run_dir)
    assert not run_dir.exists()


def a_run_folder(run_dir):
    """A run train.py stopped before its first checkpoint, as its files look on disk (no training needed)."""
    run_dir.mkdir(parents=True)
    write_json(run_dir / runfolder.RUN_MARKER, {"finished": False})
    write_json(run_dir / "config.json", {"config": {"net": "flat"}})
    return run_dir


def test_remove_run_leaves_a_held_run_alone_and_names_its_holder(tmp_path):
    """A user's train.py --resume holds the run folder: the bench or the study replacing that run at the same
    moment is refused, naming it, with nothing deleted."""
    from files import Busy, one_writer
    run_dir = a_run_folder(tmp_path / "run")
    before = sorted(p.name for p in run_dir.iterdir())
    with one_writer(run_dir):
        with pytest.raises(Busy, match=f"{run_dir} is being written by pid {os.getpid()} "):
            runfolder.remove_run(run_dir)
        assert sorted(p.name for p in run_dir.iterdir() if p.name != ".fastpix-writer") == before
    runfolder.remove_run(run_dir)
    assert not run_dir.exists()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_a_rerun_after_freeing_space_completes(ingested, tmp_path, monkeypatch):
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "full"

    class FullDisk(io.FileIO):  # fills up 64 KB into the checkpoint; torch.save itself then hides the OSError
        def write(self, data):
            return enospc() if self.tell() + len(data) > 2**16 else super().write(data)

    with monkeypatch.context() as m:
        m.setattr(runfolder, "open", FullDisk, raising=False)
        with pytest.raises(UsageError, match=r"disk full writing last.pt in .*full \(needs \d+ MB, .* free\): no "
                                             r"checkpoint yet; .* rerun with --name full"):
            train.train(tiny(ingested, runs, "full", max_steps=1))
    assert not (run_dir / "last.pt").exists() and not list(run_dir.glob(".last.pt.tmp*"))
    assert train.train(tiny(ingested, runs, "full", max_steps=1))["stopped"] == "max_steps"

    with monkeypatch.context() as m:  # the free-space check refuses before writing a byte
        m.setattr(runfolder.shutil, "disk_usage", lambda path: SimpleNamespace(free=5000))
        with pytest.raises(UsageError, match=r"disk full writing last.pt .*\(needs \d+ MB, 5 KB free\): kept .*"
                                             r"last.pt \(step 1\) .* --resume .*full"):
            train.train(train.Config(resume=str(run_dir), max_steps=2))
    assert torch.load(run_dir / "last.pt", weights_only=True)["global_step"] == 1

    def torn_append(path, records):  # the disk fills in the middle of a metrics line
        with open(path, "a") as f:
            f.write('{"kind": "step", "epoch": 0, "st')
        enospc()

    with monkeypatch.context() as m:
        m.setattr(train, "append_jsonl", torn_append)
        with pytest.raises(UsageError, match="disk full writing metrics.jsonl .* kept .*step 1"):
            train.train(train.Config(resume=str(run_dir), max_steps=3))
    assert not (run_dir / "metrics.jsonl").read_text().endswith("\n")  # the torn line is there

    def full_at_the_marker(path, value):
        return enospc() if Path(path).name == runfolder.RUN_MARKER else write_json(path, value)

    with monkeypatch.context() as m:
        m.setattr(train, "write_json", full_at_the_marker)
        with pytest.raises(UsageError, match="disk full writing the run marker .* kept .*step 8"):
            train.train(train.Config(resume=str(run_dir)))  # to the end: 2 epochs of 4 steps
    steps, epochs = read_metrics(run_dir)  # the torn line was dropped on resume
    assert [s["step"] for s in steps] == list(range(8)) and [e["epoch"] for e in epochs] == [0, 1]
    assert runfolder.read_marker(run_dir) == {"finished": False}
    finished = train.train(train.Config(resume=str(run_dir)))  # nothing left to train: only the marker
    assert finished["epochs"] == 2 and runfolder.read_marker(run_dir) == {"finished": True}


def test_resume_restores_only_this_processs_gpu_rng_state(monkeypatch):
    """Saved by the process on GPU 1 of a 2-GPU machine, restored on a machine with one GPU (no GPU here:
    torch.cuda's RNG calls are faked, failing like torch does for a device that is not there)."""
    gpus, current = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}, [1]

    def index(device):
        return current[0] if device == "cuda" else torch.device("cuda", device).index

    def set_state(state, device="cuda"):
        if index(device) not in gpus:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        gpus[index(device)] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpus[index(device)])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gpus[i] for i in sorted(gpus)])
    for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the one in torch.cuda.random
        monkeypatch.setattr(module, "set_rng_state", set_state)
    saved = rng_state()
    del gpus[1]
    current[0] = 0
    set_rng_state(saved)
    assert gpus == {0: torch.tensor([11], dtype=torch.uint8)}


# ----------------------------------------------------------------------------------------------- issue 19

def fake_run_folder(path, marker, config=None, **files):
    """A folder that looks like a run to a glance: a marker, maybe a config.json, any other files."""
    path.mkdir(parents=True)
    (path / ".fastpix-run").write_text(marker)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (path / name.replace("_", ".")).write_bytes(data)
    return sorted(p.name for p in path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["", "{\"finished\": fal", "[]", "\0" * 20])
def test_an_empty_or_damaged_marker_is_one_line_and_nothing_is_touched(ingested, tmp_path, marker):
    run_dir = tmp_path / "runs" / "x"
    before = fake_run_folder(run_dir, marker, {"config": {"net": "resnet18"}})
    with pytest.raises(UsageError, match=r"x/.fastpix-run is damaged .* nothing there was changed"):
        train.train(tiny(ingested, tmp_path / "runs", "x"))
    with pytest.raises(UsageError, match=r"x/.fastpix-run is damaged"):
        train.train(train.Config(resume=str(run_dir)))
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.slow
def test_a_hand_written_marker_never_lets_train_overwrite_the_users_files(ingested, tmp_path):
    """A restart deletes only what a run writes before its first checkpoint, and only from a train.py config."""
    runs = tmp_path / "runs"
    mine = fake_run_folder(runs / "plots", '{"finished": false}', {"title": "my plots"}, loss_png=b"\x89PNG mine")
    with pytest.raises(UsageError, match=r"plots has no last.pt but holds loss.png, which a run writes only after "
                                         r"its first checkpoint: nothing was deleted"):
        train.train(tiny(ingested, runs, "plots"))
    assert sorted(p.name for p in (runs / "plots").iterdir()) == mine
    assert (runs / "plots" / "loss.png").read_bytes() == b"\x89PNG mine"
    fake_run_folder(runs / "cfg", '{"finished": false}', {"title": "my settings"})
    with pytest.raises(UsageError, match=r"cfg/config.json is damaged or not train.py's .* nothing was deleted"):
        train.train(tiny(ingested, runs, "cfg"))
    assert json.loads((runs / "cfg" / "config.json").read_text()) == {"title": "my settings"}


@pytest.mark.slow
def test_resume_refuses_a_config_json_that_does_not_match_its_checkpoint(stopped, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    edited = {**saved, "config": {**saved["config"], "optimizer": "adam"}}
    (run_dir / "config.json").write_text(json.dumps(edited))
    with pytest.raises(UsageError, match=r"config.json does not match last.pt \(optimizer is 'adam' in config.json, "
                                         r"'sgd' in last.pt\): config.json was edited or last.pt is another run's"):
        train.train(train.Config(resume=str(run_dir)))
    (run_dir / "config.json").write_text(json.dumps(saved))
    state = runfolder.read_checkpoint("--resume", stopped / "last.pt")  # another run's, of another head
    state.pop("config")
    state["model"]["fc.weight"] = torch.zeros(3, 512)
    runfolder.save_checkpoint(run_dir / "last.pt", **state)
    with pytest.raises(UsageError, match=r"last.pt does not fit the run's config.json \(.*fc.weight"):
        train.train(train.Config(resume=str(run_dir)))


@pytest.mark.slow
def test_a_checkpoint_with_flipped_weight_bytes_is_refused_by_its_digest(stopped, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    weight = torch.load(stopped / "last.pt", weights_only=True)["model"]["fc.weight"].numpy().tobytes()
    data = bytearray((stopped / "last.pt").read_bytes())
    at = data.find(weight[:256])
    assert at > 0
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])  # same size; torch.load still reads it
    (run_dir / "last.pt").write_bytes(bytes(data))
    torch.load(run_dir / "last.pt", weights_only=True)
    with pytest.raises(UsageError, match="last.pt is damaged: its content no longer matches the digest"):
        train.train(train.Config(resume=str(run_dir)))


def checkpoint_state(device="cpu"):
    """A small state shaped like a checkpoint's: a channels_last weight, a counter, an empty tensor, bf16 momentum,
    per-rank RNG tuples, plain values."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    return dict(model={"conv.weight": conv.to(device), "bn.num_batches_tracked": torch.tensor(7, device=device),
                       "empty": torch.zeros(0, device=device)},
                optimizer={"state": {0: {"momentum_buffer": torch.randn(5, generator=gen).bfloat16().to(device)}},
                           "param_groups": [{"lr": 0.1, "params": [0]}]},
                rng=[(torch.arange(10, dtype=torch.uint8), 3)], epoch=2, config={"net": "flat", "strides": None},
                flags=torch.tensor([True, False], device=device))


def test_a_checkpoint_is_written_and_verified_as_before(tmp_path):
    """One host copy serves the digest and torch.save: on the CPU the file is what torch.save wrote before, byte
    for byte, and the digest is the one checkpoints were saved with (this state's, computed by the code before),
    so older checkpoints still verify."""
    digest = "a30b445b85061324c933b0c0178f4a5ae6d5f7678eff81a6f9e530fbd0d581cc"
    assert runfolder.state_digest(checkpoint_state()) == digest
    runfolder.save_checkpoint(tmp_path / "last.pt", **checkpoint_state())
    before = io.BytesIO()
    torch.save({**checkpoint_state(), "sha256": digest}, before)
    assert (tmp_path / "last.pt").read_bytes() == before.getvalue()
    assert runfolder.read_checkpoint("--resume", tmp_path / "last.pt")["epoch"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts device-to-host copies: needs a GPU")
def test_a_checkpoint_copies_the_gpus_tensors_to_the_host_once(tmp_path, monkeypatch):
    copied = []
    for cls in (torch.Tensor, torch.UntypedStorage):  # Tensor.cpu (the digest's), storage.cpu (torch.save's)
        real = cls.cpu
        monkeypatch.setattr(cls, "cpu", lambda self, real=real: copied.append(self.device.type != "cpu") or real(self))
    state = checkpoint_state("cuda")
    runfolder.save_checkpoint(tmp_path / "last.pt", **state)
    on_gpu = [state["model"]["conv.weight"], state["model"]["bn.num_batches_tracked"], state["model"]["empty"],
              state["optimizer"]["state"][0]["momentum_buffer"], state["flags"]]
    assert sum(copied) == len(on_gpu)  # was twice as many
    saved = runfolder.read_checkpoint("--resume", tmp_path / "last.pt")
    assert torch.equal(saved["model"]["conv.weight"], on_gpu[0].cpu())


@pytest.mark.parametrize("damage,message", [
    (lambda text: text.replace("\n", "\nnot json\n", 1), "is damaged at line 2 \\(not a metrics record\\)"),
    (lambda text: "\0" * len(text), "is damaged at line 1"),
    (None, "metrics.jsonl is missing"),
])
@pytest.mark.slow
def test_a_damaged_metrics_log_stops_resume_in_one_line(stopped, tmp_path, damage, message):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    metrics = run_dir / "metrics.jsonl"
    if damage is None:
        metrics.unlink()
    else:
        metrics.write_text(damage(metrics.read_text()))
    with pytest.raises(UsageError, match=message):
        train.train(train.Config(resume=str(run_dir)))


@pytest.mark.slow
def test_resume_needs_only_the_run_folder_and_the_data(ingested, stopped, tmp_path, monkeypatch):
    """--pretrained moved away, a relative --data from another directory, the data moved (--data, by fingerprint)."""
    weights = tmp_path / "imported.pt"
    shutil.copy(stopped / "last.pt", weights)
    run = train.train(tiny(ingested, tmp_path / "runs", "transfer", pretrained=str(weights), max_steps=1))
    weights.rename(tmp_path / "moved.pt")
    resumed = train.train(train.Config(resume=run["run_dir"], max_steps=2))
    assert resumed["stopped"] == "max_steps"

    monkeypatch.chdir(ingested.parent)
    run_dir = Path(train.train(tiny(ingested.name, tmp_path / "runs", "relative", max_steps=1))["run_dir"])
    monkeypatch.chdir(tmp_path)
    assert train.train(train.Config(resume=str(run_dir), max_steps=2))["stopped"] == "max_steps"

    saved = json.loads((run_dir / "config.json").read_text())  # as a run recorded before --data was absolute
    (run_dir / "config.json").write_text(json.dumps({**saved, "config": {**saved["config"], "data": "gone"}}))
    with pytest.raises(UsageError, match=f"its dataset gone \\(relative to {tmp_path}\\) is not there: pass --data"):
        train.train(train.Config(resume=str(run_dir), max_steps=3))
    moved = copy_data(ingested, tmp_path)
    resumed = train.train(train.Config(resume=str(run_dir), data=str(moved), max_steps=3))
    assert resumed["stopped"] == "max_steps"
    assert torch.load(run_dir / "last.pt", weights_only=True)["config"]["data"] == str(moved)


@pytest.mark.slow
def test_a_damaged_checkpoint_of_a_pretrained_run_is_the_damage_line_on_resume(stopped, ingested, tmp_path):
    """A transfer run's resume takes its pretrained layers from its own last.pt: read once, checked, so damage
    there is the checkpoint's line, not a complaint about --pretrained weights the user never gave."""
    weights = tmp_path / "imported.pt"
    shutil.copy(stopped / "last.pt", weights)
    run_dir = Path(train.train(tiny(ingested, tmp_path / "runs", "transfer", pretrained=str(weights),
                                    max_steps=1))["run_dir"])
    intact = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(intact[: len(intact) // 2])
    with pytest.raises(UsageError, match=f"^--resume {run_dir}/last.pt is not a readable checkpoint"):
        train.train(train.Config(resume=str(run_dir), max_steps=2))


@pytest.mark.slow
def test_a_run_folder_has_one_writer(stopped, ingested, tmp_path):
    """Held by another process (here: this one, through another descriptor), a run folder is refused at once,
    for a new run of that name and for --resume, with nothing written."""
    from files import Busy, one_writer
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with one_writer(run_dir):
        with pytest.raises(Busy, match=f"copy is being written by pid {os.getpid()}"):
            train.train(train.Config(resume=str(run_dir), max_steps=2))
        with pytest.raises(Busy, match="copy is being written by pid"):
            train.train(tiny(ingested, tmp_path, "copy"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
