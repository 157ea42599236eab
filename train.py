"""Train an AlexNet-family CNN (or ResNet-18 transfer) on an ingested dataset: `python train.py --net flat`.

One loop in plain sight (`Run.train_epoch`): batches from `loaders.make_loader` (already normalised, on the device),
autocast (bf16 / fp16 + scaler / off), a warm-up + cosine LR schedule stepped per iteration, per-iteration
loss kept on the device and read every `--log-every` steps, test metrics with bootstrap 95 % intervals
after every epoch, an atomic checkpoint every epoch (and on Ctrl-C / SIGTERM), DDP under torchrun.

AMP on the CPU, measured here (Xeon with AMX, 2 shared cores, flat net, res 224, fwd+bwd+fused SGD, median
of interleaved pairs): bf16 autocast / fp32 images/s = 0.96 at batch 16, 1.23 at 32, 1.84 at 64; at the
default batch 150 the convolutions dominate even more. So `--amp auto` picks bf16 on CPUs with native bf16
(AMX or AVX512-BF16) and off on the others, where bf16 is emulated and slower.

Everything a run produces lives in runs/<name>/: config.json, metrics.jsonl, last.pt, test_predictions.npz
(label, prediction, confidence per test sample), the plots (loss.png, accuracy.png, confusion.png,
grad_norms.png), at the end what the net learnt and how it predicts (layers.md, filters.png, feature_maps.png,
samples.png, predictions.png, per_class.md, suspects.csv; see report/), and the marker .fastpix-run; only rank 0
writes. A run writes only into a folder it made (the marker says so) and deletes only its own files. config.json
and every checkpoint record the dataset's fingerprint, so --resume and --init-from notice other data.
"""
import argparse
import contextlib
import copy
import errno
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from files import atomic_path, temp_of, write_json, write_text  # noqa: E402
import nets  # noqa: E402
from cli import Parser, UsageError, add_options, check_options, config_from, ints, names, option, run  # noqa: E402
from ingest import layout  # noqa: E402
from loaders import BACKENDS, make_loader  # noqa: E402
from loaders.common import AUGMENTS, resolve_device  # noqa: E402
from report.metrics import classification_metrics  # noqa: E402
from report.images import plot_feature_maps, plot_filters, plot_predictions, plot_samples  # noqa: E402
from report.layers import layer_table, layers_markdown  # noqa: E402
from report.plots import plot_confusion, plot_lr_find, plot_run  # noqa: E402
from report.quality import per_class_markdown, write_suspects  # noqa: E402
from report.runlog import append_jsonl, read_metrics, trim_metrics  # noqa: E402

OPTIMIZERS = ("sgd", "adam", "rmsprop")
AMP_MODES = ("auto", "bf16", "fp16", "off")
CHECKPOINT = "last.pt"
RUN_MARKER = ".fastpix-run"  # {"finished": bool}: train.py made this folder, the only kind it writes into
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, "test_predictions.npz", "loss.png", "accuracy.png",
             "confusion.png", "grad_norms.png", "lr_find.json", "lr_find.png", "layers.md", "filters.png",
             "feature_maps.png", "samples.png", "predictions.png", "per_class.md", "suspects.csv",
             RUN_MARKER)  # everything a run writes (marker last); nothing else there is touched

RECIPES = ("study", "fast")
RECIPE_PIECES = {  # what --recipe fast may switch on; bench.tta turns each off in turn (its ablation)
    "progressive": "train at low res early, rising linearly to the top res (FFCV's ImageNet recipe)",
    "batchnorm": "batch norm after every conv (the AlexNet family; resnet18 has its own)",
    "label_smoothing": "cross-entropy against labels smoothed by LABEL_SMOOTHING",
    "onecycle": "LR rises linearly over ONECYCLE_PEAK of the steps, then falls linearly to 0 (replaces --warmup "
                "+ cosine)",
    "no_bn_decay": "no weight decay on biases and norm weights",
    "flip_tta": "test logits summed over each image and its mirror",
    "ema": "test with an exponential moving average of the weights (decay EMA_DECAY per step)",
    "fixres": "train up to res / FIXRES (a multiple of 8), test at res: RandomResizedCrop enlarges objects, so "
              "a model tests best above its train res (Touvron et al., FixRes)",
}
FAST_DEFAULT = tuple(RECIPE_PIECES)
LABEL_SMOOTHING = 0.1
ONECYCLE_PEAK = 0.15
EMA_DECAY = 0.9
FIXRES = 1.15
PROGRESSIVE_START = 0.625  # the first epoch's share of the top res (FFCV: 160 of 256)
PROGRESSIVE_RAMP = 0.75  # the top res is reached at this share of the epochs
RES_STEP = 16  # scheduled resolutions are multiples of it


