"""Shared pieces of the image models (B x C x H x W inputs): the input-shape check, the
pooled-embedding head and the weight initialisation."""

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


def init_weights(
    model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """He initialisation (fan-out, ReLU gain) of every convolution, with any bias zeroed;
    BatchNorm weight 1 and bias 0. Linear layers keep PyTorch's default unless ``linear_std``
    is given (weight ~ N(0, linear_std), bias 0) or ``zero_linear_bias`` (bias 0 only)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)
