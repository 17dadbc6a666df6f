"""Lab 05: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import numpy as np
import pytest
import torch

from distlab.labs import grading
from distlab.labs.solutions import ref05

# -- weighted FedAvg ----------------------------------------------------------------------------------


def unweighted(results):
    return [torch.stack(layer).mean(0) for layer in zip(*(u for u, _ in results))]


def weighted_sum(results):
    """n_k · update_k summed, never divided."""
    return [sum(n * u[i] for u, n in results) for i in range(len(results[0][0]))]


def divided_by_clients(results):
    return [t / len(results) for t in weighted_sum(results)]


def mutates(results):
    """Right numbers, but accumulated into the first client's tensors."""
    total = sum(n for _, n in results)
    average = results[0][0]
    for a in average:
        a.mul_(results[0][1] / total)
    for update, n in results[1:]:
        for a, t in zip(average, update):
            a.add_(t, alpha=n / total)
    return average


def one_tensor(results):
    return torch.cat([t.flatten() for t in ref05.weighted_fedavg(results)])


@pytest.mark.parametrize("solution, says", [
    (unweighted, "you averaged the updates equally"),
    (weighted_sum, "you weighted by n_k but never divided"),
    (divided_by_clients, "divided Σ n_k · update_k by the number of clients"),
    (mutates, "changed client 0's update"),
    (one_tensor, "return a list of 2 tensors"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_fedavg_gets_its_diagnosis(solution, says):
    verdict = grading.grade("05.weighted_fedavg", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_an_arbitrary_error_names_the_layer_and_element():
    def off(results):
        average = ref05.weighted_fedavg(results)
        average[1][1] += 0.5
        return average

    verdict = grading.grade("05.weighted_fedavg", off)
    assert verdict.status == "wrong" and verdict.summary.startswith("layer 1, element [1] is"), str(verdict)
    assert "should be" in verdict.summary


# -- the Dirichlet partition --------------------------------------------------------------------------

def per_class(labels, num_clients, alpha, seed, cut, rng=None):
    """The per-class split with a pluggable cut(members, shares) -> pieces (and random stream)."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    parts = [[] for _ in range(num_clients)]
    for c in labels.unique().tolist():
        members = rng.permutation(torch.nonzero(labels == c).flatten().numpy())
        for k, piece in enumerate(cut(members, rng.dirichlet([alpha] * num_clients), rng)):
            parts[k].extend(piece.tolist())
    return [torch.tensor(p, dtype=torch.long) for p in parts]


def rounds_down(labels, num_clients, alpha, seed):
    """Each client takes floor(share · size) of a class: the remainders are lost."""
    def cut(members, shares, rng):
        counts = (shares * len(members)).astype(int)
        starts = np.concatenate([[0], np.cumsum(counts)])
        return [members[starts[k]:starts[k + 1]] for k in range(len(shares))]
    return per_class(labels, num_clients, alpha, seed, cut)


def with_replacement(labels, num_clients, alpha, seed):
    """Each client samples its share of a class with replacement: examples repeat."""
    def cut(members, shares, rng):
        return [rng.choice(members, int(round(s * len(members))), replace=True) for s in shares]
    return per_class(labels, num_clients, alpha, seed, cut)


def per_client(labels, num_clients, alpha, seed):
    """Hsu et al.'s other convention: every client gets N/K examples, its label mix drawn from Dirichlet(α)."""
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(torch.nonzero(labels == c).flatten().numpy())) for c in labels.unique().tolist()}
    classes, parts = sorted(pools), []
    quota = np.diff(np.linspace(0, len(labels), num_clients + 1).astype(int))
    for k in range(num_clients):
        mix, part = rng.dirichlet([alpha] * len(classes)), []
        while len(part) < quota[k]:
            left = np.array([mix[i] * bool(pools[c]) for i, c in enumerate(classes)])
            part.append(pools[classes[rng.choice(len(classes), p=left / left.sum())]].pop())
        parts.append(torch.tensor(part))
    return parts


def never_redraws(labels, num_clients, alpha, seed):
    """Right split, but a draw that leaves a client empty is kept."""
    def cut(members, shares, rng):
        return np.split(members, (np.cumsum(shares)[:-1] * len(members)).astype(int))
    return per_class(labels, num_clients, alpha, seed, cut)


def ignores_alpha(labels, num_clients, alpha, seed):
    return ref05.dirichlet_partition(labels, num_clients, 1.0, seed)


def inverted_alpha(labels, num_clients, alpha, seed):
    return ref05.dirichlet_partition(labels, num_clients, 1 / alpha, seed)


def global_random_state(labels, num_clients, alpha, seed):
    """np.random.default_rng(None): fresh entropy on every call."""
    return ref05.dirichlet_partition(labels, num_clients, alpha, None)


def ignores_seed(labels, num_clients, alpha, seed):
    return ref05.dirichlet_partition(labels, num_clients, alpha, 0)


def iid_shuffle(labels, num_clients, alpha, seed):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return list(order.tensor_split(num_clients))


@pytest.mark.parametrize("solution, says", [
    (rounds_down, "indices are given to no client"),
    (with_replacement, "times (to clients"),
    (never_redraws, "holds no examples"),
    (per_client, "drew Dirichlet proportions per client"),
    (ignores_alpha, "is `alpha` used?"),
    (iid_shuffle, "is `alpha` used?"),
    (inverted_alpha, "the skew grows with α"),
    (global_random_state, "two calls with the same seed gave different partitions"),
    (ignores_seed, "seeds 0 and 1 gave the same partition"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_partition_gets_its_diagnosis(solution, says):
    verdict = grading.grade("05.dirichlet_partition", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_lost_indices_are_counted_per_label():
    verdict = grading.grade("05.dirichlet_partition", rounds_down)
    assert any(detail.startswith("lost per label: [") for detail in verdict.details), str(verdict)
