"""Lab 05: reference solutions."""

import numpy as np
import torch


def weighted_fedavg(results):
    """Σ (n_k / Σn) · update_k, layer by layer, into new tensors."""
    total = sum(n for _, n in results)
    average = [torch.zeros_like(t) for t in results[0][0]]
    for update, n in results:
        for a, t in zip(average, update):
            a.add_(t, alpha=n / total)
    return average


def dirichlet_partition(labels, num_clients, alpha, seed):
    """Per class: shuffle its indices, cut them at proportions drawn from Dirichlet(α · 1_K); redraw
    until no client is empty."""
    rng = np.random.default_rng(seed)
    while True:
        parts = [[] for _ in range(num_clients)]
        for c in labels.unique().tolist():
            members = rng.permutation(torch.nonzero(labels == c).flatten().numpy())
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].extend(piece.tolist())
        if all(parts):
            return [torch.tensor(p) for p in parts]
