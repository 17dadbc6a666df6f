"""Federated learning on real processes: rank 0 is the server, ranks 1..W-1 host the clients.

Each round the server broadcasts the global model; every client rank trains the sampled clients
assigned to it (client i of the round goes to rank 1 + i mod (W-1)), one after another, and sends
each update with its example count; the server aggregates and steps its optimizer. The round plan
(sampling, dropouts, stragglers) comes from the shared seed, so every rank knows it without asking;
a real server would send it. Same plan, same batches, same arithmetic as simulation.simulate.

The server is a single point of failure: if it dies, a client's next wait on it fails (gloo sees the
connection close) and the client raises `ServerLost`, saying which round it lost. With `checkpoint=True`
the server saves the global model and its optimizer after every completed round, and a restarted launch
(`dl.launch(..., restarts=1)`, `ctx.attempt` > 0) resumes from the last one, as Bonawitz et al. (2019)
describe: a failed round is abandoned and retried.

    run = dl.launch(train_federated, world_size=4, fed=fed, config=config)
    run.results[0]   # the final global model (list of tensors)
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector as flatten

from ...ranks import world_sizes
from ...resilience.checkpoint import checkpoint_path, save_atomically, saved_steps
from ...resilience.faults import Faults
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


class ServerLost(RuntimeError):
    """A client rank's wait on the server failed: the server is gone."""


def unflatten(flat: torch.Tensor, like: Update) -> Update:
    return [chunk.view_as(p).clone() for chunk, p in zip(flat.split([p.numel() for p in like]), like)]


@world_sizes(lambda n, **_: n >= 2, "federated learning needs a server rank and at least one client rank")
def train_federated(ctx, fed: Federation, config: Config, checkpoint: bool = False,
                    faults: Faults | dict | None = None) -> Update | None:
    """The rank function: the server's final global model on rank 0, None on the client ranks.

    checkpoint: the server saves its state after each round in the run folder and resumes from the last
    one (after a restart). faults: e.g. Faults(kill_at={0: 3}) kills the server mid-round 3 (after the
    round's first update arrived), on the first attempt only."""
    faults = Faults(**faults) if isinstance(faults, dict) else faults or Faults()
    params = initial_params(config)
    optimizer = ServerOptimizer(config.server, config.server_lr)
    folder = ctx.run_dir / "checkpoints"
    first = 0
    if checkpoint:  # the server says where to start: round 0, or the round after its last checkpoint
        saved = restore_server(folder, optimizer, ctx.device) if ctx.rank == 0 else None
        if saved is not None:
            params, first = saved
        start = torch.tensor([first], device=ctx.device)
        with server_watch(ctx, 0):
            first = int(ctx.comm.broadcast(start, tag="control").item())
    attackers = attackers_of(fed.num_clients, config)
    workers = ctx.world_size - 1
    flat = flatten(params)
    ctx.set_total(config.rounds)
    for r in range(first, config.rounds):
        with server_watch(ctx, r):
            ctx.comm.broadcast(flat, src=0)
        params = unflatten(flat, params)
        plan = plan_round(fed.sizes, config, r)
        if ctx.rank == 0:
            results = []
            for i in range(len(plan)):
                results.append(receive_update(ctx, params, src=1 + i % workers))
                if i == 0:
                    faults.after_step(ctx, r)  # a planned death lands mid-round: the round never completes
            params = server_update(params, results, config, optimizer, r, fed.num_clients)
            flat = flatten(params)
            if checkpoint:
                save_server(folder, r + 1, params, optimizer)
            ctx.log(step=r + 1, clients=len(plan), attempt=ctx.attempt, **evaluate(params, fed.x_test, fed.y_test))
        else:
            for i, (client, steps) in enumerate(plan):
                if 1 + i % workers == ctx.rank:
                    x, y = client_data(fed, client, config, attackers)
                    update = train_client(params, x, y, batches(len(y), steps, config, r, client), config)
                    with server_watch(ctx, r):
                        send_update(ctx, poison(update, client, config, attackers), len(y))
            ctx.log(step=r + 1)
    return params if ctx.rank == 0 else None


@contextmanager
def server_watch(ctx, round: int):
    """Around one exchange with the server: on a client, a broken connection becomes ServerLost (logged first)."""
    try:
        yield
    except RuntimeError as error:
        if ctx.rank == 0:
            raise
        ctx.log(step=round + 1, server_lost=1)
        cause = str(error).splitlines()[0][:160]
        lost = f"client rank {ctx.rank}: lost the server (rank 0) in round {round + 1}: {cause}"
        print(lost, flush=True)  # shown live: the launcher reports the server's death, the root cause, not this
        raise ServerLost(lost) from error


def save_server(folder: Path, next_round: int, params: Update, optimizer: ServerOptimizer) -> None:
    """The server's state after a completed round: the global model and the server optimizer's moments."""
    state = {"params": params, "m": optimizer.m, "v": optimizer.v, "next_round": next_round}
    save_atomically(state, checkpoint_path(folder, 0, next_round))
    for old in sorted(saved_steps(folder))[:-2]:
        checkpoint_path(folder, 0, old).unlink(missing_ok=True)


def restore_server(folder: Path, optimizer: ServerOptimizer, device) -> tuple[Update, int] | None:
    """(global model, next round) from the newest checkpoint, the optimizer's moments restored; None if none."""
    rounds = sorted(saved_steps(folder)) if folder.exists() else []
    if not rounds:
        return None
    state = torch.load(checkpoint_path(folder, 0, rounds[-1]), map_location="cpu", weights_only=True)
    moved = {key: None if state[key] is None else [t.to(device) for t in state[key]] for key in ("params", "m", "v")}
    optimizer.m, optimizer.v = moved["m"], moved["v"]
    return moved["params"], state["next_round"]


def send_update(ctx, update: Update, num_examples: int) -> None:
    """One message to the server: the flat update with the example count appended."""
    ctx.comm.send(torch.cat([flatten(update), torch.tensor([float(num_examples)])]), dst=0)


def receive_update(ctx, like: Update, src: int) -> tuple[Update, int]:
    message = ctx.comm.recv(torch.empty(sum(p.numel() for p in like) + 1), src=src)
    return unflatten(message[:-1], like), int(message[-1])
