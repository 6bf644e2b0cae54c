"""MobileNetV2 for 32x32 images (Sandler et al. 2018), the CIFAR variant of the CRD /
RepDistiller benchmark: a stride-2 3x3 stem, seven groups of inverted residual blocks (1x1
expansion -> ReLU -> 3x3 depthwise -> ReLU -> linear 1x1 projection; ReLU, not ReLU6; the
expansion convolution is kept even when the expansion ratio is 1), a 1x1 convolution to 1280
channels, global average pooling and one linear layer. The benchmark's "MobileNetV2" is this
network at width multiplier 0.5 (0.81M parameters at 100 classes).

Blocks end in the linear projection (no ReLU), so the stage taps are linear bottlenecks:
``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` (RepDistiller's features 1..4, at
16, 8, 4 and 2 pixels for 32x32 inputs); the hint is ``blocks.2``.
"""

from __future__ import annotations

import math

from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model
from kdbench.models._image import global_pool, image_channels, init_weights

# expansion ratio (None: the model's), output channels, blocks, stride of the first block
SETTINGS = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1):
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *_conv_bn_relu(c_in, hidden, 1, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """``conv1`` -> ``blocks.0``..``blocks.6`` -> ``conv2`` -> ``pool`` -> ``classifier``."""

    default_taps = {
        "stages": ["blocks.1", "blocks.2", "blocks.4", "blocks.6"],
        "hint": "blocks.2",
        "embedding": "pool",
    }

    def __init__(
        self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expand_ratio: int = 6
    ) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_channels, c_in, 3, 2))
        groups = []
        for ratio, channels, n, stride in SETTINGS:
            c_out = int(channels * width_mult)
            blocks = []
            for j in range(n):
                blocks.append(
                    InvertedResidual(c_in, c_out, stride if j == 0 else 1, ratio or expand_ratio)
                )
                c_in = c_out
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*groups)
        last = int(math.ceil(1280 * width_mult / 8) * 8) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(c_in, last, 1, 1))
        self.pool = global_pool()
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x):
        return self.classifier(self.pool(self.conv2(self.blocks(self.conv1(x)))))


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: int,
    input_shape: tuple[int, ...],
    width_mult: float = 0.5,
    expand_ratio: int = 6,
) -> MobileNetV2:
    """CIFAR MobileNetV2; width_mult 0.5 is the benchmark's student (0.81M at 100 classes)."""
    channels = image_channels("mobilenetv2", input_shape)
    if not width_mult > 0 or int(16 * width_mult) < 1:
        raise KdbenchError(
            f"mobilenetv2: width_mult={width_mult} leaves no channels; use 0.0625 or more"
        )
    return MobileNetV2(num_classes, channels, float(width_mult), int(expand_ratio))
