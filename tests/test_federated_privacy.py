"""Secure aggregation (pairwise masks) and differential privacy (clipping, noise, opacus's accountant)."""

import math

import pytest
import torch

from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.privacy import SecureAggregation, clip_update, epsilon
from distlab.architectures.federated.simulation import Config, simulate
from distlab.models import largest_difference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def updates(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[0.01 * torch.randn(3, 4, generator=g), 0.01 * torch.randn(5, generator=g)] for _ in range(n)]


def total(us):
    return [torch.stack(layer).sum(0) for layer in zip(*us)]


def test_masked_sum_equals_the_true_sum_while_each_masked_update_hides_the_true_one():
    secure, us = SecureAggregation(6, seed=1), updates(6)
    masked = {k: secure.mask(k, u) for k, u in enumerate(us)}
    for k, u in enumerate(us):  # what the server holds looks nothing like the update (masks ~ U(-10, 10))
        assert (masked[k][0] - u[0]).abs().mean() > 1.0
    for got, want in zip(secure.unmask_sum(masked), total(us)):
        assert torch.allclose(got, want, atol=1e-4)


def test_a_dropped_clients_masks_are_recovered_from_the_survivors():
    secure, us = SecureAggregation(5, seed=2), updates(5)
    masked = {k: secure.mask(k, u) for k, u in enumerate(us) if k != 2}  # client 2 masked, then never replied
    survivors = [u for k, u in enumerate(us) if k != 2]
    naive = total(list(masked.values()))  # without recovery, 2's partners' masks stay in the sum
    assert largest_difference(naive[0], total(survivors)[0]) > 1.0
    for got, want in zip(secure.unmask_sum(masked), total(survivors)):
        assert torch.allclose(got, want, atol=1e-4)


def test_secure_fedavg_trains_the_same_model_as_plain_fedavg():
    fed = fd.digits(5, "dirichlet", alpha=1.0)
    config = dict(rounds=3, epochs=1, batch_size=20, lr=0.1)
    plain = simulate(fed, Config(**config))
    secure = simulate(fed, Config(**config, secure=True))
    assert largest_difference(plain.params, secure.params) < 1e-4


def test_clipping_bounds_the_norm_and_keeps_short_updates():
    long = [torch.full((4,), 3.0), torch.full((9,), 4.0 / 3)]  # norm sqrt(36 + 16) = sqrt(52)
    clipped = clip_update(long, 1.0)
    assert math.isclose(math.sqrt(sum((t ** 2).sum().item() for t in clipped)), 1.0, rel_tol=1e-6)
    assert torch.allclose(clipped[0] / clipped[1][0], long[0] / long[1][0])  # direction kept
    short = [torch.tensor([0.1, 0.2])]
    assert torch.equal(clip_update(short, 1.0)[0], short[0])


def test_epsilon_from_opacus_behaves_like_a_privacy_budget():
    # One full-batch Gaussian release (q = 1): the RDP bound min_a a/(2 sigma^2) + log(1/delta)/(a-1)
    # caps it, and opacus's tighter conversion lands just below.
    classic = min(a / 2 + math.log(1e5) / (a - 1) for a in [1 + i / 100 for i in range(1, 10000)])
    assert 0.8 * classic < epsilon(1.0, 1.0, 1, 1e-5) <= classic
    assert epsilon(2.0, 0.1, 50) < epsilon(1.0, 0.1, 50) < epsilon(1.0, 0.1, 100)  # more noise, fewer rounds
    assert epsilon(0.0, 0.1, 10) == math.inf


def test_dp_noise_costs_accuracy_and_clipping_alone_does_not():
    fed = fd.digits(50, "iid")
    base = dict(rounds=15, fraction=0.4, epochs=1, batch_size=10, lr=0.1)
    clean = simulate(fed, Config(**base)).accuracy
    clipped = simulate(fed, Config(**base, clip=1.0)).accuracy
    noisy = simulate(fed, Config(**base, clip=1.0, noise_multiplier=2.0)).accuracy
    assert clipped > clean - 0.05 and noisy < clipped - 0.1
