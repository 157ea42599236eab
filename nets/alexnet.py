"""The AlexNet family of the 500px study: the original, a shallower one (flat) and a narrower one (narrow).

Strides and kernel sizes of every conv layer are parameters because the study tuned both. Adaptive
pooling before the classifier lets any input resolution reach the same fully connected head, so the
resolution is a data choice rather than a model choice. Dropout and batch norm exist but are off by
default to stay faithful to the study.
"""
from dataclasses import dataclass

import torch
from torch import nn

from cli import UsageError


@dataclass(frozen=True)
class Layout:
    """Conv widths, default kernels and strides, and which conv layers are followed by a max-pool."""
    widths: tuple
    kernels: tuple
    strides: tuple
    pool_after: tuple
    fc: int = 4096


LAYOUTS = {
    "alexnet": Layout(widths=(96, 256, 384, 384, 256), kernels=(11, 5, 3, 3, 3), strides=(4, 1, 1, 1, 1),
                      pool_after=(0, 1, 4)),
    # Two conv layers fewer than alexnet: the third layer feeds the last pool directly.
    "flat": Layout(widths=(96, 256, 384), kernels=(11, 5, 3), strides=(4, 1, 1), pool_after=(0, 1, 2)),
    # Half the feature maps of every conv layer; same depth and head as alexnet.
    "narrow": Layout(widths=(48, 128, 192, 192, 128), kernels=(11, 5, 3, 3, 3), strides=(4, 1, 1, 1, 1),
                     pool_after=(0, 1, 4)),
}
POOLED = 6  # AlexNet's 6x6 grid in front of the classifier, whatever the input resolution


class AlexNet(nn.Module):
    """conv (+BN) + ReLU layers with three 3x3/2 max-pools, adaptive pool to 6x6, FC-FC-classes."""

    def __init__(self, layout, num_classes, *, strides=None, kernels=None, dropout=0.0, batchnorm=False):
        super().__init__()
        strides = _per_layer("strides", strides, layout.strides)
        kernels = _per_layer("kernels", kernels, layout.kernels)
        layers, channels = [], 3
        for i, (width, k, s) in enumerate(zip(layout.widths, kernels, strides)):
            # (k - s) // 2 keeps AlexNet's 224 -> 55 for 11/4 and "same" padding for stride 1.
            layers.append(nn.Conv2d(channels, width, k, stride=s, padding=max(k - s, 0) // 2, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            if i in layout.pool_after:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(POOLED)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(channels * POOLED * POOLED, layout.fc), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(layout.fc, layout.fc), nn.ReLU(inplace=True),
            nn.Linear(layout.fc, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _per_layer(what, given, default):
    """One value per conv layer; a wrong count or a value < 1 is the user's to fix."""
    if given is None:
        return default
    given = tuple(int(v) for v in given)
    if len(given) != len(default) or min(given) < 1:
        raise UsageError(f"--{what} needs {len(default)} positive integers (one per conv layer), got {list(given)}")
    return given
