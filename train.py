"""Train an AlexNet-family CNN (or ResNet-18 transfer) on an ingested dataset: `python train.py --net flat`.
(Over 300 lines because the config, every flag declared once with its help, stays beside the loop it drives.)

One loop in plain sight (`Run.train_epoch`): batches from `loaders.make_loader` (already normalised, on the device),
autocast (bf16 / fp16 + scaler / off), a warm-up + cosine LR schedule stepped per iteration, per-iteration
loss kept on the device and read every `--log-every` steps, test metrics with bootstrap 95 % intervals
after every epoch, an atomic checkpoint every epoch (and on Ctrl-C / SIGTERM), DDP under torchrun. What the
loop calls lives in training/, one job a module (see training/__init__.py).

Everything a run produces lives in runs/<name>/: config.json, metrics.jsonl, last.pt, test_predictions.npz
(label, prediction, confidence per test sample), lr_find.json (with --find-lr or --lr auto) and the marker .fastpix-run; only
rank 0 writes. The command line then draws the run's plots and pictures from those files (`python -m report`,
report/render.py; --no-report skips it); train() called as a function draws nothing. A run writes only into a
folder it made (the marker says so) and deletes only its own files. config.json and every checkpoint record the
dataset's fingerprint, so --resume and --init-from notice other data.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import nets
from files import atomic_path, checksum_of, one_writer, write_json
from cli import (Parser, UsageError, add_options, check_options, config_from, ints, names, option, run,
                 seed_option)
from ingest import layout
from ingest.remote import is_url
from loaders import BACKENDS, make_loader
from loaders.common import AUGMENTS
from report.metrics import classification_metrics
from report.runlog import append_jsonl, check_resumed_metrics, metrics_digest, read_metrics, trim_metrics
from training.device import (AMP_MODES, DEVICES, all_ranks, autocast, gather_to_rank0, resolve_amp,
                             start_distributed)
from training.elastic import continue_after_restart, peer_lost, run_name
from training.evaluate import evaluate
from training.labels import merge_classes
from training.lr_find import MIN_SWEEP, find_lr
from training.recipe import (FAST_DEFAULT, LABEL_SMOOTHING, OPTIMIZERS, RECIPES,
                             check_recipe, lr_factor, make_ema, make_optimizer, onecycle_factor, train_res)
from training.resume import PER_PROCESS, EpochProgress, StopFlag, seed_everything
from training.runfolder import (CHECKPOINT, RUN_MARKER, check_ours, check_same_data,
                                check_same_run, config_from_resume, drop_torn_line, last_line,
                                load_weights, new_run_dir, own_temp_files, read_checkpoint, save_checkpoint,
                                tensor_bytes, writing)


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
    data: str = option(str(layout.DEFAULT_OUT), "ingested dataset folder (python ingest/build.py), or its URL "
                       "(s3://, gs://, https://, file://: fetched into --cache-dir first)")
    cache_dir: str = option("", "node-local cache of --data URLs (default ~/.cache/fastpix)")
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
    amp: str = option("auto", "autocast: bf16, fp16 (GPU, with a scaler), off, or auto (see training/device.py)",
                      choices=AMP_MODES)
    device: str = option("auto", "auto (cuda when present), cpu or cuda", choices=DEVICES)
    compile: bool = option(False, "torch.compile the model (slow start, faster steps on a GPU)")
    channels_last: bool = option(True, "NHWC convolutions, the layout the loaders produce")
    seed: int = seed_option("seed of weights, loader order and augmentation")
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
                         "for time to accuracy; see docs/training.md, Recipes)", choices=RECIPES)
    pieces: tuple | None = option(None, "with --recipe fast, the pieces to use (default: all of "
                                  f"{','.join(FAST_DEFAULT)})", parse=names)
    find_lr: bool = option(False, "LR range test first, on a copy (the run is unchanged): lr_find.json with the "
                           "suggested LR in the run folder (the report draws lr_find.png); --lr auto implies it")
    find_lr_steps: int = option(200, f"steps of the LR range test's exponential sweep (at least {MIN_SWEEP}: "
                                "fewer cannot show where the loss falls)", minimum=MIN_SWEEP)
    merge: tuple = option((), "train classes A and B as one class named A+B (repeatable; labels remapped on the "
                          "device; write a '+' inside a class name as '\\+')", metavar="A+B", repeat=True)


def check(cfg):
    """Every impossible option as one UsageError line, before anything expensive starts; and the config settled
    as config.json records it (the recipe's pieces resolved, --data absolute so that a resume from another
    directory finds it), so that a caller's copy (the study's cache key) compares equal with the saved one."""
    check_options(cfg)
    check_recipe(cfg)
    cfg.data = cfg.data if is_url(cfg.data) else os.path.abspath(cfg.data)
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


# ----------------------------------------------------------------------------------------------- Setup

def make_model(cfg, num_classes, device, resumed=None):
    """The net; a resumed transfer run takes its pretrained layers from its own checkpoint (`resumed`, read and
    checked once), which holds every weight, so it resumes after the --pretrained file has moved."""
    pretrained = (resumed if cfg.resume else cfg.pretrained) if cfg.pretrained else None
    model = nets.build(cfg.net, num_classes, strides=cfg.strides, kernels=cfg.kernels, dropout=cfg.dropout,
                       batchnorm=cfg.batchnorm, pretrained=pretrained, freeze=cfg.freeze)
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


# ----------------------------------------------------------------------------------------------- Training

def train(cfg):
    """Run training as configured; returns the summary dict (see `summarize`; rank 0's view under DDP). The run
    folder is held by this run (rank 0) from before its first read to after its last write."""
    writer = int(os.environ.get("RANK", "0")) == 0
    if cfg.resume:
        if not Path(cfg.resume).is_dir():
            raise UsageError(f"--resume {cfg.resume}: no config.json there, so no run to continue")
        folder = Path(cfg.resume)
    else:
        check(cfg)
        cfg.name = run_name(cfg)
        folder = Path(cfg.runs_dir) / cfg.name
        check_ours(folder)  # before holding it: the holder's note goes into folders of ours only
    # One writer: a second train.py on this folder (the same --name, --resume while this runs) is refused in one
    # line naming this process; the kernel drops the hold when the process dies, even by kill -9.
    with one_writer(folder) if writer else contextlib.nullcontext():
        if cfg.resume:
            cfg = config_from_resume(cfg)
            check(cfg)
        rank, world, device = start_distributed(cfg.device)
        try:
            cfg = continue_after_restart(cfg, rank, world, device)
            check(cfg)
            if writer and not cfg.resume:
                new_run_dir(folder)
            run = Run(cfg, rank, world, device)
            with StopFlag() as stop, peer_lost(rank, world, folder, lambda: run.epoch + 1):
                while run.epoch < cfg.epochs and run.stopped is None:
                    run.train_epoch(stop)
            if run.writer:
                with run.writing("the run marker"):
                    write_json(run.dir / RUN_MARKER, {"finished": run.stopped is None})
            return summarize(run.dir, run.history, run.epoch, run.stopped, run.amp, run.device)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class Step(NamedTuple):
    """A trained step waiting for the next log (its loss still on the device)."""
    step: int
    loss: torch.Tensor
    lr: float
    wait: float  # seconds waited for the batch
    images: int


def summarize(run_dir, history, epochs, stopped, amp, device):
    """The figures a caller (bench, the study) compares runs by, from the run's epoch records (`history`)."""
    whole = [r for r in history if not r["partial"]]
    timed = whole[1:] or whole or history  # a process's first epoch pays start-up (compile, caches)
    last = history[-1] if history else {}
    median = lambda key: statistics.median(r[key] for r in timed) if timed else None  # noqa: E731
    return {
        "run_dir": str(run_dir), "epochs": epochs, "stopped": stopped, "amp": amp, "device": str(device),
        "images_per_sec": median("images_per_sec"), "data_stall_fraction": median("data_stall_fraction"),
        "train_acc": last.get("train_acc"), "test_acc": last.get("test_acc"), "test_acc_ci": last.get("test_acc_ci"),
        "macro_precision": last.get("macro_precision"), "macro_precision_ci": last.get("macro_precision_ci"),
        "final_loss": last.get("train_loss"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


class Run:
    """One training run: model, optimizer, schedule, loaders and run folder, set up (or restored) at once;
    `train_epoch` is the loop."""

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.writer = rank == 0
        self.amp = resolve_amp(cfg.amp, device)
        self.dir = Path(cfg.runs_dir) / cfg.name  # checked (and held) by train()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        loader_args = dict(batch_size=cfg.batch_size, res=cfg.res, device=str(device), seed=cfg.seed, rank=rank,
                           world=world, workers=cfg.workers, augment=cfg.augment,  # test: ignored
                           cache_dir=cfg.cache_dir or None)
        self.train_loader = make_loader(cfg.loader, cfg.data, "train", **loader_args)
        self.test_loader = make_loader(cfg.loader, cfg.data, "test", **loader_args)
        manifest = self.train_loader.block.manifest  # the one the loaders checked the data against
        self.classes, label_map = merge_classes(self.train_loader.classes, cfg.merge)
        self.fingerprint = manifest["fingerprint"]
        # --merge: labels are remapped on the device, by indexing (no sync, no re-ingest).
        self.label_map = torch.tensor(label_map, device=device) if cfg.merge else None

        resumed = self.read_resumed(manifest) if cfg.resume else None
        seed_everything(cfg.seed)
        self.model = make_model(cfg, len(self.classes), device, resumed)
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

        lr, sweep = self.resolve_lr(loader_args)
        self.optimizer = make_optimizer(cfg, self.model.parameters(), lr)
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

        self.epoch = self.global_step = 0
        self.progress = EpochProgress()
        self.history, self.stopped, self.saved_step = [], None, None
        if self.writer and self.dir.is_dir():
            for path in own_temp_files(self.dir):  # left by a write that was killed
                path.unlink()
        self.weights = [(name.removesuffix(".weight"), p) for name, p in self.model.named_parameters()
                        if p.requires_grad and p.ndim > 1]  # conv and linear weights: the layers grad_norms logs
        if cfg.resume:
            self.restore(resumed)
        elif self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self.writing("config.json"):
                write_json(self.dir / RUN_MARKER, {"finished": False})
                write_json(self.dir / "config.json", {
                    "config": asdict(cfg), "amp": self.amp, "device": str(device), "world": world,
                    "process_group": dist.get_backend() if dist.is_initialized() else None,
                    "classes": self.classes, "data_fingerprint": self.fingerprint,
                    "steps_per_epoch": self.steps_per_epoch, "lr": lr, "torch": torch.__version__,
                    **({"lr_find_sha256": checksum_of(sweep)} if sweep else {})})
                if sweep:  # python -m report draws lr_find.png from it
                    write_json(self.dir / "lr_find.json", sweep)

    def writing(self, what, need=None):
        """runfolder.writing for this run: what a full disk keeps is its last checkpoint."""
        return writing(self.dir, what, self.saved_step, need)

    def tested_model(self):
        """The weights the test metrics describe: the EMA's when the recipe keeps one."""
        return self.model if self.ema is None else self.ema.module

    def relabel(self, labels):
        return labels if self.label_map is None else self.label_map[labels]

    def resolve_lr(self, loader_args):
        """(the peak LR, the range test's sweep or None): --lr, or (--lr auto) the range test's suggestion, found
        once and kept in config.json."""
        cfg, sweep = self.cfg, None
        if cfg.resume:
            return json.loads((self.dir / "config.json").read_text()).get("lr", cfg.lr), None
        if cfg.find_lr or cfg.lr == "auto":
            sweep = find_lr(cfg, self.model, loader_args, self.amp, self.relabel)
        return (sweep["suggested_lr"] if cfg.lr == "auto" else cfg.lr), sweep

    def autocast(self):
        return autocast(self.device, self.amp)

    def read_resumed(self, manifest):
        """The run's checkpoint, read once and checked (its digest, that it is this run's, on this data, with
        as many processes), before anything is built from it."""
        ckpt = read_checkpoint("--resume", self.dir / CHECKPOINT)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "rng", "global_step"} <= ckpt.keys():
            raise UsageError(f"--resume {self.dir}: {CHECKPOINT} is not a fastpix training checkpoint")
        # first: another run's last.pt says so
        check_same_run(f"--resume {self.dir}", asdict(self.cfg), ckpt.get("config") or {})
        check_same_data("--resume", self.dir, ckpt, manifest, self.cfg)
        if len(ckpt["rng"]) != self.world:
            raise UsageError(f"{self.dir} ran on {len(ckpt['rng'])} processes: resume it with as many, not "
                             f"{self.world}")
        return ckpt

    def restore(self, ckpt):
        """Continue exactly where the checkpoint (read_resumed's) left off."""
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None:
                self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise UsageError(f"--resume {self.dir}: {CHECKPOINT} does not fit the run's config.json "
                             f"({last_line(err)}): config.json was edited or {CHECKPOINT} is another run's; put "
                             "back the run's own file") from None
        self.epoch, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.progress.load_state_dict({"step_in_epoch": ckpt["step_in_epoch"],
                                       **{key: ckpt[key][self.rank] for key in PER_PROCESS}})
        self.saved_step = self.global_step
        if self.writer:
            drop_torn_line(self.dir / "metrics.jsonl")
            with self.writing("metrics.jsonl"):
                trim_metrics(self.dir, self.global_step, self.epoch)
            check_resumed_metrics(self.dir, ckpt.get("metrics_sha256"))
            self.history = read_metrics(self.dir)[1]  # the summary describes the whole run, not this process

    def checkpoint(self):
        """Model, optimizer, schedule and where every rank is (`EpochProgress`: each rank continues its own RNG
        streams), written by rank 0."""
        states = gather_to_rank0(self.progress.state_dict(), self.world)
        if self.writer:
            state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), epoch=self.epoch,
                         step_in_epoch=states[0]["step_in_epoch"], global_step=self.global_step,
                         **{key: [s[key] for s in states] for key in PER_PROCESS},
                         ema=self.ema.state_dict() if self.ema is not None else None, config=asdict(self.cfg),
                         classes=self.classes, data_fingerprint=self.fingerprint,
                         metrics_sha256=metrics_digest(self.dir))
            with self.writing(CHECKPOINT, need=tensor_bytes(state) + 2**20):  # + the zip's headers
                save_checkpoint(self.dir / CHECKPOINT, **state)
            self.saved_step = self.global_step

    def train_epoch(self, stop):
        """One epoch (or the rest of one): batch, forward, loss, backward, step, log; then test metrics and a
        checkpoint. A stop request or --max-steps ends it early, with a mid-epoch checkpoint."""
        self.train_loader.set_epoch(self.epoch)
        if self.cfg.pieces:
            self.train_loader.set_res(train_res(self.cfg, self.epoch))
        batches = self.progress.batches(self.train_loader, self.device)
        pending, data_wait = [], 0.0
        bar = tqdm(total=self.steps_per_epoch, initial=self.progress.step, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.writer)
        t_epoch = t_window = time.perf_counter()
        while self.progress.step < self.steps_per_epoch:
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
            self.progress.add(loss, logits, labels)
            pending.append(Step(self.global_step, loss, lr, wait, len(labels)))
            self.global_step += 1
            bar.update()
            # The log every --log-every steps, at the epoch's end, at --max-steps and on a stop request (one
            # process: the flag is seen at once); then whether to stop, which costs a sync under DDP.
            if (len(pending) == self.cfg.log_every or self.progress.step == self.steps_per_epoch
                    or self.out_of_steps() or (self.world == 1 and stop.signal)):
                t_window = self.log_steps(pending, bar, self.grad_norms(), t_window)
                pending.clear()
                self.stopped = self.stop_reason(stop)
                if self.stopped is not None:
                    break
        bar.close()
        if self.progress.step < self.steps_per_epoch:  # stopped mid-epoch
            self.checkpoint()
        else:
            self.end_epoch(images.shape[-1], data_wait, t_epoch)

    def out_of_steps(self):
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def stop_reason(self, stop):
        """The one place a run decides to stop before its last epoch: "signal" (a stop request on any rank: every
        rank must call this at the same steps) or "max_steps"; None: go on."""
        if all_ranks(self.world, self.device, stop.signal is not None, "max"):
            return "signal"
        return "max_steps" if self.out_of_steps() else None

    def end_epoch(self, res, data_wait, t_epoch):
        """The epoch's record (over all ranks) with its test metrics, and the end-of-epoch checkpoint."""
        world, device, progress = self.world, self.device, self.progress
        if device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's time must include its queued GPU work
        epoch_s = time.perf_counter() - t_epoch
        fresh = int(all_ranks(world, device, progress.seen - progress.seen_before, "sum"))  # trained on here
        seen = int(all_ranks(world, device, progress.seen, "sum"))
        steps = self.steps_per_epoch * world
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step,
                  "train_loss": all_ranks(world, device, progress.loss_sum.item(), "sum") / steps,
                  "train_acc": all_ranks(world, device, progress.correct.item(), "sum") / seen,
                  "images_per_sec": fresh / epoch_s, "data_stall_fraction": data_wait / epoch_s,
                  "epoch_s": epoch_s, "train_samples": seen, "partial": progress.first > 0, "res": res}
        self.test_epoch(record)
        self.epoch += 1
        progress.next_epoch()
        self.checkpoint()

    def grad_norms(self):
        """The gradient norm of every conv and linear layer's weights, on the device, stacked so that
        `log_steps` reads them in the loss's own transfer (no extra sync). Taken after the optimizer step:
        GradScaler has unscaled the gradients by then."""
        grads = [p.grad if p.grad is not None else p.new_zeros(()) for _, p in self.weights]
        return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])

    def log_steps(self, pending, bar, norms, since):
        """The one device sync of the step loop: every pending step's loss and the last step's per-layer
        gradient norms in one transfer, to the log; images/s over the window that began at `since`. Returns the
        window's end."""
        read = torch.cat([torch.stack([p.loss for p in pending]).float(), norms]).cpu().tolist()
        losses, norms = read[:len(pending)], dict(zip((name for name, _ in self.weights), read[len(pending):]))
        now = time.perf_counter()
        ips = sum(p.images for p in pending) * self.world / (now - since)
        if self.writer:
            records = [{"kind": "step", "epoch": self.epoch, "step": p.step, "loss": loss, "lr": p.lr,
                        "images_per_sec": ips, "data_wait_s": p.wait} for p, loss in zip(pending, losses)]
            records[-1]["grad_norms"] = norms
            with self.writing("metrics.jsonl"):
                append_jsonl(self.dir / "metrics.jsonl", records)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{ips:.0f}")
        if not all(math.isfinite(v) for v in losses):
            kept = f"the last good checkpoint is {self.dir / CHECKPOINT}" if (self.dir / CHECKPOINT).exists() \
                else "no checkpoint was written yet"
            raise UsageError(f"loss became non-finite at step {self.global_step} (epoch {self.epoch + 1}): lower "
                             f"--lr or try --amp off; {kept}")
        return now

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


# ----------------------------------------------------------------------------------------------- CLI

@dataclass
class Command:
    """The options of train.py's command line that are not the run's (so not in config.json)."""
    no_report: bool = option(False, "skip drawing the run's plots and pictures at the end (python -m report "
                             "RUN_DIR draws them later)")


def parse_args(argv=None):
    parser = add_options(add_options(Parser(description=__doc__.splitlines()[0]), Config), Command)
    return parser.parse_args(argv)


def parse(argv=None):
    return config_from(Config, parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    summary = train(config_from(Config, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, default=str))
        if summary["stopped"] == "signal":
            print(f"stopped by a signal; continue with: python train.py --resume {summary['run_dir']}",
                  file=sys.stderr)
        if not config_from(Command, args).no_report:
            from report.render import render  # here: importing train loads no plotting (matplotlib's backend)
            try:
                render(summary["run_dir"], device=args.device)
            except UsageError as err:  # the run is whole: a report that fails costs its pictures, not the run
                print(f"warning: the run is whole, but its report was not drawn: {err}; draw it with: "
                      f"python -m report {summary['run_dir']}", file=sys.stderr)
    return 130 if summary["stopped"] == "signal" else 0


if __name__ == "__main__":
    run(main)
