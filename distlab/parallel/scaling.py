"""Strong and weak scaling of data-parallel training, measured: each step split into compute and all-reduce.

Strong scaling keeps the total batch fixed and splits it over N ranks (each computes 1/N of it); weak
scaling keeps each rank's batch fixed (N times the work in the same time, ideally). Every rank runs one
torch thread, so N ranks use N cores and the single-process baseline uses one. Amdahl's law,
speedup(N) = 1 / (s + (1 - s) / N) (Amdahl 1967), is fitted to the measured speedups; the communication
share of a step is what keeps s above zero here.
"""

from __future__ import annotations

from statistics import median
from time import perf_counter, thread_time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models import mlp
from ..ranks import one_thread

WIDTHS = (512, 512, 512, 10)  # wide enough that one step is tens of milliseconds of arithmetic on one thread


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # a span covers the kernels it launched, not just their launch
    return perf_counter()


def _time_steps(batch: int, steps: int, warmup: int, device: torch.device, all_reduce=None,
                world_size: int = 1, seed: int = 0) -> dict:
    """SGD steps on synthetic regression data; per step, seconds of compute (forward, backward, optimizer)
    and of communication (one flat all-reduce of the gradients, when `all_reduce` is given); `cpu` is the
    compute's CPU seconds on this thread, the work itself, which a busy machine's scheduling does not stretch."""
    torch.manual_seed(seed)
    model = mlp(*WIDTHS, device=device)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(batch, WIDTHS[0], device=device)
    y = torch.randn(batch, WIDTHS[-1], device=device)
    compute, comm, cpu = [], [], []
    for _ in range(warmup + steps):
        start, cpu_start = _clock(device), thread_time()
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        middle, cpu_middle = _clock(device), thread_time()
        if all_reduce is not None:
            bucket = torch.cat([p.grad.reshape(-1) for p in params])
            all_reduce(bucket)
            bucket.div_(world_size)
            for p, chunk in zip(params, bucket.split([p.numel() for p in params])):
                p.grad.copy_(chunk.view_as(p.grad))
        end, cpu_end = _clock(device), thread_time()
        optimizer.step()
        done = _clock(device)
        compute.append(middle - start + done - end)
        comm.append(end - middle)
        cpu.append(cpu_middle - cpu_start + thread_time() - cpu_end)
    return {"batch": batch, "compute": compute[warmup:], "comm": comm[warmup:], "cpu": cpu[warmup:]}


def scaling_steps(ctx, total_batch: int | None = None, per_rank_batch: int | None = None, steps: int = 15,
                  warmup: int = 3) -> dict:
    """Rank function: one thread, `steps` timed data-parallel steps. Give `total_batch` for strong scaling
    (this rank computes total_batch / N examples) or `per_rank_batch` for weak scaling. Returns per-step
    compute and all-reduce seconds, measured after a barrier so the ranks start together."""
    if (total_batch is None) == (per_rank_batch is None):
        raise ValueError("give exactly one of total_batch (strong scaling) or per_rank_batch (weak scaling)")
    batch = per_rank_batch or max(1, total_batch // ctx.world_size)
    with one_thread():
        dist.barrier()
        timed = _time_steps(batch, steps, warmup, ctx.device, dist.all_reduce, ctx.world_size, seed=0)
    return {**timed, "world_size": ctx.world_size}


def single_process_steps(batch: int, steps: int = 15, warmup: int = 3) -> dict:
    """The baseline: one process, one thread, the whole batch, no communication (run in the notebook)."""
    with one_thread():
        return {**_time_steps(batch, steps, warmup, torch.device("cpu")), "world_size": 1}


def summarize(results: list[dict]) -> dict:
    """One launch's step: the slowest rank's median compute and comm seconds (the step waits for it)."""
    compute = max(median(r["compute"]) for r in results)
    comm = max(median(r["comm"]) for r in results)
    return {"world_size": results[0]["world_size"], "batch": results[0]["batch"], "compute": compute,
            "comm": comm, "step": compute + comm, "cpu": max(median(r["cpu"]) for r in results)}


def speedups(rows: list[dict], weak: bool = False) -> list[dict]:
    """Each row (from summarize, the N = 1 baseline among them) with its speedup and efficiency = speedup / N.
    Strong: speedup T(1)/T(N). Weak (N times the work): the scaled speedup N·T(1)/T(N), so efficiency T(1)/T(N)."""
    base = next(r["step"] for r in rows if r["world_size"] == 1)
    return [{**r, "speedup": base / r["step"] * (r["world_size"] if weak else 1),
             "efficiency": base / r["step"] / (1 if weak else r["world_size"])} for r in rows]


def amdahl(serial: float, world_size: int) -> float:
    """Amdahl's speedup on N workers when a fraction `serial` of the one-worker time does not parallelize."""
    return 1 / (serial + (1 - serial) / world_size)


def fit_serial_fraction(world_sizes: list[int], measured: list[float]) -> float:
    """Least-squares s of 1/speedup = s + (1 - s)/N (linear in s) over the runs with N > 1."""
    pairs = [(1 - 1 / n, 1 / sp - 1 / n) for n, sp in zip(world_sizes, measured) if n > 1]
    if not pairs:
        raise ValueError("need at least one measured speedup with world_size > 1")
    return sum(a * b for a, b in pairs) / sum(a * a for a, _ in pairs)
