"""Ingest runs over time: crash and rerun, up to date, changed source, --force, and bad command lines."""
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
from conftest import TINY_STORE
from ingest import build as build_module
from ingest import demo, layout
from ingest.build import build
from ingest.config import IngestConfig

REPO = Path(__file__).resolve().parent.parent
SILENT = dict(progress=False, log=lambda *_: None)


def tiny_cfg(src, out, **kw):
    """The settings the `ingested` fixture was built with (see conftest)."""
    return IngestConfig(src=src, out=out, **{"store_size": TINY_STORE, "shard_size": 32, "workers": 2, **kw})


INGEST_FILES = ("*.beton", "*.tar", "*.idx", "*.csv", layout.MANIFEST)  # loaders may add caches of their own


def outputs(out):
    """{file name: sha256} of what ingest writes for the loaders (not its hidden cache)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in INGEST_FILES for p in sorted(Path(out).glob(pattern))}


@pytest.mark.slow
def test_killed_run_is_finished_by_a_rerun_with_the_same_result(tiny_src, ingested, tmp_path, monkeypatch):
    from webdataset import TarWriter

    out = tmp_path / "out"
    real_write, calls = TarWriter.write, []

    def dies_midway(self, sample):
        calls.append(1)
        if len(calls) == 40:  # inside the second train shard, after the betons and csvs
            raise KeyboardInterrupt
        return real_write(self, sample)

    monkeypatch.setattr(TarWriter, "write", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_cfg(tiny_src, out), **SILENT)
    monkeypatch.undo()
    assert not (out / layout.MANIFEST).exists()
    # what a SIGKILL would leave besides: temp files and a half-filled cache (stale shards: test_ingest_integrity)
    (out / ".train-00000.tar.tmp4242").write_bytes(b"partial")
    cached = sorted((out / ".cache").glob("*/*"))
    for path in cached[::2]:
        path.unlink()
    cached[1].with_name(f".{cached[1].name}.tmp77").write_bytes(b"partial")

    build(tiny_cfg(tiny_src, out, workers=1), **SILENT)  # another worker count too: must not matter
    assert outputs(out) == outputs(ingested)
    assert not list(out.glob(".*.tmp*")) and not list((out / ".cache").glob("*/.*"))


@pytest.mark.slow
def test_sigkilled_run_is_finished_by_a_rerun(tiny_src, ingested, tmp_path):
    """A real kill -9 of the script and its workers, mid-validation, then a rerun."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "ingest/build.py", "--src", str(tiny_src), "--out", str(out),
                             "--store-size", str(TINY_STORE), "--shard-size", "32", "--quiet"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".cache/*/*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the group we started: the script and its workers
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / layout.MANIFEST).exists()
    build(tiny_cfg(tiny_src, out), **SILENT)
    assert outputs(out) == outputs(ingested)


def test_unchanged_source_is_up_to_date_and_untouched(tiny_src, ingested, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for g in INGEST_FILES for p in ingested.glob(g)}
    monkeypatch.setattr(build_module, "validate_all", lambda *a: pytest.fail("validated an up-to-date source"))
    said = []
    build(tiny_cfg(tiny_src, ingested), progress=False, log=said.append)
    assert "up to date" in said[0]
    assert {p.name: p.stat().st_mtime_ns for g in INGEST_FILES for p in ingested.glob(g)} == before


