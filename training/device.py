"""Where a run computes: its process (rank of world under torchrun), its device, its autocast precision, and
the few numbers and objects it exchanges across ranks.

AMP on the CPU, measured here (Xeon with AMX, 2 shared cores, flat net, res 224, fwd+bwd+fused SGD, median
of interleaved pairs): bf16 autocast / fp32 images/s = 0.96 at batch 16, 1.23 at 32, 1.84 at 64; at the
default batch 150 the convolutions dominate even more. So `--amp auto` picks bf16 on CPUs with native bf16
(AMX or AVX512-BF16) and off on the others, where bf16 is emulated and slower.
"""
import io
import os

import torch
import torch.distributed as dist

from cli import UsageError
from loaders.common import resolve_device

AMP_MODES = ("auto", "bf16", "fp16", "off")  # what --amp accepts; resolve_amp says what each becomes
DEVICES = ("auto", "cpu", "cuda")  # what --device accepts; under torchrun each rank takes its LOCAL_RANK's GPU


def start_distributed(device_option):
    """(rank, world, device) from torchrun's environment; a plain `python train.py` is rank 0 of 1. Under
    torchrun the process group is made even for one process, so a 1-GPU torchrun really brings up NCCL (the
    communicator at once, with device_id) and its gradients go through DDP."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_option)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                **restart_store())
    return dist.get_rank(), dist.get_world_size(), device


SHARED_STORE_SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # torch's own: =1, a fresh store per rendezvous round


def restart_store():
    """Under torchrun's agent store, the process group's store with its keys under this restart's own prefix.
    torch 2.14 reuses the agent's store across restarts without one, so a restarted group read its dead
    predecessors' addresses and gloo failed to connect (seen here); torch up to 2.3 added this very prefix.

    The prefix is the agent's restart count, which only one node's ranks share: torchrun counts a restart only
    where a worker failed, so two nodes restarted after one lost a worker had different prefixes and never met
    (seen: no step in the 10 minutes after the kill). Several nodes that may restart therefore need torch's own
    switch, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (each round's rank 0 then hosts a fresh store: no stale keys);
    training.launch sets it, and without it such a run is refused before it starts."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        raise UsageError(f"torchrun on several nodes with --max-restarts needs {SHARED_STORE_SWITCH}=1 in every "
                         "node's environment (torch's shared store cannot bring nodes restarted a different number "
                         "of times together again), or launch with python -m training.launch, which sets it")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"/fastpix/attempt_{attempt}", store), rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]))


def autocast(device, amp):
    """The autocast context of a resolved --amp ('bf16', 'fp16' or 'off', see resolve_amp) on `device`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_ranks(world, device, value, op):
    """Reduce a number over ranks with op 'sum', 'min' or 'max' (a no-op for one process)."""
    if world == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.item()


def gather_to_rank0(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere. Tensors travel as torch.save bytes:
    gather_object's own unpickling of tensor storages fails in torch 2.14."""
    if world == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blobs = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(buffer.getvalue(), blobs, dst=0)
    return blobs and [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]


def cpu_has_native_bf16():
    """AMX or AVX512-BF16: where bf16 autocast beats fp32 on the CPU (private torch probes, so guarded)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_amp(amp, device):
    """The autocast mode actually used: 'bf16', 'fp16' (with a gradient scaler) or 'off'."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU (the gradient scaler is a GPU tool): use bf16 or off")
    return amp
