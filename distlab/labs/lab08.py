"""Lab 08 · Pipeline and tensor parallelism: the GPipe and 1F1B schedules as data, a column-parallel linear layer.

The schedules are graded in-process: for p = 1..4 stages and m from 1 to 8 micro-batches (m < p too), each
stage's list of ("F", i) / ("B", i) actions must equal distlab's (`parallel/pipeline.py`); before that
the check names the usual slips (a micro-batch missing, backwards reversed, a 1F1B warm-up off by one),
then runs the student's lists on distlab's pipeline simulator: no deadlock, and the bubble it measures
is (p-1)/(m+p-1). The column-parallel layer runs on 4 and 2 real ranks; every collective the student
calls is recorded, so the check can see which slice each rank computed and how the output was put together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import pipeline as pp
from ..parallel.tensor import ColumnParallelLinear
from .grading import Passed, Wrong, call_student, check_tensor, exercise, first_difference, on_ranks

GRID = ((4, 8), (2, 4), (3, 5), (4, 2), (4, 1), (1, 3), (2, 1), (3, 8))  # (p, m): the largest first; m < p too
SHOWN = (4, 8)  # the (p, m) whose numbers the passed check reports


def _name(kind: str, m: int, p: int, stage: int) -> str:
    return f"{kind}(m={m}, p={p}, stage={stage})"


def _student_schedules(fn: Callable, m: int, p: int, kind: str) -> list[list[tuple[str, int]]]:
    """The student's list for every stage, checked to be a list of ("F" | "B", int) pairs."""
    out = []
    for stage in range(p):
        actions = call_student(fn, m, p, stage)
        if not isinstance(actions, (list, tuple)):
            raise Wrong(f"{_name(kind, m, p, stage)} returned {type(actions).__name__}: return a list of actions, "
                        'each ("F", i) or ("B", i)')
        for position, action in enumerate(actions):
            if not (isinstance(action, tuple) and len(action) == 2 and action[0] in ("F", "B")
                    and isinstance(action[1], int)):
                raise Wrong(f"{_name(kind, m, p, stage)}[{position}] is {action!r}: each action is a tuple "
                            '("F", i) or ("B", i), i the micro-batch (an int)')
        out.append([tuple(a) for a in actions])
    return out


def _forwards_first(actions) -> int:
    """How many forwards a stage runs before its first backward."""
    return next((k for k, (kind, _) in enumerate(actions) if kind == "B"), len(actions))


def _explain_warmup(actions, m: int, p: int, stage: int) -> None:
    expected = pp.one_f_one_b_schedule(m, p, stage)
    got, should = _forwards_first(actions), _forwards_first(expected)
    if got > m:
        raise Wrong(f"stage {stage} of p = {p} runs {got} forwards before its first backward, but there are only m = "
                    f"{m} micro-batches: the warm-up is capped at m, min(p − stage − 1, m) = {min(p - stage - 1, m)}",
                    f"yours: {actions}", f"1F1B: {expected}")
    if got != should:
        warmup = min(p - stage - 1, m)
        off = " — off by one" if abs(got - should) == 1 else ""
        raise Wrong(f"stage {stage} of p = {p} (m = {m}) runs {got} forwards before its first backward, it should run "
                    f"{should}{off}: a warm-up of min(p − stage − 1, m) = {warmup}, then the first forward of the "
                    "steady one-forward-one-backward pairs", f"yours: {actions}", f"1F1B: {expected}")


def _explain_structure(actions, m: int, p: int, stage: int) -> None:
    """Every micro-batch 0..m-1 forward once and backward once on every stage, its forward first."""
    where = f"stage {stage} (p = {p}, m = {m})"
    for position, (kind, i) in enumerate(actions):
        if not 0 <= i < m:
            raise Wrong(f"{where}: action {position}, {(kind, i)!r}, names micro-batch {i}, but there are m = {m} "
                        f"(0..{m - 1})", f"yours: {actions}")
    for i in range(m):
        for kind, what in (("F", "forward"), ("B", "backward")):
            count = actions.count((kind, i))
            if count != 1:
                said = "is missing" if count == 0 else f"appears {count} times"
                raise Wrong(f"{where}: the {what} of micro-batch {i}, ({kind!r}, {i}), {said}: every micro-batch "
                            f"goes forward and back exactly once on every stage", f"yours: {actions}")
        if actions.index(("B", i)) < actions.index(("F", i)):
            raise Wrong(f"{where} runs ('B', {i}) before ('F', {i}): a micro-batch's backward needs the activations "
                        "its forward saved", f"yours: {actions}")


