"""Decentralized training by gossip: D-PSGD (Lian et al. 2017) and randomized pairwise gossip (Boyd et al. 2006).

No server, no all-reduce: every rank keeps its own model, takes an SGD step on its own shard, then
averages with its neighbours only, through the mixing matrix W of a graph (topology.py):

    x_i <- sum_j W_ij (x_j - lr * g_j)

Lian et al. mix first and step after (so sending overlaps the backward pass); we step first, then
mix (Koloskova et al. 2020), so that on a fully connected graph (W = 1/N everywhere) one step is
exactly data-parallel SGD — `algorithm="allreduce"`, the baseline, in the same function.
Every step also measures the consensus distance (Kong et al. 2021) of the living replicas.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .. import data, models
from ..communication.cost import ring_allreduce_bytes
from ..ranks import world_sizes
from . import topology as topo

ALGORITHMS = ("dpsgd", "pairwise", "allreduce")


def exchange(flat: torch.Tensor, peers: list[int], comm=None) -> dict[int, torch.Tensor]:
    """Send x to every peer and receive each peer's x, all posted at once (isend/irecv): no send order can
    deadlock, and different neighbours run together. Through `comm` (ctx.comm) run.comm counts each one."""
    inbox = {j: torch.empty_like(flat) for j in peers}
    send, receive = (comm.isend, comm.irecv) if comm is not None else (dist.isend, dist.irecv)
    pending = [send(flat, j) for j in peers] + [receive(inbox[j], j) for j in peers]
    for transfer in pending:
        transfer.wait()
    return inbox


def mix(rank: int, flat: torch.Tensor, inbox: dict[int, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """This rank's row of W applied: W_ii x_i + sum over neighbours of W_ij x_j."""
    out = float(w[rank, rank]) * flat
    for j, theirs in inbox.items():
        out += float(w[rank, j]) * theirs
    return out


def consensus_distance(flat: torch.Tensor, group, n: int) -> float:
    """sqrt(mean_i |x_i - mean x|^2) over the n ranks of `group`, in float64. Two all-reduces: a
    measurement, not part of the algorithm, and not counted in `sent_bytes`."""
    x = flat.double()
    total = x.clone()
    dist.all_reduce(total, group=group)
    square = (x - total / n).pow(2).sum().reshape(1)
    dist.all_reduce(square, group=group)
    return math.sqrt(square.item() / n)


def alive_at(n: int, leave: dict[int, int], step: int) -> tuple[int, ...]:
    """The ranks still training at `step` when ranks leave on a schedule ({rank: step it stops at})."""
    return tuple(r for r in range(n) if leave.get(r, math.inf) > step)


class Membership:
    """Who is alive at each step when ranks leave on a schedule, known to all.

    One process group per set of survivors, created up front by every rank (new_group is collective),
    so the survivors can still measure their consensus after a rank is gone.
    """

    def __init__(self, graph: list, leave: dict[int, int]):
        self.n, self.leave = len(graph), leave
        self.groups = {}
        for at in sorted(set(leave.values())):
            self.groups[self.alive(at)] = dist.new_group(list(self.alive(at)))

    def alive(self, step: int) -> tuple[int, ...]:
        return alive_at(self.n, self.leave, step)

    def group(self, step: int):
        return self.groups.get(self.alive(step))  # None: the default group, everyone

    def close(self, rank: int) -> None:
        for members, group in self.groups.items():
            if rank in members:
                dist.destroy_process_group(group)


def check_options(graph: list, algorithm: str, steps: int, mix_every: int, leave: dict[int, int]) -> None:
    """Refuse what cannot run, before any rank sends anything (ValueError naming the argument)."""
    n = len(graph)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if steps < 1 or mix_every < 1:
        raise ValueError(f"steps and mix_every must be at least 1, got steps={steps}, mix_every={mix_every}")
    if any(not (0 <= rank < n and 1 <= at <= steps) for rank, at in leave.items()):
        raise ValueError(f"leave must map ranks in [0, {n}) to steps in [1, {steps}], got {leave}")
    for at in set(leave.values()):
        alive = alive_at(n, leave, at)
        if not alive or not topo.is_connected(graph, alive):
            raise ValueError(f"leave={leave} leaves the survivors {list(alive)} without a connected graph")


