"""Tensor parallelism (Megatron-LM, Shoeybi et al., 2019): each weight matrix of a block split across t ranks.

The MLP's first layer is split by output columns (each rank computes 4d/t of the hidden units, no
communication), its second by input rows (each rank holds a partial sum of the output). One
all-reduce adds the partial sums. Attention is split the same way with whole heads on each rank:
q, k, v by columns, the output projection by rows. Two conjugate operators mark each region:
  f: identity forward, all-reduce of the input gradient backward
  g: all-reduce forward, identity backward
so a block costs 2 all-reduces forward and 2 backward, each of the activation's size (batch x T x d).
Beside it, `torch.distributed.tensor.parallel.parallelize_module` shards the same block with DTensors,
and `data_tensor` runs data x tensor parallelism on a 2-D DeviceMesh.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import gpt
from ..ranks import world_sizes
from .mesh import device_mesh

HEADS = gpt.GPTConfig().n_head
whole_heads = world_sizes(lambda n, cfg=None, **_: (cfg or gpt.GPTConfig()).n_head % n == 0,
                          f"tensor parallelism gives every rank whole heads: the GPT's {HEADS} heads must divide "
                          "evenly over the ranks")


class GroupAllReduce:
    """Sum a tensor in place over a process group, counted in ctx.comm's table under `tag` and in .count."""

    def __init__(self, ctx, group=None, tag: str = "tp"):
        self.ctx, self.group, self.tag, self.count = ctx, group, tag, 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.ctx.comm.all_reduce(tensor, tag=self.tag, group=self.group)
        return tensor


class CopyIn(torch.autograd.Function):
    """Megatron's f: every rank uses the whole input; backward sums the ranks' input gradients."""

    @staticmethod
    def forward(fctx, x, reduce):
        fctx.reduce = reduce
        return x.view_as(x)

    @staticmethod
    def backward(fctx, grad):
        return fctx.reduce(grad.clone()), None


class SumOut(torch.autograd.Function):
    """Megatron's g: forward sums the ranks' partial outputs; backward passes the gradient through."""

    @staticmethod
    def forward(fctx, x, reduce):
        return reduce(x.clone())

    @staticmethod
    def backward(fctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i + b_i: this rank's share of the output features (rows of nn.Linear's weight)."""

    def __init__(self, full: nn.Linear, rank: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().chunk(tp, dim=0)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().chunk(tp)[rank].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i B_i + b: this rank's share of the input features; the partial sums meet in g."""

    def __init__(self, full: nn.Linear, rank: int, tp: int, reduce: GroupAllReduce):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().chunk(tp, dim=1)[rank].clone())
        self.bias = nn.Parameter(full.bias.detach().clone())  # added once, after the sum
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SumOut.apply(F.linear(x, self.weight), self.reduce) + self.bias


class ParallelRegion(nn.Module):
    """f, then a module whose last layer is row-parallel (so it ends in g)."""

    def __init__(self, inner: nn.Module, reduce: GroupAllReduce):
        super().__init__()
        self.inner, self.reduce = inner, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(CopyIn.apply(x, self.reduce))


def tp_mlp(mlp: gpt.MLP, rank: int, tp: int, reduce: GroupAllReduce) -> ParallelRegion:
    """fc split by columns (hidden units), proj by rows: one all-reduce forward, one backward."""
    sharded = copy.deepcopy(mlp)
    sharded.fc = ColumnParallelLinear(mlp.fc, rank, tp)
    sharded.proj = RowParallelLinear(mlp.proj, rank, tp, reduce)
    return ParallelRegion(sharded, reduce)


def tp_attention(attn: gpt.Attention, rank: int, tp: int, reduce: GroupAllReduce) -> ParallelRegion:
    """Heads split across ranks: q, k, v by columns (whole heads), the output projection by rows."""
    n_head = attn.q.out_features // attn.head_dim
    if n_head % tp:
        raise ValueError(f"tp={tp} must divide the number of heads ({n_head})")
    sharded = copy.deepcopy(attn)
    for name in ("q", "k", "v"):
        setattr(sharded, name, ColumnParallelLinear(getattr(attn, name), rank, tp))
    sharded.proj = RowParallelLinear(attn.proj, rank, tp, reduce)
    return ParallelRegion(sharded, reduce)


def tp_block(block: gpt.Block, rank: int, tp: int, reduce: GroupAllReduce) -> gpt.Block:
    """A copy of a transformer block with attention and MLP sharded; LayerNorms stay replicated."""
    sharded = copy.deepcopy(block)
    sharded.attn = tp_attention(block.attn, rank, tp, reduce)
    sharded.mlp = tp_mlp(block.mlp, rank, tp, reduce)
    return sharded


