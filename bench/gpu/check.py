"""Exercise every GPU path of fastpix on the lent GPU machine, inside its few minutes, and say plainly what
works: one JSON report (versions, results, each check ok/failed/skipped + message + seconds) and logs.

GPU code cannot run in CI, so this is the one prepared thing to run when a GPU is lent. The machine is known
(docs/gpu.md): its own `python3` holds a CUDA torch, and it has no DALI, FFCV, webdataset or network.
So the checks run with that interpreter as it is; what is missing arrives as carried wheels that
`bench.gpu wheels` installs with `pip install --target`, put on PYTHONPATH; each check is gated on what
it needs, and DALI/FFCV checks are SKIPPED with the reason when those do not import.

Steps run one after another, most valuable first: the GPU loaders table, then flat training at res 224 with
the best loader, then a short time-to-accuracy run (bench.tta), then the correctness probes (`bench.gpu
probe`). Each has an estimate of its seconds on the GPU machine; a step is skipped, not started, when less
of the budget is left than it needs, and report.json is rewritten after every step, so a run cut short
still reports what it did. Every step runs in its own process group with its own timeout: a hang or a CUDA
crash costs one check, never the report. Correctness probes that may share the GPU run side by side; timed
steps never overlap anything. Standard library only (cli.py, files.py and bench.gpu.wheels are too): it
starts before anything is installed.

Over 300 lines: `plan` is the one declarative list of every GPU check with its flags, estimate and gate
(~150 lines), and the runner around it is what makes a run on a borrowed machine always end in a report.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu import REPO, SKIP_EXIT
from bench.gpu.wheels import TARGET
from cli import Parser, UsageError
from files import atomic_path, write_json

BUDGET_S = 420  # 7 min: one 10-minute call with room to spare; with DALI brought, 15 min of device time
DRY_RUN_BUDGET_S = 1500  # the same steps on 2 shared CPU cores
TESTS_ESTIMATE_S = 150  # --tests on the GPU machine; it then runs for as long as the budget has left

# The GPU loaders table: each row with the module it needs. bench.loaders adds the rest itself: folder (the
# baseline), the decode-only rows (the fastest is the ceiling) and, with dali or ffcv, the library's own
# reference pipeline ("dali-reference", "ffcv-reference", issue 13).
LOADER_ROWS = {"torch": None, "resident": None, "dali": "nvidia.dali", "ffcv": "ffcv"}
OPTIONAL = {"nvidia.dali": "dali_import", "ffcv": "ffcv_import"}  # module -> the step that finds out


@dataclass
class Step:
    name: str
    what: str  # one line for the report: which GPU path this proves
    argv: object  # a list, or a function of the run so far (statuses, results) returning one
    estimate: float  # seconds it needs on the GPU machine; it is not started with less budget left
    needs: tuple = ()  # names of steps that must be ok first
    parallel: bool = False  # may run beside its parallel neighbours (correctness probes, never timings)
    skip: str = ""  # a reason to report this step as skipped without running it
    result: Path | None = None  # a JSON file the step writes; the report takes it in under results[name]
    env: dict = field(default_factory=dict)
    timeout_s: float = 0  # 0: from the estimate, with room for a slow start; a hang still ends

    @property
    def timeout(self):
        return self.timeout_s or max(30.0, 2.5 * self.estimate)


# What a step said, in order of preference: a probe's verdict, an error line; torchrun ends its output with a
# banner and its own ChildFailedError, which say nothing the child's error line does not.
SAID = re.compile(r"^(OK |SKIPPED |error: |[\w.]*(Error|Exception): )")


def tail_line(log_path, failed=False):
    """What the step said last: the last verdict (or, when it failed, error) line, else the last line."""
    try:
        lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    said = [line for line in lines if SAID.match(line) and "ChildFailedError" not in line
            and (failed or line.startswith(("OK ", "SKIPPED ")))]
    return (said or lines or [""])[-1][:400]


def run_step(step, argv, log_dir, deadline, base_env, scale=1.0):
    """Run one step in its own process group; never raises. Returns the report entry."""
    entry = {"name": step.name, "what": step.what, "status": "skipped", "message": "", "seconds": 0.0,
             "estimate_s": step.estimate * scale, "log": None}
    left = deadline - time.monotonic()
    if left < step.estimate * scale:
        entry["message"] = f"out of the time budget ({left:.0f} s left, needs ~{step.estimate * scale:.0f} s)"
        return entry
    budget = min(step.timeout * scale, left)
    log_path = Path(log_dir) / f"{step.name}.log"
    entry["log"] = str(log_path.relative_to(Path(log_dir).parent))
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(map(str, argv)) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen([str(a) for a in argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
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
    said = tail_line(log_path, failed=code not in (0, SKIP_EXIT))
    if code is None:
        entry.update(status="failed", message=f"timed out after {budget:.0f} s; last output: {said}")
    elif code == 0:
        entry.update(status="ok", message=said)
    elif code == SKIP_EXIT:
        entry.update(status="skipped", message=said)
    else:
        entry.update(status="failed", message=f"exit {code}: {said}")
    return entry


class State:
    """What later steps may depend on: each step's status and message, and the results taken in."""

    def __init__(self):
        self.status, self.message, self.results = {}, {}, {}


