"""Lab 05b: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import pytest
import torch

from distlab.labs import grading
from distlab.labs.solutions import ref05b

# -- pairwise masks -----------------------------------------------------------------------------------


def masked_with(client, update, num_clients, prg, seed_of, sign_of, partners):
    """A masking with pluggable seed, sign and partner choices: the shape of every wrong answer below."""
    out = [t.clone() for t in update]
    for other in partners(client, num_clients):
        for o, m in zip(out, prg(seed_of(client, other), update)):
            o.add_(m, alpha=sign_of(client, other))
    return out


def others(client, n):
    return [j for j in range(n) if j != client]


def shared(secret, n):
    return lambda i, j: (secret * n + min(i, j)) * n + max(i, j)


def lower_adds(i, j):
    return 1.0 if i < j else -1.0


def both_add(client, update, num_clients, secret, prg):
    return masked_with(client, update, num_clients, prg, shared(secret, num_clients), lambda i, j: 1.0, others)


def seeds_not_shared(client, update, num_clients, secret, prg):
    """seed from (client, other) in that order: i's mask with j is not j's mask with i."""
    return masked_with(client, update, num_clients, prg, lambda i, j: secret * 1000 + 10 * i + j, lower_adds, others)


def masks_itself(client, update, num_clients, secret, prg):
    return masked_with(client, update, num_clients, prg, shared(secret, num_clients), lower_adds,
                       lambda c, n: range(n))


def one_seed_for_all(client, update, num_clients, secret, prg):
    """The signs are right and the sum cancels, but every pair uses the same mask."""
    return masked_with(client, update, num_clients, prg, lambda i, j: secret, lower_adds, others)


def colliding_seeds(client, update, num_clients, secret, prg):
    """secret + i + j: pairs (0, 3) and (1, 2) draw the same mask."""
    return masked_with(client, update, num_clients, prg, lambda i, j: secret + i + j, lower_adds, others)


def in_place(client, update, num_clients, secret, prg):
    for other in others(client, num_clients):
        for t, m in zip(update, prg(shared(secret, num_clients)(client, other), update)):
            t.add_(m, alpha=lower_adds(client, other))
    return update


def own_generator(client, update, num_clients, secret, prg):
    """Masks that cancel, but drawn with torch directly: the check cannot see the seeds."""
    out = [t.clone() for t in update]
    for other in others(client, num_clients):
        g = torch.Generator().manual_seed(shared(secret, num_clients)(client, other))
        for o in out:
            o.add_(torch.rand(o.shape, generator=g, dtype=o.dtype), alpha=lower_adds(client, other))
    return out


@pytest.mark.parametrize("solution, says", [
    (both_add, "both added their shared mask"),
    (seeds_not_shared, "share no seed"),
    (masks_itself, "it masked with itself"),
    (one_seed_for_all, "every pair needs its own seed"),
    (colliding_seeds, "every pair needs its own seed"),
    (in_place, "changed `update` in place"),
    (own_generator, "drew no mask with prg"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_wrong_masks_get_their_diagnosis(solution, says):
    verdict = grading.grade("05b.pairwise_masks", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_masks_that_do_not_cancel_name_the_pair():
    verdict = grading.grade("05b.pairwise_masks", both_add)
    assert verdict.summary.startswith("clients 0 and 1 both added"), str(verdict)
    verdict = grading.grade("05b.pairwise_masks", seeds_not_shared)
    assert verdict.summary.startswith("clients 0 and 1 share no seed: client 0 drew [7001, 7002"), str(verdict)


def test_a_mask_applied_by_one_client_only_is_named():
    def forgets_to_subtract(client, update, num_clients, secret, prg):
        return masked_with(client, update, num_clients, prg, shared(secret, num_clients),
                           lambda i, j: 1.0 if i < j else 0.0, others)

    verdict = grading.grade("05b.pairwise_masks", forgets_to_subtract)
    assert verdict.status == "wrong" and "+1 times and into client 1's +0 times" in verdict.summary, str(verdict)


# -- Krum's scores ------------------------------------------------------------------------------------

def squared_distances(updates):
    return torch.cdist(updates, updates) ** 2


def counts_itself(updates, num_malicious):
    closest = max(1, len(updates) - num_malicious - 2)
    return squared_distances(updates).sort(dim=1).values[:, :closest].sum(1)


def one_neighbour_too_many(updates, num_malicious):
    closest = len(updates) - num_malicious - 1
    return squared_distances(updates).sort(dim=1).values[:, 1:closest + 1].sum(1)


def all_the_others(updates, num_malicious):
    return squared_distances(updates).sum(1)


def not_squared(updates, num_malicious):
    closest = max(1, len(updates) - num_malicious - 2)
    return torch.cdist(updates, updates).sort(dim=1).values[:, 1:closest + 1].sum(1)


def as_a_list(updates, num_malicious):
    return ref05b.krum_scores(updates, num_malicious).tolist()


@pytest.mark.parametrize("solution, says", [
    (counts_itself, "distance to itself (0)"),
    (one_neighbour_too_many, "your scores sum 4 neighbours; Krum sums the n - f - 2 = 7 - 2 - 2 = 3"),
    (all_the_others, "your scores sum 6 neighbours"),
    (not_squared, "Krum adds squared distances"),
    (as_a_list, "a tensor of shape (7,)"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_wrong_krum_scores_get_their_diagnosis(solution, says):
    verdict = grading.grade("05b.krum_scores", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
