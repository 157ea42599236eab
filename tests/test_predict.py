"""predict.py on a tiny run trained here: it agrees with the run's own test pass on the test split's source photos,
uses the tested weights (EMA, flip TTA) and merged classes, turns every bad photo into a row with ingest's reason,
exits 0 / 1 / 2 as documented, and exports ONNX and TorchScript models whose logits match the eager model's; the
standalone onnxruntime example of docs/predict.md runs on the export."""
import csv
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import nets
import predict
import train
from cli import run as cli_run
from ingest.build import build
from ingest.config import IngestConfig
from ingest.validate import Rejected, normalise
from predicting import export as export_module
from predicting.tested import AsTested, load_run, load_tested_weights

REPO = Path(predict.__file__).resolve().parent
MERGE = "People+Celebrities"
# The run tested the shards' JPEGs (ingest's conversion, re-encoded once at quality 90); predict converts the
# source photos the same way but skips the re-encode, so probabilities move a little (measured: up to 0.008 on
# this run, fp32). A top-1 may then differ only where the run's two best classes were within that of each other.
PROBABILITY_BOUND = 0.02  # largest |probability difference| of the run's predicted class
AGREEMENT_MIN = 0.8  # top-1 agreement with test_predictions.npz (the tiny run's classes nearly tie: measured 0.89)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_src, tmp_path_factory):
    """A fast-recipe run (EMA + flip TTA) with two classes merged, on the tiny photos split half and half, so that
    its test split has ~30 photos; fp32, on the CPU, so the figures mean the same everywhere."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    build(IngestConfig(src=tiny_src, out=data, store_size=64, shard_size=32, workers=2, test_share=0.5),
          progress=False, log=lambda *_: None)
    summary = train.train(train.Config(
        net="resnet18", loader="torch", data=str(data), res=32, batch_size=8, epochs=2, lr=0.01, warmup=0.5,
        amp="off", device="cpu", runs_dir=str(root / "runs"), name="tiny", workers=0, bootstrap=50,
        recipe="fast", pieces=("ema", "flip_tta"), merge=(MERGE,)))
    return Path(summary["run_dir"]), data


@pytest.mark.slow
def test_source_photos_of_the_test_split_agree_with_the_runs_test_pass(trained):
    run_dir, data = trained
    manifest = json.loads((data / "manifest.json").read_text())
    with open(data / "test.csv", newline="") as f:
        photos = [(str(Path(manifest["source"]) / row["path"]), "") for row in csv.DictReader(f)]
    tested = load_run(run_dir)
    probs = np.stack([p for _, p, _ in predict.predict_photos(tested, photos, batch_size=8, workers=1,
                                                              progress=False)])
    saved = np.load(run_dir / "test_predictions.npz")
    theirs = probs[np.arange(len(probs)), saved["y_pred"]]  # our probability of the run's prediction
    agreement = float((probs.argmax(1) == saved["y_pred"]).mean())
    difference = float(np.abs(theirs - saved["confidence"]).max())
    print(f"agreement {agreement:.3f} on {len(photos)} photos, largest probability difference {difference:.4f}")
    assert len(photos) >= 30
    assert agreement >= AGREEMENT_MIN and difference <= PROBABILITY_BOUND
    assert np.all(probs.max(1) - theirs <= 2 * PROBABILITY_BOUND)  # every disagreement is a near tie


def test_the_tested_weights_are_the_emas_and_flip_tta_averages_the_mirror():
    torch.manual_seed(0)
    model, ema = nets.build("resnet18", 3), nets.build("resnet18", 3)
    state = {"model": model.state_dict(), "ema": {"n_averaged": torch.tensor(5),
                                                  **{f"module.{k}": v for k, v in ema.state_dict().items()}}}
    loaded = nets.build("resnet18", 3)
    load_tested_weights(loaded, state, "x.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())
    assert not all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both = AsTested(ema.eval(), flip=True)(images)
        assert torch.allclose(both, (ema(images) + ema(images.flip(3))) / 2)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_top_k_rows_name_the_merged_classes_in_falling_probability(trained, tmp_path, capsys):
    run_dir, data = trained
    photo = next((Path(json.loads((data / "manifest.json").read_text())["source"]) / "Food").glob("*.jpg"))
    with pytest.raises(SystemExit) as exit:
        cli_run(predict.main, ["--run", str(run_dir), str(photo), "--top-k", "5", "--out", str(tmp_path / "p.csv"),
                               "--workers", "0"])
    assert exit.value.code == 0
    (row,) = rows(tmp_path / "p.csv")
    classes = json.loads((run_dir / "config.json").read_text())["classes"]
    assert MERGE in classes and "People" not in classes and len(classes) == 5
    assert sorted(row[f"class_{i}"] for i in range(1, 6)) == sorted(classes)
    probs = [float(row[f"prob_{i}"]) for i in range(1, 6)]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    assert row["run"] == "tiny" and row["reason"] == ""
    with pytest.raises(SystemExit) as exit:
        cli_run(predict.main, ["--run", str(run_dir), str(photo), "--top-k", "6", "--out", str(tmp_path / "q.csv")])
    assert exit.value.code == 2 and "5 classes" in capsys.readouterr().err


def bomb_png():
    """A PNG whose header claims 40,000 x 40,000 pixels (as tests/test_ingest.py's)."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(20_000))) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_every_bad_photo_is_a_row_with_ingests_reason(trained, tiny_src, tmp_path):
    run_dir, data = trained
    junk = json.loads((tiny_src / ".demo.json").read_text())["junk"]
    good = (tiny_src / "Food" / "00000.jpg").read_bytes()
    photos = tmp_path / "photos"
    (photos / "deeper").mkdir(parents=True)
    files = {"not_an_image.jpg": (tiny_src / junk["not_an_image"][0]).read_bytes(), "empty.jpg": b"",
             "truncated.jpg": (tiny_src / junk["truncated"][0]).read_bytes(), "bomb.png": bomb_png(),
             "deeper/good.jpg": good, ".hidden.jpg": good}
    for name, content in files.items():
        (photos / name).write_bytes(content)
    (photos / "broken.jpg").symlink_to(photos / "gone.jpg")
    listed = tmp_path / "list.txt"
    listed.write_text("# photos elsewhere\nphotos/deeper/good.jpg\n\nphotos/missing.jpg\n")
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit:
        cli_run(predict.main, ["--run", str(run_dir), str(photos), str(listed), "--out", str(out), "--workers", "0"])
    assert exit.value.code == 1
    reasons = {Path(r["path"]).relative_to(tmp_path).as_posix(): r["reason"] for r in rows(out)}
    ingest_says = {}
    for name in ("not_an_image.jpg", "empty.jpg", "truncated.jpg", "bomb.png"):
        with pytest.raises(Rejected) as why:
            normalise(files[name], IngestConfig(store_size=64))
        ingest_says[f"photos/{name}"] = str(why.value)
    assert ingest_says["photos/bomb.png"].startswith("decompression bomb")
    assert reasons == {**ingest_says, "photos/broken.jpg": "unreadable: broken symlink",
                       "photos/deeper/good.jpg": "", "photos/missing.jpg": "unreadable: No such file or directory"}
    assert [r["class_1"] != "" for r in rows(out)].count(True) == 2  # good.jpg, from the folder and the list
    with pytest.raises(SystemExit) as exit:  # only readable photos: 0
        cli_run(predict.main, ["--run", str(run_dir), str(photos / "deeper"), "--out", str(out), "--workers", "0"])
    assert exit.value.code == 0


@pytest.mark.slow
def test_no_run_a_damaged_checkpoint_or_another_dataset_is_one_line_and_exit_2(trained, ingested, tmp_path, capsys):
    run_dir, _ = trained
    photo = str(REPO / "README.md")  # never read: each case stops before the photos
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    cases = {"no config.json": ["--run", str(tmp_path / "nothing")],
             "not a readable checkpoint": ["--run", str(damaged)],
             "trained on dataset": ["--run", str(run_dir), "--data", str(ingested)]}
    for says, argv in cases.items():
        with pytest.raises(SystemExit) as exit:
            cli_run(predict.main, [*argv, photo, "--out", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run_dir, _ = trained
    out = tmp_path_factory.mktemp("exported")
    for name in ("model.onnx", "model.pt"):
        with pytest.raises(SystemExit) as exit:
            cli_run(predict.main, ["--run", str(run_dir), "--export", str(out / name)])
        assert exit.value.code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.onnx", "model.pt"])
def test_exports_match_the_eager_model_within_the_fp32_bound(trained, exported, name):
    run_dir, _ = trained
    sidecar = json.loads((exported / f"{name}.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert sidecar["classes"] == config["classes"] and sidecar["res"] == 32 and sidecar["flip_tta"] is True
    assert sidecar["store_size"] == 64 and sidecar["resize_to"] == 37 and len(sidecar["mean"]) == 3
    parity = sidecar["parity"]
    print(f"{name}: largest logit difference {parity['max_abs_logit_difference']:.3g} (bound {parity['bound']:.3g})")
    assert parity["photos"] >= 30 and parity["max_abs_logit_difference"] <= parity["bound"] <= 1e-3
    images = torch.randn(3, 3, 32, 32)  # another batch size than the parity check's
    with torch.no_grad():
        eager = load_run(run_dir).model(images).numpy()
    if name.endswith(".onnx"):
        import onnxruntime
        ours = onnxruntime.InferenceSession(str(exported / name)).run(None, {"images": images.numpy()})[0]
    else:
        ours = torch.jit.load(str(exported / name))(images).detach().numpy()
    assert np.abs(ours - eager).max() <= parity["bound"]


@pytest.mark.slow
def test_an_export_that_does_not_match_fails_naming_the_difference(trained, tmp_path, monkeypatch, capsys):
    run_dir, _ = trained
    real = export_module.export_torchscript
    monkeypatch.setattr(export_module, "export_torchscript", lambda *args: real(*args) + 0.5)
    with pytest.raises(SystemExit) as exit:
        cli_run(predict.main, ["--run", str(run_dir), "--export", str(tmp_path / "model.pt")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and re.search(r"differ .* by up to 0\.5", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_standalone_onnxruntime_example_classifies_as_predict_does(trained, exported, tmp_path):
    run_dir, data = trained
    code = re.search(r"```python\n(.*?)```", (REPO / "docs" / "predict.md").read_text(), re.S).group(1)
    assert len(code.splitlines()) <= 30  # short enough to read at a glance, its sidecar check included
    script = tmp_path / "classify.py"
    script.write_text(code)
    source = Path(json.loads((data / "manifest.json").read_text())["source"])
    photos = sorted((source / "Landscapes").glob("*.jpg"))[:3]
    tested = load_run(run_dir)
    for (path, probs, _) in predict.predict_photos(tested, [(str(p), "") for p in photos], workers=0, progress=False):
        result = subprocess.run([sys.executable, str(script), str(exported / "model.onnx"), path], capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        name, prob = result.stdout.strip().rsplit(" ", 1)
        assert name == tested.classes[probs.argmax()] and abs(float(prob) - probs.max()) < 0.03
