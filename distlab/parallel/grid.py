"""Hybrid parallelism: ranks on a 2-D grid, data parallel along one axis, model parallel along the other.

Rank r sits at (d, m) = divmod(r, mp) of `torch.arange(dp * mp).view(dp, mp)`: the mp ranks of a row
hold the stages of one model replica and pass activations along the row (model.py); the dp ranks of a
column hold the same stage and average its gradients (data.py). Megatron-LM adds a third axis
(Narayanan et al. 2021, arXiv:2104.04473). Two ways to build the grid: a process group per column by
hand (new_group), or PyTorch's DeviceMesh, whose "dp" axis DistributedDataParallel takes directly.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models import mlp
from ..ranks import world_sizes
from .data_parallel import SIZES, Spans, average_bucket, digits_train, shard_batches, timed_allreduce_hook
from .mesh import device_mesh
from .model_parallel import split_layers, train_stage

GRIDS = ("new_group", "device_mesh")


@contextmanager
def column_groups(dp: int, mp: int):
    """From scratch: one process group per column of the grid (the ranks that hold the same stage).
    Every rank creates every group, in the same order (new_group is collective); yields this rank's."""
    grid = torch.arange(dp * mp).view(dp, mp)
    columns = [dist.new_group(grid[:, m].tolist()) for m in range(mp)]
    try:
        yield columns[dist.get_rank() % mp]
    finally:
        for group in columns:  # warm ranks live on: free the groups' connections
            dist.destroy_process_group(group)


@world_sizes(lambda n, dp=2, **_: dp >= 1 and n % dp == 0 and 1 <= n // dp <= len(SIZES) - 1,
             "a dp × mp grid needs dp·mp ranks, with mp from 1 to the digits MLP's 3 layers")
def train_hybrid(ctx, grid: str = "device_mesh", dp: int = 2, steps: int = 20, batch: int = 32, lr: float = 0.5,
                 seed: int = 0) -> dict:
    """Rank function: dp replicas of the digits MLP, each split over world_size / dp ranks.

    `grid`="new_group": the column groups by hand and one flat-bucket all-reduce per step;
    "device_mesh": init_device_mesh and DistributedDataParallel over the mesh's "dp" axis.
    Replica d trains on shard d of each batch of dp·batch examples. Returns what train_stage does."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if dp < 1 or ctx.world_size % dp:
        raise ValueError(f"dp must divide world_size={ctx.world_size}, got dp={dp}")
    mp = ctx.world_size // dp
    d, m = divmod(ctx.rank, mp)
    before = ctx.rank - 1 if m > 0 else None  # the row's neighbours: same replica, next stages
    after = ctx.rank + 1 if m < mp - 1 else None
    torch.manual_seed(seed)
    stage = split_layers(mlp(*SIZES).to(ctx.device), mp)[m]
    width, params = stage[0].in_features, list(stage.parameters())
    data = shard_batches(*digits_train(), d, dp, batch, seed)  # the row shares a shard
    spans = Spans(ctx.device)
    if grid == "new_group":
        grid_groups = column_groups(dp, mp)
    else:
        grid_groups = device_mesh(ctx.device.type, (dp, mp), ("dp", "mp"))
    with grid_groups as axis:
        average = None
        if grid == "new_group":
            average = partial(average_bucket, params, partial(dist.all_reduce, group=axis), dp, spans)
        else:
            stage = DDP(stage, device_mesh=axis["dp"])  # averages the stage's gradients along the column
            stage.register_comm_hook(stage.process_group, timed_allreduce_hook(spans))
        result = train_stage(ctx, stage, width, data, before, after, steps, lr, spans, average)
        del stage  # DDP holds the column's group: let it go before the group is destroyed
    return result
