"""VGG with batch normalisation for 32x32 images (Simonyan & Zisserman 2015), the CIFAR
variant of the CRD / RepDistiller benchmark: five blocks of 3x3 convolutions (with bias) ->
BN -> ReLU, 2x2 max pooling between the first four, global average pooling and one linear
layer (no 4096-wide fully connected layers). ``vgg8`` has one convolution per block.

Each block ``blockN`` ends in its ReLU, so the stage taps are post-activation; stages are
``block1``..``block4`` (RepDistiller's features 1..4) and the hint is ``block2``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kdbench.models import register_model
from kdbench.models._image import global_pool, image_channels, init_weights

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(in_channels: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``block0`` -> pool -> ``block1`` -> pool -> ``block2`` -> pool -> ``block3``
    (-> pool when the input is 64 pixels high or more) -> ``block4`` -> ``pool`` ->
    ``classifier``."""

    default_taps = {
        "stages": ["block1", "block2", "block3", "block4"],
        "hint": "block2",
        "embedding": "pool",
    }

    def __init__(self, config: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        for i, widths in enumerate(config):
            setattr(self, f"block{i}", _block(in_channels, widths))
            in_channels = widths[-1]
        self.pool = global_pool()
        self.classifier = nn.Linear(in_channels, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x):
        height = x.shape[-2]
        x = F.max_pool2d(self.block0(x), 2)
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = self.block3(x)
        if height >= 64:
            x = F.max_pool2d(x, 2)
        return self.classifier(self.pool(self.block4(x)))


def _register(name: str) -> None:
    @register_model(name)
    def build(num_classes: int, input_shape: tuple[int, ...]) -> VGG:
        return VGG(CONFIGS[name], num_classes, image_channels(name, input_shape))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name.upper()} with batch normalisation, CIFAR variant."


for _name in CONFIGS:
    _register(_name)
