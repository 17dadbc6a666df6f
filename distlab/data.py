"""Data that ships with packages (nothing downloads at run time), and how ranks split it."""

from __future__ import annotations

import torch


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of this rank's share of n examples: every world_size-th one (disjoint, sizes within 1)."""
    return torch.arange(rank, n, world_size)


def digits(rank: int = 0, world_size: int = 1, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1].

    Returns (x_train, y_train, x_test, y_test): the training part is this rank's shard, the test part
    is whole. The shuffle uses `seed`, so every rank agrees on the split.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mine = train[shard(len(train), rank, world_size)]
    return x[mine], y[mine], x[test], y[test]
