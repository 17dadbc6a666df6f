"""How a lab is graded: the student's function runs on real ranks under the exercise's rules, and the
check either passes with what it measured or stops at the first mistake with a message that says which
rank, which element, which step, and what to try.

An exercise is a function `grade(fn) -> Passed` registered with `@exercise(id, title)`; it raises
`Wrong` at the first mistake. The helpers here do what every exercise needs: `on_ranks` (launch, and
turn a crash, a broken rule or a deadlock into a `Wrong` a student can act on), `point_to_point_only`
(the rules of a collective written by hand) and `first_difference` (where two tensors disagree).
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..data import generator
from ..launch import LaunchTimeout, RankFailure, launch, where_waiting

LAB_TIMEOUT = float(os.environ.get("DISTLAB_LAB_TIMEOUT", "10"))  # seconds a case may take: a deadlock's bound
NOTEBOOK_OF = {  # exercise id prefix -> the lab module that grades it
    "00": "lab00", "01": "lab01", "02": "lab02", "03": "lab03", "04": "lab04", "05": "lab05", "05b": "lab05b",
    "06": "lab06", "07": "lab07", "07b": "lab07b", "08": "lab08", "09": "lab09", "10": "lab10", "11": "lab11",
    "12": "lab12", "13": "lab13", "14": "lab14",
}


# -- outcomes -----------------------------------------------------------------------------------------

class Wrong(Exception):
    """A mistake, said so that a student can act on it: what went wrong, then the details."""

    def __init__(self, message: str, *details: str, figure=None):
        super().__init__(message)
        self.message, self.details, self.figure = message, list(details), figure


class NotAttempted(Exception):
    """The stub still raises NotImplementedError."""


@dataclass
class Passed:
    """What a correct solution achieved: one line, and the numbers measured beside the built-in's."""

    summary: str
    measured: dict = field(default_factory=dict)
    figure: object = None


