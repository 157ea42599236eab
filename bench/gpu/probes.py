"""The individual checks `bench.gpu check` runs, one per process: `python3 -m bench.gpu probe NAME ...`.

Each probe asserts what its GPU path must deliver (batches on the GPU, agreeing with the CPU path within a
stated bound) and ends with one `OK ...` line that the report keeps; any failure exits non-zero with the
reason as the last line. A probe whose library is not installed exits SKIP_EXIT with `SKIPPED <why>`.
With `--result FILE` a probe also writes its figures there as JSON, which the report takes in.

Over 300 lines: a dozen independent probes, each one short `p_<name>` function found by name (PROBES) and run
in its own process; nothing is shared between them but the command line, so one file is the shortest read.
"""
import importlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from bench.gpu import SKIP_EXIT
from cli import Parser, UsageError
from files import write_json
from loaders import make_loader
from loaders.common import resolve_device

# Bounds for GPU-vs-CPU agreement, in normalised units (1 unit ~ 58 grey levels). nvJPEG and libjpeg-turbo
# differ by an IDCT rounding (~1 grey level) and GPU resize filters sample slightly differently from CPU
# ones, so pixels agree on average to well under 0.05 unit; 0.1 catches swapped channels, wrong
# normalisation or misaligned crops, which move the mean by several tenths.
MEAN_ABS_BOUND = 0.1
DECODE_GREY_BOUND = 3.0  # raw decode, 0-255 scale: nvJPEG vs libjpeg-turbo


class Skip(Exception):
    """The probe cannot run on this machine (a library is not installed): reported as SKIPPED."""


def first_batch(name, data, device, split="test", batch_size=32, res=128):
    loader = make_loader(name, data, split, batch_size=batch_size, res=res, device=str(device), workers=2)
    loader.set_epoch(0)
    start = time.perf_counter()
    images, labels = next(iter(loader))
    return images, labels, time.perf_counter() - start


def agree_with_cpu(name, data, device):
    """The backend on `device` yields the same labels and nearly the same pixels as on the CPU."""
    images, labels, seconds = first_batch(name, data, device)
    if device.type == "cuda":
        assert images.is_cuda and labels.is_cuda, f"{name} batches are not on the GPU"
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 128, 128), (images.dtype, images.shape)
    ref_images, ref_labels, _ = first_batch(name, data, torch.device("cpu"))
    assert torch.equal(labels.cpu(), ref_labels), f"{name}: labels differ between {device} and cpu"
    diff = (images.float().cpu() - ref_images.float()).abs().mean().item()
    assert diff < MEAN_ABS_BOUND, f"{name}: mean |{device} - cpu| = {diff:.3f} > {MEAN_ABS_BOUND}"
    # One train batch too: the random-crop decode path is a different kernel from the test path.
    train_images, _, _ = first_batch(name, data, device, split="train")
    assert torch.isfinite(train_images).all(), f"{name}: non-finite train pixels"
    return f"first batch {seconds:.2f} s, mean |{device.type} - cpu| = {diff:.4f} (bound {MEAN_ABS_BOUND})"


def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def importable(module):
    """(None, "") when `module` imports here, else (the exception, one line saying what it said)."""
    try:
        importlib.import_module(module)
        return None, ""
    except Exception as err:  # an installed library failing to load says why in its message
        return err, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def not_installed(err, module):
    """True when `err` says `module` (or a package above it) is absent, not that it failed to load."""
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    return bool(missing) and (module == missing or module.startswith(missing + "."))


def p_env(args):
    """The versions this run used, recorded in the report; never fails."""
    cuda = torch.cuda.is_available()
    libraries = {}
    for module, dist in (("nvidia.dali", "nvidia-dali-cuda130"), ("ffcv", "ffcv"), ("webdataset", "webdataset")):
        err, why = importable(module)
        libraries[dist] = f"not importable ({why})" if err else version(dist)
    env = {"python": platform.python_version(), "executable": sys.executable,
           "pythonpath": os.environ.get("PYTHONPATH", ""), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
           "nccl": nccl_version() if cuda else None,
           **{dist: version(dist) for dist in ("torchvision", "numpy", "pillow", "scikit-learn", "psutil")},
           **libraries, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
           "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
           "cpus": os.cpu_count(), "platform": platform.platform()}
    save(args, env)
    return (f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), torchvision "
            f"{env['torchvision']}, GPU {env['gpu']}; DALI {libraries['nvidia-dali-cuda130']}, "
            f"FFCV {libraries['ffcv']}")


