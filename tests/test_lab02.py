"""Lab 02: typical wrong answers get the diagnosis that names their mistake (the reference solutions pass
in test_labs.py)."""

import time

import pytest
import torch
import torch.distributed as dist

from conftest import rank_processes
from distlab.labs import grading
from distlab.labs.solutions import ref02


def deadlocks(ctx, tensor):
    """Every rank receives first: nobody ever sends."""
    for _ in range(ctx.world_size - 1):
        incoming = ctx.comm.recv(torch.empty_like(tensor), (ctx.rank - 1) % ctx.world_size)
        ctx.comm.send(tensor, (ctx.rank + 1) % ctx.world_size)
        tensor.add_(incoming)
    return tensor


def calls_the_builtin(ctx, tensor):
    dist.all_reduce(tensor)
    return tensor


def calls_comm_all_reduce(ctx, tensor):
    return ctx.comm.all_reduce(tensor)


def averages(ctx, tensor):
    ref02.ring_all_reduce(ctx, tensor)
    return tensor.div_(ctx.world_size) if tensor.is_floating_point() else tensor.floor_divide_(ctx.world_size)


def one_step_short(ctx, tensor):
    """Reduce-scatter stops one step early: each chunk misses one rank's contribution."""
    n, rank = ctx.world_size, ctx.rank
    chunks = tensor.view(-1).tensor_split(n)
    right, left = (rank + 1) % n, (rank - 1) % n
    for phase, steps in (("reduce-scatter", n - 2), ("all-gather", n - 1)):
        for step in range(steps):
            send = (rank - step) % n if phase == "reduce-scatter" else (rank + 1 - step) % n
            receive = (send - 1) % n
            pending = ctx.comm.isend(chunks[send].clone(), right)
            incoming = ctx.comm.recv(torch.empty_like(chunks[receive]), left)
            pending.wait()
            chunks[receive].add_(incoming) if phase == "reduce-scatter" else chunks[receive].copy_(incoming)
    return tensor


def wrong_neighbour(ctx, tensor):
    """Sends to rank + 2: not a ring."""
    n = ctx.world_size
    for _ in range(n - 1):
        pending = ctx.comm.isend(tensor.clone(), (ctx.rank + 2) % n)
        incoming = ctx.comm.recv(torch.empty_like(tensor), (ctx.rank - 2) % n)
        pending.wait()
        tensor.add_(incoming)
    return tensor


def not_in_place(ctx, tensor):
    return ref02.ring_all_reduce(ctx, tensor.clone())


def whole_tensor_around_the_ring(ctx, tensor):
    """Right sums (each rank passes on what it received, N - 1 times) but S bytes per step, not S/N."""
    n, passing, total = ctx.world_size, tensor.clone(), tensor.clone()
    for _ in range(n - 1):
        pending = ctx.comm.isend(passing, (ctx.rank + 1) % n)
        incoming = ctx.comm.recv(torch.empty_like(passing), (ctx.rank - 1) % n)
        pending.wait()
        total += incoming
        passing = incoming
    for _ in range(n - 1):  # a second lap, as a ring all-reduce would make: twice the bytes of a chunked ring
        pending = ctx.comm.isend(passing, (ctx.rank + 1) % n)
        passing = ctx.comm.recv(torch.empty_like(passing), (ctx.rank - 1) % n)
        pending.wait()
    return tensor.copy_(total)


def wrong_partner(ctx, tensor):
    """rank + distance instead of rank XOR distance."""
    distance = 1
    while distance < ctx.world_size:
        to, come = (ctx.rank + distance) % ctx.world_size, (ctx.rank - distance) % ctx.world_size
        pending = ctx.comm.isend(tensor.clone(), to)
        incoming = ctx.comm.recv(torch.empty_like(tensor), come)
        pending.wait()
        tensor.add_(incoming)
        distance *= 2
    return tensor


@pytest.mark.parametrize("solution, says", [
    (calls_the_builtin, "may not call torch.distributed.all_reduce"),
    (calls_comm_all_reduce, "allows only ctx.comm.send/recv/isend/irecv, not ctx.comm.all_reduce"),
    (averages, "holds the sum divided by 4"),
    (one_step_short, "holds the sum of ranks"),
    (wrong_neighbour, "in a ring, rank r sends only to one neighbour"),
    (not_in_place, "left `tensor` unchanged"),
    (whole_tensor_around_the_ring, "the whole tensor at every step"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_ring_gets_its_diagnosis(solution, says):
    verdict = grading.grade("02.ring_all_reduce", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_the_off_by_one_names_the_chunk_and_the_element():
    verdict = grading.grade("02.ring_all_reduce", one_step_short)
    assert "holds the sum of ranks" in verdict.summary and "time(s), not 3" in verdict.summary
    assert "off-by-one" in verdict.summary
    assert any("element" in d and "should be" in d for d in verdict.details), str(verdict)


def test_a_deadlocking_ring_is_named_a_deadlock_quickly_and_leaves_no_process(monkeypatch):
    monkeypatch.setattr(grading, "LAB_TIMEOUT", 3.0)
    started = time.monotonic()
    verdict = grading.grade("02.ring_all_reduce", deadlocks)
    assert time.monotonic() - started < 30
    assert verdict.summary.startswith("deadlock: all 4 ranks were blocked in recv"), str(verdict)
    assert all(f"rank {r} was waiting in recv (" in "\n".join(verdict.details) for r in range(4))
    assert "called from deadlocks (test_lab02.py:" in "\n".join(verdict.details)
    assert any("isend" in d for d in verdict.details)  # the usual cure
    assert not rank_processes()  # the hung ranks were killed


def test_recursive_doubling_with_the_wrong_partner():
    verdict = grading.grade("02.recursive_doubling", wrong_partner)
    assert verdict.status == "wrong" and "swaps with rank XOR 2^k" in verdict.summary, str(verdict)


def no_residual(grad, residual, k):
    indices = grad.abs().topk(k).indices
    return indices, grad[indices], grad + residual


def by_value(grad, residual, k):
    accumulated = grad + residual
    indices = accumulated.topk(k).indices
    rest = accumulated.clone()
    rest[indices] = 0
    return indices, accumulated[indices], rest


def mutates(grad, residual, k):
    grad += residual
    indices = grad.abs().topk(k).indices
    values = grad[indices].clone()
    grad[indices] = 0
    return indices, values, grad


@pytest.mark.parametrize("solution, says", [
    (no_residual, "error feedback adds the residual first"),
    (by_value, "largest magnitudes"),
    (mutates, "changed its inputs"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_wrong_top_k_gets_its_diagnosis(solution, says):
    verdict = grading.grade("02.topk_error_feedback", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)
