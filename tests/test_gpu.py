"""The GPU harness (bench/gpu/) on the CPU: its report writer, budget, gates and wheel transport, its one entry
point, and that every failure is reported, never fatal. No wall-time asserts here: durations belong to
benchmarks, and the cores are shared."""
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bench.gpu import SKIP_EXIT
from bench.gpu import wheels as gpu_wheels
from bench.gpu.check import LOADER_ROWS, State, Step, brief, parse_args, plan, run_checks
from bench.gpu.probes import best_loader

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.mark.slow
def test_report_records_ok_failure_timeout_skip_and_skips_dependents(tmp_path):
    steps = [
        Step("fine", "a step that works", [PY, "-c", "print('noise'); print('OK all good')"], 1),
        Step("broken", "a step that fails", [PY, "-c", "raise SystemExit('error: no CUDA GPU here')"], 1),
        Step("hangs", "a step that hangs", [PY, "-c", "import time; print('started'); time.sleep(600)"], 0.1),
        Step("absent", "a library not installed", [PY, "-c", f"print('SKIPPED no DALI'); exit({SKIP_EXIT})"], 1),
        Step("after_broken", "needs the failed one", [PY, "-c", "print('never')"], 1, needs=("broken",)),
        Step("after_absent", "needs the skipped one", [PY, "-c", "print('never')"], 1, needs=("absent",)),
        Step("after_fine", "runs after failures", [PY, "-c", "print('OK still running')"], 1, needs=("fine",)),
    ]
    steps[2].timeout_s = 1
    report = run_checks(steps, tmp_path, budget_s=300)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [s.name for s in steps]
    assert checks["fine"]["status"] == "ok" and checks["fine"]["message"] == "OK all good"
    assert checks["broken"]["status"] == "failed" and "no CUDA GPU here" in checks["broken"]["message"]
    assert checks["hangs"]["status"] == "failed" and "timed out" in checks["hangs"]["message"]
    assert checks["absent"]["status"] == "skipped" and checks["absent"]["message"] == "SKIPPED no DALI"
    assert checks["after_broken"]["status"] == "skipped" and "broken (failed" in checks["after_broken"]["message"]
    assert "absent (skipped: SKIPPED no DALI)" in checks["after_absent"]["message"]
    assert checks["after_fine"]["status"] == "ok"
    assert report["summary"] == {"ok": 2, "failed": 2, "skipped": 3}
    for c in report["checks"]:
        assert set(c) >= {"name", "what", "status", "message", "seconds", "estimate_s"}
    assert "raise SystemExit" in (tmp_path / checks["broken"]["log"]).read_text()


def test_a_step_needing_more_than_the_budget_left_is_skipped_not_started(tmp_path):
    marker = tmp_path / "started"
    steps = [Step("short", "fits", [PY, "-c", "print('OK')"], 1),
             Step("long", "needs 10 minutes", [PY, "-c", f"open({str(marker)!r}, 'w')"], 600),
             Step("after", "fits again", [PY, "-c", "print('OK after')"], 1)]
    report = run_checks(steps, tmp_path, budget_s=120)
    short, long, after = report["checks"]
    assert short["status"] == "ok" and after["status"] == "ok"
    assert long["status"] == "skipped" and long["message"].startswith("out of the time budget")
    assert not marker.exists()


