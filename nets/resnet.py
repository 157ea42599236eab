"""Transfer learning: torchvision's ResNet-18 with local ImageNet weights and a new head for our classes.

Nothing is downloaded: the weights come from a state-dict file the user already has, and any problem
with it (missing, unreadable, wrong architecture) is one UsageError line.
"""
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from cli import UsageError


def build_resnet18(num_classes, *, pretrained=None, freeze=False):
    """freeze: the backbone's batch norms become FrozenBatchNorm2d, so the frozen features normalise with
    the pretrained statistics instead of drifting with ours (same state-dict keys, minus the counters)."""
    # The 1000-class ImageNet head first, so an ImageNet state dict loads strictly.
    model = resnet18(weights=None, norm_layer=FrozenBatchNorm2d if freeze else None)
    if pretrained is not None:
        model.load_state_dict(_read_state_dict(pretrained, model))
    elif freeze:
        raise UsageError("--freeze trains the head only, which needs --pretrained weights for the rest")
    if freeze:
        model.requires_grad_(False)
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # new, trainable even when frozen
    return model


def _read_state_dict(path, model):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--pretrained {path}: no such file (fastpix never downloads weights; save them there first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user mistake
        raise UsageError(f"--pretrained {path} is not a readable torch state dict ({type(err).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint that wraps the state dict
    expected = model.state_dict()
    counters = lambda keys: {k for k in keys if not k.endswith("num_batches_tracked")}  # noqa: E731
    if not isinstance(state, dict) or counters(state) != counters(expected):
        raise UsageError(f"--pretrained {path} does not hold torchvision resnet18 weights (different keys)")
    wrong = [k for k in counters(state) if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    if wrong:
        raise UsageError(f"--pretrained {path} does not match resnet18: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
    return state
