"""Training functions the tests launch (importable by the ranks, which get the tests' sys.path)."""

import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import distlab as dl


def add(ctx, x=1):
    return ctx.rank + x


def hang_in_collective(ctx, hanging_rank=0):
    """One rank sleeps; the others wait in an all-reduce for it."""
    print(f"pid {os.getpid()} ready", flush=True)
    ctx.log(step=0, loss=1.0)
    if ctx.rank == hanging_rank:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))


def receive_first(ctx):
    """Every rank waits for its neighbour before sending to it: nobody ever sends."""
    x = torch.zeros(4)
    ctx.comm.recv(x, (ctx.rank + 1) % ctx.world_size)
    ctx.comm.send(x, (ctx.rank + 1) % ctx.world_size)


def start_child_then_fail(ctx):
    """Rank 1 starts a long subprocess of its own, then raises."""
    if ctx.rank == 1:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child {child.pid}", flush=True)
        raise RuntimeError("failing with a child running")
    dist.barrier()


def train_digits(ctx, steps=60, sync=True, drift_every=10, lr=0.1):
    """The notebook's data-parallel training, with or without gradient averaging."""
    torch.manual_seed(0)
    x, y, _, _ = dl.data.digits(ctx.rank, ctx.world_size)
    model = dl.models.mlp(64, 32, 10)
    if sync:
        model = DDP(model)
    ctx.watch(model, drift_every=drift_every)
    ctx.set_total(steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(ctx.rank)
    for step in range(steps):
        pick = torch.randint(len(x), (32,), generator=batches)
        loss = F.cross_entropy(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ctx.log(step=step, loss=loss.item())
    return sum(p.numel() for p in model.parameters())