def _explain_order(actions, m: int, p: int, stage: int, kind: str) -> None:
    forwards = [i for k, i in actions if k == "F"]
    backwards = [i for k, i in actions if k == "B"]
    where = f"stage {stage} (p = {p}, m = {m})"
    if forwards != list(range(m)):
        raise Wrong(f"{where} runs its forwards in the order {forwards}: micro-batches enter the pipeline in order, "
                    f"0..{m - 1}, so every stage receives them in that order", f"yours: {actions}")
    if m > 1 and backwards == list(range(m - 1, -1, -1)):
        raise Wrong(f"{where}: your backwards run in reverse order, {backwards}. distlab's schedules (like torch's "
                    "ScheduleGPipe and Schedule1F1B) run them first in, first out: 0, 1, …, so the micro-batch that "
                    "has waited longest frees its activations first, and 1F1B is a reordering of GPipe",
                    f"yours: {actions}")
    if kind == "gpipe" and _forwards_first(actions) != m:
        raise Wrong(f"{where} starts a backward after {_forwards_first(actions)} forwards: GPipe runs every forward "
                    "(all m micro-batches) before any backward", f"yours: {actions}")


def _simulated_bubble(schedules, kind: str, m: int, p: int) -> float:
    try:
        events = pp.simulate(schedules, p, m)
    except RuntimeError:
        raise Wrong(f"your schedules deadlock on p = {p} stages, m = {m}: on the simulated pipeline every stage "
                    "ends up waiting for an action that another stage has put after its own wait (a forward "
                    "waits for the previous stage's forward, a backward for the next stage's backward)",
                    *[f"stage {s}: {a}" for s, a in enumerate(schedules)]) from None
    return pp.bubble_fraction(events, p)


def _in_flight(actions) -> int:
    """The most micro-batches whose activations a stage holds at once (forwarded, not yet backwarded)."""
    live = peak = 0
    for kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def _grade_schedule(fn: Callable, kind: str, library: Callable[[int, int, int], list]) -> dict:
    measured = {}
    for p, m in GRID:
        schedules = _student_schedules(fn, m, p, kind)
        for stage, actions in enumerate(schedules):
            if kind == "1f1b":
                _explain_warmup(actions, m, p, stage)
            _explain_structure(actions, m, p, stage)
            _explain_order(actions, m, p, stage, kind)
        bubble = _simulated_bubble(schedules, kind, m, p)
        for stage, actions in enumerate(schedules):
            expected = library(m, p, stage)
            if actions != expected:
                k = next(k for k, (a, b) in enumerate(zip(actions, expected)) if a != b)
                raise Wrong(f"stage {stage} (p = {p}, m = {m}) differs from distlab's schedule at action {k}: yours "
                            f"{actions[k]}, expected {expected[k]}",
                            f"yours: {actions}", f"expected: {expected}")
        formula = pp.predicted_bubble(p, m)
        if abs(bubble - formula) > 1e-9:
            raise Wrong(f"the simulated bubble of your schedule is {bubble:.4f} for p = {p}, m = {m}; (p−1)/(m+p−1) "
                        f"= {formula:.4f}")
        if (p, m) == SHOWN:
            measured[f"simulated bubble, p = {p}, m = {m}"] = f"{bubble:.4f} (formula (p−1)/(m+p−1): {formula:.4f})"
            measured[f"micro-batches held at peak per stage, p = {p}, m = {m}"] = [_in_flight(a) for a in schedules]
    return measured


def _gpipe(m: int, p: int, stage: int) -> list:
    return pp.gpipe_schedule(m)


