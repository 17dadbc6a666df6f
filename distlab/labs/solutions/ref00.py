"""Lab 00: reference solutions."""

import torch


def sum_by_send_recv(ctx, tensor):
    """Everyone sends to rank 0, rank 0 adds and sends the total back: 2(N - 1) messages, all through rank 0."""
    if ctx.rank == 0:
        total = tensor.clone()
        for src in range(1, ctx.world_size):
            total += ctx.comm.recv(torch.empty_like(tensor), src)
        for dst in range(1, ctx.world_size):
            ctx.comm.send(total, dst)
        return total
    ctx.comm.send(tensor, 0)
    return ctx.comm.recv(torch.empty_like(tensor), 0)
