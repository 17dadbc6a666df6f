"""Model parallelism: the layers of one model split across ranks, each rank holding one stage.

Forward, each stage sends its output activations to the next; backward, each sends the gradient of
its input back to the previous one. Split this naively, one rank computes while the others wait:
GPipe (Huang et al. 2019, arXiv:1811.06965) fills that idle time with micro-batches (pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models import mlp
from ..ranks import world_sizes
from .data_parallel import SIZES, Spans, digits_train, flat, shard_batches


def split_layers(model: nn.Sequential, stages: int) -> list[nn.Sequential]:
    """Cut an MLP into `stages` consecutive pieces with about as many Linear layers each; a Linear
    keeps its activation. The pieces share the model's parameters (no copy)."""
    linears = [i for i, layer in enumerate(model) if isinstance(layer, nn.Linear)]
    if not 1 <= stages <= len(linears):
        raise ValueError(f"stages must be between 1 and the model's {len(linears)} Linear layers, got {stages}")
    starts = [linears[len(linears) * s // stages] for s in range(stages)] + [len(model)]
    return [model[a:b] for a, b in zip(starts, starts[1:])]


def pipeline_step(stage: nn.Module, width: int, x: torch.Tensor, y: torch.Tensor, before: int | None,
                  after: int | None, comm, spans: Spans) -> torch.Tensor | None:
    """One forward and backward of a batch through the stages; this rank runs `stage`, whose inputs
    have `width` features. `before` / `after` are the ranks of the neighbouring stages (None at the
    ends); `comm` sends and receives (ctx.comm). Gradients land in the stage's parameters; the last
    stage returns the loss."""
    if before is None:
        inputs = x
    else:
        inputs = torch.empty(len(x), width, device=x.device)
        with spans.comm("recv", inputs):
            comm.recv(inputs, src=before)
        inputs.requires_grad_()
    with spans.compute("forward"):
        out = stage(inputs)
        loss = F.cross_entropy(out, y) if after is None else None
    if after is None:
        with spans.compute("backward"):
            loss.backward()
    else:
        with spans.comm("send", out):
            comm.send(out.detach(), dst=after)
        grad = torch.empty_like(out)
        with spans.comm("recv", grad):
            comm.recv(grad, src=after)
        with spans.compute("backward"):
            out.backward(grad)
    if before is not None:
        with spans.comm("send", inputs.grad):
            comm.send(inputs.grad, dst=before)
    return loss


def train_stage(ctx, stage: nn.Module, width: int, data: Iterator, before: int | None, after: int | None,
                steps: int, lr: float, spans: Spans, average: Callable[[], None] | None = None) -> dict:
    """SGD on one stage: pipeline_step on each batch of `data`, then `average` (when given: averages the
    gradients over replicas, grid.py). Returns this stage's losses (last stage only), first-step
    gradients, final parameters and timeline spans."""
    params = list(stage.parameters())
    optimizer = torch.optim.SGD(params, lr=lr)
    ctx.set_total(steps)
    losses, first_grads = [], None
    for step in range(steps):
        spans.step = step
        x, y = (t.to(ctx.device) for t in next(data))
        optimizer.zero_grad()
        loss = pipeline_step(stage, width, x, y, before, after, ctx.comm, spans)
        if average is not None:
            average()
        if step == 0:
            first_grads = flat(p.grad for p in params)
        with spans.compute("optimizer"):
            optimizer.step()
        if loss is not None:
            losses.append(loss.item())
            ctx.log(step=step, loss=losses[-1])
    return {"losses": losses, "grads": first_grads, "params": flat(params), "spans": spans.rows}


@world_sizes(lambda n, **_: 1 <= n <= len(SIZES) - 1, "the digits MLP has 3 Linear layers: one stage per rank, 1 to 3 "
             "stages")
def train_model_parallel(ctx, steps: int = 20, batch: int = 64, lr: float = 0.5, seed: int = 0) -> dict:
    """Rank function: the digits MLP split by layers over the ranks, rank r holding stage r.

    Every rank builds the whole model from the same seed and keeps its stage, so the split model
    starts from the weights of the unsplit one. Returns what train_stage does."""
    torch.manual_seed(seed)
    stage = split_layers(mlp(*SIZES).to(ctx.device), ctx.world_size)[ctx.rank]
    before = ctx.rank - 1 if ctx.rank > 0 else None
    after = ctx.rank + 1 if ctx.rank < ctx.world_size - 1 else None
    data = shard_batches(*digits_train(), 0, 1, batch, seed)  # every stage sees the whole batch
    return train_stage(ctx, stage, stage[0].in_features, data, before, after, steps, lr, Spans(ctx.device))
