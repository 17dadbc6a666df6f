"""The distributed forms of the optimizers on real gloo ranks: gradient averaging, local SGD's bytes,
ZeRO-1 against unsharded Adam and ZeroRedundancyOptimizer, gradient noise against N, large batches."""

import math

import pytest
import torch
import torch.nn.functional as F

import distlab as dl
from distlab.optim import distributed as do
from distlab.optim.rules import SGD

MLP_PARAMS = 64 * 64 + 64 + 64 * 10 + 10  # the digits MLP 64-64-10 of the rank functions
ZERO_SIZES = (64, 64, 64, 64, 10)
ZERO_PARAMS = 3 * (64 * 64 + 64) + 64 * 10 + 10


def one_averaged_step(ctx, batch=8):
    """One SGD step on gradients averaged over the ranks, each on its own `batch` examples."""
    x, y, _, _ = dl.data.digits()
    torch.manual_seed(0)
    model = dl.models.mlp(64, 64, 10)
    mine = slice(ctx.rank * batch, (ctx.rank + 1) * batch)
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    do.average_gradients(model, ctx.comm)
    SGD(model.parameters(), lr=0.5).step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.timeout(120)
def test_averaging_gradients_over_n_ranks_is_one_step_on_the_n_times_larger_batch():
    """θ − η·(1/N)Σᵢ∇Jᵢ(θ) on N ranks of b examples = θ − η∇J(θ) on the N·b examples together."""
    run = dl.launch(one_averaged_step, world_size=4, timeout=60)
    x, y, _, _ = dl.data.digits()
    torch.manual_seed(0)
    model = dl.models.mlp(64, 64, 10)
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    SGD(model.parameters(), lr=0.5).step()
    alone = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for params in run.results:
        assert (params - alone).abs().max() < 1e-6
    assert run.comm.groupby("rank")["bytes"].sum().tolist() == [4 * MLP_PARAMS] * 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer, hyper", [("momentum", {"lr": 0.1, "momentum": 0.9}), ("adam", {"lr": 1e-3})])
def test_ranks_with_our_optimizers_on_averaged_gradients_stay_identical(optimizer, hyper):
    """Each rank sees other data (its loss differs), yet every replica ends with the same model."""
    steps = 20
    run = dl.launch(do.train_optimizer, world_size=4, timeout=60, optimizer=optimizer, steps=steps, **hyper)
    assert len(set(run.results)) == 1
    losses = run.metrics.pivot(index="step", columns="rank", values="loss")
    assert (losses[0] != losses[1]).all()
    assert run.comm.groupby("rank")["bytes"].sum().tolist() == [steps * 4 * MLP_PARAMS] * 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("every", [1, 4, 16])
def test_local_sgd_sends_params_times_4_bytes_every_h_steps(every):
    steps = 32
    run = dl.launch(do.train_local_sgd, world_size=4, timeout=60, every=every, steps=steps)
    sent = run.comm.groupby("rank")["bytes"].agg(["sum", "count"])
    assert sent["sum"].tolist() == [MLP_PARAMS * 4 * (steps // every)] * 4
    assert sent["count"].tolist() == [steps // every] * 4
    assert len({r["accuracy"] for r in run.results}) == 1  # averaged at the end: one model


def test_local_sgd_refuses_a_period_below_one():
    with pytest.raises(ValueError, match="every"):
        do.train_local_sgd(None, every=0)


def _sends_as_the_ring_counts_say(sent: dict, n: int) -> None:
    """Ring counts of every collective's buffer, per rank and step (float64, P padded to N·⌈P/N⌉): data parallelism's
    all-reduce 2(N-1)/N·8P; ZeRO-1 by reduce-scatter + all-gather the same (padded); the naive all-reduce +
    all-gather 3(N-1)/N·8P: half again."""
    padded, share = n * math.ceil(ZERO_PARAMS / n), (n - 1) / n
    assert sent["adam"] == pytest.approx(2 * share * 8 * ZERO_PARAMS) == pytest.approx(sent["torch"])
    assert sent["reduce_scatter"] == pytest.approx(2 * share * 8 * padded)
    assert sent["sharded"] == pytest.approx(2 * share * 8 * ZERO_PARAMS + share * 8 * padded)
    assert sent["sharded"] / sent["reduce_scatter"] == pytest.approx(1.5, rel=1e-3)


@pytest.mark.timeout(120)
def test_zero1_by_hand_and_zero_redundancy_optimizer_match_adam_with_n_times_less_state():
    """Both hand-written forms (all-reduce + all-gather, reduce-scatter + all-gather) and ZeroRedundancyOptimizer."""
    run = dl.launch(do.compare_zero, world_size=4, timeout=90, steps=10, sizes=ZERO_SIZES, dtype=torch.float64)
    full = 2 * ZERO_PARAMS * 8  # m and v, float64
    for result in run.results:
        assert result["params"] == ZERO_PARAMS
        assert result["sharded_vs_adam"] < 1e-9 and result["zero_vs_torch"] < 1e-9 and result["adam_vs_torch"] < 1e-9
        assert result["state_bytes"]["adam"] == full
        assert result["state_bytes"]["sharded"] == 2 * math.ceil(ZERO_PARAMS / 4) * 8  # N× less of the padded P
        assert result["state_bytes"]["adam"] / result["state_bytes"]["sharded"] == pytest.approx(3.9994, abs=1e-4)
        assert result["reduce_scatter_vs_adam"] < 1e-9
        assert result["state_bytes"]["reduce_scatter"] == result["state_bytes"]["sharded"]
        _sends_as_the_ring_counts_say(result["sent_per_step"], n=4)
    zero = [r["state_bytes"]["zero"] for r in run.results]
    torch_adam = run.results[0]["state_bytes"]["torch"]  # m, v and a step counter per tensor
    assert sum(zero) == torch_adam  # the shards partition the state
    assert max(zero) < torch_adam / 3  # whole tensors per rank: about, not exactly, N× less
    assert set(run.comm["op"]) == {"all_reduce", "all_gather"}



@pytest.mark.timeout(120)
def test_gradient_noise_of_the_average_over_n_ranks_shrinks_as_one_over_n():
    run = dl.launch(do.gradient_noise, world_size=4, timeout=90, batch=8, draws=40)
    variance = run.results[0]["variance"]
    assert all(r["variance"] == variance for r in run.results)
    assert sorted(variance) == [1, 2, 4]
    assert 1.4 < variance[1] / variance[2] < 2.8
    assert 2.5 < variance[1] / variance[4] < 6.5


@pytest.mark.timeout(180)
def test_linear_scaling_helps_at_moderate_global_batch_and_breaks_at_a_large_one():
    """Seeded runs, same epochs: at N·b = 128 η scaled ×4 (with warm-up) beats η kept; at N·b = 1024
    the scaled η (×32) ruins training."""
    def accuracy(batch, scale):
        return dl.launch(do.train_large_batch, world_size=4, timeout=90, batch=batch,
                         scale=scale).results[0]["accuracy"]

    moderate_scaled, moderate_kept = accuracy(32, True), accuracy(32, False)
    assert moderate_scaled > 0.85 and moderate_scaled > moderate_kept + 0.05
    assert accuracy(256, True) < moderate_scaled - 0.3


def test_scaling_rule_and_warmup_by_their_formulas():
    assert do.scaled_lr(0.1, 32, 256) == pytest.approx(0.8)
    assert [do.warmup_lr(s, 0.8, 4) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
