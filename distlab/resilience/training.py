"""Data-parallel training that keeps going when ranks fail or lag: the loop notebook 11 runs.

Each step every rank computes a gradient on its batch, the ranks average them with one all-reduce
and take the same SGD step, so the replicas stay identical. Around that core:
- checkpoints every k steps, and resume from the last complete one (after `dl.launch(restarts=)` or
  `torchrun --max-restarts`), so a restarted job ends exactly where an uninterrupted one would;
- injected faults (faults.py): a rank killed at step k, a rank slowed by x ms, live orders;
- a deadline that drops late gradients: a rank whose gradient is not ready in time sends zeros with
  weight 0, and the others average without it, instead of everyone waiting for the straggler.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import data, models
from .checkpoint import Checkpointer
from .faults import Faults


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delay: float = 0.0):
    """(gradients, loss) at a snapshot of the parameters, so it can run in a thread while they change."""
    time.sleep(delay)  # an injected straggler computes slowly
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, list(params.values())), loss.item()


class Deadline:
    """Compute each gradient in a background thread and wait for it at most `seconds`.

    Late: this step gets no gradient from this rank, and while the late one is still computing the
    rank starts no new one; when it finishes it is stale, so it is dropped.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gradient")
        self._late = None

    def gradient(self, *args):
        if self._late is not None and not self._late.done():
            return None
        future = self._pool.submit(gradient, *args)
        try:
            self._late = None
            return future.result(timeout=self.seconds)
        except FutureTimeout:
            self._late = future
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def train(ctx, steps: int = 60, lr: float = 0.1, batch: int = 32, hidden: int = 32, seed: int = 0,
          checkpoint_every: int = 10, checkpoint_dir: str | None = None, faults: Faults | dict | None = None,
          deadline_ms: float | None = None) -> dict:
    """Train the digits MLP for `steps` steps on every rank; returns final parameters and accuracy."""
    torch.manual_seed(seed)
    x, y, x_test, y_test = data.digits(ctx.rank, ctx.world_size, seed=seed)
    model = models.mlp(64, hidden, 10).to(ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    folder = checkpoint_dir or ctx.run_dir / "checkpoints"
    checkpoints = Checkpointer(folder, ctx.rank, ctx.world_size, checkpoint_every)
    start = checkpoints.restore(model, optimizer)
    faults = Faults(**faults) if isinstance(faults, dict) else faults or Faults()
    deadline = Deadline(deadline_ms / 1000) if deadline_ms else None
    batches = data.minibatches(x, y, batch, seed, ctx.rank, start=start)  # the step number is the data position
    ctx.set_total(steps)
    for step in range(start, steps):
        began = time.perf_counter()
        xb, yb = next(batches)
        work = (model, xb.to(ctx.device), yb.to(ctx.device), faults.step_delay(ctx))
        result = deadline.gradient(*work) if deadline else gradient(*work)
        contributors = apply_mean_gradient(ctx, model, result)
        optimizer.step()
        loss = {"loss": result[1]} if result else {}  # a rank that missed the deadline has no loss this step
        ctx.log(step=step, **loss, contributors=contributors, step_seconds=time.perf_counter() - began,
                attempt=ctx.attempt)
        checkpoints.save(step + 1, model, optimizer)
        faults.after_step(ctx, step)
    if deadline:
        deadline.close()
    with torch.no_grad():
        accuracy = (model(x_test.to(ctx.device)).argmax(1) == y_test.to(ctx.device)).float().mean().item()
    params = nn.utils.parameters_to_vector(model.parameters()).detach().cpu()
    return {"params": params, "accuracy": accuracy, "resumed_from": start}


def apply_mean_gradient(ctx, model: nn.Module, result) -> int:
    """Set each parameter's .grad to the mean of the gradients that arrived in time; return how many."""
    params = list(model.parameters())
    if result is None:
        flat = torch.zeros(sum(p.numel() for p in params) + 1, device=ctx.device)
    else:
        flat = torch.cat([g.reshape(-1) for g in result[0]] + [torch.ones(1, device=ctx.device)])
    ctx.comm.all_reduce(flat)
    contributors = int(flat[-1].item())
    mean = flat[:-1] / max(contributors, 1)
    offset = 0
    for p in params:
        p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return contributors
