"""Gradient compression: fewer bytes per data-parallel step, as DDP communication hooks.

- casting to fp16 / bf16 halves the bytes (ours, beside torch's fp16/bf16_compress_hook);
- top-k with error feedback sends the k largest entries and keeps the rest for later steps
  (Stich, Cordonnier & Jaggi 2018; Lin et al. 2018, "Deep Gradient Compression");
- PowerSGD sends a rank-r factorization of each weight gradient (Vogels, Karimireddy & Jaggi 2019):
  PyTorch's own hook, torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.

Bytes are counted where they leave: every dist.all_reduce / dist.all_gather issued while `counting()`
is open adds its payload (the tensor this rank hands over), PowerSGD's internal calls included.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import models
from ..comm import nbytes
from ..data import digits, minibatches
from ..models import mlp

METHODS = ("none", "fp16", "bf16", "topk", "powersgd")
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TopK:
    """Keep the k = ratio·numel largest-magnitude entries of (gradient + residual); the rest becomes the
    next residual (error feedback), so nothing is lost, only delayed. Without feedback it is dropped."""

    def __init__(self, ratio: float, error_feedback: bool = True):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio, self.error_feedback = ratio, error_feedback
        self.residual: torch.Tensor | None = None

    def k(self, numel: int) -> int:
        return max(1, int(self.ratio * numel))

    def compress(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, int32 indices) of the k largest entries of the flat, feedback-corrected gradient."""
        corrected = grad.flatten() + (self.residual if self.residual is not None else 0)
        indices = corrected.abs().topk(self.k(corrected.numel())).indices
        values = corrected[indices]
        if self.error_feedback:
            self.residual = corrected.index_fill(0, indices, 0.0)
        return values, indices.int()

    @staticmethod
    def decompress(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
        return torch.zeros(numel, dtype=values.dtype).index_add_(0, indices.long(), values)

    def payload_bytes(self, numel: int, element_size: int = 4) -> int:
        return self.k(numel) * (element_size + 4)  # values + int32 indices


# -- the DDP hooks: bucket in, future of the averaged bucket out ------------------------------------------

def _done(tensor: torch.Tensor) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def cast_hook(dtype: torch.dtype):
    """All-reduce the bucket in `dtype`, then cast back: half the bytes of float32 for fp16 and bf16."""

    def hook(state, bucket):
        buffer = bucket.buffer()
        small = buffer.to(dtype).div_(dist.get_world_size())
        dist.all_reduce(small)
        return _done(buffer.copy_(small))

    return hook


def topk_hook(ratio: float, error_feedback: bool = True):
    """Each rank all-gathers its top-k (values, indices); every rank sums them into the dense average.

    Indices differ across ranks, so the sparse parts cannot be all-reduced; each rank keeps its own
    residual per bucket."""
    compressors: dict[int, TopK] = {}

    def hook(state, bucket):
        buffer, n = bucket.buffer(), dist.get_world_size()
        compressor = compressors.setdefault(bucket.index(), TopK(ratio, error_feedback))
        values, indices = compressor.compress(buffer)
        all_values = [torch.empty_like(values) for _ in range(n)]
        all_indices = [torch.empty_like(indices) for _ in range(n)]
        dist.all_gather(all_values, values)
        dist.all_gather(all_indices, indices)
        dense = TopK.decompress(torch.cat(all_values), torch.cat(all_indices), buffer.numel())
        return _done(buffer.copy_(dense.div_(n)))

    return hook


def powersgd(rank: int = 1, start_iter: int = 2):
    """PyTorch's PowerSGD hook and its state (error feedback and warm start on, as by default)."""
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                        start_powerSGD_iter=start_iter, min_compression_rate=2)
    return state, powerSGD_hook.powerSGD_hook


# -- counting what leaves the rank ---------------------------------------------------------------------

class Counter:
    def __init__(self):
        self.bytes, self.calls = 0, 0


@contextmanager
def counting():
    """Count the payload bytes of every dist.all_reduce / all_gather issued inside (PowerSGD's too).

    The counting wraps torch.distributed's functions for the duration, in this process only."""
    counter, originals = Counter(), {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def counted(name):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            counter.bytes, counter.calls = counter.bytes + nbytes(tensor), counter.calls + 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in originals:
            setattr(dist, name, counted(name))
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def register(model: DDP, method: str, ratio: float = 0.01, rank: int = 1, error_feedback: bool = True) -> None:
    """Install the communication hook of `method` on a DDP model ("none" keeps DDP's all-reduce)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in CASTS:
        model.register_comm_hook(None, cast_hook(CASTS[method]))
    elif method == "topk":
        model.register_comm_hook(None, topk_hook(ratio, error_feedback))
    elif method == "powersgd":
        model.register_comm_hook(*powersgd(rank))
    else:  # DDP's built-in all-reduce runs in C++, out of counting()'s sight: the same average, by hook
        model.register_comm_hook(None, cast_hook(torch.float32))


# -- the experiment: the same digits training, one compression method at a time (a rank function) -------

def train_compressed(ctx, method: str = "none", steps: int = 150, lr: float = 0.1, batch: int = 32,
                     hidden: int = 64, **options) -> dict:
    """Data-parallel MLP on digits with `method`'s hook; returns bytes sent per rank and test accuracy."""
    torch.manual_seed(0)
    x, y, x_test, y_test = digits(ctx.rank, ctx.world_size)
    model = DDP(mlp(64, hidden, 10))
    register(model, method, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = minibatches(x, y, batch, seed=0, rank=ctx.rank)
    per_step = []
    with counting() as counter:
        for _ in range(steps):
            xb, yb = next(batches)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            before = counter.bytes
            loss.backward()
            per_step.append(counter.bytes - before)
            optimizer.step()
    accuracy = models.accuracy(model, x_test, y_test)
    params = sum(p.numel() for p in model.parameters())
    return {"method": method, **options, "bytes": counter.bytes, "bytes_per_step": per_step,
            "fp32_bytes": steps * 4 * params, "accuracy": accuracy, "loss": loss.item()}


def compare_compression(ctx, configs: list[dict], steps: int = 150) -> list[dict]:
    """train_compressed for each config (e.g. {"method": "topk", "ratio": 0.01}), one after another."""
    return [train_compressed(ctx, steps=steps, **config) for config in configs]
