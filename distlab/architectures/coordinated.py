"""Hybrid architecture: a coordinator assigns the work, workers exchange parameters peer to peer.

Rank 0 holds no model. It gives each worker a data shard, and before every round tells each worker
whom to average with (a random matching, randomized pairwise gossip as in Boyd et al. 2006); workers
train locally and swap parameters directly with their partner. Control messages are a few bytes;
the parameters never pass through the coordinator (outline 2.1: master for task assignment,
peer-to-peer for the data).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .. import data, models
from . import topology as topo


def train(ctx, rounds: int = 20, local_steps: int = 5, lr: float = 0.2, batch: int = 32,
          seed: int = 0, hidden: int = 32) -> dict:
    """Rank 0 coordinates `rounds` rounds; ranks 1.. each take `local_steps` SGD steps per round, then
    average with the partner the coordinator named."""
    if ctx.world_size < 3:
        raise ValueError(f"world_size must be at least 3 (a coordinator and two workers), got {ctx.world_size}")
    if ctx.rank == 0:
        return coordinate(ctx, rounds, seed)
    return work(ctx, rounds, local_steps, lr, batch, seed, hidden)


def coordinate(ctx, rounds: int, seed: int) -> dict:
    """Assign shards (a random permutation), then each round: send partners, collect losses."""
    workers = list(range(1, ctx.world_size))
    everyone = topo.graph("full", ctx.world_size)  # any two workers may be paired
    gen = torch.Generator().manual_seed(seed)
    shards = torch.randperm(len(workers), generator=gen).tolist()
    for worker, shard in zip(workers, shards):
        ctx.comm.send(torch.tensor([shard, len(workers)]), dst=worker, tag="control")
    schedule = []
    for round_ in range(1, rounds + 1):
        partner = topo.random_matching(everyone, gen, alive=workers)
        for worker in workers:
            ctx.comm.send(torch.tensor([partner[worker]]), dst=worker, tag="control")
        losses = [ctx.comm.recv(torch.zeros(1), src=worker, tag="control").item() for worker in workers]
        ctx.log(step=round_, loss=sum(losses) / len(losses))
        schedule.append(partner)
    return {"shards": dict(zip(workers, shards)), "schedule": schedule}


def swap_and_average(ctx, flat: torch.Tensor, partner: int) -> torch.Tensor:
    """Blocking send/recv in an order both sides agree on (the lower rank sends first), then the mean."""
    theirs = torch.empty_like(flat)
    if ctx.rank < partner:
        ctx.comm.send(flat, dst=partner)
        ctx.comm.recv(theirs, src=partner)
    else:
        ctx.comm.recv(theirs, src=partner)
        ctx.comm.send(flat, dst=partner)
    return (flat + theirs) / 2


def work(ctx, rounds: int, local_steps: int, lr: float, batch: int, seed: int, hidden: int) -> dict:
    shard, count = ctx.comm.recv(torch.zeros(2, dtype=torch.int64), src=0, tag="control").tolist()
    x, y, x_test, y_test = data.digits(shard, count, seed=seed)
    torch.manual_seed(seed)
    model = models.mlp(64, hidden, 10)
    flat = parameters_to_vector(model.parameters()).detach()
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    for round_ in range(1, rounds + 1):
        partner = int(ctx.comm.recv(torch.zeros(1, dtype=torch.int64), src=0, tag="control"))
        for _ in range(local_steps):
            grad, loss = models.gradient(model, *next(batches))
            flat = flat - lr * grad
            vector_to_parameters(flat, model.parameters())
        if partner >= 0:
            flat = swap_and_average(ctx, flat, partner)
            vector_to_parameters(flat, model.parameters())
        ctx.comm.send(torch.tensor([loss]), dst=0, tag="control")
        ctx.log(step=round_, loss=loss, partner=partner)
    return {"shard": shard, "accuracy": models.accuracy(model, x_test, y_test), "params": flat.clone()}
