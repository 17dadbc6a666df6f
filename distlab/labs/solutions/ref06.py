"""Lab 06: reference solutions."""

import math

import torch
import torch.nn.functional as F

from distlab.optim.rules import adam_update


def adam_step(param, grad, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Kingma & Ba's Algorithm 1, one step in place; `state` keeps t, m and v between calls."""
    if not state:
        state.update(t=0, m=torch.zeros_like(param), v=torch.zeros_like(param))
    beta1, beta2 = betas
    state["t"] += 1
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = state["m"] / (1 - beta1 ** state["t"])
    v_hat = state["v"] / (1 - beta2 ** state["t"])
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def zero1_step(ctx, flat_param, grad, state, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """Average the gradient, Adam on this rank's ⌈P/N⌉ shard only (its m and v alone), all-gather the shards."""
    n, numel = ctx.world_size, flat_param.numel()
    shard = math.ceil(numel / n)
    mine = slice(ctx.rank * shard, (ctx.rank + 1) * shard)
    grad = ctx.comm.all_reduce(grad.clone()).div_(n)
    piece = F.pad(flat_param, (0, shard * n - numel))[mine].clone()
    if not state:
        state.update(t=0, m=torch.zeros_like(piece), v=torch.zeros_like(piece))
    state["t"] += 1
    adam_update(piece, F.pad(grad, (0, shard * n - numel))[mine], state["m"], state["v"], state["t"], lr, *betas, eps)
    flat_param.copy_(torch.cat(ctx.comm.all_gather(piece))[:numel])
    return flat_param
