"""Multilayer perceptrons for the synthetic experiments (any input shape is flattened)."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    """``features`` (flatten + hidden layers) then a linear ``classifier`` of class templates w_k."""

    def __init__(self, in_features: int, num_classes: int, hidden=(128, 128), dropout: float = 0.0):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(num_classes: int, input_shape, hidden=(128, 128), dropout: float = 0.0) -> MLP:
    return MLP(math.prod(input_shape), num_classes, hidden=tuple(hidden), dropout=dropout)