def nccl_version():
    found = torch.cuda.nccl.version()
    return ".".join(map(str, found)) if isinstance(found, tuple) else str(found)


def p_import(args):
    """The library imports, or SKIPPED when it is not installed (an installed one that fails is a failure)."""
    err, why = importable(args.module)
    if not_installed(err, args.module):
        raise Skip(f"{args.module} is not installed ({why}); see docs/gpu.md")
    assert err is None, f"{args.module} is installed but does not load: {why}"
    return f"{args.module} imports"


def p_torch_cuda(args):
    device = resolve_device(args.device)
    x = torch.randn(1024, 1024, device=device)
    checksum = (x @ x).float().sum().item()  # forces the kernel to run and come back
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    assert checksum == checksum, "matmul gave NaN"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}"


def p_dali_mixed(args):
    device = resolve_device(args.device)
    direct = dali_direct_mixed(args.data, device)
    return f"{direct}; loader: {agree_with_cpu('dali', args.data, device)}"


def dali_direct_mixed(data, device):
    """A bare DALI pipeline with the mixed decoder, independent of loaders/dali.py: proves nvJPEG works here."""
    from nvidia.dali import fn, pipeline_def, types

    from ingest.layout import shard_paths
    tars, idxs = shard_paths(data, "test")
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=16, num_threads=2, device_id=0 if gpu else None)
    def pipe():
        jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs],
                                              ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64])
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return fn.resize(images, resize_shorter=64), labels

    p = pipe()
    p.build()
    images, _ = p.run()
    on = "GPU" if type(images).__name__ == "TensorListGPU" else "CPU"
    assert on == ("GPU" if gpu else "CPU"), f"decoded images landed on the {on}"
    return f"DALI {'mixed' if gpu else 'cpu'} decode -> {on} batch of {len(images)}"


def p_ffcv_gpu(args):
    return f"loader: {agree_with_cpu('ffcv', args.data, resolve_device(args.device))}"


def p_resident_gpu(args):
    """resident decodes the split into device memory once, then crops there: agrees with its CPU path."""
    return f"loader: {agree_with_cpu('resident', args.data, resolve_device(args.device))}"


def test_jpegs(data, limit=None):
    """The stored JPEG bytes of the test split, as uint8 tensors (what the torch backend hands nvJPEG)."""
    from ingest.shards import ShardIndex
    samples = ShardIndex(data, "test")
    count = min(len(samples), limit or len(samples))
    return [torch.frombuffer(samples.read(i), dtype=torch.uint8) for i in range(count)]


def p_torch_gpu_decode(args):
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    device = resolve_device(args.device)
    data = test_jpegs(args.data, 16)
    on_device = decode_jpeg(data, mode=ImageReadMode.RGB, device=device.type)
    on_cpu = decode_jpeg(data, mode=ImageReadMode.RGB)
    worst = max((a.float().cpu() - b.float()).abs().mean().item() for a, b in zip(on_device, on_cpu))
    assert all(t.device.type == device.type for t in on_device)
    assert worst < DECODE_GREY_BOUND, f"decode_jpeg {device} vs cpu differ by {worst:.2f} grey levels"
    return (f"torchvision {torchvision.__version__} decode_jpeg x{len(data)} on {device.type}, worst mean diff "
            f"{worst:.2f} grey levels; loader: {agree_with_cpu('torch', args.data, device)}")