@exercise("08.gpipe_schedule", "The GPipe schedule as a list of actions")
def gpipe_schedule(fn) -> Passed:
    measured = _grade_schedule(fn, "gpipe", _gpipe)
    return Passed(f"equal to distlab's GPipe on {len(GRID)} pipelines (p = 1..4, m = 1..8); on the simulator "
                  "the bubble is exactly (p−1)/(m+p−1)", measured)


@exercise("08.one_f_one_b_schedule", "The 1F1B schedule as a list of actions")
def one_f_one_b_schedule(fn) -> Passed:
    measured = _grade_schedule(fn, "1f1b", pp.one_f_one_b_schedule)
    return Passed(f"equal to distlab's 1F1B on {len(GRID)} pipelines (p = 1..4, m = 1..8, m < p too); same bubble "
                  "as GPipe on the simulator, at most p − stage micro-batches held", measured)


# -- tensor parallelism: a column-parallel linear layer on real ranks -----------------------------------

BATCH, IN, OUT = 3, 8, 12  # IN and OUT divisible by 2 and 4, so either split runs (and only one is right)
WATCHED = {"all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"), "all_reduce": (0, "tensor"),
           "reduce_scatter_tensor": (1, "input"), "broadcast": (0, "tensor")}  # collective -> where its input is
if hasattr(dist, "all_gather_single"):  # all_gather_into_tensor's newer name
    WATCHED["all_gather_single"] = (1, "input_tensor")


def column_layer(device="cpu") -> nn.Linear:
    """The unsplit layer (the same on every rank and here), drawn from its own generator."""
    generator, layer = torch.Generator().manual_seed(8), nn.utils.skip_init(nn.Linear, IN, OUT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(OUT, IN, generator=generator) / IN**0.5)
        layer.bias.copy_(torch.randn(OUT, generator=generator))
    return layer.to(device)


def column_input(device="cpu") -> torch.Tensor:
    return torch.randn(BATCH, IN, generator=torch.Generator().manual_seed(80)).to(device)


