"""Tiny models that train in seconds on a laptop CPU."""

from __future__ import annotations

from torch import nn


def mlp(*sizes: int) -> nn.Sequential:
    """A multi-layer perceptron: mlp(64, 32, 10) is Linear(64,32) -> ReLU -> Linear(32,10)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