def p_stream_race(args):
    """Issue 13 item 5 (pytorch/vision#9606): on Hopper, nvJPEG's hardware decoder writes its outputs before
    the work already queued on the caller's stream has run, so it can overwrite memory that queued kernels
    still read. Reproduce a training loop's pattern `--batches` times: queue heavy work, queue a checksum of
    tensors, free them, decode. Then compare every checksum, and every decoded image with the CPU decode.

    Two passes: raw torchvision decode_jpeg (does this GPU have the hazard?) and fastpix's guarded decode,
    loaders.torch_loader.decode_jpegs_on_gpu (is fastpix protected?). Only corruption in fastpix's pass fails."""
    from torchvision.io import ImageReadMode, decode_jpeg
    device = resolve_device(args.device)
    jpegs = test_jpegs(args.data, args.batch_size)
    reference = [image.to(device) for image in decode_jpeg(jpegs, mode=ImageReadMode.RGB)]
    busy = [torch.randn(args.busy_side, args.busy_side, device=device) / args.busy_side ** 0.5]

    def one_pass(decode):
        """(corrupted checksums of freed tensors, images off the CPU decode by more than the bound)."""
        bad_freed, bad_images = [], []
        for _ in range(args.batches):
            victims = [torch.full_like(image, 7) for image in reference]  # same sizes: blocks the decoder gets
            for _ in range(args.busy):
                busy[0] = torch.tanh(busy[0] @ busy[0])
            sums = torch.stack([v.sum(dtype=torch.int64) for v in victims])  # queued behind the busy work
            expected = [7 * v.numel() for v in victims]
            del victims  # freed while the checksums are still queued, as a training step frees its batch
            decoded = decode(jpegs)
            diffs = torch.stack([(d.float() - r.float()).abs().mean() for d, r in zip(decoded, reference)])
            bad_freed.append((sums.cpu() != torch.tensor(expected)).sum().item())
            bad_images.append((diffs.cpu() > DECODE_GREY_BOUND).sum().item())
        return sum(bad_freed), sum(bad_images)

    def raw(data):
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    raw_freed, raw_images = one_pass(raw)
    total = args.batches * len(jpegs)
    line = f"{args.batches} batches x {len(jpegs)} on {device.type}: raw decode_jpeg corrupted {raw_freed} " \
           f"freed-tensor checksums and {raw_images}/{total} images"
    result = {"batches": args.batches, "batch_size": len(jpegs), "device": device.type,
              "raw_corrupted_checksums": raw_freed, "raw_corrupted_images": raw_images}
    if device.type != "cuda":
        save(args, result)
        return line + " (the hazard and fastpix's guard need a GPU: plumbing only)"
    from loaders.torch_loader import decode_jpegs_on_gpu  # what the torch and resident backends decode with
    ours_freed, ours_images = one_pass(lambda data: decode_jpegs_on_gpu(data, device))
    save(args, {**result, "fastpix_corrupted_checksums": ours_freed, "fastpix_corrupted_images": ours_images})
    line += f"; fastpix decode_jpegs_on_gpu corrupted {ours_freed} checksums and {ours_images}/{total} images"
    assert ours_freed == 0 and ours_images == 0, line
    return line + ("" if raw_freed or raw_images else " (hazard not reproduced here: the fastpix pass proves little)")


def p_channels_last(args):
    import nets
    device = resolve_device(args.device)
    torch.manual_seed(0)
    net = nets.build("flat", 28).to(device)
    x = torch.randn(8, 3, 128, 128, device=device)
    ref = net(x).float()
    net = net.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        out = net(x.contiguous(memory_format=torch.channels_last))
    out.float().sum().backward()
    err = (out.float() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6)
    assert err < 0.05, f"channels_last + {dtype} output differs from fp32 by {err:.3f} (relative)"
    return f"channels_last + {dtype} forward/backward, relative error {err:.4f}"


def p_nccl(args):
    """Under torchrun: training.device.start_distributed really makes a process group (NCCL on a GPU), and an
    all_reduce goes through it. A 1-process group must exist too, or the DDP check proves nothing."""
    import torch.distributed as dist

    from training.device import start_distributed
    if "RANK" not in os.environ:
        raise UsageError("probe nccl runs under torchrun (python -m torch.distributed.run ...)")
    rank, world, device = start_distributed(args.device)
    assert dist.is_initialized(), f"start_distributed left no process group with WORLD_SIZE={world}"
    backend = dist.get_backend()
    want = "nccl" if device.type == "cuda" else "gloo"
    assert backend == want, f"process group backend {backend}, expected {want}"
    x = torch.full((4,), rank + 1.0, device=device)
    dist.all_reduce(x)
    assert x.tolist() == [world * (world + 1) / 2] * 4, f"all_reduce gave {x.tolist()}"
    dist.destroy_process_group()
    return f"{backend} process group of {world} on {device}, all_reduce ok"


