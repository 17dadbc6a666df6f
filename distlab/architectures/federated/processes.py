"""Federated learning on real processes: rank 0 is the server, ranks 1..W-1 host the clients.

Each round the server broadcasts the global model; every client rank trains the sampled clients
assigned to it (client i of the round goes to rank 1 + i mod (W-1)), one after another, and sends
each update with its example count; the server aggregates and steps its optimizer. The round plan
(sampling, dropouts, stragglers) comes from the shared seed, so every rank knows it without asking;
a real server would send it. Same plan, same batches, same arithmetic as federated_sim.simulate.

    run = dl.launch(train_federated, world_size=4, fed=fed, config=config)
    run.results[0]   # the final global model (list of tensors)
"""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector as flatten

from .aggregation import ServerOptimizer, Update
from .partition import Federation
from .simulation import (
    Config,
    attackers_of,
    batches,
    client_data,
    evaluate,
    initial_params,
    plan_round,
    poison,
    server_update,
    train_client,
)


def unflatten(flat: torch.Tensor, like: Update) -> Update:
    return [chunk.view_as(p).clone() for chunk, p in zip(flat.split([p.numel() for p in like]), like)]


def train_federated(ctx, fed: Federation, config: Config) -> Update | None:
    """The rank function: the server's final global model on rank 0, None on the client ranks."""
    if ctx.world_size < 2:
        raise ValueError(f"world_size must be >= 2 (a server and at least one client rank), got {ctx.world_size}")
    params = initial_params(config)
    optimizer = ServerOptimizer(config.server, config.server_lr)
    attackers = attackers_of(fed.num_clients, config)
    workers = ctx.world_size - 1
    flat = flatten(params)
    ctx.set_total(config.rounds)
    for r in range(config.rounds):
        ctx.comm.broadcast(flat, src=0)
        params = unflatten(flat, params)
        plan = plan_round(fed.sizes, config, r)
        if ctx.rank == 0:
            results = [receive_update(ctx, params, src=1 + i % workers) for i in range(len(plan))]
            params = server_update(params, results, config, optimizer, r, fed.num_clients)
            flat = flatten(params)
            ctx.log(step=r + 1, clients=len(plan), **evaluate(params, fed.x_test, fed.y_test))
        else:
            for i, (client, steps) in enumerate(plan):
                if 1 + i % workers == ctx.rank:
                    x, y = client_data(fed, client, config, attackers)
                    update = train_client(params, x, y, batches(len(y), steps, config, r, client), config)
                    send_update(ctx, poison(update, client, config, attackers), len(y))
            ctx.log(step=r + 1)
    return params if ctx.rank == 0 else None


def send_update(ctx, update: Update, num_examples: int) -> None:
    """One message to the server: the flat update with the example count appended."""
    ctx.comm.send(torch.cat([flatten(update), torch.tensor([float(num_examples)])]), dst=0)


def receive_update(ctx, like: Update, src: int) -> tuple[Update, int]:
    message = ctx.comm.recv(torch.empty(sum(p.numel() for p in like) + 1), src=src)
    return unflatten(message[:-1], like), int(message[-1])