def lr_value(text):
    """--lr: a number, or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


# ----------------------------------------------------------------------------------------------- Config

@dataclass
class Config:
    """Every option of a run, each declared once with its flag (`cli.option`); saved as runs/<name>/config.json.
    Defaults follow the 500px study."""
    net: str = option("flat", "model", choices=nets.NETS)
    loader: str = option("dali", "data loader backend", choices=BACKENDS)
    data: str = option(str(layout.DEFAULT_OUT), "ingested dataset folder (python ingest/build.py)")
    res: int = option(224, "square input side in pixels")
    augment: str = option("rrc", "train transform: rrc (RandomResizedCrop + flip), flip (the test transform + flip) "
                          "or none (the test transform: the study's resize + center crop)", choices=AUGMENTS)
    batch_size: int = option(150, "images per step per process (the study's batch); DDP multiplies it by the "
                             "world size", minimum=1)
    epochs: int = option(10, "epochs to train", minimum=1)
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float | str = option(0.01, "peak learning rate, reached after the warm-up, or auto: the LR range test's "
                             "suggestion (see --find-lr)", parse=lr_value)
    momentum: float = option(0.9, "momentum of sgd and rmsprop")
    weight_decay: float = option(5e-4, "L2 weight decay (AlexNet's)")
    warmup: float = option(1.0, "epochs of linear LR warm-up before the cosine decay to 0")
    amp: str = option("auto", "autocast: bf16, fp16 (GPU, with a scaler), off, or auto (see the module docstring)",
                      choices=AMP_MODES)
    device: str = option("auto", "auto, cpu or cuda")
    compile: bool = option(False, "torch.compile the model (slow start, faster steps on a GPU)")
    channels_last: bool = option(True, "NHWC convolutions, the layout the loaders produce")
    seed: int = option(0, "seed of weights, loader order and augmentation")
    name: str = option("", "run folder under --runs-dir (default <net>-<loader>-<time>)")
    runs_dir: str = option("runs", "where run folders go")
    init_from: str = option("", "a checkpoint (or state dict) to take the starting weights from")
    resume: str = option("", "run folder to continue exactly where it stopped (other options ignored)")
    allow_other_data: bool = option(False, "let --resume / --init-from train on a dataset other than the one the "
                                    "weights saw (the classes must still match)")
    strides: tuple | None = option(None, "conv strides, one per layer, e.g. 4,1,1, AlexNet family (default: the "
                                   "net's own)", parse=ints)
    kernels: tuple | None = option(None, "conv kernel sizes, one per layer, e.g. 11,5,3, AlexNet family (default: "
                                   "the net's own)", parse=ints)
    dropout: float = option(0.0, "dropout before both FC layers (off: faithful to the study)")
    batchnorm: bool = option(False, "batch norm after every conv (off: faithful to the study)")
    pretrained: str = option("", "transfer every layer but the head from a fastpix run's last.pt of this net (any "
                             "classes) or a local ImageNet resnet18 state dict (never downloaded)")
    freeze: bool = option(False, "resnet18: train the new head only")
    workers: int | None = option(None, "loader threads/processes (default: the backend's)", minimum=0)
    log_every: int = option(10, "steps between reads of the loss and log lines (each read syncs with the device)",
                            minimum=1)
    max_steps: int | None = option(None, "stop after this many steps in total, checkpointed and resumable",
                                   minimum=1)
    bootstrap: int = option(1000, "bootstrap resamples for the 95% intervals of the test metrics", minimum=1)
    recipe: str = option("study", "study (the 500px study's training, unchanged) or fast (the pieces of --pieces, "
                         "for time to accuracy; see README, Recipe)", choices=RECIPES)
    pieces: tuple | None = option(None, "with --recipe fast, the pieces to use (default: all of "
                                  f"{','.join(FAST_DEFAULT)})", parse=names)
    find_lr: bool = option(False, "LR range test first, on a copy (the run is unchanged): lr_find.png and "
                           "lr_find.json with the suggested LR in the run folder; --lr auto implies it")
    find_lr_steps: int = option(200, "steps of the LR range test's exponential sweep", minimum=1)
    merge: tuple = option((), "train classes A and B as one class named A+B (repeatable; labels remapped on the "
                          "device)", metavar="A+B", repeat=True)


def check(cfg):
    """Every impossible option as one UsageError line, before anything expensive starts."""
    check_options(cfg)
    check_recipe(cfg)
    if min(train_res(cfg, 0), cfg.res) < 8:
        raise UsageError(f"--res must be >= 8 at every epoch, got {cfg.res} (lowest {train_res(cfg, 0)})")
    if cfg.lr != "auto" and not (math.isfinite(cfg.lr) and cfg.lr >= 0) or cfg.weight_decay < 0 or cfg.warmup < 0:
        raise UsageError(f"--lr ({cfg.lr}), --weight-decay ({cfg.weight_decay}) and --warmup ({cfg.warmup}) "
                         "must be finite and >= 0")
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.init_from and cfg.resume:
        raise UsageError("--init-from starts a new run and --resume continues one: give only one")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise UsageError(f"--init-from {cfg.init_from}: no such checkpoint")
    if Path(cfg.name).name != cfg.name:
        raise UsageError(f"--name {cfg.name!r} must be a plain folder name (it goes under {cfg.runs_dir})")


def check_recipe(cfg):
    """Resolve the pieces of the recipe in place (so config.json records them) or say what is wrong."""
    if cfg.recipe == "study":
        if cfg.pieces:
            raise UsageError("--pieces choose among the fast recipe's pieces: add --recipe fast")
        cfg.pieces = ()
        return
    cfg.pieces = FAST_DEFAULT if cfg.pieces is None else tuple(cfg.pieces)
    unknown = [p for p in cfg.pieces if p not in RECIPE_PIECES]
    if unknown:
        raise UsageError(f"unknown recipe piece {unknown[0]!r}: choose among {', '.join(RECIPE_PIECES)}")
    if "batchnorm" in cfg.pieces and cfg.net != "resnet18":
        cfg.batchnorm = True


def train_res(cfg, epoch):
    """The train resolution of an epoch: --res, or below it with fixres, rising from a share of it with
    progressive (multiples of RES_STEP, as FFCV rounds to 32)."""
    top = round(cfg.res / FIXRES / 8) * 8 if "fixres" in (cfg.pieces or ()) else cfg.res
    if "progressive" not in (cfg.pieces or ()):
        return top
    low = max(RES_STEP, round(top * PROGRESSIVE_START / RES_STEP) * RES_STEP)
    ramp = min(1.0, epoch / max(PROGRESSIVE_RAMP * (cfg.epochs - 1), 1))
    return top if ramp == 1 else min(top, round((low + (top - low) * ramp) / RES_STEP) * RES_STEP)


def onecycle_factor(step, total_steps):
    """Linear rise to 1 at ONECYCLE_PEAK of the steps, linear fall to 0 at total_steps (FFCV's triangle)."""
    peak = max(1, round(ONECYCLE_PEAK * total_steps))
    if step < peak:
        return (step + 1) / peak
    return max(0.0, (total_steps - step) / max(total_steps - peak, 1))


def decay_groups(params):
    """no_bn_decay: biases and norm weights (every 0-d/1-d parameter) without weight decay."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_ema(model):
    """An EMA of the weights and the batch-norm statistics, updated after every step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)