def tp_gpt(model: nn.Sequential, rank: int, tp: int, reduce: GroupAllReduce) -> nn.Sequential:
    """Every block of the GPT sharded; embedding and head replicated (they are small here)."""
    return nn.Sequential(*[tp_block(m, rank, tp, reduce) if isinstance(m, gpt.Block) else m for m in model])


def shard_of(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """The part of an unsharded block parameter that rank holds (to compare gradients)."""
    if name.endswith(("q.weight", "k.weight", "v.weight", "fc.weight", "q.bias", "k.bias", "v.bias", "fc.bias")):
        return full.chunk(tp, dim=0)[rank]
    if name.endswith("proj.weight"):
        return full.chunk(tp, dim=1)[rank]
    return full


def block_input(batch: int = 4, cfg: gpt.GPTConfig | None = None, seed: int = 1) -> torch.Tensor:
    cfg = cfg or gpt.GPTConfig()
    x = torch.randn(batch, cfg.block_size, cfg.d_model, generator=torch.Generator().manual_seed(seed), device="cpu")
    return x.to(torch.get_default_device())  # drawn on the CPU: the same input on every device


@whole_heads
def sharded_block_step(ctx, seed: int = 0) -> dict:
    """One block, forward and backward, Megatron-sharded over all ranks; all-reduces counted per pass."""
    reduce = GroupAllReduce(ctx)
    block = gpt.gpt(gpt.GPTConfig(n_layer=1), seed)[1]
    sharded = tp_block(block, ctx.rank, ctx.world_size, reduce).to(ctx.device)
    x = block_input().to(ctx.device)
    out = sharded(x)
    forward_reduces = reduce.count
    out.pow(2).mean().backward()
    grads = {n.replace("inner.", ""): q.grad.cpu() for n, q in sharded.named_parameters()}
    return dict(out=out.detach().cpu(), grads=grads, forward_reduces=forward_reduces,
                backward_reduces=reduce.count - forward_reduces, bytes_per_reduce=x.numel() * x.element_size())


TP_PLAN = {"attn.q": "col", "attn.k": "col", "attn.v": "col", "attn.proj": "row", "mlp.fc": "col", "mlp.proj": "row"}


@whole_heads
def builtin_block_step(ctx, seed: int = 0) -> dict:
    """The same block and input through parallelize_module (ColwiseParallel / RowwiseParallel DTensors);
    torch's CommDebugMode counts its collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("tp",))
    block = gpt.gpt(gpt.GPTConfig(n_layer=1), seed)[1].to(ctx.device)
    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    parallelize_module(block, mesh, {name: styles[kind]() for name, kind in TP_PLAN.items()})
    x = block_input().to(ctx.device).requires_grad_()  # an input that needs no gradient makes torch warn
    with CommDebugMode() as forward:
        out = block(x)
    with CommDebugMode() as backward:
        out.pow(2).mean().backward()
    local = {n: (q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad).cpu()
             for n, q in block.named_parameters()}
    return dict(out=out.detach().cpu(), grads=local, forward_reduces=forward.get_total_counts(),
                backward_reduces=backward.get_total_counts())


@world_sizes(lambda n, dp=2, tp=2, cfg=None, **_: n == dp * tp and (cfg or gpt.GPTConfig()).n_head % tp == 0,
             f"a dp × tp mesh needs exactly dp·tp ranks, and tp must divide the GPT's {HEADS} heads")
def data_tensor(ctx, dp: int = 2, tp: int = 2, batch_size: int = 16, steps: int = 2, lr: float = 0.1,
                seed: int = 0, cfg: gpt.GPTConfig | None = None) -> dict:
    """Data x tensor on a (dp, tp) DeviceMesh: each tp group holds one sharded GPT and 1/dp of the batch;
    gradients are averaged over the dp axis. Communication is tagged by axis ("tp", "dp")."""
    if dp * tp != ctx.world_size:
        raise ValueError(f"dp={dp} x tp={tp} must equal world_size={ctx.world_size}")
    with device_mesh(ctx.device.type, (dp, tp), ("dp", "tp")) as mesh:
        dp_rank, tp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
        cfg = cfg or gpt.GPTConfig()
        model = tp_gpt(gpt.gpt(cfg, seed), tp_rank, tp, GroupAllReduce(ctx, mesh.get_group("tp"), "tp")).to(ctx.device)
        average = GroupAllReduce(ctx, mesh.get_group("dp"), "dp")
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        data = gpt.batches(batch_size, cfg.block_size, seed)
        losses = []
        for step in range(steps):
            x, y = (t[dp_rank::dp].to(ctx.device) for t in next(data))
            optimizer.zero_grad()
            loss = gpt.lm_loss(model(x), y)
            loss.backward()
            for q in model.parameters():
                average(q.grad).div_(dp)
            optimizer.step()
            losses.append(loss.item())
            ctx.log(step=step, loss=loss.item())
        return dict(losses=losses, dp_rank=dp_rank, tp_rank=tp_rank)
