"""Lab 00: typical wrong sums get the diagnosis that names their mistake (the reference solution passes in
test_labs.py)."""

import time

import pytest
import torch
import torch.distributed as dist

from conftest import rank_processes
from distlab.labs import grading
from distlab.labs.solutions import ref00


def own_value_only(ctx, tensor):
    """No communication at all."""
    return tensor


def never_sent_back(ctx, tensor):
    """Rank 0 gathers and adds, but keeps the total to itself."""
    if ctx.rank == 0:
        for src in range(1, ctx.world_size):
            tensor = tensor + ctx.comm.recv(torch.empty_like(tensor), src)
    else:
        ctx.comm.send(tensor, 0)
    return tensor


def one_rank_short(ctx, tensor):
    """range(1, world_size - 1): rank 0 never hears from the last rank (which waits for no total either)."""
    last = ctx.world_size - 1
    if ctx.rank == 0:
        total = tensor.clone()
        for src in range(1, last):
            total += ctx.comm.recv(torch.empty_like(tensor), src)
        for dst in range(1, ctx.world_size):
            ctx.comm.send(total, dst)
        return total
    if ctx.rank != last:
        ctx.comm.send(tensor, 0)
    return ctx.comm.recv(torch.empty_like(tensor), 0)


def averages(ctx, tensor):
    total = ref00.sum_by_send_recv(ctx, tensor)
    return total / ctx.world_size if total.is_floating_point() else total


def calls_the_builtin(ctx, tensor):
    dist.all_reduce(tensor)
    return tensor


def calls_comm_all_reduce(ctx, tensor):
    return ctx.comm.all_reduce(tensor)


def everyone_waits_first(ctx, tensor):
    """Every rank receives before it sends: rank 0 waits for rank 1, which waits for rank 0's total."""
    if ctx.rank == 0:
        total = tensor + ctx.comm.recv(torch.empty_like(tensor), 1)
        ctx.comm.send(total, 1)
        return total
    total = ctx.comm.recv(torch.empty_like(tensor), 0)
    ctx.comm.send(tensor, 0)
    return total


@pytest.mark.parametrize("solution, says", [
    (own_value_only, "rank 0 holds only its own value: it never received anything"),
    (never_sent_back, "rank 0 holds the sum, but rank 1 still holds only its own value"),
    (one_rank_short, "holds the sum of ranks [0, 1, 2] only: ranks [3] were never added"),
    (averages, "holds the sum divided by 4"),
    (calls_the_builtin, "may not call torch.distributed.all_reduce"),
    (calls_comm_all_reduce, "allows only ctx.comm.send/recv/isend/irecv, not ctx.comm.all_reduce"),
], ids=lambda x: getattr(x, "__name__", ""))
def test_a_wrong_sum_gets_its_diagnosis(solution, says):
    verdict = grading.grade("00.sum_by_send_recv", solution)
    assert verdict.status == "wrong" and says in verdict.summary, str(verdict)


def test_receiving_first_everywhere_is_named_a_deadlock_and_leaves_no_process(monkeypatch):
    monkeypatch.setattr(grading, "LAB_TIMEOUT", 3.0)
    started = time.monotonic()
    verdict = grading.grade("00.sum_by_send_recv", everyone_waits_first)
    assert time.monotonic() - started < 30
    assert verdict.summary.startswith("deadlock: all 4 ranks were blocked in recv"), str(verdict)
    assert "called from everyone_waits_first (test_lab00.py:" in "\n".join(verdict.details)
    assert not rank_processes()
