"""Wide residual networks for 32x32 images (Zagoruyko & Komodakis 2016), as in the CRD /
RepDistiller benchmark: ``wrn_D_K`` has depth D = 6n + 4 and widths 16K, 32K, 64K.

Blocks are pre-activation (BN -> ReLU -> conv, twice, plus the shortcut), so a block's output
is the residual sum, with no ReLU after it: the stage taps ``block1``..``block3`` are those
sums (as RepDistiller's features with ``preact=False``), and ``relu`` after the final ``bn1``
feeds the pooled embedding. Pre-activation features proper are ``blockN.0.bn1`` (BN before
the ReLU) of the next group.
"""

from __future__ import annotations

from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model
from kdbench.models._image import global_pool, image_channels, init_weights


class WideBasic(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> dropout -> 3x3 conv, plus the shortcut (a 1x1
    conv of the activated input when the shape changes, else the input itself)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
            if stride != 1 or in_planes != out_planes
            else None
        )

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + shortcut


class WideResNet(nn.Module):
    """3x3 stem -> ``block1``..``block3`` -> BN -> ReLU -> ``pool`` -> ``fc``."""

    default_taps = {
        "stages": ["block1", "block2", "block3"],
        "hint": "block2",
        "embedding": "pool",
    }

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise KdbenchError(f"wrn: depth must be 6n + 4, n >= 1 (10, 16, 40...), got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        in_planes = 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBasic(in_planes, width, stride, dropout))
                in_planes = width
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = global_pool()
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self, zero_linear_bias=True)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn1(x))))


def _register(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    @register_model(name)
    def build(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> WideResNet:
        channels = image_channels(name, input_shape)
        return WideResNet(depth, widen_factor, num_classes, channels, dropout)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"WRN-{depth}-{widen_factor} (dropout after each block's second ReLU)."


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)
