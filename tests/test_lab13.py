"""Lab 13: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass in
test_labs.py)."""

import pytest
import torch
import torch.distributed as dist

from distlab.labs import grading
from distlab.labs.solutions import ref13
from distlab.optim.rules import adam_update


def zero2_with_all_reduce(ctx, params, grad, m, v, step, lr):
    """Plain data parallelism's all-reduce, then the slice: right numbers, the whole gradient held."""
    dist.all_reduce(grad)
    shard = params.numel() // ctx.world_size
    mine = slice(ctx.rank * shard, (ctx.rank + 1) * shard)
    my_params = params[mine].clone()
    adam_update(my_params, grad[mine] / ctx.world_size, m, v, step, lr, 0.9, 0.999, 1e-8)
    dist.all_gather_single(params, my_params)
    return params


def zero2_summed(ctx, params, grad, m, v, step, lr):
    """Forgot to divide the reduce-scattered slice by N."""
    shard = params.numel() // ctx.world_size
    my_grad = torch.empty(shard, device=grad.device)
    dist.reduce_scatter_single(my_grad, grad)
    my_params = params[ctx.rank * shard:(ctx.rank + 1) * shard].clone()
    adam_update(my_params, my_grad, m, v, step, lr, 0.9, 0.999, 1e-8)
    dist.all_gather_single(params, my_params)
    return params


def zero2_without_gather(ctx, params, grad, m, v, step, lr):
    """Updated its own slice in place and returned: the other slices never arrive."""
    shard = params.numel() // ctx.world_size
    my_grad = torch.empty(shard, device=grad.device)
    dist.reduce_scatter_single(my_grad, grad)
    adam_update(params[ctx.rank * shard:(ctx.rank + 1) * shard], my_grad / ctx.world_size, m, v, step, lr,
                0.9, 0.999, 1e-8)
    return params


@pytest.mark.parametrize("solution, says", [
    (zero2_with_all_reduce, "called all_reduce: ZeRO-2 never holds the whole averaged gradient"),
    (zero2_summed, "divide the slice by N"),
    (zero2_without_gather, "called all-gather 0 times"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_zero2_step_gets_its_diagnosis(solution, says):
    verdict = grading.grade("13.zero2_step", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def without_softmax(batch, seq, d_model, n_head):
    return ref13.block_activation_bytes(batch, seq, d_model, n_head) - 4 * batch * n_head * seq * seq


def without_mask(batch, seq, d_model, n_head):
    return ref13.block_activation_bytes(batch, seq, d_model, n_head) - seq * seq


def mlp_counted_once(batch, seq, d_model, n_head):
    return ref13.block_activation_bytes(batch, seq, d_model, n_head) - 4 * 4 * batch * seq * d_model


def in_elements(batch, seq, d_model, n_head):
    return 16 * batch * seq * d_model + batch * n_head * seq * seq + 4 * batch * seq + seq * seq


@pytest.mark.parametrize("solution, says", [
    (without_softmax, "the softmax's output"),
    (without_mask, "the causal mask"),
    (mlp_counted_once, "one 4d tensor of the MLP"),
    (in_elements, "that counts elements, not bytes"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_activation_formula_gets_its_diagnosis(solution, says):
    verdict = grading.grade("13.block_activation_bytes", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