def test_results_and_versions_are_taken_into_the_report_and_bundled(tmp_path):
    env, table = tmp_path / "r" / "env.json", tmp_path / "r" / "table.json"
    write = "import json, sys; json.dump({}, open(sys.argv[1], 'w')); print('OK wrote')"
    rows = {"title": "t", "rows": [{"backend": "torch", "split": "train", "images_per_sec": 5.0, "peak_rss_mb": 1}]}
    env.parent.mkdir()
    steps = [Step("env", "versions", [PY, "-c", write.format({"torch": "2.11.0"}), env], 1, result=env),
             Step("bench_loaders", "table", [PY, "-c", write.format(rows), table], 1, result=table)]
    report = run_checks(steps, tmp_path / "out", budget_s=60, bundle=tmp_path / "bundle")
    assert report["versions"] == {"torch": "2.11.0"}
    assert report["results"]["bench_loaders"]["rows"] == [{"backend": "torch", "split": "train",
                                                           "images_per_sec": 5.0}]
    assert json.loads((tmp_path / "bundle" / "report.json").read_text()) == report
    with tarfile.open(tmp_path / "bundle" / "gpu_check.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()


def test_plan_gates_every_check_on_what_it_needs(tmp_path):
    steps = {s.name: s for s in plan(parse_args([str(tmp_path), "--python", PY]))}
    order = list(steps)
    # The most valuable results first: loaders table, then training with the best loader, then the probes.
    assert order.index("bench_loaders") < order.index("train_best") < order.index("tta") < order.index("stream_race")
    assert order.index("wheels") < order.index("env") < order.index("dali_import")
    for name in ("torch_gpu_decode", "resident_gpu", "stream_race", "amp_bf16", "amp_fp16", "channels_last",
                 "compile", "nccl", "torchrun_train", "train_resident", "train_torch"):
        assert not {"dali_import", "ffcv_import"} & set(steps[name].needs), name  # torch-only: always run
    assert "dali_import" in steps["dali_mixed"].needs and "ffcv_import" in steps["ffcv_gpu"].needs
    for step in steps.values():
        argv = step.argv(State()) if callable(step.argv) else step.argv
        if step.name not in ("gpu", "wheels", "env", "dali_import", "ffcv_import", "data"):
            assert "cuda" in argv, step.name  # never silently falls back to the CPU
    assert not steps["amp_fp16"].skip


@pytest.mark.slow
def test_tta_is_a_short_bench_tta_run_and_the_report_keeps_its_table(tmp_path):
    from bench import tta
    step = {s.name: s for s in plan(parse_args([str(tmp_path), "--python", PY]))}["tta"]
    assert step.argv[1:3] == ["-m", "bench.tta"] and not step.parallel
    cfg = tta.config_from_args([str(a) for a in step.argv[3:]])  # the flags bench.tta takes today
    assert (cfg.seeds, cfg.ablation_seeds, cfg.device) == ((0,), (), "cuda")
    summary = [{"label": "study", "time_to_target_s": 9.0}, {"label": "fast", "time_to_target_s": 3.0}]
    kept = brief("tta", {"targets": {"0": 0.4}, "summary": summary, "rows": [{"curve": [{"epoch": 0}]}]})
    assert kept == {"targets": {"0": 0.4}, "summary": summary}


def test_loaders_table_leaves_out_backends_whose_library_did_not_import(tmp_path):
    step = {s.name: s for s in plan(parse_args([str(tmp_path), "--python", PY]))}["bench_loaders"]
    state = State()
    state.status.update(dali_import="skipped", ffcv_import="ok")
    argv = [str(a) for a in step.argv(state)]
    backends = argv[argv.index("--backends") + 1].split(",")
    assert backends == [b for b in LOADER_ROWS if b != "dali"]


def test_training_with_the_best_loader_is_not_repeated(tmp_path):
    steps = {s.name: s for s in plan(parse_args([str(tmp_path), "--python", PY]))}
    state = State()
    state.results["train_best"] = {"loader": "resident"}
    assert "already trained with resident" in steps["train_resident"].argv(state)
    assert "torch" in steps["train_torch"].argv(state)


def test_best_loader_is_the_fastest_fastpix_train_row(tmp_path):
    rows = [{"backend": "decode", "split": "train", "images_per_sec": 9000},
            {"backend": "folder", "split": "train", "images_per_sec": 800},
            {"backend": "torch", "split": "train", "images_per_sec": 3000},
            {"backend": "resident", "split": "train", "images_per_sec": 7000},
            {"backend": "torch", "split": "train", "augment": "none", "images_per_sec": 7500},  # not what trains
            {"backend": "decode-pil", "split": "train", "augment": None, "images_per_sec": 9500},
            {"backend": "dali-reference", "split": "train", "images_per_sec": 8000},
            {"backend": "dali", "split": "train", "error": "no DALI"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    assert best_loader(path)[0] == "resident"
    assert best_loader(tmp_path / "missing.json")[0] == "resident"


def test_dry_run_skips_only_fp16(tmp_path):
    steps = plan(parse_args([str(tmp_path), "--python", PY, "--cpu-dry-run"]))
    assert [s.name for s in steps if s.skip] == ["amp_fp16"]
    assert "gpu" not in [s.name for s in steps]


def test_tests_run_the_suite_instead_of_the_checks(tmp_path):
    steps = plan(parse_args([str(tmp_path), "--python", PY, "--tests"]))
    assert [s.name for s in steps] == ["gpu", "wheels", "env", "torch_cuda", "dali_import", "ffcv_import", "tests"]
    assert steps[-1].argv[1:4] == ["-m", "bench.gpu", "suite"] and "--quick" not in steps[-1].argv
    dry = plan(parse_args([str(tmp_path), "--python", PY, "--tests", "--cpu-dry-run", "--only", "env,tests"]))
    assert [s.name for s in dry] == ["env", "tests"] and "--quick" in dry[-1].argv


@pytest.mark.slow
def test_tests_dry_run_reports_the_suites_outcomes(tmp_path):
    """The plumbing of --tests on the CPU: interpreter, PYTHONPATH, the summary in the report."""
    out = tmp_path / "out"
    proc = subprocess.run([PY, "-m", "bench.gpu", "check", str(out), "--skip-setup", "--python", PY, "--cpu-dry-run",
                           "--tests", "--only", "tests"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    report = json.loads((out / "report.json").read_text())
    check, tests = report["checks"][0], report["results"]["tests"]
    assert check["status"] == "ok" and check["message"].startswith("OK ") and "passed" in check["message"]
    assert tests["exit"] == 0 and tests["passed"] > 0 and not tests["failed"]
    assert tests["modules"] == ["test_common.py"]


def test_a_library_that_is_not_installed_is_skipped_with_the_reason(capsys):
    from bench.gpu.probes import main
    assert main(["import", "--module", "no_such_module_xyz"]) == SKIP_EXIT
    assert capsys.readouterr().out.startswith("SKIPPED no_such_module_xyz is not installed")


@pytest.mark.slow
def test_without_a_gpu_the_gpu_checks_fail_with_the_reason(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test is about the report on a machine without one")
    out = tmp_path / "out"
    proc = subprocess.run([PY, "-m", "bench.gpu", "check", str(out), "--skip-setup", "--python", PY,
                           "--only", "torch_cuda", "--budget", "120"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    assert checks["torch_cuda"]["status"] == "failed" and "GPU" in checks["torch_cuda"]["message"]


@pytest.mark.parametrize("argv", [[], ["nope"], ["check"], ["check", "out", "--budget", "5"], ["wheels", "unpack"]])
def test_a_usage_error_is_one_line(argv, tmp_path):
    proc = subprocess.run([PY, "-m", "bench.gpu", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert not (REPO / "out").exists()


@pytest.mark.slow
def test_one_entry_point_runs_every_command_without_importing_torch_where_it_needs_none():
    """check and wheels start before anything is installed: their --help must not need torch (or pytest)."""
    for command, needs_torch in (("check", False), ("wheels", False), ("probe", True), ("suite", False)):
        code = (f"import runpy, sys; sys.argv = ['bench.gpu', {command!r}, '--help']\n"
                f"try: runpy.run_module('bench.gpu', run_name='__main__')\nexcept SystemExit as e: code = e.code\n"
                f"assert code == 0, code\nprint('torch' in sys.modules)")
        proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.splitlines()[-1] == str(needs_torch), command


def test_parallel_probes_run_together_and_keep_their_order(tmp_path):
    # Each of a and b waits for the other to have started: they pass only when they run at the same time.
    wait = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "t = time.monotonic() + 60\nwhile not (d / sys.argv[3]).exists():\n"
            "    assert time.monotonic() < t, 'ran alone'; time.sleep(0.05)\nprint('OK together')")
    steps = [Step("a", "x", [PY, "-c", wait, tmp_path, "a", "b"], 1, parallel=True),
             Step("b", "x", [PY, "-c", wait, tmp_path, "b", "a"], 1, parallel=True),
             Step("c", "x", [PY, "-c", "print('OK')"], 1, parallel=True, skip="fp16 needs a GPU")]
    report = run_checks(steps, tmp_path / "out", budget_s=300)
    assert [c["name"] for c in report["checks"]] == ["a", "b", "c"]
    assert [c["status"] for c in report["checks"]] == ["ok", "ok", "skipped"]
    assert report["checks"][2]["message"] == "fp16 needs a GPU"


# ---------------------------------------------------------------- wheels to the offline machine

def fake_wheel(folder, name, size):
    """A real, installable wheel of `size` bytes (incompressible padding), made without the network."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/__init__.py", f"NAME = {name!r}\n")
        z.writestr(f"{name}/pad.bin", random.randbytes(size))
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_split_into_capped_folders_and_reassemble_byte_for_byte(tmp_path):
    wheels = [fake_wheel(tmp_path, "alpha", 50_000), fake_wheel(tmp_path, "beta", 120_000)]
    out = tmp_path / "carried"
    folders = gpu_wheels.split(wheels, out, piece_bytes=40_000)
    assert [f.name for f in folders] == [f"dali-{k}" for k in range(1, len(folders) + 1)]
    assert all((f / "manifest.json").is_file() for f in folders)
    assert max(p.stat().st_size for f in folders for p in f.glob("piece-*")) == 40_000
    stage, dest = tmp_path / "stage", tmp_path / "dest"
    dest.mkdir()
    manifest = gpu_wheels.stash(out, stage)
    rebuilt = gpu_wheels.reassemble(manifest, stage, dest)
    assert [p.read_bytes() for p in rebuilt] == [w.read_bytes() for w in wheels]
    piece = stage / "piece-2.bin"
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(ValueError, match="piece-2.bin is damaged"):
        gpu_wheels.reassemble(manifest, stage, dest)


@pytest.mark.slow
def test_receive_waits_for_every_piece_then_installs_with_target(tmp_path):
    wheels = [fake_wheel(tmp_path, "fastpix_fake_dali", 90_000)]
    carried = tmp_path / "carried"
    (carried / "base").mkdir(parents=True)
    fake_wheel(carried / "base", "fastpix_fake_base", 10)
    gpu_wheels.split(wheels, carried, piece_bytes=40_000)
    everything = tmp_path / "everything"
    (carried).rename(everything)
    stage, target = tmp_path / "stage", tmp_path / "site"
    # Call 1 carries base and piece 1 only, call 2 piece 2, call 3 piece 3: one folder per call.
    for k in (1, 2, 3):
        call = tmp_path / f"call{k}"
        (call / f"dali-{k}").mkdir(parents=True)
        for f in (everything / f"dali-{k}").iterdir():
            (call / f"dali-{k}" / f.name).write_bytes(f.read_bytes())
        if k == 1:
            (call / "base").mkdir()
            for f in (everything / "base").iterdir():
                (call / "base" / f.name).write_bytes(f.read_bytes())
        said = gpu_wheels.receive(call, stage, target)
        if k < 3:
            assert f"DALI: {k}/3 pieces here" in said and f".gpuwheels/dali-{k + 1}" in said
            assert (target / "fastpix_fake_base" / "__init__.py").is_file()
    assert "DALI: reassembled, sha256 checked and installed" in said
    assert (target / "fastpix_fake_dali" / "pad.bin").stat().st_size == 90_000
    assert "installed" in gpu_wheels.receive(tmp_path / "call3", stage, target)


def test_a_library_that_fails_to_load_is_a_failure_not_a_skip(tmp_path, monkeypatch):
    from bench.gpu.probes import main
    (tmp_path / "half_installed.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AssertionError, match="half_installed is installed but does not load"):
        main(["import", "--module", "half_installed"])


def test_a_missing_subpackage_of_a_present_namespace_is_not_installed():
    from bench.gpu.probes import importable, not_installed
    err, _ = importable("json.no_such_submodule_xyz")  # as nvidia.dali under the nvidia-* namespace of torch
    assert not_installed(err, "json.no_such_submodule_xyz")
    assert not not_installed(ModuleNotFoundError("x", name="six"), "nvidia.dali")


def test_a_failed_torchrun_step_reports_the_childs_error_not_torchruns_banner(tmp_path):
    from bench.gpu.check import tail_line
    log = tmp_path / "nccl.log"
    log.write_text("Traceback (most recent call last):\nAssertionError: no process group with WORLD_SIZE=1\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                   "============================================================\nroot cause: ...\n====\n")
    assert tail_line(log, failed=True) == "AssertionError: no process group with WORLD_SIZE=1"
    log.write_text("OK nccl process group of 1\nUserWarning: noise\n{\"summary\": 1}\n")
    assert tail_line(log) == "OK nccl process group of 1"
