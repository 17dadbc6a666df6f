"""Lab 01 · Parallelism patterns: gradient averaging equal to one big batch, and a model-parallel step over
send/recv.

Both run on real ranks and are compared with one process (`train_single_process`: the whole MLP, the whole
batch). Averaging runs on 4 and 2 ranks, each holding its shard of the batch; the check names the parameter
and element that differ, and says when the gradient is N times (summed) or 1/N times (divided twice) the big
batch's. The model-parallel step runs the digits MLP split in two (`split_layers`) with ctx.comm limited to
send/recv/isend/irecv; every message is checked as it is made (shape, None), so a missing requires_grad or a
wrong buffer is named on the spot, and the loss and both stages' gradients must equal the unsplit model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models import mlp
from ..parallel.data_parallel import SIZES, digits_train, n_params, shard_batches, train_single_process
from ..parallel.model_parallel import split_layers
from .grading import Passed, Wrong, exercise, first_difference, on_ranks, point_to_point_only

SHARD = 16  # examples per rank in the averaging check: N ranks x 16 against one process with 16·N
WORLDS = (4, 2)  # 4 first: notebook 01's last launch leaves 4 ranks warm
BATCH = 24  # the model-parallel batch: not the cut's width (64), so a swapped shape shows
WIDTH = SIZES[1]  # features crossing the cut between stage 0 and stage 1


def parameters() -> list[tuple[str, torch.Size]]:
    """(name, shape) of the digits MLP's parameters, in order: how a flat gradient is named (built on the meta
    device: no memory, and the caller's random state untouched)."""
    with torch.device("meta"):
        return [(name, p.shape) for name, p in mlp(*SIZES).named_parameters()]


def stage_0_parameters() -> int:
    """How many of the MLP's parameter tensors stage 0 holds when split in two (they come first)."""
    with torch.device("meta"):
        return len(list(split_layers(mlp(*SIZES), 2)[0].parameters()))