def p_train(args):
    """train.py for `--epochs` epochs; its images/s (median of epochs 2+) and data-stall fraction are the
    report's training figures. `--loader best` takes the fastest train row of a bench.loaders results.json."""
    import train
    loader, why = args.loader, "asked for"
    if loader == "best":
        loader, why = best_loader(args.loaders_results)
    cfg = train.Config(net="flat", loader=loader, data=args.data, res=args.res, batch_size=args.batch_size,
                       epochs=args.epochs, device=args.device, runs_dir=args.runs_dir, bootstrap=100,
                       name=f"gpu-check-{loader}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = train.train(cfg)
    keep = ("images_per_sec", "data_stall_fraction", "test_acc", "amp", "device", "peak_gpu_mb", "run_dir", "epochs")
    save(args, {"loader": loader, "chosen": why, "net": "flat", "res": args.res, "batch_size": args.batch_size,
                **{k: summary[k] for k in keep}})
    return (f"flat res {args.res} batch {args.batch_size} with {loader} ({why}): {summary['images_per_sec']:,.0f} "
            f"img/s, data stall {summary['data_stall_fraction']:.0%}, amp {summary['amp']}")


def best_loader(results):
    """The fastest fastpix train backend of a bench.loaders run (at the default augment, rrc, which training
    uses), or resident when there is none."""
    try:
        rows = json.loads(Path(results).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return "resident", "no loaders table: resident needs no extra library"
    ours = [r for r in rows if r["split"] == "train" and r.get("augment", "rrc") == "rrc" and not r.get("error")
            and r["backend"] not in ("folder", "decode") and not r["backend"].endswith("-reference")]
    if not ours:
        return "resident", "no working loader in the table: resident needs no extra library"
    best = max(ours, key=lambda r: r["images_per_sec"])
    return best["backend"], f"fastest in the loaders table, {best['images_per_sec']:,.0f} img/s"


def p_data(args):
    from bench.demo import make_demo_data
    manifest = make_demo_data(args.data, per_class=args.per_class, progress=False)
    save(args, {"images": manifest["written"], "formats": manifest.get("formats")})
    return f"ingested {manifest['written']} images into {args.data} (formats: {manifest.get('formats', '?')})"


def save(args, result):
    if args.result:
        write_json(args.result, result, indent=1)


PROBES = {name[2:]: fn for name, fn in globals().items() if name.startswith("p_")}
NO_DATA = ("env", "import", "torch_cuda", "channels_last", "nccl")


def main(argv=None):
    p = Parser(prog="python3 -m bench.gpu probe", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=sorted(PROBES))
    p.add_argument("--data", help="ingested dataset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--result", help="write the probe's figures here as JSON")
    p.add_argument("--module", help="import: the module to import")
    p.add_argument("--per-class", type=int, default=12, help="data: images per class")
    p.add_argument("--batches", type=int, default=200, help="stream_race: batches per pass")
    p.add_argument("--batch-size", type=int, default=64, help="stream_race, train: images per batch")
    p.add_argument("--busy", type=int, default=8, help="stream_race: matmuls queued before each decode")
    p.add_argument("--busy-side", type=int, default=4096, help="stream_race: their side (4096: ~2 ms each)")
    p.add_argument("--loader", default="best", help="train: a backend, or best (from --loaders-results)")
    p.add_argument("--loaders-results", help="train: a bench.loaders results.json to pick the best loader from")
    p.add_argument("--res", type=int, default=224, help="train: resolution")
    p.add_argument("--epochs", type=int, default=3, help="train: epochs (the figures are the median of 2+)")
    p.add_argument("--runs-dir", default="runs", help="train: where the run folder goes")
    args = p.parse_args(argv)
    if args.probe not in NO_DATA and not args.data:
        raise UsageError(f"probe {args.probe} needs --data DIR")
    try:
        print("OK " + PROBES[args.probe](args), flush=True)
    except Skip as why:
        print(f"SKIPPED {why}", flush=True)
        return SKIP_EXIT
    return 0

