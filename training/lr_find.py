"""Smith's LR range test (--find-lr, --lr auto), run on copies so that the run itself stays bit-identical."""
import copy
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from loaders import make_loader
from training.device import all_ranks, autocast
from training.recipe import make_optimizer
from training.resume import rng_state, set_rng_state

MIN_SWEEP = 5  # --find-lr-steps: fewer points cannot show a falling loss (1 step "suggests" the start LR / 10)


def find_lr(cfg, model, loader_args, amp, relabel, start=1e-7, end=10.0, beta=0.98):
    """Smith's LR range test: train a copy of the model with its own optimizer and its own train loader while
    the LR grows exponentially from `start` to `end` over --find-lr-steps steps, stopping once the smoothed loss
    exceeds 4x its minimum. The RNG state is restored afterwards, so the run itself is untouched: same weights,
    same batches, bit for bit. Suggests the LR of the lowest smoothed loss / 10 (where it still falls steeply).
    Rank 0's suggestion is every rank's. `model` is copied and the loader made from `loader_args` (make_loader's,
    naming this process's rank, world and device); `amp` is resolved (training.device.resolve_amp); `relabel`
    maps the loader's labels to the run's (--merge). Returns what lr_find.json holds."""
    saved, world, device = rng_state(), loader_args["world"], torch.device(loader_args["device"])
    writer = loader_args["rank"] == 0
    model = copy.deepcopy(model)
    optimizer = make_optimizer(cfg, model.parameters(), start)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    loader = make_loader(cfg.loader, cfg.data, "train", **loader_args)
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
        with autocast(device, amp):
            loss = F.cross_entropy(model(images), relabel(labels))
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
    lowest = min(finite, key=smooth.__getitem__) if finite else 0
    suggested = lrs[lowest] / 10 if finite else start
    if lowest == 0 and writer:  # the loss never fell below its first step's: the suggestion is the floor
        print(f"LR range test: over {len(losses)} steps the loss never fell below its first step's, so its "
              f"suggestion ({suggested:.1g}) is the sweep's floor, not a measured LR: raise --find-lr-steps, or "
              "give --lr", file=sys.stderr)
    suggested = all_ranks(world, device, suggested if writer else 0.0, "sum")
    return {"suggested_lr": suggested, "rule": "lowest smoothed loss / 10", "lr": lrs, "loss": losses,
            "smoothed": smooth}


def lr_sweep_smoothed(losses, beta):
    """Exponential moving average of the sweep's losses with bias correction (fastai's LR finder smoothing)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out