def one_process(batch: int) -> dict:
    """train_single_process's first step on `batch` examples, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        return train_single_process(steps=1, batch=batch)


def by_parameter(flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat gradient of the digits MLP, cut back into its parameters' shapes."""
    shapes = [shape for _, shape in parameters()]
    return [part.view(shape) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


def _first_wrong(what: str, got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> str | None:
    difference = first_difference(got, expected, atol=atol, rtol=1e-4)
    if difference is None:
        return None
    index, value, should = difference
    return f"{what} is wrong at element {list(index)}: {value:.6g}, should be {should:.6g}"


# -- gradient averaging -------------------------------------------------------------------------------

@contextmanager
def counting_all_reduce() -> Iterator[dict]:
    """Inside: every dist.all_reduce (ctx.comm's included) is counted, calls and bytes."""
    counted, original = {"calls": 0, "bytes": 0}, dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted["calls"] += 1
        counted["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counted
    finally:
        dist.all_reduce = original


def shards(n: int, shard: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each of n ranks' share of the first batch of n·shard digits (DistributedSampler's split). Drawn here,
    not on the ranks, so a rank does not load scikit-learn for 16 examples."""
    return [next(shard_batches(*digits_train(), rank, n, shard)) for rank in range(n)]


def run_average(ctx, solution, batches: list) -> dict:
    """On every rank: this rank's gradient on its shard of the first batch, then the student's averaging."""
    torch.manual_seed(0)  # the same initial weights on every rank, and in the single process
    model = mlp(*SIZES).to(ctx.device)
    x, y = (t.to(ctx.device) for t in batches[ctx.rank])
    F.cross_entropy(model(x), y).backward()
    local = [p.grad.detach().cpu().clone() for p in model.parameters()]
    with counting_all_reduce() as counted:
        solution(ctx, model)
    averaged = [None if p.grad is None else p.grad.detach().cpu().clone() for p in model.parameters()]
    return {"local": local, "averaged": averaged, **counted}


def _scale(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The c for which got = c · expected, if it is such a multiple (else nan)."""
    c = float((got * expected).sum() / (expected * expected).sum())
    return c if torch.allclose(got, c * expected, atol=1e-6, rtol=1e-4) else float("nan")


def _explain_average(outcome: dict, rank: int, n: int, big_batch: list[torch.Tensor]) -> None:
    names = [name for name, _ in parameters()]
    for name, local, got, expected in zip(names, outcome["local"], outcome["averaged"], big_batch):
        if got is None:
            raise Wrong(f"rank {rank}: parameter {name} has no gradient after your function (.grad is None): "
                        "average p.grad in place, do not clear it")
        wrong = _first_wrong(f"rank {rank}'s averaged gradient of {name}", got, expected)
        if wrong is None:
            continue
        if torch.equal(got, local):
            raise Wrong(f"rank {rank}: parameter {name} still holds this rank's own gradient: it was not averaged. "
                        "Average every parameter: for p in model.parameters()", wrong)
        c = _scale(got, expected)
        if abs(c - n) < 1e-3:
            raise Wrong(f"rank {rank}: the gradient of {name} is {n}× the big batch's: all_reduce adds, so you "
                        f"have the sum of the {n} ranks' gradients. Divide by world_size", wrong)
        if abs(c - 1 / n) < 1e-4:
            raise Wrong(f"rank {rank}: the gradient of {name} is the big batch's divided by {n}: you divided by "
                        "world_size twice (or divided before the all-reduce and again after it)", wrong)
        if c == c:  # a multiple, but of neither kind
            raise Wrong(f"rank {rank}: the gradient of {name} is {c:.3g}× the big batch's: divide the sum by "
                        f"world_size (here {n}), not by a fixed number", wrong)
        raise Wrong(f"rank {rank}: the gradient of {name} is not the average of the ranks' gradients", wrong)


@exercise("01.average_gradients", "Average the gradients: N ranks × batch b = one process with batch N·b")
def average_gradients(fn) -> Passed:
    measured = {}
    for n in WORLDS:
        outcomes = on_ranks(run_average, n, solution=fn, batches=shards(n, SHARD)).results
        reference = one_process(n * SHARD)
        big_batch = by_parameter(reference["grads"])
        for rank, outcome in enumerate(outcomes):
            _explain_average(outcome, rank, n, big_batch)
        if n == WORLDS[0]:
            gap = max((got - want).abs().max().item() for got, want in zip(outcomes[0]["averaged"], big_batch))
            measured[f"largest difference to one process with batch {n * SHARD}, on {n} ranks × {SHARD}"] = \
                f"{gap:.1e}"
            measured["all-reduced per rank"] = (f"{outcomes[0]['bytes']:,} bytes in {outcomes[0]['calls']} call(s) "
                                                f"(every gradient once: 4 × {n_params():,} = {4 * n_params():,})")
    return Passed(f"on {' and '.join(map(str, WORLDS))} ranks every parameter's gradient equals one process's on "
                  "the whole batch (float32 rounding)", measured)


# -- a model-parallel step ----------------------------------------------------------------------------

class CheckedMessages:
    """The student's ctx.comm for the model-parallel step: every message must be a (batch, 64) tensor —
    the activations at the cut going forward, their gradient coming back — checked before it is made."""

    def __init__(self, comm, rank: int, batch: int):
        self._comm, self._rank, self._shape = comm, rank, (batch, WIDTH)

    def __getattr__(self, name: str):
        return getattr(self._comm, name)  # the rules' own refusal of anything but send/recv

    def send(self, tensor, dst: int) -> None:
        self._check("send", tensor, dst)
        self._comm.send(tensor, dst)

    def recv(self, tensor, src: int):
        self._check("recv", tensor, src)
        return self._comm.recv(tensor, src)

    def isend(self, tensor, dst: int):
        self._check("send", tensor, dst)
        return self._comm.isend(tensor, dst)

    def irecv(self, tensor, src: int):
        self._check("recv", tensor, src)
        return self._comm.irecv(tensor, src)

    def _check(self, kind: str, tensor, peer: int) -> None:
        if tensor is None:
            raise ValueError(f"rank {self._rank} tried to {kind} None. On stage 1, inputs.grad is None when the "
                             "received activations do not require a gradient: call inputs.requires_grad_() "
                             "before the forward, and read inputs.grad after loss.backward()")
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self._shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"rank {self._rank} tried to {kind} a {shape} {'to' if kind == 'send' else 'from'} "
                             f"rank {peer}; what crosses the cut is stage 0's output activations, shape (batch, "
                             f"64) = {self._shape}, and their gradient (same shape) coming back: e.g. "
                             "torch.empty(len(x), stage[0].in_features, device=x.device) on stage 1")


def run_stage(ctx, solution, x: torch.Tensor, y: torch.Tensor) -> dict:
    """On each rank: its half of the seeded MLP, the batch (x, y), and the student's step under p2p rules."""
    torch.manual_seed(0)  # every rank builds the whole model from the seed and keeps its stage
    stage = split_layers(mlp(*SIZES).to(ctx.device), 2)[ctx.rank]
    x, y = x.to(ctx.device), y.to(ctx.device)
    with point_to_point_only(ctx, "The stages talk by send and recv only.") as (student_ctx, transfers):
        student_ctx.comm = CheckedMessages(student_ctx.comm, ctx.rank, len(x))
        loss = solution(student_ctx, stage, x, y)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        loss = loss.item()
    grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in stage.parameters()]
    return {"loss": loss, "grads": grads, "transfers": list(transfers)}


def _explain_loss(last: dict, reference: float) -> None:
    if not isinstance(last["loss"], float):
        raise Wrong(f"stage 1 (the last stage) returned {type(last['loss']).__name__}: it should return the loss "
                    "(F.cross_entropy of its output and y)")
    if abs(last["loss"] - reference) > 1e-5:
        raise Wrong(f"stage 1's loss is {last['loss']:.6g}, the unsplit model's is {reference:.6g}: stage 1 must run "
                    "its layers on the activations received from stage 0 and compute F.cross_entropy(out, y)")


def _explain_stage(outcome: dict, rank: int, expected: list[torch.Tensor], names: list[str]) -> None:
    received = any(t["kind"] == "recv" for t in outcome["transfers"])
    for name, got, want in zip(names, outcome["grads"], expected):
        if got is None and rank == 1:
            raise Wrong(f"stage 1's parameter {name} has no gradient: call loss.backward() on stage 1")
        if got is None and not received:
            raise Wrong(f"stage 0's parameter {name} has no gradient: it never received one. Stage 1 must send "
                        "inputs.grad back to rank 0; stage 0 receives it and calls out.backward(grad)")
        if got is None:
            raise Wrong(f"stage 0's parameter {name} has no gradient: it received the gradient of its output but "
                        "did not backpropagate it: out.backward(grad)")
        if rank == 0 and not got.any():
            raise Wrong(f"stage 0's gradient of {name} is all zeros: what stage 1 sent back carried no gradient "
                        "(send inputs.grad after loss.backward())")
        wrong = _first_wrong(f"stage {rank}'s gradient of {name}", got, want, atol=1e-5)
        if wrong is not None and rank == 0:
            raise Wrong("stage 1's gradients are right, stage 0's are not: check what stage 1 sent back (the "
                        "gradient of the loss with respect to the activations it received, inputs.grad) and that "
                        "stage 0 backpropagates it through its own output", wrong)
        if wrong is not None:
            raise Wrong(f"stage 1's gradient of {name} differs from the unsplit model's", wrong)


def _explain_messages(outcomes: list[dict]) -> None:
    for rank, outcome in enumerate(outcomes):
        sends = [t for t in outcome["transfers"] if t["kind"] == "send"]
        if len(sends) != 1:
            what = "its output activations" if rank == 0 else "the gradient of its input"
            raise Wrong(f"stage {rank} sent {len(sends)} messages; one step needs exactly one each way (stage "
                        f"{rank} sends {what}; an isend counts once you .wait() on it)")


@exercise("01.model_parallel_step", "One model-parallel training step over send and recv")
def model_parallel_step(fn) -> Passed:
    x, y = shards(1, BATCH)[0]  # the first batch of the single process
    try:
        outcomes = on_ranks(run_stage, 2, solution=fn, x=x, y=y).results
    except Wrong as wrong:
        if "did not finish" in wrong.message:
            wrong.details.append("Every send needs a matching recv on the other rank: stage 0 sends the activations "
                                 "and receives their gradient; stage 1 receives the activations and sends the "
                                 "gradient.")
        raise
    reference = one_process(BATCH)
    names, expected = [name for name, _ in parameters()], by_parameter(reference["grads"])
    cut = stage_0_parameters()
    _explain_loss(outcomes[1], reference["losses"][0])
    _explain_stage(outcomes[1], 1, expected[cut:], names[cut:])
    _explain_stage(outcomes[0], 0, expected[:cut], names[:cut])
    _explain_messages(outcomes)
    sent = [sum(t["bytes"] for t in o["transfers"] if t["kind"] == "send") for o in outcomes]
    gap = max((got - want).abs().max().item()
              for got, want in zip(outcomes[0]["grads"] + outcomes[1]["grads"], expected))
    return Passed("the split model's loss and both stages' gradients equal the unsplit model's", {
        "bytes sent per step": f"stage 0 {sent[0]:,}, stage 1 {sent[1]:,} (batch {BATCH} × {WIDTH} float32: "
                               f"{BATCH * WIDTH * 4:,} each way)",
        "largest difference to the unsplit model": f"loss {abs(outcomes[1]['loss'] - reference['losses'][0]):.1e}, "
                                                   f"gradients {gap:.1e}"})
