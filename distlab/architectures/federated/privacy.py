"""Privacy in federated learning: secure aggregation with pairwise additive masks (Bonawitz et al.,
2017) and differential privacy by clipping plus Gaussian noise (DP-FedAvg, McMahan et al., 2018),
with ε from opacus's RDP accountant rather than a formula of our own."""

from __future__ import annotations

import torch

from .aggregation import Update


def _pair_generator(seed: int, i: int, j: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + min(i, j)) * 1_000_003 + max(i, j))


class SecureAggregation:
    """Pairwise masks: clients i < j agree on a secret seed s_ij (in the protocol, by Diffie-Hellman;
    the server never learns it). Client i adds PRG(s_ij) for each j > i and subtracts PRG(s_ji) for
    each j < i, so every mask cancels in the sum and the server learns the sum and nothing else.

    If client d drops after the masks were agreed, its partners' masks with d would not cancel: the
    survivors reveal their seeds with d (in the protocol, via Shamir shares of d's key) and the server
    removes those masks. The protocol's second, self mask (against a late reply) is left out here.
    """

    def __init__(self, num_clients: int, seed: int = 0, scale: float = 10.0):
        if num_clients < 2:
            raise ValueError(f"num_clients must be >= 2 for masks to hide anything, got {num_clients!r}")
        self.num_clients, self.seed, self.scale = num_clients, seed, scale

    def pair_mask(self, i: int, j: int, like: Update) -> Update:
        """PRG(s_ij), shaped like the update: uniform in [-scale, scale]."""
        g = _pair_generator(self.seed, i, j)
        return [(torch.rand(t.shape, generator=g, dtype=t.dtype) * 2 - 1) * self.scale for t in like]

    def mask(self, client: int, update: Update) -> Update:
        """What client `client` sends: its update plus its pairwise masks."""
        out = [t.clone() for t in update]
        for other in range(self.num_clients):
            if other == client:
                continue
            sign = 1.0 if client < other else -1.0
            for o, m in zip(out, self.pair_mask(client, other, update)):
                o += sign * m
        return out

    def unmask_sum(self, masked: dict[int, Update]) -> Update:
        """The server's side: the sum of the replies it got ({client: masked update}); the masks of
        clients that never replied are rebuilt from the seeds the survivors reveal, and removed."""
        total = [torch.stack(layer).sum(0) for layer in zip(*masked.values())]
        for dropped in set(range(self.num_clients)) - set(masked):
            for survivor in masked:
                sign = 1.0 if survivor < dropped else -1.0
                for t, m in zip(total, self.pair_mask(survivor, dropped, total)):
                    t -= sign * m
        return total


def clip_update(update: Update, max_norm: float) -> Update:
    """Scale the whole update down to L2 norm max_norm if it is longer (per-client clipping)."""
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in update)).item()
    factor = min(1.0, max_norm / (norm + 1e-12))
    return [t * factor for t in update]


def gaussian_noise(total: Update, std: float, generator: torch.Generator) -> Update:
    """The Gaussian mechanism: add N(0, std²) to every coordinate of the clipped sum."""
    return [t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in total]


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float = 1e-5) -> float:
    """Client-level (ε, δ) after `rounds` rounds, each sampling clients with probability sample_rate,
    from opacus's RDP accountant (Mironov, 2017; subsampled Gaussian)."""
    from opacus.accountants import RDPAccountant

    if noise_multiplier <= 0:
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))
