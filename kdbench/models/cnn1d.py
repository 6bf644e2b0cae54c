"""A 1-D convolutional network for sequence inputs (B x C x L), e.g. MNIST-1D."""

from __future__ import annotations

from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=False),
    )


class CNN1d(nn.Module):
    """stem (kernel 5) -> stages of stride-2 convolutions -> global average pool -> linear.

    Stage outputs are the feature maps used by attention transfer, the second stage is the
    FitNet hint, and the pooled vector is the embedding for relation methods.
    """

    default_taps = {
        "stages": ["stages.0", "stages.1", "stages.2"],
        "hint": "stages.1",
        "embedding": "pool",
    }

    def __init__(self, num_classes: int, in_channels: int, channels: list[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise KdbenchError(f"cnn1d needs at least 2 channel widths, got channels={channels}")
        self.stem = _conv_bn_relu(in_channels, channels[0], 5, 1)
        self.stages = nn.Sequential(
            *[_conv_bn_relu(a, b, 3, 2) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


@register_model("cnn1d")
def cnn1d(num_classes: int, input_shape: tuple[int, ...], channels=(64, 64, 128, 128)) -> CNN1d:
    if len(input_shape) != 2:
        raise KdbenchError(
            f"cnn1d takes sequence inputs of shape (channels, length), got {input_shape}; "
            "use a model for this input shape"
        )
    return CNN1d(num_classes, input_shape[0], list(channels))
