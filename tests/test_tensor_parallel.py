"""Tensor parallelism: Megatron layers and block against the unsharded block, parallelize_module beside it,
and data x tensor on a 2x2 DeviceMesh."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distlab as dl
from distlab import gpt
from distlab.parallel import tensor as tp

TP = 4  # the GPT's 4 heads: one per rank


def unsharded_block():
    """The block, its output on the shared input and its gradients for loss = mean(out^2)."""
    block = gpt.gpt(gpt.GPTConfig(n_layer=1), 0)[1]
    out = block(tp.block_input())
    out.pow(2).mean().backward()
    return out.detach(), {n: q.grad for n, q in block.named_parameters()}


def assert_matches_unsharded(results):
    out, grads = unsharded_block()
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["out"], out, atol=1e-5, rtol=0)
        assert set(r["grads"]) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(r["grads"][name], tp.shard_of(name, g, rank, TP), atol=1e-5, rtol=0, msg=name)


def test_column_shards_concatenate_and_row_shards_sum_to_the_full_linear():
    torch.manual_seed(0)
    full, x = nn.Linear(8, 6), torch.randn(3, 8)
    columns = [tp.ColumnParallelLinear(full, r, 2)(x) for r in range(2)]
    torch.testing.assert_close(torch.cat(columns, dim=-1), full(x), atol=1e-6, rtol=0)
    rows = [tp.RowParallelLinear(full, r, 2, reduce=None) for r in range(2)]
    partial = sum(F.linear(x.chunk(2, dim=-1)[r], rows[r].weight) for r in range(2))
    torch.testing.assert_close(partial + rows[0].bias, full(x), atol=1e-6, rtol=0)


@pytest.mark.timeout(120)
def test_megatron_block_equals_the_unsharded_block_with_two_all_reduces_each_way():
    run = dl.launch(tp.sharded_block_step, world_size=TP, timeout=90)
    assert_matches_unsharded(run.results)
    for r in run.results:  # f and g once for attention, once for the MLP
        assert (r["forward_reduces"], r["backward_reduces"]) == (2, 2)
    activation = 4 * gpt.GPTConfig().block_size * gpt.GPTConfig().d_model * 4  # batch x T x d float32
    assert (run.comm["bytes"] == activation).all() and len(run.comm) == 4 * TP


@pytest.mark.timeout(120)
def test_parallelize_module_equals_the_unsharded_block():
    run = dl.launch(tp.builtin_block_step, world_size=TP, timeout=90)
    assert_matches_unsharded(run.results)
    for r in run.results:  # forward like Megatron; backward reduces q, k, v and fc input gradients one by one
        assert (r["forward_reduces"], r["backward_reduces"]) == (2, 4)


@pytest.mark.timeout(120)
def test_data_x_tensor_on_a_2x2_mesh_trains_like_one_process():
    losses, _ = gpt.train_single(steps=3, lr=0.1)
    run = dl.launch(tp.data_tensor, world_size=4, timeout=90, steps=3)
    by_replica = {r["dp_rank"]: r["losses"] for r in run.results}
    for r in run.results:  # both shards of a replica compute the same loss
        assert r["losses"] == pytest.approx(by_replica[r["dp_rank"]], abs=1e-6)
    mean = [sum(step) / 2 for step in zip(*by_replica.values())]
    assert mean == pytest.approx(losses, abs=1e-5)
    assert set(run.comm["tag"]) == {"tp", "dp"}
    tp_reduces = run.comm[run.comm["tag"] == "tp"].groupby("rank").size()
    assert (tp_reduces == 3 * 4 * gpt.GPTConfig().n_layer).all()  # 2 forward + 2 backward per block per step


def test_heads_must_split_evenly():
    attn = gpt.Attention(gpt.GPTConfig())
    with pytest.raises(ValueError, match="tp=3"):
        tp.tp_attention(attn, 0, 3, reduce=None)


@pytest.mark.parametrize("fn, kwargs, sizes", [(tp.sharded_block_step, {}, "1, 2, 4"),
                                               (tp.builtin_block_step, {}, "1, 2, 4"),
                                               (tp.data_tensor, {"dp": 2, "tp": 2}, "4"),
                                               (tp.data_tensor, {"dp": 3, "tp": 2}, "6")])
def test_a_world_size_that_splits_no_heads_evenly_is_refused_before_any_process_starts(tmp_path, fn, kwargs, sizes):
    with pytest.raises(dl.WorldSizeError, match=rf"{fn.__name__} cannot run on 3 rank\(s\).* runs on: {sizes}\."):
        dl.launch(fn, world_size=3, runs_root=str(tmp_path), **kwargs)
    assert not any(tmp_path.iterdir())