def test_script_says_up_to_date(tiny_src, ingested):
    """The real entry point, run as a script from the repo root."""
    done = subprocess.run([sys.executable, "ingest/build.py", "--src", str(tiny_src), "--out", str(ingested),
                           "--store-size", str(TINY_STORE), "--shard-size", "32", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout


@pytest.mark.slow
def test_changed_source_rebuilds_and_force_rebuilds_identically(tiny_src, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(tiny_src, src, symlinks=True)
    first = build(tiny_cfg(src, out), **SILENT)
    photo, _, _ = demo._photo(demo.DemoConfig(seed=7), "Food", 0)
    buf = io.BytesIO()
    photo.save(buf, "JPEG")
    (src / "Food" / "new.jpg").write_bytes(buf.getvalue())
    second = build(tiny_cfg(src, out), **SILENT)
    assert second["fingerprint"] != first["fingerprint"]
    assert (second["found"], second["written"]) == (first["found"] + 1, first["written"] + 1)
    assert "Food/new.jpg" in (out / "train.csv").read_text() + (out / "test.csv").read_text()
    before = outputs(out)
    forced = []
    build(tiny_cfg(src, out, force=True), progress=False, log=forced.append)
    assert "up to date" not in forced[-1] and outputs(out) == before


# --- bad command lines: one line, exit 2, nothing written ----------------------------------------------

def _bad_cases(tiny_src, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    src = ["--src", str(tiny_src)]
    return {
        "missing --src": (["--src", str(tmp_path / "nope")], "does not exist"),
        "--src is a file": (["--src", str(a_file)], "not a directory"),
        "no class folders": (["--src", str(empty)], "no class folders"),
        "--out inside --src": (src + ["--out", str(tiny_src / "out")], "inside --src"),
        "--out under a file": (src + ["--out", str(a_file / "out")], "cannot be created"),
        "quality 0": (src + ["--quality", "0"], "--quality must be 1..100"),
        "test share 1.5": (src + ["--test-share", "1.5"], "--test-share must be between 0 and 1"),
        "not a number": (src + ["--store-size", "big"], "invalid int value"),
        "unknown flag": (src + ["--frobnicate"], "unrecognized arguments"),
    }


@pytest.mark.parametrize("case", ["missing --src", "--src is a file", "no class folders", "--out inside --src",
                                  "--out under a file", "quality 0", "test share 1.5", "not a number",
                                  "unknown flag"])
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(tiny_src, tmp_path, capsys, case):
    argv, message = _bad_cases(tiny_src, tmp_path)[case]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        cli.run(build_module.main, argv + ["--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists() and not (tiny_src / "out").exists()


def test_class_without_two_valid_images_is_named_and_nothing_is_written(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for name, count in (("cats", 3), ("dogs", 1)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            photo, _, _ = demo._photo(demo.DemoConfig(long_side=(150, 200)), name, i)
            photo.save(src / name / f"{i}.jpg")
    (src / "dogs" / "broken.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        cli.run(build_module.main, ["--src", str(src), "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    assert "dogs has fewer than 2 valid images" in capsys.readouterr().err
    assert outputs(out) == {}  # the per-file cache may stay, to speed up the fixed rerun


def test_script_reports_bad_input_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "ingest/build.py", "--src", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_second_build_of_one_folder_is_refused_naming_the_first(tiny_src, ingested, tmp_path, monkeypatch):
    """Two writers of one folder would interleave: the second `ingest/build.py` is refused at once, with the
    first one's pid, and the first finishes undisturbed. (Before: the second waited silently.) The first is
    held inside the lock until the second has been answered, so the two surely overlap."""
    import threading

    import files

    holding, answered, real_claim = threading.Event(), threading.Event(), build_module.claim

    def claim_then_hold(*args):
        holding.set()
        answered.wait(60)
        return real_claim(*args)

    monkeypatch.setattr(build_module, "claim", claim_then_hold)
    out, first = tmp_path / "out", []
    thread = threading.Thread(target=lambda: first.append(build(tiny_cfg(tiny_src, out), progress=False,
                                                                  log=lambda *_: None)))
    thread.start()
    assert holding.wait(60)
    with pytest.raises(files.Busy, match=f"is being written by pid {os.getpid()}"):
        build(tiny_cfg(tiny_src, out), progress=False, log=lambda *_: None)
    answered.set()
    thread.join()
    assert first, "the first build did not finish"
    assert outputs(out) == outputs(ingested)
