"""Privacy in federated learning: secure aggregation with pairwise masks on integers modulo R (Bonawitz et
al., 2017) and differential privacy by clipping plus Gaussian noise (DP-FedAvg, McMahan et al., 2018), with
ε from opacus's RDP accountant (Mironov, 2017) rather than a formula of our own."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import torch

from .aggregation import Update

if TYPE_CHECKING:
    from .simulation import Config


# -- secure aggregation -------------------------------------------------------------------------------

def _pair_generator(seed: int, i: int, j: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + min(i, j)) * 1_000_003 + max(i, j))


class SecureAggregation:
    """Pairwise masks on fixed-point integers modulo R = 2^bits.

    Each client clips its update to [-bound, bound] per coordinate and rounds it to a multiple of
    `quantum`, an integer q in Z_R. Clients i < j agree on a secret seed s_ij (in the protocol, by
    Diffie-Hellman; the server never learns it) and expand it into a mask uniform in Z_R: i adds it, j
    subtracts it, all mod R. One mask uniform in Z_R makes q + mask uniform in Z_R whatever q is, so a
    masked update tells the server nothing (real-valued masks in [-a, a] would leak that the update lies
    within a of the masked value). The masks cancel in the sum mod R, and the quantum is chosen so that
    the sum of num_clients clipped updates never wraps around: the server gets the quantized sum exactly.

    If client d drops after the masks were agreed, its partners' masks with d would not cancel: the
    survivors reveal their seeds with d (in the protocol, via Shamir shares of d's key) and the server
    removes those masks. The protocol's second, self mask (against a late reply) is left out here.
    """

    def __init__(self, num_clients: int, seed: int = 0, bound: float = 1024.0, bits: int = 32):
        if num_clients < 2:
            raise ValueError(f"num_clients must be >= 2 for masks to hide anything, got {num_clients!r}")
        if not 8 <= bits <= 62:
            raise ValueError(f"bits must be in [8, 62] (R = 2^bits, sums held in int64), got {bits!r}")
        fraction_bits = bits - 2 - math.ceil(math.log2(num_clients * bound))  # |Σ q| < R/2: the sum never wraps
        if fraction_bits < 0:
            raise ValueError(f"bits={bits} leave no room for {num_clients} clients' updates within ±{bound}: "
                             "raise bits or lower bound")
        self.num_clients, self.seed, self.bound, self.bits = num_clients, seed, bound, bits
        self.modulus, self.quantum = 2 ** bits, 2.0 ** -fraction_bits

    def quantize(self, update: Update) -> Update:
        """Clip each coordinate to [-bound, bound] and round it to a multiple of the quantum: integers in Z_R."""
        return [torch.round(t.double().clamp(-self.bound, self.bound) / self.quantum).long() % self.modulus
                for t in update]

    def dequantize(self, total: Update) -> Update:
        """Integers in Z_R back to reals: the upper half of Z_R stands for the negative numbers."""
        return [(torch.where(t >= self.modulus // 2, t - self.modulus, t).double() * self.quantum)
                .to(torch.get_default_dtype()) for t in total]

    def pair_mask(self, i: int, j: int, like: Update) -> Update:
        """PRG(s_ij), shaped like the update: uniform in Z_R."""
        g = _pair_generator(self.seed, i, j)
        return [torch.randint(0, self.modulus, t.shape, generator=g, dtype=torch.long) for t in like]

    def mask(self, client: int, update: Update) -> Update:
        """What client `client` sends: its quantized update plus its pairwise masks, mod R."""
        out = self.quantize(update)
        for other in range(self.num_clients):
            if other == client:
                continue
            sign = 1 if client < other else -1
            for o, m in zip(out, self.pair_mask(client, other, out)):
                o.add_(sign * m).remainder_(self.modulus)
        return out

    def masked_sum(self, masked: dict[int, Update]) -> Update:
        """The server's side, in Z_R: the sum of the replies it got ({client: masked update}); the masks of
        clients that never replied are rebuilt from the seeds the survivors reveal, and removed."""
        total = [torch.zeros_like(t) for t in next(iter(masked.values()))]
        for reply in masked.values():
            for t, m in zip(total, reply):
                t.add_(m).remainder_(self.modulus)  # one addition at a time: int64 holds 2R for bits <= 62
        for dropped in set(range(self.num_clients)) - set(masked):
            for survivor in masked:
                sign = 1 if survivor < dropped else -1
                for t, m in zip(total, self.pair_mask(survivor, dropped, total)):
                    t.sub_(sign * m).remainder_(self.modulus)
        return total

    def unmask_sum(self, masked: dict[int, Update]) -> Update:
        """The sum of the survivors' updates, as reals: within num_clients · quantum / 2 of the true sum."""
        return self.dequantize(self.masked_sum(masked))


# -- differential privacy -----------------------------------------------------------------------------

def clip_update(update: Update, max_norm: float) -> Update:
    """Scale the whole update down to L2 norm max_norm if it is longer (per-client clipping)."""
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in update)).item()
    factor = min(1.0, max_norm / (norm + 1e-12))
    return [t * factor for t in update]


def gaussian_noise(total: Update, std: float, generator: torch.Generator) -> Update:
    """The Gaussian mechanism: add N(0, std²) to every coordinate of the clipped sum."""
    return [t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in total]


def poisson_sampling(config: Config, rate: float) -> Config:
    """The same DP-FedAvg run with clients sampled as the RDP accountant assumes: each client joins each
    round independently with probability `rate` (Poisson sampling; the count per round is Binomial(n, rate)),
    not exactly round(rate · n) of them.

    Said with the simulation's knobs: every client is asked (C = 1) and each one stays away with probability
    1 - rate (dropout); the server step 1/rate turns the division of the noisy sum by all n clients into
    DP-FedAvg's division by the expected count rate · n."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    if config.clip is None or config.server != "sgd" or config.dropout or config.stragglers or config.attackers:
        raise ValueError("poisson_sampling needs a DP-FedAvg config: clip set, server='sgd', no dropout, "
                         "stragglers or attackers")
    return dataclasses.replace(config, fraction=1.0, dropout=1.0 - rate, server_lr=config.server_lr / rate)


@functools.cache  # a table, its figure and its knob ask for the same values; each costs ~0.2 s of CPU
def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float = 1e-5) -> float:
    """Client-level (ε, δ) after `rounds` rounds, each sampling every client independently with probability
    sample_rate (Poisson), from opacus's RDP accountant (Mironov, 2017; the subsampled Gaussian)."""
    from opacus.accountants import RDPAccountant

    if noise_multiplier <= 0:
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))