@dataclass
class Verdict:
    """The result of `labs.check`: passed or not, one line, the details, what was measured."""

    exercise: str
    passed: bool
    status: str  # "passed", "wrong" or "not attempted"
    summary: str
    details: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    seconds: float = 0.0
    figure: object = None

    def __str__(self) -> str:
        mark = {"passed": "✓", "wrong": "✗", "not attempted": "·"}[self.status]
        lines = [f"{mark} {self.exercise}: {self.summary}"]
        lines += [f"    {line}" for detail in self.details for line in detail.splitlines()]
        lines += [f"    {name}: {value}" for name, value in self.measured.items()]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        colour = {"passed": "#1a7f37", "wrong": "#cf222e", "not attempted": "#6e7781"}[self.status]
        mark = {"passed": "✓", "wrong": "✗", "not attempted": "·"}[self.status]
        rows = [html.escape(d) for d in self.details] + [
            f"{html.escape(str(k))}: <b>{html.escape(str(v))}</b>" for k, v in self.measured.items()]
        body = "".join(f"<li style='white-space:pre-wrap'>{row}</li>" for row in rows)
        return (f"<div style='border-left:4px solid {colour};padding:4px 10px'><b style='color:{colour}'>{mark} "
                f"{html.escape(self.exercise)}</b> — {html.escape(self.summary)}<ul>{body}</ul></div>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display({"text/html": self._repr_html_(), "text/plain": str(self)}, raw=True)
        if self.figure is not None:
            display(self.figure)

    def require(self) -> Verdict:
        """Raise AssertionError with the diagnosis unless passed (for autograded cells); else return self."""
        if not self.passed:
            raise AssertionError(str(self))
        return self


@dataclass(frozen=True)
class Exercise:
    id: str  # "02.ring_all_reduce": the notebook, then the name
    title: str
    grade: Callable[[Callable], Passed]


EXERCISES: dict[str, Exercise] = {}


def exercise(id: str, title: str):
    """Register `grade(fn) -> Passed` as the check of exercise `id`."""
    def register(grade: Callable[[Callable], Passed]) -> Callable[[Callable], Passed]:
        EXERCISES[id] = Exercise(id, title, grade)
        return grade
    return register


def all_exercises() -> dict[str, Exercise]:
    """Every exercise of the course, by id (imports each notebook's lab module)."""
    for module in NOTEBOOK_OF.values():
        if importlib.util.find_spec(f"{__package__}.{module}") is not None:
            importlib.import_module(f"{__package__}.{module}")
    return dict(sorted(EXERCISES.items()))


def find(id: str) -> Exercise:
    notebook = id.partition(".")[0]
    if notebook in NOTEBOOK_OF:
        importlib.import_module(f"{__package__}.{NOTEBOOK_OF[notebook]}")
    if id not in EXERCISES:
        known = sorted(EXERCISES) or "none yet"
        raise ValueError(f"no exercise {id!r}; exercises of notebook {notebook}: {known}")
    return EXERCISES[id]


def grade(id: str, fn: Callable) -> Verdict:
    """Run exercise `id`'s check on `fn` and say what happened (no printing: see labs.check)."""
    found, started = find(id), time.monotonic()
    try:
        passed = found.grade(fn)
        return Verdict(id, True, "passed", passed.summary, measured=passed.measured,
                       seconds=time.monotonic() - started, figure=passed.figure)
    except NotAttempted:
        return Verdict(id, False, "not attempted", "not attempted yet: replace `raise NotImplementedError` "
                       "with your code, then run this cell again", seconds=time.monotonic() - started)
    except Wrong as wrong:
        return Verdict(id, False, "wrong", wrong.message, wrong.details, seconds=time.monotonic() - started,
                       figure=wrong.figure)


# -- running the student's code -----------------------------------------------------------------------

def call_student(fn: Callable, *args, **kwargs):
    """Call the student's function in-process; a stub's NotImplementedError means not attempted."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotAttempted() from None
    except RuleBroken as broken:
        raise Wrong(str(broken)) from None
    except Exception as error:
        raise Wrong(f"your function raised {type(error).__name__}: {error}") from None


def on_ranks(rank_fn: Callable, world_size: int, *, timeout: float | None = None, **kwargs):
    """dl.launch(rank_fn, world_size, **kwargs), its failures said as the student's mistakes."""
    timeout = timeout or LAB_TIMEOUT
    try:
        return launch(rank_fn, world_size, timeout=timeout, quiet=True, **kwargs)
    except RankFailure as failure:
        raise _explain_failure(failure, world_size) from None
    except LaunchTimeout as timeout_error:
        raise _explain_timeout(timeout_error, world_size, timeout) from None


def _explain_failure(failure: RankFailure, world_size: int) -> Exception:
    trace = failure.traceback
    if "NotImplementedError" in trace:
        return NotAttempted()
    last = trace.strip().splitlines()[-1]
    if "RuleBroken" in last:
        return Wrong(f"rank {failure.rank} broke a rule of the exercise: {last.partition(': ')[2]}")
    return Wrong(f"rank {failure.rank} of {world_size} raised {last}", _students_part(trace))


def _students_part(trace: str) -> str:
    """The traceback from the student's own frames on (not the grader's, not torch's)."""
    lines = trace.strip().splitlines()
    here = os.path.dirname(os.path.dirname(__file__))
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("File ")
                  and here not in line and "site-packages" not in line), 1)
    return "\n".join(["Traceback (most recent call last):", *lines[start:]])


BLOCKING_CALLS = ("send", "recv", "wait", "barrier", "all_reduce", "broadcast", "all_gather")


def _explain_timeout(error: LaunchTimeout, world_size: int, timeout: float) -> Wrong:
    waits = {rank: where_waiting(text) for rank, text in error.stacks.items()}
    where = [f"rank {rank} was waiting in {place}" for rank, place in sorted(waits.items())]
    blocked = [place.split(" ")[0] for place in waits.values()]
    if len(waits) == world_size and all(call in BLOCKING_CALLS for call in blocked):
        calls = " and ".join(sorted(set(blocked)))
        return Wrong(f"deadlock: all {world_size} ranks were blocked in {calls} after {timeout:.0f} s, each waiting "
                     "for a message that no rank sends", *where,
                     "The usual cure: alternate the order (even ranks send first, odd ranks receive first), or "
                     "start the send with ctx.comm.isend, then recv, then wait on the send.")
    return Wrong(f"your function did not finish within {timeout:.0f} s on {world_size} ranks", *where)


