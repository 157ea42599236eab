"""Exercise every GPU path of fastpix on a machine with one NVIDIA GPU and no internet, and say plainly what
works: one JSON report (each check ok/failed/skipped + message + seconds) plus one log per check in OUTDIR.

GPU code cannot run in CI, so this is the one prepared thing to run when a GPU is lent. Every check runs in
its own process group with its own timeout, so a hang or a CUDA crash costs one check, never the report;
a check whose prerequisite failed is skipped with the reason. Standard library only: it runs before
anything is installed. Normally started by bench/gpu_check.sh, which picks the interpreter.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 330  # the whole run must fit in 6 minutes on one H200, set-up included; keep a margin
MIN_STEP_S = 5  # a step with less time than this left is skipped rather than started to be killed

# Python packages the GPU checks need, as (import name, wheel name); torch first because DALI/FFCV checks need it.
CORE_PACKAGES = [("torch", "torch"), ("torchvision", "torchvision"), ("nvidia.dali", "nvidia-dali-cuda130"),
                 ("webdataset", "webdataset"), ("numpy", "numpy"), ("sklearn", "scikit-learn"),
                 ("matplotlib", "matplotlib"), ("tqdm", "tqdm"), ("psutil", "psutil"), ("PIL", "pillow")]


@dataclass
class Step:
    name: str
    what: str  # one line for the report: which GPU path this proves
    argv: list
    timeout: int
    needs: tuple = ()  # names of steps that must be ok first
    env: dict = field(default_factory=dict)
    parallel: bool = False  # may run alongside its parallel neighbours (correctness probes, never timings)
    skip: str = ""  # a reason to report this step as skipped without running it


def tail_line(log_path):
    """The last non-empty line of a log: what a probe or a failing command said last."""
    try:
        lines = Path(log_path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:400] if lines else ""


def run_step(step, log_dir, deadline, base_env):
    """Run one step in its own process group; never raises. Returns the report entry."""
    entry = {"name": step.name, "what": step.what, "status": "skipped", "message": "", "seconds": 0.0,
             "log": None}
    left = deadline - time.monotonic()
    budget = min(step.timeout, left)
    if left < MIN_STEP_S:
        entry["message"] = "out of the time budget"
        return entry
    log_path = Path(log_dir) / f"{step.name}.log"
    entry["log"] = str(log_path.relative_to(Path(log_dir).parent))
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(map(str, step.argv)) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen([str(a) for a in step.argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env={**base_env, **step.env}, start_new_session=True)
        except OSError as err:
            entry.update(status="failed", message=f"could not start: {err}")
            return entry
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            # torchrun and DataLoader workers are grandchildren: end the whole group, not just the child.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    entry["seconds"] = round(time.monotonic() - start, 2)
    said = tail_line(log_path)
    if code is None:
        entry.update(status="failed", message=f"timed out after {budget:.0f} s; last output: {said}")
    elif code == 0:
        entry.update(status="ok", message=said)
    else:
        entry.update(status="failed", message=f"exit {code}: {said}")
    return entry


def run_checks(steps, out_dir, budget_s=BUDGET_S, mode="gpu", env=None):
    """Run every step in order, skipping those whose needs failed; rewrite the report after each step so
    that even a killed run leaves one. Returns the report dict."""
    out_dir = Path(out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start_wall, start = time.time(), time.monotonic()
    deadline = start + budget_s
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
    report = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start_wall)),
              "budget_s": budget_s, "checks": []}
    status = {}

    def one(step):
        unmet = [n for n in step.needs if status.get(n) != "ok"]
        if step.skip or unmet:
            return {"name": step.name, "what": step.what, "status": "skipped", "seconds": 0.0, "log": None,
                    "message": step.skip or "needs " + ", ".join(f"{n} ({status.get(n, 'not run')})" for n in unmet)}
        return run_step(step, log_dir, deadline, base_env)

    for batch in batches(steps):
        # Probes that only check correctness share the GPU and the cores: minutes saved, nothing distorted.
        with ThreadPoolExecutor(len(batch)) as pool:
            entries = list(pool.map(one, batch))
        for step, entry in zip(batch, entries):
            status[step.name] = entry["status"]
            report["checks"].append(entry)
            print(f"[{entry['status']:>7}] {step.name} ({entry['seconds']:.1f} s) {entry['message']}", flush=True)
        finish(report, out_dir, start)
    return report


def batches(steps):
    """Consecutive parallel steps form one batch; every other step is a batch of its own."""
    out = []
    for step in steps:
        if step.parallel and out and out[-1][-1].parallel:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def finish(report, out_dir, start):
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("ok", "failed", "skipped")}
    report.update(seconds=round(time.monotonic() - start, 1), summary=counts)
    path = Path(out_dir) / "report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def missing_modules(python, modules):
    """Which of `modules` the interpreter cannot find (find_spec only: nothing is imported)."""
    code = ("import importlib.util, sys\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n        ok = importlib.util.find_spec(m) is not None\n"
            "    except ModuleNotFoundError:\n        ok = False\n"
            "    ok or print(m)\n")
    out = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def install_step(name, what, python, wheels, packages, needs=()):
    """pip install only what is missing, from the carried wheel folder, never from the network."""
    missing = missing_modules(python, [m for m, _ in packages])
    wanted = [w for m, w in packages if m in missing]
    if not wanted:
        return Step(name, what, [python, "-c", "print('already installed')"], 30, needs)
    if not wheels or not Path(wheels).is_dir():
        msg = f"missing {' '.join(wanted)} and no wheel folder (--wheels DIR): see README, GPU machine"
        return Step(name, what, [python, "-c", f"raise SystemExit({msg!r})"], 30, needs)
    return Step(name, what, [python, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                             "--disable-pip-version-check", *wanted], 150, needs)


def probe(python, name, data, device, what, timeout, needs):
    return Step(name, what, [python, "-m", "bench.gpu_probes", name, "--data", data, "--device", device],
                timeout, needs, parallel=True)


def plan(args):
    """The ordered checks. In --cpu-dry-run every step runs with --device cpu: it proves the script's own
    plumbing (commands, flags, data, reports), never a GPU path, and the report says so in its mode."""
    py, out = args.python, Path(args.outdir).resolve()
    dev = "cpu" if args.cpu_dry_run else "cuda"
    data = str(Path(args.data).resolve()) if args.data else str(out / "data" / "ingested")
    runs = out / time.strftime("runs-%Y%m%d-%H%M%S")  # train.py never overwrites a run: fresh per invocation
    gpu = () if args.cpu_dry_run else ("gpu",)
    steps = []
    if not args.cpu_dry_run:
        steps.append(Step("gpu", "the driver sees an NVIDIA GPU",
                          ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          30))
    if not args.skip_setup:
        steps.append(install_step("install_core", "torch, DALI and friends importable (from --wheels if missing)",
                                  py, args.wheels, CORE_PACKAGES))
        steps.append(install_step("install_ffcv", "ffcv installed from --wheels if missing", py, args.wheels,
                                  [("ffcv", "ffcv")], needs=("install_core",)))
    setup = () if args.skip_setup else ("install_core",)
    steps.append(Step("torch_cuda", "torch sees the GPU and runs a CUDA kernel",
                      [py, "-m", "bench.gpu_probes", "torch_cuda", "--device", dev], 60, setup + gpu))
    ffcv_ok = "import ffcv.loader, ffcv.fields, importlib.metadata as m; print('OK ffcv', m.version('ffcv'))"
    steps.append(Step("ffcv_import", "FFCV's compiled part loads (needs system libturbojpeg and libopencv)",
                      [py, "-c", ffcv_ok], 60, () if args.skip_setup else ("install_ffcv",)))
    if not args.data:
        steps.append(Step("data", "generate a small demo dataset and ingest it",
                          [py, "-m", "bench.gpu_probes", "data", "--data", data], 120, setup))
    have_data = () if args.data else ("data",)
    need = ("torch_cuda",) + have_data
    steps += [
        probe(py, "dali_mixed", data, dev, "DALI mixed (nvJPEG) decode, GPU augmentation; agrees with CPU DALI",
              60, need),
        probe(py, "ffcv_gpu", data, dev, "FFCV ToDevice + GPU normalise; agrees with CPU FFCV", 90,
              need + ("ffcv_import",)),
        probe(py, "torch_gpu_decode", data, dev, "torchvision batched decode_jpeg on the GPU; agrees with CPU",
              60, need),
        probe(py, "channels_last", data, dev, "channels_last + autocast forward/backward matches fp32", 60,
              ("torch_cuda",)),
    ]
    train = [py, "train.py", "--data", data, "--device", dev, "--net", "flat", "--loader", "dali", "--epochs", "1",
             "--batch-size", "64", "--res", "128", "--runs-dir", str(runs)]
    steps += [
        Step("amp_bf16", "training step under bf16 autocast", train + ["--amp", "bf16", "--name", "amp-bf16"], 90,
             need, parallel=True),
        Step("amp_fp16", "training step under fp16 autocast with the gradient scaler",
             train + ["--amp", "fp16", "--name", "amp-fp16"], 90, need, parallel=True,
             skip="fp16 with a gradient scaler needs a GPU" if args.cpu_dry_run else ""),
        Step("compile", "torch.compile of the net (includes compile time)",
             train + ["--amp", "auto", "--compile", "--name", "compile"], 150, need, parallel=True),
        Step("torchrun_nccl", "1-GPU DDP through torchrun (NCCL backend on the GPU; gloo in a CPU dry run)",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] + train[1:]
             + ["--name", "ddp"], 120, need, parallel=True),
        # Timings run alone, after the probes, so nothing else competes for the GPU or the cores.
        Step("bench_loaders", "loader-only bench of every backend (train split, 1 timed epoch)",
             [py, "-m", "bench.loaders", "--quick", "--splits", "train", "--data", data, "--device", dev,
              "--out", str(out / "bench-loaders")], 120, need),
        Step("bench_e2e", "short end-to-end bench, every loader against the folder baseline",
             [py, "-m", "bench", "--quick", "--data", data, "--device", dev, "--out", str(out / "bench-e2e")], 180,
             need),
    ]
    if args.only:
        keep = set(args.only.split(","))
        steps = [s for s in steps if s.name in keep]
        for s in steps:  # a check picked alone runs even if its usual prerequisites were left out
            s.needs = tuple(n for n in s.needs if n in keep)
    return steps


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="folder for report.json and logs/ (created)")
    p.add_argument("--wheels", default=str(REPO / ".whl"),
                   help="folder of carried wheels to install missing packages from (default: .whl)")
    p.add_argument("--python", default=sys.executable, help="interpreter the checks run with")
    p.add_argument("--data", help="an already ingested dataset to use instead of generating one")
    p.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for the whole run (default %(default)s)")
    p.add_argument("--skip-setup", action="store_true", help="do not try to install anything")
    p.add_argument("--only", help="comma-separated check names to run (for rerunning what failed)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every step with --device cpu to test the script itself; proves no GPU path")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.budget < MIN_STEP_S:
        print(f"error: --budget {args.budget} is too short (>= {MIN_STEP_S} s)", file=sys.stderr)
        return 2
    if args.data and not (Path(args.data) / "manifest.json").is_file():
        print(f"error: --data {args.data} is not an ingested dataset (no manifest.json)", file=sys.stderr)
        return 2
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu-dry-run: every step ran with --device cpu; this proves no GPU path" if args.cpu_dry_run else "gpu"
    report = run_checks(plan(args), out, args.budget, mode)
    s = report["summary"]
    print(f"gpu_check: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped in {report['seconds']:.0f} s; "
          f"report: {out / 'report.json'}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
