"""The GPU script on the CPU: its report writer, and that every failure is reported, never fatal."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import Step, parse_args, plan, run_checks

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def test_report_records_ok_failure_timeout_and_skips_dependents(tmp_path):
    steps = [
        Step("fine", "a step that works", [PY, "-c", "print('noise'); print('OK all good')"], 30),
        Step("broken", "a step that fails", [PY, "-c", "raise SystemExit('error: no CUDA GPU here')"], 30),
        Step("hangs", "a step that hangs", [PY, "-c", "import time; print('started'); time.sleep(60)"], 1),
        Step("after_broken", "needs the failed one", [PY, "-c", "print('never')"], 30, needs=("broken",)),
        Step("after_fine", "runs after failures", [PY, "-c", "print('OK still running')"], 30, needs=("fine",)),
    ]
    report = run_checks(steps, tmp_path, budget_s=60)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [s.name for s in steps]
    assert checks["fine"]["status"] == "ok" and checks["fine"]["message"] == "OK all good"
    assert checks["broken"]["status"] == "failed" and "no CUDA GPU here" in checks["broken"]["message"]
    assert checks["hangs"]["status"] == "failed" and "timed out" in checks["hangs"]["message"]
    assert checks["hangs"]["seconds"] < 10
    assert checks["after_broken"]["status"] == "skipped" and "broken (failed)" in checks["after_broken"]["message"]
    assert checks["after_fine"]["status"] == "ok"
    assert report["summary"] == {"ok": 2, "failed": 2, "skipped": 1}
    for c in report["checks"]:
        assert set(c) >= {"name", "what", "status", "message", "seconds"}
    assert "raise SystemExit" in (tmp_path / checks["broken"]["log"]).read_text()


def test_out_of_budget_steps_are_skipped_not_started(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.gpu_check.MIN_STEP_S", 1)
    steps = [Step("slow", "uses the budget", [PY, "-c", "import time; time.sleep(30)"], 30),
             Step("late", "no time left", [PY, "-c", "print('OK')"], 30)]
    report = run_checks(steps, tmp_path, budget_s=2)
    slow, late = report["checks"]
    assert slow["status"] == "failed" and "timed out" in slow["message"]
    assert late["status"] == "skipped" and late["message"] == "out of the time budget"


def test_plan_covers_every_gpu_path(tmp_path):
    names = [s.name for s in plan(parse_args([str(tmp_path), "--skip-setup"]))]
    for path in ("gpu", "torch_cuda", "dali_mixed", "ffcv_gpu", "torch_gpu_decode", "amp_bf16", "amp_fp16",
                 "channels_last", "compile", "torchrun_nccl", "bench_loaders", "bench_e2e"):
        assert path in names
    for step in plan(parse_args([str(tmp_path), "--skip-setup"])):
        if step.name not in ("gpu", "ffcv_import", "data"):
            assert "cuda" in step.argv, step.name  # never silently falls back to the CPU


def test_missing_wheels_is_a_reported_failure(tmp_path):
    # A package name that cannot exist stands in for DALI on an offline machine without a wheel folder.
    from bench.gpu_check import install_step, run_checks
    step = install_step("install_core", "x", PY, str(tmp_path / "nowhere"), [("no_such_module_xyz", "no-such")])
    report = run_checks([step], tmp_path, budget_s=30)
    assert report["checks"][0]["status"] == "failed"
    assert "missing no-such and no wheel folder" in report["checks"][0]["message"]


def test_without_a_gpu_the_gpu_checks_fail_with_the_reason(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test is about the report on a machine without one")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--skip-setup",
                           "--only", "torch_cuda", "--budget", "60"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    checks = {c["name"]: c for c in json.loads((out / "report.json").read_text())["checks"]}
    assert checks["torch_cuda"]["status"] == "failed" and "GPU" in checks["torch_cuda"]["message"]


def test_script_usage_error_is_one_line():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")


def test_parallel_probes_run_together_and_keep_their_order(tmp_path):
    sleep = [PY, "-c", "import time; time.sleep(1.5); print('OK slept')"]
    steps = [Step("a", "x", sleep, 30, parallel=True), Step("b", "x", sleep, 30, parallel=True),
             Step("c", "x", sleep, 30, parallel=True, skip="fp16 needs a GPU")]
    report = run_checks(steps, tmp_path, budget_s=30)
    assert [c["name"] for c in report["checks"]] == ["a", "b", "c"]
    assert [c["status"] for c in report["checks"]] == ["ok", "ok", "skipped"]
    assert report["checks"][2]["message"] == "fp16 needs a GPU"
    assert report["seconds"] < 2.9  # together, not one after the other
