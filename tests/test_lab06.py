"""Lab 06: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from distlab.labs import grading
from distlab.labs.solutions import ref06


def _moments(state, param, grad, beta1, beta2):
    if not state:
        state.update(t=0, m=torch.zeros_like(param), v=torch.zeros_like(param))
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return state["m"], state["v"]


def no_bias_correction(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    m, v = _moments(state, param, grad, *betas)
    param.sub_(lr * m / (v.sqrt() + eps))


def eps_inside_the_sqrt(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    m, v = _moments(state, param, grad, *betas)
    state["t"] += 1
    param.sub_(lr * (m / (1 - betas[0] ** state["t"])) / (v / (1 - betas[1] ** state["t"]) + eps).sqrt())


def betas_swapped(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    ref06.adam_step(param, grad, state, lr, betas[::-1], eps)


def t_from_zero(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Uses t, then increments it: the first bias correction divides by 1 - beta^0 = 0."""
    m, v = _moments(state, param, grad, *betas)
    t = state["t"]
    param.sub_(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    state["t"] += 1


def t_from_two(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Starts the counter at 1, then increments it before the first use."""
    if not state:
        state.update(t=1, m=torch.zeros_like(param), v=torch.zeros_like(param))
    ref06.adam_step(param, grad, state, lr, betas, eps)


def gradient_not_squared(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    if not state:
        state.update(t=0, m=torch.zeros_like(param), v=torch.zeros_like(param))
    state["t"] += 1
    state["m"].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    state["v"].mul_(betas[1]).add_(grad, alpha=1 - betas[1])
    m_hat, v_hat = state["m"] / (1 - betas[0] ** state["t"]), state["v"] / (1 - betas[1] ** state["t"])
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def returns_a_new_tensor(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    param = param.clone()
    ref06.adam_step(param, grad, state, lr, betas, eps)
    return param


@pytest.mark.parametrize("solution, says", [
    (no_bias_correction, "you left out the bias correction"),
    (eps_inside_the_sqrt, "ε inside the square root"),
    (betas_swapped, "β₁ and β₂ are swapped"),
    (t_from_zero, "which is 0 at t = 0"),
    (t_from_two, "step counter is off by one"),
    (gradient_not_squared, "v must accumulate g²"),
    (returns_a_new_tensor, "you returned a new tensor"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_adam_gets_its_diagnosis(solution, says):
    verdict = grading.grade("06.adam_step", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_an_unnamed_adam_mistake_names_the_step_and_the_element():
    def lr_twice(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        ref06.adam_step(param, grad, state, 2 * lr if state.get("t") == 2 else lr, betas, eps)

    verdict = grading.grade("06.adam_step", lr_twice)
    assert verdict.status == "wrong" and verdict.summary.startswith("after step 3 the parameter is wrong at element")


def _shard(ctx, flat_param):
    shard = math.ceil(flat_param.numel() / ctx.world_size)
    return shard, slice(ctx.rank * shard, (ctx.rank + 1) * shard), shard * ctx.world_size - flat_param.numel()


def updates_everything(ctx, flat_param, grad, state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """Right parameters, but m and v for the whole vector on every rank: nothing sharded."""
    ref06.adam_step(flat_param, ctx.comm.all_reduce(grad.clone()).div_(ctx.world_size), state, lr, betas, eps)
    return flat_param


def not_gathered(ctx, flat_param, grad, state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """Updates its own shard of flat_param and stops there."""
    _, mine, pad = _shard(ctx, flat_param)
    grad = F.pad(ctx.comm.all_reduce(grad.clone()).div_(ctx.world_size), (0, pad))[mine]
    piece = F.pad(flat_param, (0, pad))[mine].clone()
    ref06.adam_step(piece, grad, state, lr, betas, eps)
    end = min(mine.stop, flat_param.numel())
    flat_param[mine.start:end] = piece[:end - mine.start]
    return flat_param


def _sharded_with(gradient):
    def step(ctx, flat_param, grad, state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        _, mine, pad = _shard(ctx, flat_param)
        piece = F.pad(flat_param, (0, pad))[mine].clone()
        ref06.adam_step(piece, F.pad(gradient(ctx, grad), (0, pad))[mine], state, lr, betas, eps)
        flat_param.copy_(torch.cat(ctx.comm.all_gather(piece))[:flat_param.numel()])
        return flat_param
    return step


not_averaged = _sharded_with(lambda ctx, grad: grad)
summed = _sharded_with(lambda ctx, grad: ctx.comm.all_reduce(grad.clone()))


def not_in_place(ctx, flat_param, grad, state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    return ref06.zero1_step(ctx, flat_param.clone(), grad, state, lr, betas, eps)


@pytest.mark.parametrize("solution, says", [
    (updates_everything, "m and v of the whole vector: every rank updates everything"),
    (not_gathered, "the ranks disagree"),
    (not_averaged, "followed Adam on one rank's own gradient"),
    (summed, "followed Adam on the sum of the gradients"),
    (not_in_place, "write it into flat_param"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_zero1_step_gets_its_diagnosis(solution, says):
    verdict = grading.grade("06.zero1_step", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