# ----------------------------------------------------------------------------------------------- Setup

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
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a step may draw from, in plain types so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # this process's GPU only


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine decay to 0 at total_steps; a pure function of the step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(cfg, params, lr):
    """fused=True: one kernel over all parameters, 4-7x faster than the default for our 60-75M-parameter
    AlexNets on the CPU (measured); RMSprop has no fused version."""
    params = decay_groups(params) if "no_bn_decay" in cfg.pieces else [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def merge_classes(classes, merges):
    """--merge "A+B": (class names after merging, new label of every old label). A merged class takes the place
    of its first member and is named by its members joined with '+', as given."""
    group = {}
    for spec in merges:
        members = spec.split("+")
        unknown = [m for m in members if m not in classes]
        if len(members) < 2 or unknown:
            raise UsageError(f"--merge {spec!r}: join two or more of these classes with '+': {', '.join(classes)}")
        for m in members:
            if m in group:
                raise UsageError(f"--merge: {m} is in two merges ({group[m]} and {spec})")
            group[m] = spec
    names = list(dict.fromkeys(group.get(c, c) for c in classes))
    if len(names) < 2:
        raise UsageError("--merge leaves fewer than 2 classes: nothing to classify")
    return names, [names.index(group.get(c, c)) for c in classes]


def find_lr(run, start=1e-7, end=10.0, beta=0.98):
    """Smith's LR range test: train a copy of the model with its own optimizer and its own train loader while
    the LR grows exponentially from `start` to `end` over --find-lr-steps steps, stopping once the smoothed loss
    exceeds 4x its minimum. The RNG state is restored afterwards, so the run itself is untouched: same weights,
    same batches, bit for bit. Suggests the LR of the lowest smoothed loss / 10 (where it still falls steeply).
    Rank 0's suggestion is every rank's. Returns what lr_find.json holds (the run writes it with lr_find.png)."""
    cfg, saved = run.cfg, rng_state()
    model = copy.deepcopy(run.model)
    optimizer = make_optimizer(cfg, model.parameters(), start)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp == "fp16")
    loader = make_loader(cfg.loader, cfg.data, "train", **run.loader_args)
    lrs = start * (end / start) ** (np.arange(cfg.find_lr_steps) / max(cfg.find_lr_steps - 1, 1))
    losses, pending, epoch, batches = [], [], 0, iter(loader)
    for step, lr in enumerate(lrs):
        batch = next(batches, None)
        if batch is None or len(batch[1]) < cfg.batch_size:  # full batches only, as in training; then next epoch
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            batch = next(batches)
        images, labels = batch
        for group in optimizer.param_groups:
            group["lr"] = lr
        with run.autocast():
            loss = F.cross_entropy(model(images), run.relabel(labels))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pending.append(loss.detach())
        if len(pending) == cfg.log_every or step + 1 == len(lrs):  # one read per --log-every steps
            losses += torch.stack(pending).float().cpu().tolist()
            pending = []
            smooth = lr_sweep_smoothed(losses, beta)
            if not math.isfinite(smooth[-1]) or smooth[-1] > 4 * min(smooth):
                break
    del model, optimizer, loader
    set_rng_state(saved)
    lrs, smooth = lrs[:len(losses)].tolist(), lr_sweep_smoothed(losses, beta)
    finite = [i for i, v in enumerate(smooth) if math.isfinite(v)]
    suggested = lrs[min(finite, key=smooth.__getitem__)] / 10 if finite else start
    suggested = all_ranks(run.world, run.device, suggested if run.writer else 0.0, "sum")
    return {"suggested_lr": suggested, "rule": "lowest smoothed loss / 10", "lr": lrs, "loss": losses,
            "smoothed": smooth}


