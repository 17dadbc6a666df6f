"""ZeRO stages 1, 2 and 3 written from reduce-scatter and all-gather, beside PyTorch's FSDP2 (`fully_shard`).

ZeRO (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054) removes the N-fold copies of data parallelism.
Each layer's parameters are laid end to end in one flat buffer, padded to a multiple of N; rank r owns the r-th
1/N of it, and only that slice has Adam state (stage 1). Gradients are reduce-scattered, so each rank receives
the sum of its own slice; stage 2 frees the rest of each layer's gradient as soon as backward has produced it.
After the sharded Adam step an all-gather puts the updated slices together. Stage 3 keeps only the slice of the
parameters too: a layer is all-gathered just before its forward and again before its backward, and freed
after each (the storage shrinks to zero, so the views autograd saved stay valid: FSDP1's trick).

Bytes per rank, P parameters, fp32 Adam (4 + 4 + 8 bytes per parameter), as in the paper's figure 1:
  data parallel 16P · stage 1 4P + 4P + 8P/N · stage 2 4P + 12P/N · stage 3 16P/N.
Bytes communicated per rank and step (ring): an all-reduce is a reduce-scatter plus an all-gather, 2(N-1)/N·4P,
so stages 1 and 2 cost what data parallelism costs; stage 3 gathers twice, 3(N-1)/N·4P, 1.5×.
FSDP2 (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) is stage 3 per `fully_shard` unit,
with parameters as DTensors and prefetching of the next unit's all-gather.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..comm import nbytes
from ..gpt import GPTConfig, batches, gpt, lm_loss
from .memory import allocated, cuda_peak

STAGES = (1, 2, 3)
GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
COUNTED = {"all_reduce": "all-reduce", "all_gather": "all-gather", "all_gather_into_tensor": "all-gather",
           "all_gather_single": "all-gather",
           "reduce_scatter_tensor": "reduce-scatter", "reduce_scatter_single": "reduce-scatter"}
WHOLE = {"all-reduce": (0, ("tensor",)), "all-gather": (0, ("output_tensor", "tensor_list")),
         "reduce-scatter": (1, ("input",))}  # where each kind's whole buffer is: position, keywords


def _all_gather(output: torch.Tensor, shard: torch.Tensor) -> None:
    getattr(dist, GATHER)(output, shard)  # looked up at call time, so `counting_collectives` sees it


def _reduce_scatter(shard: torch.Tensor, whole: torch.Tensor) -> None:
    getattr(dist, SCATTER)(shard, whole)


# -- counting what every collective moves (ours and FSDP2's: both call torch.distributed by name) ----------

def ring_sent_bytes(kind: str, whole_bytes: int, world_size: int) -> float:
    """Bytes one rank sends in a ring collective over a buffer of `whole_bytes`: (N-1)/N of it, twice for all-reduce."""
    share = (world_size - 1) / world_size * whole_bytes
    return 2 * share if kind == "all-reduce" else share


@contextmanager
def counting_collectives() -> Iterator[list[dict]]:
    """Inside: every all-reduce, all-gather and reduce-scatter torch.distributed runs is recorded (kind, bytes of the
    whole buffer, bytes a ring sends per rank, seconds of the call) and then run."""
    calls: list[dict] = []
    originals = {name: getattr(dist, name) for name in COUNTED if hasattr(dist, name)}
    n = dist.get_world_size()

    def counted(name, original):
        kind = COUNTED[name]

        def call(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            position, keywords = WHOLE[kind]
            given = args[position] if len(args) > position else next(kwargs[k] for k in keywords if k in kwargs)
            whole = sum(nbytes(t) for t in given) if isinstance(given, list) else nbytes(given)
            calls.append({"kind": kind, "bytes": whole, "sent": ring_sent_bytes(kind, whole, n),
                          "seconds": time.perf_counter() - start})
            return out
        return call

    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


# -- one layer's parameters as one flat, sharded buffer -----------------------------------------------------

class FlatUnit:
    """A module's parameters made views of one flat buffer of N·shard numbers; this rank's slice is `shard`."""

    def __init__(self, module: nn.Module, rank: int, world_size: int, stage: int):
        self.module, self.params, self.stage, self.world_size = module, list(module.parameters()), stage, world_size
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = math.ceil(self.numel / world_size)
        like = self.params[0]
        self.flat = torch.zeros(self.shard_numel * world_size, dtype=like.dtype, device=like.device)
        offset = 0
        for p in self.params:
            self.flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        mine = self.flat[rank * self.shard_numel:(rank + 1) * self.shard_numel]
        self.shard = nn.Parameter(mine.clone() if stage == 3 else mine)  # stage 3 keeps it apart: flat is freed
        self._ready = 0
        if stage == 3:
            self.free()

    def gather(self) -> None:
        """Every rank's slice into the flat buffer: the parameters (views of it) are whole again."""
        self.flat.untyped_storage().resize_(nbytes(self.flat))
        _all_gather(self.flat, self.shard.detach().clone())

    def free(self) -> None:
        self.flat.untyped_storage().resize_(0)

    def reduce_scatter_grads(self) -> None:
        """The layer's gradients flattened, summed across ranks and split: this rank keeps the mean of its slice."""
        whole = torch.zeros_like(self.flat) if self.stage < 3 else torch.zeros(
            self.shard_numel * self.world_size, dtype=self.shard.dtype, device=self.shard.device)
        torch.cat([p.grad.reshape(-1) for p in self.params], out=whole[:self.numel])
        grad = torch.empty_like(self.shard)
        _reduce_scatter(grad, whole)
        self.shard.grad = grad.div_(self.world_size)
        if self.stage >= 2:
            for p in self.params:
                p.grad = None

    def _on_grad(self, param: torch.Tensor) -> None:
        """After each parameter's gradient has accumulated: once the whole layer has them, reduce-scatter (stage 2+)."""
        self._ready += 1
        if self._ready == len(self.params):
            self._ready = 0
            self.reduce_scatter_grads()
            if self.stage == 3:
                self.free()

    def hook_stage_2(self) -> None:
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def hook_stage_3(self) -> None:
        """Gather before forward, free after; gather again when the output's gradient arrives (before backward)."""
        self.hook_stage_2()

        def before(module, args):
            self.gather()

        def after(module, args, output):
            self.free()
            if output.requires_grad:
                output.register_hook(lambda grad: self.gather())

        self.module.register_forward_pre_hook(before)
        self.module.register_forward_hook(after)


