"""Pipeline parallelism: the model's layers cut into p stages, one per rank, micro-batches flowing through.

Two schedules written by hand over point-to-point send/recv:
- GPipe (Huang et al., 2019): every micro-batch's forward, then every backward. Simple; each stage
  keeps the activations of all m micro-batches until their backward.
- 1F1B (PipeDream-Flush, Narayanan et al., 2021): after a short warm-up each stage alternates one
  forward and one backward, so it holds at most p - stage micro-batches of activations.
Both spend the same idle time (the bubble, (p-1)/(m+p-1) of the step) and give the same gradients.
Beside them `torch.distributed.pipelining` runs the same stages, and `data_pipeline` puts two such
pipelines side by side on a 2-D DeviceMesh (data x pipeline).

Every forward/backward is timestamped, so the bubble is measured, not assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import gpt
from ..comm import nbytes
from ..ranks import world_sizes
from .mesh import device_mesh

Action = tuple[str, int]  # ("F" or "B", micro-batch index)
SCHEDULES = ("gpipe", "1f1b")


def stage_bounds(n_layers: int, p: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges for p stages, sizes within one of each other."""
    if not 1 <= p <= n_layers:
        raise ValueError(f"p={p} stages must be between 1 and the number of layers ({n_layers})")
    cuts = [round(i * n_layers / p) for i in range(p + 1)]
    return list(zip(cuts, cuts[1:]))


def stage_module(model: nn.Sequential, stage: int, p: int) -> nn.Sequential:
    start, end = stage_bounds(len(model), p)[stage]
    return model[start:end]