def lr_sweep_smoothed(losses, beta):
    """Exponential moving average of the sweep's losses with bias correction (fastai's LR finder smoothing)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def make_model(cfg, num_classes, device):
    model = nets.build(cfg.net, num_classes, strides=cfg.strides, kernels=cfg.kernels, dropout=cfg.dropout,
                       batchnorm=cfg.batchnorm, pretrained=cfg.pretrained or None, freeze=cfg.freeze)
    smallest = min(cfg.res, train_res(cfg, 0))
    try:  # one tiny forward now turns "this input is too small for these strides" into one clear line
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, smallest, smallest))
    except RuntimeError:
        raise UsageError(f"{cfg.net} with strides {cfg.strides or 'default'} and kernels "
                         f"{cfg.kernels or 'default'} shrinks a {smallest}px input to nothing: raise --res "
                         "or lower the strides") from None
    model.train()
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def read_checkpoint(flag, path):
    """A checkpoint's contents, or one line saying it cannot be read (truncated, not a checkpoint at all)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user mistake
        raise UsageError(f"{flag} {path} is not a readable checkpoint ({type(err).__name__}): it is damaged or "
                         "not a fastpix checkpoint") from None


def load_weights(model, path, state):
    """--init-from: a fastpix checkpoint or a bare state dict of the same net and classes."""
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:160]
        raise UsageError(f"--init-from {path} does not fit this net and class count: {first}") from None


def check_same_data(flag, source, saved, manifest, cfg):
    """Weights continue on the data they were trained on: --resume and --init-from refuse a dataset with
    another fingerprint (ingest's hash of the source and its settings) unless --allow-other-data. The
    classes must match even then, or label i would silently change meaning."""
    theirs, ours = list(saved.get("classes") or []), manifest["classes"]
    if theirs and theirs != ours:
        if len(theirs) != len(ours):
            diff = f"{len(theirs)} classes, {cfg.data} has {len(ours)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            diff = f"label {i} is {theirs[i]!r}, in {cfg.data} it is {ours[i]!r}"
        raise UsageError(f"{flag} {source} was trained on other classes ({diff}): its classes must match the data's")
    saved_print, data_print = saved.get("data_fingerprint"), manifest["fingerprint"]
    if saved_print != data_print and not cfg.allow_other_data:
        raise UsageError(f"{flag} {source} was trained on dataset {(saved_print or 'unrecorded')[:12]}, but "
                         f"{cfg.data} is dataset {data_print[:12]}: use the data it was trained on, or pass "
                         "--allow-other-data")


# ----------------------------------------------------------------------------------------------- Files

class KeepsWriteError:
    """A file for torch.save that remembers why a write failed: torch's zip writer turns a full disk into an
    opaque RuntimeError ("unexpected pos"), to a path or to a Python file alike (seen on a full tmpfs)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        self.file.flush()


def save_checkpoint(path, **state):
    """Atomically; a failed write raises its own OSError (ENOSPC on a full disk)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        out = KeepsWriteError(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def tensor_bytes(obj):
    """Bytes of every tensor in a (nested) state: a checkpoint's size on disk, to within its zip headers.
    fp32 weights plus SGD's momentum are 8 bytes per parameter: 600 MB for flat (75.1M parameters), 470 MB
    for alexnet, 90 MB for resnet18; Adam keeps two moments, 12 bytes per parameter (900 MB for flat)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def drop_torn_line(path):
    """A metrics line cut short by a kill or a full disk ends the file without its newline: cut it off, so that
    a resume reads only whole records."""
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with open(path, "r+b") as f:
            f.truncate(whole)


def megabytes(n):
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


# ----------------------------------------------------------------------------------------------- Training

class StopFlag:
    """Ctrl-C / SIGTERM ask for a clean stop at the next step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading_is_main():  # Python lets only the main thread install handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main():
    return threading.current_thread() is threading.main_thread()


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


def evaluate(model, loader, autocast, world, relabel, flip=False):
    """Labels, predictions and the softmax confidence of each prediction for every test sample exactly once,
    in id order, on rank 0 (None elsewhere: only rank 0 computes metrics and writes); flip: logits of each
    image averaged with those of its mirror."""
    model.eval()
    preds, confs, labels = [], [], []
    with torch.no_grad(), autocast():
        for images, y in loader:
            logits = model(images)
            if flip:
                logits = (logits + model(images.flip(3))) / 2
            conf, pred = logits.float().softmax(1).max(1)
            preds.append(pred)
            confs.append(conf)
            labels.append(relabel(y))
    model.train()
    # Ranks own contiguous id blocks (loaders.common.rank_ids), so rank order is id order.
    gathered = gather_to_rank0((torch.cat(labels).cpu(), torch.cat(preds).cpu(), torch.cat(confs).cpu()), world)
    if gathered is None:
        return None, None, None
    return tuple(torch.cat(part).numpy() for part in zip(*gathered))


def restartable(run_dir):
    """A run train.py made that died before its first checkpoint: nothing in it is worth keeping, so it starts
    again from step 0, under the same --name or by --resume. (A finished run whose checkpoint was deleted, as
    the bench does, is not restartable: its metrics and plots are results.)"""
    marker = run_dir / RUN_MARKER
    return marker.is_file() and not (run_dir / CHECKPOINT).exists() and not json.loads(marker.read_text())["finished"]


def new_run_dir(cfg):
    """The folder of a new run: missing, empty, or a restartable run; a folder train.py did not make is
    never written into."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise UsageError(f"{run_dir} is not empty and was not made by train.py: pick another --name or --runs-dir")
        if not restartable(run_dir):
            raise UsageError(f"{run_dir} already holds a run: pick another --name, or --resume {run_dir}")
        print(f"{run_dir} stopped before its first checkpoint: starting it again from step 0", file=sys.stderr)
        remove_run(run_dir)
    elif run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file: pick another --name or --runs-dir")
    return run_dir


def remove_run(run_dir):
    """Delete a run train.py made: its own files only, then the folder if nothing else is left in it. For
    callers (bench, the study) that replace a run of theirs with a new one of the same name."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_MARKER).is_file():
        raise UsageError(f"{run_dir} was not made by train.py: move it away, it will not be deleted")
    for path in own_temp_files(run_dir):
        path.unlink()
    for name in RUN_FILES:  # the marker last: a crash midway leaves a folder that is still a run of ours
        (run_dir / name).unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()


def own_temp_files(run_dir):
    """Temp files (files.atomic_path's) of this run's files that a killed write left behind."""
    return [p for p in Path(run_dir).iterdir() if temp_of(p.name) in RUN_FILES]


def config_from_resume(cfg):
    """The interrupted run's own config (so its schedule continues), with this call's max_steps and
    allow_other_data. A run that died before its first checkpoint starts again from step 0."""
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there, so no run to continue")
    if not (run_dir / CHECKPOINT).is_file() and not restartable(run_dir):
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT} there to continue from")
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    # The weights come from the checkpoint now, not from where the run first started.
    saved.update(resume=str(run_dir) if (run_dir / CHECKPOINT).is_file() else "", init_from="",
                 max_steps=cfg.max_steps, allow_other_data=cfg.allow_other_data, name=run_dir.name,
                 runs_dir=str(run_dir.parent))
    return Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})


