"""Secure aggregation (pairwise masks on integers mod R) and differential privacy (clipping, noise, Poisson
sampling, opacus's accountant)."""

import math

import pytest
import torch

from distlab.architectures.federated import partition as fd
from distlab.architectures.federated.aggregation import ServerOptimizer
from distlab.architectures.federated.privacy import (
    SecureAggregation,
    clip_update,
    epsilon,
    gaussian_noise,
    poisson_sampling,
)
from distlab.architectures.federated.simulation import Config, generator, plan_round, server_update, simulate
from distlab.models import largest_difference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def updates(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(n)]


def total(us):
    return [torch.stack(layer).sum(0) for layer in zip(*us)]


def quantized_sum(secure, us):
    return [t % secure.modulus for t in total([secure.quantize(u) for u in us])]


def test_the_server_gets_the_quantized_sum_exactly_and_the_real_sum_within_the_quantization_error():
    secure, us = SecureAggregation(6, seed=1), updates(6)
    masked = {k: secure.mask(k, u) for k, u in enumerate(us)}
    for got, want in zip(secure.masked_sum(masked), quantized_sum(secure, us)):
        assert got.dtype == torch.long and torch.equal(got, want)
    error = largest_difference(secure.unmask_sum(masked), total(us))
    assert 0 < error <= 6 * secure.quantum / 2 + 1e-6  # each client's rounding is at most half a quantum


def test_a_masked_update_is_uniform_mod_R_whatever_the_update():
    secure, counts = SecureAggregation(3, seed=5, bound=8.0), []
    for value in (0.0, 3.25, -8.0):
        update = [torch.full((4000,), value)]
        assert len(torch.unique(secure.quantize(update)[0])) == 1  # without masks: one value, the update in clear
        share = secure.mask(0, update)[0].double() / secure.modulus
        assert 0 <= share.min() and share.max() < 1
        observed = torch.histc(share, bins=16, min=0, max=1)
        chi2 = ((observed - 250) ** 2 / 250).sum().item()
        assert chi2 < 37.7  # χ² with 15 degrees of freedom: p = 0.001
        assert abs(share.mean().item() - 0.5) < 0.02 and abs(share.var().item() - 1 / 12) < 0.01
        counts.append(observed)
    assert (counts[0] - counts[1]).abs().max() < 100  # the same flat histogram for every update


def test_clipped_extremes_still_sum_without_wrapping_around():
    secure = SecureAggregation(5, seed=3, bound=4.0)
    for value, expected in ((1e9, 20.0), (-4.0, -20.0)):  # beyond the bound: clipped to ±4 per client
        masked = {k: secure.mask(k, [torch.full((7,), value)]) for k in range(5)}
        assert torch.equal(secure.unmask_sum(masked)[0], torch.full((7,), expected))


def test_a_dropped_clients_masks_are_recovered_from_the_survivors():
    secure, us = SecureAggregation(5, seed=2), updates(5)
    masked = {k: secure.mask(k, u) for k, u in enumerate(us) if k != 2}  # client 2 masked, then never replied
    survivors = [u for k, u in enumerate(us) if k != 2]
    naive = [torch.stack(layer).sum(0) % secure.modulus for layer in zip(*masked.values())]
    assert not torch.equal(naive[0], quantized_sum(secure, survivors)[0])  # 2's partners' masks stay in
    for got, want in zip(secure.masked_sum(masked), quantized_sum(secure, survivors)):
        assert torch.equal(got, want)


def test_too_few_bits_for_the_clients_and_bound_is_refused():
    with pytest.raises(ValueError, match="raise bits or lower bound"):
        SecureAggregation(100, bound=1024.0, bits=16)


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


def test_poisson_sampling_draws_each_client_independently_with_the_rate():
    config, n, q, rounds = poisson_sampling(Config(clip=1.0), 0.4), 50, 0.4, 600
    plans = [plan_round([10] * n, config, r) for r in range(rounds)]
    counts = torch.tensor([len(p) for p in plans], dtype=torch.float64)
    assert abs(counts.mean().item() - n * q) < 0.5  # Binomial(50, 0.4): mean 20, variance 12
    assert 8 < counts.var().item() < 17  # exactly round(C·n) clients a round would give variance 0
    joined = torch.zeros(n)
    for plan in plans:
        joined[[k for k, _ in plan]] += 1
    assert ((joined / rounds - q).abs() < 0.1).all()  # every client, not only some, at the rate


def test_the_poisson_server_divides_the_noisy_sum_by_the_expected_count():
    config = poisson_sampling(Config(clip=0.5, noise_multiplier=1.0, seed=3), 0.4)
    params, results = [torch.zeros(3, 4), torch.zeros(5)], [(u, 10) for u in updates(7)]
    got = server_update(params, results, config, ServerOptimizer("sgd", config.server_lr), 2, 50)
    noisy = gaussian_noise(total([clip_update(u, 0.5) for u, _ in results]), 0.5, generator(3, 2, 4))
    assert largest_difference(got, [t / (0.4 * 50) for t in noisy]) < 1e-6


def test_epsilon_from_opacus_behaves_like_a_privacy_budget():
    # One full-batch Gaussian release (q = 1): the RDP bound min_a a/(2 sigma^2) + log(1/delta)/(a-1)
    # caps it, and opacus's tighter conversion lands just below.
    classic = min(a / 2 + math.log(1e5) / (a - 1) for a in [1 + i / 100 for i in range(1, 10000)])
    assert 0.8 * classic < epsilon(1.0, 1.0, 1, 1e-5) <= classic
    assert epsilon(2.0, 0.1, 50) < epsilon(1.0, 0.1, 50) < epsilon(1.0, 0.1, 100)  # more noise, fewer rounds
    assert epsilon(0.0, 0.1, 10) == math.inf


def test_epsilon_grows_sublinearly_like_the_square_root_of_the_rounds():
    for rounds in (10, 20, 40):
        ratio = epsilon(1.0, 0.4, 4 * rounds) / epsilon(1.0, 0.4, rounds)
        assert ratio < 4 and math.log(ratio, 4) < 0.65  # 4× the rounds: about √4 = 2× the ε, far from 4×


def test_dp_noise_costs_accuracy_and_clipping_alone_does_not():
    fed = fd.digits(50, "iid")
    base = dict(rounds=15, epochs=1, batch_size=10, lr=0.1)
    clean = simulate(fed, Config(**base, fraction=0.4)).accuracy
    clipped = simulate(fed, poisson_sampling(Config(**base, clip=1.0), 0.4)).accuracy
    noisy = simulate(fed, poisson_sampling(Config(**base, clip=1.0, noise_multiplier=2.0), 0.4)).accuracy
    assert clipped > clean - 0.05 and noisy < clipped - 0.1
