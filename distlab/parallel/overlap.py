"""Trading memory, time and communication within a step: gradient accumulation, activation checkpointing, bf16
autocast, and gradient all-reduces that overlap the backward pass, each measured on the tiny GPT.

- Accumulation: k micro-batches, gradients summed locally, one all-reduce per step (DDP's `no_sync`,
  https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html#torch.nn.parallel.DistributedDataParallel.no_sync).
- Checkpointing (Chen et al. 2016, https://arxiv.org/abs/1604.06174; `torch.utils.checkpoint`): a block keeps only
  its input and runs its forward again in backward: activation memory down, compute up by about a forward.
- Autocast (https://pytorch.org/docs/stable/amp.html): matmuls in bf16 on CPU, about half the saved bytes.
- Overlap (DDP's buckets, Li et al. 2020, https://arxiv.org/abs/2006.15704; picotron's bucketed data parallel):
  gradients grouped in buckets in the order backward produces them; each bucket's all-reduce starts, async, the
  moment its last gradient arrives, while backward goes on through the earlier layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..comm import nbytes
from ..gpt import GPTConfig, batches, gpt, lm_loss
from .data_parallel import Spans, timed_allreduce_hook
from .memory import SavedTensors, allocated, layer_names


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def timed(runs: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """The median CPU seconds of this process over `repeats` calls of each, the calls taking turns, after one warm-up
    call each. CPU time, not wall time: on a shared machine the wait for a core is not the work's."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    return {name: _median(t) for name, t in times.items()}


class Checkpointed(nn.Module):
    """A block whose activations are recomputed in backward instead of kept (non-reentrant checkpoint)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def checkpointed(model: nn.Sequential) -> nn.Sequential:
    """The same layers (the same parameters), every block but the embedding and head checkpointed."""
    return nn.Sequential(model[0], *[Checkpointed(block) for block in model[1:-1]], model[-1])


def graph_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool = False) -> int:
    """Bytes the autograd graph holds after the forward (what backward will need), from the profiler's records."""
    held: list = []

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            held.append(lm_loss(model(x), y))
    return allocated(forward)[1]


def recompute_effect(cfg: GPTConfig | None = None, batch: int = 16, repeats: int = 5) -> dict:
    """Activation bytes held after forward and seconds of forward+backward, with and without checkpointing."""
    cfg = cfg or GPTConfig()
    model = gpt(cfg)
    x, y = next(batches(batch, cfg.block_size))
    variants = {"plain": model, "checkpointed": checkpointed(model)}
    seconds = timed({name: (lambda v=v: lm_loss(v(x), y).backward()) for name, v in variants.items()}, repeats)
    model.zero_grad()
    return {name: {"held_bytes": graph_bytes(v, x, y), "seconds": seconds[name]} for name, v in variants.items()}


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = lm_loss(model(x), y)
    loss.backward()
    return loss


