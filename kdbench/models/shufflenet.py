"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) for 32x32 images, the CIFAR
variants of the CRD / RepDistiller benchmark (``shufflev1``: 3 groups, 240-480-960 channels,
949,258 parameters at 100 classes; ``shufflev2``: net size 1, a 1x1 stem to 24 channels,
116-232-464 channels and a 1x1 convolution to 1024, 1,355,528), module for module and parameter
for parameter the networks of RepDistiller's ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py``
(only the names of a few modules differ: :mod:`kdbench.checkpoints` maps them).

Three stages ``layer1``..``layer3``, each halving the resolution (16, 8, 4 pixels for 32x32
inputs); their outputs are post-ReLU. The hint is ``layer2``, the embedding ``pool``.
Residual blocks put ``preact`` (an ``nn.Identity``) on the tensor before their last ReLU
(the sum or concatenation), so ``layer2.3.preact`` taps pre-activation features.
"""

from __future__ import annotations

import torch
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model
from kdbench.models._image import global_pool, image_channels


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------- V1


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> channel shuffle -> 3x3 depthwise (with the stride) -> grouped 1x1,
    added to the input (stride 1) or concatenated with its 3x3 average pool (stride 2)."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, group_first: bool
    ) -> None:
        super().__init__()
        self.stride = stride
        branch = out_planes - in_planes if stride == 2 else out_planes
        mid = branch // 4
        self.groups1 = groups if group_first else 1  # not on the narrow stem output
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        out = channel_shuffle(self.relu1(self.bn1(self.conv1(x))), self.groups1)
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        pre = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return self.relu(self.preact(pre))


V1_WIDTHS = {1: [144, 288, 576], 2: [200, 400, 800], 3: [240, 480, 960]}  # by number of groups


class ShuffleNetV1(nn.Module):
    """1x1 stem to 24 channels -> ``layer1``..``layer3`` -> ``pool`` -> ``fc``."""

    default_taps = {"stages": ["layer1", "layer2", "layer3"], "hint": "layer2", "embedding": "pool"}

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        groups: int = 3,
        depths: tuple[int, ...] = (4, 8, 4),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        in_planes = 24
        for i, (width, depth) in enumerate(zip(V1_WIDTHS[groups], depths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if j == 0 else 1
                blocks.append(ShuffleV1Block(in_planes, width, stride, groups, i + j > 0))
                in_planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = global_pool()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


@register_model("shufflev1")
def shufflev1(num_classes: int, input_shape: tuple[int, ...], groups: int = 3) -> ShuffleNetV1:
    """CIFAR ShuffleNetV1 (groups 3: 949,258 parameters at 100 classes)."""
    channels = image_channels("shufflev1", input_shape)
    if groups not in V1_WIDTHS:
        raise KdbenchError(f"shufflev1: groups={groups} is invalid: use one of {list(V1_WIDTHS)}")
    return ShuffleNetV1(num_classes, channels, groups)


# ---------------------------------------------------------------------------------- V2


class ShuffleV2Block(nn.Module):
    """Split the channels in half; 1x1 -> 3x3 depthwise -> 1x1 on the second half; concatenate
    with the first half; ReLU; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        c = channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))
        out = self.bn3(self.conv3(out))
        # x1 is a block output, already >= 0: the ReLU of the concatenation acts on the branch
        return channel_shuffle(self.relu(self.preact(torch.cat([x1, out], 1))), 2)


class ShuffleV2Down(nn.Module):
    """Two stride-2 branches, each to half the output channels, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left: 3x3 depthwise (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right: 1x1 -> 3x3 depthwise (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, out_channels - mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(out_channels - mid)
        self.relu5 = nn.ReLU()

    def forward(self, x):
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


V2_WIDTHS = {
    0.5: [48, 96, 192, 1024],
    1: [116, 232, 464, 1024],
    1.5: [176, 352, 704, 1024],
    2: [224, 488, 976, 2048],
}


class ShuffleNetV2(nn.Module):
    """1x1 stem to 24 channels (as the reference's CIFAR variant, not the ImageNet 3x3 stride-2
    stem) -> ``layer1``..``layer3`` (a down block, then basic blocks) -> 1x1 ``conv2`` ->
    ``pool`` -> ``fc``."""

    default_taps = {"stages": ["layer1", "layer2", "layer3"], "hint": "layer2", "embedding": "pool"}

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        net_size: float = 1,
        depths: tuple[int, ...] = (3, 7, 3),
    ) -> None:
        super().__init__()
        widths = V2_WIDTHS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU()
        c_in = 24
        for i, (width, depth) in enumerate(zip(widths[:3], depths, strict=True)):
            blocks = [ShuffleV2Down(c_in, width), *[ShuffleV2Block(width) for _ in range(depth)]]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width
        self.conv2 = nn.Conv2d(c_in, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu2 = nn.ReLU()
        self.pool = global_pool()
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(self.relu2(self.bn2(self.conv2(x)))))


@register_model("shufflev2")
def shufflev2(num_classes: int, input_shape: tuple[int, ...], net_size: float = 1) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 (net size 1: 1,355,528 parameters at 100 classes)."""
    channels = image_channels("shufflev2", input_shape)
    if net_size not in V2_WIDTHS:
        raise KdbenchError(
            f"shufflev2: net_size={net_size} is invalid: use one of {list(V2_WIDTHS)}"
        )
    return ShuffleNetV2(num_classes, channels, net_size)