# -- the rules of a hand-written collective -----------------------------------------------------------

class RuleBroken(RuntimeError):
    """The student's code called something the exercise forbids."""


COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "broadcast_object_list", "batch_isend_irecv")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
_granted = threading.local()  # set while our own ctx.comm.send/recv runs torch's


class Transfers(list):
    """Every send and receive the student's code made, in order, as rows the comm figures can draw."""

    def add(self, kind: str, rank: int, peer: int, tensor: torch.Tensor, t_start: float, t_end: float) -> None:
        src, dst = (rank, peer) if kind == "send" else (peer, rank)
        self.append({"rank": rank, "kind": kind, "src": src, "dst": dst, "chunk": -1, "step": len(self),
                     "phase": "yours", "t_start": t_start, "t_end": t_end,
                     "bytes": tensor.numel() * tensor.element_size(), "numel": tensor.numel()})


class PointToPoint:
    """What the student gets as `ctx.comm`: send, recv, isend, irecv (counted and logged), nothing else."""

    def __init__(self, comm, rank: int, transfers: Transfers, hint: str):
        self._comm, self._rank, self._transfers, self._hint = comm, rank, transfers, hint

    def __getattr__(self, name: str):
        raise RuleBroken(f"this exercise allows only ctx.comm.send/recv/isend/irecv, not ctx.comm.{name}. {self._hint}")

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._blocking("send", self._comm.send, tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return self._blocking("recv", self._comm.recv, tensor, src)

    def isend(self, tensor: torch.Tensor, dst: int):
        return self._started("send", self._comm.isend, tensor, dst)

    def irecv(self, tensor: torch.Tensor, src: int):
        return self._started("recv", self._comm.irecv, tensor, src)

    def _blocking(self, kind: str, call, tensor, peer):
        self._check_peer(kind, peer)
        start = time.time()
        with _grant():
            out = call(tensor, peer)
        self._transfers.add(kind, self._rank, peer, tensor, start, time.time())
        return out

    def _started(self, kind: str, call, tensor, peer):
        self._check_peer(kind, peer)
        start = time.time()
        with _grant():
            pending = call(tensor, peer)
        return _Logged(pending, lambda: self._transfers.add(kind, self._rank, peer, tensor, start, time.time()))

    def _check_peer(self, kind: str, peer) -> None:
        world = dist.get_world_size()
        if not isinstance(peer, int) or not 0 <= peer < world or peer == self._rank:
            raise RuleBroken(f"rank {self._rank} tried to {kind} {'to' if kind == 'send' else 'from'} rank {peer!r}: "
                             f"a peer must be another rank, 0..{world - 1}")


class _Logged:
    """A started isend/irecv: its row is logged when the student waits on it."""

    def __init__(self, pending, on_done):
        self._pending, self._on_done = pending, on_done

    def wait(self) -> None:
        with _grant():
            self._pending.wait()
        self._on_done()


@contextmanager
def _grant() -> Iterator[None]:
    _granted.active = True
    try:
        yield
    finally:
        _granted.active = False


def _refusing(name: str, original: Callable, hint: str) -> Callable:
    def refused(*args, **kwargs):
        if getattr(_granted, "active", False):
            return original(*args, **kwargs)
        raise RuleBroken(f"this exercise may not call torch.distributed.{name}: write it from "
                         f"ctx.comm.send/recv/isend/irecv. {hint}")
    return refused


@contextmanager
def point_to_point_only(ctx, hint: str = "") -> Iterator[tuple[object, Transfers]]:
    """Inside: a ctx whose comm has only send/recv/isend/irecv, every torch.distributed communication call
    refused, and the transfers logged. Yields (student's ctx, transfers)."""
    transfers = Transfers()
    patched = {name: getattr(dist, name) for name in COLLECTIVES + POINT_TO_POINT if hasattr(dist, name)}
    for name, original in patched.items():
        setattr(dist, name, _refusing(name, original, hint))
    try:
        yield _StudentContext(ctx, PointToPoint(ctx.comm, ctx.rank, transfers, hint)), transfers
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)