def _losses(cfg: GPTConfig, batch: int, steps: int, lr: float, bf16: bool) -> list[float]:
    """Adam from gpt(cfg)'s weights on batches(batch) (the same for both precisions): the loss of each step."""
    model, data = gpt(cfg), batches(batch, cfg.block_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        losses.append(_forward_backward(model, *next(data), bf16).item())
        optimizer.step()
    return losses


def autocast_effect(cfg: GPTConfig | None = None, batch: int = 16, steps: int = 30, lr: float = 3e-3,
                    repeats: int = 5) -> dict:
    """fp32 against bf16 autocast on CPU: bytes saved for backward (saved-tensor hooks), seconds of a
    forward+backward, and the loss of each of `steps` Adam steps from the same weights on the same batches."""
    cfg = cfg or GPTConfig()
    x, y = next(batches(batch, cfg.block_size))
    precisions = {"fp32": False, "bf16": True}
    models = {name: gpt(cfg) for name in precisions}
    seconds = timed({name: (lambda name=name: _forward_backward(models[name], x, y, precisions[name]))
                     for name in precisions}, repeats)
    out = {}
    for name, bf16 in precisions.items():
        saved = SavedTensors(models[name])
        with saved.watching(layer_names(cfg)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lm_loss(models[name](x), y)
        out[name] = {"saved_bytes": saved.total, "seconds": seconds[name],
                     "losses": _losses(cfg, batch, steps, lr, bf16)}
    return out


# -- on ranks: accumulation, and the overlap of all-reduce with backward -----------------------------------------

def accumulate(ctx, micro_batches: int = 4, batch: int = 4, cfg: GPTConfig | None = None, lr: float = 0.1) -> dict:
    """DDP with `no_sync` on all micro-batches but the last, against one big batch on every rank: the same step;
    DDP's bucket all-reduces counted by a comm hook (they run only on the last micro-batch's backward)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = cfg or GPTConfig()
    x, y = (t.to(ctx.device) for t in next(batches(micro_batches * batch, cfg.block_size, ctx.rank)))
    results = {}
    for name in ("accumulated", "one batch"):
        model, spans = DDP(gpt(cfg).to(ctx.device)), Spans(ctx.device)
        model.register_comm_hook(None, timed_allreduce_hook(spans))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        pieces = list(zip(x.chunk(micro_batches), y.chunk(micro_batches))) if name == "accumulated" else [(x, y)]
        for i, (xb, yb) in enumerate(pieces):
            spans.step = i
            with nullcontext() if i == len(pieces) - 1 else model.no_sync():
                (lm_loss(model(xb), yb) / len(pieces)).backward()
        optimizer.step()
        results[name] = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu(),
                         "all_reduces": [sum(r["step"] == i for r in spans.rows) for i in range(len(pieces))],
                         "bytes": sum(r["bytes"] for r in spans.rows)}
    return results


class OverlappedGradients:
    """Gradients averaged in buckets of about `bucket_bytes`, each all-reduced asynchronously as soon as backward
    has produced all of its gradients; `finish()` waits for the rest. Spans record when each bucket's
    all-reduce was issued and when it was seen done, and when backward itself ran."""

    def __init__(self, model: nn.Module, bucket_bytes: int, overlap: bool = True):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = self._buckets(list(reversed(self.params)), bucket_bytes)  # backward meets the last layer first
        self.overlap, self.spans = overlap, []
        self._pending: list = []
        self._ready: dict[int, int] = {}
        for b, bucket in enumerate(self.buckets):
            for p in bucket:
                p.register_post_accumulate_grad_hook(self._hook(b))

    @staticmethod
    def _buckets(params: list, bucket_bytes: int) -> list[list]:
        buckets, size = [[]], 0
        for p in params:
            if buckets[-1] and size + nbytes(p) > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += nbytes(p)
        return buckets

    def _hook(self, bucket: int):
        return lambda param: self._arrived(bucket)

    def _arrived(self, bucket: int) -> None:
        self._ready[bucket] = self._ready.get(bucket, 0) + 1
        if self._ready[bucket] == len(self.buckets[bucket]) and self.overlap:
            self._launch(bucket)

    def _launch(self, bucket: int) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[bucket]])
        self._pending.append((bucket, flat, time.perf_counter(), dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """After backward: start what has not started (all of it without overlap), wait, write the averages back."""
        if not self.overlap:
            for bucket in range(len(self.buckets)):
                self._launch(bucket)
        for bucket, flat, start, work in self._pending:
            work.wait()
            self.spans.append({"kind": "comm", "name": f"bucket {bucket}", "start": start,
                               "end": time.perf_counter(), "bytes": nbytes(flat)})
            flat.div_(dist.get_world_size())
            for p, g in zip(self.buckets[bucket], flat.split([p.numel() for p in self.buckets[bucket]])):
                p.grad.copy_(g.view_as(p))
        self._pending, self._ready = [], {}


def overlap_timeline(ctx, bucket_bytes: int = 1 << 17, steps: int = 4, batch: int = 8,
                     cfg: GPTConfig | None = None) -> dict:
    """Backward with bucketed all-reduces, overlapped and not, `steps` each, alternating: per-rank spans (compute
    and communication lanes, perf_counter seconds), the gradients of the last step, exposed communication
    (from the end of backward to the last bucket done) per step."""
    cfg = cfg or GPTConfig(n_layer=6)
    x, y = (t.to(ctx.device) for t in next(batches(batch, cfg.block_size, ctx.rank)))
    out = {}
    for mode in ("overlapped", "after backward") * steps:
        model = gpt(cfg).to(ctx.device)
        grads = OverlappedGradients(model, bucket_bytes, overlap=mode == "overlapped")
        loss = lm_loss(model(x), y)
        dist.barrier()
        start = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        grads.finish()
        done = time.perf_counter()
        record = out.setdefault(mode, {"exposed": [], "spans": []})
        record["exposed"].append(done - backward_end)
        record["spans"] = [{"kind": "compute", "name": "backward", "start": start, "end": backward_end, "bytes": 0},
                           *grads.spans]
        record["grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu()
        record["buckets"] = len(grads.buckets)
    return out