def departures_fit(n: int, topology: str = "ring", leave: dict | None = None, seed: int = 0, **_) -> bool:
    """The world-size rule of `train`: the ranks `leave` names exist, and their departures leave a connected graph."""
    leave = {int(r): int(k) for r, k in (leave or {}).items()}
    if not all(0 <= rank < n for rank in leave):
        return False
    graph = topo.graph(topology, n, seed=seed)
    return all(topo.is_connected(graph, alive_at(n, leave, at)) and alive_at(n, leave, at) for at in leave.values())


@world_sizes(departures_fit, "the ranks that `leave` names must be ranks of the launch, and the survivors must stay "
                             "connected")
def train(ctx, algorithm: str = "dpsgd", topology: str = "ring", steps: int = 200, lr: float = 0.2,
          batch: int = 32, mix_every: int = 1, leave: dict | None = None, eval_every: int = 20,
          same_start: bool = True, seed: int = 0, hidden: int = 32) -> dict:
    """Decentralized SGD of an MLP on this rank's shard of digits; mixes every `mix_every` steps.

    algorithm: "dpsgd" (fixed W of `topology`), "pairwise" (a random matching of its edges each
    round, the same on every rank), "allreduce" (the data-parallel baseline). `leave={rank: k}`: that
    rank stops before step k and the living reweight W among themselves. Logs per step: loss,
    consensus, sent_bytes (this step), and accuracy every `eval_every` steps; row step=0 is the start.
    """
    n, rank = ctx.world_size, ctx.rank
    graph = topo.graph(topology, n, seed=seed)
    leave = {int(r): int(k) for r, k in (leave or {}).items()}
    check_options(graph, algorithm, steps, mix_every, leave)
    members = Membership(graph, leave)
    fixed_w = functools.cache(lambda alive: topo.mixing_matrix(graph, alive))  # changes only when ranks leave
    torch.manual_seed(seed if same_start else seed + 1 + rank)
    model = models.mlp(64, hidden, 10)
    x, y, x_test, y_test = data.digits(rank, n, seed=seed)
    batches = data.minibatches(x, y, batch, seed, rank)
    matchings = torch.Generator().manual_seed(seed)  # shared: every rank draws the same matchings
    flat = parameters_to_vector(model.parameters()).detach()
    payload = flat.numel() * flat.element_size()
    ctx.set_total(steps)
    ctx.log(step=0, consensus=consensus_distance(flat, None, n), sent_bytes=0,
            accuracy=models.accuracy(model, x_test, y_test))
    sent, taken = 0, 0
    for step in range(1, steps + 1):
        alive = members.alive(step)
        if rank not in alive:
            break
        grad, loss = models.gradient(model, *next(batches))
        step_bytes = 0
        if algorithm == "allreduce":
            flat = flat - lr * ctx.comm.all_reduce(grad) / n
            step_bytes = round(ring_allreduce_bytes(payload, n))
        else:
            flat = flat - lr * grad
            if step % mix_every == 0:
                w = (fixed_w(alive) if algorithm == "dpsgd"
                     else topo.pairwise_matrix(topo.random_matching(graph, matchings, alive)))
                peers = [j for j in range(n) if j != rank and w[rank, j] > 0]
                flat = mix(rank, flat, exchange(flat, peers, ctx.comm), w)
                step_bytes = len(peers) * payload
        vector_to_parameters(flat, model.parameters())
        sent, taken = sent + step_bytes, step
        row = {"step": step, "loss": loss, "consensus": consensus_distance(flat, members.group(step), len(alive)),
               "sent_bytes": step_bytes, "alive": len(alive)}
        if step % eval_every == 0 or step == steps:
            row["accuracy"] = models.accuracy(model, x_test, y_test)
        ctx.log(**row)
    members.close(rank)
    return {"accuracy": models.accuracy(model, x_test, y_test), "sent_bytes": sent, "steps": taken,
            "params": flat.clone()}