def run_checks(steps, out_dir, budget_s=BUDGET_S, mode="gpu", env=None, scale=1.0, header=None, bundle=None,
               max_parallel=16):
    """Run every step in order, skipping those whose needs are not ok; rewrite the report after each step so
    that even a killed run leaves one. `scale` multiplies every estimate (a CPU dry run is slower); at most
    `max_parallel` probes run at once. Returns the report dict."""
    out_dir = Path(out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + budget_s
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    report = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget_s,
              **(header or {}), "versions": {}, "results": {}, "checks": []}
    state = State()

    def one(step):
        unmet = [n for n in step.needs if state.status.get(n) != "ok"]
        if step.skip or unmet:
            reasons = [f"{n} ({state.status.get(n, 'not run')}: {state.message.get(n, '')[:150]})".replace(": )", ")")
                       for n in unmet]
            return {"name": step.name, "what": step.what, "status": "skipped", "seconds": 0.0, "log": None,
                    "estimate_s": step.estimate * scale, "message": step.skip or "needs " + "; ".join(reasons)}
        argv = step.argv(state) if callable(step.argv) else step.argv
        if isinstance(argv, str):  # decided now, from what ran before: nothing to run, and why
            return {"name": step.name, "what": step.what, "status": "skipped", "seconds": 0.0, "log": None,
                    "estimate_s": step.estimate * scale, "message": argv}
        return run_step(step, argv, log_dir, deadline, base_env, scale)

    for batch in batches(steps):
        with ThreadPoolExecutor(min(len(batch), max_parallel)) as pool:
            entries = list(pool.map(one, batch))
        for step, entry in zip(batch, entries):
            state.status[step.name], state.message[step.name] = entry["status"], entry["message"]
            if step.result and Path(step.result).is_file():
                try:
                    state.results[step.name] = json.loads(Path(step.result).read_text())
                except ValueError:
                    pass
            report["checks"].append(entry)
            print(f"[{entry['status']:>7}] {step.name} ({entry['seconds']:.1f} s) {entry['message']}", flush=True)
        report["results"] = {k: brief(k, v) for k, v in state.results.items() if k != "env"}
        report["versions"] = state.results.get("env", {})
        finish(report, out_dir, start, bundle)
    return report


def brief(name, result):
    """A result as the report keeps it: a bench.loaders results.json shrinks to its table's figures."""
    if isinstance(result, dict) and "summary" in result:  # bench.tta: its table's lines, not every curve
        return {"targets": result["targets"], "summary": result["summary"]}
    if isinstance(result, dict) and "rows" in result:
        keys = ("backend", "split", "augment", "images_per_sec", "vs_folder", "vs_ceiling", "build_s", "warmup_s",
                "error")
        return {"title": result.get("title"), "rows": [{k: r.get(k) for k in keys if k in r} for r in result["rows"]]}
    return result