class _StudentContext:
    """ctx as the student sees it in a lab: rank, world_size, device, and the restricted comm."""

    def __init__(self, ctx, comm):
        self.rank, self.world_size, self.device, self.comm = ctx.rank, ctx.world_size, ctx.device, comm

    def __repr__(self) -> str:
        return f"ctx(rank={self.rank}, world_size={self.world_size}, device={self.device})"


def rank_tensor(rank: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """Rank `rank`'s input to a collective: different on every rank, so a missing or doubled rank shows."""
    stream = generator(0, rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=stream, dtype=dtype)
    return torch.randint(-50, 50, shape, generator=stream, dtype=dtype)


def run_collective(ctx, solution: Callable, cases: tuple, hint: str, timed_numel: int = 0) -> list[dict]:
    """On every rank: the student's collective on each case's (dtype, shape) tensor under the p2p-only rules:
    its input, what it returned (and whether that was the input itself), the input after, the transfers;
    then, if asked, its seconds beside dist.all_reduce's on `timed_numel` numbers."""
    outcomes = []
    for dtype, shape in cases:
        tensor = rank_tensor(ctx.rank, dtype, shape).to(ctx.device)
        given = tensor.clone()
        with point_to_point_only(ctx, hint) as (student_ctx, transfers):
            returned = solution(student_ctx, tensor)
        outcomes.append({"given": given.cpu(), "after": tensor.cpu(), "returned_self": returned is tensor,
                         "returned": returned.detach().cpu() if isinstance(returned, torch.Tensor) else returned,
                         "transfers": list(transfers)})
    if timed_numel:
        outcomes.append(seconds_against_builtin(ctx, solution, timed_numel, hint))
    return outcomes


def seconds_against_builtin(ctx, solution: Callable, numel: int, hint: str = "", repeats: int = 3) -> dict:
    """Median seconds of the student's all-reduce-like `solution(ctx, x)` and of dist.all_reduce, on `numel`
    float32 numbers: the cost a passing check sets beside the built-in's."""
    def seconds(call) -> float:
        times = []
        for _ in range(repeats):
            x = torch.ones(numel, device=ctx.device)
            dist.barrier()
            start = time.perf_counter()
            call(x)
            times.append(time.perf_counter() - start)
        return sorted(times)[repeats // 2]

    builtin = seconds(dist.all_reduce)
    with point_to_point_only(ctx, hint) as (student_ctx, _):
        yours = seconds(lambda x: solution(student_ctx, x))
    return {"yours_s": yours, "builtin_s": builtin}


# -- comparing ----------------------------------------------------------------------------------------

def contributing_ranks(value: torch.Tensor, given: list[torch.Tensor]) -> list[int] | None:
    """Which ranks' tensors add up to `value`, if some subset does (N <= 4: at most 15 subsets): a partial
    sum names the ranks a collective missed."""
    for size in range(1, len(given) + 1):
        for subset in itertools.combinations(range(len(given)), size):
            if torch.allclose(torch.stack([given[r] for r in subset]).sum(0).double(), value.double(), atol=1e-5):
                return list(subset)
    return None


def first_difference(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5,
                     rtol: float = 1e-5) -> tuple[tuple[int, ...], float, float] | None:
    """The first element where `got` and `expected` differ beyond tolerance: (index, got, expected)."""
    close = torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol)
    if bool(close.all()):
        return None
    index = tuple(int(i) for i in (~close).nonzero()[0])
    return index, float(got[index]), float(expected[index])


def check_tensor(got, expected: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    """Raise Wrong unless `got` is a tensor of expected's shape and values; names the first bad element."""
    if not isinstance(got, torch.Tensor):
        raise Wrong(f"{what} should be a tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise Wrong(f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    difference = first_difference(got, expected, atol)
    if difference is not None:
        index, value, should = difference
        raise Wrong(f"{what} is wrong at element {list(index)}: {value:.6g}, should be {should:.6g}")
