"""Shared pieces of the image models (B x C x H x W inputs): the input-shape check and the
pooled-embedding head."""

from __future__ import annotations

from torch import nn

from kdbench.errors import KdbenchError


def image_channels(arch: str, input_shape: tuple[int, ...]) -> int:
    """The input channels of an image model, after checking that inputs are (C, H, W)."""
    if len(input_shape) != 3:
        raise KdbenchError(
            f"{arch} takes image inputs of shape (channels, height, width), got {input_shape}; "
            "use an image dataset or a model for this input shape (e.g. cnn1d, mlp)"
        )
    return int(input_shape[0])


def global_pool() -> nn.Sequential:
    """Global average pooling to a (B, D) vector: the ``embedding`` tap of every image model."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
