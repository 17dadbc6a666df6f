"""Data parallelism: the same model on every rank, each rank a shard of the batch, gradients averaged.

With equal shards, the mean of the ranks' mean gradients is the gradient of the whole batch, so N
ranks with batch b take exactly the step one process takes with batch N·b. TensorFlow's
MirroredStrategy and Horovod do this; so does PyTorch's DistributedDataParallel (Li et al. 2020,
arXiv:2006.15704), which also groups gradients into buckets and overlaps their all-reduce with backward.
Three ways to average, from scratch to built-in: one all-reduce per parameter, one flat bucket, DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from time import perf_counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from ..comm import nbytes
from ..data import digits
from ..models import mlp

SIZES = (64, 64, 64, 10)  # the digits MLP every pattern trains: 8x8 pixels in, 10 classes out
AVERAGING = ("per_parameter", "bucket", "ddp")


class Spans:
    """What this rank did and when: compute and communication spans (perf_counter seconds, one clock
    for every process on a machine), each with its step and the payload bytes of a communication.
    On a GPU a span ends after a synchronize, so it covers the kernels it launched, not just their launch."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.rows: list[dict] = []
        self.step = 0
        self._cuda = device is not None and device.type == "cuda"

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return perf_counter()

    def add(self, kind: str, name: str, start: float, end: float, nbytes: int = 0) -> None:
        self.rows.append({"step": self.step, "kind": kind, "name": name, "start": start, "end": end,
                          "bytes": nbytes})  # list.append is atomic: DDP's callback thread may add too

    @contextmanager
    def compute(self, name: str):
        start = self._now()
        yield
        self.add("compute", name, start, self._now())

    @contextmanager
    def comm(self, name: str, tensor: torch.Tensor):
        start = self._now()
        yield
        self.add("comm", name, start, self._now(), nbytes(tensor))


def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole digits training set: every rank holds it, the sampler picks each rank's share."""
    x, y, _, _ = digits()
    return x, y


def shard_batches(x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int, batch: int,
                  seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches, epoch after epoch. DistributedSampler gives rank r every world_size-th
    example of the epoch's shuffle, so at each step the ranks' batches together are the batch of
    world_size·batch examples that one process would take (same seed, same shuffle)."""
    sampler = DistributedSampler(range(len(x)), num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for start in range(0, len(order) - batch + 1, batch):
            pick = order[start:start + batch]
            yield x[pick], y[pick]
        epoch += 1


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Tensors laid end to end in one vector, on the CPU (a copy): how parameters and gradients are compared."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()


def average_per_parameter(params: list[nn.Parameter], all_reduce: Callable, size: int, spans: Spans) -> None:
    """Naive: one all-reduce per parameter tensor (a latency per tensor), then divide by the ranks."""
    for p in params:
        with spans.comm("all_reduce", p.grad):
            all_reduce(p.grad)
        p.grad.div_(size)


def average_bucket(params: list[nn.Parameter], all_reduce: Callable, size: int, spans: Spans) -> None:
    """All gradients copied into one flat bucket, one all-reduce for all of them, copied back."""
    grads = [p.grad for p in params]
    bucket = torch.cat([g.reshape(-1) for g in grads])
    with spans.comm("all_reduce", bucket):
        all_reduce(bucket)
    bucket.div_(size)
    for grad, chunk in zip(grads, bucket.split([g.numel() for g in grads])):
        grad.copy_(chunk.view_as(grad))


def timed_allreduce_hook(spans: Spans):
    """PyTorch's default DDP hook (average each bucket by all-reduce), with the bucket's span recorded:
    from the moment backward hands the bucket over to the moment its all-reduce is done."""

    def hook(group, bucket):  # no annotations: DDP inspects them
        start, size = perf_counter(), nbytes(bucket.buffer())

        def done(future):
            spans.add("comm", "all_reduce", start, perf_counter(), size)
            return future.value()

        return allreduce_hook(group, bucket).then(done)

    return hook


def train_data_parallel(ctx, averaging: str = "bucket", steps: int = 20, batch: int = 16, lr: float = 0.5,
                        seed: int = 0) -> dict:
    """Rank function: data-parallel SGD on digits, gradients averaged `averaging` way (one of AVERAGING).

    Returns this rank's losses, first-step gradients, final parameters and timeline spans."""
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = mlp(*SIZES).to(ctx.device)
    params = list(model.parameters())
    spans = Spans(ctx.device)
    if averaging == "ddp":
        model = DDP(model)
        model.register_comm_hook(None, timed_allreduce_hook(spans))
    average = {"per_parameter": average_per_parameter, "bucket": average_bucket}.get(averaging)
    data = shard_batches(*digits_train(), ctx.rank, ctx.world_size, batch, seed)
    optimizer = torch.optim.SGD(params, lr=lr)
    ctx.set_total(steps)
    losses, first_grads = [], None
    for step in range(steps):
        spans.step = step
        x, y = (t.to(ctx.device) for t in next(data))
        with spans.compute("forward"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        with spans.compute("backward"):
            loss.backward()  # with DDP, the buckets' all-reduces run inside, as gradients become ready
        if average is not None:
            average(params, ctx.comm.all_reduce, ctx.world_size, spans)
        if step == 0:
            first_grads = flat(p.grad for p in params)
        with spans.compute("optimizer"):
            optimizer.step()
        losses.append(loss.item())
        ctx.log(step=step, loss=losses[-1])
    return {"losses": losses, "grads": first_grads, "params": flat(params), "spans": spans.rows}


def train_single_process(steps: int = 20, batch: int = 64, lr: float = 0.5, seed: int = 0) -> dict:
    """The reference every pattern must reproduce: the whole model in one process, batch `batch`."""
    torch.manual_seed(seed)
    model = mlp(*SIZES)
    data = shard_batches(*digits_train(), 0, 1, batch, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = flat(p.grad for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": first_grads, "params": flat(model.parameters())}


def n_params(sizes: tuple[int, ...] = SIZES) -> int:
    """Parameters of dl.models.mlp(*sizes): a weight matrix and a bias per layer."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes, sizes[1:]))
