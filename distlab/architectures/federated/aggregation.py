"""Federated learning, the server's side: aggregators and server optimizers.

Every aggregator takes `results`, a list of `(update, num_examples)` pairs where an update is a list
of tensors (or arrays), and returns the aggregate in the same form. The rest of federated learning
lives beside this file: partition.py (who holds which data), simulation.py (one process,
many clients), processes.py (a server rank and client ranks), privacy.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Update = list[torch.Tensor]
Results = Sequence[tuple[Sequence, int]]


def _stacked(results: Results) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer stacked over clients (client dimension first), and the clients' example counts."""
    if not results:
        raise ValueError("results must hold at least one (update, num_examples) pair")
    layers = [torch.stack([torch.as_tensor(u[i]) for u, _ in results]) for i in range(len(results[0][0]))]
    counts = torch.tensor([float(n) for _, n in results], dtype=torch.float64)
    return layers, counts


def _like_input(results: Results, layers: list[torch.Tensor]) -> list:
    """Return arrays when the updates came as arrays, tensors otherwise."""
    if isinstance(results[0][0][0], torch.Tensor):
        return layers
    return [layer.numpy() for layer in layers]


def fedavg(results: Results) -> list:
    """FedAvg (McMahan et al., 2017): the average of the updates weighted by each client's example count."""
    layers, counts = _stacked(results)
    weights = counts / counts.sum()
    out = [(weights.view(-1, *[1] * (layer.dim() - 1)) * layer.double()).sum(0).to(layer.dtype)
           for layer in layers]
    return _like_input(results, out)


def median(results: Results) -> list:
    """Coordinate-wise median (Yin et al., 2018), unweighted; an even count averages the two middle values."""
    layers, _ = _stacked(results)
    return _like_input(results, [layer.double().quantile(0.5, dim=0).to(layer.dtype) for layer in layers])


def trimmed_mean(results: Results, trim_fraction: float) -> list:
    """Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the int(trim_fraction·n)
    largest and as many smallest values, average the rest (unweighted)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    layers, _ = _stacked(results)
    cut = int(trim_fraction * len(results))
    kept = [layer.sort(dim=0).values[cut:len(results) - cut] for layer in layers]
    return _like_input(results, [k.double().mean(0).to(k.dtype) for k in kept])


def krum_scores(results: Results, num_malicious: int) -> torch.Tensor:
    """Krum's score of each update (Blanchard et al., 2017): the sum of squared distances to its
    n - f - 2 nearest other updates."""
    layers, _ = _stacked(results)
    flat = torch.cat([layer.double().flatten(1) for layer in layers], dim=1)
    distances = ((flat.unsqueeze(0) - flat.unsqueeze(1)) ** 2).sum(-1)
    closest = max(1, len(results) - num_malicious - 2)
    return distances.sort(dim=1).values[:, 1:closest + 1].sum(1)  # column 0 is the distance to itself


def krum(results: Results, num_malicious: int, multi: int = 0) -> list:
    """Krum: the update with the lowest score. Multi-Krum (multi > 0): the FedAvg of the `multi`
    lowest-scoring updates (weighted by example count, which is the paper's plain mean when counts are equal)."""
    if not 0 <= num_malicious < len(results):
        raise ValueError(f"num_malicious must be in [0, {len(results)}), got {num_malicious!r}")
    if not 0 <= multi <= len(results):
        raise ValueError(f"multi must be in [0, {len(results)}] (0: plain Krum), got {multi!r}")
    scores = krum_scores(results, num_malicious)
    if multi == 0:
        return list(results[int(scores.argmin())][0])
    return fedavg([results[i] for i in scores.argsort()[:multi].tolist()])


AGGREGATORS = {"fedavg", "median", "trimmed_mean", "krum", "multi_krum"}


def aggregate(results: Results, rule: str = "fedavg", trim_fraction: float = 0.2, num_malicious: int = 0,
              multi: int = 0) -> list:
    """Dispatch by name, so a config can say which aggregator the server uses."""
    if rule == "fedavg":
        return fedavg(results)
    if rule == "median":
        return median(results)
    if rule == "trimmed_mean":
        return trimmed_mean(results, trim_fraction)
    if rule == "krum":
        return krum(results, num_malicious)
    if rule == "multi_krum":
        return krum(results, num_malicious, multi=multi or max(1, len(results) - num_malicious))
    raise ValueError(f"rule must be one of {sorted(AGGREGATORS)}, got {rule!r}")


class ServerOptimizer:
    """The server treats the aggregated update as a pseudo-gradient (Reddi et al., 2021, Algorithm 2).

    "sgd" with lr=1 is plain FedAvg (w += Δ). "adam": m = β1·m + (1-β1)·Δ, v = β2·v + (1-β2)·Δ²;
    "yogi": v = v - (1-β2)·Δ²·sign(v - Δ²); both then w += lr·m / (√v + τ). No bias correction, as in the paper.
    """

    KINDS = ("sgd", "adam", "yogi")

    def __init__(self, kind: str = "sgd", lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.99),
                 tau: float = 1e-3):
        if kind not in self.KINDS:
            raise ValueError(f"server optimizer must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.lr, self.betas, self.tau = kind, lr, betas, tau
        self.m: Update | None = None
        self.v: Update | None = None

    def step(self, params: Update, delta: Update) -> Update:
        """The new global parameters from the current ones and the aggregated update Δ."""
        if self.kind == "sgd":
            return [p + self.lr * d for p, d in zip(params, delta)]
        b1, b2 = self.betas
        if self.m is None:
            self.m = [torch.zeros_like(d) for d in delta]
            self.v = [torch.full_like(d, self.tau ** 2) for d in delta]
        self.m = [b1 * m + (1 - b1) * d for m, d in zip(self.m, delta)]
        if self.kind == "adam":
            self.v = [b2 * v + (1 - b2) * d * d for v, d in zip(self.v, delta)]
        else:
            self.v = [v - (1 - b2) * d * d * torch.sign(v - d * d) for v, d in zip(self.v, delta)]
        return [p + self.lr * m / (v.sqrt() + self.tau) for p, m, v in zip(params, self.m, self.v)]