def batches(steps):
    """Consecutive parallel steps form one batch; every other step is a batch of its own."""
    out = []
    for step in steps:
        if step.parallel and out and out[-1][-1].parallel:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def finish(report, out_dir, start, bundle=None):
    """Write report.json (atomically); with `bundle`, also copy it there with a tar.gz of logs and tables
    (the device tool brings back 8 files at most, so the logs travel as one)."""
    counts = {s: sum(c["status"] == s for c in report["checks"]) for s in ("ok", "failed", "skipped")}
    report.update(seconds=round(time.monotonic() - start, 1), summary=counts)
    write_json(Path(out_dir) / "report.json", report)
    if bundle:
        write_json(Path(bundle) / "report.json", report)
        with atomic_path(Path(bundle) / "gpu_check.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
            for part in ("logs", "bench-loaders", "results"):
                if (Path(out_dir) / part).exists():
                    tar.add(Path(out_dir) / part, arcname=part)


def pick_python(explicit, want_cuda):
    """The interpreter the checks run with, and why: --python, else the first of the machine's `python3` and
    the repository's .venv whose torch imports (and sees a GPU, unless a CPU dry run)."""
    if explicit:
        return explicit, "--python"
    test = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" if want_cuda else "import torch"
    candidates = [c for c in (shutil.which("python3"), str(REPO / ".venv" / "bin" / "python")) if c and
                  Path(c).exists()]
    for candidate in candidates:
        try:
            if subprocess.run([candidate, "-c", test], capture_output=True, timeout=180).returncode == 0:
                return candidate, "its torch imports" + (" and sees a GPU" if want_cuda else "")
        except subprocess.TimeoutExpired:
            continue
    return (candidates or [sys.executable])[0], "no interpreter's torch " + ("sees a GPU" if want_cuda else
                                                                               "imports") + ": checks will say why"


def plan(args):
    """The ordered checks. In --cpu-dry-run every step runs with --device cpu on a small dataset: it proves
    the script's own plumbing (commands, flags, data, gates, reports), never a GPU path; the report says so."""
    py, out = args.python, Path(args.outdir).resolve()
    dry = args.cpu_dry_run
    dev = "cpu" if dry else "cuda"
    data = str(Path(args.data).resolve()) if args.data else str(out / "data" / "ingested")
    runs = out / time.strftime("runs-%Y%m%d-%H%M%S")  # train.py never overwrites a run: fresh per invocation
    tta_out = out / time.strftime("tta-%Y%m%d-%H%M%S")
    results = out / "results"
    probe = [py, "-m", "bench.gpu", "probe"]
    gpu = () if dry else ("gpu",)
    have_data = () if args.data else ("data",)
    need = ("torch_cuda",) + have_data

    def p(name, what, estimate, needs, *extra, parallel=True, **kw):
        return Step(name, what, probe + [kw.pop("probe", name), "--data", data, "--device", dev,
                                         "--result", results / f"{name}.json", *extra],
                    estimate, needs, parallel=parallel, result=results / f"{name}.json", **kw)

    def train_step(name, loader):
        step = p(name, f"flat training at res 224 with {loader}", 45, need, "--loader", loader, *train_probe,
                 parallel=False, probe="train")
        argv = step.argv
        step.argv = lambda state: (f"train_best already trained with {loader}" if
                                   state.results.get("train_best", {}).get("loader") == loader else argv)
        return step

    steps = []
    if not dry:
        steps.append(Step("gpu", "the driver sees an NVIDIA GPU",
                          ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 5))
    if not args.skip_setup:
        steps.append(Step("wheels", "carried wheels installed with pip --target (bench.gpu wheels receive)",
                          [py, "-m", "bench.gpu", "wheels", "receive", "--folder", args.wheels, "--target", args.site],
                          60))
    steps += [
        Step("env", "the versions this run used (report: versions)",
             probe + ["env", "--result", results / "env.json"], 15, result=results / "env.json"),
        Step("torch_cuda", "torch sees the GPU and runs a CUDA kernel",
             probe + ["torch_cuda", "--device", dev], 15, gpu),
        Step("dali_import", "DALI imports (carried: bench.gpu wheels)",
             probe + ["import", "--module", "nvidia.dali"], 20, parallel=True),
        Step("ffcv_import", "FFCV's compiled part loads (needs system libturbojpeg and libopencv)",
             probe + ["import", "--module", "ffcv"], 20, parallel=True),
    ]
    if args.tests:  # the suite instead of the checks; the steps above say what it will find (GPU, DALI, FFCV)
        steps.append(Step("tests", "the suite's GPU-relevant tests (bench.gpu suite), DALI/FFCV ones skipped "
                                   "where those are missing", [py, "-m", "bench.gpu", "suite", "--result",
                                                               results / "tests.json"] + (["--quick"] if dry else []),
                          TESTS_ESTIMATE_S, result=results / "tests.json", timeout_s=DRY_RUN_BUDGET_S))
        return only(steps, args.only)
    if not args.data:
        steps.append(Step("data", "generate the demo photos and ingest them (webdataset shards; .beton if FFCV)",
                          probe + ["data", "--data", data, "--per-class", 12 if dry else 100,
                                   "--result", results / "data.json"], 40, result=results / "data.json"))
    rows = [b for b, module in LOADER_ROWS.items()]
    bench_out = out / "bench-loaders"

    def loaders_argv(state):  # rows whose library did not import are left out, and say so in the report
        usable = [b for b in rows if not LOADER_ROWS[b] or state.status.get(OPTIONAL[LOADER_ROWS[b]]) == "ok"]
        return [py, "-m", "bench.loaders", "--splits", "train", "--data", data, "--device", dev, "--res", 224,
                "--batch-size", 256, "--epochs", 1 if dry else 2, "--backends", ",".join(usable), "--out", bench_out]

    # The plumbing checks train one epoch at res 128; a CPU dry run only 2 steps of 8 at res 64 (bf16 is
    # emulated on most CPUs: a step of 64 images took minutes on 2 cores).
    train = [py, "train.py", "--data", data, "--device", dev, "--net", "flat", "--epochs", "1", "--runs-dir", runs,
             "--bootstrap", "100"] + (["--batch-size", 8, "--res", 64, "--max-steps", 2] if dry else
                                      ["--batch-size", 64, "--res", 128])
    train_probe = ["--res", 224, "--epochs", 1 if dry else 3, "--batch-size", 256, "--runs-dir", runs]
    steps += [
        # 1. The GPU loaders table (timed: alone).
        Step("bench_loaders", "GPU loaders table: loader-only img/s of every usable backend, train split, res 224",
             loaders_argv, 20 + 15 * (len(rows) + 2), need, result=bench_out / "results.json"),
        # 2. Flat training with the best loader of that table (timed: alone).
        p("train_best", "flat training at res 224 with the best loader: img/s and data stall", 45, need,
          "--loader", "best", "--loaders-results", bench_out / "results.json", *train_probe, parallel=False,
          probe="train"),
        # 3. Time to accuracy, short: bench.tta's study vs fast recipe on one seed, without the ablation (timed).
        Step("tta", "time to accuracy, short: --recipe study vs fast (bench.tta, resident, seed 0, no ablation)",
             [py, "-m", "bench.tta", "--data", data, "--device", dev, "--seeds", "0", "--ablation-seeds", "",
              "--out", tta_out] + (["--epochs", 1, "--res", 64, "--batch-size", 8] if dry else ["--epochs", 3]),
             60, need, result=tta_out / "results.json"),
        # 4. Correctness probes, side by side where they only check correctness.
        p("stream_race", "nvJPEG stream race (issue 13.5): GPU decode_jpeg of many batches vs the CPU decode",
          30, need, *(["--batches", 3, "--busy", 1, "--busy-side", 256] if dry else ["--batches", 200])),
        p("torch_gpu_decode", "torch backend: batched nvJPEG decode_jpeg on the GPU; agrees with CPU", 25, need),
        p("resident_gpu", "resident: the split decoded into GPU memory, cropped there; agrees with CPU", 25, need),
        p("dali_mixed", "DALI mixed (nvJPEG) decode, GPU augmentation; agrees with CPU DALI", 30,
          need + ("dali_import",)),
        p("ffcv_gpu", "FFCV ToDevice + GPU normalise; agrees with CPU FFCV", 40, need + ("ffcv_import",)),
        Step("channels_last", "channels_last + autocast forward/backward matches fp32",
             probe + ["channels_last", "--device", dev], 15, ("torch_cuda",), parallel=True),
        Step("nccl", "a real NCCL process group: 1-process torchrun, training.device.start_distributed, all_reduce",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "bench.gpu", "probe",
              "nccl", "--device", dev], 25, ("torch_cuda",), parallel=True),
        Step("amp_bf16", "training under bf16 autocast (resident)",
             train + ["--loader", "resident", "--amp", "bf16", "--name", "amp-bf16"], 40, need, parallel=True),
        Step("amp_fp16", "training under fp16 autocast with the gradient scaler (resident)",
             train + ["--loader", "resident", "--amp", "fp16", "--name", "amp-fp16"], 40, need, parallel=True,
             skip="fp16 with the gradient scaler needs a GPU (train.py refuses it on the CPU)" if dry else ""),
        Step("compile", "torch.compile of the net (compile time included; resident)",
             train + ["--loader", "resident", "--amp", "auto", "--compile", "--name", "compile"], 90, need,
             parallel=True),
        Step("torchrun_train", "1-GPU DDP training through torchrun (resident)",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] + train[1:]
             + ["--loader", "resident", "--name", "ddp"], 50, need, parallel=True),
        # Training at the study's resolution with both torch-only loaders, unless train_best already did.
        train_step("train_resident", "resident"),
        train_step("train_torch", "torch"),
    ]
    return only(steps, args.only)


