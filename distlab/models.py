"""Tiny models that train in seconds on a laptop CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector


def mlp(*sizes: int, device=None) -> nn.Sequential:
    """A multi-layer perceptron: mlp(64, 32, 10) is Linear(64,32) -> ReLU -> Linear(32,10).

    Its weights are drawn from the CPU's random stream, then moved to `device` (default: torch's default
    device, ctx.device in a rank): under one seed it is the same model on every device."""
    layers: list[nn.Module] = []
    with torch.device("cpu"):
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(torch.get_default_device() if device is None else device)


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The cross-entropy gradient on (x, y) as one flat vector, and the loss."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return parameters_to_vector([p.grad for p in model.parameters()]), loss.item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the examples whose highest-scoring class is the label."""
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def parameter_count(model: nn.Module) -> int:
    """How many numbers the model trains; one float32 copy of it is 4x that many bytes."""
    return sum(p.numel() for p in model.parameters())


def largest_difference(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """The largest coordinate-wise gap |a - b| between two tensors or two sequences of tensors (two models,
    a result and its reference): how tests and notebooks say "the same, up to round-off"."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