class ZeRO:
    """Data parallelism with ZeRO stage 1, 2 or 3 on an nn.Sequential (each child one unit) and Adam on the shards."""

    def __init__(self, model: nn.Sequential, stage: int, lr: float = 1e-3):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.model, self.stage = model, stage
        rank, n = dist.get_rank(), dist.get_world_size()
        self.units = [FlatUnit(layer, rank, n, stage) for layer in model]
        for unit in self.units:
            (unit.hook_stage_3 if stage == 3 else unit.hook_stage_2 if stage == 2 else lambda: None)()
        self.optimizer = torch.optim.Adam([u.shard for u in self.units], lr=lr)

    def step(self) -> None:
        """After backward: reduce-scatter the gradients (stage 1 does it here), Adam on this rank's slices, gather."""
        if self.stage == 1:
            for unit in self.units:
                unit.reduce_scatter_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.stage < 3:
            for unit in self.units:
                unit.gather()

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def full_parameters(self) -> torch.Tensor:
        """All parameters as one vector on every rank (stage 3 gathers them for it)."""
        for unit in self.units:
            if self.stage == 3:
                unit.gather()
        out = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).cpu()
        for unit in self.units:
            if self.stage == 3:
                unit.free()
        return out

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now, by kind: parameters (flat buffers as allocated, stage 3's slices), gradients
        (whole ones and slices), Adam's state."""
        params = sum(u.flat.untyped_storage().nbytes() for u in self.units)
        if self.stage == 3:
            params += sum(nbytes(u.shard) for u in self.units)
        grads = sum(nbytes(p.grad) for p in self.model.parameters() if p.grad is not None)
        grads += sum(nbytes(u.shard.grad) for u in self.units if u.shard.grad is not None)
        return {"params": params, "grads": grads, "optimizer": adam_state_bytes(self.optimizer)}


def adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of Adam's m and v (its step counters left out), local shards for DTensors."""
    local = [t.to_local() if hasattr(t, "to_local") else t for s in optimizer.state.values() for t in s.values()]
    return sum(nbytes(t) for t in local if t.numel() > 1)


def padded_params(model: nn.Sequential, world_size: int) -> int:
    """Parameters once each unit is padded to a multiple of N (what ZeRO's buffers hold)."""
    return sum(math.ceil(sum(p.numel() for p in layer.parameters()) / world_size) * world_size for layer in model)


def zero_bytes_formula(params: int, world_size: int, stage: int) -> dict[str, int]:
    """ZeRO's bytes per rank for fp32 Adam (stage 0 is plain data parallelism): what each stage divides by N."""
    n, p = world_size, params
    return {"params": 4 * p // n if stage >= 3 else 4 * p, "grads": 4 * p // n if stage >= 2 else 4 * p,
            "optimizer": 8 * p // n if stage >= 1 else 8 * p}


def zero_sent_formula(params: int, world_size: int, stage: int) -> float:
    """Bytes a rank sends per step (ring): 2(N-1)/N·4P for data parallelism and stages 1-2, 3(N-1)/N·4P for stage 3."""
    return (3 if stage == 3 else 2) * (world_size - 1) / world_size * 4 * params


# -- the rank functions: plain data parallelism, ZeRO by hand, FSDP2, on the tiny GPT ------------------------

def _data(ctx, cfg: GPTConfig, batch: int, seed: int):
    """This rank's own batches (seed + rank), on its device."""
    for x, y in batches(batch, cfg.block_size, seed + ctx.rank):
        yield x.to(ctx.device), y.to(ctx.device)


def _stepper(optimizer: torch.optim.Optimizer, snapshot: dict):
    """The optimizer step of the unsharded runs, noting the bytes of Adam's state it holds afterwards."""
    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshot["optimizer"] = adam_state_bytes(optimizer)
    return step


def _train(ctx, model: nn.Module, step, after_backward, steps: int, data, peak: bool = False) -> dict:
    """Run `steps` steps (`after_backward` between backward and `step`); record the collectives and step seconds.
    With `peak`, one more step runs under the allocation records (parallel/memory.allocated; CUDA's own peak on a
    GPU) and its peak above the step's start is returned (the step is left out of the seconds)."""
    seconds, losses, out = [], [], {}

    def one_step():
        x, y = next(data)
        loss = lm_loss(model(x), y)
        loss.backward()
        after_backward()
        step()
        losses.append(loss.item())

    with counting_collectives() as calls:
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            one_step()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            seconds.append(time.perf_counter() - start)
        counted = len(calls)
        if peak:
            out["step_peak"] = cuda_peak(one_step, ctx.device) if ctx.device.type == "cuda" else allocated(one_step)[0]
    return {**out, "losses": losses[:steps], "seconds": seconds, "calls": calls[:counted]}


def train_plain(ctx, steps: int = 3, batch: int = 4, lr: float = 1e-3, cfg: GPTConfig | None = None,
                seed: int = 0, peak: bool = False) -> dict:
    """The baseline: whole model on every rank, one all-reduce of the flat gradients, averaged, torch's Adam."""
    cfg = cfg or GPTConfig()
    model = gpt(cfg, seed).to(ctx.device)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    snapshot: dict = {}

    def average():
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(grads)
        grads.div_(ctx.world_size)
        for p, g in zip(params, grads.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        snapshot.update(params=sum(nbytes(p) for p in params), grads=sum(nbytes(p.grad) for p in params))

    out = _train(ctx, model, _stepper(optimizer, snapshot), average, steps, _data(ctx, cfg, batch, seed), peak)
    out["held"] = dict(snapshot)
    out["params"] = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
    return out


def train_zero(ctx, stage: int = 1, steps: int = 3, batch: int = 4, lr: float = 1e-3, cfg: GPTConfig | None = None,
               seed: int = 0, peak: bool = False) -> dict:
    """ZeRO stage 1, 2 or 3 by hand on the same batches as `train_plain`."""
    cfg = cfg or GPTConfig()
    model = gpt(cfg, seed).to(ctx.device)
    zero = ZeRO(model, stage, lr)
    snapshot: dict = {}

    def after_backward():
        snapshot.update({k: v for k, v in zero.held_bytes().items() if k != "optimizer"})

    def step():
        zero.step()
        zero.zero_grad()
        snapshot["optimizer"] = adam_state_bytes(zero.optimizer)

    out = _train(ctx, model, step, after_backward, steps, _data(ctx, cfg, batch, seed), peak)
    out["held"] = dict(snapshot)
    out["params"] = zero.full_parameters()
    out["padded_params"] = padded_params(model, ctx.world_size)
    return out


def train_fsdp2(ctx, steps: int = 3, batch: int = 4, lr: float = 1e-3, cfg: GPTConfig | None = None,
                seed: int = 0, peak: bool = False) -> dict:
    """PyTorch's FSDP2 on the same model: `fully_shard` on each block, then on the whole (embedding and head)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    cfg = cfg or GPTConfig()
    model = gpt(cfg, seed).to(ctx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2 warns that the root's output is a view; nothing here edits it in place
        for block in model[1:-1]:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    snapshot: dict = {}

    def after_backward():
        local = [p.to_local() for p in model.parameters()]
        snapshot.update(params=sum(nbytes(t) for t in local),
                        grads=sum(nbytes(p.grad.to_local()) for p in model.parameters() if p.grad is not None))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = _stepper(optimizer, snapshot)
        out = _train(ctx, model, step, after_backward, steps, _data(ctx, cfg, batch, seed), peak)
    out["held"] = dict(snapshot)
    out["params"] = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]).cpu()
    return out


def train_ddp(ctx, steps: int = 3, batch: int = 4, lr: float = 1e-3, cfg: GPTConfig | None = None, seed: int = 0,
              peak: bool = False) -> dict:
    """PyTorch's DistributedDataParallel (bucketed all-reduce overlapped with backward) on the same batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .data_parallel import Spans, timed_allreduce_hook

    cfg = cfg or GPTConfig()
    model, spans = DDP(gpt(cfg, seed).to(ctx.device)), Spans(ctx.device)
    model.register_comm_hook(None, timed_allreduce_hook(spans))  # DDP's C++ reducer bypasses dist.all_reduce
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = list(model.parameters())
    snapshot: dict = {}

    def after_backward():
        snapshot.update(params=sum(nbytes(p) for p in params), grads=sum(nbytes(p.grad) for p in params))

    out = _train(ctx, model, _stepper(optimizer, snapshot), after_backward, steps, _data(ctx, cfg, batch, seed), peak)
    per_step = len(spans.rows) // (steps + peak)  # the same buckets every step; the peak step's left out
    buckets = spans.rows[:per_step * steps]
    out["calls"] = [{"kind": "all-reduce", "bytes": r["bytes"], "sent": ring_sent_bytes("all-reduce", r["bytes"],
                                                                                        ctx.world_size),
                     "seconds": r["end"] - r["start"]} for r in buckets]
    out["held"] = dict(snapshot)
    out["params"] = torch.cat([p.detach().reshape(-1) for p in params]).cpu()
    return out


METHODS = ("plain", "zero1", "zero2", "zero3", "fsdp2")


def compare(ctx, steps: int = 3, batch: int = 4, lr: float = 1e-3, cfg: GPTConfig | None = None,
            methods: tuple[str, ...] = METHODS, peak: bool = False) -> dict:
    """Each method on the same batches, one after the other in one launch ("ddp" too, when asked)."""
    runs = {"plain": lambda: train_plain(ctx, steps, batch, lr, cfg, peak=peak),
            "ddp": lambda: train_ddp(ctx, steps, batch, lr, cfg, peak=peak),
            "fsdp2": lambda: train_fsdp2(ctx, steps, batch, lr, cfg, peak=peak),
            **{f"zero{s}": (lambda s=s: train_zero(ctx, s, steps, batch, lr, cfg, peak=peak)) for s in STAGES}}
    unknown = set(methods) - set(runs)
    if unknown:
        raise ValueError(f"methods must be among {tuple(runs)}, got {sorted(unknown)}")
    return {name: runs[name]() for name in methods}