def only(steps, names):
    """The steps named in `names` (comma-separated; all when empty)."""
    if not names:
        return steps
    keep = set(names.split(","))
    steps = [s for s in steps if s.name in keep]
    for s in steps:  # a check picked alone runs even if its usual prerequisites were left out
        s.needs = tuple(n for n in s.needs if n in keep)
    return steps


def parse_args(argv):
    p = Parser(prog="python3 -m bench.gpu check", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="folder for report.json and logs/ (created)")
    p.add_argument("--python", help="interpreter the checks run with (default: the machine's python3 when its "
                                    "torch sees the GPU, else the repository's .venv)")
    p.add_argument("--wheels", default=str(REPO / ".gpuwheels"),
                   help="carried wheel folders, from `bench.gpu wheels prepare` (default .gpuwheels)")
    p.add_argument("--site", default=str(TARGET), help="pip --target of the carried wheels (default %(default)s)")
    p.add_argument("--data", help="an already ingested dataset to use instead of generating one")
    p.add_argument("--budget", type=int, help=f"seconds for the whole run (default {BUDGET_S}; "
                                              f"{DRY_RUN_BUDGET_S} with --cpu-dry-run)")
    p.add_argument("--bundle", help="also copy report.json and gpu_check.tar.gz (logs, tables) here after each "
                                    "step: give the device tool's $OUT")
    p.add_argument("--skip-setup", action="store_true", help="do not install carried wheels")
    p.add_argument("--only", help="comma-separated check names to run (for rerunning what failed)")
    p.add_argument("--tests", action="store_true",
                   help="run the suite's GPU-relevant tests (bench.gpu suite) instead of the checks")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every step with --device cpu to test the script itself; proves no GPU path")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dry = args.cpu_dry_run
    budget = args.budget or (DRY_RUN_BUDGET_S if dry else BUDGET_S)
    if budget < 10:
        raise UsageError(f"--budget {budget} is too short (>= 10 s)")
    if args.data and not (Path(args.data) / "manifest.json").is_file():
        raise UsageError(f"--data {args.data} is not an ingested dataset (no manifest.json)")
    args.python, why = pick_python(args.python, want_cuda=not dry)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu-dry-run: every step ran with --device cpu; this proves no GPU path" if dry else "gpu"
    site = [args.site] if not args.skip_setup else []
    env = {"PYTHONPATH": os.pathsep.join(site + [str(REPO)] + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    header = {"python": args.python, "python_chosen_because": why}
    print(f"bench.gpu check: checks run with {args.python} ({why}); budget {budget} s", flush=True)
    # On 2 shared CPU cores the same steps take several times their GPU-machine estimates.
    report = run_checks(plan(args), out, budget, mode, env=env, scale=4.0 if dry else 1.0, header=header,
                        bundle=args.bundle, max_parallel=3 if dry else 16)
    s = report["summary"]
    print(f"bench.gpu check: {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped in {report['seconds']:.0f} s; "
          f"report: {out / 'report.json'}")
    return 1 if s["failed"] else 0