@contextmanager
def recording_collectives() -> Iterator[list[dict]]:
    """Inside: every torch.distributed collective in WATCHED is logged with a copy of its input, then run."""
    calls: list[dict] = []
    originals = {name: getattr(dist, name) for name in WATCHED}

    def recorded(name: str, original: Callable) -> Callable:
        position, keyword = WATCHED[name]

        def call(*args, **kwargs):
            given = args[position] if len(args) > position else kwargs.get(keyword)
            if torch.is_tensor(given):
                calls.append({"op": name, "input": given.detach().cpu().clone()})
            return original(*args, **kwargs)
        return call

    for name, original in originals.items():
        setattr(dist, name, recorded(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def run_column(ctx, solution) -> dict:
    """On every rank: the student's layer on the same input, every collective it called recorded."""
    layer = column_layer(ctx.device)
    with torch.no_grad(), recording_collectives() as calls:
        y = solution(ctx, column_input(ctx.device), layer.weight.detach().clone(), layer.bias.detach().clone())
    return {"y": y.detach().cpu() if torch.is_tensor(y) else y, "calls": calls}


def _same(a, b) -> bool:
    return torch.is_tensor(a) and a.shape == b.shape and first_difference(a, b) is None


def _explain_piece(piece: torch.Tensor, rank: int, n: int, x, layer: nn.Linear) -> None:
    """The slice rank `rank` put into its all-gather, against the library's ColumnParallelLinear."""
    slices = [ColumnParallelLinear(layer, r, n)(x).detach() for r in range(n)]
    width = OUT // n
    if _same(piece, slices[rank]):
        return
    rows = layer.weight.chunk(n, dim=0)[rank].detach()
    if _same(piece, slices[rank] - layer.bias.chunk(n)[rank].detach()):
        raise Wrong(f"rank {rank}'s slice has no bias: add its slice of the bias too, bias.chunk(N)[rank] (the "
                    f"{width} entries of its own output features)")
    if rank and _same(piece, x @ rows.T + layer.bias[:width].detach()):
        raise Wrong(f"rank {rank} added the first {width} entries of the bias, rank 0's: each rank adds the bias of "
                    "its own output features, bias.chunk(N)[rank]")
    if piece.shape == (BATCH, OUT):
        raise Wrong(f"rank {rank} gathered a tensor of shape {tuple(piece.shape)}, not its ({BATCH}, {width}) slice "
                    "of the output: did you split the input dimension (weight.chunk(N, dim=1))? That is the "
                    "row-parallel layer. Column-parallel splits the output features: weight.chunk(N, dim=0)")
    other = next((r for r, s in enumerate(slices) if _same(piece, s)), None)
    if other is not None:
        raise Wrong(f"rank {rank} computed rank {other}'s slice: take the rows weight.chunk(N, dim=0)[rank]")
    check_tensor(piece, slices[rank], f"rank {rank}'s slice of the output (the tensor it all-gathered)")


def _explain_slice(result: dict, rank: int, n: int) -> None:
    """What rank `rank` communicated: an all-gather of its own slice of the output."""
    x, layer = column_input(), column_layer()
    ops = [c["op"] for c in result["calls"]]
    if "all_reduce" in ops and not any(op.startswith("all_gather") for op in ops):
        raise Wrong(f"rank {rank} called all_reduce and no all-gather: summing partial products is the row-parallel "
                    "layer (input dimension split, weight.chunk(N, dim=1)). Column-parallel splits the output "
                    "features, weight.chunk(N, dim=0), and all-gathers the slices")
    gathers = [c["input"] for c in result["calls"] if c["op"].startswith("all_gather")]
    if not gathers:
        raise Wrong(f"rank {rank} called no all-gather: each rank computes only its slice of the output features, "
                    "then the slices are all-gathered (ctx.comm.all_gather) into the whole output")
    _explain_piece(gathers[0], rank, n, x, layer)


def _explain_output(result: dict, rank: int, n: int) -> None:
    """How rank `rank` put the gathered slices together."""
    expected, y = column_layer()(column_input()).detach(), result["y"]
    if torch.is_tensor(y) and y.shape == (n * BATCH, OUT // n):
        raise Wrong(f"rank {rank}'s output has shape {tuple(y.shape)}: you concatenated the slices along dim 0, the "
                    f"batch. They are output features: torch.cat(pieces, dim=-1) gives ({BATCH}, {OUT})")
    if torch.is_tensor(y) and y.shape == expected.shape and not _same(y, expected):
        blocks, should = y.chunk(n, dim=-1), expected.chunk(n, dim=-1)
        holders = [next((r for r in range(n) if _same(b, should[r])), None) for b in blocks]
        if None not in holders and sorted(holders) == list(range(n)):
            raise Wrong(f"rank {rank} put the slices together in the wrong order: its output's blocks of {OUT // n} "
                        f"features hold the slices of ranks {holders}, in that order; they belong in rank order "
                        f"{list(range(n))}, the order ctx.comm.all_gather returns them in")
    check_tensor(y, expected, f"rank {rank}'s output (nn.Linear on the whole input)")


@exercise("08.column_parallel_linear", "A column-parallel linear layer on 2 and 4 ranks")
def column_parallel_linear(fn) -> Passed:
    measured = {}
    for n in (4, 2):
        results = on_ranks(run_column, n, solution=fn).results
        for explain in (_explain_slice, _explain_output):
            for rank, result in enumerate(results):
                explain(result, rank, n)
        gathered = [c["input"] for c in results[0]["calls"] if c["op"].startswith("all_gather")][0]
        expected = column_layer()(column_input()).detach()
        gap = max((r["y"] - expected).abs().max().item() for r in results)
        measured[f"{n} ranks"] = (f"each rank computed and all-gathered {gathered.numel() * gathered.element_size()} "
                                  f"bytes (1/{n} of the {expected.numel() * 4}-byte output); largest |yours − "
                                  f"nn.Linear| {gap:.1e}")
    return Passed(f"equal to the unsplit nn.Linear on 4 and 2 ranks; each rank all-gathered exactly its own {OUT}/N "
                  "output features (its rows of the weight, its slice of the bias), put together in rank order",
                  measured)
