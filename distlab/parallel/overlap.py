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
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from time import perf_counter

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
    all-reduce was issued and when it completed (its future's callback)."""

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
        span = {"kind": "comm", "name": f"bucket {bucket}", "start": perf_counter(), "bytes": nbytes(flat)}
        work = dist.all_reduce(flat, async_op=True)
        work.get_future().then(lambda _: span.update(end=perf_counter()))  # run by gloo's thread when it is done
        self._pending.append((bucket, flat, span, work))

    def finish(self) -> None:
        """After backward: start what has not started (all of it without overlap), wait, write the averages back."""
        if not self.overlap:
            for bucket in range(len(self.buckets)):
                self._launch(bucket)
        for bucket, flat, span, work in self._pending:
            work.wait()
            span.setdefault("end", perf_counter())  # the callback may still be running
            self.spans.append(span)
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
        start = perf_counter()
        loss.backward()
        backward_end = perf_counter()
        grads.finish()
        done = perf_counter()
        record = out.setdefault(mode, {"exposed": [], "spans": []})
        record["exposed"].append(done - backward_end)
        record["spans"] = [{"kind": "compute", "name": "backward", "start": start, "end": backward_end, "bytes": 0},
                           *grads.spans]
        record["grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu()
        record["buckets"] = len(grads.buckets)
    return out


# -- DDP's own buckets on the same timeline ------------------------------------------------------------------------

def _last_gradient_clock(model: nn.Module) -> list[float]:
    """A one-element list that holds when backward last accumulated a parameter's gradient: the end of its compute
    (DDP's backward returns only after its buckets are reduced, so its return is not the end of compute)."""
    clock = [0.0]

    def arrived(param):
        clock[0] = perf_counter()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(arrived)
    return clock


def ddp_timeline(ctx, bucket_cap_mb: float = 0.125, steps: int = 4, batch: int = 8,
                 cfg: GPTConfig | None = None) -> dict:
    """DDP with buckets of `bucket_cap_mb` MiB, each bucket's all-reduce timed by a comm hook (from the moment backward
    hands it over to its future's completion): per step the compute span (backward's start to its last gradient),
    the comm spans, and the exposed communication (the last gradient to backward's return)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = cfg or GPTConfig(n_layer=6)
    x, y = (t.to(ctx.device) for t in next(batches(batch, cfg.block_size, ctx.rank)))
    model, spans = gpt(cfg).to(ctx.device), Spans(ctx.device)
    clock = _last_gradient_clock(model)
    model = DDP(model, bucket_cap_mb=bucket_cap_mb)
    model.register_comm_hook(None, timed_allreduce_hook(spans))
    out = {"exposed": [], "spans": [], "grad_bytes": sum(nbytes(p) for p in model.parameters()), "bytes": []}
    for step in range(steps):
        spans.step = step
        model.zero_grad()
        loss = lm_loss(model(x), y)
        dist.barrier()
        start = perf_counter()
        loss.backward()
        done = perf_counter()
        mine = [r for r in spans.rows if r["step"] == step]
        out["exposed"].append(done - clock[0])
        out["bytes"].append(sum(r["bytes"] for r in mine))
        out["spans"] = [{"kind": "compute", "name": "backward", "start": start, "end": clock[0], "bytes": 0},
                        *[{**r, "name": f"bucket {i}"} for i, r in enumerate(sorted(mine, key=lambda r: r["start"]))]]
    out["buckets"] = len(out["spans"]) - 1
    out["grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).cpu()
    return out


def bucket_timelines(ctx, bucket_bytes: int = 1 << 17, steps: int = 4, batch: int = 8,
                     cfg: GPTConfig | None = None) -> dict:
    """overlap_timeline's two modes and DDP's own buckets of the same size, same model and batch: one timeline."""
    return {**overlap_timeline(ctx, bucket_bytes, steps, batch, cfg),
            "DDP": ddp_timeline(ctx, bucket_bytes / 2**20, steps, batch, cfg)}


# -- FSDP2: the next unit's all-gather issued early ------------------------------------------------------------------

PREFETCH = ("default", "forward prefetch", "async prefetch")


def _timed_all_gather(unit: str, rows: list):
    """FSDP2's own all-gather (for `set_custom_all_gather`), each call's span recorded: from its issue to its
    completion (the future's callback, run by gloo's thread when the gather is done; a blocking one's return)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    class TimedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            start = perf_counter()
            work = super().__call__(output_tensor, input_tensor, group, async_op)
            span = {"kind": "comm", "name": f"all-gather {unit}", "start": start, "bytes": nbytes(output_tensor)}
            if work is None:
                rows.append({**span, "end": perf_counter()})
            else:
                work.get_future().then(lambda _: rows.append({**span, "end": perf_counter()}))
            return work

    return TimedAllGather()


def _time_forwards(model: nn.Sequential, spans: list) -> None:
    """A compute span per layer's forward, from after FSDP's pre-forward (its gather waited for) to before its
    post-forward (the reshard): the layer's own compute."""
    started: dict[int, float] = {}
    for i, layer in enumerate(model):
        layer.register_forward_pre_hook(lambda module, args, i=i: started.__setitem__(i, perf_counter()))
        layer.register_forward_hook(lambda module, args, output, i=i: spans.append(
            {"kind": "compute", "name": f"layer {i}", "layer": i, "start": started[i], "end": perf_counter(),
             "bytes": 0}), prepend=True)


def _fully_sharded(ctx, cfg: GPTConfig, mode: str, gathers: list) -> nn.Sequential:
    """`fully_shard` on each block, then on the root (embedding and head); each unit's all-gathers timed; the
    blocks' forward prefetch as `mode` says (see fsdp_prefetch_timeline)."""
    from torch.distributed.fsdp import fully_shard

    model = gpt(cfg).to(ctx.device)
    blocks = list(model[1:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2 warns that the root's output is a view; nothing here edits it in place
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    for unit, module in [("root", model), *((f"layer {i + 1}", b) for i, b in enumerate(blocks))]:
        module.set_custom_all_gather(_timed_all_gather(unit, gathers))
    for block, following in zip(blocks, blocks[1:]):
        if mode == "forward prefetch":
            block.set_modules_to_forward_prefetch([following])
        elif mode == "async prefetch":  # after this block's own gather (FSDP's pre-forward hook runs first)
            block.register_forward_pre_hook(_prefetcher(following))
    return model


def _prefetcher(following: nn.Module):
    def prefetch(module, args) -> None:  # returns None: a pre-hook's value would replace the block's input
        following.unshard(async_op=True)
    return prefetch


def fsdp_prefetch_timeline(ctx, steps: int = 3, batch: int = 8, cfg: GPTConfig | None = None) -> dict:
    """FSDP2's forward, per mode of PREFETCH, `steps` each, taking turns: each layer's compute span and each unit's
    all-gather span (issue to completion, perf_counter seconds), and the loss (the same in every mode).

    default: FSDP2's implicit prefetch — a unit's gather issued in its own pre-forward, which on a GPU the CPU reaches
    while the previous layer's kernels still run; on a CPU that layer's compute is already over.
    forward prefetch: `set_modules_to_forward_prefetch([next block])` — the next gather issued right after this
    block's own, before its compute; blocking on CPU (FSDP's unshard is not async_op by default).
    async prefetch: the next block's `unshard(async_op=True)` from this block's pre-forward — issued as early and run
    by gloo's thread while this block computes.
    On a GPU the compute spans are the CPU's (kernel launches, no synchronize): when each was issued, not run."""
    cfg = cfg or GPTConfig(n_layer=6)
    x, y = (t.to(ctx.device) for t in next(batches(batch, cfg.block_size, ctx.rank)))
    out = {}
    for mode in PREFETCH * steps:
        gathers, computes = [], []
        model = _fully_sharded(ctx, cfg, mode, gathers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP2 warns that the root's output is a view (see _fully_sharded)
            lm_loss(model(x), y).backward()  # the first step lazily initialises FSDP: leave it off the timeline
            del gathers[:]
            _time_forwards(model, computes)
            dist.barrier()
            start = perf_counter()
            loss = lm_loss(model(x), y)
            forward_end = perf_counter()
            loss.backward()
        record = out.setdefault(mode, {"forward": []})
        forward_gathers = [g for g in gathers if g["start"] < forward_end]
        record["spans"] = sorted(computes + forward_gathers, key=lambda s: s["start"])
        record["forward"].append(forward_end - start)
        record["loss"] = loss.item()
    return out


def early_gathers(spans: list[dict]) -> int:
    """How many blocks' all-gathers (layer j ≥ 2) were issued before layer j − 1's forward ended: prefetched ones."""
    ends = {s["layer"]: s["end"] for s in spans if s["kind"] == "compute"}
    issued = {int(s["name"].split()[-1]): s["start"] for s in spans if s["name"].startswith("all-gather layer")}
    return sum(start < ends[layer - 1] for layer, start in issued.items() if layer >= 2)


def uncovered_forward(record: dict) -> float:
    """Seconds of the last forward not spent in any layer's compute: waiting for all-gathers, and FSDP's hooks."""
    computes = [s for s in record["spans"] if s["kind"] == "compute"]
    return record["forward"][-1] - sum(s["end"] - s["start"] for s in computes)
