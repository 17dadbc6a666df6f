"""Data that ships with packages (nothing downloads at run time), how ranks split it, and how they draw minibatches."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of this rank's share of n examples: every world_size-th one (disjoint, sizes within 1)."""
    return torch.arange(rank, n, world_size)


def digits(rank: int = 0, world_size: int = 1, test_fraction: float = 0.2, seed: int = 0, device=None):
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], on `device` (default: torch's
    default device, which is ctx.device in a rank).

    Returns (x_train, y_train, x_test, y_test): the training part is this rank's shard, the test part
    is whole. The shuffle uses `seed` on the CPU, so every rank, on any device, agrees on the split.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32, device="cpu") / 16.0
    y = torch.tensor(labels, device="cpu")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed), device="cpu")
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mine = train[torch.arange(rank, len(train), world_size, device="cpu")]
    device = torch.get_default_device() if device is None else device
    return tuple(t.to(device) for t in (x[mine], y[mine], x[test], y[test]))


def generator(seed: int, rank: int) -> torch.Generator:
    """Rank `rank`'s random stream under `seed`, seeded `seed * 1000 + rank`: the one convention of every
    digits task, so two engines given the same seed draw the same numbers on the same rank."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


def minibatches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int = 0, rank: int = 0,
                start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless minibatches (x[pick], y[pick]) of `batch` examples drawn with replacement from the stream
    `generator(seed, rank)`; `rank` is the data-parallel replica (a parameter-server worker's index).

    Every digits task draws its minibatches here, so engines tested to agree (the sync parameter server
    and DDP, gossip on the full graph and all-reduce) see the same examples. `start` skips that many
    batches: a run resumed at step k draws what an uninterrupted one draws from step k on. The indices are
    drawn on the CPU (the same on every device) and index x on its own device.
    """
    g = generator(seed, rank)
    for _ in range(start):
        torch.randint(len(x), (batch,), generator=g, device="cpu")
    while True:
        pick = torch.randint(len(x), (batch,), generator=g, device="cpu")
        yield x[pick], y[pick]
