"""Who holds which data in federated learning: partitions (IID, Dirichlet label skew, two-label
shards, quantity skew), the FedProx paper's Synthetic(α, β), breast-cancer "hospitals", and a seeded
imbalanced credit-fraud task. Nothing downloads: sklearn's bundled sets or generated data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

SCHEMES = ("iid", "dirichlet", "shards", "quantity")


@dataclass
class Federation:
    """Each client's training data (xs[k], ys[k]) and one held-out test set for the global model."""

    xs: list[torch.Tensor]
    ys: list[torch.Tensor]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.xs)

    @cached_property
    def sizes(self) -> list[int]:
        return [len(y) for y in self.ys]

    def label_counts(self) -> torch.Tensor:
        """[clients, classes]: how many examples of each label each client holds."""
        return torch.stack([torch.bincount(y, minlength=self.num_classes) for y in self.ys])


def iid(labels: torch.Tensor, num_clients: int, seed: int = 0) -> list[torch.Tensor]:
    """Shuffle, then deal out equal shares (sizes within 1)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return [order[k::num_clients] for k in range(num_clients)]


def dirichlet(labels: torch.Tensor, num_clients: int, alpha: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    """Label skew: each class is split over clients in proportions drawn from Dirichlet(α)
    (Hsu et al., 2019). Small α: each client sees few classes; large α: close to IID."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in labels.unique().tolist():
            members = rng.permutation(torch.nonzero(labels == c).flatten().numpy())
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(members)).astype(int)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].extend(piece.tolist())
        if min(len(p) for p in parts) > 0:  # redraw until no client is empty
            return [torch.tensor(sorted(p)) for p in parts]


