"""Transfer learning from local weights (nothing is downloaded): a fastpix run's checkpoint of the same net with
any class count, or a bare state dict such as torchvision's ImageNet resnet18. Every layer but the head (the
net's last Linear) is copied; the head stays freshly initialised for our classes. Any problem with the file
(missing, unreadable, another net, other shapes) is one UsageError line."""
from pathlib import Path

import torch
from torch import nn

from cli import UsageError

WHAT = {"resnet18": "torchvision resnet18"}  # how a net's weights are named in messages


def head_name(model):
    """The module name of the classifier's last Linear layer: the one transfer replaces."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def load_pretrained(model, source, net):
    """Copy every weight but the head's from `source` into `model` (a `nets.build(net, ...)` model): a file, or
    what a caller has read and checked already (a resumed run's own checkpoint: read once, by train.py)."""
    if isinstance(source, dict):
        state, named = source, "the run's own checkpoint"
    else:
        state, named = read_state(Path(source)), f"--pretrained {source}"
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a fastpix checkpoint
        trained = (state.get("config") or {}).get("net", net)
        if trained != net:
            raise UsageError(f"{named} holds a {trained} run: fine-tune it with --net {trained}")
        state = state["model"]
    head = head_name(model) + "."
    body = lambda keys: {k for k in keys if not k.startswith(head) and not k.endswith("num_batches_tracked")}  # noqa: E731
    expected = model.state_dict()
    if not isinstance(state, dict) or body(state) != body(expected):
        raise UsageError(f"{named} does not hold {WHAT.get(net, net)} weights (different keys)")
    wrong = [k for k in body(state) if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    if wrong:
        raise UsageError(f"{named} does not match this {net}: {wrong[0]} has shape "
                         f"{tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)}, strict=False)


def read_state(path):
    """--pretrained's file as torch reads it; one line when it is missing or unreadable, or when it is a fastpix
    checkpoint whose content no longer matches its digest (checked as --resume checks it)."""
    from training.runfolder import check_digest

    if not path.is_file():
        raise UsageError(f"--pretrained {path}: no such file (fastpix never downloads weights; save them there first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user mistake
        raise UsageError(f"--pretrained {path} is not a readable torch state dict ({type(err).__name__})") from None
    return check_digest(state, f"--pretrained {path}")
