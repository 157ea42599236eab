"""Transfer learning: torchvision's ResNet-18 with local weights (ImageNet's, or a fastpix run's) and a new head
for our classes (nets/transfer.py loads them)."""
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from cli import UsageError
from nets.transfer import load_pretrained


def build_resnet18(num_classes, *, pretrained=None, freeze=False):
    """freeze: the backbone's batch norms become FrozenBatchNorm2d, so the frozen features normalise with
    the pretrained statistics instead of drifting with ours (same state-dict keys, minus the counters)."""
    model = resnet18(weights=None, num_classes=num_classes, norm_layer=FrozenBatchNorm2d if freeze else None)
    if pretrained is not None:
        load_pretrained(model, pretrained, "resnet18")
    elif freeze:
        raise UsageError("--freeze trains the head only, which needs --pretrained weights for the rest")
    if freeze:
        model.requires_grad_(False)
        model.fc.requires_grad_(True)  # the new head, trainable even when frozen
    return model
