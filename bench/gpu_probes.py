"""The individual checks bench/gpu_check.py runs, one per process: `python -m bench.gpu_probes NAME ...`.

Each probe asserts what its GPU path must deliver (batches on the GPU, agreeing with the CPU path within a
stated bound) and ends with one `OK ...` line that the report keeps; any failure exits non-zero with the
reason as the last line.
"""
import argparse
import sys
import time

import torch

from cli import UsageError, run
from loaders import make_loader
from loaders.common import resolve_device

# Bounds for GPU-vs-CPU agreement, in normalised units (1 unit ~ 58 grey levels). nvJPEG and libjpeg-turbo
# differ by an IDCT rounding (~1 grey level) and GPU resize filters sample slightly differently from CPU
# ones, so pixels agree on average to well under 0.05 unit; 0.1 catches swapped channels, wrong
# normalisation or misaligned crops, which move the mean by several tenths.
MEAN_ABS_BOUND = 0.1
DECODE_GREY_BOUND = 3.0  # raw decode, 0-255 scale: nvJPEG vs libjpeg-turbo


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


def p_torch_gpu_decode(args):
    import tarfile

    import torchvision
    from torchvision.io import decode_jpeg

    from ingest.layout import shard_paths
    device = resolve_device(args.device)
    tars, _ = shard_paths(args.data, "test")
    with tarfile.open(tars[0]) as tar:
        blobs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:16]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    on_device = decode_jpeg(data, device=device.type)
    on_cpu = decode_jpeg(data)
    worst = max((a.float().cpu() - b.float()).abs().mean().item() for a, b in zip(on_device, on_cpu))
    assert all(t.device.type == device.type for t in on_device)
    assert worst < DECODE_GREY_BOUND, f"decode_jpeg {device} vs cpu differ by {worst:.2f} grey levels"
    return (f"torchvision {torchvision.__version__} decode_jpeg x{len(data)} on {device.type}, worst mean diff "
            f"{worst:.2f} grey levels; loader: {agree_with_cpu('torch', args.data, device)}")


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


def p_data(args):
    from bench.demo import make_demo_data
    manifest = make_demo_data(args.data, per_class=args.per_class)
    return f"ingested {manifest['written']} images into {args.data}"


PROBES = {name[2:]: fn for name, fn in globals().items() if name.startswith("p_")}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_probes", description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=sorted(PROBES))
    p.add_argument("--data", help="ingested dataset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--per-class", type=int, default=12, help="images per class for the data probe")
    args = p.parse_args(argv)
    if args.probe not in ("torch_cuda", "channels_last") and not args.data:
        raise UsageError(f"probe {args.probe} needs --data DIR")
    print("OK " + PROBES[args.probe](args), flush=True)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:])