def shards(labels: torch.Tensor, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """The FedAvg paper's pathological non-IID split: sort by label, cut into shards_per_client·K
    shards, give each client shards_per_client of them (so about two labels each)."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    by_label = shuffled[labels[shuffled].argsort(stable=True)]
    pieces = torch.tensor_split(by_label, num_clients * shards_per_client)
    deal = torch.randperm(len(pieces), generator=generator).view(num_clients, shards_per_client)
    return [torch.cat([pieces[i] for i in row.tolist()]) for row in deal]


def quantity(labels: torch.Tensor, num_clients: int, alpha: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """Quantity skew: IID labels, but client sizes proportional to a Dirichlet(α) draw (at least 2 each)."""
    rng = np.random.default_rng(seed)
    spare = len(labels) - 2 * num_clients  # what is left after the 2 each
    cuts = np.floor(np.cumsum(rng.dirichlet([alpha] * num_clients)) * spare).astype(int)
    cuts[-1] = spare
    sizes = 2 + np.diff(cuts, prepend=0)
    return list(torch.split(torch.from_numpy(rng.permutation(len(labels))), sizes.tolist()))


def partition(labels: torch.Tensor, num_clients: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
              shards_per_client: int = 2) -> list[torch.Tensor]:
    """Index lists, one per client, by `scheme`: "iid", "dirichlet" (α), "shards", "quantity" (α)."""
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    if scheme == "quantity":
        return quantity(labels, num_clients, alpha, seed)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def federate(x, y, x_test, y_test, num_clients: int, scheme: str = "iid", seed: int = 0, **kwargs) -> Federation:
    """Split (x, y) over num_clients by `scheme`; the test set stays whole, on the server."""
    parts = partition(y, num_clients, scheme, seed, **kwargs)
    return Federation([x[p] for p in parts], [y[p] for p in parts], x_test, y_test, int(y.max()) + 1)


def digits(num_clients: int = 10, scheme: str = "iid", seed: int = 0, **kwargs) -> Federation:
    """scikit-learn's 8x8 digits over num_clients: the training part of `distlab.data.digits` (1,438 images), the
    split every notebook uses; its 359 test images stay whole, on the server."""
    from distlab.data import digits as load

    x, y, x_test, y_test = load()
    return federate(x, y, x_test, y_test, num_clients, scheme, seed, **kwargs)


def synthetic(alpha: float = 1.0, beta: float = 1.0, num_clients: int = 100, seed: int = 0,
              dim: int = 60, num_classes: int = 10, size_sigma: float = 1.0, max_size: int = 1000,
              test_fraction: float = 0.2) -> Federation:
    """Synthetic(α, β) of the FedProx paper (Li et al., 2020): client k draws u_k ~ N(0, α),
    W_k, b_k ~ N(u_k, 1) (model shift) and B_k ~ N(0, β), v_k ~ N(B_k, 1), x ~ N(v_k, Σ) with
    Σ_jj = j^-1.2 (feature shift); y = argmax(W_k x + b_k). Sizes follow a power law, 50 + lognormal(4,
    size_sigma) capped at max_size. Each client keeps test_fraction of its data for the shared test set."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(50 + rng.lognormal(4, size_sigma, num_clients).astype(int), max_size)
    scale = np.arange(1, dim + 1) ** -0.6  # sqrt of the diagonal covariance j^-1.2
    xs, ys, tests_x, tests_y = [], [], [], []
    for k in range(num_clients):
        u, b_mean = rng.normal(0, alpha), rng.normal(0, beta)
        w, b = rng.normal(u, 1, (num_classes, dim)), rng.normal(u, 1, num_classes)
        v = rng.normal(b_mean, 1, dim)
        x = rng.normal(v, scale, (sizes[k], dim))
        y = (x @ w.T + b).argmax(1)
        n_test = int(test_fraction * sizes[k])
        xs.append(torch.tensor(x[n_test:], dtype=torch.float32))
        ys.append(torch.tensor(y[n_test:]))
        tests_x.append(torch.tensor(x[:n_test], dtype=torch.float32))
        tests_y.append(torch.tensor(y[:n_test]))
    return Federation(xs, ys, torch.cat(tests_x), torch.cat(tests_y), num_classes)


def _standardize(x: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = x.mean(0), x.std(0) + 1e-8
    return (torch.tensor((x - mean) / std, dtype=torch.float32),
            torch.tensor((x_test - mean) / std, dtype=torch.float32))


def hospitals(num_hospitals: int = 4, alpha: float = 1.0, seed: int = 0) -> Federation:
    """Medical diagnosis: scikit-learn's breast-cancer set (569 tumours, 30 features; label 1 = malignant)
    split over hospitals with Dirichlet(α) label skew; features standardized, 20% held out."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    y = 1 - y  # scikit-learn codes malignant as 0; the positive class should be the disease
    x, x_test, y, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x, x_test = _standardize(x, x_test)
    return federate(x, torch.tensor(y), x_test, torch.tensor(y_test), num_hospitals, "dirichlet", seed, alpha=alpha)


def credit(num_banks: int = 5, n: int = 6000, fraud_rate: float = 0.05, seed: int = 0) -> Federation:
    """Financial risk: a generated fraud task (label 1 = fraud, about fraud_rate of transactions).
    Ten features; fraud depends on a few of them; each bank has its own customer mix (feature shift)
    and size. 20% of all transactions are held out."""
    rng = np.random.default_rng(seed)
    bank = rng.choice(num_banks, size=n, p=rng.dirichlet([2.0] * num_banks))
    x = rng.normal(0, 1, (n, 10)) + rng.normal(0, 0.5, (num_banks, 10))[bank]
    score = 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.8 * x[:, 2] * x[:, 3] + 0.5 * rng.normal(0, 1, n)
    y = (score > np.quantile(score, 1 - fraud_rate)).astype(int)
    test = rng.random(n) < 0.2
    x_train, x_test = _standardize(x[~test], x[test])
    y_train, bank_train = torch.tensor(y[~test]), torch.tensor(bank[~test])
    xs = [x_train[bank_train == k] for k in range(num_banks)]
    ys = [y_train[bank_train == k] for k in range(num_banks)]
    return Federation(xs, ys, x_test, torch.tensor(y[test]), 2)
