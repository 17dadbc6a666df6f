"""The distributed forms of the optimizers: gradient averaging (= large-batch training) with the linear
learning-rate scaling rule, local SGD, ZeRO stage-1 sharded Adam (the naive all-reduce + all-gather form and the
paper's reduce-scatter + all-gather form), and gradient noise against N.

The rank functions at the bottom are what notebook 06 and the tests launch with dl.launch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .. import data, models
from ..comm import Comm, nbytes
from .rules import Adam, adam_update, make

# ---------------------------------------------------------------- synchronous data parallelism


def flat_grad(model: nn.Module) -> torch.Tensor:
    """All gradients of the model as one vector (a copy)."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def average_gradients(model: nn.Module, comm: Comm) -> None:
    """p.grad ← (1/N) Σᵢ ∇Jᵢ(θ): one all-reduce of the flattened gradients, then any optimizer step."""
    grads = flat_grad(model)
    comm.all_reduce(grads).div_(dist.get_world_size())
    offset = 0
    for p in model.parameters():
        p.grad.copy_(grads[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def average_parameters(model: nn.Module, comm: Comm) -> None:
    """θ ← (1/N) Σᵢ θᵢ: the model averaging of local SGD."""
    with torch.no_grad():
        flat = parameters_to_vector(model.parameters())
        comm.all_reduce(flat).div_(dist.get_world_size())
        vector_to_parameters(flat, model.parameters())


def scaled_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """The linear scaling rule: multiply the batch by k, multiply η by k (Goyal et al. 2017)."""
    return base_lr * global_batch / base_batch


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Gradual warm-up: η grows linearly from lr/warmup_steps to lr over the first warmup_steps."""
    return lr if step >= warmup_steps else lr * (step + 1) / warmup_steps


# ---------------------------------------------------------------- ZeRO stage 1


class ShardedAdam:
    """ZeRO stage 1 (Rajbhandari et al. 2020), the naive form: Adam's m and v split evenly across the N ranks.

    Gradients are already averaged by an all-reduce (every rank holds them whole). Each rank updates only its 1/N
    slice of the flattened parameters with the Adam equations, and an all-gather gives every rank the whole
    updated vector: 1.5× the bytes of data parallelism (ReduceScatterAdam below is the paper's form, 1×).
    State per rank: 2·⌈P/N⌉ numbers instead of 2·P.
    """

    def __init__(self, params, comm: Comm, rank: int, world_size: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.comm, self.rank = comm, rank
        self.lr, self.betas, self.eps = lr, betas, eps
        self.total = sum(p.numel() for p in self.params)
        self.shard = math.ceil(self.total / world_size)
        self.padded = self.shard * world_size
        like = self.params[0]
        self.m = torch.zeros(self.shard, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.m)
        self.t = 0

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        return F.pad(flat, (0, self.padded - self.total))

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        mine = slice(self.rank * self.shard, (self.rank + 1) * self.shard)
        theta = self._padded(parameters_to_vector(self.params))
        grad = self._padded(torch.cat([p.grad.reshape(-1) for p in self.params]))
        adam_update(theta[mine], grad[mine], self.m, self.v, self.t, self.lr, *self.betas, self.eps)
        pieces = self.comm.all_gather(theta[mine].contiguous())
        vector_to_parameters(torch.cat(pieces)[:self.total], self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class ReduceScatterAdam(ShardedAdam):
    """ZeRO stage 1 as the paper describes it: each rank passes its *own* gradients; a reduce-scatter leaves rank r
    the sum of its slice only, averaged here, then the same sharded Adam step and all-gather. A reduce-scatter plus
    an all-gather is what a ring all-reduce does, so this sends what plain data parallelism sends, 2(N-1)/N·S;
    ShardedAdam's form (all-reduce first, then all-gather) sends 1.5× that."""

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        mine = slice(self.rank * self.shard, (self.rank + 1) * self.shard)
        grad = self._padded(torch.cat([p.grad.reshape(-1) for p in self.params]))
        my_grad = torch.empty_like(self.m)
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(my_grad, grad)  # newer name first
        my_grad.div_(dist.get_world_size())
        theta = self._padded(parameters_to_vector(self.params))
        adam_update(theta[mine], my_grad, self.m, self.v, self.t, self.lr, *self.betas, self.eps)
        pieces = self.comm.all_gather(theta[mine].contiguous())
        vector_to_parameters(torch.cat(pieces)[:self.total], self.params)


def state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds (tensors only); for a ZeroRedundancyOptimizer pass its
    `.optim`, the optimizer of this rank's own parameters."""
    if isinstance(optimizer, ShardedAdam):
        return nbytes(optimizer.m) + nbytes(optimizer.v)
    return sum(nbytes(t) for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


# ---------------------------------------------------------------- rank functions


def _digits_model(seed: int, *sizes: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return models.mlp(*(sizes or (64, 64, 10)))


def _backward_on_batch(model: nn.Module, opt, batches) -> torch.Tensor:
    """Take the next minibatch, zero the gradients, forward and backward; the caller averages and steps."""
    x, y = next(batches)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    return loss


def train_optimizer(ctx, optimizer: str = "sgd", steps: int = 150, batch: int = 16, seed: int = 0,
                    **hyper) -> float:
    """Data-parallel digits MLP with one of distlab's optimizers on averaged gradients; logs loss per rank."""
    x, y, x_test, y_test = data.digits(ctx.rank, ctx.world_size)
    model = _digits_model(seed)
    opt = make(optimizer, model.parameters(), **hyper)
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    ctx.set_total(steps)
    for step in range(steps):
        loss = _backward_on_batch(model, opt, batches)
        average_gradients(model, ctx.comm)
        opt.step()
        ctx.log(step=step, loss=loss.item())
    return models.accuracy(model, x_test, y_test)


def train_large_batch(ctx, batch: int = 8, base_lr: float = 0.1, base_batch: int = 32, scale: bool = True,
                      warmup_epochs: float = 2.5, epochs: int = 10, seed: int = 0) -> dict:
    """SGD on averaged gradients with global batch N·b for a fixed number of epochs (same compute).

    scale=True applies the linear scaling rule with warm-up; scale=False keeps base_lr.
    """
    x, y, x_test, y_test = data.digits(ctx.rank, ctx.world_size)
    global_batch = ctx.world_size * batch
    n_train = len(data.digits()[0])  # the whole training set: every rank must agree on the step count
    steps = max(1, epochs * n_train // global_batch)
    lr = scaled_lr(base_lr, base_batch, global_batch) if scale else base_lr
    warmup = max(1, round(warmup_epochs * n_train / global_batch)) if scale else 0
    model = _digits_model(seed)
    opt = make("sgd", model.parameters(), lr=lr)
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    for step in range(steps):
        opt.param_groups[0]["lr"] = warmup_lr(step, lr, warmup)
        loss = _backward_on_batch(model, opt, batches)
        average_gradients(model, ctx.comm)
        opt.step()
        ctx.log(step=step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
    return {"global_batch": global_batch, "lr": lr, "steps": steps, "warmup_steps": warmup,
            "accuracy": models.accuracy(model, x_test, y_test)}


def train_local_sgd(ctx, every: int = 4, steps: int = 160, batch: int = 16, lr: float = 0.1, seed: int = 0) -> dict:
    """Local SGD (Stich 2019; periodic averaging): each rank steps alone, models averaged every H=`every` steps."""
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every!r}")
    x, y, x_test, y_test = data.digits(ctx.rank, ctx.world_size)
    model = _digits_model(seed)
    opt = make("sgd", model.parameters(), lr=lr)
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    for step in range(steps):
        loss = _backward_on_batch(model, opt, batches)
        opt.step()
        if (step + 1) % every == 0:
            average_parameters(model, ctx.comm)
        ctx.log(step=step, loss=loss.item())
    if steps % every:
        average_parameters(model, ctx.comm)
    return {"every": every, "params": sum(p.numel() for p in model.parameters()),
            "accuracy": models.accuracy(model, x_test, y_test)}


def compare_zero(ctx, steps: int = 20, lr: float = 1e-2, batch: int = 16, sizes: tuple = (64, 64, 64, 64, 10),
                 dtype: torch.dtype = torch.float32) -> dict:
    """The same k Adam steps five ways: ours unsharded, ours ZeRO-1 in its naive form (all-reduce, then all-gather)
    and in the paper's (reduce-scatter, then all-gather), torch.optim.Adam, torch's ZeroRedundancyOptimizer.
    Returns state bytes per rank, bytes each way sends per step (ring counts) and the largest parameter gaps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer  # imported here: it pulls in FSDP (seconds)

    from ..parallel.zero import counting_collectives

    x, y, _, _ = data.digits(ctx.rank, ctx.world_size)
    x = x.to(dtype)
    names = ("adam", "sharded", "reduce_scatter", "torch", "zero")
    copies = {name: _digits_model(0, *sizes).to(dtype) for name in names}
    opts = {
        "adam": Adam(copies["adam"].parameters(), lr=lr),
        "sharded": ShardedAdam(copies["sharded"].parameters(), ctx.comm, ctx.rank, ctx.world_size, lr=lr),
        "reduce_scatter": ReduceScatterAdam(copies["reduce_scatter"].parameters(), ctx.comm, ctx.rank,
                                            ctx.world_size, lr=lr),
        "torch": torch.optim.Adam(copies["torch"].parameters(), lr=lr),
        "zero": ZeroRedundancyOptimizer(copies["zero"].parameters(), optimizer_class=torch.optim.Adam, lr=lr),
    }
    sent = dict.fromkeys(names, 0.0)
    batches = data.minibatches(x, y, batch, seed=0, rank=ctx.rank)
    for _ in range(steps):
        xb, yb = next(batches)
        for name, model in copies.items():
            opts[name].zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            with counting_collectives() as calls:
                if name != "reduce_scatter":  # it takes this rank's own gradients
                    average_gradients(model, ctx.comm)
                opts[name].step()
            sent[name] += sum(c["sent"] for c in calls) / steps
    del sent["zero"]  # ZeroRedundancyOptimizer hands parameters out by broadcast, not counted here
    flat = {name: parameters_to_vector(model.parameters()) for name, model in copies.items()}
    return {
        "params": flat["adam"].numel(),
        "state_bytes": {name: state_bytes(opt.optim if name == "zero" else opt) for name, opt in opts.items()},
        "sent_per_step": sent,
        "sharded_vs_adam": models.largest_difference(flat["sharded"], flat["adam"]),
        "reduce_scatter_vs_adam": models.largest_difference(flat["reduce_scatter"], flat["adam"]),
        "zero_vs_torch": models.largest_difference(flat["zero"], flat["torch"]),
        "adam_vs_torch": models.largest_difference(flat["adam"], flat["torch"]),
    }


def gradient_noise(ctx, batch: int = 8, draws: int = 40, seed: int = 0) -> dict:
    """E‖ḡₙ − ∇J‖² for the gradient ḡₙ averaged over n ranks, for every n that divides the world size, each
    rank drawing `batch` examples from the whole training set; ∇J is the full-batch gradient. Expect tr(Σ)/(n·b)."""
    x, y, _, _ = data.digits()
    model = _digits_model(seed)
    F.cross_entropy(model(x), y).backward()
    full = flat_grad(model)
    sizes = [n for n in range(1, ctx.world_size + 1) if ctx.world_size % n == 0]
    errors = {n: 0.0 for n in sizes}
    batches = data.minibatches(x, y, batch, seed, ctx.rank)
    for _ in range(draws):
        xb, yb = next(batches)
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        per_rank = torch.stack(ctx.comm.all_gather(flat_grad(model)))
        for n in sizes:  # disjoint groups of n ranks: ranks 0..n-1, n..2n-1, ...
            groups = per_rank.view(ctx.world_size // n, n, -1).mean(1)
            errors[n] += (groups - full).pow(2).sum(1).mean().item() / draws
    return {"batch": batch, "variance": errors}