def train(cfg):
    """Run training as configured; returns the summary dict (see `summarize`; rank 0's view under DDP)."""
    if cfg.resume:
        cfg = config_from_resume(cfg)
    check(cfg)
    rank, world, device = start_distributed(cfg.device)
    try:
        run = Run(cfg, rank, world, device)
        with StopFlag() as stop:
            while run.epoch < cfg.epochs and run.stopped is None:
                run.train_epoch(stop)
        run.finish()
        return summarize(run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Run:
    """One training run: model, optimizer, schedule, loaders and run folder, set up (or restored) at once;
    `train_epoch` is the loop, `finish` writes what only the end knows."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.writer = rank == 0
        self.amp = resolve_amp(cfg.amp, device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        if not cfg.name:
            cfg.name = f"{cfg.net}-{cfg.loader}-{time.strftime('%Y%m%d-%H%M%S')}"
        # Only rank 0 checks the folder: it may already have created it by the time another rank looks.
        self.dir = new_run_dir(cfg) if self.writer and not cfg.resume else Path(cfg.runs_dir) / cfg.name
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        self.loader_args = dict(batch_size=cfg.batch_size, res=cfg.res, device=str(device), seed=cfg.seed,
                                rank=rank, world=world, workers=cfg.workers, augment=cfg.augment)  # test: ignored
        self.train_loader = make_loader(cfg.loader, cfg.data, "train", **self.loader_args)
        self.test_loader = make_loader(cfg.loader, cfg.data, "test", **self.loader_args)
        manifest = self.train_loader.block.manifest  # the one the loaders checked the data against
        self.classes, label_map = merge_classes(self.train_loader.classes, cfg.merge)
        self.fingerprint = manifest["fingerprint"]
        # --merge: labels are remapped on the device, by indexing (no sync, no re-ingest).
        self.label_map = torch.tensor(label_map, device=device) if cfg.merge else None

        seed_everything(cfg.seed)
        self.model = make_model(cfg, len(self.classes), device)
        if cfg.init_from:
            state = read_checkpoint("--init-from", cfg.init_from)
            if isinstance(state, dict) and "model" in state:  # a fastpix checkpoint; a bare state dict knows no data
                check_same_data("--init-from", cfg.init_from, state, manifest, cfg)
            load_weights(self.model, cfg.init_from, state)
        # Full batches only (the last partial one is dropped; the next epoch's shuffle drops others): BN never
        # sees a 1-sample batch, every step weighs the same, and all ranks take the same number of steps even
        # when their blocks differ by a sample, so DDP never waits on a rank that has finished.
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise UsageError(f"--batch-size {cfg.batch_size} is more than the {self.train_loader.fewest_samples} "
                             "train samples per process: lower it")
        total, warmup = cfg.epochs * self.steps_per_epoch, round(cfg.warmup * self.steps_per_epoch)

        self.lr = self.resolve_lr()
        self.optimizer = make_optimizer(cfg, self.model.parameters(), self.lr)
        schedule = (lambda s: onecycle_factor(s, total)) if "onecycle" in cfg.pieces else \
            (lambda s: lr_factor(s, warmup, total))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.ema = make_ema(self.model) if "ema" in cfg.pieces else None
        self.label_smoothing = LABEL_SMOOTHING if "label_smoothing" in cfg.pieces else 0.0
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        net = self.model
        if dist.is_initialized():
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
        self.net = torch.compile(net) if cfg.compile else net

        self.epoch = self.skip = self.global_step = 0
        self.epoch_rng = self.resume_rng = self.epoch_sums = None
        self.history, self.stopped, self.saved_step = [], None, None
        if self.writer and self.dir.is_dir():
            for path in own_temp_files(self.dir):  # left by a write that was killed
                path.unlink()
        self.weights = [(name.removesuffix(".weight"), p) for name, p in self.model.named_parameters()
                        if p.requires_grad and p.ndim > 1]  # conv and linear weights: the layers grad_norms logs
        if cfg.resume:
            self.restore(manifest)
        elif self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.writing("config.json"):
                write_json(self.dir / RUN_MARKER, {"finished": False})
                write_json(self.dir / "config.json", {
                    "config": asdict(cfg), "amp": self.amp, "device": str(device), "world": world,
                    "process_group": dist.get_backend() if dist.is_initialized() else None,
                    "classes": self.classes, "data_fingerprint": self.fingerprint,
                    "steps_per_epoch": self.steps_per_epoch, "lr": self.lr, "torch": torch.__version__})
                if self.lr_sweep:
                    write_json(self.dir / "lr_find.json", self.lr_sweep)
                    plot_lr_find(self.lr_sweep["lr"], self.lr_sweep["loss"], self.lr_sweep["smoothed"],
                                 self.lr_sweep["suggested_lr"], self.dir / "lr_find.png")

    @contextlib.contextmanager
    def writing(self, what, need=None):
        """A full disk while writing `what` becomes one line: what, how much it needs, what is kept and how to
        go on. With `need` (bytes), the free space is checked first, so a 600 MB checkpoint is not written in
        vain. Any other OSError stays a traceback: it is not the user's to fix."""
        free = shutil.disk_usage(self.dir).free
        try:
            if need is not None and free < need:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            yield
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            needs = f"needs {megabytes(need)}, " if need is not None else ""
            if self.saved_step is not None:
                kept = (f"kept {self.dir / CHECKPOINT} (step {self.saved_step}) and the metrics; free some space, "
                        f"then: python train.py --resume {self.dir}")
            else:
                kept = (f"no checkpoint yet; free some space, then rerun with --name {self.cfg.name} "
                        "(it starts again)")
            raise UsageError(f"disk full writing {what} in {self.dir} ({needs}{megabytes(free)} free): "
                             f"{kept}") from None

    def tested_model(self):
        """The weights the test metrics describe: the EMA's when the recipe keeps one."""
        return self.model if self.ema is None else self.ema.module

    def relabel(self, labels):
        return labels if self.label_map is None else self.label_map[labels]

    def resolve_lr(self):
        """The peak LR: --lr, or (--lr auto) the range test's suggestion, found once and kept in config.json."""
        cfg = self.cfg
        self.lr_sweep = None
        if cfg.resume:
            return json.loads((self.dir / "config.json").read_text()).get("lr", cfg.lr)
        if cfg.find_lr or cfg.lr == "auto":
            self.lr_sweep = find_lr(self)
        return self.lr_sweep["suggested_lr"] if cfg.lr == "auto" else cfg.lr

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def restore(self, manifest):
        ckpt = read_checkpoint("--resume", self.dir / CHECKPOINT)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "rng", "global_step"} <= ckpt.keys():
            raise UsageError(f"--resume {self.dir}: {CHECKPOINT} is not a fastpix training checkpoint")
        check_same_data("--resume", self.dir, ckpt, manifest, self.cfg)
        if len(ckpt["rng"]) != self.world:
            raise UsageError(f"{self.dir} ran on {len(ckpt['rng'])} processes: resume it with as many, not "
                             f"{self.world}")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.skip, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.epoch_rng, self.resume_rng = ckpt["epoch_rng"][self.rank], ckpt["rng"][self.rank]
        self.epoch_sums = ckpt["sums"][self.rank]
        self.saved_step = self.global_step
        if self.writer:
            drop_torn_line(self.dir / "metrics.jsonl")
            with self.writing("metrics.jsonl"):
                trim_metrics(self.dir, self.global_step, self.epoch)
            self.history = read_metrics(self.dir)[1]  # the summary describes the whole run, not this process

    def checkpoint(self, next_epoch, step_in_epoch, start_rng=None, sums=None):
        """Every rank's RNG states (now, and at the start of the epoch), so each continues its own stream,
        and, mid-epoch, its sums so far (loss, correct, samples), so the epoch's record covers all of it."""
        states = gather_to_rank0({"rng": rng_state(), "epoch_rng": start_rng, "sums": sums}, self.world)
        if self.writer:
            state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), epoch=next_epoch,
                         step_in_epoch=step_in_epoch, global_step=self.global_step, rng=[s["rng"] for s in states],
                         epoch_rng=[s["epoch_rng"] for s in states], sums=[s["sums"] for s in states],
                         ema=self.ema.state_dict() if self.ema is not None else None, config=asdict(self.cfg),
                         classes=self.classes, data_fingerprint=self.fingerprint)
            with self.writing(CHECKPOINT, need=tensor_bytes(state) + 2**20):  # + the zip's headers
                save_checkpoint(self.dir / CHECKPOINT, **state)
            self.saved_step = self.global_step

    def start_epoch(self):
        """This epoch's batch iterator, and the RNG state it started from.

        The loader's order follows (seed, epoch), but its augmentation may draw from our RNG when the iterator
        starts: a resumed epoch restarts from the RNG state its first run had, replays the batches already
        trained on, then takes the RNG state of the moment it stopped."""
        if self.resume_rng is not None:
            set_rng_state(self.epoch_rng if self.skip else self.resume_rng)
        start_rng = self.epoch_rng if self.skip else rng_state()
        self.train_loader.set_epoch(self.epoch)
        if self.cfg.pieces:
            self.train_loader.set_res(train_res(self.cfg, self.epoch))
        batches = iter(self.train_loader)
        for _ in range(self.skip):
            next(batches)
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        return batches, start_rng

    def train_epoch(self, stop):
        """One epoch (or the rest of one), then test metrics and a checkpoint; a stop request or --max-steps
        ends it early with a mid-epoch checkpoint instead."""
        cfg, device = self.cfg, self.device
        batches, start_rng = self.start_epoch()
        first = self.skip
        loss_before, correct_before, seen_before = self.epoch_sums or (0.0, 0, 0)
        self.epoch_sums = None
        loss_sum = torch.full((), loss_before, dtype=torch.float32, device=device)
        correct = torch.full((), correct_before, dtype=torch.int64, device=device)
        pending, seen, data_wait = [], seen_before, 0.0
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not self.writer, leave=False, dynamic_ncols=True)
        t_epoch = self.t_window = time.perf_counter()
        for step in range(first, self.steps_per_epoch):
            t0 = time.perf_counter()
            images, labels = next(batches)
            wait = time.perf_counter() - t0
            data_wait += wait
            labels = self.relabel(labels)
            with self.autocast():
                logits = self.net(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            loss = loss.detach()
            loss_sum += loss
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            pending.append((self.global_step, loss, lr, wait, len(labels)))
            self.global_step += 1
            bar.update()
            end_of_epoch = step + 1 == self.steps_per_epoch
            out_of_steps = cfg.max_steps is not None and self.global_step >= cfg.max_steps
            if len(pending) == cfg.log_every or end_of_epoch or out_of_steps or (self.world == 1 and stop.signal):
                self.log_steps(pending, bar, self.grad_norms())
                pending = []
                if all_ranks(self.world, device, stop.signal is not None, "max") or out_of_steps:
                    self.stopped = "signal" if stop.signal is not None else "max_steps"
                    if not end_of_epoch:
                        bar.close()
                        self.checkpoint(self.epoch, step + 1, start_rng,
                                        (loss_sum.item(), int(correct.item()), seen))
                        return
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's time must include its queued GPU work
        epoch_s = time.perf_counter() - t_epoch
        fresh = int(all_ranks(self.world, device, seen - seen_before, "sum"))  # trained on by this process
        seen = int(all_ranks(self.world, device, seen, "sum"))
        steps = self.steps_per_epoch * self.world
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step,
                  "train_loss": all_ranks(self.world, device, loss_sum.item(), "sum") / steps,
                  "train_acc": all_ranks(self.world, device, correct.item(), "sum") / seen,
                  "images_per_sec": fresh / epoch_s, "data_stall_fraction": data_wait / epoch_s,
                  "epoch_s": epoch_s, "train_samples": seen, "partial": first > 0, "res": images.shape[-1]}
        self.test_epoch(record)
        self.epoch, self.skip = self.epoch + 1, 0
        self.checkpoint(self.epoch, 0)

    def grad_norms(self):
        """The gradient norm of every conv and linear layer's weights, on the device, stacked so that
        `log_steps` reads them in the loss's own transfer (no extra sync). Taken after the optimizer step:
        GradScaler has unscaled the gradients by then."""
        grads = [p.grad if p.grad is not None else p.new_zeros(()) for _, p in self.weights]
        return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])

    def log_steps(self, pending, bar, norms):
        """The one device sync of the step loop: every pending step's loss and the last step's per-layer
        gradient norms in one transfer, to the log."""
        read = torch.cat([torch.stack([p[1] for p in pending]).float(), norms]).cpu().tolist()
        losses, norms = read[:len(pending)], dict(zip((name for name, _ in self.weights), read[len(pending):]))
        now = time.perf_counter()
        ips = sum(p[4] for p in pending) * self.world / (now - self.t_window)
        self.t_window = now
        if self.writer:
            records = [{"kind": "step", "epoch": self.epoch, "step": s, "loss": loss, "lr": lr, "images_per_sec": ips,
                        "data_wait_s": wait} for (s, _, lr, wait, _), loss in zip(pending, losses)]
            records[-1]["grad_norms"] = norms
            with self.writing("metrics.jsonl"):
                append_jsonl(self.dir / "metrics.jsonl", records)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{ips:.0f}")
        if not all(math.isfinite(v) for v in losses):
            kept = f"the last good checkpoint is {self.dir / CHECKPOINT}" if (self.dir / CHECKPOINT).exists() \
                else "no checkpoint was written yet"
            raise UsageError(f"loss became non-finite at step {self.global_step} (epoch {self.epoch + 1}): lower "
                             f"--lr or try --amp off; {kept}")

    def test_epoch(self, record):
        """Test metrics into the epoch's record (rank 0), logged with one summary line."""
        t_eval = time.perf_counter()
        y_true, y_pred, confidence = evaluate(self.tested_model(), self.test_loader, self.autocast, self.world,
                                              self.relabel, flip="flip_tta" in self.cfg.pieces)
        record["eval_s"] = time.perf_counter() - t_eval
        if self.writer:
            test = classification_metrics(y_true, y_pred, len(self.classes), resamples=self.cfg.bootstrap,
                                          seed=self.cfg.seed)
            record.update(test_acc=test["acc"], test_acc_ci=test["acc_ci"], macro_precision=test["macro_precision"],
                          macro_precision_ci=test["macro_precision_ci"], test_samples=len(y_true))
            with self.writing("metrics.jsonl and test_predictions.npz"):
                append_jsonl(self.dir / "metrics.jsonl", [record])
                with atomic_path(self.dir / "test_predictions.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, y_true=y_true, y_pred=y_pred, confidence=confidence)
            r = record
            tqdm.write(f"epoch {self.epoch + 1}/{self.cfg.epochs}  loss {r['train_loss']:.3f}  train acc "
                       f"{r['train_acc']:.3f}  test acc {r['test_acc']:.3f} [{r['test_acc_ci'][0]:.3f}, "
                       f"{r['test_acc_ci'][1]:.3f}]  {r['images_per_sec']:.0f} img/s  data wait "
                       f"{r['data_stall_fraction']:.0%}  ({r['epoch_s']:.1f}s + eval {r['eval_s']:.1f}s)")
        self.history.append(record)

    def finish(self):
        """The plots, from the files alone (so --resume of a finished run redraws them), rank 0 only."""
        if not self.writer:
            return
        with self.writing("the plots and reports"):
            write_json(self.dir / RUN_MARKER, {"finished": self.stopped is None})
            plot_run(self.dir)
            if (self.dir / "test_predictions.npz").is_file():
                last = np.load(self.dir / "test_predictions.npz")
                y_true, y_pred, confidence = last["y_true"], last["y_pred"], last["confidence"]
                plot_confusion(y_true, y_pred, self.classes, self.dir / "confusion.png")
                write_text(self.dir / "per_class.md", per_class_markdown(y_true, y_pred, self.classes))
                write_suspects(self.dir / "suspects.csv", self.cfg.data, y_true, y_pred, confidence, self.classes)
            self.write_pictures()

    def write_pictures(self):
        """What the net learnt and how it sees (report/): layers.md, filters.png, samples.png (the first train
        batch of epoch 0 as the model receives it), feature_maps.png and predictions.png (first test batches)."""
        cfg, model = self.cfg, self.tested_model()
        write_text(self.dir / "layers.md", layers_markdown(layer_table(model, cfg.res),
                                                           f"{cfg.net}, {len(self.classes)} classes, {cfg.res}px input"))
        plot_filters(model, self.dir / "filters.png")
        self.train_loader.set_epoch(0)
        images, labels = next(iter(self.train_loader))
        plot_samples(images, self.relabel(labels), self.classes, self.dir / "samples.png")
        images, y_true, y_pred, confidence = self.test_examples()
        plot_feature_maps(model, images[0].to(self.device), self.dir / "feature_maps.png")
        plot_predictions(images, y_true, y_pred, confidence, self.classes, self.dir / "predictions.png")

    def test_examples(self, each=8, max_batches=8):
        """Test images (copied to the CPU: loaders reuse their buffers) with labels, predictions and confidence,
        from the first test batches, until `each` right and `each` wrong ones are in or max_batches are read."""
        kept, hits, misses, model = [], 0, 0, self.tested_model()
        model.eval()
        with torch.no_grad(), self.autocast():
            for i, (images, labels) in enumerate(self.test_loader):
                labels = self.relabel(labels)
                conf, pred = model(images).float().softmax(1).max(1)
                kept.append((images.to("cpu", torch.float32, copy=True), labels.cpu(), pred.cpu(), conf.cpu()))
                right = int((pred == labels).sum())
                hits, misses = hits + right, misses + len(labels) - right
                if (hits >= each and misses >= each) or i + 1 == max_batches:
                    break
        model.train()
        images, y_true, y_pred, confidence = (torch.cat(part) for part in zip(*kept))
        return images, y_true.numpy(), y_pred.numpy(), confidence.numpy()


def summarize(run):
    """The figures a caller (bench, the study) compares runs by."""
    whole = [r for r in run.history if not r["partial"]]
    timed = whole[1:] or whole or run.history  # a process's first epoch pays start-up (compile, caches)
    last = run.history[-1] if run.history else {}
    median = lambda key: statistics.median(r[key] for r in timed) if timed else None  # noqa: E731
    return {
        "run_dir": str(run.dir), "epochs": run.epoch, "stopped": run.stopped, "amp": run.amp,
        "device": str(run.device), "images_per_sec": median("images_per_sec"),
        "data_stall_fraction": median("data_stall_fraction"), "train_acc": last.get("train_acc"),
        "test_acc": last.get("test_acc"), "test_acc_ci": last.get("test_acc_ci"),
        "macro_precision": last.get("macro_precision"), "macro_precision_ci": last.get("macro_precision_ci"),
        "final_loss": last.get("train_loss"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if run.device.type == "cuda" else None,
    }


# ----------------------------------------------------------------------------------------------- CLI

def parse(argv=None):
    return config_from(Config, add_options(Parser(description=__doc__.splitlines()[0]), Config).parse_args(argv))


def main(argv=None):
    summary = train(parse(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
        if summary["stopped"] == "signal":
            print(f"stopped by a signal; continue with: python train.py --resume {summary['run_dir']}",
                  file=sys.stderr)
    return 130 if summary["stopped"] == "signal" else 0


if __name__ == "__main__":
    run(main)
