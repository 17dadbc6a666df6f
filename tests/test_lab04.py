"""Lab 04: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import time

import pytest
import torch
import torch.distributed as dist

from conftest import rank_processes
from distlab.architectures import gossip
from distlab.labs import grading


def _weights(graph, weight, diagonal=True):
    """Edge weights from weight(i, j, degrees), self-loops kept out, the rest of each row on the diagonal."""
    n = len(graph)
    degree = [len(set(nb) - {i}) for i, nb in enumerate(graph)]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in set(graph[i]) - {i}:
            w[i, j] = weight(i, j, degree)
        if diagonal:
            w[i, i] = 1 - w[i].sum()
    return w


def no_diagonal(graph):
    return _weights(graph, lambda i, j, d: 1 / (1 + max(d[i], d[j])), diagonal=False)


def own_degree(graph):
    return _weights(graph, lambda i, j, d: 1 / (1 + d[i]))


def forgot_the_one(graph):
    return _weights(graph, lambda i, j, d: 1 / max(d[i], d[j]))


def degree_counts_self_loops(graph):
    """Skips j == i as a weight but counts it in the degree: right until a list names its own node."""
    n, degree = len(graph), [len(nb) for nb in graph]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in graph[i]:
            if j != i:
                w[i, j] = 1 / (1 + max(degree[i], degree[j]))
        w[i, i] = 1 - w[i].sum()
    return w


def uniform_everywhere(graph):
    n = len(graph)
    return torch.full((n, n), 1 / n, dtype=torch.float64)


@pytest.mark.parametrize("solution, says", [
    (no_diagonal, "the diagonal is all 0"),
    (own_degree, "you used 1 / (1 + d_i), the node's own degree only"),
    (forgot_the_one, "that is 1 / max(d_i, d_j)"),
    (degree_counts_self_loops, "node 3 lists itself as a neighbour, and a self-loop is not an edge"),
    (uniform_everywhere, "are not neighbours: a node mixes only with its neighbours"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_wrong_mixing_weights_get_their_diagnosis(solution, says):
    verdict = grading.grade("04.metropolis_hastings", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_own_degree_mistake_is_caught_on_the_star_and_named_with_its_weights():
    verdict = grading.grade("04.metropolis_hastings", own_degree)
    assert verdict.summary.startswith("star of 6 (node 0 the hub): ") and "W[0,1] = 0.1667 but W[1,0] = 0.5" in \
        verdict.summary, str(verdict)


# -- D-PSGD ---------------------------------------------------------------------------------------------

def _exchange(ctx, sent, w):
    peers = [j for j in range(ctx.world_size) if j != ctx.rank and w[ctx.rank, j] > 0]
    inbox = {j: torch.empty_like(sent) for j in peers}
    pending = [ctx.comm.isend(sent, j) for j in peers] + [ctx.comm.irecv(inbox[j], j) for j in peers]
    for work in pending:
        work.wait()
    return inbox


def mixes_first(ctx, x, grad, w, lr):
    inbox = _exchange(ctx, x, w)
    mixed = float(w[ctx.rank, ctx.rank]) * x + sum(float(w[ctx.rank, j]) * theirs for j, theirs in inbox.items())
    return mixed - lr * grad


def forgets_its_own_term(ctx, x, grad, w, lr):
    local = x - lr * grad
    return sum(float(w[ctx.rank, j]) * theirs for j, theirs in _exchange(ctx, local, w).items())


def own_weight_one(ctx, x, grad, w, lr):
    local = x - lr * grad
    return local + sum(float(w[ctx.rank, j]) * theirs for j, theirs in _exchange(ctx, local, w).items())


def sends_to_everyone(ctx, x, grad, w, lr):
    """Right values (weight 0 for strangers), but talks to every rank."""
    local, everyone = x - lr * grad, [j for j in range(ctx.world_size) if j != ctx.rank]
    inbox = {j: torch.empty_like(local) for j in everyone}
    pending = [ctx.comm.isend(local, j) for j in everyone] + [ctx.comm.irecv(inbox[j], j) for j in everyone]
    for work in pending:
        work.wait()
    return float(w[ctx.rank, ctx.rank]) * local + sum(float(w[ctx.rank, j]) * t for j, t in inbox.items())


def averages_with_all_reduce(ctx, x, grad, w, lr):
    local = x - lr * grad
    dist.all_reduce(local)
    return local / ctx.world_size


def calls_the_library(ctx, x, grad, w, lr):
    local = x - lr * grad
    peers = [j for j in range(ctx.world_size) if j != ctx.rank and w[ctx.rank, j] > 0]
    return gossip.mix(ctx.rank, local, gossip.exchange(local, peers), w)


def sends_float64(ctx, x, grad, w, lr):
    """Right values, but twice the bytes: the parameters travel as float64."""
    local = (x - lr * grad).double()
    mixed = float(w[ctx.rank, ctx.rank]) * local
    for j, theirs in _exchange(ctx, local, w).items():
        mixed += float(w[ctx.rank, j]) * theirs
    return mixed.float()


def receives_first(ctx, x, grad, w, lr):
    """Blocking recv from every neighbour before sending anything: nobody ever sends."""
    local = x - lr * grad
    peers = [j for j in range(ctx.world_size) if j != ctx.rank and w[ctx.rank, j] > 0]
    inbox = {j: ctx.comm.recv(torch.empty_like(local), j) for j in peers}
    for j in peers:
        ctx.comm.send(local, j)
    return float(w[ctx.rank, ctx.rank]) * local + sum(float(w[ctx.rank, j]) * t for j, t in inbox.items())


@pytest.mark.parametrize("solution, says", [
    (mixes_first, "you mixed first and stepped after"),
    (forgets_its_own_term, "your own term is missing"),
    (own_weight_one, "your own parameters must be weighted too"),
    (sends_to_everyone, "ring: rank 0 sent to rank 2, which is not its neighbour"),
    (averages_with_all_reduce, "may not call torch.distributed.all_reduce"),
    (calls_the_library, "may not call torch.distributed.isend"),
    (sends_float64, "ring: rank 0 sent 592 bytes; one D-PSGD step sends the float32 parameter vector once"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_dpsgd_step_gets_its_diagnosis(solution, says):
    verdict = grading.grade("04.dpsgd_step", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_a_deadlocking_step_is_named_a_deadlock_and_leaves_no_process(monkeypatch):
    monkeypatch.setattr(grading, "LAB_TIMEOUT", 3.0)
    started = time.monotonic()
    verdict = grading.grade("04.dpsgd_step", receives_first)
    assert time.monotonic() - started < 30
    assert verdict.summary.startswith("deadlock: all 4 ranks were blocked in recv"), str(verdict)
    assert not rank_processes()
