"""Lab 13 · Memory and sharding: a ZeRO-2 step on real ranks, the activation-memory formula in-process.

`13.zero2_step` runs the student's step on 4 and 2 gloo ranks with every torch.distributed collective recorded:
the gradient must be reduce-scattered (no all-reduce: that would hold the whole averaged gradient on every rank),
Adam must update only this rank's slice with this rank's m and v, and the slices must be all-gathered; the result
is compared with plain data parallelism (all-reduce, average, Adam on everything), element by element, and the bytes
communicated with one all-reduce's worth. `13.block_activation_bytes` compares the student's formula with the bytes
autograd really saves for one block of distlab's GPT (saved-tensor hooks, parallel/memory.py) at several sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..gpt import GPTConfig
from ..optim.rules import adam_update
from ..parallel import memory
from ..parallel.zero import counting_collectives
from .grading import Passed, Wrong, call_student, check_tensor, exercise, first_difference, on_ranks

NUMEL, LR, BETAS, EPS, STEPS = 48, 0.01, (0.9, 0.999), 1e-8, 2  # 48 splits evenly over 2 and 4 ranks


def _grad(rank: int, step: int, device) -> torch.Tensor:
    """Rank `rank`'s local gradient at `step`: its own numbers (the ranks disagree, as with their own batches)."""
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 * step + rank)).to(device)


def _start(device) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(13)).to(device)


