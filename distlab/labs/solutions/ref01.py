"""Lab 01: reference solutions."""

import torch
import torch.nn.functional as F


def average_gradients(ctx, model):
    """One all-reduce per parameter (sum), then divide by the number of ranks: the mean gradient."""
    for p in model.parameters():
        ctx.comm.all_reduce(p.grad)
        p.grad.div_(ctx.world_size)


def model_parallel_step(ctx, stage, x, y):
    """Stage 0: forward, send the activations, receive their gradient, backward. Stage 1: receive, forward,
    loss, backward, send the gradient of its input back; it returns the loss."""
    if ctx.rank == 0:
        out = stage(x)
        ctx.comm.send(out.detach(), 1)
        grad = ctx.comm.recv(torch.empty_like(out), 1)
        out.backward(grad)
        return None
    inputs = ctx.comm.recv(torch.empty(len(x), stage[0].in_features, device=x.device), 0)
    inputs.requires_grad_()
    loss = F.cross_entropy(stage(inputs), y)
    loss.backward()
    ctx.comm.send(inputs.grad, 0)
    return loss
