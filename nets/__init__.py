"""The models fastpix trains, by name: `nets.build(name, num_classes, ...)`.

alexnet / flat / narrow are the 500px study's AlexNet family, trained from scratch; resnet18 is
torchvision's, for transfer learning from local ImageNet weights. `pretrained` (any net) takes every layer but
the head from local weights: ImageNet's for resnet18, or a fastpix run's checkpoint of the same net and any
class count (nets/transfer.py), a file or a checkpoint its caller has read already.
"""
from cli import UsageError

NETS = ("alexnet", "flat", "narrow", "resnet18")


def build(name, num_classes, *, strides=None, kernels=None, dropout=0.0, batchnorm=False, pretrained=None,
          freeze=False):
    """A freshly initialised nn.Module whose output is (N, num_classes) logits for any input resolution
    the conv stack does not shrink to nothing."""
    if name not in NETS:
        raise UsageError(f"unknown net {name!r}: choose one of {', '.join(NETS)}")
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    if name == "resnet18":
        if strides or kernels or dropout or batchnorm:
            raise UsageError("--strides, --kernels, --dropout and --batchnorm apply to the AlexNet family only")
        from nets.resnet import build_resnet18
        return build_resnet18(num_classes, pretrained=pretrained, freeze=freeze)
    if freeze:
        raise UsageError("--freeze applies to resnet18")
    from nets.alexnet import LAYOUTS, AlexNet
    model = AlexNet(LAYOUTS[name], num_classes, strides=strides, kernels=kernels, dropout=dropout,
                    batchnorm=batchnorm)
    if pretrained is not None:  # a fastpix run of this net, any class count: every layer but the head
        from nets.transfer import load_pretrained
        load_pretrained(model, pretrained, name)
    return model