def plain_data_parallel(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: averaged gradients, Adam on the whole vector; returns the parameters and m after STEPS."""
    params, m, v = _start("cpu"), torch.zeros(NUMEL), torch.zeros(NUMEL)
    for step in range(1, STEPS + 1):
        grad = torch.stack([_grad(r, step, "cpu") for r in range(world_size)]).mean(0)
        adam_update(params, grad, m, v, step, LR, *BETAS, EPS)
    return params, m


def run_zero2(ctx, solution: Callable) -> dict:
    """On every rank: STEPS calls of the student's step, each rank's m and v its own 1/N, collectives recorded."""
    shard = NUMEL // ctx.world_size
    params = _start(ctx.device)
    m, v = torch.zeros(shard, device=ctx.device), torch.zeros(shard, device=ctx.device)
    with counting_collectives() as calls:
        for step in range(1, STEPS + 1):
            params = solution(ctx, params.clone(), _grad(ctx.rank, step, ctx.device), m, v, step, LR)
            if not torch.is_tensor(params):
                return {"returned": type(params).__name__}
    dist.barrier()
    return {"params": params.detach().cpu(), "m": m.cpu(), "calls": calls}


def _explain_calls(result: dict, rank: int, n: int) -> None:
    kinds = [c["kind"] for c in result["calls"]]
    if "all-reduce" in kinds:
        raise Wrong(f"rank {rank} called all_reduce: ZeRO-2 never holds the whole averaged gradient. Reduce-scatter "
                    "it (dist.reduce_scatter_single(my_slice, grad)): each rank receives the sum of its own 1/N only")
    if kinds.count("reduce-scatter") != STEPS:
        raise Wrong(f"rank {rank} called reduce-scatter {kinds.count('reduce-scatter')} times in {STEPS} steps: "
                    "once per step, over the whole flat gradient")
    if kinds.count("all-gather") != STEPS:
        raise Wrong(f"rank {rank} called all-gather {kinds.count('all-gather')} times in {STEPS} steps: after Adam "
                    "updated this rank's slice, dist.all_gather_single(params, my_slice) puts the slices together")


def _explain_state(result: dict, rank: int, n: int) -> None:
    """m after the steps: this rank's slice of plain Adam's m (N× means summed, another slice the wrong rows)."""
    _, m = plain_data_parallel(n)
    slices = m.chunk(n)
    got = result["m"]
    if first_difference(got, slices[rank]) is None:
        return
    if first_difference(got, n * slices[rank]) is None:
        raise Wrong(f"rank {rank}'s m is {n}× plain Adam's: the reduce-scatter sums, divide the slice by N to average "
                    "(Adam hides it in the update, m/√v, but not in its state)")
    other = next((r for r, s in enumerate(slices) if first_difference(got, s) is None), None)
    if other is not None:
        raise Wrong(f"rank {rank}'s m is rank {other}'s slice: rank r owns params[r·P/N:(r+1)·P/N], the slice the "
                    "reduce-scatter hands it")
    check_tensor(got, slices[rank], f"rank {rank}'s m after {STEPS} steps (its slice of plain Adam's m)")


@exercise("13.zero2_step", "A ZeRO-2 step from reduce-scatter and all-gather")
def zero2_step(fn) -> Passed:
    measured = {}
    for n in (4, 2):
        results = on_ranks(run_zero2, n, solution=fn).results
        for rank, result in enumerate(results):
            if "returned" in result:
                raise Wrong(f"rank {rank} returned {result['returned']}: return the whole updated parameter vector")
            _explain_calls(result, rank, n)
            _explain_state(result, rank, n)
            check_tensor(result["params"], plain_data_parallel(n)[0],
                         f"rank {rank}'s parameters after {STEPS} steps (plain data parallelism's)")
        sent = sum(c["sent"] for c in results[0]["calls"]) / STEPS
        all_reduce = 2 * (n - 1) / n * 4 * NUMEL
        if abs(sent - all_reduce) > 1e-9:
            raise Wrong(f"rank 0 sent {sent:.0f} bytes per step (ring count), one all-reduce is {all_reduce:.0f}: "
                        "reduce-scatter and all-gather the whole flat vector once each")
        measured[f"{n} ranks"] = (f"{sent:.0f} bytes sent per rank and step (one all-reduce: {all_reduce:.0f}); Adam "
                                  f"state {2 * 4 * NUMEL // n} bytes per rank instead of {2 * 4 * NUMEL}")
    return Passed(f"equal to plain data parallelism after {STEPS} Adam steps on 4 and 2 ranks; gradients "
                  "reduce-scattered, m and v 1/N per rank, one all-reduce's bytes per step", measured)


SIZES = ((2, 16, 32, 4), (3, 32, 64, 4), (1, 24, 48, 6), (4, 8, 16, 2))  # (batch, seq, d_model, n_head)


def _measured_block(batch: int, seq: int, d_model: int, n_head: int) -> int:
    cfg = GPTConfig(block_size=seq, d_model=d_model, n_head=n_head, n_layer=1)
    return memory.saved_activations(cfg, batch)["block 0"]


def _explain_formula(got: int, should: int, b: int, s: int, d: int, h: int) -> None:
    where = f"batch={b}, seq={s}, d_model={d}, n_head={h}"
    misses = {4 * b * h * s * s: "the softmax's output, b·h·s² numbers (attention saves its weights for backward)",
              s * s: "the causal mask: s² booleans, 1 byte each",
              4 * 4 * b * s: "the two LayerNorms' mean and 1/std, 2·b·s numbers each",
              4 * 4 * b * s * d: "one 4d tensor of the MLP (the input and the output of the GELU are both saved)",
              4 * b * s * d: "one b·s·d tensor (count: block input, 2 LayerNorm outputs, q, k, v, heads joined, "
                             "mid residual)"}
    for size, what in misses.items():
        if got == should - size:
            raise Wrong(f"{where}: yours is {got:,} bytes, {size:,} short of what autograd saves: you left out {what}")
    if should in (4 * got + s * s, 4 * (got - s * s) + s * s):  # fp32 numbers counted, not their bytes
        raise Wrong(f"{where}: yours is {got:,}: that counts elements, not bytes; fp32 numbers are 4 bytes each")
    raise Wrong(f"{where}: yours is {got:,} bytes, autograd saves {should:,} (measured with saved-tensor hooks)")


@exercise("13.block_activation_bytes", "The bytes one transformer block saves for backward")
def block_activation_bytes(fn) -> Passed:
    measured = {}
    for b, s, d, h in SIZES:
        got, should = call_student(fn, b, s, d, h), _measured_block(b, s, d, h)
        if not isinstance(got, int):
            raise Wrong(f"return an int (bytes), got {type(got).__name__}")
        if got != should:
            _explain_formula(got, should, b, s, d, h)
        measured[f"b={b}, s={s}, d={d}, h={h}"] = f"{should:,} bytes saved, measured"
    return Passed(f"your formula equals the bytes autograd saves for one block at {len(SIZES)} sizes, exactly",
                  measured)