def gpipe_schedule(m: int) -> list[Action]:
    """All forwards, then all backwards (the same order on every stage)."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b_schedule(m: int, p: int, stage: int) -> list[Action]:
    """Warm up with p - stage - 1 forwards, then alternate one forward and one backward, then drain."""
    warmup = min(p - stage - 1, m)
    steady = [a for i in range(m - warmup) for a in (("F", warmup + i), ("B", i))]
    return [("F", i) for i in range(warmup)] + steady + [("B", i) for i in range(m - warmup, m)]


def _check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}; choose one of {SCHEDULES}")


def schedule_for(name: str, m: int, p: int, stage: int) -> list[Action]:
    _check_schedule(name)
    return gpipe_schedule(m) if name == "gpipe" else one_f_one_b_schedule(m, p, stage)


class SavedBytes:
    """Bytes autograd saves for backward during a forward, parameters excluded: the activation memory."""

    def __init__(self, module: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self._params:
            self.total += nbytes(t)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def run_schedule(ctx, module: nn.Module, actions: list[Action], ranks: list[int], micro_inputs, micro_targets,
                 act_shape: tuple[int, ...], t0: float) -> dict:
    """Execute one stage's actions. `ranks` lists the global ranks of the pipeline, stage by stage.

    Returns this stage's loss (last stage), its timeline of events and its peak activation memory.
    """
    stage, p, m = ranks.index(ctx.rank), len(ranks), len(micro_inputs)
    first, last = stage == 0, stage == p - 1
    inputs, outputs, held, sends, events = {}, {}, {}, [], []
    live = peak = peak_micro = 0
    total_loss = 0.0
    for kind, i in actions:
        if kind == "F":
            x = micro_inputs[i] if first else ctx.comm.recv(torch.empty(act_shape, device=ctx.device), ranks[stage - 1],
                                                            tag="pp")
            x.requires_grad_(not first)
            start, saved = time.perf_counter(), SavedBytes(module)
            with saved.hooks():
                y = module(x)
                if last:
                    y = gpt.lm_loss(y, micro_targets[i]) / m
            events.append(dict(stage=stage, kind="F", micro=i, start=start - t0, end=time.perf_counter() - t0))
            inputs[i], outputs[i], held[i] = x, y, saved.total
            live += saved.total
            peak, peak_micro = max(peak, live), max(peak_micro, len(held))
            if last:
                total_loss += y.item()
            else:
                # non-blocking: in 1F1B neighbours send to each other at the same moment (a blocking send deadlocks)
                sends.append(ctx.comm.isend(y.detach(), ranks[stage + 1], tag="pp"))
        else:
            grad = None if last else ctx.comm.recv(torch.empty(act_shape, device=ctx.device), ranks[stage + 1],
                                                   tag="pp")
            start = time.perf_counter()
            outputs.pop(i).backward(grad)
            events.append(dict(stage=stage, kind="B", micro=i, start=start - t0, end=time.perf_counter() - t0))
            x = inputs.pop(i)
            live -= held.pop(i)
            if not first:
                sends.append(ctx.comm.isend(x.grad, ranks[stage - 1], tag="pp"))
    for s in sends:
        s.wait()
    return dict(loss=total_loss if last else None, events=events, peak_bytes=peak, peak_micro=peak_micro)


def bubble_fraction(events: list[dict], p: int) -> float:
    """Measured idle share: 1 - (busy seconds of all stages) / (p x the step's makespan)."""
    busy = sum(e["end"] - e["start"] for e in events)
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    return 1 - busy / (p * span)


def predicted_bubble(p: int, m: int) -> float:
    """GPipe's bubble fraction, equal stages, no communication cost: (p-1)/(m+p-1)."""
    return (p - 1) / (m + p - 1)


def _waits_for(kind: str, stage: int, i: int, p: int) -> tuple[str, int, int] | None:
    """A forward waits for the previous stage's forward; a backward for the next stage's backward
    (on the last stage, for its own forward)."""
    if kind == "F":
        return ("F", stage - 1, i) if stage > 0 else None
    return ("B", stage + 1, i) if stage < p - 1 else ("F", stage, i)


def simulate(schedule: str | list[list[Action]], p: int, m: int, t_forward: float = 1.0,
             t_backward: float = 2.0) -> list[dict]:
    """The timeline the formula assumes: equal stages, free communication. Each stage runs its actions in
    order, each as soon as the stage is free and its input is ready. `schedule`: a name, or each stage's
    list of actions (a schedule written by hand, e.g. a lab's)."""
    queues = ([schedule_for(schedule, m, p, s) for s in range(p)] if isinstance(schedule, str)
              else [list(actions) for actions in schedule])
    done: dict[tuple[str, int, int], float] = {}
    free, events = [0.0] * p, []
    while any(queues):
        progressed = False
        for s, queue in enumerate(queues):
            while queue:
                kind, i = queue[0]
                dep = _waits_for(kind, s, i, p)
                if dep is not None and dep not in done:
                    break
                queue.pop(0)
                start = max(free[s], done[dep] if dep else 0.0)
                free[s] = done[(kind, s, i)] = start + (t_forward if kind == "F" else t_backward)
                events.append(dict(stage=s, kind=kind, micro=i, start=start, end=free[s]))
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks")
    return events


def split_micro(x: torch.Tensor, m: int) -> list[torch.Tensor]:
    if m < 1 or len(x) % m:
        raise ValueError(f"micro_batches={m} must be a positive divisor of the batch size {len(x)}")
    return list(x.chunk(m))


def stage_grads(module: nn.Sequential) -> dict[str, torch.Tensor]:
    """A stage's gradients under the whole model's names: a slice of nn.Sequential keeps the indices."""
    return {n: q.grad.cpu() for n, q in module.named_parameters()}


def layer_count(cfg: gpt.GPTConfig | None) -> int:
    """Layers of the GPT as an nn.Sequential: embedding, the blocks, the head."""
    return (cfg or gpt.GPTConfig()).n_layer + 2


one_stage_per_rank = world_sizes(lambda n, cfg=None, **_: n <= layer_count(cfg),
                                 f"one pipeline stage per rank, and a stage needs at least one of the GPT's "
                                 f"{layer_count(None)} layers")


@one_stage_per_rank
def pipeline_train(ctx, schedule: str = "gpipe", micro_batches: int = 4, batch_size: int = 16, steps: int = 1,
                   lr: float = 0.0, cfg: gpt.GPTConfig | None = None, seed: int = 0, ranks: list[int] | None = None,
                   data_shard: tuple[int, int] = (0, 1), grad_sync: Callable[[nn.Module], None] | None = None) -> dict:
    """Train the tiny GPT cut into len(ranks) stages (default: one per rank) with a hand-written schedule.

    Every step draws the same batch on every rank (same seed); `data_shard`=(r, n) keeps every n-th row
    from row r, and `grad_sync` runs after backward (both for data parallelism on top, see
    `data_pipeline`). Returns the last step's timeline and peak memory, every step's loss (last stage,
    None elsewhere) and the gradients under the whole model's parameter names.
    """
    cfg = cfg or gpt.GPTConfig()
    ranks = ranks or list(range(ctx.world_size))
    stage, p = ranks.index(ctx.rank), len(ranks)
    model = gpt.gpt(cfg, seed).to(ctx.device)
    module = stage_module(model, stage, p)
    data = gpt.batches(batch_size, cfg.block_size, seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    actions = schedule_for(schedule, micro_batches, p, stage)
    losses = []
    for step in range(steps):
        x, y = (t[data_shard[0]::data_shard[1]].to(ctx.device) for t in next(data))
        xs, ys = split_micro(x, micro_batches), split_micro(y, micro_batches)
        optimizer.zero_grad()
        dist.barrier()
        out = run_schedule(ctx, module, actions, ranks, xs, ys, (len(xs[0]), cfg.block_size, cfg.d_model),
                           time.perf_counter())
        if grad_sync:
            grad_sync(module)
        optimizer.step()
        losses.append(out["loss"])
        if out["loss"] is not None:
            ctx.log(step=step, loss=out["loss"], stage=stage)
    grads = stage_grads(module)
    return dict(out, losses=losses, grads=grads, stage=stage, schedule=schedule, m=micro_batches, p=p)


@one_stage_per_rank
def builtin_pipeline(ctx, schedule: str = "gpipe", micro_batches: int = 4, batch_size: int = 16,
                     cfg: gpt.GPTConfig | None = None, seed: int = 0) -> dict:
    """The same stages and batch through torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    _check_schedule(schedule)
    cfg = cfg or gpt.GPTConfig()
    stage, p = ctx.rank, ctx.world_size
    model = gpt.gpt(cfg, seed).to(ctx.device)
    module = stage_module(model, stage, p)
    runner = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    pipe = runner(PipelineStage(module, stage, p, ctx.device), micro_batches, loss_fn=gpt.lm_loss)
    x, y = next(gpt.batches(batch_size, cfg.block_size, seed))
    losses: list[torch.Tensor] = []
    if stage == 0:
        pipe.step(x.to(ctx.device))
    elif stage == p - 1:
        pipe.step(target=y.to(ctx.device), losses=losses)
    else:
        pipe.step()
    grads = stage_grads(module)
    loss = torch.stack(losses).mean().item() if losses else None  # the schedule scales grads by 1/m
    return dict(loss=loss, grads=grads, stage=stage)


@world_sizes(lambda n, dp=2, pp=2, **_: n == dp * pp and pp <= layer_count(None),
             "a dp × pp mesh needs exactly dp·pp ranks (and pp stages of at least one layer)")
def data_pipeline(ctx, dp: int = 2, pp: int = 2, schedule: str = "1f1b", micro_batches: int = 2,
                  batch_size: int = 16, steps: int = 2, lr: float = 0.1, seed: int = 0) -> dict:
    """Data x pipeline on a (dp, pp) DeviceMesh: dp pipelines of pp stages, each on 1/dp of the batch;
    after backward every stage averages its gradients with the same stage of the other pipelines."""
    if dp * pp != ctx.world_size:
        raise ValueError(f"dp={dp} x pp={pp} must equal world_size={ctx.world_size}")
    with device_mesh(ctx.device.type, (dp, pp), ("dp", "pp")) as mesh:
        dp_group, dp_rank = mesh.get_group("dp"), mesh.get_local_rank("dp")

        def average_over_dp(module: nn.Module) -> None:
            for q in module.parameters():
                ctx.comm.all_reduce(q.grad, tag="dp", group=dp_group)
                q.grad /= dp

        out = pipeline_train(ctx, schedule, micro_batches, batch_size, steps, lr, seed=seed,
                             ranks=mesh["pp"].mesh.tolist(), data_shard=(dp_rank, dp), grad_sync=average_over_dp)
        return dict(out, dp_rank=dp_rank)
