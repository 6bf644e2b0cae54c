"""A multi-layer perceptron on flattened inputs: no spatial feature maps."""

from __future__ import annotations

import math

from torch import nn

from kdbench.models import register_model


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Sequential(nn.Linear(width, h), nn.ReLU()))
            width = h
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        # Hidden activations are vectors: fine for hints (through a linear regressor) and
        # relations, but there are no stages, so attention transfer is refused before training.
        self.default_taps = {
            "stages": [],
            "hint": "hidden.0",
            "embedding": f"hidden.{len(hidden) - 1}",
        }

    def forward(self, x):
        return self.fc(self.hidden(self.flatten(x)))


@register_model("mlp")
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden=(100, 100)) -> MLP:
    return MLP(num_classes, math.prod(input_shape), list(hidden))
