"""How a run learns: the optimizer, the LR schedules, and the fast recipe's pieces (--recipe fast), each a
small function of the config, so the study's recipe and the fast one differ only where RECIPE_PIECES say."""
import math

import torch

from cli import UsageError

OPTIMIZERS = ("sgd", "adam", "rmsprop")
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
# The pieces --recipe fast uses unless --pieces says otherwise: those that paid in bench.tta's ablation on the demo
# data (docs/bench.md, Time to accuracy). flip_tta bought no accuracy there and costs an extra forward per test image.
FAST_DEFAULT = tuple(p for p in RECIPE_PIECES if p != "flip_tta")
LABEL_SMOOTHING = 0.1
ONECYCLE_PEAK = 0.15
EMA_DECAY = 0.9
FIXRES = 1.15
PROGRESSIVE_START = 0.625  # the first epoch's share of the top res (FFCV: 160 of 256)
PROGRESSIVE_RAMP = 0.75  # the top res is reached at this share of the epochs
RES_STEP = 16  # scheduled resolutions are multiples of it


def check_recipe(cfg):
    """Resolve the pieces of the recipe in place (so config.json records them) or say what is wrong."""
    if cfg.recipe == "study":
        if cfg.pieces:
            raise UsageError("--pieces choose among the fast recipe's pieces: add --recipe fast")
        cfg.pieces = ()
        return
    cfg.pieces = FAST_DEFAULT if cfg.pieces is None else tuple(cfg.pieces)
    if not cfg.pieces:  # it would train the study recipe while config.json says fast
        raise UsageError("--recipe fast with no --pieces is the study recipe: name the pieces to use, drop --pieces "
                         "for the fast default, or use --recipe study")
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


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine decay to 0 at total_steps; a pure function of the step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def make_optimizer(cfg, params, lr):
    """fused=True: one kernel over all parameters, 4-7x faster than the default for our 60-75M-parameter
    AlexNets on the CPU (measured); RMSprop has no fused version."""
    params = decay_groups(params) if "no_bn_decay" in cfg.pieces else [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.RMSprop(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_ema(model):
    """An EMA of the weights and the batch-norm statistics, updated after every step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
