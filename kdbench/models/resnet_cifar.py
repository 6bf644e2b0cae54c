"""ResNets for 32x32 images (He et al. 2016), as in the CRD / RepDistiller benchmark.

- ``resnet8`` ... ``resnet110``: basic blocks, a 3x3 stem of 16 channels and three groups of
  (depth - 2) / 6 blocks with 16, 32, 64 channels;
- ``resnet8x4``, ``resnet32x4``: the same with a 32-channel stem and 64, 128, 256 channels;
- ``resnet50``: bottleneck blocks [3, 4, 6, 3] with 64..512 channels (x4 expansion) behind a
  3x3 stem without max pooling.

The blocks and the :class:`ResNet` body are shared with :mod:`kdbench.models.resnet_imagenet`,
whose module names match torchvision's (``conv1``, ``layer1.0.bn2``, ``fc``...), so its state
dicts load here. Every block ends in ``preact`` (an ``nn.Identity`` on the residual sum) and
``relu``: tap ``layerN.i.preact`` for pre-activation features, ``layerN`` for the group output.
"""

from __future__ import annotations

from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model
from kdbench.models._image import global_pool, image_channels, init_weights


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the shortcut, -> ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)
        self.preact = nn.Identity()  # the sum before the last ReLU, tap-able by path
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.preact(out + shortcut))


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv (with the stride) -> 1x1 conv to 4x the width, plus the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.preact(out + shortcut))


class ResNet(nn.Module):
    """stem -> groups ``layer1``.. (the first at stride 1, the others at stride 2) -> global
    average pool (``pool``, the embedding) -> ``fc``.

    ``imagenet_stem``: a 7x7 stride-2 convolution and a 3x3 stride-2 max pool (ImageNet),
    otherwise one 3x3 stride-1 convolution (CIFAR).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: list[int],
        widths: list[int],
        stem_width: int,
        num_classes: int,
        in_channels: int = 3,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        in_planes = stem_width
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_planes, width, stride))
                in_planes = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_groups = len(depths)
        self.pool = global_pool()
        self.fc = nn.Linear(in_planes, num_classes)
        self.default_taps = {
            "stages": [f"layer{i + 1}" for i in range(len(depths))],
            "hint": "layer2",
            "embedding": "pool",
        }
        init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_groups):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.pool(x))


def cifar_resnet(
    arch: str, depth: int, num_classes: int, input_shape: tuple[int, ...], width_factor: int = 1
) -> ResNet:
    """A basic-block CIFAR ResNet of ``depth`` layers (6n + 2), widths x ``width_factor``."""
    if depth < 8 or (depth - 2) % 6:
        raise KdbenchError(f"{arch}: depth must be 6n + 2 with n >= 1 (8, 14, 20...), got {depth}")
    n = (depth - 2) // 6
    stem = 16 if width_factor == 1 else 32  # RepDistiller's resnet8x4 / resnet32x4 stem is 32
    widths = [16 * width_factor, 32 * width_factor, 64 * width_factor]
    channels = image_channels(arch, input_shape)
    return ResNet(BasicBlock, [n, n, n], widths, stem, num_classes, channels)


def _register_depth(depth: int, width_factor: int = 1) -> None:
    name = f"resnet{depth}" + (f"x{width_factor}" if width_factor > 1 else "")

    @register_model(name)
    def build(num_classes: int, input_shape: tuple[int, ...]) -> ResNet:
        return cifar_resnet(name, depth, num_classes, input_shape, width_factor)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}" + (f"x{width_factor}." if width_factor > 1 else ".")


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_depth(_depth)
_register_depth(8, 4)
_register_depth(32, 4)


@register_model("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...]) -> ResNet:
    """CIFAR ResNet-50: bottlenecks [3, 4, 6, 3], 3x3 stem without max pool (23.71M at 100)."""
    channels = image_channels("resnet50", input_shape)
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes, channels)
